"""`run_merge`: open inputs -> plan -> stream -> finalize, the whole merge top to bottom."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass

from perta_stream import __version__
from perta_stream.config.merge import MergeConfig
from perta_stream.distributed import DistContext, distributed, partition_by_size
from perta_stream.errors import DistributedError, PertaStreamError, PlanError, UsageError
from perta_stream.memory import MemoryBaseline, RssWatchdog, format_bytes, peak_rss_bytes
from perta_stream.plan.merge_plan import MODEL_ROLES, STAT_ROLES, MergePlan, describe_plan, plan_merge, task_read_bytes
from perta_stream.progress import progress
from perta_stream.sinks.model_output import LocalModelOutput, ModelOutput, copy_side_files
from perta_stream.sinks.output_dir import check_output_location
from perta_stream.sinks.run_record import MERGE_RECORD_FORMAT, MERGE_RECORD_NAME, MODEL_CARD_NAME, index_json, model_card, record_json, shard_entries
from perta_stream.sinks.shard_writer import ShardRecord
from perta_stream.sources.byte_source import ByteSource
from perta_stream.sources.checkpoint import Checkpoint
from perta_stream.sources.resolve import open_model_input
from perta_stream.sources.input_location import hub_inputs, hub_summary, is_hub_location
from perta_stream.sources.content_digest import TensorHasher
from perta_stream.pipelines.stats_identity import adapter_stats_identity, check_before_commit, settled_before
from perta_stream.sources.stats_dir import StatsRecord, open_stats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeResult:
    """What a merge did.

    Attributes:
        outputs: the finished output locations, one per alpha (empty for a dry run).
        plan_text: the printed plan of a dry run, else None.
        elapsed_s, bytes_read, bytes_written, peak_rss_bytes: the run's measurements.
        copied_tensors: tensors copied from theta_full rather than merged.
        hub_inputs: `role hf://org/name@commit` of every input read from the Hub.
        baseline_rss_bytes, added_peak_rss_bytes: the RSS when the merge started, and what it added at its peak.
        kept_shards: shards a resumed run found finished and kept (verified by their sha256).
    """

    outputs: tuple[str, ...]
    plan_text: str | None
    elapsed_s: float
    bytes_read: int
    bytes_written: int
    peak_rss_bytes: int
    copied_tensors: tuple[str, ...]
    hub_inputs: tuple[str, ...] = ()
    baseline_rss_bytes: int = 0
    added_peak_rss_bytes: int = 0
    kept_shards: tuple[str, ...] = ()

    @property
    def read_gb_per_s(self) -> float:
        return self.bytes_read / 1e9 / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> str:
        where = ", ".join(self.outputs)
        resumed = f"resumed: kept {len(self.kept_shards)} finished shard(s); " if self.kept_shards else ""
        return (
            f"{resumed}merged into {where} in {self.elapsed_s:.1f} s: read {format_bytes(self.bytes_read)} "
            f"({self.read_gb_per_s:.2f} GB/s), wrote {format_bytes(self.bytes_written)}, "
            f"peak RSS {format_bytes(self.peak_rss_bytes)} ({format_bytes(self.added_peak_rss_bytes)} above the "
            f"{format_bytes(self.baseline_rss_bytes)} at the start){hub_summary(self.hub_inputs)}"
        )



def run_merge(config: MergeConfig) -> MergeResult:
    """Merge theta_full - alpha * W * (theta_fgt - theta0) into one output per alpha.

    Raises:
        PlanError: every problem with the inputs and options, found before writing anything.
        MemoryBudgetError, WriteError, CheckpointError: during the run; outputs are left unfinished
            (`<out>.partial/`, resumable with `resume=True`), never complete-looking.
    """
    started = time.perf_counter()
    import torch  # noqa: F401  (imported before measuring the baseline RSS the buffers add to)

    # --max-memory is what this merge may add to the memory the process holds now.
    baseline = MemoryBaseline()
    inputs, sources, problems, stats_record = _open_inputs(config)
    for out_dir in config.out_dirs:
        if not is_hub_location(out_dir):
            problems += check_output_location(
                out_dir,
                overwrite=config.overwrite,
                inputs={**{r: c.location for r, c in inputs.items()}, "stats": config.stats or ""},
                record=(MERGE_RECORD_NAME, MERGE_RECORD_FORMAT),
            )
    plan, problems = plan_merge(
        inputs,
        method=config.method,
        alphas=config.alphas,
        out_dirs=config.out_dirs,
        out_dtype=config.out_dtype,
        max_shard_bytes=config.max_shard_bytes,
        max_memory_bytes=config.max_memory_bytes,
        chunk_bytes=config.chunk_bytes,
        baseline_rss_bytes=baseline.baseline_rss_bytes,
        problems=problems,
        full_is_theta0=_same_model(inputs),
    )
    try:
        if problems or plan is None:
            # Two statistics roles of one directory can report the same thing; say it once.
            raise PlanError("cannot merge", list(dict.fromkeys(problems)))
        if config.dry_run:
            from perta_stream.pipelines.dry_run_time import merge_wall_time

            text = f"{describe_plan(plan)}\n{merge_wall_time(plan)}"
            return MergeResult((), text, time.perf_counter() - started, 0, 0, peak_rss_bytes(), (), baseline_rss_bytes=baseline.baseline_rss_bytes)
        # Under torchrun / accelerate launch every rank planned the same thing from the headers;
        # the ranks then split the output shards. The merge runs on CPUs: gloo carries the records.
        with distributed(device_type="cpu") as dist:
            return _execute(config, plan, sources, started, dist, stats_record, baseline)
    finally:
        for source in sources.values():
            source.close()


def _open_inputs(config: MergeConfig) -> tuple[dict[str, Checkpoint], dict[str, ByteSource], list[str], StatsRecord | None]:
    """Every input, pinned for the run (its files opened now, read through those descriptors to
    the end), with the statistics' record as read now; problems are collected, not raised."""
    inputs: dict[str, Checkpoint] = {}
    sources: dict[str, ByteSource] = {}
    problems: list[str] = []
    for role, location in zip(MODEL_ROLES, (config.theta0, config.full, config.fgt)):
        try:
            inputs[role], sources[role] = open_model_input(location, role, drop_page_cache=config.drop_page_cache)
        except PlanError as exc:
            problems.extend(exc.problems)
        except PertaStreamError as exc:
            problems.append(str(exc))
    stats_record = None
    if config.method in STAT_ROLES and config.stats:
        stat_inputs, stat_sources, stats_record = open_stats(config.stats, STAT_ROLES[config.method], problems)
        inputs.update(stat_inputs)
        sources.update(stat_sources)
    return inputs, sources, problems, stats_record


def _same_model(inputs: dict) -> bool:
    """θ_full and θ_0 are one checkpoint (sources/checkpoint.py: same_checkpoint)."""
    from perta_stream.sources.checkpoint import same_checkpoint

    theta0, full = inputs.get("theta0"), inputs.get("full")
    return isinstance(theta0, Checkpoint) and isinstance(full, Checkpoint) and same_checkpoint(theta0, full)


def fingerprint(config: MergeConfig, plan: MergePlan) -> str:
    """Identifies what the output bytes depend on: the inputs, the arithmetic options, the layout.

    Header digests alone cannot tell two fine-tunes of one base model apart (their headers are
    identical), so each input also contributes its location and, for local files, every shard's
    size and modification time: a resume with another --fgt, or after an input was rewritten in
    place, is refused instead of mixing shards of two different merges.
    """
    identity = {
        "tool_version": __version__,
        "inputs": {role: checkpoint.header_sha256 for role, checkpoint in sorted(plan.inputs.items())},
        "input_files": {role: checkpoint.file_identity() for role, checkpoint in sorted(plan.inputs.items())},
        "method": config.method,
        "alphas": list(config.alphas),
        "tau": config.effective_tau,
        "uniform_weight": config.uniform_weight,
        "fallback_weight": config.fallback_weight,
        "out_dtype": config.out_dtype,
        "shards": [[shard.file_name, [task.tensor_name for task in shard.tasks]] for shard in plan.shards],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _make_outputs(config: MergeConfig, rank: int) -> list[ModelOutput]:
    outputs: list[ModelOutput] = []
    for out_dir in config.out_dirs:
        if is_hub_location(out_dir):
            from perta_stream.sinks.hub_output import HubModelOutput

            outputs.append(HubModelOutput.from_config(out_dir, config))
        else:
            outputs.append(LocalModelOutput(out_dir, overwrite=config.overwrite, resume=config.resume, rank=rank))
    return outputs


def _shards_of_other_ranks(plan: MergePlan, done: set[str], dist: DistContext) -> set[str]:
    """Shards still to write that other ranks own: balanced by the bytes each shard reads."""
    remaining = [shard for shard in plan.shards if shard.file_name not in done]
    sizes = [sum(info.nbytes for task in shard.tasks for info in task.sources.values()) for shard in remaining]
    owners = partition_by_size(sizes, dist.world_size)
    return {shard.file_name for shard, owner in zip(remaining, owners) if owner != dist.rank}


def _execute(
    config: MergeConfig,
    plan: MergePlan,
    sources: dict[str, ByteSource],
    started: float,
    dist: DistContext,
    stats_record: StatsRecord | None,
    baseline: MemoryBaseline,
) -> MergeResult:
    if dist.is_distributed and any(is_hub_location(out_dir) for out_dir in config.out_dirs):
        raise UsageError("--out hf://... is pushed by one process; run the merge without a launcher, or merge to a local --out under it")
    outputs = _make_outputs(config, dist.rank)
    try:
        return _merge_into(config, plan, sources, started, dist, outputs, stats_record, baseline)
    finally:
        for output in outputs:
            output.close()


def _merge_into(
    config: MergeConfig,
    plan: MergePlan,
    sources: dict[str, ByteSource],
    started: float,
    dist: DistContext,
    outputs: list[ModelOutput],
    stats_record: StatsRecord | None,
    baseline: MemoryBaseline,
) -> MergeResult:
    """Open (or resume) the outputs, stream every shard into them, and finalize them."""
    from perta_stream.compute.merge_kernel import MergeKernel
    from perta_stream.pipelines.streaming import run_stream

    run_fingerprint = fingerprint(config, plan)
    # θ_0 is not streamed with an adapter θ_fgt: its identity is settled before anything is written.
    settled = adapter_stats_identity(config, plan, sources, stats_record) if dist.is_main else None
    finished_per_output = _open_outputs(outputs, run_fingerprint, dist)
    failure = _join_outputs(outputs, run_fingerprint, dist)
    # A shard counts as done only when every output has it; the others are rewritten identically.
    done = set.intersection(*(set(finished) for finished in finished_per_output))
    skip_shards = done | _shards_of_other_ranks(plan, done, dist)
    kernel = MergeKernel(
        method=config.method,
        alphas=config.alphas,
        tau=config.effective_tau,
        uniform_weight=config.uniform_weight,
        fallback_weight=config.fallback_weight,
        stat_roles=STAT_ROLES.get(config.method, ()),
        allow_nonfinite=config.allow_nonfinite,
    )
    remaining = [task for shard in plan.shards if shard.file_name not in skip_shards for task in shard.tasks]
    remaining_bytes = sum(info.nbytes for task in remaining for info in task.sources.values())  # what the progress bar counts
    bytes_read = sum(task_read_bytes(task, plan.full_is_theta0) for task in remaining)
    # The statistics belong to one input (theta0 by default): its bytes are hashed while streamed
    # (θ_0's as θ_full's when they are one model), unless its files vouch for them (an adapter θ_fgt).
    hasher = TensorHasher() if config.method in STAT_ROLES and not settled_before(config, plan) else None
    hash_role = "full" if plan.full_is_theta0 and config.stats_at == "theta0" else config.stats_at
    if done:
        logger.info("resuming: %d of %d shards already finished", len(done), len(plan.shards))
    if dist.is_distributed:
        logger.info("rank %d of %d writes %d of %d shards", dist.rank, dist.world_size, len(plan.shards) - len(skip_shards), len(plan.shards))
    desc = f"merge [rank {dist.rank}]" if dist.is_distributed else "merge"
    sampled_peak_bytes = 0
    if failure is None:
        watchdog = RssWatchdog(plan.max_memory_bytes, baseline_bytes=plan.baseline_rss_bytes)
        with progress(total=remaining_bytes, desc=desc) as bar, watchdog:
            try:
                run_stream(
                    plan,
                    sources=sources,
                    kernel=kernel,
                    outputs=outputs,
                    skip_shards=skip_shards,
                    watchdog=watchdog,
                    on_progress=bar.update,
                    hasher=hasher,
                    hash_role=hash_role,
                )
            except BaseException as exc:
                for output in outputs:
                    output.abort()
                if not dist.is_distributed or not isinstance(exc, Exception):
                    raise
                failure = exc
        sampled_peak_bytes = watchdog.sampled_peak_bytes
    _collect_shards(outputs, failure, dist, hasher)
    elapsed_s = time.perf_counter() - started
    locations: list[str] | str = []
    if dist.is_main:
        try:
            stats_content = check_before_commit(config, plan, sources, hasher, hash_role, settled, stats_record, outputs)
            for alpha, output in zip(config.alphas, outputs):
                finished = output.finished_shards()
                records = [finished[shard.file_name] for shard in plan.shards]
                memory = baseline.record(sampled_peak_bytes)
                extra = {**memory, **(config.extra or {})}
                locations.append(finalize_output(config, plan, output, alpha, records, sources["full"], elapsed_s, stats_content, extra))
        except Exception as exc:
            if not dist.is_distributed:
                raise
            # Tell the waiting ranks, then fail here with the real error.
            dist.broadcast_object(f"rank 0 failed to finish the output: {exc}")
            raise
    locations = dist.broadcast_object(locations)
    if isinstance(locations, str):
        raise DistributedError(locations)
    return MergeResult(
        outputs=tuple(locations),
        plan_text=None,
        elapsed_s=time.perf_counter() - started,
        bytes_read=bytes_read,
        # Under a launcher, this rank's share (every rank reports its own reads and writes).
        bytes_written=sum(s.nbytes for s in plan.shards if s.file_name not in skip_shards) * len(outputs) if dist.is_distributed else plan.bytes_to_write,
        peak_rss_bytes=peak_rss_bytes(),
        copied_tensors=tuple(task.tensor_name for task in plan.copied),
        hub_inputs=hub_inputs(plan.inputs),
        baseline_rss_bytes=baseline.baseline_rss_bytes,
        added_peak_rss_bytes=baseline.added_peak_bytes(sampled_peak_bytes),
        kept_shards=tuple(shard.file_name for shard in plan.shards if shard.file_name in done),
    )


def _open_outputs(outputs: list[ModelOutput], run_fingerprint: str, dist: DistContext) -> list[dict[str, ShardRecord]]:
    """Rank 0 prepares (or resumes) each output folder and tells the others what is finished."""
    finished_per_output: list[dict[str, ShardRecord]] | str = []
    if dist.is_main:
        try:
            finished_per_output = [output.open(run_fingerprint) for output in outputs]
        except Exception as exc:
            if dist.is_distributed:
                dist.broadcast_object(f"rank 0 could not open the output: {exc}")
            raise
    finished_per_output = dist.broadcast_object(finished_per_output)
    if isinstance(finished_per_output, str):
        raise DistributedError(finished_per_output)
    return finished_per_output


def _join_outputs(outputs: list[ModelOutput], run_fingerprint: str, dist: DistContext) -> Exception | None:
    """Ranks > 0 join the folders rank 0 opened; a failure is kept to be reported to every rank."""
    if dist.is_main:
        return None
    try:
        for output in outputs:
            output.open(run_fingerprint)
    except Exception as exc:
        return exc
    return None


def _collect_shards(outputs: list[ModelOutput], failure: Exception | None, dist: DistContext, hasher: TensorHasher | None = None) -> None:
    """Every rank reports how it fared; rank 0 adopts the others' shard records (and the
    digests of the tensors they hashed).

    Every rank takes part even after its own failure, so no rank is left waiting in a collective:
    all of them raise, the failing one with its own error.

    Raises:
        the rank's own failure, or DistributedError naming the rank that failed.
    """
    if not dist.is_distributed:
        return
    reports = dist.all_gather_objects(
        {
            "error": None if failure is None else f"{type(failure).__name__}: {failure}",
            "shards": [list(o.finished_shards().values()) for o in outputs],
            "digests": {} if hasher is None else dict(hasher.digests),
        }
    )
    if failure is not None:
        raise failure
    failed = [(rank, report["error"]) for rank, report in enumerate(reports) if report["error"]]
    if failed:
        rank, message = failed[0]
        raise DistributedError(f"rank {rank} of {dist.world_size} failed ({message}); the other ranks stopped too, rerun with --resume")
    if dist.is_main:
        for k, output in enumerate(outputs):
            assert isinstance(output, LocalModelOutput)  # Hub outputs are refused under a launcher
            output.add_finished([record for report in reports[1:] for record in report["shards"][k]])
        if hasher is not None:
            for report in reports[1:]:
                hasher.add(report["digests"])


def finalize_output(
    config: MergeConfig,
    plan: MergePlan,
    output: ModelOutput,
    alpha: float,
    records: list[ShardRecord],
    full_source: ByteSource,
    elapsed_s: float,
    stats_content_sha256: str | None = None,
    extra_record: dict | None = None,
) -> str:
    """Side files, index, model card and run record, then the atomic commit.

    Shared with the one-pass unlearn, whose outputs are finished the same way; `extra_record`
    adds keys to `perta_merge.json`.
    """
    full = plan.inputs["full"]
    side_files_sha256 = copy_side_files(output, full_source, full.side_files)
    if not plan.single_file:
        weight_map = {task.tensor_name: shard.file_name for shard in plan.shards for task in shard.tasks}
        total_size = sum(shard.nbytes for shard in plan.shards)
        output.write_file("model.safetensors.index.json", index_json(weight_map, total_size))
    copied = [task.tensor_name for task in plan.copied]
    output.write_file(
        MODEL_CARD_NAME,
        model_card(
            full_location=full.location,
            method=config.method,
            alpha=alpha,
            tau=config.effective_tau if config.method in STAT_ROLES else None,
            copied=copied,
            tool_version=__version__,
        ),
    )
    record = {
        "format": MERGE_RECORD_FORMAT,
        "format_version": 1,
        "tool_version": __version__,
        "inputs": {role: {"location": c.location, "header_sha256": c.header_sha256} for role, c in plan.inputs.items()},
        "stats": config.stats,
        "stats_at": config.stats_at if config.method in STAT_ROLES else None,
        "stats_content_sha256": stats_content_sha256,
        "method": config.method,
        "alpha": alpha,
        "tau": config.effective_tau if config.method in STAT_ROLES else None,
        "uniform_weight": config.uniform_weight if config.method == "uniform" else None,
        "fallback_weight": config.fallback_weight if config.method in STAT_ROLES else None,
        "out_dtype": config.out_dtype,
        "shards": shard_entries(records),
        "copied_tensors": [{"tensor_name": t.tensor_name, "reason": t.reason} for t in plan.copied],
        "side_files": list(full.side_files),
        "side_files_sha256": side_files_sha256,
        "total_size": sum(shard.nbytes for shard in plan.shards),
        "elapsed_s": round(elapsed_s, 3),
        "bytes_read": plan.bytes_to_read,
        "read_gb_per_s": round(plan.bytes_to_read / 1e9 / elapsed_s, 3) if elapsed_s > 0 else None,
        "peak_rss_bytes": peak_rss_bytes(),
        "max_memory_bytes": config.max_memory_bytes,
        "chunk_elements": plan.chunk_elements,
        "alphas_in_pass": list(config.alphas),
        **(extra_record or {}),
    }
    output.write_file(MERGE_RECORD_NAME, record_json(record))
    return output.commit()
