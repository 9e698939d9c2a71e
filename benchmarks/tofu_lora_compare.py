"""The report of bench_tofu_real.py --lora R: a LoRA θ_fgt's TOFU sweep against the full θ_fgt's.

bench_tofu_real.py --lora R runs the sweep with θ_fgt a LoRA adapter; the full side is the record
the same preset wrote without --lora (benchmarks/results/tofu_real_<preset>.json). The rows that
do not depend on θ_fgt (θ_ret's and θ_full's own evaluations) must agree between the two runs for
the comparison to mean anything; `reference_rows_check` says whether they do. `lora_vs_full`
compares per method: the best forget quality each side reaches, and each side's utility against
the other side's curve at the same forget quality (the project's matched-forgetting interpolation,
`matched_baseline_utility`, with the other side's rows of the same method as the baseline).
The whole θ_fgt fine-tunes ran at different times (the full one in another run) under the load of a
shared machine, so the fine-tune times that are set against each other come from `step_timing`:
short LoRA and full fine-tunes on the same batches, timed in alternation.
`write_lora_results` writes it all (bench_tofu_real.py imports this module only to report).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from common import RESULTS_DIR, write_results

from perta_stream.sinks.report import REFERENCE, SweepRow, format_metric, matched_baseline_utility, sort_rows

METHODS = ("tv", "grad", "fisher")
FINETUNE_RECORD = "perta_finetune.json"
# The step-time comparison: this many alternating pairs of short fine-tunes (LoRA, full), each of
# this many steps on the first batches of the forget set, so both kinds see the same load and data.
TIMING_ROUNDS = 3
TIMING_STEPS = 4

# Evaluations are deterministic on CPU: the same model and items give the same floats, so a
# difference beyond rounding of the JSON round trip means the two runs did not evaluate the same model.
MATCH_TOLERANCE = 1e-9


def reference_rows_check(new_rows: Sequence[SweepRow], old_rows: Sequence[SweepRow]) -> dict:
    """Whether the reference rows (retain, full) of two sweeps have the same metrics.

    Returns:
        {"labels": the compared labels, "max_abs_difference": over every metric both rows hold
        (None and NaN equal each other), "differing": "label metric" of each metric past the
        tolerance, "match": no metric differs, and both sweeps hold the same reference labels}.
    """
    new = {row.label: row for row in new_rows if row.kind == REFERENCE}
    old = {row.label: row for row in old_rows if row.kind == REFERENCE}
    largest = 0.0
    differing: list[str] = []
    for label in sorted(new.keys() & old.keys()):
        for key in sorted(new[label].metrics.keys() & old[label].metrics.keys()):
            a, b = new[label].metrics[key], old[label].metrics[key]
            if math.isnan(a) and math.isnan(b):
                continue
            gap = abs(a - b) if not (math.isnan(a) or math.isnan(b)) else math.inf
            largest = max(largest, gap)
            if gap > MATCH_TOLERANCE:
                differing.append(f"{label} {key}")
    return {
        "labels": sorted(new.keys() & old.keys()),
        "max_abs_difference": largest,
        "differing": differing,
        "match": not differing and new.keys() == old.keys(),
    }


def lora_vs_full(
    lora_rows: Sequence[SweepRow], full_rows: Sequence[SweepRow], methods: Sequence[str], side_cells: dict[str, dict[str, str]]
) -> tuple[list[dict], dict]:
    """Per method, one table row for each side (LoRA θ_fgt, full θ_fgt), and the same as a record.

    `side_cells` holds, per side ("LoRA", "full"), columns shown in each of its rows (its θ_fgt's
    fine-tune times).

    A side's row holds its best forget quality (highest over α, its α and utility) and, for each
    of its α, its utility minus the other side's utility interpolated at the same forget quality
    (outside the other side's forget-quality range: not compared).
    """
    sides = {"LoRA": list(lora_rows), "full": list(full_rows)}
    table: list[dict] = []
    record: dict[str, dict] = {}
    for method in methods:
        record[method] = {}
        for side, rows in sides.items():
            other = sides["full" if side == "LoRA" else "LoRA"]
            own = [row for row in sort_rows(rows) if row.kind != REFERENCE and row.method == method]
            best = max(own, key=lambda row: _finite(row.metrics.get("forget_quality")), default=None)
            matched = []
            for row in own:
                reference = matched_baseline_utility(other, row, baseline=method)
                utility = row.metrics.get("model_utility")
                matched.append(
                    {
                        "alpha": row.alpha,
                        "forget_quality": row.metrics.get("forget_quality"),
                        "utility": utility,
                        "other_side_utility": reference,
                        "difference": None if reference is None or utility is None else utility - reference,
                    }
                )
            record[method][side] = {
                "best": None if best is None else {"alpha": best.alpha, "forget_quality": best.metrics.get("forget_quality"), "utility": best.metrics.get("model_utility")},
                "matched": matched,
            }
            table.append(
                {
                    "method": method,
                    "θ_fgt": side,
                    "best forget quality (α)": "—" if best is None else f"{format_metric(best.metrics.get('forget_quality'), 'sci')} (α={best.alpha:g})",
                    "utility there": "—" if best is None else format_metric(best.metrics.get("model_utility"), "fixed"),
                    "utility − other side's at the same forget quality": "; ".join(_matched_cell(point) for point in matched) or "—",
                    **side_cells[side],
                }
            )
    return table, record


def _matched_cell(point: dict) -> str:
    if point["difference"] is None:
        return f"α={point['alpha']:g}: not compared"
    return f"α={point['alpha']:g}: {point['difference']:+.3f}"


def _finite(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else -math.inf


def lora_summary(adapter: Path, work: Path, theta0: Path) -> dict:
    """The adapter's settings, size and fine-tune times (its perta_finetune.json), with the seconds
    per step of this run's full fine-tunes (θ_ret, θ_full) beside its own."""
    from safetensors import safe_open

    finetune = json.loads((adapter / FINETUNE_RECORD).read_text())
    weights = adapter / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as tensors:
        parameters = sum(math.prod(tensors.get_slice(key).get_shape()) for key in tensors.keys())  # noqa: SIM118  (safe_open is no dict)
    step_s = {"fgt LoRA": finetune["train_s"] / finetune["steps"]}
    for model in ("ret", "full"):
        path = work / model / FINETUNE_RECORD
        if path.is_file():
            other = json.loads(path.read_text())
            step_s[f"{model} full fine-tune"] = other["train_s"] / other["steps"]
    return {
        "adapter": str(adapter),
        "rank": finetune["config"]["lora_rank"],
        "alpha": finetune["config"]["lora_alpha"],
        "targets": finetune["config"]["lora_targets"],
        "lr": finetune["config"]["lr"],
        "adapter_parameters": parameters,
        "adapter_bytes": weights.stat().st_size,
        "model_bytes": sum(path.stat().st_size for path in theta0.glob("*.safetensors")),
        "finetune_elapsed_s": finetune["elapsed_s"],
        "finetune_train_s": finetune["train_s"],
        "steps": finetune["steps"],
        "epoch_losses": finetune["epoch_losses"],
        "train_s_per_step": step_s,
    }


def step_timing(adapter: Path, full_lr: float, *, rounds: int = TIMING_ROUNDS, steps: int = TIMING_STEPS) -> dict:
    """Seconds per training step of the adapter's LoRA fine-tune and of the full fine-tune with the
    same data, batch and length, timed in alternation (`rounds` pairs of `steps` steps each; the
    outputs go to a temporary folder). The whole θ_fgt fine-tunes ran at different times and loads
    (the full one in another run), so only these are set against each other."""
    import tempfile

    from perta_stream.config.finetune import FinetuneConfig
    from perta_stream.pipelines.finetune import run_finetune

    options = json.loads((adapter / FINETUNE_RECORD).read_text())["config"]
    options["lora_targets"] = tuple(options["lora_targets"])
    kinds = {
        "LoRA": {**options, "max_steps": steps},
        "full": {**options, "max_steps": steps, "lr": full_lr, "lora_rank": None, "lora_alpha": None, "lora_targets": ("all-linear",), "lora_rslora": False},
    }
    per_step: dict[str, list[float]] = {kind: [] for kind in kinds}
    taken = steps  # fewer when the data holds fewer batches (max_steps is a cap)
    with tempfile.TemporaryDirectory(prefix="tofu_lora_timing_") as scratch:
        for round_index in range(rounds):
            for kind, kind_options in kinds.items():
                out = Path(scratch) / f"{kind}_{round_index}"
                run_finetune(FinetuneConfig(**{**kind_options, "out": str(out)}))
                done = json.loads((out / FINETUNE_RECORD).read_text())
                per_step[kind].append(done["train_s"] / done["steps"])
                taken = done["steps"]
    return {
        "rounds": rounds,
        "steps": taken,
        "s_per_step": per_step,
        "median_s_per_step": {kind: sorted(values)[len(values) // 2] for kind, values in per_step.items()},
        "load_average_1m_after": os.getloadavg()[0],
    }


def write_lora_results(
    name: str, record: dict, table_rows: list[dict], *, title: str, notes: list[str], adapter: Path, work: Path, theta0: Path, alpha_unit: str
) -> None:
    """benchmarks/results/<name>.{json,md}: the LoRA-vs-full table when the full side's record of
    the same preset exists (then the run's own rows follow in the Markdown), else the run's rows."""
    lora = lora_summary(adapter, work, theta0)
    lora["step_timing"] = timing = step_timing(adapter, record["preset"]["lr"])
    record = {**record, "lora": lora}
    notes = list(notes)
    notes[2:2] = [
        (
            f"θ_fgt: rank-{lora['rank']} LoRA (alpha {lora['alpha']:g}, every linear module of the blocks, lr {lora['lr']:g}), "
            f"{lora['adapter_parameters']:,} parameters, {lora['adapter_bytes'] / 2**20:.1f} MiB (θ_0: {lora['model_bytes'] / 2**20:.0f} MiB); "
            f"fine-tuned in {lora['finetune_elapsed_s']:.0f} s ({lora['steps']} steps, loss per epoch "
            + ", ".join(f"{loss:.3f}" for loss in lora["epoch_losses"])
            + ")"
        ),
        "seconds per training step in this run: " + ", ".join(f"{model} {seconds:.1f}" for model, seconds in lora["train_s_per_step"].items()),
        (
            f"seconds per step at the same load ({timing['rounds']} alternating pairs of {timing['steps']}-step fine-tunes on the forget set, median): "
            f"LoRA {timing['median_s_per_step']['LoRA']:.2f}, full {timing['median_s_per_step']['full']:.2f}"
        ),
    ]
    full_path = RESULTS_DIR / (f"{name.split('_lora')[0]}" + ("_matched" if alpha_unit == "matched" else "") + ".json")
    if not full_path.is_file():
        write_results(name, record, table_rows, title=title + ", LoRA θ_fgt", notes=notes)
        return
    full_record = json.loads(full_path.read_text())
    full_rows = [SweepRow.from_dict(row) for row in full_record["rows"]]
    full_fgt_s = full_record["stage_s"].get("fgt") or None  # 0.0: it was cached there, not timed
    lora_rows = [SweepRow.from_dict(row) for row in record["rows"]]
    cells = {
        side: {"θ_fgt fine-tune s (its own run)": "—" if whole is None else f"{whole:.0f}", "s per step, same load": f"{timing['median_s_per_step'][side]:.2f}"}
        for side, whole in (("LoRA", lora["finetune_elapsed_s"]), ("full", full_fgt_s))
    }
    versus, per_method = lora_vs_full(lora_rows, full_rows, METHODS, cells)
    check = reference_rows_check(lora_rows, full_rows)
    where = str(full_path.relative_to(RESULTS_DIR.parent.parent))
    record["full_fgt_comparison"] = {"record": where, "reference_rows": check, "per_method": per_method, "full_fgt_finetune_s": full_fgt_s}
    notes.append(
        f"full θ_fgt side: {where} (load average {full_record.get('load_average_1m_at_end', float('nan')):.1f} at its end); "
        f"its θ_ret and θ_full rows {'equal this run' if check['match'] else 'DIFFER from this run'} "
        f"(largest difference {check['max_abs_difference']:.2g})"
    )
    write_results(name, record, versus, title=title + ": LoRA θ_fgt vs full θ_fgt", notes=notes, more_tables=[("Every evaluated model (LoRA θ_fgt)", table_rows)])
