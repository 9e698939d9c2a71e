"""The task vector an adapter describes, one chunk of a tensor at a time, in float32 (no I/O).

For a LoRA on a stored tensor of shape (rows, cols), TV = s · left @ right (left = B, right = A;
for an embedding or fan_in_fan_out, left = Aᵀ, right = Bᵀ, which is (B@A)ᵀ). A chunk of the merge
is a range of elements of the flattened tensor, so it is computed from the rows that cover it:
s · left[rows] @ right, in float32 (each element a sum of r products), then the chunk's slice.
The merge kernel takes that slice as its task vector (compute/merge_kernel.py).

DoRA: the adapted weight is m ⊙ V / ‖V‖ (per row) with V = W0 + s·BA, so TV = that − W0, which
needs θ_0's rows (given by the caller). Trainable tokens replace whole rows: TV = value − W0 there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoadedDelta:
    """An adapter's change of one tensor, its factors in memory as float32.

    Attributes:
        shape: the stored tensor's (rows, cols).
        left, right: (rows, r) and (r, cols) factors, or None without a LoRA.
        scale: s.
        magnitude: DoRA's magnitude per row, or None.
        token_rows: int64 indices of rows replaced by `token_values` ((n, cols) float32), or None.
    """

    shape: tuple[int, int]
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    scale: float = 1.0
    magnitude: torch.Tensor | None = None
    token_rows: torch.Tensor | None = None
    token_values: torch.Tensor | None = None

    @property
    def needs_theta0_rows(self) -> bool:
        return self.magnitude is not None or self.token_rows is not None


def covering_rows(shape: tuple[int, ...], start: int, count: int) -> tuple[int, int]:
    """[first, end) of the rows holding elements [start, start + count) of a row-major (rows, cols) tensor."""
    cols = shape[1] if len(shape) > 1 else 1
    if count == 0:
        return start // cols, start // cols
    return start // cols, -(-(start + count) // cols)


def task_vector_chunk(delta: LoadedDelta, start: int, count: int, out: torch.Tensor, theta0_rows: torch.Tensor | None = None) -> None:
    """Write TV[start : start + count] (flattened) into `out` (float32, `count` long).

    Args:
        theta0_rows: θ_0's rows covering the chunk (`covering_rows`), as (n, cols) in any floating
            dtype; needed when `delta.needs_theta0_rows`.
    """
    first, end = covering_rows(delta.shape, start, count)
    cols = delta.shape[1]
    block = rows_task_vector(delta, first, end, theta0_rows)
    offset = start - first * cols
    out.copy_(block.reshape(-1)[offset : offset + count])


def rows_task_vector(delta: LoadedDelta, first: int, end: int, theta0_rows: torch.Tensor | None = None) -> torch.Tensor:
    """TV of rows [first, end) as a (end - first, cols) float32 tensor."""
    rows, cols = end - first, delta.shape[1]
    if delta.needs_theta0_rows:
        if theta0_rows is None or tuple(theta0_rows.shape) != (rows, cols):
            raise ValueError(f"θ_0 rows [{first}, {end}) are needed for this tensor's DoRA or trainable tokens")
        base = theta0_rows.to(torch.float32)
    if delta.left is not None and delta.right is not None:
        block = torch.mm(delta.left[first:end], delta.right)
        block.mul_(delta.scale)
    else:
        block = torch.zeros(rows, cols, dtype=torch.float32, device=delta.token_values.device if delta.token_values is not None else "cpu")
    if delta.magnitude is not None:
        # The adapted rows m ⊙ V/‖V‖, V = W0 + s·BA (peft's DoRA merge), minus W0.
        adapted = block.add_(base)
        norms = torch.linalg.vector_norm(adapted, dim=1)
        adapted.mul_((delta.magnitude[first:end] / norms).unsqueeze(1))
        block = adapted.sub_(base)
    if delta.token_rows is not None:
        inside = (delta.token_rows >= first) & (delta.token_rows < end)
        if bool(inside.any()):
            local = delta.token_rows[inside] - first
            # Trainable tokens replace the rows' values (after any LoRA): TV = value − W0 there.
            block[local] = delta.token_values[inside] - base[local]
    return block
