"""A fused Triton kernel for the per-sample statistics of a linear layer's weight.

For y = x Wᵀ, sample n's weight gradient is G_n = δ_nᵀ x_n, summed over that sample's own tokens.
The statistics need only Σ_n G_n and Σ_n G_n∘G_n. The torch path forms every G_n as a full
(out × in) matrix in memory and then reads it back to square and add it, so its cost is one write
and two reads of an out × in float32 matrix per sample. This kernel gives each program one
(out × in) tile: it forms the tile of G_n in registers from the sample's tokens (a small matmul of
bfloat16 operands with float32 accumulation), squares and adds it there, moves on to the next
sample, and touches the float32 accumulators in memory once at the end. No per-sample matrix is
ever written; the cost is the batch weight-gradient matmul plus one read and write of the sums.

Samples are ragged: sample n's tokens are its first `extents[n]` positions, and the positions
after them are never read (padding there may hold anything).

The engine uses this on CUDA when Triton is importable (`fused_kernel_applies`); the torch path in
per_sample.py stays for the CPU and as the fallback. Under `TRITON_INTERPRET=1` the same kernel
runs on CPU tensors through Triton's interpreter, which is how the CPU tests check it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import torch

from perta_stream.errors import UsageError

_DOT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class ProductTiles:
    """How the kernel cuts the work: an (out_rows × in_cols) tile per program, `tokens` at a time.

    Every size is a power of two (Triton's block shapes) and at least 16 (the smallest operand of
    a tensor-core matmul). Three float32 tiles live in registers at once (the sample's product,
    the sum and the squared sum), so out_rows × in_cols is bounded by the register file:
    64 × 128 over 4 warps is 64 registers per thread for each tile.
    """

    out_rows: int = 64
    in_cols: int = 128
    tokens: int = 32
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        problems = [
            f"{field}={value} must be a power of two >= 16"
            for field, value in (("out_rows", self.out_rows), ("in_cols", self.in_cols), ("tokens", self.tokens))
            if value < 16 or value & (value - 1)
        ]
        if self.num_warps not in (1, 2, 4, 8, 16):
            problems.append(f"num_warps={self.num_warps} must be one of 1, 2, 4, 8, 16")
        if self.num_stages < 1:
            problems.append(f"num_stages={self.num_stages} must be >= 1")
        if problems:
            raise UsageError("ProductTiles: " + "; ".join(problems))


DEFAULT_TILES = ProductTiles()
"""The tiles the engine uses (read at call time, so a benchmark can try others). The fastest of six
tilings on an H200 for both 70B shapes (benchmarks/results/stats_gpu.md): 2.54 ms on the MLP weight
(28672 × 8192) and 10.0 ms on the lm_head (128256 × 8192), against 3.38 and 14.0 ms for 128 × 64
over 8 warps."""


@functools.cache
def triton_importable() -> bool:
    """Whether the `triton` package is installed (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def fused_kernel_applies(device: torch.device) -> bool:
    """Whether the engine forms the per-sample products with this kernel on `device`: CUDA with
    Triton installed, on a GPU with bfloat16 tensor cores (compute capability 8.0, Ampere, or newer),
    unless PERTA_DISABLE_TRITON=1 asks for the torch path (read here only)."""
    if device.type != "cuda" or not triton_importable() or os.environ.get("PERTA_DISABLE_TRITON", "") == "1":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def add_per_sample_products(
    x: torch.Tensor,
    delta: torch.Tensor,
    extents: list[int],
    *,
    squares: torch.Tensor,
    sums: torch.Tensor | None = None,
    tiles: ProductTiles | None = None,
) -> None:
    """Add Σ_n G_n∘G_n to `squares` (and Σ_n G_n to `sums`), G_n = δ_n[:e_n]ᵀ x_n[:e_n].

    Args:
        x: layer inputs [samples, tokens, in] (bfloat16, float16 or float32).
        delta: output gradients [samples, tokens, out]; positions at or past a sample's extent
            are never read.
        extents: per sample, how many leading positions are its tokens.
        squares, sums: float32 [out, in] accumulators on x's device, added to in place.
        tiles: the tiling (DEFAULT_TILES when None).

    Float32 inputs are multiplied in full float32 (not TF32). Half-precision inputs are multiplied
    as they are: the product of two bfloat16 (or float16) values is exact in float32, and the
    tensor cores add the products in float32, so nothing is lost against upcasting first.

    Raises:
        UsageError: shapes, dtypes or devices that do not fit together.
    """
    tiles = tiles if tiles is not None else DEFAULT_TILES
    _check(x, delta, extents, squares, sums)
    samples, _, in_features = x.shape
    out_features = delta.shape[-1]
    if x.dtype != delta.dtype or x.dtype not in _DOT_DTYPES or x.device.type == "cpu":
        # A matmul needs one operand dtype; float32 holds either exactly. CPU tensors only reach
        # here under Triton's interpreter, whose dot multiplies bfloat16's stored bits as integers.
        x, delta = x.float(), delta.float()
    extents_tensor = torch.tensor(extents, dtype=torch.int32, device=x.device)
    row_blocks, col_blocks = -(-out_features // tiles.out_rows), -(-in_features // tiles.in_cols)
    # Programs start in grid order, axis 0 fastest, so the programs running at one time share
    # their axis-1 block and between them read the whole operand along axis 0 (δ for row blocks,
    # x for column blocks), again for every axis-1 block. Axis 0 goes to the smaller one, which
    # stays in L2: for a 70B lm_head, x (8 × 96 tokens × 8192) is 12.6 MB and δ 197 MB.
    out_on_axis0 = out_features <= in_features
    grid = (row_blocks, col_blocks) if out_on_axis0 else (col_blocks, row_blocks)
    _kernel()[grid](
        x, delta, extents_tensor, squares, sums if sums is not None else squares,
        samples, out_features, in_features,
        x.stride(0), x.stride(1), x.stride(2),
        delta.stride(0), delta.stride(1), delta.stride(2),
        WANT_SUMS=sums is not None,
        # Float32 operands in full float32; Triton's default ("tf32") concerns float32 operands only.
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_OUT=tiles.out_rows, BLOCK_IN=tiles.in_cols, BLOCK_T=tiles.tokens, OUT_ON_AXIS0=out_on_axis0,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip


def _check(x: torch.Tensor, delta: torch.Tensor, extents: list[int], squares: torch.Tensor, sums: torch.Tensor | None) -> None:
    problems = []
    if x.dim() != 3 or delta.dim() != 3 or x.shape[:2] != delta.shape[:2]:
        problems.append(f"x {tuple(x.shape)} and delta {tuple(delta.shape)} must be [samples, tokens, features] with the same samples and tokens")
    elif len(extents) != x.shape[0] or any(not 0 <= e <= x.shape[1] for e in extents):
        problems.append(f"extents {extents} must give one value in [0, {x.shape[1]}] per sample ({x.shape[0]})")
    for name, acc in (("squares", squares), ("sums", sums)):
        if acc is None:
            continue
        if acc.dtype != torch.float32 or not acc.is_contiguous() or tuple(acc.shape) != (delta.shape[-1], x.shape[-1]):
            problems.append(f"{name} must be a contiguous float32 [out, in] = [{delta.shape[-1]}, {x.shape[-1]}] tensor, got {acc.dtype} {tuple(acc.shape)}")
        if acc.device != x.device or delta.device != x.device:
            problems.append(f"{name} ({acc.device}), x ({x.device}) and delta ({delta.device}) must be on one device")
    if problems:
        raise UsageError("per-sample products kernel: " + "; ".join(problems))


@functools.cache
def _kernel():
    """The jitted kernel, built on first use: importing Triton is slow, and whether the kernel is
    compiled or interpreted is decided by TRITON_INTERPRET when it is built."""
    import triton

    from perta_stream.compute.stats import triton_kernel

    return triton.jit(triton_kernel.per_sample_products)
