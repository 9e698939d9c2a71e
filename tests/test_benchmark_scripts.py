"""The GPU benchmark is one prepared script for a rarely lent machine: its smoke mode runs here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_benchmark_runs_in_smoke_mode_and_counts_the_statistics_writes() -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_stats.py"), "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    lines = completed.stdout.splitlines()
    extrapolation = json.loads("\n".join(lines[max(i for i, line in enumerate(lines) if line == "{") :]))
    # The smoke shape's parameter count, from transformers' own model (untied, as the script assumes).
    config = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512, vocab_size=1024,
                         num_hidden_layers=80, tie_word_embeddings=False)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert extrapolation["stats_bytes"] == 2 * 2 * 4 * parameters  # forget + retain, grad + fisher, float32
    assert extrapolation["stats_write_s"] > 0 and extrapolation["weight_read_s"] > 0
    io_s = extrapolation["weight_read_s"] + extrapolation["stats_write_s"]
    assert extrapolation["total_s"] == max(extrapolation["compute_s"], io_s) + extrapolation["boundary_spill_s"]
