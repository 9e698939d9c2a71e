"""`unlearn --one-pass` on CUDA: statistics as accurate as `stats` on CUDA, merge arithmetic as `merge`'s.

The statistics are computed on the GPU (bfloat16 by default), so the outputs cannot equal the CPU
run's bytes; what is held to account is each part. The statistics the pass saved are within the
bfloat16 floor used for `stats` on CUDA (tests/test_stats_gpu.py), and the outputs equal, byte
for byte, a CPU `merge` of exactly those statistics. The merge step runs on the GPU (separate
float32 ops, each correctly rounded, no fused multiply-add) when every weight exponent is 0.5, 1
or 2, and on the CPU otherwise; both cases are checked here, and the kernel itself against the
CPU kernel on values at the edges of float32.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from one_pass_fixtures import alpha_dirs, assert_same_output, make_workspace, model_args
from perta_stream.cli import main
from perta_stream.compute.merge_kernel import MergeKernel
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


@pytest.mark.gpu
@pytest.mark.parametrize("tau", [None, "1", "4"])
def test_cuda_one_pass_merges_on_the_gpu_or_the_cpu_with_the_bytes_of_merge(tmp_path: Path, tau: str | None) -> None:
    # bfloat16 models: the merge step takes θ_0 from the sweep's loaded weights. τ=1 gives fisher a
    # square root and τ=4 gives it a square (on the GPU); τ=4 gives grad a fourth power, so that
    # run merges on the CPU.
    ws = make_workspace(tmp_path / "ws", kinds=("llama",), dtype=torch.bfloat16)
    tau_args = ["--tau", tau] if tau else []
    saved, out = tmp_path / "saved", tmp_path / "one"
    args = ["unlearn", "--one-pass", *model_args(ws, "llama"), "--forget", str(ws["forget"]), "--retain", str(ws["retain"]), "--device", "cuda"]
    assert main([*args, "--method", "grad,fisher", "--alpha", "1,2", *tau_args, "--out", str(out), "--save-stats", str(saved), "-q"]) == 0
    for method in ("grad", "fisher"):
        merged = tmp_path / f"merge-{method}"
        assert main(["merge", *model_args(ws, "llama"), "--method", method, "--stats", str(saved), "--alpha", "1,2", *tau_args, "--out", str(merged), "-q"]) == 0
        for alpha, folder in alpha_dirs(out / method, ["1", "2"]).items():
            assert_same_output(folder, alpha_dirs(merged, ["1", "2"])[alpha])


def _edge_values(count: int, generator: torch.Generator) -> torch.Tensor:
    """float32 statistics spanning float32's range: zeros, subnormals, tiny, ordinary, huge."""
    scale = torch.tensor([0.0, 1e-42, 1e-38, 1e-20, 1e-6, 1.0, 1e20, 1e36])
    picks = torch.randint(0, len(scale), (count,), generator=generator)
    return torch.randn(count, generator=generator) * scale[picks]


@pytest.mark.gpu
@pytest.mark.parametrize("method,tau", [("tv", 1.0), ("uniform", 1.0), ("grad", 1.0), ("grad", 2.0), ("grad", 0.5), ("fisher", 1.0), ("fisher", 2.0), ("fisher", 4.0)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merge_kernel_on_cuda_is_bitwise_the_cpu_kernel(method: str, tau: float, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    count = 3 * 2**16 + 123  # several CPU blocks and a partial one
    theta0 = torch.randn(count, generator=generator).to(dtype)
    inputs = {
        "theta0": theta0,
        "full": (theta0.float() + 0.01 * torch.randn(count, generator=generator)).to(dtype),
        "fgt": (theta0.float() + 0.01 * torch.randn(count, generator=generator)).to(dtype),
        "forget.grad": _edge_values(count, generator),
        "retain.grad": _edge_values(count, generator),
        "forget.fisher": _edge_values(count, generator).abs(),
        "retain.fisher": _edge_values(count, generator).abs(),
    }
    roles = {"grad": ("forget.grad", "retain.grad"), "fisher": ("forget.fisher", "retain.fisher")}.get(method, ())
    options = {"method": method, "alphas": (0.5, 1.0, 3.0), "tau": tau, "uniform_weight": 0.3, "fallback_weight": 0.5, "stat_roles": roles, "allow_nonfinite": True}
    expected = [torch.empty(count, dtype=dtype) for _ in range(3)]
    MergeKernel(**options).merge_chunk(inputs, expected)
    actual = [torch.empty(count, dtype=dtype, device="cuda") for _ in range(3)]
    MergeKernel(**options, device="cuda", block_elements=count).merge_chunk({role: t.cuda() for role, t in inputs.items()}, actual)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    for cpu, gpu in zip(expected, actual):
        assert torch.equal(cpu.view(bits), gpu.cpu().view(bits))
