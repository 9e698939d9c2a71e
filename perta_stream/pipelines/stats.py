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

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from perta_stream.compute.stats.batching import make_batches, rank_share
from perta_stream.config.stats import StatsConfig
from perta_stream.devices import resolve_device
from perta_stream.distributed import DistContext, distributed
from perta_stream.errors import CheckpointError, PlanError, UsageError
from perta_stream.memory import format_bytes
from perta_stream.plan.stats_plan import ModelShape, StatsPlan, group_tensor_names, plan_stats
from perta_stream.sinks.background_writer import BackgroundWriter
from perta_stream.sinks.output_dir import AtomicOutputDir, check_output_location
from perta_stream.sinks.stats_record import run_identity, stats_record
from perta_stream.sources.byte_source import ByteSource
from perta_stream.sources.checkpoint import Checkpoint
from perta_stream.sources.content_digest import TensorHasher
from perta_stream.sources.encoded_data import DATASETS, DatasetInfo, encode_dataset, estimated_lengths, load_tokenizer, pad_token_id
from perta_stream.sources.stats_dir import STATS_FORMAT, STATS_RECORD_NAME

if TYPE_CHECKING:
    from perta_stream.compute.prompts import EncodedSample
    from perta_stream.compute.stats.resume_state import ResumeState
    from perta_stream.compute.stats.streaming import Batch, EngineReport
    from perta_stream.sinks.stats_output import ResumedRun, StatsOutput
    from perta_stream.sinks.stats_store import StatsStore

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class StatsResult:
    """What `run_stats` did: the plan text for a dry run, else the output and its record."""

    plan: StatsPlan
    plan_text: str | None = None
    out: Path | None = None
    record: dict[str, Any] = field(default_factory=dict)
    mean_loss: dict[str, float] = field(default_factory=dict)
    boundary_peak_ram_bytes: int = 0
    boundary_peak_disk_bytes: int = 0
    boundary_spilled: int = 0

    def summary(self) -> str:
        if self.out is None:
            return self.plan_text or ""
        losses = "".join(f", {name} loss {value:.4f}" for name, value in self.mean_loss.items()).removeprefix(", ")
        return (
            f"wrote statistics ({','.join(self.record['kinds'])}) to {self.out}{': ' if losses else ''}{losses}; "
            f"{self.record['elapsed_s']:.1f} s, peak RSS {format_bytes(self.record['peak_rss_bytes'])}"
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
        tokenizer, datasets, device, compute_dtype_name, plan = prepared.tokenizer, prepared.datasets, prepared.device, prepared.compute_dtype, prepared.plan
        if config.dry_run:
            return StatsResult(plan=plan, plan_text=plan.to_text())
        logger.info("%s", plan.to_text())
        # Under torchrun / accelerate launch: one process per GPU, the samples split across them.
        with distributed(device_type=device) as dist:
            if dist.is_distributed and config.resume:
                raise UsageError(
                    "--resume runs in one process (under a launcher each rank's saved gradients would be only its share "
                    f"of the samples); rerun the command without the launcher to resume {config.out}.partial, keeping its "
                    "finished shards, or delete that folder to start over"
                )
            return _compute(config, checkpoint, source, shape, tokenizer, datasets, device, compute_dtype_name, plan, started, dist)
    finally:
        source.close()


@dataclass(frozen=True)
class PreparedSweep:
    """What a sweep needs before it starts: tokenizer, encoded data, device, compute dtype, plan."""

    tokenizer: Any
    datasets: dict[str, tuple[DatasetInfo, list[EncodedSample]]]
    device: str
    compute_dtype: str
    plan: StatsPlan


def prepare_sweep(config: StatsConfig, checkpoint: Checkpoint, shape: ModelShape) -> PreparedSweep:
    """Encode both data files and plan the sweep (shared by `stats` and the one-pass unlearn).

    Raises:
        CheckpointError: no tokenizer. DatasetError: a bad data file. UsageError: no such device.
    """
    tokenizer = load_tokenizer(config.model)
    datasets = {name: encode_dataset(config, getattr(config, name), tokenizer) for name in DATASETS}
    device = resolve_device(config.device)
    compute_dtype_name = config.compute_dtype_on(device)
    plan = plan_stats(
        shape,
        {n: info.shape for n, info in checkpoint.tensors.items()},
        lengths={name: [len(s.input_ids) for s in data[1]] for name, data in datasets.items()},
        batch_size=config.batch_size,
        kinds=config.kinds,
        stats_dtype_bytes=4 if config.stats_dtype == "F32" else 2,
        compute_dtype_bytes=4 if compute_dtype_name == "float32" else 2,
        boundary_budget_bytes=config.boundary_budget_bytes,
        device=device,
        weight_bytes={n: info.nbytes for n, info in checkpoint.tensors.items()},
    )
    return PreparedSweep(tokenizer, datasets, device, compute_dtype_name, plan)


def _compute(
    config: StatsConfig,
    checkpoint: Checkpoint,
    source: ByteSource,
    shape: ModelShape,
    tokenizer: Any,
    datasets: dict[str, tuple[DatasetInfo, list[EncodedSample]]],
    device_name: str,
    compute_dtype_name: str,
    plan: StatsPlan,
    started: float,
    dist: DistContext,
) -> StatsResult:
    """Stream the statistics into `<out>.partial/` (continuing an interrupted run when resuming) and rename it.

    Under a launcher every rank sweeps its share of the samples; rank 0 writes (its engine sums
    each group over the ranks first), the other ranks run `_compute_rank`.
    """
    import torch

    from perta_stream.compute.stats.boundaries import BoundaryStore
    from perta_stream.compute.stats.skeleton import build_skeleton
    from perta_stream.compute.stats.streaming import EngineReport
    from perta_stream.sinks.stats_output import StatsOutput

    device = torch.device(device_name)
    compute_dtype = getattr(torch, compute_dtype_name)
    skeleton = build_skeleton(
        checkpoint.config, {n: info.shape for n, info in checkpoint.tensors.items()}, ties_embeddings=checkpoint.ties_embeddings, where=str(config.model)
    )
    pad_id = pad_token_id(tokenizer)
    shares = {name: rank_share(samples, dist) for name, (_, samples) in datasets.items()}
    if dist.is_distributed:
        logger.info("rank %d of %d sweeps %s", dist.rank, dist.world_size, ", ".join(f"{len(share)} {name} samples" for name, share in shares.items()))
    batches = {name: make_batches(name, share, config.batch_size, pad_id) for name, share in shares.items()}
    if not dist.is_main:
        return _compute_rank(config, checkpoint, source, skeleton, batches, device, compute_dtype, plan, dist)

    with StatsOutput(config.out, overwrite=config.overwrite, resume=config.resume, checkpoint_interval_s=config.checkpoint_interval_s) as output:
        resumed = output.open(run_identity(config, checkpoint, datasets, device_name, compute_dtype_name))
        # From here on a failure leaves `<out>.partial/` as it is: finished shards and the latest
        # resume state stay for --resume (the boundary spill directory is deleted on the way out).
        store = open_store(config, checkpoint, shape, output, resumed)
        start = _resume_start(resumed, store, shape)
        if resumed.finished:
            where = "nothing left to compute" if store.complete else "continuing from " + ("the start" if start is None else f"the state saved at {start.position}")
            logger.info("resuming %s: %d shards kept, %s", output.partial, len(resumed.finished), where)
        BoundaryStore.remove_leftovers(output.partial)  # a killed run's spill files; never part of an output
        report = EngineReport(mean_loss=dict(resumed.mean_loss))
        hasher = TensorHasher()
        if not store.complete:
            report = _sweep(config, checkpoint, source, skeleton, batches, device, compute_dtype, store, output, start, dist, hasher)
        record = stats_record(config, checkpoint, shape, datasets, device_name, compute_dtype_name, started, hasher.complete(checkpoint, source))
        store.finish(record)
        out = output.commit()
        dist.broadcast_object((str(out), record))  # the other ranks return the same result
        return _result(plan, out, record, report)


def open_store(config: StatsConfig, checkpoint: Checkpoint, shape: ModelShape, output: StatsOutput, resumed: ResumedRun) -> StatsStore:
    """The statistics store inside `output`'s partial folder, keeping the shards a resume verified."""
    from perta_stream.sinks.stats_store import StatsStore

    return StatsStore(
        output.partial,
        datasets=DATASETS,
        kinds=config.kinds,
        groups=group_tensor_names(checkpoint.tensors, shape.num_layers),
        shapes={n: info.shape for n, info in checkpoint.tensors.items()},
        stats_dtype=config.stats_dtype,
        finished=resumed.finished,
        on_shard_finished=output.shard_finished,
    )


def _resume_start(resumed: ResumedRun, store: StatsStore, shape: ModelShape) -> ResumeState | None:
    """The saved state to continue from, or None to sweep from the start."""
    from perta_stream.compute.stats.resume_state import ResumeState, groups_before, position_name

    if resumed.next_layer is None:
        return None
    passed = groups_before(resumed.next_layer, shape.num_layers)
    if all(store.has_group(dataset, group) for dataset in DATASETS for group in passed):
        return ResumeState(resumed.next_layer, resumed.mean_loss, resumed.tensors)
    # A shard the state's position has passed is gone (damaged); only a full sweep redoes it.
    logger.warning("a shard finished before the saved state at %s is missing or damaged; recomputing from the start", position_name(resumed.next_layer))
    return None


def _sweep(
    config: StatsConfig,
    checkpoint: Checkpoint,
    source: ByteSource,
    skeleton: Any,
    batches: dict[str, list[Batch]],
    device: Any,
    compute_dtype: Any,
    store: StatsStore,
    output: StatsOutput,
    start: ResumeState | None,
    dist: DistContext,
    hasher: TensorHasher,
) -> EngineReport:
    """Rank 0's sweep: each finished group is written on a background thread, resume states are
    offered at resume points, the model's tensors are hashed as they are read."""
    with BackgroundWriter() as writer:

        def write_group(dataset: str, group: str, stats: dict[str, dict[str, Any]], give_back: Callable[[], None]) -> None:
            def job() -> None:
                try:
                    store.write_group(dataset, group, stats)
                finally:
                    give_back()

            writer.submit(job)

        def offer_state(state: ResumeState) -> None:
            # A saved state claims every group before it; those must be on disk first.
            output.offer_state(state, before_save=writer.flush)

        report = run_engine(
            config, checkpoint, source, skeleton, batches, device, compute_dtype, dist,
            write_group=write_group,
            spill_parent=output.partial,
            on_resume_point=None if dist.is_distributed else offer_state,
            start=start,
            hasher=hasher,
        )  # fmt: skip
    logger.info(
        "boundaries: peak %s in RAM, %s on disk (%d spilled)",
        format_bytes(report.boundary_peak_ram_bytes),
        format_bytes(report.boundary_peak_disk_bytes),
        report.boundary_spilled,
    )
    return report


def run_engine(
    config: StatsConfig,
    checkpoint: Checkpoint,
    source: ByteSource,
    skeleton: Any,
    batches: dict[str, list[Batch]],
    device: Any,
    compute_dtype: Any,
    dist: DistContext,
    *,
    write_group: Callable[[str, str, dict[str, dict[str, Any]], Callable[[], None]], None],
    spill_parent: Path | None,
    on_resume_point: Callable[[ResumeState], None] | None,
    start: ResumeState | None,
    hasher: TensorHasher | None,
) -> EngineReport:
    """The one engine set-up of every sweep (rank 0, other ranks, the one-pass unlearn): weights
    read (and hashed) a group ahead, boundaries in RAM then spilled, each finished group handed
    to `write_group`."""
    from perta_stream.compute.stats.boundaries import BoundaryStore
    from perta_stream.compute.stats.streaming import StreamingStatsEngine
    from perta_stream.sources.layer_weights import ModuleWeightLoader

    with ModuleWeightLoader(checkpoint, source, device=device, dtype=compute_dtype, hasher=hasher) as loader, BoundaryStore(
        config.boundary_budget_bytes, spill_parent=spill_parent
    ) as boundaries:
        engine = StreamingStatsEngine(
            skeleton, loader, boundaries, write_group,
            kinds=config.kinds, device=device, compute_dtype=compute_dtype, dist=dist, on_resume_point=on_resume_point,
        )  # fmt: skip
        return engine.run(batches, start=start)


def _compute_rank(
    config: StatsConfig,
    checkpoint: Checkpoint,
    source: ByteSource,
    skeleton: Any,
    batches: dict[str, list[Batch]],
    device: Any,
    compute_dtype: Any,
    plan: StatsPlan,
    dist: DistContext,
) -> StatsResult:
    """A rank > 0 of a launched run: the same sweep over its own share of the samples.

    Its engine sums every group with the other ranks' and leaves the writing to rank 0; this rank
    touches no output and spills boundaries to the system temp folder.
    """
    report = run_engine(
        config, checkpoint, source, skeleton, batches, device, compute_dtype, dist,
        write_group=_rank_zero_writes, spill_parent=None, on_resume_point=None, start=None, hasher=None,
    )  # fmt: skip
    out, record = dist.broadcast_object(None)
    return _result(plan, Path(out), record, report)


def _result(plan: StatsPlan, out: Path, record: dict[str, Any], report: EngineReport) -> StatsResult:
    """The result of a finished sweep: where it was written, and what the engine's report saw."""
    return StatsResult(
        plan=plan,
        out=out,
        record=record,
        mean_loss=report.mean_loss,
        boundary_peak_ram_bytes=report.boundary_peak_ram_bytes,
        boundary_peak_disk_bytes=report.boundary_peak_disk_bytes,
        boundary_spilled=report.boundary_spilled,
    )


def _rank_zero_writes(dataset: str, group: str, stats: dict[str, dict[str, Any]], give_back: Callable[[], None]) -> None:
    raise AssertionError(f"rank > 0 was asked to write {dataset} {group}; only rank 0 writes statistics")


def config_only_plan(config: StatsConfig) -> StatsResult:
    config_path = Path(config.model)
    if config_path.is_dir():
        config_path = config_path / "config.json"
    try:
        model_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: cannot read config.json ({exc})") from None
    if not isinstance(model_config, dict):
        raise CheckpointError(f"{config_path}: config.json is not a JSON object")
    from perta_stream.compute.stats.skeleton import config_tensor_shapes

    shape = ModelShape.from_config(model_config, where=str(config_path))
    lengths = {name: estimated_lengths(config, getattr(config, name)) for name in DATASETS}
    device = "cpu" if config.device == "cpu" else "cuda"
    plan = plan_stats(
        shape,
        # The family's own modules on the meta device say which tensors a checkpoint stores.
        config_tensor_shapes(model_config, where=str(config_path)),
        lengths=lengths,
        batch_size=config.batch_size,
        kinds=config.kinds,
        stats_dtype_bytes=4 if config.stats_dtype == "F32" else 2,
        compute_dtype_bytes=4 if config.compute_dtype_on(device) == "float32" else 2,
        boundary_budget_bytes=config.boundary_budget_bytes,
        device=device,
        tokens_estimated=True,
    )
    return StatsResult(plan=plan, plan_text=plan.to_text())
