"""The PNGs of `inspect`: W's histograms, layer × module heat maps, the effective scale by layer,
and, with two statistics runs, their joint histogram and how much W moves per layer.

Only W configurations computed from statistics are drawn (tv's and uniform's W is one constant,
which the Markdown table states). matplotlib runs on the Agg backend (sinks/plot.py).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from perta_stream.compute.figure_summary import InspectSummary
from perta_stream.compute.weight_figures import HIGH_WEIGHT, LOW_WEIGHT, WeightConfig, histogram_edges
from perta_stream.plan.inspect_plan import InspectPlan
from perta_stream.sinks.plot import pyplot, save_figure

HISTOGRAM_NAME = "w_histogram.png"
SCALE_BY_LAYER_NAME = "effective_scale_by_layer.png"
_SIDE_STYLE = {"a": ("tab:gray", "a (--compare)"), "b": ("tab:red", "b (STATS)")}
# Cells get their value written in them while it stays legible.
_MAX_ANNOTATED_ROWS = 32


def slug(config: WeightConfig) -> str:
    """`fisher τ=2` -> `fisher_tau2`: the configuration's part of a file name."""
    return re.sub(r"[^a-z0-9.]+", "_", config.label.replace("τ=", "tau").replace("c=", "c").lower()).strip("_")


def write_inspect_plots(summary: InspectSummary, plan: InspectPlan, folder: Path) -> list[Path]:
    """Draw every plot into `folder`; returns their paths."""
    configs = [config for config in plan.configs if config.uses_statistics]
    if not configs:
        return []
    paths = [_histograms(summary, plan, configs, folder / HISTOGRAM_NAME)]
    if len(plan.sides) == 2:
        paths += [_comparison(summary, config, folder / f"compare_{slug(config)}.png") for config in configs]
        return paths
    if summary.cells:
        paths += [_heat_maps(summary, plan, config, folder / f"heatmap_{slug(config)}.png") for config in configs]
    if plan.task_vector and summary.layers:
        paths.append(_scale_by_layer(summary, configs, folder / SCALE_BY_LAYER_NAME))
    return paths


def _histograms(summary: InspectSummary, plan: InspectPlan, configs: list[WeightConfig], path: Path) -> Path:
    plt = pyplot()
    columns = min(len(configs), 3)
    rows = math.ceil(len(configs) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.4 * rows), dpi=120, squeeze=False)
    edges = histogram_edges()
    for axis, config in zip(axes.flat, configs):
        for side in plan.sides:
            figures = summary.model.weights[(side, config.label)]
            shares = [count / figures.elements if figures.elements else 0.0 for count in figures.histogram]
            color, name = _SIDE_STYLE[side] if len(plan.sides) == 2 else ("tab:blue", None)
            axis.stairs(shares, edges, fill=len(plan.sides) == 1, alpha=0.8 if len(plan.sides) == 1 else 1.0, color=color, label=name)
        figures = summary.model.weights[(plan.sides[-1], config.label)]
        scale = figures.effective_scale
        axis.set_title(f"{config.label}: mean W {figures.mean_weight:.3f}" + (f", scale {scale:.3f}" if scale is not None else ""), fontsize=9)
        for threshold in (LOW_WEIGHT, HIGH_WEIGHT):
            axis.axvline(threshold, color="black", linestyle=":", linewidth=0.8)
        axis.set_yscale("log")
        axis.set_xlim(0, 1)
        axis.set_xlabel("W")
        axis.set_ylabel("share of the model's elements")
        if len(plan.sides) == 2:
            axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(configs):]:
        axis.set_visible(False)
    figure.suptitle("W per element (bins of 1/32; dotted: 0.1 and 0.9)", fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)


def _heat_maps(summary: InspectSummary, plan: InspectPlan, config: WeightConfig, path: Path) -> Path:
    plt = pyplot()
    layers = sorted(summary.layers)
    kinds = summary.layer_kinds
    panels = [("mean W", lambda figures: figures.mean_weight)]
    if plan.task_vector:
        panels.append(("effective scale ‖W⊙TV‖/‖TV‖", lambda figures: figures.effective_scale))
    figure, axes = plt.subplots(1, len(panels), figsize=(1.1 + 0.75 * len(kinds) * len(panels) + 1.4 * len(panels), 1.6 + 0.24 * len(layers)), dpi=120, squeeze=False)
    for axis, (title, value_of) in zip(axes.flat, panels):
        matrix = [[_cell(summary, config, layer, kind, value_of) for kind in kinds] for layer in layers]
        # The colours span the values drawn (written in the cells), not [0, 1]: W often varies by
        # a few hundredths between layers, which a fixed scale would hide.
        values = [value for row in matrix for value in row if not math.isnan(value)]
        low, high = (min(values), max(values)) if values else (0.0, 1.0)
        image = axis.imshow(matrix, aspect="auto", cmap="viridis", vmin=low, vmax=high if high > low else low + 1e-3, interpolation="nearest")
        axis.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right", fontsize=8)
        step = max(1, len(layers) // 32)
        axis.set_yticks(range(0, len(layers), step), [str(layer) for layer in layers[::step]], fontsize=7)
        axis.set_ylabel("layer")
        axis.set_title(f"{title}\n{config.label}", fontsize=9)
        if len(layers) <= _MAX_ANNOTATED_ROWS:
            for row, values in enumerate(matrix):
                for column, value in enumerate(values):
                    if not math.isnan(value):
                        dark = high == low or (value - low) / (high - low) < 0.6
                        axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=5.5, color="white" if dark else "black")
        figure.colorbar(image, ax=axis, fraction=0.05)
    figure.tight_layout()
    return save_figure(figure, path)


def _cell(summary: InspectSummary, config: WeightConfig, layer: int, kind: str, value_of) -> float:
    group = summary.cells.get((layer, kind))
    value = None if group is None else value_of(group.weights[("a", config.label)])
    return float("nan") if value is None else value


def _scale_by_layer(summary: InspectSummary, configs: list[WeightConfig], path: Path) -> Path:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7.0, 3.8), dpi=120)
    layers = sorted(summary.layers)
    for config in configs:
        scales = [summary.layers[layer].weights[("a", config.label)].effective_scale for layer in layers]
        model = summary.model.weights[("a", config.label)].effective_scale
        line = axis.plot(layers, [math.nan if s is None else s for s in scales], marker="o", markersize=3, label=f"{config.label} (model {model:.3f})")
        axis.axhline(model, color=line[0].get_color(), linestyle=":", linewidth=0.8)
    axis.set_xlabel("layer")
    axis.set_ylabel("‖W⊙TV‖ / ‖TV‖")
    axis.set_ylim(bottom=0)
    axis.set_title("How much of the task vector each layer keeps (dotted: the model)", fontsize=10)
    axis.grid(True, alpha=0.25)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)


def _comparison(summary: InspectSummary, config: WeightConfig, path: Path) -> Path:
    from matplotlib.colors import LogNorm

    plt = pyplot()
    comparison = summary.model.comparisons[config.label]
    figure, (joint_axis, layer_axis) = plt.subplots(1, 2, figsize=(10.5, 4.4), dpi=120)
    rows = comparison.joint_rows()
    matrix = [[count if count else math.nan for count in row] for row in rows]
    counts = [count for row in rows for count in row if count]
    norm = LogNorm(vmin=min(counts, default=1), vmax=max(counts, default=1) if len(set(counts)) > 1 else min(counts, default=1) * 10)
    image = joint_axis.imshow(matrix, origin="lower", extent=(0, 1, 0, 1), cmap="magma", norm=norm)
    joint_axis.plot([0, 1], [0, 1], color="white", linewidth=0.6, linestyle=":")
    joint_axis.set_xlabel("W of b (STATS)")
    joint_axis.set_ylabel("W of a (--compare)")
    rho = summary.model.rank_correlations.get(f"W {config.label}: a vs b")
    joint_axis.set_title(f"{config.label}: elements per cell (ρ = {rho:.3f})" if rho is not None else f"{config.label}: elements per cell", fontsize=9)
    figure.colorbar(image, ax=joint_axis, fraction=0.05)
    layers = sorted(summary.layers)
    moved = [summary.layers[layer].comparisons[config.label].fraction_moved or 0.0 for layer in layers]
    layer_axis.bar(layers, moved, color="tab:red")
    layer_axis.axhline(comparison.fraction_moved or 0.0, color="black", linestyle=":", linewidth=0.8, label=f"model {comparison.fraction_moved:.3f}")
    layer_axis.set_xlabel("layer")
    layer_axis.set_ylabel("share of elements with |W_a − W_b| > 0.1")
    layer_axis.set_title("how much W moves, per layer", fontsize=9)
    layer_axis.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)
