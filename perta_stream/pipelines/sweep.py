"""`run_sweep`: merge θ_full with several methods at several α, evaluate every result, tabulate, plot.

Recipe, top to bottom:
1. evaluate θ_ret (or read its record): the forget-quality reference, and the `retain` row;
2. evaluate θ_full against it: the `full` row, the model before unlearning;
3. for each method, one merge pass writes every α (`MergeConfig(alphas=...)`), then each output
   is evaluated (and deleted afterwards unless models are kept);
4. write `sweep.md` (the table), `sweep.json` (every metric, the options, timings) and
   `tradeoff.png` (forget quality against model utility).
Everything is written into `<out>.partial/` and renamed to `<out>` at the end. On one's own files
(`--forget --retain`) step 1 is skipped (no retain model), every merge is evaluated beside θ_full
with the metrics that need no retain model, and the plot trades the forget probability against
the retain utility.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from perta_stream import __version__
from perta_stream.config.eval import EvalConfig
from perta_stream.config.merge import MergeConfig, format_alpha
from perta_stream.config.eval import EvalOptions, QaFilesOptions
from perta_stream.config.options import field_values
from perta_stream.config.sweep import PLOT_NAME, RECORD_NAME, STATS_METHODS, TABLE_NAME, SweepConfig
from perta_stream.errors import OutputExistsError
from perta_stream.memory import peak_rss_bytes
from perta_stream.pipelines.matched_alpha import scale_alphas
from perta_stream.sinks.output_dir import AtomicOutputDir
from perta_stream.sinks.plot import write_tradeoff_plot
from perta_stream.sinks.report import (
    FILE_AXES,
    FILE_TABLE_COLUMNS,
    MERGE,
    REFERENCE,
    TABLE_COLUMNS,
    TOFU_AXES,
    SweepRow,
    format_markdown_table,
    row_label,
    sort_rows,
    write_sweep_report,
)

__all__ = ["SweepConfig", "SweepResult", "run_sweep"]

SWEEP_FORMAT = "perta_sweep"
SWEEP_FORMAT_VERSION = 1
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepResult:
    """What `run_sweep` returns.

    Attributes:
        out: the finished sweep folder.
        rows: every evaluated model, reference rows first.
        table: the Markdown table (also in `sweep.md`).
        table_path, record_path, plot_path: the files written.
        elapsed_s: wall time; merge_s and eval_s split it by stage.
    """

    out: Path
    rows: tuple[SweepRow, ...]
    table: str
    table_path: Path
    record_path: Path
    plot_path: Path
    elapsed_s: float
    merge_s: float
    eval_s: float

    def summary(self) -> str:
        merges = sum(row.kind == MERGE for row in self.rows)
        return (
            f"swept {merges} merges in {self.elapsed_s:.1f} s (merging {self.merge_s:.1f} s, evaluating {self.eval_s:.1f} s); "
            f"wrote {self.table_path}, {self.record_path} and {self.plot_path}"
        )


def run_sweep(config: SweepConfig) -> SweepResult:
    """Run every (method, α) merge of `config`, evaluate them and write the report.

    Raises:
        PlanError: a merge's inputs do not fit together (found before that merge writes anything).
        EvaluationError, CheckpointError, DatasetError: from the evaluations.
        OutputExistsError, WriteError: the output folder cannot be written.
    """
    from perta_stream.pipelines.eval import run_eval
    from perta_stream.pipelines.merge import run_merge

    started = time.perf_counter()
    # Given retain logs are checked before anything is written: a wrong file fails in seconds.
    given_reference = _reference_metrics(str(config.retain_logs), config) if config.retain_logs is not None else None
    output = AtomicOutputDir(config.out, overwrite=config.overwrite)
    if output.partial.exists():
        if not config.overwrite:
            raise OutputExistsError(f"{output.partial} is left from a sweep that did not finish; pass --overwrite to start over, or delete it")
        output.discard()
    work = output.open()
    eval_dir = work / "eval"
    rows: list[SweepRow] = []
    eval_s = merge_s = 0.0

    def evaluate(model_dir: str, name: str, retain_logs: str | None):
        nonlocal eval_s
        eval_started = time.perf_counter()
        result = run_eval(_eval_config(config, model_dir, str(eval_dir / f"{name}.json"), retain_logs))
        eval_s += time.perf_counter() - eval_started
        logger.info("%s", result.summary())
        return result

    # 1. The retain-only reference: its forget-set truth ratios define forget quality for all rows.
    # On one's own files there is none; every model is evaluated beside θ_full instead.
    retain_logs: str | None = None
    if config.on_files:
        pass
    elif given_reference is None:
        retain_logs = str(evaluate(str(config.retain_model), "retain", None).json_path)
        retain_metrics = _reference_metrics(retain_logs, config)
    else:
        retain_logs, retain_metrics = str(config.retain_logs), given_reference
    if not config.on_files:
        rows.append(SweepRow(label="retain", kind=REFERENCE, metrics=retain_metrics, model_dir=config.retain_model, eval_json=_relative(str(retain_logs), work)))

    # 2. The model to clean.
    full = evaluate(config.full, "full", retain_logs)
    if config.on_files:
        retain_logs = str(full.json_path)  # every merge's evaluation shows θ_full's answers beside its own
    rows.append(SweepRow(label="full", kind=REFERENCE, metrics=_floats(full.metrics), model_dir=config.full, eval_json=_relative(full.json_path, work)))

    # 3. Every method at every alpha: one merge pass per method, then one evaluation per output.
    # With --alpha-unit matched, each method's alphas are multiples of its matched α, measured first.
    matched = _matched_alphas(config)
    for method in config.methods:
        alphas = scale_alphas(config.alphas, matched[method]) if matched else config.alphas
        merge_started = time.perf_counter()
        merged = run_merge(_merge_config(config, method, work, alphas))
        merge_s += time.perf_counter() - merge_started
        logger.info("%s", merged.summary())
        for multiple, alpha, model_dir in zip(config.alphas, alphas, merged.outputs):
            name = f"{method}_alpha_{format_alpha(alpha)}"
            result = evaluate(model_dir, name, retain_logs)
            rows.append(
                SweepRow(
                    label=f"{method} α={multiple:g}×matched" if matched else row_label(method, alpha),
                    kind=MERGE,
                    method=method,
                    alpha=alpha,
                    metrics=_floats(result.metrics),
                    model_dir=_final_location(model_dir, work, Path(config.out)) if config.keep_models else None,
                    eval_json=_relative(result.json_path, work),
                    extra={"alpha_multiple": multiple, "matched_alpha": matched[method]} if matched else {},
                )
            )
        if not config.keep_models:
            shutil.rmtree(work / "models" / method, ignore_errors=True)

    # 4. The report, then the folder becomes final.
    columns, axes = (FILE_TABLE_COLUMNS, FILE_AXES) if config.on_files else (TABLE_COLUMNS, TOFU_AXES)
    table = format_markdown_table(rows, columns)
    elapsed_s = time.perf_counter() - started
    record = {
        "format": SWEEP_FORMAT,
        "format_version": SWEEP_FORMAT_VERSION,
        "tool_version": __version__,
        "data": "files" if config.on_files else "tofu",
        "config": config.to_dict(),
        "table": TABLE_NAME,
        "plot": PLOT_NAME,
        "elapsed_s": elapsed_s,
        "merge_s": merge_s,
        "eval_s": eval_s,
        "peak_rss_bytes": peak_rss_bytes(),
        "matched_alphas": matched or None,
    }
    write_sweep_report(rows, table_path=work / TABLE_NAME, json_path=work / RECORD_NAME, record=record, columns=columns)
    where = "your files" if config.on_files else f"TOFU {config.split}"
    write_tradeoff_plot(rows, work / PLOT_NAME, title=config.title or f"PerTA sweep on {where}: forgetting vs utility", axes=axes)
    final = output.commit()
    return SweepResult(
        out=final,
        rows=tuple(sort_rows(rows)),
        table=table,
        table_path=final / TABLE_NAME,
        record_path=final / RECORD_NAME,
        plot_path=final / PLOT_NAME,
        elapsed_s=elapsed_s,
        merge_s=merge_s,
        eval_s=eval_s,
    )


def _eval_config(config: SweepConfig, model_dir: str, out: str, reference: str | None) -> EvalConfig:
    """TOFU: `reference` is θ_ret's record (retain logs); files: θ_full's (shown as "before")."""
    shared = {**field_values(config, EvalOptions), "model": model_dir, "out": out, "batch_size": config.eval_batch_size}
    if config.on_files:
        return EvalConfig(**shared, **field_values(config, QaFilesOptions), before=reference)
    return EvalConfig(**shared, split=config.split, retain_logs=reference)


def _matched_alphas(config: SweepConfig) -> dict[str, float]:
    """Each method's matched α with --alpha-unit matched (else empty)."""
    if not config.alphas_are_matched:
        return {}
    from perta_stream.pipelines.matched_alpha import matched_alphas

    return matched_alphas(
        config.methods, stats=config.stats, theta0=config.theta0, fgt=config.fgt, tau=config.tau, uniform_weight=config.uniform_weight,
        fallback_weight=config.fallback_weight, max_memory_bytes=config.max_memory_bytes,
    )


def _merge_config(config: SweepConfig, method: str, work: Path, alphas: tuple[float, ...]) -> MergeConfig:
    return MergeConfig(
        theta0=config.theta0,
        full=config.full,
        fgt=config.fgt,
        out=str(work / "models" / method / "alpha_{alpha}"),
        method=method,
        stats=config.stats if method in STATS_METHODS else None,
        alphas=alphas,
        tau=config.tau if method in STATS_METHODS else None,
        uniform_weight=config.uniform_weight,
        fallback_weight=config.fallback_weight,
        # What the merge may add to what the sweep process holds (torch, the evaluations' allocations).
        max_memory_bytes=config.max_memory_bytes,
    )


def _reference_metrics(retain_logs: str, config: SweepConfig) -> dict[str, float]:
    """The retain model's metrics, checked against this sweep's data, with its forget quality.

    Its own record has no forget quality (it is the reference); against itself the KS test gives
    the p-value of identical samples, computed here by the same definition rather than assumed.

    Raises:
        EvaluationError: the record is not an eval record, or is for another split, other forget
            data or another number of items.
    """
    from perta_stream.eval.metrics import forget_quality
    from perta_stream.eval.report import load_retain_logs
    from perta_stream.sources.tofu import load_eval_sets

    forget = load_eval_sets(config.tofu_dir, config.split, max_items=config.max_items)["forget"]
    logs = load_retain_logs(retain_logs, split=config.split, forget_sha256=forget.sha256, forget_count=len(forget.items))
    record = json.loads(Path(retain_logs).read_text(encoding="utf-8"))
    metrics = _floats(record.get("metrics", {}))
    metrics["forget_quality"] = forget_quality(logs.forget_truth_ratios, logs.forget_truth_ratios)
    return metrics


def _floats(metrics: dict) -> dict[str, float]:
    return {key: float("nan") if value is None else float(value) for key, value in metrics.items() if value is None or isinstance(value, (int, float))}


def _relative(path: str | Path, work: Path) -> str:
    """Paths inside the sweep folder are stored relative to it (they stay valid after the rename)."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(work.resolve()))
    except ValueError:
        return str(path)


def _final_location(model_dir: str, work: Path, final: Path) -> str:
    relative = _relative(model_dir, work)
    return str(final / relative) if not Path(relative).is_absolute() else relative
