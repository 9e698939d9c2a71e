"""`run_unlearn`: statistics (reused when already computed for the same inputs), then the merge.

Recipe, top to bottom:
1. grad and fisher need statistics: work out what they must have been computed from (the stats
   model's header hash, the data files' sha256, fraction, seed, max_length, record keys, system
   prompt, kinds) and compare with the `perta_stats.json` of the statistics directory;
2. reuse it when everything matches, compute it when it is missing, and refuse (saying what
   differs) when it exists but does not match, unless `recompute_stats` asks to replace it;
3. merge every α in one pass.
tv and uniform need no statistics and go straight to the merge.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perta_stream.config.unlearn import UnlearnConfig
from perta_stream.errors import StatisticsError
from perta_stream.sources.stats_dir import StatsRecord

__all__ = ["StatsIdentity", "UnlearnConfig", "UnlearnResult", "run_unlearn", "stats_mismatches"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatsIdentity:
    """What a statistics directory must have been computed from to be reused.

    Attributes:
        model_header_sha256: `Checkpoint.header_sha256` of the model the statistics are taken at.
        model_files: its `Checkpoint.file_identity()` (resolved folder, shard sizes and times):
            headers cannot tell two fine-tunes of one architecture apart. (The merge then checks
            the statistics against the model's bytes themselves before it commits.)
        forget_sha256, retain_sha256: sha256 of the data files.
        fraction, seed, max_length, question_key, answer_key, system_prompt: the sampling and encoding.
        kinds: the statistics the merge needs (the directory may hold more).
    """

    model_header_sha256: str
    model_files: list
    forget_sha256: str
    retain_sha256: str
    fraction: float
    seed: int
    max_length: int
    question_key: str
    answer_key: str
    system_prompt: str | None
    kinds: tuple[str, ...]


@dataclass(frozen=True)
class UnlearnResult:
    """What `run_unlearn` did.

    Attributes:
        outputs: the merged checkpoints, one per α (empty for a dry run).
        stats_dir: the statistics directory used (None for tv and uniform).
        stats_reused: True when an existing statistics directory matched, False when computed,
            None when the method needs none.
        plan_text: what a dry run would do, else None.
        stats_s, merge_s, elapsed_s: wall time per stage and in total.
        peak_rss_bytes: the merge's peak resident memory.
        one_pass: statistics and merge ran as one sweep (`stats_s` is then the whole run).
    """

    outputs: tuple[str, ...]
    stats_dir: str | None
    stats_reused: bool | None
    plan_text: str | None
    stats_s: float
    merge_s: float
    elapsed_s: float
    peak_rss_bytes: int
    one_pass: bool = False

    def summary(self) -> str:
        if self.one_pass:
            saved = f"; statistics saved to {self.stats_dir}" if self.stats_dir else ""
            return f"one pass: statistics and merge into {', '.join(self.outputs)} in {self.elapsed_s:.1f} s{saved}"
        if self.stats_reused is None:
            stats_text = "no statistics needed"
        elif self.stats_reused:
            stats_text = f"reused statistics {self.stats_dir}"
        else:
            stats_text = f"computed statistics into {self.stats_dir} in {self.stats_s:.1f} s"
        return f"{stats_text}; merged {', '.join(self.outputs)} in {self.merge_s:.1f} s (total {self.elapsed_s:.1f} s)"


def expected_stats_identity(config: UnlearnConfig) -> StatsIdentity:
    """The identity the statistics of `config` must have (reads the model's headers and hashes the data).

    Raises:
        CheckpointError: the stats model cannot be opened. DatasetError: a data file is missing.
    """
    from perta_stream.errors import DatasetError
    from perta_stream.hashing import file_sha256
    from perta_stream.sources.resolve import open_checkpoint

    checkpoint, source = open_checkpoint(config.effective_stats_model, "stats model")
    source.close()
    hashes = {}
    for flag, path in (("--forget", config.forget), ("--retain", config.retain)):
        if not path or not Path(path).is_file():
            raise DatasetError(f"{flag} {path} does not exist; give the data file the statistics are computed on")
        hashes[flag] = file_sha256(path)
    return StatsIdentity(
        model_header_sha256=checkpoint.header_sha256,
        model_files=checkpoint.file_identity(),
        forget_sha256=hashes["--forget"],
        retain_sha256=hashes["--retain"],
        **config.encoding(),
        kinds=(config.method,),
    )


def stats_mismatches(record: StatsRecord, expected: StatsIdentity) -> list[str]:
    """Every way a statistics record (`perta_stats.json`) differs from what `expected` needs
    (empty: reusable). The statistics may hold more kinds than needed; everything else must be equal.
    """
    found: list[str] = []
    model = record.model
    if model.header_sha256 != expected.model_header_sha256:
        found.append(f"computed at another model ({model.location!r}, header sha256 {str(model.header_sha256)[:12]}…)")
    elif model.files != expected.model_files:
        found.append(f"computed at {model.location!r}, whose files (folder, shard sizes and times) are not the stats model's now")
    for name, sha256 in (("forget", expected.forget_sha256), ("retain", expected.retain_sha256)):
        entry = record.datasets.get(name, {})
        if entry.get("sha256") != sha256:
            found.append(f"computed on another {name} file ({entry.get('path')!r})")
    fraction = record.fraction
    if not isinstance(fraction, (int, float)) or not math.isclose(float(fraction), expected.fraction, rel_tol=0, abs_tol=1e-12):
        found.append(f"fraction {fraction} instead of {expected.fraction}")
    for key in ("seed", "max_length", "question_key", "answer_key", "system_prompt"):
        if getattr(record, key) != getattr(expected, key):
            found.append(f"{key} {getattr(record, key)!r} instead of {getattr(expected, key)!r}")
    missing = [kind for kind in expected.kinds if kind not in record.kinds]
    if missing:
        found.append(f"holds {', '.join(record.kinds) or 'no kinds'}, not {', '.join(missing)}")
    return found


def run_unlearn(config: UnlearnConfig) -> UnlearnResult:
    """Make sure matching statistics exist (grad, fisher), then merge every α; with
    `config.one_pass`, both in one sweep with no statistics directory (pipelines/one_pass.py).

    Raises:
        StatisticsError: the statistics directory exists but was computed from other inputs
            (and recompute_stats is off); the message lists every difference.
        PlanError, CheckpointError, DatasetError, WriteError: from the stats and merge stages.
    """
    from perta_stream.pipelines.merge import run_merge

    if config.one_pass:
        from perta_stream.pipelines.one_pass import run_one_pass

        return run_one_pass(config)
    started = time.perf_counter()
    stats_dir: str | None = None
    reused: bool | None = None
    stats_s = 0.0
    plans: list[str] = []
    if config.needs_stats:
        stats_dir = config.effective_stats_dir
        stats_started = time.perf_counter()
        reused, stats_plan = _ensure_stats(config, stats_dir)
        stats_s = time.perf_counter() - stats_started
        if stats_plan is not None:
            plans.append(stats_plan)

    if config.dry_run and config.needs_stats and not reused:
        plans.append(f"merge: {config.method} at alpha {', '.join(f'{a:g}' for a in config.alphas)} once the statistics exist")
        return UnlearnResult((), stats_dir, reused, "\n".join(plans), stats_s, 0.0, time.perf_counter() - started, 0)

    merge_started = time.perf_counter()
    alphas, extra = _matched_alphas(config, stats_dir) if config.alphas_are_matched and not config.dry_run else (config.alphas, {})
    merge_config = config.merge_config(out=config.out, method=config.method, alphas=alphas, stats=stats_dir)
    merged = run_merge(dataclasses.replace(merge_config, extra=extra) if extra else merge_config)
    merge_s = time.perf_counter() - merge_started
    if merged.plan_text is not None:
        plans.append(merged.plan_text)
        if config.alphas_are_matched:
            plans.append("alpha: multiples of the matched alpha, measured from the statistics and the task vector before the merge")
    return UnlearnResult(
        outputs=merged.outputs,
        stats_dir=stats_dir,
        stats_reused=reused,
        plan_text="\n".join(plans) if config.dry_run else None,
        stats_s=stats_s,
        merge_s=merge_s,
        elapsed_s=time.perf_counter() - started,
        peak_rss_bytes=merged.peak_rss_bytes,
    )


def _matched_alphas(config: UnlearnConfig, stats_dir: str | None) -> tuple[tuple[float, ...], dict[str, Any]]:
    """The α values of --alpha-unit matched (multiples of the method's matched α) and what the
    merge record says about them."""
    from perta_stream.memory import current_rss_bytes
    from perta_stream.pipelines.matched_alpha import matched_alphas, scale_alphas

    matched = matched_alphas(
        (config.method,), stats=stats_dir, theta0=config.theta0, fgt=config.fgt, tau=config.tau, uniform_weight=config.uniform_weight,
        fallback_weight=config.fallback_weight, max_memory_bytes=current_rss_bytes() + config.max_memory_bytes,
    )[config.method]
    alphas = scale_alphas(config.alphas, matched)
    logger.info("matched alpha of %s: %.6g; merging at alpha %s", config.method, matched, ", ".join(f"{a:g}" for a in alphas))
    return alphas, {"alpha_unit": "matched", "matched_alpha": matched, "alpha_multiples": list(config.alphas)}


def _ensure_stats(config: UnlearnConfig, stats_dir: str) -> tuple[bool, str | None]:
    """(reused, dry-run plan text): reuse, compute, or refuse the statistics directory."""
    from perta_stream.sources.stats_dir import read_stats_record

    expected = expected_stats_identity(config)
    exists = Path(stats_dir).exists()
    if exists:
        try:
            differences = stats_mismatches(read_stats_record(stats_dir), expected)
        except StatisticsError as exc:
            differences = [str(exc)]
        if not differences:
            logger.info("reusing statistics %s (same model, data and options)", stats_dir)
            return True, (f"stats: reuse {stats_dir} (same model, data and options)" if config.dry_run else None)
        if not config.recompute_stats:
            raise StatisticsError(
                f"statistics directory {stats_dir} does not match this run: {'; '.join(differences)}; "
                "pass --recompute-stats to replace it, or --stats-dir with another folder"
            )
        logger.info("statistics %s differ (%s); recomputing", stats_dir, "; ".join(differences))
    result = _run_stats(config, stats_dir, overwrite=exists)
    if config.dry_run:
        return False, f"stats: compute into {stats_dir}\n{result.plan_text or ''}".rstrip()
    return False, None


def _run_stats(config: UnlearnConfig, stats_dir: str, *, overwrite: bool) -> Any:
    from perta_stream.pipelines.stats import run_stats

    stats_config = config.stats_config(out=stats_dir, kinds=config.kinds, overwrite=overwrite)
    result = run_stats(stats_config)
    if not config.dry_run:
        logger.info("%s", result.summary())
    return result
