"""The statistics sink: one shard per statistic and group, written concurrently, rounded in chunks."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file

from perta_stream.errors import WriteError
from perta_stream.sinks import stats_store
from perta_stream.sinks.shard_writer import ShardWriter
from perta_stream.sinks.stats_store import StatsStore

SHAPES = {"model.layers.0.mlp.up_proj.weight": (5, 6), "model.layers.0.input_layernorm.weight": (6,)}


def _stats(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: {"grad": torch.randn(shape, generator=generator), "fisher": torch.rand(shape, generator=generator)}
        for name, shape in SHAPES.items()
    }


def _store(root, stats_dtype: str, on_shard_finished=None) -> StatsStore:  # noqa: ANN001
    return StatsStore(
        root, datasets=("forget",), kinds=("grad", "fisher"), groups={"layer.0": list(SHAPES)}, shapes=SHAPES,
        stats_dtype=stats_dtype, on_shard_finished=on_shard_finished,
    )


@pytest.mark.parametrize(("stats_dtype", "torch_dtype"), [("F32", torch.float32), ("BF16", torch.bfloat16)])
def test_statistics_rounded_in_chunks_equal_the_whole_tensor_rounded(tmp_path, monkeypatch, stats_dtype, torch_dtype) -> None:  # noqa: ANN001
    # 7 elements per chunk: the 30-element matrix spans five chunks, the last one short.
    monkeypatch.setattr(stats_store, "ROUNDING_CHUNK_ELEMENTS", 7)
    stats = _stats(0)
    store = _store(tmp_path, stats_dtype)
    store.write_group("forget", "layer.0", stats)
    for kind in ("grad", "fisher"):
        written = load_file(str(tmp_path / store.shard_path("forget", kind, "layer.0")))
        assert set(written) == set(SHAPES)
        for name in SHAPES:
            assert written[name].dtype == torch_dtype
            assert torch.equal(written[name], stats[name][kind].to(torch_dtype))


def test_the_shards_of_a_group_are_written_at_the_same_time(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    # Each shard's first write waits until the other shard has begun too: written one after
    # the other, the first would wait alone and the barrier would break.
    barrier = threading.Barrier(2, timeout=10)
    original = ShardWriter.write

    def write(self, data) -> None:  # noqa: ANN001
        if not getattr(self, "met_the_other", False):
            self.met_the_other = True
            barrier.wait()
        original(self, data)

    monkeypatch.setattr(ShardWriter, "write", write)
    store = _store(tmp_path, "F32")
    store.write_group("forget", "layer.0", _stats(1))
    assert store.has_group("forget", "layer.0")


def test_a_failed_shard_leaves_no_file_and_the_finished_one_is_recorded(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    original = ShardWriter.write

    def write(self, data) -> None:  # noqa: ANN001
        if "fisher" in str(self.final_path) and len(memoryview(data)) == 5 * 6 * 4:
            raise WriteError(f"{self.tmp_path}: simulated disk failure")
        original(self, data)

    monkeypatch.setattr(ShardWriter, "write", write)
    finished = []
    store = _store(tmp_path, "F32", on_shard_finished=finished.append)
    with pytest.raises(WriteError, match="simulated disk failure"):
        store.write_group("forget", "layer.0", _stats(2))
    assert [record.file_name for record in finished] == [store.shard_path("forget", "grad", "layer.0")]
    assert (tmp_path / store.shard_path("forget", "grad", "layer.0")).is_file()
    assert sorted(p.name for p in (tmp_path / "forget.fisher").iterdir()) == []
    assert not store.has_group("forget", "layer.0")
