"""The trade-off plot of a sweep: forget quality (log scale) against model utility.

One curve per method, its points in α order and each marked with its α; the reference models
(θ_full, θ_ret) are drawn as separate markers. Up and to the right is better: forgetting like the
retain-only model (forget quality near 1) while keeping the utility of the model one started from.
matplotlib is imported lazily with the Agg backend, so no display is needed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from perta_stream.sinks.report import REFERENCE, SweepRow, sort_rows

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


def write_tradeoff_plot(rows: Sequence[SweepRow], path: str | os.PathLike, *, title: str = "") -> Path:
    """Draw the sweep's rows and save a PNG at `path` (written to a temporary name, then renamed).

    Rows without a finite forget quality or model utility are left out of the picture (they remain
    in the table).

    Returns:
        The path of the PNG.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 5.2), dpi=120)
    floored = False
    merges: dict[str, list[SweepRow]] = {}
    for row in sort_rows(rows):
        if row.kind != REFERENCE:
            merges.setdefault(row.method or "?", []).append(row)

    for method, method_rows in merges.items():
        points = [(row, _point(row)) for row in method_rows]
        points = [(row, point) for row, point in points if point is not None]
        if not points:
            continue
        color, marker, name = _METHOD_STYLE.get(method, (None, "o", method))
        xs = [point[0] for _, point in points]
        ys = [point[1] for _, point in points]
        floored |= any(row.metrics.get("forget_quality", 1.0) <= 0 for row, _ in points)
        axes.plot(xs, ys, marker=marker, color=color, label=name, linewidth=1.4, markersize=6)
        for (row, _), x, y in zip(points, xs, ys):
            axes.annotate(f"α={row.alpha:g}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7, color=color)

    for row in rows:
        if row.kind != REFERENCE:
            continue
        point = _point(row)
        if point is None:
            continue
        color, marker = _REFERENCE_STYLE.get(row.label, ("tab:purple", "X"))
        axes.scatter([point[0]], [point[1]], marker=marker, s=160, color=color, zorder=5, label=f"{row.label} model (reference)")

    axes.set_yscale("log")
    axes.set_xlabel("model utility (higher keeps more)")
    ylabel = "forget quality, KS p-value vs retain model (log)"
    axes.set_ylabel(ylabel + (f"; 0 drawn at {FORGET_QUALITY_FLOOR:g}" if floored else ""))
    axes.set_title(title or "PerTA sweep: forgetting vs utility (up and right is better)", fontsize=10)
    axes.grid(True, which="both", alpha=0.25)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.stem}.tmp.png")
    figure.savefig(temporary, format="png")
    plt.close(figure)
    os.replace(temporary, target)
    return target


def _point(row: SweepRow) -> tuple[float, float] | None:
    utility = row.metrics.get("model_utility")
    quality = row.metrics.get("forget_quality")
    if utility is None or quality is None or not math.isfinite(utility) or not math.isfinite(quality):
        return None
    return utility, max(quality, FORGET_QUALITY_FLOOR)


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
