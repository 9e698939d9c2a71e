"""A dense, in-memory reference of inspect's figures, computed another way.

Every tensor is loaded whole with the safetensors library; W comes from numpy in float32
(merge_fixtures.reference_weights, one operation at a time), bins from numpy.searchsorted, sums
from numpy in float64 over whole tensors, rank correlations from scipy.stats.spearmanr. Nothing
is shared with the streamed engine except the definitions (METHOD.md; the figures' docstrings).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from merge_fixtures import load_checkpoint, reference_weights

BINS = 32
EDGES = np.array([k / BINS for k in range(BINS + 1)], dtype=np.float32)


def as_f32(tensor) -> np.ndarray:
    import torch

    return tensor.to(torch.float32).numpy().astype(np.float32).reshape(-1)


def dense_weights(stats: Path, *, kind: str, tau: float, fallback_weight: float = 0.5) -> dict[str, np.ndarray]:
    """Tensor name -> W (float32, flattened) of a statistics directory."""
    forget, retain = load_checkpoint(stats / f"forget.{kind}"), load_checkpoint(stats / f"retain.{kind}")
    return {name: reference_weights(as_f32(forget[name]), as_f32(retain[name]), kind=kind, tau=tau, fallback_weight=fallback_weight) for name in forget}


def task_vector(theta0: Path, fgt: Path) -> dict[str, np.ndarray]:
    """Tensor name -> θ_fgt − θ_0 in float32 (the merge's task vector), flattened."""
    base, tuned = load_checkpoint(theta0), load_checkpoint(fgt)
    return {name: as_f32(tuned[name]) - as_f32(base[name]) for name in base}


def figures_of(weights: np.ndarray, tv: np.ndarray | None, fallback_mask: np.ndarray | None) -> dict:
    """The figures of one set of elements, named as inspect.json names them (before dividing)."""
    bins = np.searchsorted(EDGES[1:-1], weights, side="right")
    product = None if tv is None else (weights * tv).astype(np.float32)
    return {
        "elements": weights.size,
        "histogram": np.bincount(bins, minlength=BINS).tolist(),
        "below": int((weights < np.float32(0.1)).sum()),
        "above": int((weights > np.float32(0.9)).sum()),
        "weight_sum": float(weights.astype(np.float64).sum()),
        "fallback": 0 if fallback_mask is None else int(fallback_mask.sum()),
        "wtv_sq": None if product is None else float(np.square(product.astype(np.float64)).sum()),
        "tv_sq": None if tv is None else float(np.square(tv.astype(np.float64)).sum()),
    }


def fallback_masks(stats: Path, kind: str) -> dict[str, np.ndarray]:
    forget, retain = load_checkpoint(stats / f"forget.{kind}"), load_checkpoint(stats / f"retain.{kind}")
    return {name: (as_f32(forget[name]) == 0) & (as_f32(retain[name]) == 0) for name in forget}


def combine(parts: list[dict]) -> dict:
    """Figures of a union of element sets (the sums of theirs)."""
    total = {key: 0 for key in ("elements", "below", "above", "weight_sum", "fallback")}
    total["histogram"] = [0] * BINS
    total["wtv_sq"] = total["tv_sq"] = None if parts and parts[0]["tv_sq"] is None else 0.0
    for part in parts:
        for key in ("elements", "below", "above", "weight_sum", "fallback"):
            total[key] += part[key]
        total["histogram"] = [a + b for a, b in zip(total["histogram"], part["histogram"])]
        if total["tv_sq"] is not None:
            total["wtv_sq"] += part["wtv_sq"]
            total["tv_sq"] += part["tv_sq"]
    return total


def spearman(first: np.ndarray, second: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(first.astype(np.float64), second.astype(np.float64)).statistic)


def grad_cosine(stats: Path, names: list[str]) -> float:
    forget, retain = load_checkpoint(stats / "forget.grad"), load_checkpoint(stats / "retain.grad")
    f = np.concatenate([as_f32(forget[name]).astype(np.float64) for name in names])
    r = np.concatenate([as_f32(retain[name]).astype(np.float64) for name in names])
    return float(f @ r / (np.linalg.norm(f) * np.linalg.norm(r)))
