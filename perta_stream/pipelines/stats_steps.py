"""The steps of a statistics sweep that `stats` and the one-pass unlearn share.

`prepare_sweep` (encoded data, device, plan), `plan_from_config` (a config-only plan),
`open_store` (the statistics store of an output), `sweep_inputs` and `run_engine` (the one engine
factory: weights read a group ahead, boundaries in RAM then spilled), and the two ways `stats`
drives the engine:
`sweep_and_write` on rank 0 (groups written on a background thread, resume states offered) and
`sweep_other_rank` on the ranks of a launcher that only compute.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from perta_stream.compute.stats.batching import sweep_batches
from perta_stream.config.stats import StatsConfig
from perta_stream.devices import resolve_device
from perta_stream.distributed import DistContext
from perta_stream.errors import CheckpointError
from perta_stream.memory import format_bytes
from perta_stream.plan.stats_plan import ModelShape, StatsPlan, group_tensor_names, plan_stats
from perta_stream.sinks.background_writer import BackgroundWriter
from perta_stream.sources.byte_source import ByteSource
from perta_stream.sources.checkpoint import Checkpoint
from perta_stream.sources.content_digest import TensorHasher
from perta_stream.sources.encoded_data import DATASETS, DatasetInfo, encode_datasets, estimated_lengths, load_tokenizer, pad_token_id

if TYPE_CHECKING:
    from perta_stream.compute.prompts import EncodedSample
    from perta_stream.compute.stats.resume_state import ResumeState
    from perta_stream.compute.stats.streaming import Batch, EngineReport, WeightLoader
    from perta_stream.sinks.stats_output import ResumedRun, StatsOutput
    from perta_stream.sinks.stats_store import StatsStore

logger = logging.getLogger(__name__)


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
    tokenizer = load_tokenizer(checkpoint.location)  # a Hub model's at the commit its weights are read at
    datasets = encode_datasets(config, tokenizer)
    device = resolve_device(config.device)
    lengths = {name: [len(s.input_ids) for s in data[1]] for name, data in datasets.items()}
    weight_bytes = {n: info.nbytes for n, info in checkpoint.tensors.items()}
    plan = _plan(config, shape, {n: info.shape for n, info in checkpoint.tensors.items()}, lengths, device, weight_bytes=weight_bytes)
    return PreparedSweep(tokenizer, datasets, device, config.compute_dtype_on(device), plan)


def plan_from_config(config: StatsConfig) -> StatsPlan:
    """The plan of a run from the model's config.json alone (`--config-only`): token counts
    estimated from the data's characters, tensors from the family's modules on the meta device.

    Raises:
        CheckpointError: config.json is missing or not a JSON object.
    """
    from perta_stream.compute.stats.skeleton import config_tensor_shapes

    config_path = model_config_path(config.model)
    try:
        model_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: cannot read config.json ({exc})") from None
    if not isinstance(model_config, dict):
        raise CheckpointError(f"{config_path}: config.json is not a JSON object")
    shape = ModelShape.from_config(model_config, where=str(config_path))
    lengths = {name: estimated_lengths(config, getattr(config, name)) for name in DATASETS}
    device = "cpu" if config.device == "cpu" else "cuda"
    return _plan(config, shape, config_tensor_shapes(model_config, where=str(config_path)), lengths, device, tokens_estimated=True)


def model_config_path(model: str) -> Path:
    """The config.json of `model`: a file, a folder's, or a Hub model's (fetched alone).

    Raises:
        HubError: a Hub model's config.json cannot be fetched.
    """
    if model.startswith("hf://"):
        from perta_stream.sources.hub import download_config_json

        return download_config_json(model)
    path = Path(model)
    return path / "config.json" if path.is_dir() else path


def _plan(config: StatsConfig, shape: ModelShape, shapes: dict[str, Any], lengths: dict[str, list[int]], device: str, **extra: Any) -> StatsPlan:
    return plan_stats(
        shape,
        shapes,
        lengths=lengths,
        batch_size=config.batch_size,
        kinds=config.kinds,
        stats_dtype_bytes=4 if config.stats_dtype == "F32" else 2,
        compute_dtype_bytes=4 if config.compute_dtype_on(device) == "float32" else 2,
        boundary_budget_bytes=config.boundary_budget_bytes,
        device=device,
        **extra,
    )


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


def resume_start(resumed: ResumedRun, store: StatsStore, shape: ModelShape) -> ResumeState | None:
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


@dataclass(frozen=True)
class SweepInputs:
    """What every engine of a run sweeps over: the model, its skeleton, this rank's batches, where."""

    config: StatsConfig
    checkpoint: Checkpoint
    source: ByteSource
    skeleton: Any
    batches: dict[str, list[Batch]]
    device: Any
    compute_dtype: Any
    dist: DistContext


def sweep_inputs(config: StatsConfig, checkpoint: Checkpoint, source: ByteSource, prepared: PreparedSweep, dist: DistContext) -> SweepInputs:
    """The engine's inputs for a prepared sweep: the model's skeleton, this rank's batches, the
    device and dtype as torch objects."""
    import torch

    from perta_stream.compute.stats.skeleton import build_skeleton

    skeleton = build_skeleton(
        checkpoint.config, {n: info.shape for n, info in checkpoint.tensors.items()}, ties_embeddings=checkpoint.ties_embeddings, where=str(config.model)
    )
    batches = sweep_batches(prepared.datasets, config.batch_size, pad_token_id(prepared.tokenizer), dist)
    return SweepInputs(config, checkpoint, source, skeleton, batches, torch.device(prepared.device), getattr(torch, prepared.compute_dtype), dist)


def run_engine(
    inputs: SweepInputs,
    *,
    write_group: Callable[[str, str, dict[str, dict[str, Any]], Callable[[], None]], None],
    spill_parent: Path | None,
    on_resume_point: Callable[[ResumeState], None] | None,
    start: ResumeState | None,
    hasher: TensorHasher | None,
    wrap_loader: Callable[[WeightLoader], WeightLoader] | None = None,
    host_results: bool = True,
) -> EngineReport:
    """The one engine set-up of every sweep (`stats` on every rank, the one-pass unlearn): weights
    read (and hashed) a group ahead, boundaries in RAM then spilled, each finished group handed to
    `write_group`. `wrap_loader` may wrap the weight loader the engine uses; `host_results` as in
    StreamingStatsEngine."""
    from perta_stream.compute.stats.boundaries import BoundaryStore
    from perta_stream.compute.stats.streaming import StreamingStatsEngine
    from perta_stream.sources.layer_weights import ModuleWeightLoader

    config, device, dtype = inputs.config, inputs.device, inputs.compute_dtype
    with ModuleWeightLoader(inputs.checkpoint, inputs.source, device=device, dtype=dtype, hasher=hasher) as loader, BoundaryStore(
        config.boundary_budget_bytes, spill_parent=spill_parent
    ) as boundaries:
        engine = StreamingStatsEngine(
            inputs.skeleton, loader if wrap_loader is None else wrap_loader(loader), boundaries, write_group,
            kinds=config.kinds, device=device, compute_dtype=dtype, dist=inputs.dist, on_resume_point=on_resume_point,
            host_results=host_results,
        )  # fmt: skip
        return engine.run(inputs.batches, start=start)


def sweep_and_write(inputs: SweepInputs, *, store: StatsStore, output: StatsOutput, start: ResumeState | None, hasher: TensorHasher) -> EngineReport:
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
            inputs,
            write_group=write_group,
            spill_parent=output.partial,
            on_resume_point=None if inputs.dist.is_distributed else offer_state,
            start=start,
            hasher=hasher,
        )
    logger.info(
        "boundaries: peak %s in RAM, %s on disk (%d spilled)",
        format_bytes(report.boundary_peak_ram_bytes),
        format_bytes(report.boundary_peak_disk_bytes),
        report.boundary_spilled,
    )
    return report


def sweep_other_rank(inputs: SweepInputs) -> EngineReport:
    """A rank > 0 of a launched run: the same sweep over its own share of the samples.

    Its engine sums every group with the other ranks' and leaves the writing to rank 0; this rank
    touches no output and spills boundaries to the system temp folder.
    """
    return run_engine(inputs, write_group=_rank_zero_writes, spill_parent=None, on_resume_point=None, start=None, hasher=None)


def _rank_zero_writes(dataset: str, group: str, stats: dict[str, dict[str, Any]], give_back: Callable[[], None]) -> None:
    raise AssertionError(f"rank > 0 was asked to write {dataset} {group}; only rank 0 writes statistics")
