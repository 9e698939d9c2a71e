"""Samples into the engine's padded batches, and a launched rank's share of them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from perta_stream.plan.stats_plan import plan_batches

if TYPE_CHECKING:
    from perta_stream.compute.prompts import EncodedSample
    from perta_stream.compute.stats.streaming import Batch
    from perta_stream.distributed import DistContext


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
