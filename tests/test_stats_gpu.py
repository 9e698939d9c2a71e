"""The CUDA path (bfloat16 compute, float32 accumulation) agrees with the CPU float32 path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from perta_stream.config.stats import StatsConfig
from perta_stream.pipelines.stats import run_stats
from stats_fixtures import load_stats_dir, relative_error, save_tiny_model, write_data

# bf16 has an 8-bit mantissa (relative rounding 2^-9 ≈ 0.2%); errors compound through two layers,
# the recomputed forward and the backward, so the statistics agree to a few percent.
BF16_TOLERANCE = 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_cuda_matches_cpu_within_bf16_tolerance(tmp_path: Path, kind: str) -> None:
    forget, retain = write_data(tmp_path / "data")
    model_dir = save_tiny_model(tmp_path, kind)
    results = {}
    for device in ("cpu", "cuda"):
        config = StatsConfig(model=str(model_dir), forget=str(forget), retain=str(retain), out=str(tmp_path / device), device=device, batch_size=3)
        results[device] = run_stats(config)
    assert results["cuda"].record["compute_dtype"] == "bfloat16" and results["cuda"].record["device"] == "cuda"
    for sub in ("forget.grad", "forget.fisher", "retain.grad", "retain.fisher"):
        cpu, cuda = load_stats_dir(results["cpu"].out / sub), load_stats_dir(results["cuda"].out / sub)
        worst = max((relative_error(cuda[n], cpu[n]), n) for n in cpu)
        assert worst[0] <= BF16_TOLERANCE, f"{sub}: {worst}"
        assert all(torch.isfinite(t).all() for t in cuda.values())
