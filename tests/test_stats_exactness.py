"""The streamed statistics equal a dense per-sample autograd reference, for every parameter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from perta_stream.config.stats import StatsConfig
from perta_stream.pipelines.stats import run_stats
from perta_stream.sources.qa_dataset import load_qa_samples, select_fraction
from stats_fixtures import (
    FORGET_RECORDS,
    assert_at_bfloat16_floor,
    assert_equal_to_dense_reference,
    load_stats_dir,
    reference_stats,
    relative_error,
    save_tiny_model,
    write_data,
    write_jsonl,
)

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stats")
    forget, retain = write_data(root / "data")
    models = {kind: save_tiny_model(root / "models", kind) for kind in ("llama", "qwen2", "mistral")}
    return {"root": root, "forget": forget, "retain": retain, **models}


def _run(ws: dict[str, Path], kind: str, out_name: str, **options) -> object:
    options.setdefault("batch_size", 3)
    options.setdefault("device", "cpu")
    config = StatsConfig(model=str(ws[kind]), forget=str(ws["forget"]), retain=str(ws["retain"]), out=str(ws["root"] / out_name), **options)
    return run_stats(config)


def _checkpoint_tensors(model_dir: Path) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_streamed_statistics_equal_dense_reference(workspace: dict[str, Path], kind: str) -> None:
    # llama: tied embeddings + padding_idx; qwen2: untied, q/k/v biases, chat template;
    # mistral: a sliding window (5) shorter than every sample.
    result = _run(workspace, kind, f"out-{kind}")
    out = result.out
    expected_shapes = _checkpoint_tensors(workspace[kind])
    assert len(list(workspace[kind].glob("*.safetensors"))) >= 3
    loaded = assert_equal_to_dense_reference(out, workspace[kind], {"forget": workspace["forget"], "retain": workspace["retain"]}, tolerance=TOLERANCE)
    assert len(loaded) == 4
    for streamed in loaded.values():
        assert {n: tuple(t.shape) for n, t in streamed.items()} == expected_shapes
        assert all(t.dtype == torch.float32 for t in streamed.values())
    if kind == "llama":
        assert "lm_head.weight" not in expected_shapes  # tied: stored once, under the embedding's name


def test_one_short_sample_over_a_real_sized_vocabulary(tmp_path: Path) -> None:
    # One sample alone in its batch, 10 answer tokens: the head's input gradient sums over a
    # 49152-word vocabulary for 10 positions, which MKL's sgemm does far less accurately than for
    # 12 or more (head_projection.py). Measured here, worst tensor from float64 autograd (grad /
    # fisher): 7.4e-5 / 1.3e-4 with one matmul, 1.3e-6 / 1.7e-6 summed in vocabulary blocks, dense
    # float32 autograd 2.1e-6 / 3.2e-6.
    model = save_tiny_model(tmp_path / "models", "llama", vocab_size=49152, anisotropic_embedding=0.5)
    one = write_jsonl(tmp_path / "one.jsonl", FORGET_RECORDS[:1])
    result = run_stats(StatsConfig(model=str(model), forget=str(one), retain=str(one), out=str(tmp_path / "out"), batch_size=2, device="cpu"))
    assert_equal_to_dense_reference(result.out, model, {"forget": one}, tolerance=TOLERANCE)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_bfloat16_compute_is_as_accurate_as_dense_bfloat16_autograd(workspace: dict[str, Path], kind: str) -> None:
    # The CUDA default (bfloat16 layers, float32 accumulation), run here on the CPU.
    result = _run(workspace, kind, f"out-{kind}-bf16", device="cpu", compute_dtype="bfloat16")
    assert result.record.compute_dtype == "bfloat16"
    assert_at_bfloat16_floor(result.out, workspace[kind], {"forget": workspace["forget"], "retain": workspace["retain"]}, device="cpu")


def test_record_and_layout(workspace: dict[str, Path]) -> None:
    result = _run(workspace, "qwen2", "out-record", kinds=("fisher",), seed=5)
    out = result.out
    assert sorted(p.name for p in out.iterdir()) == ["forget.fisher", "perta_stats.json", "retain.fisher"]
    record = json.loads((out / "perta_stats.json").read_text())
    assert record["format"] == "perta_stats" and record["format_version"] == 1
    assert record["kinds"] == ["fisher"] and record["stats_dtype"] == "float32" and record["compute_dtype"] == "float32"
    assert record["datasets"]["forget"]["num_samples"] == 5 and record["datasets"]["retain"]["num_records"] == 7
    assert record["model"]["model_type"] == "qwen2" and len(record["model"]["header_sha256"]) == 64
    assert set(record) == {
        "format", "format_version", "tool_version", "model", "kinds", "stats_dtype", "compute_dtype", "device", "datasets",
        "fraction", "seed", "max_length", "question_key", "answer_key", "system_prompt", "loss", "elapsed_s", "peak_rss_bytes",
    }
    index = json.loads((out / "forget.fisher" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-{k:05d}-of-00004.safetensors" for k in range(1, 5)]  # embed, 2 layers, head
    assert index["metadata"]["total_size"] == 4 * sum(t.numel() for t in load_stats_dir(out / "forget.fisher").values())
    assert not list(out.rglob("*.tmp")) and not list(out.glob("perta-boundaries-*"))


def test_spill_to_disk_gives_identical_results(workspace: dict[str, Path]) -> None:
    in_ram = _run(workspace, "llama", "out-ram", boundary_budget_bytes=2**30)
    spilled = _run(workspace, "llama", "out-spill", boundary_budget_bytes=3000)
    assert in_ram.boundary_spilled == 0 and spilled.boundary_spilled > 0 and spilled.boundary_peak_disk_bytes > 0
    assert spilled.boundary_peak_ram_bytes <= 3000
    for sub in ("forget.grad", "forget.fisher", "retain.grad", "retain.fisher"):
        a, b = load_stats_dir(in_ram.out / sub), load_stats_dir(spilled.out / sub)
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert not list(spilled.out.rglob("*.bin"))


def test_plan_boundary_estimate_matches_measured_peak(workspace: dict[str, Path]) -> None:
    result = _run(workspace, "qwen2", "out-plan", kinds=("grad",))
    assert result.boundary_peak_ram_bytes == result.plan.boundary_bytes


def test_bfloat16_storage_is_the_rounded_float32_statistics(workspace: dict[str, Path]) -> None:
    full = _run(workspace, "qwen2", "out-f32")
    half = _run(workspace, "qwen2", "out-bf16", stats_dtype="BF16")
    assert json.loads((half.out / "perta_stats.json").read_text())["stats_dtype"] == "bfloat16"
    for sub in ("forget.grad", "retain.fisher"):
        a, b = load_stats_dir(full.out / sub), load_stats_dir(half.out / sub)
        assert all(b[n].dtype == torch.bfloat16 and torch.equal(b[n], a[n].to(torch.bfloat16)) for n in a)


def test_fraction_is_seeded_and_exact(workspace: dict[str, Path]) -> None:
    first = _run(workspace, "mistral", "out-frac-a", fraction=0.6, seed=3, kinds=("grad",))
    second = _run(workspace, "mistral", "out-frac-b", fraction=0.6, seed=3, kinds=("grad",))
    a, b = load_stats_dir(first.out / "retain.grad"), load_stats_dir(second.out / "retain.grad")
    assert all(torch.equal(a[n], b[n]) for n in a)
    chosen = [s.index for s in select_fraction(load_qa_samples(workspace["retain"]), 0.6, 3)]
    assert len(chosen) == 4 and chosen != [s.index for s in select_fraction(load_qa_samples(workspace["retain"]), 0.6, 4)]
    assert json.loads((first.out / "perta_stats.json").read_text())["datasets"]["retain"]["num_samples"] == 4
    reference = reference_stats(workspace["mistral"], workspace["retain"], sample_indices=chosen)
    assert max(relative_error(a[n], reference[n]["grad"]) for n in reference) <= TOLERANCE


def test_system_prompt_and_short_max_length(workspace: dict[str, Path]) -> None:
    # The chat template's system turn is part of the prompt, and --max-length cuts prompts from the start.
    system = "You are a helpful assistant ."
    result = _run(workspace, "qwen2", "out-system", system_prompt=system, max_length=24, kinds=("fisher",))
    reference = reference_stats(workspace["qwen2"], workspace["forget"], system_prompt=system, max_length=24)
    streamed = load_stats_dir(result.out / "forget.fisher")
    assert max(relative_error(streamed[n], reference[n]["fisher"]) for n in reference) <= TOLERANCE
