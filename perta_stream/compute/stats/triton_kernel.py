"""The Triton source of the per-sample products kernel (see triton_linear.py, which builds and launches it).

Kept apart because it imports Triton at the top: Triton's interpreter finds `triton.language` in
the kernel's module globals, and only triton_linear imports this module, when the kernel is first
needed. The function is not decorated here, so that it can be jitted again (compiled or
interpreted, as TRITON_INTERPRET says at that moment). It calls only Triton builtins: helpers such
as `tl.zeros` are themselves jitted when Triton is imported, and then cannot run in an interpreter
switched on later (as the tests do, in a process where Triton was imported already).
"""

import triton.language as tl


# One program owns one (BLOCK_OUT × BLOCK_IN) tile of the [out, in] weight (its row block on grid
# axis 0 when OUT_ON_AXIS0, else its column block). For each sample it forms the tile of
# G_n = δ_nᵀ x_n from the sample's first extents[n] tokens, BLOCK_T at a time, then adds G_n² (and
# G_n) to register accumulators; the float32 statistics in memory are read and written once, at
# the end. Tiles at the edges of the weight, and token blocks past an extent, are masked, so
# nothing outside them is read or written.
def per_sample_products(
    x_ptr, delta_ptr, extents_ptr, squares_ptr, sums_ptr,
    samples, out_features, in_features,
    stride_xs, stride_xt, stride_xi,
    stride_ds, stride_dt, stride_do,
    WANT_SUMS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_T: tl.constexpr, OUT_ON_AXIS0: tl.constexpr,
):  # fmt: skip
    if OUT_ON_AXIS0:
        rows = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
        cols = tl.program_id(1) * BLOCK_IN + tl.arange(0, BLOCK_IN)
    else:
        rows = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
        cols = tl.program_id(0) * BLOCK_IN + tl.arange(0, BLOCK_IN)
    steps = tl.arange(0, BLOCK_T)
    row_ok = rows < out_features
    col_ok = cols < in_features
    total = tl.full((BLOCK_OUT, BLOCK_IN), 0.0, tl.float32)
    total_sq = tl.full((BLOCK_OUT, BLOCK_IN), 0.0, tl.float32)
    for n in range(samples):
        extent = tl.load(extents_ptr + n)
        # 64-bit sample offsets: samples × tokens × vocab passes 2³¹ for an lm_head's δ.
        x_sample = x_ptr + tl.cast(n, tl.int64) * stride_xs
        delta_sample = delta_ptr + tl.cast(n, tl.int64) * stride_ds
        product = tl.full((BLOCK_OUT, BLOCK_IN), 0.0, tl.float32)
        for start in range(0, extent, BLOCK_T):
            tokens = start + steps
            token_ok = tokens < extent
            d = tl.load(
                delta_sample + tokens[:, None] * stride_dt + rows[None, :] * stride_do, mask=token_ok[:, None] & row_ok[None, :], other=0.0
            )
            x = tl.load(x_sample + tokens[:, None] * stride_xt + cols[None, :] * stride_xi, mask=token_ok[:, None] & col_ok[None, :], other=0.0)
            product = tl.dot(tl.trans(d), x, product, input_precision=INPUT_PRECISION)
        # The square of this sample's own gradient tile, while it is still in registers.
        total_sq += product * product
        if WANT_SUMS:
            total += product
    offsets = tl.cast(rows, tl.int64)[:, None] * in_features + cols[None, :]
    inside = row_ok[:, None] & col_ok[None, :]
    tl.store(squares_ptr + offsets, tl.load(squares_ptr + offsets, mask=inside) + total_sq, mask=inside)
    if WANT_SUMS:
        tl.store(sums_ptr + offsets, tl.load(sums_ptr + offsets, mask=inside) + total, mask=inside)

