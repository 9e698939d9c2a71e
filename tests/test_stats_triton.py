"""The fused Triton kernel for per-sample linear statistics, against the torch path and float64.

On CPU the kernel runs through Triton's interpreter (TRITON_INTERPRET=1), which executes the same
kernel source program by program with numpy; the shapes are tiny because it is slow. On a GPU
(`gpu` marker) the compiled kernel is checked against the existing CUDA path and float64 here, and
against dense float32 autograd by the engine's GPU tests (tests/test_stats_gpu.py), which go
through it wherever the engine selects it, as the test here asserts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from perta_stream.compute.stats import per_sample, triton_linear
from perta_stream.compute.stats.per_sample import PerSampleHooks, StatsAccumulator, linear_stats, valid_extents
from perta_stream.compute.stats.triton_linear import ProductTiles, add_per_sample_products
from perta_stream.config.stats import StatsConfig
from perta_stream.errors import UsageError
from perta_stream.pipelines.stats import run_stats
from stats_fixtures import assert_equal_to_dense_reference, save_tiny_model, write_data

pytest.importorskip("triton", reason="Triton is part of the dev extra (pip install -e '.[dev]')")

RELATIVE = 1e-5


@pytest.fixture
def interpreted(monkeypatch: pytest.MonkeyPatch):
    """Build the kernel for Triton's interpreter (CPU tensors), and drop that build afterwards."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton_linear._kernel.cache_clear()
    yield
    triton_linear._kernel.cache_clear()


def _ragged(samples: int, tokens: int, in_features: int, out_features: int, extents: list[int], *, dtype: torch.dtype = torch.float32, seed: int = 0, nan_x: bool = True):
    """Random x and δ; past each extent δ (and x with `nan_x`) holds NaN, which a read would carry
    into every sum. The CUDA torch path reads x past the extents (times a zeroed δ), the kernel never."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, tokens, in_features, generator=generator)
    delta = torch.randn(samples, tokens, out_features, generator=generator)
    past = (torch.arange(tokens) >= torch.tensor(extents)[:, None])[..., None]
    if nan_x:
        x = x.masked_fill(past, torch.nan)
    return x.to(dtype), delta.masked_fill(past, torch.nan).to(dtype)


def _float64_reference(x: torch.Tensor, delta: torch.Tensor, extents: list[int]) -> dict[str, torch.Tensor]:
    """Σ G_n, Σ G_n², and the sums of |terms| that bound their float32 rounding, in float64."""
    grads = [delta[n, :e].double().T @ x[n, :e].double() for n, e in enumerate(extents)]
    magnitudes = [delta[n, :e].double().abs().T @ x[n, :e].double().abs() for n, e in enumerate(extents)]
    zeros = torch.zeros(delta.shape[-1], x.shape[-1], dtype=torch.float64)
    return {
        "sums": sum(grads, zeros),
        "squares": sum((g.square() for g in grads), zeros),
        "sums_bound": sum(magnitudes, zeros),
        "squares_bound": sum((m.square() for m in magnitudes), zeros),
    }


def _assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    # Rounding grows with the magnitude of what is added, not with the (possibly cancelling) sum.
    error = (actual.double() - expected).abs()
    limit = RELATIVE * bound + 1e-30
    worst = int((error / limit).argmax())
    assert bool((error <= limit).all()), f"{what}: error {error.flatten()[worst]:.3e} > {limit.flatten()[worst]:.3e} at flat index {worst}"


def _torch_path(x: torch.Tensor, delta: torch.Tensor, extents: list[int]) -> StatsAccumulator:
    acc = StatsAccumulator({"w": (delta.shape[-1], x.shape[-1])}, ("grad", "fisher"), x.device)
    linear_stats(acc, "w", None, x, delta, extents=extents)
    return acc


CASES = {
    # samples, tokens, in, out, extents, tiles
    "odd-sizes-tiles-smaller": (5, 7, 37, 45, [7, 1, 3, 0, 5], ProductTiles(out_rows=16, in_cols=16, tokens=16, num_warps=4)),
    "tiles-larger-than-matrix": (3, 6, 5, 7, [6, 1, 4], ProductTiles(out_rows=32, in_cols=64, tokens=16, num_warps=4)),
    "several-token-steps": (4, 40, 19, 17, [40, 33, 1, 17], ProductTiles(out_rows=16, in_cols=32, tokens=16, num_warps=4)),
    "one-token-samples": (6, 3, 9, 21, [1, 1, 1, 1, 1, 1], ProductTiles(out_rows=16, in_cols=16, tokens=16, num_warps=4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_the_torch_path_and_float64(case: str, interpreted: None) -> None:
    samples, tokens, in_features, out_features, extents, tiles = CASES[case]
    x, delta = _ragged(samples, tokens, in_features, out_features, extents)
    sums, squares = torch.zeros(out_features, in_features), torch.zeros(out_features, in_features)
    add_per_sample_products(x, delta, extents, squares=squares, sums=sums, tiles=tiles)
    reference = _float64_reference(x, delta, extents)
    torch_path = _torch_path(x, delta, extents)
    for name, got in (("sums", sums), ("squares", squares)):
        bound = reference[f"{name}_bound"]
        _assert_within(got, reference[name], bound, f"{case} kernel {name} vs float64")
        _assert_within(got, getattr(torch_path, name)["w"].double(), bound, f"{case} kernel {name} vs torch path")


def test_kernel_adds_to_the_accumulators_and_can_leave_the_sums_out(interpreted: None) -> None:
    extents = [4, 2, 3]
    x, delta = _ragged(3, 4, 18, 20, extents, seed=1)
    reference = _float64_reference(x, delta, extents)
    start = torch.randn(20, 18).abs()
    squares = start.clone()
    add_per_sample_products(x, delta, extents, squares=squares, tiles=ProductTiles(out_rows=16, in_cols=16, tokens=16, num_warps=4))
    _assert_within(squares - start, reference["squares"], reference["squares_bound"] + start.double(), "squares added to a start")


def test_kernel_squares_each_samples_gradient_not_the_batch_sum(interpreted: None) -> None:
    # Two samples whose gradients cancel: the batch gradient is zero, its square too, while each
    # sample's own squared gradient is not.
    x, delta = _ragged(1, 3, 6, 5, [3], seed=2)
    x, delta = torch.cat([x, x]), torch.cat([delta, -delta])
    sums, squares = torch.zeros(5, 6), torch.zeros(5, 6)
    add_per_sample_products(x, delta, [3, 3], squares=squares, sums=sums)
    one = (delta[0].double().T @ x[0].double()).float()
    assert sums.abs().max() <= 1e-6 * one.abs().max()
    torch.testing.assert_close(squares, 2 * one.square(), rtol=RELATIVE, atol=0.0)
    assert squares.min() > 0


def test_bfloat16_inputs_are_multiplied_exactly(interpreted: None) -> None:
    # A bfloat16 product is exact in float32, so only the float32 additions round.
    extents = [5, 2, 4]
    x, delta = _ragged(3, 5, 23, 17, extents, dtype=torch.bfloat16, seed=3)
    sums, squares = torch.zeros(17, 23), torch.zeros(17, 23)
    add_per_sample_products(x, delta, extents, squares=squares, sums=sums, tiles=ProductTiles(out_rows=16, in_cols=16, tokens=16, num_warps=4))
    reference = _float64_reference(x, delta, extents)
    _assert_within(sums, reference["sums"], reference["sums_bound"], "bfloat16 sums")
    _assert_within(squares, reference["squares"], reference["squares_bound"], "bfloat16 squares")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hooks_through_the_kernel_keep_bias_and_tied_rows(dtype: torch.dtype, interpreted: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # The engine's selector sends a linear layer to the kernel; the bias and the kept lm_head rows
    # stay with the torch code (upcast a sample at a time), and all of it must equal the torch path.
    torch.manual_seed(0)
    layer = torch.nn.Linear(19, 23, bias=True).to(dtype)
    for parameter in layer.parameters():
        parameter.requires_grad_(False)
    x = torch.randn(4, 9, 19, dtype=dtype)
    valid = torch.arange(9) < torch.tensor([9, 4, 1, 6])[:, None]
    weights = torch.randn(9, 23, dtype=dtype)
    rows = [torch.tensor([0, 22]), torch.tensor([5]), torch.tensor([1, 2, 3]), torch.tensor([7])]
    results = {}
    for fused in (False, True):
        monkeypatch.setattr(per_sample, "_fused_products_kernel", lambda device, fused=fused: fused)
        acc = StatsAccumulator({"w": (23, 19), "b": (23,)}, ("grad", "fisher"), torch.device("cpu"))
        hooks = PerSampleHooks(torch.nn.ModuleDict({"proj": layer}), {"proj": {"weight": "w", "bias": "b"}}, acc, valid, lm_head_path="proj", keep_rows=rows)
        with hooks:
            (layer(x.clone().requires_grad_(True)) * weights).sum().backward()
        results[fused] = (acc, hooks.kept_rows)
    (plain, plain_kept), (fused_acc, fused_kept) = results[False], results[True]
    for name in ("w", "b"):
        torch.testing.assert_close(fused_acc.sums[name], plain.sums[name], rtol=RELATIVE, atol=1e-6)
        torch.testing.assert_close(fused_acc.squares[name], plain.squares[name], rtol=RELATIVE, atol=1e-6)
    for got, expected in zip(fused_kept, plain_kept):
        torch.testing.assert_close(got, expected)
    assert valid_extents(valid) == [9, 4, 1, 6]


def test_engine_through_the_kernel_equals_dense_autograd(tmp_path: Path, interpreted: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # The whole statistics run with every linear layer through the (interpreted) kernel: a tied
    # llama, so the lm_head's kept rows meet the embedding's exact rule.
    calls = []
    real = triton_linear.add_per_sample_products
    monkeypatch.setattr(per_sample, "_fused_products_kernel", lambda device: True)
    monkeypatch.setattr(triton_linear, "add_per_sample_products", lambda *a, **k: (calls.append(1), real(*a, **k)))
    forget, retain = write_data(tmp_path / "data")
    model_dir = save_tiny_model(tmp_path, "llama")
    config = StatsConfig(model=str(model_dir), forget=str(forget), retain=str(retain), out=str(tmp_path / "out"), device="cpu", batch_size=3)
    result = run_stats(config)
    assert calls
    assert_equal_to_dense_reference(result.out, model_dir, {"forget": forget, "retain": retain}, tolerance=RELATIVE)


def test_selector_keeps_the_torch_path_on_cpu_and_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not per_sample._fused_products_kernel(torch.device("cpu"))
    monkeypatch.setattr(triton_linear, "triton_importable", lambda: False)
    assert not triton_linear.fused_kernel_applies(torch.device("cuda", 0))


def test_tiles_and_inputs_are_checked() -> None:
    with pytest.raises(UsageError, match=r"out_rows=24 .*tokens=8 .*num_warps=3"):
        ProductTiles(out_rows=24, tokens=8, num_warps=3)
    x, delta = torch.zeros(2, 3, 4), torch.zeros(2, 3, 5)
    with pytest.raises(UsageError, match=r"extents .*squares must be a contiguous float32 \[out, in\] = \[5, 4\]"):
        add_per_sample_products(x, delta, [3, 4], squares=torch.zeros(4, 5))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_kernel_matches_the_cuda_torch_path_and_float64(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    # Else the engine never uses the kernel, and the GPU tests of the engine test the torch path.
    assert triton_linear.fused_kernel_applies(torch.device("cuda")), "Triton is not installed, or the GPU is older than compute capability 8.0"
    # Several tiles in each direction, partial ones at both edges, ragged samples, padding = NaN.
    samples, tokens, in_features, out_features = 6, 150, 300, 520
    extents = [150, 1, 97, 0, 64, 33]
    x, delta = (t.cuda() for t in _ragged(samples, tokens, in_features, out_features, extents, dtype=dtype, seed=4, nan_x=False))
    kernel = StatsAccumulator({"w": (out_features, in_features)}, ("grad", "fisher"), x.device)
    linear_stats(kernel, "w", None, x, delta, extents=extents)
    monkeypatch.setattr(per_sample, "_fused_products_kernel", lambda device: False)
    torch_path = _torch_path(x, delta, extents)
    reference = _float64_reference(x.cpu(), delta.cpu(), extents)
    for name in ("sums", "squares"):
        bound = reference[f"{name}_bound"]
        got = getattr(kernel, name)["w"].cpu()
        _assert_within(got, reference[name], bound, f"{dtype} kernel {name} vs float64")
        _assert_within(got, getattr(torch_path, name)["w"].cpu().double(), bound, f"{dtype} kernel {name} vs CUDA torch path")


def test_the_kernel_can_be_switched_off_on_cuda(monkeypatch):
    from perta_stream.compute.stats.triton_linear import fused_kernel_applies

    monkeypatch.setenv("PERTA_DISABLE_TRITON", "1")
    # Decided before any CUDA call, so this holds on a machine without a GPU too.
    assert fused_kernel_applies(torch.device("cuda")) is False
