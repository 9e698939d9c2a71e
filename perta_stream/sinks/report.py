"""Sweep reports: one row per evaluated model, written as a Markdown table and a JSON record.

A row is either a reference model (θ_full, the model to clean, and θ_ret, what perfect unlearning
looks like) or one merge (method, α). The table shows the TOFU numbers a user chooses α from;
the JSON record holds every metric of every row plus the run's provenance. Both files are written
to a temporary name and renamed, so a reader never sees half a report.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perta_stream.sinks.atomic_file import write_text_atomically

REFERENCE = "reference"
MERGE = "merge"

# (metric key, column title, format); the first two are the trade-off the plot shows.
TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("forget_quality", "forget quality ↑", "sci"),
    ("model_utility", "model utility ↑", "fixed"),
    ("forget_truth_ratio", "forget truth ratio", "fixed"),
    ("forget_probability", "forget prob. ↓", "fixed"),
    ("forget_rouge_l", "forget ROUGE-L ↓", "fixed"),
)
# A sweep on one's own files (eval/files_report.py): no forget quality without a retain model.
FILE_TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("forget_probability", "forget prob. ↓", "sci"),
    ("retain_utility", "retain utility ↑", "fixed"),
    ("forget_rouge_l", "forget ROUGE-L ↓", "fixed"),
    ("forget_extraction_strength", "extraction ↓", "fixed"),
    ("mia_min_k_auc", "MIA AUC → 0.5", "fixed"),
    ("retain_probability", "retain prob. ↑", "sci"),
    ("retain_rouge_l", "retain ROUGE-L ↑", "fixed"),
)


@dataclass(frozen=True)
class TradeoffAxes:
    """Which metrics a sweep trades off: how much is forgotten against how much is kept.

    Attributes:
        forgetting_key, forgetting_name: the forgetting metric and its name in prose.
        forgetting_higher_is_better: forget quality rises with forgetting; a forget probability falls.
        utility_key, utility_name: the utility metric (higher keeps more).
    """

    forgetting_key: str
    forgetting_name: str
    forgetting_higher_is_better: bool
    utility_key: str
    utility_name: str


TOFU_AXES = TradeoffAxes("forget_quality", "forget quality", True, "model_utility", "model utility")
FILE_AXES = TradeoffAxes("forget_probability", "forget probability", False, "retain_utility", "retain utility")


@dataclass(frozen=True)
class SweepRow:
    """One evaluated model of a sweep.

    Attributes:
        label: what the table calls it (`full`, `retain`, `fisher α=1`).
        kind: REFERENCE (an input model) or MERGE (an output of the sweep).
        method: the merge method, None for a reference row.
        alpha: the task-vector scale, None for a reference row.
        metrics: the evaluation's metrics (forget_quality, model_utility, ...), floats.
        model_dir: where the model is (None once a merged model was deleted).
        eval_json: the evaluation's JSON record (per-item values).
    """

    label: str
    kind: str
    metrics: dict[str, float]
    method: str | None = None
    alpha: float | None = None
    model_dir: str | None = None
    eval_json: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "kind": self.kind,
            "method": self.method,
            "alpha": self.alpha,
            "metrics": {key: _json_number(value) for key, value in self.metrics.items()},
            "model_dir": self.model_dir,
            "eval_json": self.eval_json,
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SweepRow":
        return cls(
            label=data["label"],
            kind=data["kind"],
            metrics={key: float("nan") if value is None else float(value) for key, value in data["metrics"].items()},
            method=data.get("method"),
            alpha=data.get("alpha"),
            model_dir=data.get("model_dir"),
            eval_json=data.get("eval_json"),
            extra=data.get("extra", {}),
        )


def row_label(method: str, alpha: float) -> str:
    """`fisher α=1`, `tv α=0.5`: how the table and plot name a merge."""
    return f"{method} α={alpha:g}"


def format_metric(value: float | None, style: str) -> str:
    """A table cell: p-values in scientific notation, everything else with 3 decimals; `—` if absent."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if style == "sci":
        return f"{value:.2e}" if value < 0.01 else f"{value:.3f}"
    return f"{value:.3f}"


def format_markdown_table(rows: Sequence[SweepRow], columns: Sequence[tuple[str, str, str]] = TABLE_COLUMNS) -> str:
    """A GitHub-flavoured Markdown table: reference rows first, then merges by method and α."""
    ordered = sort_rows(rows)
    header = ["model", "method", "α"] + [title for _, title, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * 3 + ["---:"] * len(columns)) + " |"]
    for row in ordered:
        cells = [row.label, row.method or "—", "—" if row.alpha is None else f"{row.alpha:g}"]
        cells += [format_metric(row.metrics.get(key), style) for key, _, style in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sort_rows(rows: Sequence[SweepRow]) -> list[SweepRow]:
    """Reference rows in their given order, then merges grouped by method (first-seen order), α ascending."""
    references = [row for row in rows if row.kind == REFERENCE]
    merges = [row for row in rows if row.kind != REFERENCE]
    method_order: dict[str, int] = {}
    for row in merges:
        method_order.setdefault(row.method or "", len(method_order))
    merges.sort(key=lambda row: (method_order[row.method or ""], row.alpha if row.alpha is not None else 0.0))
    return references + merges


def write_json_atomic(path: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write a JSON record (indented, NaN written as null) atomically."""
    return write_text_atomically(path, json.dumps(_jsonable(record), indent=2, allow_nan=False) + "\n")


def write_sweep_report(
    rows: Sequence[SweepRow],
    *,
    table_path: str | os.PathLike,
    json_path: str | os.PathLike,
    record: dict[str, Any],
    columns: Sequence[tuple[str, str, str]] = TABLE_COLUMNS,
) -> None:
    """The Markdown table and the JSON record (`record` plus a `rows` list) of a sweep."""
    write_text_atomically(table_path, format_markdown_table(rows, columns))
    write_json_atomic(json_path, {**record, "rows": [row.to_dict() for row in sort_rows(rows)]})


def read_sweep_rows(json_path: str | os.PathLike) -> list[SweepRow]:
    """The rows of a sweep's JSON record (to re-plot or re-tabulate without re-running)."""
    data = json.loads(Path(json_path).read_text(encoding="utf-8"))
    return [SweepRow.from_dict(item) for item in data["rows"]]


def _json_number(value: float) -> float | None:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _jsonable(value: Any) -> Any:
    # json refuses NaN/inf with allow_nan=False; a missing metric is written as null instead.
    if isinstance(value, float):
        return _json_number(value)
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


def matched_baseline_utility(rows: Sequence[SweepRow], row: SweepRow, *, baseline: str = "tv", axes: TradeoffAxes = TOFU_AXES) -> float | None:
    """The baseline's utility at `row`'s forgetting, or None outside the baseline's range.

    The baseline's curve is its rows in α order; on every segment whose forgetting range (log
    scale) holds the row's forgetting, the baseline's utility is interpolated linearly in the log
    of the forgetting metric. When several segments match (forgetting is not monotonic in α), the
    highest baseline utility is used, so the comparison never favours the other method.
    """
    curve = [other for other in sort_rows(rows) if other.kind != REFERENCE and other.method == baseline and _usable(other, axes)]
    if not curve or not _usable(row, axes):
        return None
    target = _log_forgetting(row, axes)
    matches = []
    for left, right in list(zip(curve, curve[1:])) or [(curve[0], curve[0])]:
        low, high = sorted((_log_forgetting(left, axes), _log_forgetting(right, axes)))
        if low <= target <= high:
            span = _log_forgetting(right, axes) - _log_forgetting(left, axes)
            share = 0.0 if span == 0 else (target - _log_forgetting(left, axes)) / span
            matches.append(left.metrics[axes.utility_key] + share * (right.metrics[axes.utility_key] - left.metrics[axes.utility_key]))
    return max(matches) if matches else None


def compare_at_matched_forgetting(rows: Sequence[SweepRow], *, baseline: str = "tv", axes: TradeoffAxes = TOFU_AXES) -> list[str]:
    """Each non-baseline merge's utility against the baseline's utility at the same forgetting
    (`matched_baseline_utility`).

    Returns:
        One line per compared row and a final count line; a row whose forgetting is outside
        the baseline's range says so instead of being compared.
    """
    curve = [row for row in sort_rows(rows) if row.kind != REFERENCE and row.method == baseline and _usable(row, axes)]
    if not curve:
        return [f"no {baseline} rows with {axes.forgetting_name} and {axes.utility_name} to compare with"]
    lines: list[str] = []
    ahead = compared = 0
    style = "sci"
    for row in sort_rows(rows):
        if row.kind == REFERENCE or row.method == baseline or not _usable(row, axes):
            continue
        forgetting = format_metric(row.metrics[axes.forgetting_key], style)
        reference = matched_baseline_utility(rows, row, baseline=baseline, axes=axes)
        if reference is None:
            values = [c.metrics[axes.forgetting_key] for c in curve]
            lines.append(
                f"{row.label}: {axes.forgetting_name} {forgetting} is outside {baseline}'s range "
                f"[{format_metric(min(values), style)}, {format_metric(max(values), style)}]; not compared"
            )
            continue
        utility = row.metrics[axes.utility_key]
        compared += 1
        ahead += utility > reference
        lines.append(f"{row.label}: {axes.forgetting_name} {forgetting}, utility {utility:.3f} vs {baseline} {reference:.3f} ({utility - reference:+.3f})")
    lines.append(f"{ahead} of {compared} compared points keep more utility than {baseline} at the same {axes.forgetting_name}")
    return lines


def _usable(row: SweepRow, axes: TradeoffAxes) -> bool:
    forgetting, utility = row.metrics.get(axes.forgetting_key), row.metrics.get(axes.utility_key)
    return forgetting is not None and utility is not None and math.isfinite(forgetting) and math.isfinite(utility)


def _log_forgetting(row: SweepRow, axes: TradeoffAxes) -> float:
    return math.log10(max(row.metrics[axes.forgetting_key], 1e-300))


def best_forget_quality(rows: Sequence[SweepRow]) -> list[str]:
    """Per method (table order), the row with the highest forget quality and the utility it keeps."""
    best: dict[str, SweepRow] = {}
    for row in sort_rows(rows):
        quality = row.metrics.get("forget_quality")
        if row.kind == REFERENCE or quality is None or not math.isfinite(quality):
            continue
        key = row.method or row.label
        if key not in best or quality > best[key].metrics["forget_quality"]:
            best[key] = row
    return [
        f"{method}: forget quality {format_metric(row.metrics['forget_quality'], 'sci')} at α={row.alpha:g}, "
        f"utility {format_metric(row.metrics.get('model_utility'), 'fixed')}"
        for method, row in best.items()
    ]
