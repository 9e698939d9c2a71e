"""Tensors' figures summed into groups: per layer, per module kind, per layer and kind, per expert, and the model.

Counts and sums add (compute/weight_figures.py), so a group's figures are exact sums over its
tensors. Rank correlations do not add: a group's is computed on the part of the model's rank
sample that falls in its tensors (compute/rank_sample.py), which is a uniform sample of the group.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from perta_stream.compute.figure_accumulator import TensorFigures
from perta_stream.compute.rank_sample import spearman
from perta_stream.compute.weight_figures import Agreement, Comparison, WeightFigures
from perta_stream.plan.tensor_groups import TensorGroup, kind_sort_key


@dataclass
class GroupFigures:
    """The summed figures of a set of tensors (see TensorFigures for the fields)."""

    tensors: int = 0
    weights: dict[tuple[str, str], WeightFigures] = field(default_factory=dict)
    agreement: dict[str, Agreement] = field(default_factory=dict)
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    rank_correlations: dict[str, float | None] = field(default_factory=dict)
    sample_elements: int = 0

    def add(self, figures: TensorFigures) -> None:
        self.tensors += 1
        for key, value in figures.weights.items():
            self.weights.setdefault(key, WeightFigures()).add(value)
        for side, value in figures.agreement.items():
            self.agreement.setdefault(side, Agreement()).add(value)
        for label, value in figures.comparisons.items():
            self.comparisons.setdefault(label, Comparison()).add(value)


@dataclass
class InspectSummary:
    """Every group's figures.

    Attributes:
        model: all tensors.
        layers: decoder layer index -> its tensors.
        kinds: module kind -> its tensors (in and outside the layers), in KIND_ORDER.
        cells: (layer, module kind) -> the tensors of that kind in that layer (the heat maps).
        experts: expert index -> its tensors over all layers (mixture-of-experts models).
        tensors, groups: each tensor's own figures and groups, in the order they were read.
    """

    model: GroupFigures
    layers: dict[int, GroupFigures]
    kinds: dict[str, GroupFigures]
    cells: dict[tuple[int, str], GroupFigures]
    experts: dict[int, GroupFigures]
    tensors: list[TensorFigures]
    groups: list[TensorGroup]

    @property
    def layer_kinds(self) -> list[str]:
        """The module kinds found inside the layers, in KIND_ORDER (the heat maps' columns)."""
        return sorted({kind for _, kind in self.cells}, key=kind_sort_key)


def summarize(
    tensors: Sequence[TensorFigures],
    groups: Sequence[TensorGroup],
    model_sample: dict[str, torch.Tensor],
    pairs: dict[str, tuple[str, str]],
) -> InspectSummary:
    """Sum the tensors' figures into groups and rank-correlate each group's share of the model sample.

    Args:
        tensors, groups: per tensor, in the order the accumulator saw them (the sample's indices).
        model_sample: FigureAccumulator.model_sample().
        pairs: name -> the two sampled quantities to correlate (figure_accumulator.rank_pairs).
    """
    members: dict[str, dict] = {"layers": {}, "kinds": {}, "cells": {}, "experts": {}}
    for index, group in enumerate(groups):
        if group.layer is not None:
            members["layers"].setdefault(group.layer, []).append(index)
            members["cells"].setdefault((group.layer, group.module_kind), []).append(index)
        members["kinds"].setdefault(group.module_kind, []).append(index)
        if group.expert is not None:
            members["experts"].setdefault(group.expert, []).append(index)

    def build(indices: Iterable[int], *, correlate: bool) -> GroupFigures:
        chosen = list(indices)
        figures = GroupFigures()
        for index in chosen:
            figures.add(tensors[index])
        if correlate and pairs:
            in_group = torch.isin(model_sample["tensor"], torch.tensor(chosen, dtype=torch.int32))
            figures.sample_elements = int(in_group.sum())
            for name, (first, second) in pairs.items():
                figures.rank_correlations[name] = spearman(model_sample[first][in_group], model_sample[second][in_group])
        return figures

    return InspectSummary(
        model=build(range(len(tensors)), correlate=True),
        layers={layer: build(indices, correlate=True) for layer, indices in sorted(members["layers"].items())},
        kinds={kind: build(members["kinds"][kind], correlate=True) for kind in sorted(members["kinds"], key=kind_sort_key)},
        # Cells are drawn as mean W and effective scale only; a few thousand sampled elements per
        # cell would make their rank correlations too noisy to show anyway.
        cells={key: build(indices, correlate=False) for key, indices in sorted(members["cells"].items(), key=lambda item: (item[0][0], kind_sort_key(item[0][1])))},
        experts={expert: build(indices, correlate=True) for expert, indices in sorted(members["experts"].items())},
        tensors=list(tensors),
        groups=list(groups),
    )
