"""W's arithmetic (compute/weights.py) against numpy's float32 reference, bit for bit.

The stable form is fixed by METHOD.md §4; numpy computes each operation correctly rounded in
float32 (its power with exponent 0.5 is its square root, with 2 a product), so every exponent that
`exponent_is_portable` calls portable must give numpy's bits exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merge_fixtures import reference_weights
from perta_stream.compute.weights import compute_weights, exponent_is_portable


def _statistics(kind: str, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random magnitudes over many binades, with the edges: zeros, subnormals, equal pairs, huge values."""
    generator = np.random.default_rng(seed)
    forget = (generator.standard_normal(count) * np.exp2(generator.integers(-60, 60, count))).astype(np.float32)
    retain = (generator.standard_normal(count) * np.exp2(generator.integers(-60, 60, count))).astype(np.float32)
    edges = np.array([0.0, 0.0, 1e-45, 1e-40, 3e38, 1.0, 2.0, 1e-30], dtype=np.float32)
    forget[: len(edges)], retain[: len(edges)] = edges, np.roll(edges, 1)
    forget[len(edges)], retain[len(edges)] = 0.7, 0.7
    if kind == "fisher":  # mean squares: non-negative
        forget, retain = np.abs(forget), np.abs(retain)
    return forget, retain


@pytest.mark.parametrize(("kind", "tau"), [("grad", 0.5), ("grad", 1.0), ("grad", 2.0), ("fisher", 1.0), ("fisher", 2.0), ("fisher", 4.0)])
def test_portable_exponents_give_numpys_bits(kind, tau):
    assert exponent_is_portable(kind, tau)
    forget, retain = _statistics(kind, 1 << 18, seed=int(tau * 10))
    buffers = [torch.empty(len(forget)) for _ in range(4)]
    weights = compute_weights(
        torch.from_numpy(forget), torch.from_numpy(retain), method=kind, tau=tau, fallback_weight=0.5,
        out=buffers[0], scratch=buffers[1], spare=buffers[2], other=buffers[3],
    )
    expected = reference_weights(forget, retain, kind=kind, tau=tau, fallback_weight=0.5)
    mismatched = np.flatnonzero(weights.numpy().view(np.uint32) != expected.view(np.uint32))
    assert mismatched.size == 0, f"{mismatched.size} elements differ, e.g. s_f={forget[mismatched[0]]!r} s_r={retain[mismatched[0]]!r}"
