"""`run_one_pass`: unlearning in one layer-major sweep, with no statistics directory on disk.

The two-pass way writes every statistic (a terabyte of float32 for a 70B model), then reads it
back with the three models. Nothing needs that: the sweep finishes every statistic of decoder
layer k before it touches layer k−1, so layer k of every output can be merged right there.

The recipe, top to bottom:
  1. open θ_0, θ_full, θ_fgt (and the statistics model when it is not θ_0) from their headers;
     check everything `merge` checks, the output locations, and the statistics model against θ_0,
     all problems at once                                                       (sources, plan)
  2. tokenize both data files as `stats` does; plan the sweep; `--dry-run` prints it next to
     the two-pass way's bytes, scratch disk and memory                          (plan)
  3. open (or resume) one output per (method, α); copy the tensors only θ_full has
  4. the statistics sweep (compute/stats/streaming.py, unchanged); each finished group goes to a
     background job that saves it when `--save-stats` asks, and, once the group's forget and
     retain statistics are both in, merges its tensors into every output      (pipelines/group_merge.py)
  5. finish each output as `merge` does (side files, index, card, perta_merge.json, rename)

Resume: the sweep's state is saved at its resume points (as `stats` does) once the groups before
it are merged and durably recorded in the outputs; a resumed run keeps finished shards (re-hashed)
and the recorded tensors of shards in progress, and continues from the state when the outputs
hold every tensor the state claims, else sweeps again from the start (finished shards still kept).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from perta_stream import __version__
from perta_stream.config.unlearn import STATS_METHODS, UnlearnConfig
from perta_stream.distributed import LaunchInfo
from perta_stream.errors import PertaStreamError, PlanError, UsageError
from perta_stream.memory import current_rss_bytes, format_bytes, peak_rss_bytes
from perta_stream.plan.merge_plan import MODEL_ROLES, STAT_ROLES, MergePlan, describe_plan, plan_merge
from perta_stream.plan.one_pass_plan import one_pass_outputs
from perta_stream.pipelines.one_pass_costs import MERGE_CHUNK_BYTES, config_only_comparison, merge_device, one_pass_comparison, run_reads, tau_of
from perta_stream.pipelines.stats_steps import PreparedSweep, prepare_sweep
from perta_stream.pipelines.unlearn_result import UnlearnResult
from perta_stream.plan.stats_plan import ModelShape, group_tensor_names
from perta_stream.sinks.output_dir import AtomicOutputDir, check_output_location, partial_path, remove_stale_partials
from perta_stream.sinks.run_record import MERGE_RECORD_FORMAT, MERGE_RECORD_NAME
from perta_stream.sources.content_digest import TensorHasher
from perta_stream.sources.pinned_folder import check_inputs_unchanged
from perta_stream.sources.input_location import hub_inputs, is_hub_location
from perta_stream.sources.stats_dir import STATS_FORMAT, STATS_RECORD_NAME

if TYPE_CHECKING:

    from perta_stream.compute.stats.resume_state import ResumeState
    from perta_stream.config.stats import StatsConfig
    from perta_stream.sinks.layered_output import LayeredModelOutput
    from perta_stream.sinks.model_output import ModelOutput
    from perta_stream.sinks.stats_output import ResumedRun
    from perta_stream.sinks.stats_store import StatsStore
    from perta_stream.sources.checkpoint import Checkpoint

logger = logging.getLogger(__name__)

STATE_DIR_NAME = ".perta_one_pass_state"
# A push keeps the sweep's state in the temporary folder, as `perta-one-pass-<hex>.partial`.
STATE_PREFIX = "perta-one-pass-"
NOT_SAVED = "(computed in the same pass, not saved)"


def run_one_pass(config: UnlearnConfig) -> UnlearnResult:
    """Statistics and merge in one sweep; one output per (method, α).

    Raises:
        PlanError: every problem `merge` finds from headers, the output locations, the statistics
            model not matching θ_0, all at once, before anything is written.
        ModelNotSupportedError, DatasetError, CheckpointError, WriteError: as `stats` and `merge`.
        OutputExistsError, ResumeError: an output's `.partial/` exists without `resume`, or was
            started with other inputs or options.
    """
    started = time.perf_counter()
    import torch  # noqa: F401  (imported before the baseline RSS the merge budget adds to)

    if LaunchInfo.from_env() is not None:
        raise UsageError(
            "--one-pass runs in one process (each layer's statistics of every sample must be complete before it is merged); "
            "run it without torchrun / accelerate launch, or use the two-pass way, whose statistics run under a launcher"
        )
    stats_config, stats_problems = _stats_config(config)
    if config.config_only:
        if stats_config is None:
            raise PlanError("cannot plan the one pass", stats_problems)
        comparison, stats_plan, reads = config_only_comparison(config, stats_config)
        text = f"{stats_plan.to_text()}\n{comparison.to_text()}\n{reads.to_text()}"
        return UnlearnResult((), config.save_stats, None, text, 0.0, 0.0, time.perf_counter() - started, peak_rss_bytes())
    with ExitStack() as stack:
        inputs, sources, problems = _open_models(config, stack)
        outputs = one_pass_outputs(config.out, config.methods, config.alphas)
        plan, problems = _plan(config, inputs, outputs, stats_problems + problems)
        if problems or plan is None or stats_config is None:
            raise PlanError("cannot unlearn in one pass", list(dict.fromkeys(problems)))
        for _, _, out_dir in outputs:
            if not is_hub_location(out_dir):
                AtomicOutputDir(out_dir, overwrite=config.overwrite, keep_partial=config.resume).check_partial()
        if config.save_stats:
            AtomicOutputDir(config.save_stats, overwrite=config.overwrite, keep_partial=config.resume).check_partial()
        stats_checkpoint, stats_source = inputs["stats"], sources["stats"]
        shape = ModelShape.from_config(stats_checkpoint.config, ties_embeddings=stats_checkpoint.ties_embeddings, where=f"{config.effective_stats_model}/config.json")
        prepared = prepare_sweep(stats_config, stats_checkpoint, shape)
        compute_dtype_bytes = 4 if prepared.compute_dtype == "float32" else 2
        comparison = one_pass_comparison(config, prepared.plan, plan, {n: info.shape for n, info in stats_checkpoint.tensors.items()}, compute_dtype_bytes)
        if config.dry_run:
            reads = run_reads(config, prepared.plan, plan, compute_dtype_bytes)
            text = "\n".join([prepared.plan.to_text(), describe_plan(plan), comparison.to_text(), reads.to_text()])
            return UnlearnResult((), config.save_stats, None, text, 0.0, 0.0, time.perf_counter() - started, peak_rss_bytes())
        logger.info("%s\n%s", prepared.plan.to_text(), comparison.to_text())
        kept: list[str] = []
        locations = _execute(config, stats_config, plan, inputs, sources, stats_checkpoint, stats_source, shape, prepared, outputs, started, kept)
    elapsed_s = time.perf_counter() - started
    return UnlearnResult(
        tuple(locations), config.save_stats, False if config.save_stats else None, None, elapsed_s, 0.0, elapsed_s, peak_rss_bytes(), one_pass=True,
        hub_inputs=hub_inputs({role: checkpoint for role, checkpoint in inputs.items() if role != "stats" or checkpoint is not inputs.get("theta0")}),
        resumed=tuple(kept),
    )  # fmt: skip


# ---------------------------------------------------------------- options and inputs
def _stats_config(config: UnlearnConfig) -> tuple[StatsConfig | None, list[str]]:
    """The statistics options of the sweep, as `unlearn` would give them to `stats`, or their
    problems (a missing data file, ...) to report with the others."""
    from perta_stream.config.stats import STATS_KINDS

    wanted = set(config.stat_methods) | (set(config.kinds) if config.save_stats else set())
    # Without --save-stats the sweep's resume state lives inside the first output's partial folder
    # (a push has none that outlives the run: a folder of its own in the temporary folder).
    first_out = one_pass_outputs(config.out, config.methods, config.alphas)[0][2]
    if config.save_stats:
        out = config.save_stats
    elif is_hub_location(first_out):
        out = str(Path(tempfile.gettempdir()) / f"{STATE_PREFIX}{uuid.uuid4().hex}")
    else:
        out = str(partial_path(first_out) / STATE_DIR_NAME)
    try:
        return config.stats_config(out=out, kinds=tuple(kind for kind in STATS_KINDS if kind in wanted), overwrite=config.overwrite), []
    except PlanError as exc:
        return None, list(exc.problems)


def _open_models(config: UnlearnConfig, stack: ExitStack) -> tuple[dict[str, Checkpoint], dict[str, Any], list[str]]:
    """θ_0, θ_full, θ_fgt and the statistics model (θ_0 itself unless --stats-model) from their headers."""
    from perta_stream.sources.resolve import open_checkpoint, open_model_input

    inputs: dict[str, Checkpoint] = {}
    sources: dict[str, Any] = {}
    problems: list[str] = []
    locations = dict(zip(MODEL_ROLES, (config.theta0, config.full, config.fgt)))
    if config.effective_stats_model != config.theta0:
        locations["stats"] = config.effective_stats_model
    for role, location in locations.items():
        try:
            opener = open_model_input if role == "fgt" else open_checkpoint  # θ_fgt may be a LoRA adapter
            inputs[role], sources[role] = opener(location, "stats model" if role == "stats" else role)
            stack.callback(sources[role].close)
        except PlanError as exc:
            problems.extend(exc.problems)
        except PertaStreamError as exc:
            problems.append(str(exc))
    if "stats" not in locations and "theta0" in inputs:
        inputs["stats"], sources["stats"] = inputs["theta0"], sources["theta0"]
    return inputs, sources, problems


def _plan(
    config: UnlearnConfig, inputs: dict[str, Checkpoint], outputs: tuple[tuple[str, float, str], ...], problems: list[str]
) -> tuple[MergePlan | None, list[str]]:
    """The merge plan (θ_full's layout) plus the one-pass checks: outputs, statistics model."""
    from perta_stream.errors import ModelNotSupportedError
    from perta_stream.sources.checkpoint import same_checkpoint

    folders = [out_dir for _, _, out_dir in outputs]  # apart from each other (UnlearnConfig checked)
    named = {"theta0": config.theta0, "full": config.full, "fgt": config.fgt, "forget": str(config.forget), "retain": str(config.retain)}
    if config.stats_model:
        named["stats model"] = config.stats_model
    for out_dir in folders:
        if not is_hub_location(out_dir):  # a push checks its repo when opened, before the sweep
            problems += check_output_location(out_dir, overwrite=config.overwrite, inputs=named, record=(MERGE_RECORD_NAME, MERGE_RECORD_FORMAT))
    if config.save_stats:
        problems += check_output_location(config.save_stats, overwrite=config.overwrite, inputs=named, record=(STATS_RECORD_NAME, STATS_FORMAT))
    stats = inputs.get("stats")
    if stats is not None:
        try:
            ModelShape.from_config(stats.config, ties_embeddings=stats.ties_embeddings, where=f"{stats.location}/config.json")
        except ModelNotSupportedError as exc:
            problems.append(str(exc))
    models = {role: inputs[role] for role in MODEL_ROLES if role in inputs}
    if len(models) < len(MODEL_ROLES):
        return None, problems
    plan, problems = plan_merge(
        models,
        method="tv",  # the statistics are not files here; they are checked against θ_0 below
        alphas=config.alphas,
        out_dirs=tuple(folders),
        out_dtype=config.out_dtype,
        max_shard_bytes=config.max_shard_bytes,
        max_memory_bytes=config.max_memory_bytes,
        # Small chunks: the merge step's buffers add to the sweep's memory, and the kernel works
        # in cache-sized blocks anyway (a larger chunk only saves read calls).
        chunk_bytes=MERGE_CHUNK_BYTES,
        baseline_rss_bytes=current_rss_bytes(),
        problems=problems,
        full_is_theta0=same_checkpoint(inputs["theta0"], inputs["full"]),
    )
    if plan is not None and stats is not None and stats is not inputs["theta0"]:
        mismatched = [
            task.tensor_name
            for task in plan.tasks
            if task.action == "merge" and (task.tensor_name not in stats.tensors or stats.tensors[task.tensor_name].shape != task.shape)
        ]
        if mismatched:
            problems.append(
                f"the statistics model {stats.location} does not match the models: tensor {mismatched[0]!r} is missing or shaped "
                f"differently ({len(mismatched)} tensor(s) in all); take the statistics at θ_0 or a fine-tune of it"
            )
            plan = None
    return (None if problems else plan), problems


# ---------------------------------------------------------------- the sweep
def _fingerprint(config: UnlearnConfig, plan: MergePlan, stats_identity: dict[str, Any], method: str, alpha: float) -> str:
    """What one output's bytes depend on: the statistics' identity, the inputs, the arithmetic, the layout."""
    identity = {
        "tool_version": __version__,
        "one_pass": True,
        "stats": stats_identity,
        "inputs": {role: checkpoint.header_sha256 for role, checkpoint in sorted(plan.inputs.items())},
        "input_files": {role: checkpoint.file_identity() for role, checkpoint in sorted(plan.inputs.items())},
        "method": method,
        "alpha": alpha,
        "tau": tau_of(config, method),
        "uniform_weight": config.uniform_weight,
        "fallback_weight": config.fallback_weight,
        "out_dtype": config.out_dtype,
        "shards": [[shard.file_name, [task.tensor_name for task in shard.tasks]] for shard in plan.shards],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _execute(
    config: UnlearnConfig,
    stats_config: StatsConfig,
    plan: MergePlan,
    inputs: dict[str, Checkpoint],
    sources: dict[str, Any],
    stats_checkpoint: Checkpoint,
    stats_source: Any,
    shape: ModelShape,
    prepared: dict[str, Any],
    outputs: tuple[tuple[str, float, str], ...],
    started: float,
    kept_notes: list[str],
) -> list[str]:
    """Open the outputs, sweep, finish every output; returns the output folders (and adds to
    `kept_notes` what a resume kept of each)."""
    import torch

    from perta_stream.compute.merge_kernel import MergeKernel
    from perta_stream.compute.stats.boundaries import BoundaryStore
    from perta_stream.pipelines.group_merge import GroupMerger, MethodOutputs, kernel_block_elements
    from perta_stream.pipelines.merge import finalize_output
    from perta_stream.pipelines.stats import open_store
    from perta_stream.sinks.layered_output import LayeredModelOutput
    from perta_stream.sinks.stats_output import StatsOutput
    from perta_stream.sinks.stats_record import run_identity, stats_record

    datasets, device_name, compute_dtype_name = prepared.datasets, prepared.device, prepared.compute_dtype
    stats_identity = run_identity(stats_config, stats_checkpoint, datasets, device_name, compute_dtype_name)
    layout = {shard.file_name: [task.out_spec for task in shard.tasks] for shard in plan.shards}
    with ExitStack() as stack:
        layered: dict[tuple[str, float], LayeredModelOutput] = {}
        fingerprints = []
        for method, alpha, out_dir in outputs:
            output = _model_output(config, method, alpha, out_dir)
            stack.callback(output.close)
            stack.push(_abort_on_failure(output))
            fingerprint = _fingerprint(config, plan, stats_identity, method, alpha)
            fingerprints.append(fingerprint)
            kept = output.open(fingerprint)
            if kept:
                kept_notes.append(f"{out_dir}: kept {len(kept)} of {len(plan.shards)} finished shard(s)")
            layered[(method, alpha)] = LayeredModelOutput(output, layout, fingerprint)
            stack.callback(layered[(method, alpha)].close)
        # Without --save-stats, the sweep's resume state and boundary spill live inside the
        # first output's partial folder, and go when it is committed (a push's in a temporary
        # folder, removed however the run ends).
        identity = stats_identity if config.save_stats else {**stats_identity, "one_pass_outputs": fingerprints}
        if not config.save_stats and is_hub_location(outputs[0][2]):
            remove_stale_partials(Path(stats_config.out).parent, STATE_PREFIX)  # killed pushes' states
        stats_output = stack.enter_context(
            StatsOutput(stats_config.out, overwrite=config.overwrite, resume=config.resume, checkpoint_interval_s=stats_config.checkpoint_interval_s)
        )
        resumed = stats_output.open(identity)
        if not config.save_stats and is_hub_location(outputs[0][2]):
            stack.callback(shutil.rmtree, stats_output.partial, ignore_errors=True)  # nothing resumes a push
        store = None
        if config.save_stats:
            store = open_store(stats_config, stats_checkpoint, shape, stats_output, resumed)
        merge_on = merge_device(config, device_name)
        if merge_on.type != torch.device(device_name).type:
            logger.info("merging on the CPU: with τ=%s a weight exponent is not 0.5, 1 or 2, whose powers are bitwise the same on the GPU", config.tau)
        methods = [
            MethodOutputs(
                MergeKernel(
                    method=method,
                    alphas=config.alphas,
                    tau=tau_of(config, method) or 1.0,
                    uniform_weight=config.uniform_weight,
                    fallback_weight=config.fallback_weight,
                    stat_roles=STAT_ROLES.get(method, ()),
                    allow_nonfinite=config.allow_nonfinite,
                    device=merge_on,
                    block_elements=kernel_block_elements(merge_on),
                ),
                tuple(layered[(method, alpha)] for alpha in config.alphas),
            )
            for method in config.methods
        ]
        merger = GroupMerger(plan, sources, methods, stats_dtype=stats_config.stats_dtype, device=merge_on)
        merger.copy_tasks()
        BoundaryStore.remove_leftovers(stats_output.partial)
        report: dict[str, Any] = {"mean_loss": dict(resumed.mean_loss)}
        hasher = TensorHasher()  # the statistics model's content identity, as `stats` records it
        if any(output.missing_shards() for output in layered.values()) or (store is not None and not store.complete):
            start = _usable_state(resumed, store, list(layered.values()), stats_checkpoint, shape, plan, merger.swept)
            theta0_loaded = stats_checkpoint is inputs["theta0"]  # the sweep's weights are θ_0's
            report = _sweep(stats_config, stats_checkpoint, stats_source, prepared, stats_output, store, merger, start, theta0_loaded, hasher)
        else:
            logger.info("resuming: every output shard and statistic is on disk already; finishing the outputs")
        for output in layered.values():
            missing = output.missing_shards()
            if missing:
                raise PertaStreamError(f"{output.output.location}: shards never completed: {missing[:3]}; rerun with --resume")
        content_sha256 = hasher.complete(stats_checkpoint, stats_source)
        written = [output.output for output in layered.values()]
        partials = ", ".join(str(output.partial) for output in written if hasattr(output, "partial"))
        locations = {role: checkpoint.location for role, checkpoint in inputs.items()}
        check_inputs_unchanged(sources, locations, partial=partials or None, outputs=[*written, stats_output])
        if store is not None:
            record = stats_record(stats_config, stats_checkpoint, shape, datasets, device_name, compute_dtype_name, started, content_sha256)
            store.finish(record)
            stats_output.commit()
        else:
            stats_output.close()
            shutil.rmtree(stats_output.partial, ignore_errors=True)
        locations = []
        elapsed_s = time.perf_counter() - started
        extra = {
            "one_pass": {
                "methods": list(config.methods),
                "alphas": list(config.alphas),
                "stats_saved_to": config.save_stats,
                "stats_kinds": list(stats_config.kinds),
                "stats_dtype": stats_config.stats_dtype,
                "mean_loss": report.get("mean_loss", {}),
            }
        }
        for method, alpha, out_dir in outputs:
            output = layered[(method, alpha)]
            output.close()
            output.drop_progress_record()
            # The options of the one `merge` this output is equal to (its run record says them).
            stats = (config.save_stats or NOT_SAVED) if method in STATS_METHODS else None
            merge_config = config.merge_config(out=out_dir, method=method, alphas=(alpha,), stats=stats)
            finished = output.output.finished_shards()
            records = [finished[shard.file_name] for shard in plan.shards]
            stats_content = content_sha256 if method in STAT_ROLES else None
            locations.append(finalize_output(merge_config, plan, output.output, alpha, records, sources["full"], elapsed_s, stats_content, extra))
        return locations


def _model_output(config: UnlearnConfig, method: str, alpha: float, out_dir: str) -> ModelOutput:
    """A local folder, or a Hub push (staged locally, each shard uploaded once finished, one commit)."""
    from perta_stream.sinks.model_output import LocalModelOutput

    if not is_hub_location(out_dir):
        return LocalModelOutput(out_dir, overwrite=config.overwrite, resume=config.resume)
    from perta_stream.sinks.hub_output import HubModelOutput

    stats = NOT_SAVED if method in STATS_METHODS else None
    return HubModelOutput.from_config(out_dir, config.merge_config(out=out_dir, method=method, alphas=(alpha,), stats=stats))


def _abort_on_failure(output: ModelOutput) -> Callable[..., bool]:
    """An exit callback that drops what an output has unfinished when the run fails (a push
    commits nothing and removes its staging folder)."""

    def on_exit(exc_type: type[BaseException] | None, *_: object) -> bool:
        if exc_type is not None:
            output.abort()
        return False

    return on_exit


def _usable_state(
    resumed: ResumedRun,
    store: StatsStore | None,
    outputs: list[LayeredModelOutput],
    checkpoint: Checkpoint,
    shape: ModelShape,
    plan: MergePlan,
    swept: Callable[[Any], bool],
) -> ResumeState | None:
    """The saved state to continue from, when every group it has passed is saved and merged; else None."""
    from perta_stream.compute.stats.resume_state import ResumeState, groups_before, position_name
    from perta_stream.sources.encoded_data import DATASETS

    if resumed.next_layer is None:
        return None
    passed = groups_before(resumed.next_layer, shape.num_layers)
    groups = group_tensor_names(checkpoint.tensors, shape.num_layers)
    merged = {task.tensor_name for task in plan.tasks if swept(task)}
    names = [name for group in passed for name in groups.get(group, []) if name in merged]
    stats_kept = store is None or all(store.has_group(dataset, group) for dataset in DATASETS for group in passed)
    if stats_kept and all(output.has_tensor(name) for output in outputs for name in names):
        logger.info("continuing from the state saved at %s", position_name(resumed.next_layer))
        return ResumeState(resumed.next_layer, resumed.mean_loss, resumed.tensors)
    logger.warning("what the state saved at %s claims is not all on disk; sweeping from the start (finished shards are kept)", position_name(resumed.next_layer))
    return None


class _RememberingLoader:
    """The sweep's weight loader, keeping the group it gave last: θ_0's tensors of the layer (or
    head) whose statistics finish next, so the merge step need not read them again. `wrap` gives
    it the loader to forward to (`run_engine` makes that one)."""

    def __init__(self) -> None:
        self._loader: Any = None
        self.last: dict[str, Any] = {}

    def wrap(self, loader: Any) -> "_RememberingLoader":
        self._loader = loader
        return self

    def load(self, tensor_names: Any) -> dict[str, Any]:
        self.last = self._loader.load(tensor_names)
        return self.last

    def prefetch(self, tensor_names: Any) -> None:
        self._loader.prefetch(tensor_names)


def merge_in_background(device_type: str) -> bool:
    """Whether a finished group is merged while the next one is computed.

    On CUDA, yes: a 70B layer's merge reads and writes gigabytes (minutes over 80 layers if the
    GPU waited), at the cost of one more group of host statistics. On CPU the merge is small
    next to the layer's compute, so the sweep waits for it and holds no more statistics than
    `stats` does.
    """
    return device_type != "cpu"


def _sweep(
    stats_config: StatsConfig,
    checkpoint: Checkpoint,
    source: Any,
    prepared: PreparedSweep,
    stats_output: Any,
    store: StatsStore | None,
    merger: Any,
    start: ResumeState | None,
    theta0_loaded: bool,
    hasher: TensorHasher,
) -> dict[str, Any]:
    """The statistics engine (`stats`'s set-up), with a sink that saves (optionally) and merges
    each finished group (and hashes the statistics model's tensors as they are read)."""
    from perta_stream.distributed import SINGLE_PROCESS
    from perta_stream.pipelines.stats_steps import run_engine, sweep_inputs
    from perta_stream.sinks.background_writer import BackgroundWriter
    from perta_stream.sources.encoded_data import DATASETS

    inputs = sweep_inputs(stats_config, checkpoint, source, prepared, SINGLE_PROCESS)
    held: dict[str, dict[str, tuple[dict, Callable[[], None]]]] = {}
    overlap = merge_in_background(inputs.device.type)
    # Statistics the merge takes on the device stay there; the saved copy goes through the host.
    on_host = merger.device.type == "cpu"
    loader = _RememberingLoader()

    with BackgroundWriter() as writer:

        def finished_group(dataset: str, group: str, stats: dict[str, dict[str, Any]], give_back: Callable[[], None]) -> None:
            # The engine finishes a group right after computing it with the weights it loaded last.
            theta0 = {name: tensor for name, tensor in loader.last.items() if name in stats} if theta0_loaded else {}
            if dataset == DATASETS[-1]:
                # The group's last use of the loaded weights (its job holds what it needs): freed
                # with the layer, before the engine trims the heap, as in `stats`, instead of at
                # the next load, where their pages would stay resident through the next layer.
                loader.last = {}

            def job() -> None:
                # A group is merged once both datasets' statistics are in; the forget half waits
                # (its memory with it) for the retain half, which the engine finishes next.
                try:
                    if store is not None:
                        store.write_group(dataset, group, stats if on_host else _to_host(stats))
                except BaseException:
                    give_back()
                    raise
                held.setdefault(group, {})[dataset] = (stats, give_back)
                if len(held[group]) < len(DATASETS):
                    return
                parts = held.pop(group)
                try:
                    merger.merge({name: part for name, (part, _) in parts.items()}, theta0)
                finally:
                    for _, release in parts.values():
                        release()

            writer.submit(job)
            if dataset == DATASETS[-1] and not overlap:
                writer.flush()

        def offer_state(state: ResumeState) -> None:
            # A saved state claims every group before it: saved, merged and recorded first.
            def settle() -> None:
                writer.flush()
                merger.checkpoint()

            stats_output.offer_state(state, before_save=settle)

        report = run_engine(
            inputs,
            write_group=finished_group,
            spill_parent=stats_output.partial,
            on_resume_point=offer_state,
            start=start,
            hasher=hasher,
            wrap_loader=loader.wrap,
            host_results=on_host,
        )
    logger.info(
        "boundaries: peak %s in RAM, %s on disk (%d spilled); merge step read %s",
        format_bytes(report.boundary_peak_ram_bytes),
        format_bytes(report.boundary_peak_disk_bytes),
        report.boundary_spilled,
        format_bytes(merger.bytes_read),
    )
    return {"mean_loss": dict(report.mean_loss)}


def _to_host(stats: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: {kind: tensor.cpu() for kind, tensor in kinds.items()} for name, kinds in stats.items()}
