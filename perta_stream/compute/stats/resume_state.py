"""Resume points of the statistics sweep: what must survive a crash to continue it identically.

After the head, and after each backward layer (both datasets done), everything the rest of the
sweep needs is small compared with what was computed to get there:
  - the gradient boundary g at the output of the next backward layer, for every batch
    (tokens × hidden values in the compute dtype);
  - with tied embeddings, the head's sums of the tied parameter, which wait for the embedding
    step (kinds × vocab × hidden float32 values per dataset), and, for the Fisher, each batch's
    per-sample head rows kept for that step;
  - the mean losses (reported at the end).
The layer inputs h_0..h_j are not part of it: a resumed sweep recomputes them with a forward
pass over layers 0..j-1 only, which is cheaper than storing them.

These are plain data. The engine offers a state at every resume point; whoever receives it
decides whether to save it (the pipeline saves at most once per --checkpoint-interval), and a
resumed engine takes a state back as its start. The engine never opens a file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from perta_stream.plan.stats_plan import HEAD_GROUP, layer_group

EMBEDDING_STEP = -1
"""`ResumeState.next_layer` once every decoder layer is done and only the embedding step is left."""


@dataclass(frozen=True)
class SavedTensor:
    """One tensor of a resume state: described up front, its values read only when asked.

    Attributes:
        name: `g.<dataset>.<batch>`, `rows.<dataset>.<batch>` or `tied.<dataset>.<sums|squares>.<tensor_name>`.
        dtype, shape: what `read()` returns (known without reading it, so a writer can lay out a file first).
        read: returns the tensor on the CPU.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]


@dataclass(frozen=True)
class ResumeState:
    """Where a sweep stands at a resume point, enough to continue it bit for bit.

    Attributes:
        next_layer: the backward layer to run next (the last layer right after the head), or
            EMBEDDING_STEP when only the embedding step is left.
        mean_loss: dataset -> mean per-sample loss (from the head).
        tensors: the state's tensors (see the module docstring). When the engine offers a state,
            each `read` is valid only during that call.
    """

    next_layer: int
    mean_loss: Mapping[str, float]
    tensors: Sequence[SavedTensor]

    @property
    def position(self) -> str:
        """`layer <j>` or `embedding`, for messages."""
        return position_name(self.next_layer)


ResumePointSink = Callable[[ResumeState], None]
"""Receives the state at every resume point; it may save it, or ignore it (it must not keep the
`read` functions past the call)."""


def position_name(next_layer: int) -> str:
    """`layer <j>`, or `embedding` for EMBEDDING_STEP: where a sweep continues, for messages."""
    return "embedding" if next_layer == EMBEDDING_STEP else f"layer {next_layer}"


def groups_before(next_layer: int, num_layers: int) -> list[str]:
    """The groups a sweep resumed at `next_layer` does not hand to the sink again (the head and
    the layers above): their shards must all be kept for the state to be usable."""
    return [HEAD_GROUP] + [layer_group(index) for index in range(max(next_layer + 1, 0), num_layers)]


def boundary_name(dataset: str, batch_index: int) -> str:
    return f"g.{dataset}.{batch_index}"


def rows_name(dataset: str, batch_index: int) -> str:
    return f"rows.{dataset}.{batch_index}"


def tied_prefix(dataset: str, which: str) -> str:
    """Prefix of the tied sums (`which` = `sums`) or squares (`squares`) of a dataset."""
    return f"tied.{dataset}.{which}."
