"""Samples into the engine's padded batches, and a launched rank's share of them."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from perta_stream.plan.stats_plan import plan_batches

if TYPE_CHECKING:
    from perta_stream.compute.prompts import EncodedSample
    from perta_stream.compute.stats.streaming import Batch
    from perta_stream.distributed import DistContext

logger = logging.getLogger(__name__)


def sweep_batches(datasets: dict[str, tuple[Any, list[EncodedSample]]], batch_size: int, pad_id: int, dist: DistContext) -> dict[str, list[Batch]]:
    """Each data set's batches for this rank's sweep (all samples outside a launcher)."""
    shares = {name: rank_share(samples, dist) for name, (_, samples) in datasets.items()}
    if dist.is_distributed:
        logger.info("rank %d of %d sweeps %s", dist.rank, dist.world_size, ", ".join(f"{len(share)} {name} samples" for name, share in shares.items()))
    return {name: make_batches(name, share, batch_size, pad_id) for name, share in shares.items()}


def make_batches(dataset: str, samples: list[EncodedSample], batch_size: int, pad_id: int) -> list[Batch]:
    """The samples in the plan's batches (similar lengths together), padded with `pad_id`."""
    from perta_stream.compute.prompts import collate
    from perta_stream.compute.stats.streaming import Batch

    batches = []
    for index, members in enumerate(plan_batches([len(s.input_ids) for s in samples], batch_size)):
        tensors = collate([samples[i] for i in members], pad_id)
        batches.append(Batch(dataset=dataset, index=index, input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"], labels=tensors["labels"]))
    return batches


def rank_share(samples: list[EncodedSample], dist: DistContext) -> list[EncodedSample]:
    """This rank's samples: every world_size-th one in order of length, so that each rank gets
    a similar number of samples and of tokens."""
    if not dist.is_distributed:
        return samples
    by_length = sorted(range(len(samples)), key=lambda i: (len(samples[i].input_ids), i))
    return [samples[i] for i in sorted(by_length[dist.rank :: dist.world_size])]
