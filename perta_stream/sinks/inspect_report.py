"""The record and summary of `inspect`: `inspect.json` (every figure) and `inspect.md` (the tables a user reads).

The JSON record holds, for the model, each layer, each module kind, each (layer, kind) cell, each
expert and each tensor, the figures of every W configuration (named by its label, `fisher τ=2`);
with two statistics runs compared, each figure is given per run (`a`: --compare, `b`: STATS) and
the comparison of the two. The model-level effective scale of every configuration, and the
matched α (its inverse), are at the top level.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from perta_stream import __version__
from perta_stream.compute.figure_summary import GroupFigures, InspectSummary
from perta_stream.compute.rank_sample import ESTIMATOR, SAMPLE_SEED, TENSOR_SAMPLE_ELEMENTS
from perta_stream.compute.weight_figures import MOVED_THRESHOLD, WeightFigures, histogram_edges
from perta_stream.config.inspect import INSPECT_FORMAT, RECORD_NAME, SUMMARY_NAME
from perta_stream.plan.inspect_plan import InspectPlan
from perta_stream.sinks.atomic_file import write_text_atomically
from perta_stream.sinks.report import write_json_atomic

SIDE_NAMES = {"a": "--compare", "b": "STATS"}


def _per_side(plan: InspectPlan, values: dict[str, Any]) -> Any:
    """One run's value as it is; two runs' as {"a": ..., "b": ...}."""
    return values.get("a") if len(plan.sides) == 1 else {side: values.get(side) for side in plan.sides}


def group_json(group: GroupFigures, plan: InspectPlan, *, with_histogram: bool = True) -> dict[str, Any]:
    """One group's (or tensor's) figures as the record holds them."""
    record: dict[str, Any] = {
        "w": _per_side(plan, {side: {c.label: group.weights[(side, c.label)].to_json(with_histogram=with_histogram) for c in plan.configs} for side in plan.sides}),
    }
    if group.agreement:
        record["grad_cosine"] = _per_side(plan, {side: agreement.grad_cosine for side, agreement in group.agreement.items()})
    if group.rank_correlations:
        fisher = {name.split(":")[0]: value for name, value in group.rank_correlations.items() if name.endswith("F_f vs F_r")}
        if fisher:
            record["fisher_rank_correlation"] = _per_side(plan, fisher)
        record["rank_sample_elements"] = group.sample_elements
    if group.comparisons:
        record["comparison"] = {
            label: {
                "w_rank_correlation": group.rank_correlations.get(f"W {label}: a vs b"),
                "fraction_moved": comparison.fraction_moved,
                "mean_abs_difference": comparison.mean_abs_difference,
                **({"joint_histogram": comparison.joint_rows()} if with_histogram else {}),
            }
            for label, comparison in group.comparisons.items()
        }
    return record


def inspect_record(
    summary: InspectSummary, plan: InspectPlan, *, config: Any, records: dict, stats_check: str, plots: list[str], elapsed_s: float, peak_rss_bytes: int,
    memory: dict[str, int],
) -> dict[str, Any]:
    """The whole `inspect.json` record."""
    scales = {side: {c.label: summary.model.weights[(side, c.label)].effective_scale for c in plan.configs} for side in plan.sides}
    matched = {side: {label: (1.0 / scale if scale else None) for label, scale in by_label.items()} for side, by_label in scales.items()}
    statistics = {
        side: {
            "location": config.compare if side == "a" and config.compare else config.stats,
            "kinds": list(record.kinds),
            "fraction": record.fraction,
            "seed": record.seed,
            "model": record.model.location,
            "samples": {name: entry.get("num_samples") for name, entry in record.datasets.items()},
        }
        for side, record in records.items()
    }
    return {
        "format": INSPECT_FORMAT,
        "format_version": 1,
        "tool_version": __version__,
        "inputs": {"stats": config.stats, "compare": config.compare, "theta0": config.theta0, "fgt": config.fgt},
        "statistics": _per_side(plan, statistics),
        "stats_check": stats_check,
        "methods": [
            {"label": c.label, "method": c.method, "tau": c.tau, "uniform_weight": c.uniform_weight if c.method == "uniform" else None,
             "fallback_weight": c.fallback_weight if c.uses_statistics else None}
            for c in plan.configs
        ],  # fmt: skip
        "effective_scale": _per_side(plan, scales),
        "matched_alpha": _per_side(plan, matched),
        "histogram_edges": histogram_edges(),
        "moved_threshold": MOVED_THRESHOLD if len(plan.sides) == 2 else None,
        "rank_correlation": {
            "estimator": ESTIMATOR.format(model=plan.rank_sample_elements, tensor=TENSOR_SAMPLE_ELEMENTS),
            "model_sample_target": plan.rank_sample_elements,
            "tensor_sample_minimum": TENSOR_SAMPLE_ELEMENTS,
            "seed": SAMPLE_SEED,
            "model_sample_elements": summary.model.sample_elements,
        },
        # The statistics hold the model's tensors under its checkpoint's names: no head means a tied one.
        "tied_embeddings": not any(group.module_kind == "head" for group in summary.groups) and any(
            group.module_kind == "embedding" for group in summary.groups
        ),
        "model": group_json(summary.model, plan),
        "layers": [{"layer": layer, "tensors": group.tensors, **group_json(group, plan)} for layer, group in summary.layers.items()],
        "module_kinds": [{"module_kind": kind, "tensors": group.tensors, **group_json(group, plan)} for kind, group in summary.kinds.items()],
        "layer_module_cells": [
            {"layer": layer, "module_kind": kind, **group_json(group, plan, with_histogram=False)} for (layer, kind), group in summary.cells.items()
        ],
        "experts": [{"expert": expert, "tensors": group.tensors, **group_json(group, plan)} for expert, group in summary.experts.items()],
        "tensors": [
            {
                "tensor_name": figures.tensor_name, "layer": group.layer, "module_kind": group.module_kind, "expert": group.expert,
                **group_json(_single(figures), plan),
            }
            for figures, group in zip(summary.tensors, summary.groups)
        ],  # fmt: skip
        "plots": plots,
        "bytes_read": plan.bytes_to_read,
        "chunk_elements": plan.chunk_elements,
        "max_memory_bytes": plan.max_memory_bytes,
        "peak_rss_bytes": peak_rss_bytes,
        **memory,
        "elapsed_s": round(elapsed_s, 3),
    }


def _single(figures: Any) -> GroupFigures:
    """A tensor's figures as a group of one (its rank correlations are its own sample's)."""
    group = GroupFigures()
    group.add(figures)
    group.rank_correlations = dict(figures.rank_correlations)
    group.sample_elements = figures.sample_elements
    return group


# ---------------------------------------------------------------------------- Markdown
def _number(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}"


def _percent(count: int, total: int) -> str:
    return "—" if total == 0 else f"{100 * count / total:.1f}%"


def inspect_markdown(summary: InspectSummary, plan: InspectPlan, record: dict[str, Any]) -> str:
    """`inspect.md`: the headline table, agreement, per-kind and per-layer tables, the plots."""
    lines = [f"# W of {record['inputs']['stats']}", ""]
    if len(plan.sides) == 2:
        lines[0] = f"# W of {record['inputs']['compare']} (a) against {record['inputs']['stats']} (b)"
    lines += [f"- task vector: {'θ_fgt ' + str(record['inputs']['fgt']) + ' − θ_0 ' + str(record['inputs']['theta0']) if plan.task_vector else 'none given (no effective scale)'}"]
    lines += [f"- statistics check: {record['stats_check']}", f"- {record['rank_correlation']['estimator']}", ""]
    lines += ["## W by method (the model)", ""]
    lines += ["| run | W | mean W | W < 0.1 | W > 0.9 | effective scale ‖W⊙TV‖/‖TV‖ | matched α | fallback W (both statistics 0) |"]
    lines += ["|---|---|---:|---:|---:|---:|---:|---:|"]
    for side in plan.sides:
        for config in plan.configs:
            figures: WeightFigures = summary.model.weights[(side, config.label)]
            scale = figures.effective_scale
            lines.append(
                f"| {SIDE_NAMES[side] if len(plan.sides) == 2 else 'STATS'} | {config.label} | {_number(figures.mean_weight)} | "
                f"{_percent(figures.below_low, figures.elements)} | {_percent(figures.above_high, figures.elements)} | {_number(scale)} | "
                f"{_number(1 / scale if scale else None)} | {figures.fallback_elements:,} of {figures.elements:,} |"
            )
    lines += ["", "The matched α is the α at which ‖α·W⊙TV‖ = ‖TV‖: `--alpha-unit matched` in `sweep` and `unlearn` counts α in it.", ""]
    lines += _agreement_lines(summary, plan)
    if len(plan.sides) == 2:
        lines += _comparison_lines(summary, plan)
    lines += _group_table("By module kind", [(kind, group) for kind, group in summary.kinds.items()], plan)
    lines += _group_table("By layer", [(str(layer), group) for layer, group in summary.layers.items()], plan)
    if summary.experts:
        lines += _group_table("By expert (all layers)", [(str(expert), group) for expert, group in summary.experts.items()], plan)
    lines += ["## Plots", ""] + [f"![{name}]({name})" for name in record["plots"]] + [""]
    return "\n".join(lines)


def _agreement_lines(summary: InspectSummary, plan: InspectPlan) -> list[str]:
    lines = ["## Forget and retain agreement (the model)", ""]
    for side in plan.sides:
        prefix = f"{SIDE_NAMES[side]}: " if len(plan.sides) == 2 else ""
        agreement = summary.model.agreement.get(side)
        rho = summary.model.rank_correlations.get(f"{side}: F_f vs F_r")
        lines.append(f"- {prefix}cosine(ḡ_f, ḡ_r) = {_number(agreement.grad_cosine if agreement else None)}; "
                     f"Spearman ρ(F_f, F_r) = {_number(rho)} (on {summary.model.sample_elements:,} sampled elements)")  # fmt: skip
    return lines + [""]


def _comparison_lines(summary: InspectSummary, plan: InspectPlan) -> list[str]:
    # A `|` inside a cell ends it in Markdown tables unless escaped.
    lines = ["## W of a against b", "", f"| W | Spearman ρ(W_a, W_b) | share with \\|W_a − W_b\\| > {MOVED_THRESHOLD:g} | mean \\|W_a − W_b\\| | effective scale a | effective scale b |"]
    lines.append("|---|---:|---:|---:|---:|---:|")
    for label, comparison in summary.model.comparisons.items():
        lines.append(
            f"| {label} | {_number(summary.model.rank_correlations.get(f'W {label}: a vs b'))} | {_number(comparison.fraction_moved)} | "
            f"{_number(comparison.mean_abs_difference, 4)} | {_number(summary.model.weights[('a', label)].effective_scale)} | "
            f"{_number(summary.model.weights[('b', label)].effective_scale)} |"
        )
    return lines + [""]


def _group_table(title: str, groups: list[tuple[str, GroupFigures]], plan: InspectPlan) -> list[str]:
    side = plan.sides[-1]
    configs = [config for config in plan.configs if config.uses_statistics] or list(plan.configs)
    header = [title.split()[-1].replace("kind", "module kind")]
    for config in configs:
        header += [f"mean W {config.label}"] + ([f"scale {config.label}"] if plan.task_vector else [])
        if len(plan.sides) == 2:
            header.append(f"moved {config.label}")
    header += ["cos(ḡ_f, ḡ_r)"] if "grad" in plan.kinds else []
    header += ["ρ(F_f, F_r)"] if "fisher" in plan.kinds else []
    lines = [f"## {title}" + (" (STATS)" if len(plan.sides) == 2 else ""), "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, group in groups:
        cells = [name]
        for config in configs:
            figures = group.weights[(side, config.label)]
            cells += [_number(figures.mean_weight)] + ([_number(figures.effective_scale)] if plan.task_vector else [])
            if len(plan.sides) == 2:
                cells.append(_number(group.comparisons[config.label].fraction_moved) if config.label in group.comparisons else "—")
        if "grad" in plan.kinds:
            cells.append(_number(group.agreement[side].grad_cosine if side in group.agreement else None))
        if "fisher" in plan.kinds:
            cells.append(_number(group.rank_correlations.get(f"{side}: F_f vs F_r")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def write_inspect_report(record: dict[str, Any], markdown: str, folder: Path) -> tuple[Path, Path]:
    """`inspect.json` and `inspect.md` in `folder` (each written whole, then renamed)."""
    return write_json_atomic(folder / RECORD_NAME, record), write_text_atomically(folder / SUMMARY_NAME, markdown)
