"""Inputs pinned for the whole run: a folder replaced while a run reads it is never mixed in, and a
file rewritten in place stops the run before its commit (merge, stats, the one pass).

Each test lets the run read its first bytes, then changes an input the way another command
would, right in the middle of the run: `os.rename` + a new folder (what `merge --out x
--overwrite` does to `x`), or a rewrite of the same files (a copy with `cp` over them).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from perta_stream.cli import main
from reliability_fixtures import merge_args, partial_of, tree_digest


def _change_after_first_read(monkeypatch, folder: Path, replacement: Path, *, in_place: bool) -> dict:  # noqa: ANN001
    """Once any local input has been read from, replace `folder` by a copy of `replacement`: by a
    rename (the old folder stays, moved aside) or by rewriting its shards in place."""
    from perta_stream.sources import byte_source

    original = byte_source.LocalByteSource.read_into
    state = {"done": False}

    def read_into(self, file_name, offset, buffer):  # noqa: ANN001
        original(self, file_name, offset, buffer)
        if state["done"]:
            return
        state["done"] = True
        if in_place:
            for shard in sorted(folder.glob("*.safetensors")):
                data = (replacement / shard.name).read_bytes()
                before = shard.stat()
                assert len(data) == before.st_size  # same layout: only the values differ
                with open(shard, "r+b") as handle:  # the same inode, as `cp` over it writes
                    handle.write(data)
                # A new modification time, as any write sets (explicit: some file systems keep
                # times in whole seconds).
                os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
        else:
            os.rename(folder, folder.with_name(folder.name + ".moved-aside"))
            shutil.copytree(replacement, folder)

    monkeypatch.setattr(byte_source.LocalByteSource, "read_into", read_into)
    return state


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


# ---------------------------------------------------------------- merge
def test_merge_reads_a_folder_replaced_during_the_run_as_it_was_when_the_run_started(triplet, tmp_path, monkeypatch, caplog):
    theta0, full, fgt = triplet
    reference = tmp_path / "reference"
    assert main(merge_args(theta0, full, fgt, reference)) == 0
    state = _change_after_first_read(monkeypatch, theta0, fgt, in_place=False)
    out = tmp_path / "out"
    assert main(merge_args(theta0, full, fgt, out)) == 0
    assert state["done"]
    assert _shards(out) == _shards(reference)  # every shard from the folder as it was: nothing mixed
    assert "was replaced during the run" in caplog.text


def test_merge_refuses_to_commit_when_an_input_is_rewritten_in_place(triplet, tmp_path, monkeypatch, capsys):
    theta0, full, fgt = triplet
    _change_after_first_read(monkeypatch, theta0, fgt, in_place=True)
    out = tmp_path / "out"
    assert main(merge_args(theta0, full, fgt, out)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: theta0 input") and "was rewritten while this run read it" in err and "nothing was committed" in err
    assert not out.exists() and partial_of(out).is_dir()
    # The next run is told why, not that --resume alone would finish it.
    monkeypatch.undo()
    assert main(merge_args(theta0, full, fgt, out)) == 1
    err = capsys.readouterr().err
    assert "stopped because: theta0 input" in err and "rerun the same command with --resume" not in err


# ---------------------------------------------------------------- stats
@pytest.fixture
def stats_inputs(tmp_path):
    from stats_fixtures import save_tiny_model, write_data

    model = save_tiny_model(tmp_path / "models", "llama")
    other = save_tiny_model(tmp_path / "others", "llama", seed=1)
    forget, retain = write_data(tmp_path / "data")
    return model, other, forget, retain


def _stats_args(model: Path, forget: Path, retain: Path, out: Path) -> list[str]:
    return ["stats", "--model", str(model), "--forget", str(forget), "--retain", str(retain), "--out", str(out), "--device", "cpu", "-q"]


def _stats_files(out: Path) -> dict[str, str]:
    digest = tree_digest(out)
    del digest["perta_stats.json"]  # names the folder's files, whose inodes differ between copies
    return digest


def test_stats_reads_a_model_folder_replaced_during_the_run_as_it_was(stats_inputs, tmp_path, monkeypatch):
    model, other, forget, retain = stats_inputs
    reference = tmp_path / "reference"
    assert main(_stats_args(model, forget, retain, reference)) == 0
    state = _change_after_first_read(monkeypatch, model, other, in_place=False)
    out = tmp_path / "out"
    assert main(_stats_args(model, forget, retain, out)) == 0
    assert state["done"]
    assert _stats_files(out) == _stats_files(reference)
    records = [json.loads((folder / "perta_stats.json").read_text())["model"] for folder in (out, reference)]
    assert records[0]["content_sha256"] == records[1]["content_sha256"]


def test_stats_refuses_to_commit_when_the_model_is_rewritten_in_place(stats_inputs, tmp_path, monkeypatch, capsys):
    model, other, forget, retain = stats_inputs
    _change_after_first_read(monkeypatch, model, other, in_place=True)
    out = tmp_path / "out"
    assert main(_stats_args(model, forget, retain, out)) == 1
    assert "model input" in capsys.readouterr().err and not out.exists()


# ---------------------------------------------------------------- the one pass
@pytest.fixture
def one_pass_inputs(tmp_path):
    from one_pass_fixtures import make_workspace, perturbed_copy

    ws = make_workspace(tmp_path / "ws", kinds=("llama",))
    ws["other"] = perturbed_copy(ws["llama.theta0"], tmp_path / "other", seed=7)
    return ws


def _one_pass_args(ws: dict, out: Path) -> list[str]:
    from one_pass_fixtures import data_args, model_args

    return ["unlearn", "--one-pass", *model_args(ws, "llama"), *data_args(ws), "--method", "fisher", "--out", str(out), "-q"]


def test_the_one_pass_reads_a_folder_replaced_during_the_run_as_it_was(one_pass_inputs, tmp_path, monkeypatch):
    ws = one_pass_inputs
    reference = tmp_path / "reference"
    assert main(_one_pass_args(ws, reference)) == 0
    state = _change_after_first_read(monkeypatch, ws["llama.theta0"], ws["other"], in_place=False)
    out = tmp_path / "out"
    assert main(_one_pass_args(ws, out)) == 0
    assert state["done"]
    assert _shards(out) == _shards(reference)


def test_the_one_pass_refuses_to_commit_when_an_input_is_rewritten_in_place(one_pass_inputs, tmp_path, monkeypatch, capsys):
    ws = one_pass_inputs
    _change_after_first_read(monkeypatch, ws["llama.theta0"], ws["other"], in_place=True)
    out = tmp_path / "out"
    assert main(_one_pass_args(ws, out)) == 1
    assert "was rewritten while this run read it" in capsys.readouterr().err and not out.exists()


# ---------------------------------------------------------------- --resume knows a replaced input
def _swap_keeping_sizes_and_times(folder: Path, replacement: Path) -> None:
    """Put `replacement`'s bytes at `folder` as new files whose sizes and modification times are the
    old ones (`cp -p` of a same-shaped model): only the device and inode tell them apart."""
    times = {shard.name: shard.stat().st_mtime_ns for shard in folder.glob("*.safetensors")}
    staged = Path(shutil.copytree(folder, folder.with_name(folder.name + ".new")))
    for name, mtime_ns in times.items():
        shutil.copyfile(replacement / name, staged / name)
        os.utime(staged / name, ns=(mtime_ns, mtime_ns))
    os.rename(folder, folder.with_name(folder.name + ".old"))
    os.rename(staged, folder)


def _interrupt_after_first_shard(monkeypatch) -> None:  # noqa: ANN001
    from perta_stream.sinks import model_output

    original = model_output.LocalModelOutput.shard_finished

    def interrupted(self, record):  # noqa: ANN001
        original(self, record)
        raise KeyboardInterrupt

    monkeypatch.setattr(model_output.LocalModelOutput, "shard_finished", interrupted)


@pytest.mark.parametrize("command", ["merge", "one-pass"])
def test_resume_refuses_an_input_replaced_by_files_of_the_same_sizes_and_times(command, triplet, one_pass_inputs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    if command == "merge":
        theta0, full, fgt = triplet
        args, folder, replacement = merge_args(theta0, full, fgt, out), theta0, fgt
    else:
        args, folder, replacement = _one_pass_args(one_pass_inputs, out), one_pass_inputs["llama.theta0"], one_pass_inputs["other"]
    _interrupt_after_first_shard(monkeypatch)
    assert main(args) == 130
    monkeypatch.undo()
    _swap_keeping_sizes_and_times(folder, replacement)
    capsys.readouterr()
    assert main([*args, "--resume"]) == 1
    assert "was started with other inputs or options" in capsys.readouterr().err and not out.exists()
