"""`run_stats`: gradient statistics of θ on the forget and retain sets (METHOD.md sections 2, 3, 6).

The recipe, top to bottom:
  1. read the checkpoint's headers and config, refuse unsupported models      (sources, plan)
  2. tokenize both data files with the shared prompt rules, pick the fraction (sources, compute.prompts)
  3. plan: bytes, boundary storage, memory, FLOPs; `--dry-run` stops here      (plan)
  4. stream: layer-major forward, head, backward, embeddings                   (compute.stats)
  5. write each group's statistics as it completes, then indexes and the record (sinks)
  6. rename `<out>.partial/` to `<out>`

A failed or killed run leaves `<out>.partial/` resumable: every finished shard is listed with its
sha256 in a resume record, and the sweep's state is saved at resume points (after the head and
after backward layers, at most once per --checkpoint-interval). `resume=True` verifies and keeps
the finished shards, loads the latest state, recomputes only the layer inputs it needs, and
continues; with deterministic (CPU) kernels the output is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from perta_stream.config.stats import StatsConfig
from perta_stream.distributed import DistContext, distributed
from perta_stream.errors import PlanError, UsageError
from perta_stream.memory import format_bytes
from perta_stream.pipelines.stats_steps import (
    PreparedSweep,
    open_store,
    plan_from_config,
    prepare_sweep,
    resume_start,
    sweep_and_write,
    sweep_inputs,
    sweep_other_rank,
)
from perta_stream.plan.stats_plan import ModelShape, StatsPlan
from perta_stream.pipelines.dry_run_time import checkpoint_files
from perta_stream.sinks.output_dir import AtomicOutputDir, check_output_location
from perta_stream.sinks.stats_record import run_identity, stats_record
from perta_stream.sources.byte_source import ByteSource
from perta_stream.sources.checkpoint import Checkpoint
from perta_stream.sources.content_digest import TensorHasher
from perta_stream.sources.pinned_folder import check_inputs_unchanged
from perta_stream.sources.input_location import hub_inputs, hub_summary
from perta_stream.sources.stats_dir import STATS_FORMAT, STATS_RECORD_NAME, StatsRecord

if TYPE_CHECKING:
    from perta_stream.compute.stats.streaming import EngineReport

__all__ = ["StatsResult", "config_only_plan", "open_store", "prepare_sweep", "run_stats"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatsResult:
    """What `run_stats` did: the plan text for a dry run, else the output and its record."""

    plan: StatsPlan
    plan_text: str | None = None
    out: Path | None = None
    record: StatsRecord | None = None
    mean_loss: dict[str, float] = field(default_factory=dict)
    boundary_peak_ram_bytes: int = 0
    boundary_peak_disk_bytes: int = 0
    boundary_spilled: int = 0
    hub_inputs: tuple[str, ...] = ()
    resumed: str | None = None

    def summary(self) -> str:
        if self.out is None or self.record is None:
            return self.plan_text or ""
        losses = "".join(f", {name} loss {value:.4f}" for name, value in self.mean_loss.items()).removeprefix(", ")
        return (
            (f"resumed: {self.resumed}; " if self.resumed else "")
            + f"wrote statistics ({','.join(self.record.kinds)}) to {self.out}{': ' if losses else ''}{losses}; "
            f"{self.record.elapsed_s:.1f} s, peak RSS {format_bytes(self.record.peak_rss_bytes or 0)}{hub_summary(self.hub_inputs)}"
        )


def run_stats(config: StatsConfig) -> StatsResult:
    """Compute the statistics directory of METHOD.md section 6, or print its plan.

    Raises:
        PlanError: invalid inputs or output location, all listed at once.
        ModelNotSupportedError: not a supported family (plan/model_families.py), decided from config.json.
        DatasetError: an empty or malformed data file, or an answer longer than max_length.
        CheckpointError, WriteError: unreadable inputs or an unwritable output; `<out>.partial/`
            is left for `resume=True`.
        OutputExistsError: `<out>.partial/` exists and `resume` is off.
        ResumeError: `<out>.partial/` was started with other inputs or options.
        UsageError: `resume` under a launcher (torchrun, accelerate launch).
    """
    started = time.perf_counter()
    if config.config_only:
        return config_only_plan(config)
    from perta_stream.sources.resolve import open_checkpoint

    checkpoint, source = open_checkpoint(config.model, "model")
    try:
        shape = ModelShape.from_config(checkpoint.config, ties_embeddings=checkpoint.ties_embeddings, where=f"{config.model}/config.json")
        if not config.dry_run:
            problems = check_output_location(
                config.out or "",
                overwrite=config.overwrite,
                inputs={"model": config.model, "forget": config.forget, "retain": config.retain, **config.other_inputs},
                record=(STATS_RECORD_NAME, STATS_FORMAT),
            )
            if problems:
                raise PlanError("cannot write the statistics", problems)
            # Checked here, by every rank, before minutes of tokenizing and loading.
            AtomicOutputDir(config.out or "", overwrite=config.overwrite, keep_partial=config.resume).check_partial()
        prepared = prepare_sweep(config, checkpoint, shape)
        if config.dry_run:
            files = checkpoint_files(checkpoint.location, [shard.file_name for shard in checkpoint.shards])
            return StatsResult(plan=prepared.plan, plan_text=with_wall_time(prepared.plan, prepared.device, prepared.compute_dtype, files, config.out))
        logger.info("%s", prepared.plan.to_text())
        # Under torchrun / accelerate launch: one process per GPU, the samples split across them.
        with distributed(device_type=prepared.device) as dist:
            if dist.is_distributed and config.resume:
                raise UsageError(
                    "--resume runs in one process (under a launcher each rank's saved gradients would be only its share "
                    f"of the samples); rerun the command without the launcher to resume {config.out}.partial, keeping its "
                    "finished shards, or delete that folder to start over"
                )
            return _compute(config, checkpoint, source, shape, prepared, started, dist)
    finally:
        source.close()


def _compute(
    config: StatsConfig, checkpoint: Checkpoint, source: ByteSource, shape: ModelShape, prepared: PreparedSweep, started: float, dist: DistContext
) -> StatsResult:
    """Stream the statistics into `<out>.partial/` (continuing an interrupted run when resuming) and rename it.

    Under a launcher every rank sweeps its share of the samples; rank 0 writes (its engine sums
    each group over the ranks first), the other ranks only compute.
    """
    from perta_stream.compute.stats.boundaries import BoundaryStore
    from perta_stream.compute.stats.streaming import EngineReport
    from perta_stream.sinks.stats_output import StatsOutput

    datasets, device_name, compute_dtype_name, plan = prepared.datasets, prepared.device, prepared.compute_dtype, prepared.plan
    inputs = sweep_inputs(config, checkpoint, source, prepared, dist)
    if not dist.is_main:
        report = sweep_other_rank(inputs)
        out, record = dist.broadcast_object(None)
        return _result(plan, Path(out), record, report, checkpoint)

    with StatsOutput(config.out, overwrite=config.overwrite, resume=config.resume, checkpoint_interval_s=config.checkpoint_interval_s) as output:
        resumed = output.open(run_identity(config, checkpoint, datasets, device_name, compute_dtype_name))
        # From here on a failure leaves `<out>.partial/` as it is: finished shards and the latest
        # resume state stay for --resume (the boundary spill directory is deleted on the way out).
        store = open_store(config, checkpoint, shape, output, resumed)
        start = resume_start(resumed, store, shape)
        kept = None
        if resumed.finished:
            where = "nothing left to compute" if store.complete else "continuing from " + ("the start" if start is None else f"the state saved at {start.position}")
            kept = f"kept {len(resumed.finished)} finished shard(s) of {output.partial} (sha256 verified), {where}"
            logger.info("resuming: %s", kept)
        BoundaryStore.remove_leftovers(output.partial)  # a killed run's spill files; never part of an output
        report = EngineReport(mean_loss=dict(resumed.mean_loss))
        hasher = TensorHasher()
        if not store.complete:
            report = sweep_and_write(inputs, store=store, output=output, start=start, hasher=hasher)
        content_sha256 = hasher.complete(checkpoint, source)
        check_inputs_unchanged({"model": source}, {"model": str(config.model)}, partial=str(output.partial), outputs=[output])
        record = stats_record(config, checkpoint, shape, datasets, device_name, compute_dtype_name, started, content_sha256)
        store.finish(record)
        out = output.commit()
        dist.broadcast_object((str(out), record))  # the other ranks return the same result
        return _result(plan, out, record, report, checkpoint, kept)


def _result(
    plan: StatsPlan, out: Path, record: StatsRecord, report: EngineReport, checkpoint: Checkpoint, resumed: str | None = None
) -> StatsResult:
    """The result of a finished sweep: where it was written, and what the engine's report saw."""
    return StatsResult(
        hub_inputs=hub_inputs({"model": checkpoint}),
        plan=plan,
        out=out,
        record=record,
        mean_loss=report.mean_loss,
        boundary_peak_ram_bytes=report.boundary_peak_ram_bytes,
        boundary_peak_disk_bytes=report.boundary_peak_disk_bytes,
        boundary_spilled=report.boundary_spilled,
        resumed=resumed,
    )


def config_only_plan(config: StatsConfig) -> StatsResult:
    """The plan of a run from the model's config.json alone (`--config-only`; a Hub model's
    config.json is fetched, nothing else), with its wall time on this machine."""
    import torch

    plan = plan_from_config(config)
    # The plan is for a GPU unless --device cpu; a machine without one measures its CPU and says so.
    device = plan.device if plan.device == "cpu" or torch.cuda.is_available() else "cpu"
    text = with_wall_time(plan, device, config.compute_dtype_on(device), [], config.out)
    if device != plan.device:
        text += " [no GPU here: the compute time is this CPU's, a GPU's is far shorter; plan with --device cpu to match]"
    return StatsResult(plan=plan, plan_text=text)


def with_wall_time(plan: StatsPlan, device: str, compute_dtype: str, read_paths: list, out: str | None) -> str:
    """The plan's text and its wall time at this machine's measured speed (dry_run_time.py)."""
    from perta_stream.pipelines.dry_run_time import measure, stats_line

    speed = measure(device=device, dtype_name=compute_dtype, num_parameters=plan.num_parameters, num_layers=plan.num_layers, read_paths=read_paths, write_to=out)
    return f"{plan.to_text()}\n{stats_line(plan, speed)}"
