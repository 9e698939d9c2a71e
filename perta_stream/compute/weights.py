"""Per-parameter weights W (METHOD.md section 4), computed in float32 into caller-owned buffers.

| method  | W                                                        |
| tv      | 1                                                        |
| uniform | c                                                        |
| grad    | a_f^τ / (a_f^τ + a_r^τ),  a = |ḡ|                        |
| fisher  | b_f^τ / (b_f^τ + b_r^τ),  b = sqrt(F), so b^τ = F^(τ/2)  |

Where the denominator is exactly 0, W is the fallback weight. For fisher, b^τ is computed as
F^(τ/2) directly: with the default τ = 2 that is F itself, exactly the F_f / (F_f + F_r) of the
paper, with no sqrt-then-square rounding.
"""

from __future__ import annotations

import torch


def _powered(statistic: torch.Tensor, out: torch.Tensor, *, method: str, tau: float) -> torch.Tensor:
    """a^τ (grad) or F^(τ/2) (fisher) of a statistics slice, in float32, into `out`."""
    out.copy_(statistic)
    if method == "grad":
        out.abs_()
        exponent = tau
    else:
        exponent = tau / 2
    if exponent != 1.0:
        out.pow_(exponent)
    return out


def compute_weights(
    forget_stat: torch.Tensor,
    retain_stat: torch.Tensor,
    *,
    method: str,
    tau: float,
    fallback_weight: float,
    out: torch.Tensor,
    scratch: torch.Tensor,
    zero_mask: torch.Tensor,
) -> torch.Tensor:
    """W for one slice of statistics (grad: mean gradients; fisher: mean squared gradients).

    Args:
        forget_stat, retain_stat: 1-D slices of the forget and retain statistics (F32 or BF16).
        out, scratch: float32 buffers of the same length (overwritten); W is returned in `out`.
        zero_mask: bool buffer of the same length (overwritten).
    """
    numerator = _powered(forget_stat, out, method=method, tau=tau)
    denominator = _powered(retain_stat, scratch, method=method, tau=tau)
    denominator.add_(numerator)
    torch.eq(denominator, 0, out=zero_mask)
    numerator.div_(denominator)
    numerator.masked_fill_(zero_mask, fallback_weight)
    return numerator
