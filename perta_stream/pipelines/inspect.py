"""`run_inspect`: open the statistics (and the task vector) -> plan -> one streamed pass -> report.

Recipe, top to bottom:
1. read the statistics records, decide the W configurations (methods × τ) and open every input
   the plan needs: each statistics checkpoint, θ_0 and θ_fgt when given (θ_fgt a model or a
   PEFT LoRA adapter, whose task vector is made from its factors as the merge makes it);
2. plan from headers (every mismatch at once) and check the output folder;
3. one pass over the inputs, chunk by chunk, as the merge reads them (pipelines/inspect_stream.py):
   each tensor's figures, and θ_0's bytes hashed to check the statistics belong to it (with an
   adapter, θ_0's files vouch for it when they are those the statistics record, as in `merge`);
4. sum the figures into layers, module kinds and the model, then write `inspect.json`,
   `inspect.md` and the PNGs into `<out>.partial/`, renamed to `<out>` at the end.
`measure_inputs` is the pass alone; the matched α of sweep and unlearn uses it too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from perta_stream.compute.weight_figures import WeightConfig
from perta_stream.config.inspect import INSPECT_FORMAT, RECORD_NAME, InspectConfig
from perta_stream.errors import PertaStreamError, PlanError, StatisticsError
from perta_stream.memory import MemoryBaseline, format_bytes, peak_rss_bytes
from perta_stream.plan.inspect_plan import MODEL_ROLES, InspectPlan, describe_inspect_plan, plan_inspect
from perta_stream.sources.adapter import Adapter
from perta_stream.sources.byte_source import ByteSource
from perta_stream.sources.checkpoint import Checkpoint
from perta_stream.sources.stats_dir import StatsRecord, open_stats, read_stats_record

__all__ = ["InspectConfig", "InspectResult", "measure_inputs", "open_inputs", "run_inspect", "weight_configs"]

logger = logging.getLogger(__name__)
STAT_KINDS = ("grad", "fisher")


@dataclass(frozen=True)
class InspectResult:
    """What `run_inspect` did.

    Attributes:
        out: the finished output folder (None for a dry run).
        plan_text: the printed plan of a dry run, else None.
        effective_scales: configuration label -> the model's ‖W⊙TV‖ / ‖TV‖ (of the statistics
            given as STATS; None without a task vector).
        record: the JSON record written (empty for a dry run).
        elapsed_s, peak_rss_bytes: the run's measurements.
    """

    out: Path | None
    plan_text: str | None
    effective_scales: dict[str, float | None]
    record: dict
    elapsed_s: float
    peak_rss_bytes: int

    def summary(self) -> str:
        scales = ", ".join(f"{label} {scale:.3f}" for label, scale in self.effective_scales.items() if scale is not None)
        scales_text = f"; effective scale {scales}" if scales else ""
        return f"inspected into {self.out} in {self.elapsed_s:.1f} s (peak RSS {format_bytes(self.peak_rss_bytes)}){scales_text}"


@dataclass
class OpenedInputs:
    """The inputs of one measuring pass, opened: checkpoints, byte sources and what was decided."""

    inputs: dict[str, Checkpoint | Adapter]
    sources: dict[str, ByteSource]
    records: dict[str, StatsRecord]
    sides: tuple[str, ...]
    kinds: tuple[str, ...]
    configs: tuple[WeightConfig, ...]

    def close(self) -> None:
        for source in self.sources.values():
            source.close()


def weight_configs(methods: tuple[str, ...], taus_of, uniform_weight: float, fallback_weight: float) -> tuple[WeightConfig, ...]:
    """Every (method, τ) W configuration, methods in the order given."""
    configs: list[WeightConfig] = []
    for method in methods:
        if method in STAT_KINDS:
            configs += [WeightConfig(method, tau, fallback_weight=fallback_weight) for tau in taus_of(method)]
        else:
            configs.append(WeightConfig(method, uniform_weight=uniform_weight))
    return tuple(configs)


def open_inputs(
    stats_by_side: dict[str, str], *, methods: tuple[str, ...] | None, taus_of, uniform_weight: float, fallback_weight: float,
    theta0: str | None, fgt: str | None, problems: list[str],
) -> OpenedInputs:
    """Read the statistics records, choose the W configurations and open every input.

    `methods` None means the kinds every side's statistics hold (then uniform and tv when one run
    is inspected). Problems are appended to `problems`, not raised, so the plan lists them all.
    """
    from perta_stream.sources.resolve import open_model_input

    records: dict[str, StatsRecord] = {}
    for side, stats_dir in stats_by_side.items():
        try:
            records[side] = read_stats_record(stats_dir)
        except StatisticsError as exc:
            problems.append(str(exc))
    held = [kind for kind in STAT_KINDS if records and all(kind in record.kinds for record in records.values())]
    if methods is None:
        methods = tuple(held) + (("uniform", "tv") if len(stats_by_side) == 1 else ())
        if records and len(records) == len(stats_by_side) and not held:
            listed = "; ".join(f"{stats_by_side[side]} holds {', '.join(r.kinds) or 'no kinds'}" for side, r in records.items())
            problems.append(f"no statistics kind to inspect: {listed}; compute grad or fisher with `perta-stream stats --kinds grad,fisher`")
    kinds = tuple(kind for kind in STAT_KINDS if kind in methods)
    if len(records) == 2:
        problems += _same_model_problems(stats_by_side, records)
    opened = OpenedInputs({}, {}, records, tuple(stats_by_side), kinds, weight_configs(methods, taus_of, uniform_weight, fallback_weight))
    roles = tuple(f"{dataset}.{kind}" for kind in kinds for dataset in ("forget", "retain"))
    for side, stats_dir in stats_by_side.items():
        if side not in records or not roles:
            continue
        checkpoints, sources, pinned = open_stats(stats_dir, roles, problems)
        if pinned is not None:
            records[side] = pinned  # the record as read with the files the run reads
        opened.inputs.update({f"{side}:{role}": checkpoint for role, checkpoint in checkpoints.items()})
        opened.sources.update({f"{side}:{role}": source for role, source in sources.items()})
    for role, location in (("theta0", theta0), ("fgt", fgt)):
        if not location:
            continue
        try:
            # θ_fgt may be a LoRA adapter, read as the merge reads it (θ_0 one is refused in the plan).
            opened.inputs[role], opened.sources[role] = open_model_input(location, role)
        except PlanError as exc:
            problems.extend(exc.problems)
        except PertaStreamError as exc:
            problems.append(str(exc))
    return opened


def _same_model_problems(stats_by_side: dict[str, str], records: dict[str, StatsRecord]) -> list[str]:
    """Two statistics runs compared must be of one model (the same content digest, or header digest)."""
    a, b = records["a"].model, records["b"].model
    for name in ("content_sha256", "header_sha256"):
        first, second = getattr(a, name), getattr(b, name)
        if first and second:
            if first != second:
                return [
                    f"--compare {stats_by_side['a']} and {stats_by_side['b']} were computed at different models "
                    f"({a.location!r} and {b.location!r}); compare statistics of one model"
                ]
            return []
    return []


def measure_inputs(plan: InspectPlan, sources: dict[str, ByteSource], *, scale_only: bool, hash_role: str | None = None):
    """The one pass: every tensor's figures, the model's rank sample, and (with `hash_role`) the
    content digest of that input.

    Returns:
        (tensor figures in plan order, model rank sample, content sha256 or None).

    Raises:
        MemoryBudgetError: the process went above the plan's budget.
        NonFiniteError: a statistic or model value is NaN or infinite.
    """
    from perta_stream.compute.figure_accumulator import FigureAccumulator
    from perta_stream.compute.rank_sample import model_sample_rate
    from perta_stream.memory import RssWatchdog
    from perta_stream.pipelines.inspect_stream import measure
    from perta_stream.progress import progress
    from perta_stream.sources.content_digest import TensorHasher

    accumulator = FigureAccumulator(
        configs=plan.configs,
        sides=plan.sides,
        kinds=plan.kinds,
        task_vector=plan.task_vector,
        model_sample_rate=model_sample_rate(plan.total_elements, plan.rank_sample_elements),
        scale_only=scale_only,
    )
    hasher = TensorHasher() if hash_role else None
    with progress(total=plan.bytes_to_read, desc="inspect") as bar, RssWatchdog(plan.max_memory_bytes, baseline_bytes=plan.baseline_rss_bytes) as watchdog:
        tensors = measure(plan, sources=sources, accumulator=accumulator, watchdog=watchdog, on_progress=bar.update, hasher=hasher, hash_role=hash_role)
    content = hasher.complete(plan.inputs[hash_role], sources[hash_role]) if hasher and hash_role else None
    return tensors, accumulator.model_sample(), content


def run_inspect(config: InspectConfig) -> InspectResult:
    """Measure W of every configuration on the statistics (and task vector) and write the report.

    Raises:
        PlanError: every problem with the inputs and options, found before reading a tensor.
        StatisticsError: the task vector's θ_0 is not the model the statistics were computed at.
        MemoryBudgetError, NonFiniteError: during the pass; nothing is written then.
    """
    started = time.perf_counter()
    import torch  # noqa: F401  (imported before measuring the baseline RSS the buffers add to)

    if not config.dry_run:
        from perta_stream.sinks.plot import pyplot

        pyplot()  # the plots are drawn in this process: their library counts in the baseline too
    # --max-memory is what this run may add to the memory the process holds now.
    baseline = MemoryBaseline()
    sides = {"a": config.compare, "b": config.stats} if config.compare else {"a": config.stats}
    problems: list[str] = []
    opened = open_inputs(
        sides, methods=config.methods, taus_of=config.taus_of, uniform_weight=config.uniform_weight,
        fallback_weight=config.fallback_weight, theta0=config.theta0, fgt=config.fgt, problems=problems,
    )
    try:
        problems += _output_problems(config)
        if config.stats_at == "fgt" and isinstance(opened.inputs.get("fgt"), Adapter):
            problems.append(f"statistics cannot have been computed at the adapter --fgt {config.fgt}; pass --stats-at theta0")
        plan, problems = plan_inspect(
            opened.inputs, sides=opened.sides, kinds=opened.kinds, configs=opened.configs,
            sampled_quantities=_sampled_quantities(opened), rank_sample_elements=config.rank_sample_elements,
            max_memory_bytes=config.max_memory_bytes, chunk_bytes=config.chunk_bytes,
            baseline_rss_bytes=baseline.baseline_rss_bytes, problems=problems,
        )
        if problems or plan is None:
            raise PlanError("cannot inspect", list(dict.fromkeys(problems)))
        if config.dry_run:
            return InspectResult(None, describe_inspect_plan(plan), {}, {}, time.perf_counter() - started, peak_rss_bytes())
        hash_role = config.stats_at if plan.task_vector and config.stats_at in MODEL_ROLES else None
        by_files = _digest_by_files(plan, opened.records) if hash_role == "theta0" else None
        if hash_role == "theta0" and plan.fgt_adapter is not None and by_files is None:
            logger.info("θ_0's files are not those the statistics record; hashing θ_0 (%s) to check them", format_bytes(plan.inputs["theta0"].total_bytes))
        tensors, sample, content = measure_inputs(plan, opened.sources, scale_only=False, hash_role=None if by_files else hash_role)
        stats_check = _stats_check(config, opened.records, by_files or content, by_files=by_files is not None)
    finally:
        opened.close()
    return _write_report(config, plan, opened, tensors, sample, stats_check, started, baseline)


def _sampled_quantities(opened: OpenedInputs) -> int:
    from perta_stream.compute.figure_accumulator import rank_pairs

    return len({key for pair in rank_pairs(opened.sides, opened.kinds, opened.configs).values() for key in pair})


def _output_problems(config: InspectConfig) -> list[str]:
    from perta_stream.sinks.output_dir import check_output_location, is_own_partial, partial_path

    inputs = {"statistics": config.stats, "compared statistics": config.compare or "", "theta0": config.theta0 or "", "fgt": config.fgt or ""}
    problems = check_output_location(config.out, overwrite=config.overwrite, inputs=inputs, record=(RECORD_NAME, INSPECT_FORMAT))
    partial = partial_path(config.out)
    if problems or not (partial.exists() or partial.is_symlink()):
        return problems
    if not is_own_partial(partial):
        return [f"{partial} exists and was not made by perta-stream; it is never reused or removed: move it away, or choose another --out"]
    if not config.overwrite:
        return [f"{partial} is left from an inspect that did not finish; pass --overwrite to start over, or delete it"]
    return []


def _digest_by_files(plan: InspectPlan, records: dict[str, StatsRecord]) -> str | None:
    """θ_0's content digest without hashing it, when an adapter θ_fgt leaves θ_0 unread and its
    files are those every statistics run records (pipelines/stats_identity.py); else None."""
    from perta_stream.pipelines.stats_identity import stats_identity_by_files

    theta0 = plan.inputs["theta0"]
    if plan.fgt_adapter is None or not isinstance(theta0, Checkpoint):
        return None
    digests = {stats_identity_by_files(theta0, record) for record in records.values()}
    return digests.pop() if len(digests) == 1 and None not in digests else None


def _stats_check(config: InspectConfig, records: dict[str, StatsRecord], content: str | None, *, by_files: bool = False) -> str:
    """What was checked of the statistics' model; raises when the task vector's model is another one.

    Raises:
        StatisticsError: the statistics record a content digest that is not that of --theta0
            (or --fgt with --stats-at fgt).
    """
    if not config.task_vector:
        return "no task vector given"
    if content is None:
        return f"not checked: the statistics are recorded as computed at {config.stats_at}, which inspect does not read"
    flag = f"--{config.stats_at}"
    for side, record in records.items():
        expected = record.model.content_sha256
        if not isinstance(expected, str):
            return "not checked: the statistics record no content digest of their model (an older perta-stream wrote them)"
        if expected != content:
            where = config.compare if side == "a" and config.compare else config.stats
            raise StatisticsError(
                f"statistics {where} were computed at {record.model.location!r}, whose tensors differ from {flag} "
                f"{getattr(config, config.stats_at)} (content sha256 {expected[:12]}… there, {content[:12]}… here); give the "
                "models of the run the statistics belong to, or --stats-at fgt/full if they were computed at that model"
            )
    if by_files:
        return f"{flag}'s files are those the statistics record, known by its files without hashing (content sha256 {content[:12]}…)"
    return f"{flag}'s tensors are the ones the statistics were computed at (content sha256 {content[:12]}…)"


def _write_report(
    config: InspectConfig,
    plan: InspectPlan,
    opened: OpenedInputs,
    tensors: list,
    sample: dict,
    stats_check: str,
    started: float,
    baseline: MemoryBaseline,
) -> InspectResult:
    """Sum the figures into groups and write the record, the summary and the plots atomically."""
    from perta_stream.compute.figure_accumulator import rank_pairs
    from perta_stream.compute.figure_summary import summarize
    from perta_stream.sinks.inspect_plot import write_inspect_plots
    from perta_stream.sinks.inspect_report import inspect_markdown, inspect_record, write_inspect_report
    from perta_stream.sinks.output_dir import AtomicOutputDir

    by_name = {tensor.tensor_name: tensor for tensor in plan.tensors}
    summary = summarize(tensors, [by_name[t.tensor_name].group for t in tensors], sample, rank_pairs(plan.sides, plan.kinds, plan.configs))
    output = AtomicOutputDir(config.out, overwrite=config.overwrite)
    output.discard()  # an unfinished earlier inspect, which --overwrite was given to replace (checked in planning)
    work = output.open()
    try:
        plots = write_inspect_plots(summary, plan, work)
        record = inspect_record(
            summary, plan, config=config, records=opened.records, stats_check=stats_check, plots=[path.name for path in plots],
            elapsed_s=time.perf_counter() - started, peak_rss_bytes=peak_rss_bytes(), memory=baseline.record(),
        )
        write_inspect_report(record, inspect_markdown(summary, plan, record), work)
        final = output.commit()
    finally:
        output.release()
    return InspectResult(
        out=final,
        plan_text=None,
        effective_scales={
            weight.label: summary.model.weights[(plan.sides[-1], weight.label)].effective_scale for weight in plan.configs
        },
        record=record,
        elapsed_s=time.perf_counter() - started,
        peak_rss_bytes=peak_rss_bytes(),
    )

