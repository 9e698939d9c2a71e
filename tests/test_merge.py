"""The streamed merge equals a dense numpy reference, bit for bit, and its output is a real checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from merge_fixtures import (
    load_checkpoint,
    make_triplet,
    output_bits,
    reference_merge,
    shard_names,
    tree_digest,
    write_stats,
)
from perta_stream.config.merge import MergeConfig
from perta_stream.pipelines.merge import run_merge

# A 4 KiB chunk is far smaller than the larger tensors (64x96 bf16 = 12 KiB), so they are sliced.
SMALL_CHUNK_BYTES = 4096


@pytest.fixture(scope="module", params=[(True, torch.bfloat16), (False, torch.float32)], ids=["tied-bf16", "untied-fp32"])
def models(request, tmp_path_factory):
    tied, dtype = request.param
    root = tmp_path_factory.mktemp("models")
    theta0, full, fgt = make_triplet(root, tied=tied, dtype=dtype)
    stats = write_stats(root / "stats", theta0)
    return theta0, full, fgt, stats


def _assert_equal_bits(expected: dict[str, np.ndarray], out_dir: Path) -> None:
    actual = output_bits(out_dir)
    assert set(actual) == set(expected)
    for name, bits in expected.items():
        np.testing.assert_array_equal(actual[name], bits, err_msg=name)


@pytest.mark.parametrize("method", ["tv", "uniform", "grad", "fisher"])
def test_streamed_merge_equals_dense_reference(models, method, tmp_path):
    theta0, full, fgt, stats = models
    assert len(shard_names(full)) >= 3
    config = MergeConfig(
        theta0=str(theta0),
        full=str(full),
        fgt=str(fgt),
        out=str(tmp_path / "out"),
        method=method,
        stats=str(stats) if method in ("grad", "fisher") else None,
        alphas=(1.5,),
        uniform_weight=0.3,
        fallback_weight=0.25,
        chunk_bytes=SMALL_CHUNK_BYTES,
    )
    result = run_merge(config)
    expected = reference_merge(
        theta0, full, fgt, method=method, alpha=1.5, stats=stats, uniform_weight=0.3, fallback_weight=0.25
    )
    _assert_equal_bits(expected, Path(result.outputs[0]))
    assert not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("method,tau", [("grad", 2.0), ("fisher", 4.0)])
def test_non_default_tau(models, method, tau, tmp_path):
    theta0, full, fgt, stats = models
    config = MergeConfig(
        theta0=str(theta0), full=str(full), fgt=str(fgt), out=str(tmp_path / "out"), method=method,
        stats=str(stats), tau=tau, chunk_bytes=SMALL_CHUNK_BYTES,
    )
    run_merge(config)
    _assert_equal_bits(reference_merge(theta0, full, fgt, method=method, alpha=1.0, stats=stats, tau=tau), tmp_path / "out")


def test_several_alphas_in_one_pass_equal_separate_merges(models, tmp_path):
    theta0, full, fgt, stats = models
    result = run_merge(
        MergeConfig(
            theta0=str(theta0), full=str(full), fgt=str(fgt), out=str(tmp_path / "sweep"), method="fisher",
            stats=str(stats), alphas=(0.5, 1.0, 2.0), chunk_bytes=SMALL_CHUNK_BYTES,
        )
    )
    assert result.outputs == tuple(str(tmp_path / "sweep" / f"alpha_{a}") for a in ("0.5", "1", "2"))
    for alpha, out_dir in zip((0.5, 1.0, 2.0), result.outputs):
        _assert_equal_bits(reference_merge(theta0, full, fgt, method="fisher", alpha=alpha, stats=stats), Path(out_dir))
        assert json.loads((Path(out_dir) / "perta_merge.json").read_text())["alpha"] == alpha


def test_out_dtype_and_max_shard_size(models, tmp_path):
    theta0, full, fgt, _ = models
    run_merge(
        MergeConfig(
            theta0=str(theta0), full=str(full), fgt=str(fgt), out=str(tmp_path / "out"), out_dtype="F16",
            max_shard_bytes=16_000, chunk_bytes=SMALL_CHUNK_BYTES,
        )
    )
    _assert_equal_bits(reference_merge(theta0, full, fgt, method="tv", alpha=1.0, out_dtype="F16"), tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    names = shard_names(tmp_path / "out")
    assert len(names) >= 3 and set(index["weight_map"].values()) == set(names)
    sizes = {n: (tmp_path / "out" / n).stat().st_size for n in names}
    tensors = load_checkpoint(tmp_path / "out")
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for name in names:
        with open(tmp_path / "out" / name, "rb") as handle:
            header_bytes = 8 + int.from_bytes(handle.read(8), "little")
        # A shard only exceeds the cap when it holds a single tensor larger than the cap.
        assert sizes[name] - header_bytes <= 16_000 or len([n for n, f in index["weight_map"].items() if f == name]) == 1


def test_output_is_a_loadable_checkpoint_with_records(models, tmp_path):
    from transformers import AutoModelForCausalLM

    theta0, full, fgt, _ = models
    before = {p: tree_digest(p) for p in (theta0, full, fgt)}
    result = run_merge(MergeConfig(theta0=str(theta0), full=str(full), fgt=str(fgt), out=str(tmp_path / "out")))
    out = Path(result.outputs[0])
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    merged = load_checkpoint(out)
    state = model.state_dict()
    for name, tensor in merged.items():
        torch.testing.assert_close(state[name].to(tensor.dtype), tensor, rtol=0, atol=0)
    # side files byte for byte, and the shard layout of full
    for side in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (out / side).read_bytes() == (full / side).read_bytes()
    assert shard_names(out) == shard_names(full)
    record = json.loads((out / "perta_merge.json").read_text())
    assert record["method"] == "tv" and record["alpha"] == 1.0
    assert {s["file_name"]: s["sha256"] for s in record["shards"]} == {
        n: d for n, d in tree_digest(out).items() if n.endswith(".safetensors")
    }
    assert record["peak_rss_bytes"] > 0 and record["elapsed_s"] > 0
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "- unlearning" in card and "- perta" in card
    assert {p: tree_digest(p) for p in (theta0, full, fgt)} == before


def test_dry_run_prints_plan_and_writes_nothing(models, tmp_path):
    theta0, full, fgt, stats = models
    result = run_merge(
        MergeConfig(theta0=str(theta0), full=str(full), fgt=str(fgt), out=str(tmp_path / "out"), method="grad",
                    stats=str(stats), dry_run=True)
    )
    assert "bytes to read" in result.plan_text and "at the start (baseline)" in result.plan_text
    assert "forget.grad" in result.plan_text
    assert not any(tmp_path.iterdir())


def test_chunks_spanning_several_kernel_blocks(models, tmp_path, monkeypatch):
    from perta_stream.compute import merge_kernel

    # Blocks smaller than a chunk and not dividing it: every chunk ends in a partial block.
    monkeypatch.setattr(merge_kernel, "BLOCK_ELEMENTS", 1000)
    theta0, full, fgt, stats = models
    run_merge(
        MergeConfig(theta0=str(theta0), full=str(full), fgt=str(fgt), out=str(tmp_path / "out"), method="grad",
                    stats=str(stats), alphas=(0.7,), chunk_bytes=16384)
    )
    _assert_equal_bits(reference_merge(theta0, full, fgt, method="grad", alpha=0.7, stats=stats), tmp_path / "out")
