"""W's figures, accumulated chunk by chunk in cache-sized blocks with no per-chunk allocation.

`FigureAccumulator` is handed the chunks of one tensor after another, as typed 1-D views keyed by
role: `<side>:forget.grad`, `<side>:retain.grad`, `<side>:forget.fisher`, `<side>:retain.fisher`
for each statistics run (side `a`, and `b` when two are compared), and for the task vector
`theta0` and `fgt`, or `tv` (a float32 task vector made from an adapter's factors,
compute/task_vector.py), or both, combined as the merge kernel combines them (fgt − theta0 + tv);
a tensor given neither has a task vector of 0 (one an adapter leaves alone). For every W
configuration (weight_figures.WeightConfig) it computes W exactly as the
merge does (`compute_weights` on the same values, into float32 buffers) and adds to the tensor's
figures; at the end of a tensor it returns them (`TensorFigures`) and keeps the part of the
tensor's rank sample that belongs to the model's sample (compute/rank_sample.py).

Like the merge kernel, it works on blocks of BLOCK_ELEMENTS so its scratch stays in the CPU
cache, and non-finite statistics or models are refused (a NaN would silently turn every sum it
reaches into NaN).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from perta_stream.compute.merge_kernel import BLOCK_ELEMENTS
from perta_stream.compute.rank_sample import sample_positions, spearman, tensor_sample_rate
from perta_stream.compute.weight_figures import (
    HIGH_WEIGHT,
    HISTOGRAM_BINS,
    LOW_WEIGHT,
    MOVED_THRESHOLD,
    Agreement,
    Comparison,
    WeightConfig,
    WeightFigures,
)
from perta_stream.compute.weights import compute_weights
from perta_stream.errors import NonFiniteError

SIDES = ("a", "b")


def stat_role(side: str, dataset: str, kind: str) -> str:
    """`a:forget.fisher`: the role of one statistics checkpoint of one side."""
    return f"{side}:{dataset}.{kind}"


def weight_sample_key(side: str, config: WeightConfig) -> str:
    return f"{side}:W {config.label}"


@dataclass
class TensorFigures:
    """Everything measured on one tensor.

    Attributes:
        tensor_name: the state-dict key.
        weights: (side, configuration label) -> W's figures.
        agreement: side -> forget/retain gradient agreement (sides with grad statistics).
        comparisons: configuration label -> W of side a against side b (two runs compared).
        rank_correlations: name -> Spearman's ρ on the tensor's rank sample (None where undefined).
        sample_elements: the size of the tensor's rank sample.
    """

    tensor_name: str
    weights: dict[tuple[str, str], WeightFigures] = field(default_factory=dict)
    agreement: dict[str, Agreement] = field(default_factory=dict)
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    rank_correlations: dict[str, float | None] = field(default_factory=dict)
    sample_elements: int = 0


def rank_pairs(sides: tuple[str, ...], kinds: tuple[str, ...], configs: tuple[WeightConfig, ...]) -> dict[str, tuple[str, str]]:
    """Name -> the two sampled quantities whose rank correlation is reported: F_f against F_r
    of each side with fisher statistics, and with two sides W of a against W of b per method."""
    pairs = {}
    if "fisher" in kinds:
        for side in sides:
            pairs[f"{side}: F_f vs F_r"] = (stat_role(side, "forget", "fisher"), stat_role(side, "retain", "fisher"))
    if len(sides) == 2:
        for config in configs:
            if config.uses_statistics:
                pairs[f"W {config.label}: a vs b"] = (weight_sample_key("a", config), weight_sample_key("b", config))
    return pairs


class FigureAccumulator:
    """Accumulates `TensorFigures` for one tensor at a time.

    Args:
        configs: the W configurations; grad/fisher ones need their kind in `kinds`.
        sides: ("a",) or ("a", "b").
        kinds: the statistics kinds read ("grad", "fisher").
        task_vector: whether there is a task vector (`theta0` and `fgt`, or `tv`: effective scale).
        model_sample_rate: the model's rank-sample rate (rank_sample.model_sample_rate).
        scale_only: only ‖W⊙TV‖ and ‖TV‖ (the matched α needs nothing else).
        block_elements: elements per block (scratch length).
    """

    def __init__(
        self,
        *,
        configs: tuple[WeightConfig, ...],
        sides: tuple[str, ...],
        kinds: tuple[str, ...],
        task_vector: bool,
        model_sample_rate: float,
        scale_only: bool = False,
        block_elements: int = BLOCK_ELEMENTS,
    ):
        self.configs, self.sides, self.kinds = configs, sides, kinds
        self.task_vector, self.scale_only = task_vector, scale_only
        self._model_rate = model_sample_rate
        self._pairs = {} if scale_only else rank_pairs(sides, kinds, configs)
        self._sampled = sorted({key for pair in self._pairs.values() for key in pair})
        self._block = block_elements
        f32 = {"dtype": torch.float32}
        self._weights = {side: torch.empty(block_elements, **f32) for side in sides}
        self._scratch = [torch.empty(block_elements, **f32) for _ in range(3)]
        self._spare = torch.empty(block_elements, **f32)  # W⊙TV, then |W_a − W_b|
        self._tv = torch.empty(block_elements, **f32)
        self._theta0 = torch.empty(block_elements, **f32)
        self._f64 = [torch.empty(block_elements, dtype=torch.float64) for _ in range(2)]
        self._bins = {side: torch.empty(block_elements, dtype=torch.int64) for side in sides}
        self._cells = torch.empty(block_elements, dtype=torch.int64)
        self._local_positions = torch.empty(block_elements, dtype=torch.int64)
        self.model_samples: dict[str, list[torch.Tensor]] = {key: [] for key in (*self._sampled, "tensor")}
        self._tensor_index = -1
        self._current: TensorFigures | None = None

    # ------------------------------------------------------------------ per tensor
    def begin_tensor(self, tensor_name: str, numel: int) -> None:
        self._tensor_index += 1
        self._current = TensorFigures(tensor_name)
        for side in self.sides:
            for config in self.configs:
                self._current.weights[(side, config.label)] = WeightFigures()
            if "grad" in self.kinds and not self.scale_only:
                self._current.agreement[side] = Agreement()
        for config in self.configs:
            if len(self.sides) == 2 and config.uses_statistics and not self.scale_only:
                self._current.comparisons[config.label] = Comparison()
        if self._sampled:
            rate = tensor_sample_rate(numel, self._model_rate)
            self._positions, self._in_model = sample_positions(tensor_name, numel, rate, self._model_rate / rate)
            # Filled block by block in place: thousands of small tensors kept across the blocks'
            # temporaries would fragment the heap (glibc), which then holds on to hundreds of MiB.
            self._samples = {key: torch.empty(self._positions.numel(), dtype=torch.float32) for key in self._sampled}
        self._histograms = {key: torch.zeros(HISTOGRAM_BINS, dtype=torch.int64) for key in self._current.weights}
        self._joint = {label: torch.zeros(HISTOGRAM_BINS**2, dtype=torch.int64) for label in self._current.comparisons}

    def add_chunk(self, inputs: dict[str, torch.Tensor], start: int) -> None:
        """Add elements start .. start + n - 1 of the current tensor (`inputs`: role -> 1-D view, length n)."""
        total = next(iter(inputs.values())).numel()
        for offset in range(0, total, self._block):
            stop = min(total, offset + self._block)
            self._add_block({role: view[offset:stop] for role, view in inputs.items()}, start + offset)

    def end_tensor(self) -> TensorFigures:
        figures = self._current
        assert figures is not None, "end_tensor without begin_tensor"
        for key, counts in self._histograms.items():
            figures.weights[key].histogram = counts.tolist()
        for label, counts in self._joint.items():
            figures.comparisons[label].joint_histogram = counts.tolist()
        if self._sampled:
            sample = self._samples
            figures.sample_elements = int(self._positions.numel())
            for name, (first, second) in self._pairs.items():
                figures.rank_correlations[name] = spearman(sample[first], sample[second])
            in_model = self._in_model
            for key in self._sampled:
                self.model_samples[key].append(sample[key][in_model])
            self.model_samples["tensor"].append(torch.full((int(in_model.sum()),), self._tensor_index, dtype=torch.int32))
        self._current = None
        return figures

    def model_sample(self) -> dict[str, torch.Tensor]:
        """The model's rank sample: key -> values, and "tensor" -> the index of each element's tensor
        (in the order the tensors were added)."""
        return {key: torch.cat(parts) if parts else torch.empty(0) for key, parts in self.model_samples.items()}

    # ------------------------------------------------------------------ per block
    def _add_block(self, inputs: dict[str, torch.Tensor], start: int) -> None:
        count = next(iter(inputs.values())).numel()
        figures = self._current
        assert figures is not None, "add_chunk without begin_tensor"
        self._check_finite(inputs, figures.tensor_name)
        tv_square_sum = 0.0
        if self.task_vector:
            tv = self._tv[:count]
            # The task vector exactly as the merge kernel forms it (compute/merge_kernel.py).
            if "fgt" in inputs:
                tv.copy_(inputs["fgt"]).sub_(self._theta0[:count].copy_(inputs["theta0"]))
                if "tv" in inputs:
                    tv.add_(inputs["tv"])
            elif "tv" in inputs:
                tv.copy_(inputs["tv"])
            else:
                tv.zero_()
            tv_square_sum = self._square_sum(tv)
        positions, first, stop = None, 0, 0
        if self._sampled:
            # The tensor's sampled positions that fall in this block, relative to its start.
            first, stop = torch.searchsorted(self._positions, torch.tensor([start, start + count])).tolist()
            positions = torch.sub(self._positions[first:stop], start, out=self._local_positions[: stop - first])
        for side in self.sides:
            if side in figures.agreement:
                self._add_agreement(figures.agreement[side], inputs, side)
            for role in (stat_role(side, "forget", "fisher"), stat_role(side, "retain", "fisher")):
                if positions is not None and role in self._samples:
                    self._samples[role][first:stop] = inputs[role][positions]
        for config in self.configs:
            for side in self.sides:
                weights = self._compute(config, side, inputs, count)
                self._add_weights(figures.weights[(side, config.label)], (side, config.label), weights, tv_square_sum, config, side, inputs)
                key = weight_sample_key(side, config)
                if positions is not None and key in self._samples:
                    torch.index_select(weights, 0, positions, out=self._samples[key][first:stop])
            if config.label in figures.comparisons:
                self._add_comparison(figures.comparisons[config.label], config.label, count)

    def _compute(self, config: WeightConfig, side: str, inputs: dict[str, torch.Tensor], count: int) -> torch.Tensor:
        out = self._weights[side][:count]
        if not config.uses_statistics:
            return out.fill_(config.constant_weight)
        return compute_weights(
            inputs[stat_role(side, "forget", config.method)],
            inputs[stat_role(side, "retain", config.method)],
            method=config.method,
            tau=config.tau,  # type: ignore[arg-type]
            fallback_weight=config.fallback_weight,
            out=out,
            scratch=self._scratch[0][:count],
            spare=self._scratch[1][:count],
            other=self._scratch[2][:count],
        )

    def _add_weights(
        self, target: WeightFigures, key: tuple[str, str], weights: torch.Tensor, tv_square_sum: float, config: WeightConfig, side: str, inputs: dict
    ) -> None:
        count = weights.numel()
        target.elements += count
        if self.task_vector:
            # W⊙TV exactly as the merge forms it (float32), before α scales it.
            product = torch.mul(self._tv[:count], weights, out=self._spare[:count])
            target.weighted_tv_square_sum += self._square_sum(product)
            target.tv_square_sum += tv_square_sum
        if self.scale_only:
            return
        if not config.uses_statistics:
            # One constant W (tv, uniform): its figures follow from the count alone.
            constant = float(weights[0]) if count else 0.0
            self._histograms[key][min(int(constant * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += count
            target.below_low += count if constant < LOW_WEIGHT else 0
            target.above_high += count if constant > HIGH_WEIGHT else 0
            target.weight_sum += constant * count
            return
        # W · 32 is exact in float32 (a power of two), so the integer part is the bin exactly.
        bins = self._bins[side][:count].copy_(torch.mul(weights, HISTOGRAM_BINS, out=self._spare[:count])).clamp_(max=HISTOGRAM_BINS - 1)
        self._histograms[key] += torch.bincount(bins, minlength=HISTOGRAM_BINS)
        target.below_low += int((weights < LOW_WEIGHT).sum())
        target.above_high += int((weights > HIGH_WEIGHT).sum())
        target.weight_sum += float(weights.sum(dtype=torch.float64))
        if config.uses_statistics:
            forget = inputs[stat_role(side, "forget", config.method)]
            retain = inputs[stat_role(side, "retain", config.method)]
            target.fallback_elements += int(((forget == 0) & (retain == 0)).sum())

    def _add_comparison(self, target: Comparison, label: str, count: int) -> None:
        difference = torch.sub(self._weights["a"][:count], self._weights["b"][:count], out=self._spare[:count]).abs_()
        target.elements += count
        target.moved += int((difference > MOVED_THRESHOLD).sum())
        target.difference_sum += float(difference.sum(dtype=torch.float64))
        # The sides' bins of this configuration are still in their buffers (computed just before).
        cells = self._cells[:count].copy_(self._bins["a"][:count]).mul_(HISTOGRAM_BINS).add_(self._bins["b"][:count])
        self._joint[label] += torch.bincount(cells, minlength=HISTOGRAM_BINS**2)

    def _add_agreement(self, target: Agreement, inputs: dict[str, torch.Tensor], side: str) -> None:
        forget, retain = inputs[stat_role(side, "forget", "grad")], inputs[stat_role(side, "retain", "grad")]
        count = forget.numel()
        first, second = self._f64[0][:count].copy_(forget), self._f64[1][:count].copy_(retain)
        target.grad_dot += float(torch.dot(first, second))
        target.forget_grad_square_sum += float(torch.dot(first, first))
        target.retain_grad_square_sum += float(torch.dot(second, second))

    def _square_sum(self, values: torch.Tensor) -> float:
        wide = self._f64[0][: values.numel()].copy_(values)
        return float(torch.dot(wide, wide))

    @staticmethod
    def _check_finite(inputs: dict[str, torch.Tensor], tensor_name: str) -> None:
        bad = [role for role, view in inputs.items() if not bool(torch.isfinite(view.sum(dtype=torch.float32))) and not bool(torch.isfinite(view).all())]
        if bad:
            raise NonFiniteError(
                f"tensor {tensor_name!r}: NaN or infinite values in {', '.join(bad)}; its figures would be NaN, so inspect "
                "stops: check those inputs"
            )
