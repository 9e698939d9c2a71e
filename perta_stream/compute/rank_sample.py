"""Rank correlation of two per-element quantities over a seeded sample of elements, memory-bounded.

An exact Spearman correlation over all of a model's elements needs every value at once (ranks
are global), which a streamed, memory-bounded pass cannot hold. `inspect` estimates it instead on
a fixed, seeded Bernoulli sample of elements: each tensor's sampled positions are drawn before
its first chunk is read, as gaps of a geometric distribution from a generator seeded by the
tensor's name, so the sample is the same however the tensor is split into chunks, in every run,
and for every quantity compared (F_f against F_r, W of one statistics run against another). On
the sample the correlation is exact: Spearman's ρ with tied values given their average rank
(what scipy.stats.spearmanr computes), in float64.

Two rates nest: the model's (a target number of elements over the whole model: a uniform sample
of every layer, module kind and the model alike) and, per tensor, one that gives at least
TENSOR_SAMPLE_ELEMENTS of its elements (all of a smaller tensor's). Each element of a tensor's
sample also draws a uniform number that puts it into the model's sample with probability
model rate / tensor rate, so the model's sample is Bernoulli at the model's rate.
"""

from __future__ import annotations

import math
import zlib

import torch

TENSOR_SAMPLE_ELEMENTS = 1 << 14
SAMPLE_SEED = 0x5EED

ESTIMATOR = (
    "Spearman's rank correlation (ties get their average rank), exact on a seeded Bernoulli sample of elements "
    "(positions drawn per tensor with geometric gaps from a generator seeded by the tensor's name, independent of "
    "chunking): about {model} elements over the model (a uniform sample of every layer and module kind), and at "
    "least {tensor} per tensor (all of a smaller tensor's)"
)


def model_sample_rate(total_elements: int, target_elements: int) -> float:
    """The rate that samples about `target_elements` of `total_elements` (all of them when fewer)."""
    return 1.0 if total_elements <= target_elements else target_elements / total_elements


def tensor_sample_rate(numel: int, model_rate: float, target_elements: int = TENSOR_SAMPLE_ELEMENTS) -> float:
    """At least the model's rate, and enough for `target_elements` of this tensor."""
    return max(model_rate, 1.0 if numel <= target_elements else target_elements / numel)


def tensor_seed(tensor_name: str, seed: int = SAMPLE_SEED) -> int:
    return zlib.crc32(tensor_name.encode()) ^ seed


def sample_positions(tensor_name: str, numel: int, rate: float, model_share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A tensor's sampled positions and which of them are in the model's sample.

    Args:
        numel: the tensor's element count.
        rate: the tensor's sampling rate (each element is in the sample with this probability).
        model_share: the probability that a sampled element is also in the model's sample
            (model rate / tensor rate, in [0, 1]).

    Returns:
        (positions: sorted int64, in_model: bool of the same length).
    """
    generator = torch.Generator().manual_seed(tensor_seed(tensor_name))
    if rate >= 1.0:
        positions = torch.arange(numel, dtype=torch.int64)
    else:
        # Gaps between Bernoulli(rate) successes are geometric: floor(log U / log(1 - rate)).
        log_miss = math.log1p(-rate)
        parts: list[torch.Tensor] = []
        next_position = 0
        batch = max(64, int(numel * rate * 1.1) + 64)
        while next_position < numel:
            uniforms = torch.rand(batch, generator=generator, dtype=torch.float64).clamp_min_(1e-300)
            gaps = torch.floor(torch.log(uniforms) / log_miss).to(torch.int64)
            drawn = next_position + torch.cumsum(gaps + 1, 0) - 1
            parts.append(drawn[drawn < numel])
            next_position = int(drawn[-1]) + 1
        positions = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
    in_model = torch.rand(positions.numel(), generator=generator, dtype=torch.float64) < model_share
    return positions, in_model


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor in float64, tied values sharing their average rank."""
    order = torch.argsort(values, stable=True)
    ordered = values[order]
    _, counts = torch.unique_consecutive(ordered, return_counts=True)
    ends = torch.cumsum(counts, 0)
    average = (ends - counts + ends + 1).to(torch.float64) / 2  # mean of ranks ends-counts+1 .. ends
    ranks = torch.empty(values.numel(), dtype=torch.float64)
    ranks[order] = torch.repeat_interleave(average, counts)
    return ranks


def spearman(first: torch.Tensor, second: torch.Tensor) -> float | None:
    """Spearman's ρ of two equally long 1-D tensors; None when fewer than 2 elements, either is
    constant (ρ is undefined), or a value is NaN."""
    if first.numel() < 2 or bool(torch.isnan(first).any()) or bool(torch.isnan(second).any()):
        return None
    rank_first = average_ranks(first)
    rank_second = average_ranks(second)
    rank_first -= rank_first.mean()
    rank_second -= rank_second.mean()
    denominator = math.sqrt(float(rank_first.dot(rank_first)) * float(rank_second.dot(rank_second)))
    if denominator == 0.0:
        return None
    return max(-1.0, min(1.0, float(rank_first.dot(rank_second)) / denominator))
