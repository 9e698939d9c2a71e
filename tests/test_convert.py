"""Pickle checkpoints: refused by default, converted only with an explicit opt-in."""

from __future__ import annotations

import pytest
import torch

from merge_fixtures import load_checkpoint
from perta_stream.cli import main
from perta_stream.errors import PickleCheckpointError, UsageError
from perta_stream.pipelines.convert import ConvertConfig, run_convert
from perta_stream.sources.checkpoint import open_local_checkpoint


@pytest.fixture()
def pickle_dir(tmp_path):
    path = tmp_path / "pickled"
    path.mkdir()
    state = {"a.weight": torch.randn(4, 3), "b.bias": torch.randn(5).to(torch.bfloat16), "c.scalar": torch.tensor(2.0)}
    torch.save(state, path / "pytorch_model.bin")
    (path / "config.json").write_text("{}")
    return path, state


def test_pickle_only_checkpoint_is_refused_with_the_conversion_command(pickle_dir):
    path, _ = pickle_dir
    with pytest.raises(PickleCheckpointError, match="perta-stream convert --allow-pickle"):
        open_local_checkpoint(path, "full")


def test_conversion_needs_the_opt_in(pickle_dir, tmp_path, capsys):
    path, _ = pickle_dir
    with pytest.raises(UsageError, match="--allow-pickle"):
        ConvertConfig(model=str(path), out=str(tmp_path / "out"))
    assert main(["convert", str(path), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_converted_checkpoint_holds_the_same_tensors(pickle_dir, tmp_path):
    path, state = pickle_dir
    out = run_convert(ConvertConfig(model=str(path), out=str(tmp_path / "out"), allow_pickle=True))
    converted = load_checkpoint(tmp_path / "out")
    assert set(converted) == set(state)
    for name, tensor in state.items():
        assert converted[name].dtype == tensor.dtype
        torch.testing.assert_close(converted[name], tensor, rtol=0, atol=0)
    assert (tmp_path / "out" / "config.json").read_text() == "{}"
    assert open_local_checkpoint(out, "full").tensors.keys() == state.keys()
