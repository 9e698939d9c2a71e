"""Per-parameter weights W (METHOD.md section 4), computed in float32 into caller-owned buffers.

| method  | W                                                        |
| tv      | 1                                                        |
| uniform | c                                                        |
| grad    | a_f^τ / (a_f^τ + a_r^τ),  a = |ḡ|                        |
| fisher  | b_f^τ / (b_f^τ + b_r^τ),  b = sqrt(F), so b^τ = F^(τ/2)  |

Where both statistics are exactly 0, W is the fallback weight.

The quotient is evaluated in a form that cannot overflow or underflow for finite statistics:
with s = |ḡ| (grad, e = τ) or s = F (fisher, e = τ/2) and q = (min(s_f, s_r) / max(s_f, s_r))^e,
which lies in [0, 1] (computed as (min / max)^e for e >= 1 and as min^e / max^e for e < 1),

    W = 1 / (1 + q)   where s_f >= s_r,        W = q / (1 + q)   where s_f < s_r.

Raising s to the power e first, as the textbook form reads, overflows float32 for F = 1e3 and
τ = 30 (giving inf / inf = NaN) and flushes F = 1e-12 with τ = 8 to 0 (giving the fallback 0.5
where W is 1). The ratio form is exact at the ends (W = 1 where s_r = 0, W = 0 where s_f = 0)
and within a few float32 roundings of the exact quotient everywhere else; with the default τ of
fisher (e = 1) it is F_f / (F_f + F_r) of the paper up to that rounding.
"""

from __future__ import annotations

import torch


def _magnitude(statistic: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """s = |ḡ| (grad) or |F| (fisher: F >= 0, so only a -0.0 changes, to +0.0) in float32, into `out`."""
    return out.copy_(statistic).abs_()


def weight_exponent(method: str, tau: float) -> float:
    """e in W = s_f^e / (s_f^e + s_r^e): τ for grad (s = |ḡ|), τ/2 for fisher (s = F = b²)."""
    return tau if method == "grad" else tau / 2


# Exponents whose power is a correctly rounded op on every device: 1 is no power at all, 2 is
# x·x (aten's pow special-cases it on CPU and CUDA), and 0.5 is a square root taken in float64
# (`_sqrt_`). Any other exponent goes through the platform's pow (SLEEF on CPU, CUDA's powf),
# whose last bit differs.
PORTABLE_EXPONENTS = (0.5, 1.0, 2.0)


def _sqrt_(values: torch.Tensor) -> torch.Tensor:
    """The correctly rounded float32 square root, in place.

    torch's vectorised float32 sqrt on CPU is not correctly rounded (measured with torch 2.13 on
    an AVX-512 CPU: one ulp off for 17% of random inputs), while CUDA's is. The square root of a
    float32 taken in float64 and rounded once to float32 is the correctly rounded one (53 bits
    hold more than twice float32's 24, plus two), so both devices give the same bits."""
    return values.copy_(values.double().sqrt_())


def exponent_is_portable(method: str, tau: float) -> bool:
    """Whether W of this method and τ is bitwise the same on every device (see PORTABLE_EXPONENTS);
    tv and uniform have no power at all."""
    return method not in ("grad", "fisher") or weight_exponent(method, tau) in PORTABLE_EXPONENTS


def compute_weights(
    forget_stat: torch.Tensor,
    retain_stat: torch.Tensor,
    *,
    method: str,
    tau: float,
    fallback_weight: float,
    out: torch.Tensor,
    scratch: torch.Tensor,
    spare: torch.Tensor,
    other: torch.Tensor,
) -> torch.Tensor:
    """W for one slice of statistics (grad: mean gradients; fisher: mean squared gradients).

    Args:
        forget_stat, retain_stat: 1-D slices of the forget and retain statistics (F32 or BF16).
        out, scratch, spare, other: float32 buffers of the same length (overwritten); W is
            returned in `out`.

    Finite statistics never give a NaN: W is in [0, 1], and exactly the fallback only where both
    statistics are 0. (Non-finite statistics are the caller's to refuse.)

    The two branches of the quotient are taken without a mask (torch's masked ops run an order of
    magnitude slower than arithmetic on the CPU): with a = s_f^e, b = s_r^e for e < 1 (else a =
    s_f, b = s_r), q = min(a/b, b/a) is min/max, and min(a/b, 1) is 1 where s_f >= s_r and q
    elsewhere, each from the very division the ratio form reads, so W is bit for bit that form.
    """
    forget_side = _magnitude(forget_stat, out)
    retain_side = _magnitude(retain_stat, scratch)
    exponent = weight_exponent(method, tau)
    if exponent < 1.0:
        # min^e / max^e: an exponent below 1 brings both towards 1, so neither leaves float32's
        # range, while min / max itself could underflow where its e-th power does not.
        if exponent == 0.5:
            _sqrt_(forget_side)
            _sqrt_(retain_side)
        else:
            forget_side.pow_(exponent)
            retain_side.pow_(exponent)
    forward = torch.div(forget_side, retain_side, out=spare)
    backward = torch.div(retain_side, forget_side, out=other)
    ratio = torch.minimum(forward, backward, out=scratch)
    numerator = forward.clamp_max_(1.0)
    if exponent > 1.0:
        # min / max first: its e-th power is in [0, 1], where min^e or max^e alone could overflow.
        ratio.pow_(exponent)
        numerator.pow_(exponent)
    # ratio is q in [0, 1], NaN exactly where both statistics are 0.
    denominator = torch.add(ratio, 1.0, out=out)
    weights = torch.div(numerator, denominator, out=out)
    return weights.nan_to_num_(nan=fallback_weight)
