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
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from perta_stream.config.finetune import FinetuneConfig
from perta_stream.config.unlearn import UnlearnConfig
from perta_stream.errors import StatisticsError
from perta_stream.pipelines.unlearn_result import UnlearnResult
from perta_stream.sources.stats_dir import StatsRecord

__all__ = ["StatsIdentity", "UnlearnConfig", "UnlearnResult", "run_unlearn", "stats_mismatches"]

logger = logging.getLogger(__name__)
FINETUNE_BATCH_SIZE = FinetuneConfig.__dataclass_fields__["batch_size"].default


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


def run_unlearn(config: UnlearnConfig, *, on_stage: Callable[[str], None] | None = None) -> UnlearnResult:
    """Make sure matching statistics exist (grad, fisher), then merge every α; with
    `config.one_pass`, both in one sweep with no statistics directory (pipelines/one_pass.py).
    With `config.model`, θ_fgt is made (or reused) first; with the evaluation, every output is
    evaluated beside θ_full on the forget and retain files.

    Args:
        on_stage: called with a line as each stage starts or reuses its result (the CLI prints them).

    Raises:
        StatisticsError: the statistics directory exists but was computed from other inputs
            (and recompute_stats is off); the message lists every difference.
        PlanError, CheckpointError, DatasetError, WriteError: from the fine-tuning, stats, merge
            and evaluation stages.
    """
    started = time.perf_counter()
    say = on_stage or (lambda line: None)
    evaluate = config.wants_eval(config.model is not None)
    plans: list[str] = []
    forget_model = None
    if config.model is not None:
        config, forget_model, plan = _with_forget_model(config, say)
        if plan is not None:
            plans.append(plan)
    if config.one_pass:
        from perta_stream.pipelines.one_pass import run_one_pass

        result = run_one_pass(config)
    else:
        result = _stats_then_merge(config, say)
    if plans and result.plan_text is not None:
        result = replace(result, plan_text="\n".join([*plans, result.plan_text]))
    if forget_model is not None:
        result = replace(result, fgt_dir=forget_model.path, fgt_reused=forget_model.reused, fgt_s=forget_model.elapsed_s)
    if evaluate and not config.dry_run:
        from perta_stream.pipelines.unlearn_eval import evaluate_before_after

        eval_started = time.perf_counter()
        table, table_path = evaluate_before_after(config, result.outputs, on_stage=say)
        result = replace(result, eval_table=table, eval_table_path=str(table_path), eval_s=time.perf_counter() - eval_started)
    return replace(result, elapsed_s=time.perf_counter() - started)


def _with_forget_model(config: UnlearnConfig, say: Callable[[str], None]) -> tuple[UnlearnConfig, Any, str | None]:
    """`--model MINE`: θ_0 = θ_full = MINE, θ_fgt made (or found) in the work folder."""
    from perta_stream.pipelines.forget_model import dry_run_notes, forget_model_config, make_forget_model, trained_from
    from perta_stream.sinks.work_folder import WorkFolder

    assert config.model is not None
    work = WorkFolder(config.work_folder_path)
    say(f"[unlearn] your model: {config.model}; work folder {work.path}")
    # A dry run reads no weights: θ_fgt's folder is named by the model's digest only when it is cached.
    digest = work.cached_content_sha256(config.model) if config.dry_run else work.content_sha256(config.model)
    if digest is None:
        named = "fgt-lora-..." if config.lora_rank is not None else "fgt-..."
        trained = trained_from(config.model, config.lora_rank)
        forget_model, plan = None, f"theta_fgt: fine-tune {trained} on {config.forget} into {work.path}/{named} (named once the model is read)"
    else:
        forget_model, plan = make_forget_model(forget_model_config(config, work, digest), on_stage=say, dry_run=config.dry_run)
    if config.dry_run and (forget_model is None or not forget_model.reused):
        from perta_stream.pipelines.dry_run_time import forget_model_wall_time
        from perta_stream.sources.encoded_data import estimated_lengths

        lengths = estimated_lengths(replace(config, fraction=1.0), str(config.forget))
        plan += "\n" + forget_model_wall_time(
            config.model, lengths, epochs=config.epochs, max_steps=config.max_steps, batch_size=FINETUNE_BATCH_SIZE, device=config.device, write_to=str(work.path / "x")
        )
    if config.dry_run:
        plan += "".join(f"\n{line}" for line in dry_run_notes(config, made=forget_model is not None and forget_model.reused))
    # A dry run plans the merge with the model itself as θ_fgt: a full fine-tune keeps its tensors'
    # names, shapes and dtypes (a LoRA's plan says what changes once the adapter exists).
    fgt = forget_model.path if forget_model is not None and (forget_model.reused or not config.dry_run) else config.model
    resolved = replace(
        config, model=None, lora_rank=None, lora_alpha=None, theta0=config.model, full=config.model, fgt=fgt, evaluate=config.wants_eval(True), work_dir=str(work.path)
    )
    return resolved, forget_model, plan


def _stats_then_merge(config: UnlearnConfig, say: Callable[[str], None]) -> UnlearnResult:
    """The two-pass way: statistics (computed, or reused when they match), then the merge."""
    from perta_stream.pipelines.merge import run_merge

    started = time.perf_counter()
    stats_dir: str | None = None
    reused: bool | None = None
    stats_s = 0.0
    plans: list[str] = []
    notes: list[str] = []
    if config.needs_stats:
        stats_dir = _stats_dir(config)
        stats_started = time.perf_counter()
        if stats_dir is None:
            unnamed = str(config.work_folder_path / "stats-...")
            plans.append(f"stats: compute into {unnamed} (named by the model's content digest, known once the model is read)")
            plans.append(_run_stats(config, unnamed, overwrite=False).plan_text or "")
        else:
            if not config.dry_run:
                say(f"[unlearn] statistics: {stats_dir}")
            reused, stats_plan = _ensure_stats(config, stats_dir, notes)
            if stats_plan is not None:
                plans.append(stats_plan)
        stats_s = time.perf_counter() - stats_started

    if config.dry_run and config.needs_stats and not reused:
        plans.append(f"merge: {config.method} at alpha {', '.join(f'{a:g}' for a in config.alphas)} once the statistics exist")
        return UnlearnResult((), stats_dir, reused, "\n".join(plans), stats_s, 0.0, time.perf_counter() - started, 0)

    if not config.dry_run:
        say(f"[unlearn] merging {config.method} at alpha {', '.join(f'{a:g}' for a in config.alphas)} into {config.out}")
    merge_started = time.perf_counter()
    alphas, extra = _matched_alphas(config, stats_dir) if config.alphas_are_matched and not config.dry_run else (config.alphas, {})
    merge_config = config.merge_config(out=config.out, method=config.method, alphas=alphas, stats=stats_dir)
    merged = run_merge(dataclasses.replace(merge_config, extra=extra) if extra else merge_config)
    merge_s = time.perf_counter() - merge_started
    if merged.plan_text is not None:
        plans.append(merged.plan_text)
    if merged.kept_shards:
        notes.append(f"the merge kept {len(merged.kept_shards)} finished shard(s)")
    if merged.plan_text is not None and config.alphas_are_matched:
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
        hub_inputs=merged.hub_inputs,
        resumed=tuple(notes),
    )


def _stats_dir(config: UnlearnConfig) -> str | None:
    """The statistics directory: `--stats-dir`, else the work folder's for the stats model's
    content digest and the data (None in a dry run that has not read the model yet)."""
    from perta_stream.hashing import file_sha256
    from perta_stream.sinks.work_folder import WorkFolder

    if config.stats_dir:
        return config.stats_dir
    work = WorkFolder(config.work_folder_path)
    digest = work.cached_content_sha256(config.effective_stats_model) if config.dry_run else work.content_sha256(config.effective_stats_model)
    if digest is None:
        return None
    return config.stats_dir_for(digest, (file_sha256(str(config.forget)), file_sha256(str(config.retain))))


def _matched_alphas(config: UnlearnConfig, stats_dir: str | None) -> tuple[tuple[float, ...], dict[str, Any]]:
    """The α values of --alpha-unit matched (multiples of the method's matched α) and what the
    merge record says about them."""
    from perta_stream.pipelines.matched_alpha import matched_alphas, scale_alphas

    matched = matched_alphas(
        (config.method,), stats=stats_dir, theta0=config.theta0, fgt=config.fgt, tau=config.tau, uniform_weight=config.uniform_weight,
        fallback_weight=config.fallback_weight, max_memory_bytes=config.max_memory_bytes,
    )[config.method]
    alphas = scale_alphas(config.alphas, matched)
    logger.info("matched alpha of %s: %.6g; merging at alpha %s", config.method, matched, ", ".join(f"{a:g}" for a in alphas))
    return alphas, {"alpha_unit": "matched", "matched_alpha": matched, "alpha_multiples": list(config.alphas)}


def _ensure_stats(config: UnlearnConfig, stats_dir: str, notes: list[str]) -> tuple[bool, str | None]:
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
    if getattr(result, "resumed", None):
        notes.append(f"the statistics {result.resumed}")
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
