"""`unlearn --one-pass` on CUDA: statistics as accurate as `stats` on CUDA, merge arithmetic as `merge`'s.

The statistics are computed on the GPU (bfloat16 by default), so the outputs cannot equal the CPU
run's bytes; what is held to account is each part. The statistics the pass saved are within the
bfloat16 floor used for `stats` on CUDA (tests/test_stats_gpu.py), and the outputs equal, byte
for byte, a `merge` of exactly those statistics: the merge step runs the CPU merge kernel in
float32 on host copies of each finished group (the engine hands its sink host tensors), so it
keeps the kernel's rounding contract (separate float32 ops, no fused multiply-add, one rounding).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from one_pass_fixtures import alpha_dirs, assert_same_output, make_workspace, model_args
from perta_stream.cli import main
from stats_fixtures import assert_at_bfloat16_floor


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_cuda_one_pass_statistics_at_the_bfloat16_floor_and_outputs_equal_merge(tmp_path: Path, kind: str) -> None:
    ws = make_workspace(tmp_path / "ws", kinds=(kind,))
    data = ["--forget", str(ws["forget"]), "--retain", str(ws["retain"]), "--batch-size", "3"]
    saved, out = tmp_path / "saved", tmp_path / "one"
    args = ["unlearn", "--one-pass", *model_args(ws, kind), *data, "--device", "cuda", "--method", "grad,fisher", "--alpha", "0.5,1"]
    assert main([*args, "--out", str(out), "--save-stats", str(saved), "-q"]) == 0
    assert_at_bfloat16_floor(saved, ws[f"{kind}.theta0"], {"forget": ws["forget"], "retain": ws["retain"]}, device="cuda")
    for method in ("grad", "fisher"):
        merged = tmp_path / f"merge-{method}"
        assert main(["merge", *model_args(ws, kind), "--method", method, "--stats", str(saved), "--alpha", "0.5,1", "--out", str(merged), "--max-memory", "4GiB", "-q"]) == 0
        for alpha, folder in alpha_dirs(out / method, ["0.5", "1"]).items():
            assert_same_output(folder, alpha_dirs(merged, ["0.5", "1"])[alpha])
