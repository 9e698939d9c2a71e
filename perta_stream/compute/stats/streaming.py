"""The layer-major sweep: every sample through one layer at a time, forward then backward.

Order of work (each decoder layer's weights are loaded twice in all, never once per batch):
  forward   embeddings for every batch, then layer 0 .. L-1 over every batch; each layer's input
            (a boundary) is kept in the BoundaryStore
  head      final norm + lm_head + per-sample loss; backprop Σ_n ℓ_n to the last boundary
  backward  layer L-1 .. 0: recompute the layer's forward from its saved input with autograd,
            backprop the output-gradient boundary, collect exact per-sample statistics with hooks
  embed     per-sample embedding rows from the gradient at layer 0's input
Statistics are per dataset: the datasets share the sweep (one weight load serves both) but have
separate accumulators, flushed to the sink group by group. The engine opens no files: weights come
from the loader, boundaries go to the store, statistics go to the sink.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from perta_stream.compute.prompts import per_sample_loss
from perta_stream.distributed import SINGLE_PROCESS, DistContext
from perta_stream.compute.stats.boundaries import BoundaryStore
from perta_stream.compute.stats.per_sample import FISHER, BufferPool, PerSampleHooks, Scratch, StatsAccumulator, embedding_stats, sample_token_rows
from perta_stream.compute.stats.skeleton import NORM_TENSOR_NAME, ModelSkeleton, attention_mask, materialize, release
from perta_stream.memory import release_free_heap
from perta_stream.plan.stats_plan import EMBED_GROUP, EMBED_TENSOR_NAME, HEAD_GROUP, layer_group
from perta_stream.progress import progress

StatsSink = Callable[[str, str, dict[str, dict[str, torch.Tensor]]], None]
"""Receives (dataset, group, tensor_name -> {kind -> float32 tensor}) when a group is complete; it must
be done with the tensors when it returns (their memory is reused for the next layer)."""


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
    ):
        self._dist = dist
        self._skeleton = skeleton
        self._loader = loader
        self._store = boundaries
        self._sink = sink
        self._kinds = tuple(kinds)
        self._device = device
        self._dtype = compute_dtype
        self._rotary = skeleton.rotary(device)
        self._scratch = Scratch()
        self._pool = BufferPool()

    def run(self, batches: Mapping[str, Sequence[Batch]]) -> EngineReport:
        """Run the whole sweep over the batches of every dataset; returns what it saw."""
        all_batches = [batch for dataset_batches in batches.values() for batch in dataset_batches]
        counts = self._global_counts({name: sum(b.input_ids.shape[0] for b in dataset_batches) for name, dataset_batches in batches.items()})
        tokens = sum(batch.num_tokens for batch in all_batches)
        num_layers = self._skeleton.num_layers
        report = EngineReport()
        self._forward(all_batches, tokens, num_layers)
        tied = self._head(batches, counts, tokens, num_layers, report)
        self._backward(batches, counts, tokens, num_layers)
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

    def _finish_group(self, dataset: str, group: str, acc: StatsAccumulator, count: int, tensor_names: Sequence[str] | None = None) -> None:
        """Sum the group's accumulators over the ranks, then hand the means to the sink (rank 0).

        Only the tensors finished here are summed: a tied head's sums wait for the embedding
        step and are summed there, once, together with the embedding's own.
        """
        names = list(tensor_names) if tensor_names is not None else list(acc.sums or acc.squares)
        if self._dist.is_distributed:
            for sums in (acc.sums, acc.squares):
                for tensor_name in names:
                    if tensor_name in sums:
                        self._dist.all_reduce_(sums[tensor_name])
        if self._dist.is_main:
            self._sink(dataset, group, acc.results(count, names))

    def _layer_names(self, index: int) -> list[str]:
        return [n for names in self._skeleton.layer_tensor_names(index).values() for n in names.values()]

    def _head_load_names(self) -> list[str]:
        return [NORM_TENSOR_NAME, self._skeleton.head_weight_name]

    def _context(self, batch: Batch, window: int | None) -> dict[str, object]:
        valid = batch.attention_mask.to(self._device).bool()
        positions = torch.arange(valid.shape[1], device=self._device)[None, :]
        probe = torch.empty((1, 1), dtype=self._dtype, device=self._device)
        return {
            "attention_mask": attention_mask(valid, window),
            "position_ids": positions,
            "position_embeddings": self._rotary(probe, positions),
        }

    def _embed_valid(self, batch: Batch) -> torch.Tensor:
        """Positions whose embedding row gets a gradient: real tokens, not the padding_idx row
        (torch gives that row none, so neither do the statistics)."""
        valid = batch.attention_mask.bool()
        if self._skeleton.padding_idx is not None:
            valid = valid & (batch.input_ids != self._skeleton.padding_idx)
        return valid

    # ------------------------------------------------------------------ phases
    def _forward(self, batches: Sequence[Batch], tokens: int, num_layers: int) -> None:
        embed = self._loader.load([EMBED_TENSOR_NAME])[EMBED_TENSOR_NAME]
        self._loader.prefetch(self._layer_names(0) if num_layers else self._head_load_names())
        for batch in batches:
            hidden = torch.nn.functional.embedding(batch.input_ids.to(self._device), embed)
            self._store.put(("h", 0, batch.dataset, batch.index), hidden)
        del embed
        with progress(total=num_layers * tokens, desc="forward", unit="tok") as bar, torch.no_grad():
            for index in range(num_layers):
                bar.set_description(f"forward layer {index + 1}/{num_layers}")
                weights = self._loader.load(self._layer_names(index))
                self._loader.prefetch(self._layer_names(index + 1) if index + 1 < num_layers else self._head_load_names())
                layer = materialize(self._skeleton.layer(index), weights, self._skeleton.layer_prefix(index))
                del weights
                window = self._skeleton.sliding_window(index)
                for batch in batches:
                    hidden = self._store.get(("h", index, batch.dataset, batch.index), self._device)
                    output = layer(hidden, **self._context(batch, window))
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
        norm = materialize(skeleton.model.model.norm, weights, "model.norm.")
        lm_head = skeleton.model.lm_head
        lm_head.load_state_dict({"weight": weights[skeleton.head_weight_name]}, strict=True, assign=True)
        lm_head.weight.requires_grad_(False)
        del weights
        head = torch.nn.ModuleDict({"norm": norm, "lm_head": lm_head})
        names = {"norm": {"weight": NORM_TENSOR_NAME}, "lm_head": {"weight": skeleton.head_weight_name}}
        shapes = {n: skeleton.tensor_shapes[n] for n in (NORM_TENSOR_NAME, skeleton.head_weight_name)}
        keep_tied_rows = skeleton.ties_embeddings and FISHER in self._kinds
        tied: dict[str, StatsAccumulator] = {}
        with progress(total=tokens, desc="backward head", unit="tok") as bar:
            for dataset, dataset_batches in batches.items():
                acc = StatsAccumulator(shapes, self._kinds, self._device)
                loss_sum = 0.0
                for batch in dataset_batches:
                    hidden = self._store.pop(("h", num_layers, dataset, batch.index), self._device).requires_grad_(True)
                    valid = batch.attention_mask.to(self._device).bool()
                    keep = [r.to(self._device) for r in sample_token_rows(batch.input_ids, self._embed_valid(batch))] if keep_tied_rows else None
                    with torch.enable_grad(), PerSampleHooks(head, names, acc, valid, lm_head_path="lm_head" if keep else None, keep_rows=keep, scratch=self._scratch) as hooks:
                        losses = per_sample_loss(lm_head(norm(hidden)), batch.labels.to(self._device))
                        losses.sum().backward()
                    loss_sum += float(losses.detach().sum())
                    self._store.put(("g", dataset, batch.index), hidden.grad)
                    if keep:
                        self._store.put(("rows", dataset, batch.index), torch.cat(hooks.kept_rows or []))
                    bar.update(batch.num_tokens)
                if self._dist.is_distributed:
                    loss_sum = float(self._dist.all_reduce_(torch.tensor([loss_sum], dtype=torch.float64)))
                report.mean_loss[dataset] = loss_sum / counts[dataset]
                head_names = [NORM_TENSOR_NAME] + ([] if skeleton.ties_embeddings else [skeleton.head_weight_name])
                self._finish_group(dataset, HEAD_GROUP, acc, counts[dataset], head_names)
                if skeleton.ties_embeddings:
                    # The tied parameter's sums wait for the embedding step; keep them off the GPU.
                    acc.sums.pop(NORM_TENSOR_NAME, None)
                    acc.squares.pop(NORM_TENSOR_NAME, None)
                    tied[dataset] = acc.to(torch.device("cpu"))
        release(norm)
        release(lm_head)
        release_free_heap()
        return tied

    def _backward(self, batches: Mapping[str, Sequence[Batch]], counts: Mapping[str, int], tokens: int, num_layers: int) -> None:
        with progress(total=num_layers * tokens, desc="backward", unit="tok") as bar:
            for index in reversed(range(num_layers)):
                bar.set_description(f"backward layer {index + 1}/{num_layers}")
                weights = self._loader.load(self._layer_names(index))
                if index > 0:
                    self._loader.prefetch(self._layer_names(index - 1))
                layer = materialize(self._skeleton.layer(index), weights, self._skeleton.layer_prefix(index))
                del weights
                names = self._skeleton.layer_tensor_names(index)
                shapes = {n: self._skeleton.tensor_shapes[n] for attrs in names.values() for n in attrs.values()}
                window = self._skeleton.sliding_window(index)
                for dataset, dataset_batches in batches.items():
                    acc = StatsAccumulator(shapes, self._kinds, self._device, pool=self._pool)
                    for batch in dataset_batches:
                        hidden = self._store.pop(("h", index, dataset, batch.index), self._device).requires_grad_(True)
                        grad_out = self._store.pop(("g", dataset, batch.index), self._device)
                        valid = batch.attention_mask.to(self._device).bool()
                        with torch.enable_grad(), PerSampleHooks(layer, names, acc, valid, scratch=self._scratch):
                            output = layer(hidden, **self._context(batch, window))
                            torch.autograd.backward(output, grad_out)
                        self._store.put(("g", dataset, batch.index), hidden.grad)
                        bar.update(batch.num_tokens)
                    self._finish_group(dataset, layer_group(index), acc, counts[dataset])
                    acc.release()  # the sink has written the results; the next layer reuses the memory
                release(layer)
                release_free_heap()

    def _embedding(self, batches: Mapping[str, Sequence[Batch]], counts: Mapping[str, int], tied: Mapping[str, StatsAccumulator]) -> None:
        shape = self._skeleton.tensor_shapes[EMBED_TENSOR_NAME]
        for dataset, dataset_batches in batches.items():
            acc = tied[dataset].to(self._device) if dataset in tied else StatsAccumulator({EMBED_TENSOR_NAME: shape}, self._kinds, self._device)
            for batch in dataset_batches:
                grad = self._store.pop(("g", dataset, batch.index), self._device)
                valid = self._embed_valid(batch)
                tied_rows = None
                if ("rows", dataset, batch.index) in self._store:
                    rows = self._store.pop(("rows", dataset, batch.index), self._device)
                    sizes = [r.numel() for r in sample_token_rows(batch.input_ids, valid)]
                    tied_rows = list(torch.split(rows, sizes))
                embedding_stats(acc, EMBED_TENSOR_NAME, batch.input_ids.to(self._device), grad, valid.to(self._device), tied_rows=tied_rows)
            self._finish_group(dataset, EMBED_GROUP, acc, counts[dataset], [EMBED_TENSOR_NAME])
