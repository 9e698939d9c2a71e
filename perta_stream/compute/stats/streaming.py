"""The layer-major sweep: every sample through one layer at a time, forward then backward.

Order of work (each decoder layer's weights are loaded twice in all, never once per batch):
  forward   embeddings for every batch, then layer 0 .. L-1 over every batch; each layer's input
            (a boundary) is kept in the BoundaryStore
  head      final norm + lm_head + per-sample loss, at the positions the loss reads only;
            backprop Σ_n ℓ_n to the last boundary
  backward  layer L-1 .. 0: recompute the layer's forward from its saved input with autograd,
            backprop the output-gradient boundary, collect exact per-sample statistics with hooks
  embed     per-sample embedding rows from the gradient at layer 0's input
Statistics are per dataset: the datasets share the sweep (one weight load serves both) but have
separate accumulators, flushed to the sink group by group. The engine opens no files: weights come
from the loader, boundaries go to the store, statistics go to the sink.

Resume points (compute/stats/resume_state.py): after the head and after each backward layer the
engine offers its state to `on_resume_point`; a run given such a state as `start` recomputes only
the layer inputs it still needs (forward over layers 0..j-1) and continues the backward at layer
j, doing exactly the arithmetic the interrupted run would have done, so its results are the same
bits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from perta_stream.compute.prompts import IGNORE_INDEX, mean_target_nll, scored_positions
from perta_stream.distributed import SINGLE_PROCESS, DistContext
from perta_stream.compute.stats.boundaries import BoundaryStore
from perta_stream.compute.stats.head_projection import VocabularyBlockedBackward
from perta_stream.compute.stats.resume_state import (
    EMBEDDING_STEP,
    ResumePointSink,
    ResumeState,
    SavedTensor,
    boundary_name,
    rows_name,
    tied_prefix,
)
from perta_stream.compute.stats.per_sample import FISHER, BufferPool, PerSampleHooks, Scratch, StatsAccumulator, embedding_stats, sample_token_rows
from perta_stream.compute.stats.skeleton import NORM_PREFIX, LastProjectionSkipped, ModelSkeleton, attention_mask, materialize, release
from perta_stream.errors import ResumeError
from perta_stream.memory import release_free_heap
from perta_stream.plan.stats_plan import EMBED_GROUP, EMBED_TENSOR_NAME, HEAD_GROUP, layer_group
from perta_stream.progress import progress

StatsSink = Callable[[str, str, dict[str, dict[str, torch.Tensor]], Callable[[], None]], None]
"""Receives (dataset, group, tensor_name -> {kind -> float32 tensor}, release) when a group is
complete. It may keep the tensors after it returns (e.g. to write them on another thread), and
calls `release()` once it is done with them: their memory then goes back to the engine."""


def _nothing() -> None:
    pass


class WeightLoader(Protocol):
    """Gives tensors by checkpoint name, on the compute device in the compute dtype."""

    def load(self, tensor_names: Sequence[str]) -> dict[str, torch.Tensor]: ...

    def prefetch(self, tensor_names: Sequence[str]) -> None: ...


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids, attention mask and answer-only labels of some samples of a dataset."""

    dataset: str
    index: int
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass
class EngineReport:
    """What the sweep saw: mean loss per dataset and the boundary store's high-water marks."""

    mean_loss: dict[str, float] = field(default_factory=dict)
    boundary_peak_ram_bytes: int = 0
    boundary_peak_disk_bytes: int = 0
    boundary_spilled: int = 0


class StreamingStatsEngine:
    """Computes mean per-sample gradients and mean squared per-sample gradients, layer by layer.

    Args:
        skeleton: the meta-device model.
        loader: the weights (the engine asks for one group at a time and prefetches the next).
        boundaries: where layer-boundary states wait between the passes.
        sink: receives each finished group's statistics.
        kinds: `grad` and/or `fisher`.
        device: the compute device; compute_dtype: the dtype layers run in.
        dist: under a launcher, this rank's context: each rank sweeps its own share of the
            samples, a group's sums and the sample counts are summed over all ranks before the
            group is finished, and only rank 0 calls `sink`.
        on_resume_point: receives the sweep's state after the head and after each backward
            layer (None: no resume points, e.g. under a launcher, where each rank's boundary
            gradients are only a share).
        host_results: the sink gets host copies of the statistics and the device memory is
            reused at once; False hands the sink the device tensors themselves, and they stay
            allocated until the sink calls `give_back` (for a consumer on the same device).
    """

    def __init__(
        self,
        skeleton: ModelSkeleton,
        loader: WeightLoader,
        boundaries: BoundaryStore,
        sink: StatsSink,
        *,
        kinds: Sequence[str],
        device: torch.device,
        compute_dtype: torch.dtype,
        dist: DistContext = SINGLE_PROCESS,
        on_resume_point: ResumePointSink | None = None,
        host_results: bool = True,
    ):
        self._dist = dist
        self._host_results = host_results
        self._on_resume_point = on_resume_point
        self._skeleton = skeleton
        self._loader = loader
        self._store = boundaries
        self._sink = sink
        self._kinds = tuple(kinds)
        self._device = device
        self._dtype = compute_dtype
        self._rotary = skeleton.rotary(device)
        self._rotary_layer_types = [skeleton.rotary_layer_type(self._rotary, index) for index in range(skeleton.num_layers)]
        self._scratch = Scratch()
        self._pool = BufferPool()

    def run(self, batches: Mapping[str, Sequence[Batch]], *, start: ResumeState | None = None) -> EngineReport:
        """Run the sweep over the batches of every dataset; returns what it saw.

        Args:
            start: a state saved at a resume point of an earlier run over the same batches and
                weights: the sweep continues from there (the groups finished before it are not
                handed to the sink again).

        Raises:
            ResumeError: `start` does not fit the model or the batches.
        """
        all_batches = [batch for dataset_batches in batches.values() for batch in dataset_batches]
        counts = self._global_counts({name: sum(b.input_ids.shape[0] for b in dataset_batches) for name, dataset_batches in batches.items()})
        tokens = sum(batch.num_tokens for batch in all_batches)
        num_layers = self._skeleton.num_layers
        report = EngineReport()
        if start is None:
            self._forward(all_batches, tokens, num_layers)
            tied = self._head(batches, counts, tokens, num_layers, report)
            next_layer = num_layers - 1 if num_layers else EMBEDDING_STEP
            self._offer_resume_point(next_layer, batches, tied, report)
        else:
            next_layer = start.next_layer
            if not EMBEDDING_STEP <= next_layer < num_layers:
                raise ResumeError(f"the saved state continues at layer {next_layer}, but the model has {num_layers} layers")
            # Layer j's backward needs its input h_j: recompute h_0..h_j (nothing for the embedding step).
            if next_layer != EMBEDDING_STEP:
                self._forward(all_batches, tokens, next_layer)
            tied = self._restore(start, batches, report)
        self._backward(batches, counts, tokens, next_layer, tied, report)
        self._embedding(batches, counts, tied)
        self._scratch.clear()
        self._pool.clear()
        report.boundary_peak_ram_bytes = self._store.peak_ram_bytes
        report.boundary_peak_disk_bytes = self._store.peak_disk_bytes
        report.boundary_spilled = self._store.spilled_count
        return report

    # ------------------------------------------------------------------ helpers
    def _global_counts(self, counts: dict[str, int]) -> dict[str, int]:
        """Samples per dataset over all ranks (each rank holds a share)."""
        if not self._dist.is_distributed:
            return counts
        totals = self._dist.all_reduce_(torch.tensor([counts[name] for name in counts], dtype=torch.int64))
        return dict(zip(counts, (int(total) for total in totals)))

    def _finish_group(
        self,
        dataset: str,
        group: str,
        acc: StatsAccumulator,
        count: int,
        tensor_names: Sequence[str] | None = None,
        give_back: Callable[[], None] = _nothing,
    ) -> None:
        """Sum the group's accumulators over the ranks, then hand the means to the sink (rank 0).

        Only the tensors finished here are summed: a tied head's sums wait for the embedding
        step and are summed there, once, together with the embedding's own. `give_back` returns the
        accumulators' memory; it runs once nothing reads the results any more.
        """
        names = list(tensor_names) if tensor_names is not None else list(acc.sums or acc.squares)
        if self._dist.is_distributed:
            for sums in (acc.sums, acc.squares):
                for tensor_name in names:
                    if tensor_name in sums:
                        self._dist.all_reduce_(sums[tensor_name])
        if not self._dist.is_main:
            give_back()
            return
        # Statistics leave under the checkpoint's tensor names (fused experts split per expert).
        results = self._skeleton.layout.to_checkpoint(acc.results(count, names, to_host=self._host_results))
        if acc.device.type != "cpu" and self._host_results:
            # The results are host copies: the device memory can be reused right away.
            give_back()
            give_back = _nothing
        self._sink(dataset, group, results, give_back)

    def _layer_names(self, index: int) -> list[str]:
        """The checkpoint tensors layer `index` is built from."""
        return self._skeleton.layout.checkpoint_names(self._layer_parameters(index))

    def _layer_parameters(self, index: int) -> list[str]:
        return [n for names in self._skeleton.layer_tensor_names(index).values() for n in names.values()]

    def _materialize_layer(self, index: int, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
        """Layer `index` with the checkpoint's tensors `weights` (stacked where its modules fuse them)."""
        weights = self._skeleton.layout.to_module(weights, self._layer_parameters(index))
        return materialize(self._skeleton.layer(index), weights, self._skeleton.layer_prefix(index))

    def _head_load_names(self) -> list[str]:
        return [*self._skeleton.norm_tensor_names.values(), self._skeleton.head_weight_name]

    def _context(self, batch: Batch, index: int) -> dict[str, object]:
        """The keyword arguments layer `index` takes besides its input, as the model would pass them."""
        valid = batch.attention_mask.to(self._device).bool()
        positions = torch.arange(valid.shape[1], device=self._device)[None, :]
        probe = torch.empty((1, 1), dtype=self._dtype, device=self._device)
        layer_type = self._rotary_layer_types[index]
        rotary_args = (probe, positions) if layer_type is None else (probe, positions, layer_type)
        return {
            "attention_mask": attention_mask(valid, self._skeleton.sliding_window(index), additive_dtype=self._dtype if self._skeleton.additive_mask else None),
            "position_ids": positions,
            "position_embeddings": self._rotary(*rotary_args),
        }

    def _recompute_context(self, layer: torch.nn.Module) -> contextlib.AbstractContextManager:
        if self._skeleton.family.last_projection_feeds_residual:
            return LastProjectionSkipped(layer)
        return contextlib.nullcontext()

    def _embed_valid(self, batch: Batch) -> torch.Tensor:
        """Positions whose embedding row gets a gradient: real tokens, not the padding_idx row
        (torch gives that row none, so neither do the statistics)."""
        valid = batch.attention_mask.bool()
        if self._skeleton.padding_idx is not None:
            valid = valid & (batch.input_ids != self._skeleton.padding_idx)
        return valid

    # ------------------------------------------------------------------ resume points
    def _offer_resume_point(
        self, next_layer: int, batches: Mapping[str, Sequence[Batch]], tied: Mapping[str, StatsAccumulator], report: EngineReport
    ) -> None:
        """Hand the state at a resume point to `on_resume_point` (its tensors are read lazily)."""
        if self._on_resume_point is None:
            return
        tensors: list[SavedTensor] = []
        for dataset, dataset_batches in batches.items():
            for batch in dataset_batches:
                stored = {boundary_name(dataset, batch.index): ("g", dataset, batch.index), rows_name(dataset, batch.index): ("rows", dataset, batch.index)}
                for name, key in stored.items():
                    if key in self._store:
                        dtype, shape = self._store.spec(key)
                        tensors.append(SavedTensor(name, dtype, shape, lambda key=key: self._store.get(key)))
        for dataset, acc in tied.items():
            for which, sums in (("sums", acc.sums), ("squares", acc.squares)):
                for tensor_name, tensor in sums.items():
                    name = tied_prefix(dataset, which) + tensor_name
                    tensors.append(SavedTensor(name, tensor.dtype, tuple(tensor.shape), lambda tensor=tensor: tensor.cpu()))
        self._on_resume_point(ResumeState(next_layer, dict(report.mean_loss), tuple(tensors)))

    def _restore(self, start: ResumeState, batches: Mapping[str, Sequence[Batch]], report: EngineReport) -> dict[str, StatsAccumulator]:
        """Put a saved state back: boundary gradients and kept rows into the store; returns the tied sums."""
        saved = {tensor.name: tensor for tensor in start.tensors}
        for dataset, dataset_batches in batches.items():
            for batch in dataset_batches:
                name = boundary_name(dataset, batch.index)
                if name not in saved:
                    raise ResumeError(f"the saved state at {start.position} lacks {name}; it does not belong to these batches")
                self._store.put(("g", dataset, batch.index), saved[name].read())
                if rows_name(dataset, batch.index) in saved:
                    self._store.put(("rows", dataset, batch.index), saved[rows_name(dataset, batch.index)].read())
        tied: dict[str, StatsAccumulator] = {}
        if self._skeleton.ties_embeddings:
            for dataset in batches:
                acc = StatsAccumulator({}, self._kinds, torch.device("cpu"))
                for which, sums in (("sums", acc.sums), ("squares", acc.squares)):
                    prefix = tied_prefix(dataset, which)
                    for name, tensor in saved.items():
                        if name.startswith(prefix):
                            sums[name[len(prefix) :]] = tensor.read()
                if not (acc.sums or acc.squares):
                    raise ResumeError(f"the saved state at {start.position} lacks the tied embedding sums of {dataset}")
                tied[dataset] = acc
        report.mean_loss.update(start.mean_loss)
        return tied

    # ------------------------------------------------------------------ phases
    def _forward(self, batches: Sequence[Batch], tokens: int, num_layers: int) -> None:
        """Embed every batch and run layers 0..num_layers-1, keeping h_0..h_{num_layers} in the
        store; prefetch what runs next (the head after the last layer, else that layer's backward)."""
        embed = self._loader.load([EMBED_TENSOR_NAME])[EMBED_TENSOR_NAME]
        self._loader.prefetch(self._layer_names(0) if self._skeleton.num_layers else self._head_load_names())
        scale = self._skeleton.embedding_scale(self._dtype)
        for batch in batches:
            hidden = torch.nn.functional.embedding(batch.input_ids.to(self._device), embed)
            if scale != 1.0:
                hidden = hidden * scale
            self._store.put(("h", 0, batch.dataset, batch.index), hidden)
        del embed
        with progress(total=num_layers * tokens, desc="forward", unit="tok") as bar, torch.no_grad():
            for index in range(num_layers):
                bar.set_description(f"forward layer {index + 1}/{num_layers}")
                weights = self._loader.load(self._layer_names(index))
                self._loader.prefetch(self._layer_names(index + 1) if index + 1 < self._skeleton.num_layers else self._head_load_names())
                layer = self._materialize_layer(index, weights)
                del weights
                for batch in batches:
                    hidden = self._store.get(("h", index, batch.dataset, batch.index), self._device)
                    output = layer(hidden, **self._context(batch, index))
                    self._store.put(("h", index + 1, batch.dataset, batch.index), output)
                    bar.update(batch.num_tokens)
                release(layer)
                release_free_heap()

    def _head(
        self, batches: Mapping[str, Sequence[Batch]], counts: Mapping[str, int], tokens: int, num_layers: int, report: EngineReport
    ) -> dict[str, StatsAccumulator]:
        skeleton = self._skeleton
        weights = self._loader.load(self._head_load_names())
        if num_layers:
            self._loader.prefetch(self._layer_names(num_layers - 1))
        norm = materialize(skeleton.model.model.norm, weights, NORM_PREFIX)
        lm_head = skeleton.model.lm_head
        lm_head.load_state_dict({"weight": weights[skeleton.head_weight_name]}, strict=True, assign=True)
        lm_head.weight.requires_grad_(False)
        del weights
        head = torch.nn.ModuleDict({"norm": norm, "lm_head": lm_head})
        norm_names = skeleton.norm_tensor_names
        names = {"norm": norm_names, "lm_head": {"weight": skeleton.head_weight_name}}
        shapes = {n: skeleton.tensor_shapes[n] for n in (*norm_names.values(), skeleton.head_weight_name)}
        keep_tied_rows = skeleton.ties_embeddings and FISHER in self._kinds
        tied: dict[str, StatsAccumulator] = {}
        with progress(total=tokens, desc="backward head", unit="tok") as bar:
            for dataset, dataset_batches in batches.items():
                acc = StatsAccumulator(shapes, self._kinds, self._device)
                loss_sum = 0.0
                for batch in dataset_batches:
                    hidden = self._store.pop(("h", num_layers, dataset, batch.index), self._device).requires_grad_(True)
                    # Only the positions the loss reads go through the head: the gradient is zero
                    # at the others (the norm and lm_head act on each position alone).
                    positions, targets = scored_positions(batch.labels.to(self._device))
                    keep = [r.to(self._device) for r in sample_token_rows(batch.input_ids, self._embed_valid(batch))] if keep_tied_rows else None
                    scored_valid = targets != IGNORE_INDEX
                    # The input gradient sums over the whole vocabulary: in blocks, so its float32
                    # error does not depend on how many positions the batch scores (head_projection.py).
                    with torch.enable_grad(), VocabularyBlockedBackward(lm_head), PerSampleHooks(head, names, acc, scored_valid, lm_head_path="lm_head" if keep else None, keep_rows=keep, scratch=self._scratch) as hooks:
                        scored = hidden[torch.arange(hidden.shape[0], device=self._device)[:, None], positions]
                        losses = mean_target_nll(skeleton.transform_logits(lm_head(norm(scored))), targets)
                        losses.sum().backward()
                    loss_sum += float(losses.detach().sum())
                    self._store.put(("g", dataset, batch.index), hidden.grad)
                    if keep:
                        self._store.put(("rows", dataset, batch.index), torch.cat(hooks.kept_rows or []))
                    bar.update(batch.num_tokens)
                if self._dist.is_distributed:
                    loss_sum = float(self._dist.all_reduce_(torch.tensor([loss_sum], dtype=torch.float64)))
                report.mean_loss[dataset] = loss_sum / counts[dataset]
                head_names = [*norm_names.values()] + ([] if skeleton.ties_embeddings else [skeleton.head_weight_name])
                self._finish_group(dataset, HEAD_GROUP, acc, counts[dataset], head_names)
                if skeleton.ties_embeddings:
                    # The tied parameter's sums wait for the embedding step; keep them off the GPU.
                    for tensor_name in norm_names.values():
                        acc.sums.pop(tensor_name, None)
                        acc.squares.pop(tensor_name, None)
                    tied[dataset] = acc.to(torch.device("cpu"))
        release(norm)
        release(lm_head)
        release_free_heap()
        return tied

    def _backward(
        self,
        batches: Mapping[str, Sequence[Batch]],
        counts: Mapping[str, int],
        tokens: int,
        first_layer: int,
        tied: Mapping[str, StatsAccumulator],
        report: EngineReport,
    ) -> None:
        """Layers first_layer..0; a resume point after each."""
        num_layers = self._skeleton.num_layers
        with progress(total=(first_layer + 1) * tokens, desc="backward", unit="tok") as bar:
            for index in reversed(range(first_layer + 1)):
                bar.set_description(f"backward layer {index + 1}/{num_layers}")
                weights = self._loader.load(self._layer_names(index))
                if index > 0:
                    self._loader.prefetch(self._layer_names(index - 1))
                layer = self._materialize_layer(index, weights)
                del weights
                names = self._skeleton.layer_tensor_names(index)
                shapes = {n: self._skeleton.tensor_shapes[n] for attrs in names.values() for n in attrs.values()}
                for dataset, dataset_batches in batches.items():
                    acc = StatsAccumulator(shapes, self._kinds, self._device, pool=self._pool)
                    for batch in dataset_batches:
                        hidden = self._store.pop(("h", index, dataset, batch.index), self._device).requires_grad_(True)
                        grad_out = self._store.pop(("g", dataset, batch.index), self._device)
                        valid = batch.attention_mask.to(self._device).bool()
                        with torch.enable_grad(), self._recompute_context(layer), PerSampleHooks(layer, names, acc, valid, scratch=self._scratch):
                            # The output's value is never read: only its graph is backpropagated.
                            output = layer(hidden, **self._context(batch, index))
                            torch.autograd.backward(output, grad_out)
                        self._store.put(("g", dataset, batch.index), hidden.grad)
                        bar.update(batch.num_tokens)
                    # The next layer reuses the memory once the sink is done with the results.
                    self._finish_group(dataset, layer_group(index), acc, counts[dataset], give_back=acc.release)
                release(layer)
                release_free_heap()
                self._offer_resume_point(index - 1 if index > 0 else EMBEDDING_STEP, batches, tied, report)

    def _embedding(self, batches: Mapping[str, Sequence[Batch]], counts: Mapping[str, int], tied: Mapping[str, StatsAccumulator]) -> None:
        shape = self._skeleton.tensor_shapes[EMBED_TENSOR_NAME]
        # The layers see the embedding times a scale (Gemma, Granite): the rows' gradient is the
        # gradient at layer 0's input times that scale.
        scale = self._skeleton.embedding_scale(self._dtype)
        for dataset, dataset_batches in batches.items():
            acc = tied[dataset].to(self._device) if dataset in tied else StatsAccumulator({EMBED_TENSOR_NAME: shape}, self._kinds, self._device)
            for batch in dataset_batches:
                grad = self._store.pop(("g", dataset, batch.index), self._device)
                if scale != 1.0:
                    grad = grad.float() * scale
                valid = self._embed_valid(batch)
                tied_rows = None
                if ("rows", dataset, batch.index) in self._store:
                    rows = self._store.pop(("rows", dataset, batch.index), self._device)
                    sizes = [r.numel() for r in sample_token_rows(batch.input_ids, valid)]
                    tied_rows = list(torch.split(rows, sizes))
                embedding_stats(acc, EMBED_TENSOR_NAME, batch.input_ids.to(self._device), grad, valid.to(self._device), tied_rows=tied_rows)
            self._finish_group(dataset, EMBED_GROUP, acc, counts[dataset], [EMBED_TENSOR_NAME])
