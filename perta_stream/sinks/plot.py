"""The trade-off plot of a sweep, in two panels.

Left: forgetting (log scale) against utility, one curve per method, its points in α order, each
marked with its α; the reference models (θ_full, θ_ret) are separate markers. Up and to the right
is better: on TOFU, forget quality near 1 (forgetting like the retain-only model) while keeping
utility; on one's own files, a low forget probability (the axis is inverted so that up is still
better) while keeping the retain utility. The α labels are placed where they overlap no other
label and no point.

Right: PerTA against task arithmetic at matched forgetting: each non-tv point's utility minus tv's
utility at the same forgetting (report.matched_baseline_utility), against its forgetting. Above
zero, the method keeps more than tv for the same forgetting.

matplotlib is imported lazily with the Agg backend, so no display is needed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from perta_stream.sinks.report import REFERENCE, TOFU_AXES, SweepRow, TradeoffAxes, matched_baseline_utility, sort_rows

# A p-value can underflow to 0 for very different distributions; a log axis cannot show 0, so
# such points are drawn at this floor (and the label says so).
FORGET_QUALITY_FLOOR = 1e-30

_METHOD_STYLE = {
    "tv": ("tab:gray", "o", "task arithmetic (tv)"),
    "uniform": ("tab:olive", "v", "uniform W"),
    "grad": ("tab:blue", "s", "PerTA-grad"),
    "fisher": ("tab:red", "D", "PerTA-fisher"),
}
_REFERENCE_STYLE = {"full": ("black", "*"), "retain": ("tab:green", "P")}
# Where an α label may go, in points from its point: right, left, above, below, then further out.
_LABEL_OFFSETS = [(6, 4), (6, -11), (-30, 4), (-30, -11), (6, 13), (-30, 13), (6, -20), (-30, -20), (-12, 18), (-12, -26), (14, 24), (-40, 24), (14, -32), (-40, -32)]


def write_tradeoff_plot(rows: Sequence[SweepRow], path: str | os.PathLike, *, title: str = "", axes: TradeoffAxes = TOFU_AXES) -> Path:
    """Draw the sweep's rows and save a PNG at `path` (written to a temporary name, then renamed).

    Rows without a finite forgetting or utility are left out of the picture (they remain in the table).

    Returns:
        The path of the PNG.
    """
    figure, _ = tradeoff_figure(rows, title=title, axes=axes)
    return save_figure(figure, path)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str | os.PathLike) -> Path:
    """Save `figure` as a PNG at `path` (written to a temporary name, then renamed) and close it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.stem}.tmp.png")
    figure.savefig(temporary, format="png")
    pyplot().close(figure)
    os.replace(temporary, target)
    return target


def tradeoff_figure(rows: Sequence[SweepRow], *, title: str = "", axes: TradeoffAxes = TOFU_AXES) -> tuple[Any, list[Any]]:
    """The figure (two panels) and its α labels, laid out and placed."""
    figure, (left, right) = pyplot().subplots(1, 2, figsize=(12.5, 5.2), dpi=120, gridspec_kw={"width_ratios": [1.35, 1]})
    labelled = _draw_tradeoff(left, rows, axes)
    _draw_matched(right, rows, axes)
    figure.suptitle(title or "PerTA sweep: forgetting vs utility (up and right is better)", fontsize=10)
    figure.tight_layout()
    texts = _place_labels(figure, left, labelled)
    return figure, texts


def _draw_tradeoff(panel: Any, rows: Sequence[SweepRow], axes: TradeoffAxes) -> list[tuple[float, float, str, str | None]]:
    """The left panel; returns the (x, y, label, color) of every α label to place."""
    floored = False
    merges: dict[str, list[SweepRow]] = {}
    for row in sort_rows(rows):
        if row.kind != REFERENCE:
            merges.setdefault(row.method or "?", []).append(row)
    labelled = []
    for method, method_rows in merges.items():
        points = [(row, _point(row, axes)) for row in method_rows]
        points = [(row, point) for row, point in points if point is not None]
        if not points:
            continue
        color, marker, name = _METHOD_STYLE.get(method, (None, "o", method))
        xs = [point[0] for _, point in points]
        ys = [point[1] for _, point in points]
        floored |= any(row.metrics.get(axes.forgetting_key, 1.0) <= 0 for row, _ in points)
        panel.plot(xs, ys, marker=marker, color=color, label=name, linewidth=1.4, markersize=6)
        labelled += [(x, y, f"α={row.alpha:g}", color) for (row, _), x, y in zip(points, xs, ys)]
    for row in rows:
        point = _point(row, axes) if row.kind == REFERENCE else None
        if point is not None:
            color, marker = _REFERENCE_STYLE.get(row.label, ("tab:purple", "X"))
            panel.scatter([point[0]], [point[1]], marker=marker, s=160, color=color, zorder=5, label=f"{row.label} model (reference)")
    panel.set_yscale("log")
    if not axes.forgetting_higher_is_better:
        panel.invert_yaxis()  # up means more forgotten on both kinds of sweep
    panel.set_xlabel(f"{axes.utility_name} (higher keeps more)")
    if axes.forgetting_key == "forget_quality":
        ylabel = "forget quality, KS p-value vs retain model (log)" + (f"; 0 drawn at {FORGET_QUALITY_FLOOR:g}" if floored else "")
    else:
        ylabel = f"{axes.forgetting_name} (log, lower is up: more forgotten)"
    panel.set_ylabel(ylabel)
    panel.set_title("forgetting vs utility", fontsize=9)
    panel.grid(True, which="both", alpha=0.25)
    panel.legend(fontsize=8, loc="best")
    return labelled


def _draw_matched(panel: Any, rows: Sequence[SweepRow], axes: TradeoffAxes) -> None:
    """The right panel: utility minus tv's at the same forgetting, per non-tv point."""
    drawn = 0
    by_method: dict[str, list[tuple[float, float]]] = {}
    for row in sort_rows(rows):
        if row.kind == REFERENCE or row.method in (None, "tv"):
            continue
        reference = matched_baseline_utility(rows, row, axes=axes)
        if reference is not None:
            by_method.setdefault(row.method, []).append((max(row.metrics[axes.forgetting_key], FORGET_QUALITY_FLOOR), row.metrics[axes.utility_key] - reference))
    for method, points in by_method.items():
        color, marker, name = _METHOD_STYLE.get(method, (None, "o", method))
        panel.plot([x for x, _ in points], [y for _, y in points], marker=marker, color=color, linestyle="none", markersize=7, label=name)
        drawn += len(points)
    panel.axhline(0.0, color=_METHOD_STYLE["tv"][0], linewidth=1.2, label="task arithmetic (tv)")
    panel.set_xscale("log")
    if not axes.forgetting_higher_is_better:
        panel.invert_xaxis()  # right means more forgotten, as up does on the left
    panel.set_xlabel(f"{axes.forgetting_name} (log; right: more forgotten)")
    panel.set_ylabel(f"{axes.utility_name} minus tv's at the same forgetting")
    panel.set_title("PerTA vs task arithmetic at matched forgetting (above 0: keeps more)", fontsize=9)
    panel.grid(True, which="both", alpha=0.25)
    if drawn:
        panel.legend(fontsize=8, loc="best")
    else:
        panel.text(0.5, 0.5, "no point within tv's forgetting range", transform=panel.transAxes, ha="center", va="center", fontsize=9)


def _place_labels(figure: Any, panel: Any, labelled: list[tuple[float, float, str, str | None]]) -> list[Any]:
    """Annotate each point, trying offsets in order until the label overlaps no placed label and
    no point (display coordinates, after the layout); the least-overlapping offset otherwise."""
    renderer = figure.canvas.get_renderer()
    markers = [_box_around(panel.transData.transform((x, y)), 5.0) for x, y, _, _ in labelled]
    placed: list[tuple[float, float, float, float]] = []
    texts = []
    for x, y, label, color in labelled:
        best = None
        for offset in _LABEL_OFFSETS:
            text = panel.annotate(label, (x, y), textcoords="offset points", xytext=offset, fontsize=7, color=color)
            box = text.get_window_extent(renderer=renderer)
            box = (box.x0, box.y0, box.x1, box.y1)
            overlap = sum(_overlap(box, other) for other in placed + markers)
            if best is None or overlap < best[0]:
                if best is not None:
                    best[1].remove()
                best = (overlap, text, box)
            else:
                text.remove()
            if overlap == 0:
                break
        assert best is not None
        placed.append(best[2])
        texts.append(best[1])
    return texts


def _box_around(center: Any, half: float) -> tuple[float, float, float, float]:
    return (center[0] - half, center[1] - half, center[0] + half, center[1] + half)


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return width * height if width > 0 and height > 0 else 0.0


def _point(row: SweepRow, axes: TradeoffAxes) -> tuple[float, float] | None:
    utility = row.metrics.get(axes.utility_key)
    forgetting = row.metrics.get(axes.forgetting_key)
    if utility is None or forgetting is None or not math.isfinite(utility) or not math.isfinite(forgetting):
        return None
    return utility, max(forgetting, FORGET_QUALITY_FLOOR)
