"""The inspect plan: built from headers only, every problem found at once, before a byte is read.

`plan_inspect` checks that every statistics checkpoint (one or two runs, each forget and retain,
each kind W needs) and, when a task vector is given, θ_0 and θ_fgt hold the same floating-point
tensors with the same shapes, groups each tensor by layer and module kind, and sizes the chunks
from the memory budget exactly as the merge does: PIPELINE_DEPTH chunk buffers of every input in
flight, plus the rank sample (compute/rank_sample.py), whose size is fixed by the sample's target,
not by the model.

θ_fgt may be a PEFT LoRA adapter: it is checked against θ_0 as the merge checks it
(plan/adapter_plan.py), and each tensor it changes carries its `AdapterDelta`, from which the
pass makes the task vector the merge makes (pipelines/chunk_stream.py); θ_0's bytes are then read
only where that needs them (saved values, DoRA's and trainable tokens' rows).
"""

from __future__ import annotations

from dataclasses import dataclass

from perta_stream.compute.weight_figures import WeightConfig
from perta_stream.dtypes import DTYPE_BYTES, FLOATING_DTYPES
from perta_stream.plan.adapter_plan import TASK_VECTOR_BYTES_PER_ELEMENT, adapter_deltas, delta_inputs, delta_read_bytes, factor_bytes
from perta_stream.plan.merge_plan import MAX_CHUNK_ELEMENTS, MIN_CHUNK_ELEMENTS, PIPELINE_DEPTH, RUNTIME_MARGIN_BYTES, STAT_DTYPES
from perta_stream.plan.tensor_groups import TensorGroup, tensor_group
from perta_stream.sources.adapter import Adapter, AdapterDelta
from perta_stream.sources.checkpoint import Checkpoint
from perta_stream.sources.safetensors_header import TensorInfo

MODEL_ROLES = ("theta0", "fgt")
# Bytes per sampled element beyond its values (4 per quantity, held twice at the end of a tensor:
# its own sample and the model's copy): the position, the model flag and the tensor index; and
# of ranking it (argsort indices, the sorted values, two float64 rank vectors and their runs).
SAMPLE_INDEX_BYTES = 16
RANKING_BYTES = 64
# A sample is Bernoulli: its size exceeds its expectation by a few standard deviations at most.
SAMPLE_SLACK = 1.1


@dataclass(frozen=True)
class InspectTensor:
    """One tensor to inspect: where each input's bytes are, and the groups it counts in.

    With an adapter θ_fgt, `sources` holds "theta0" and "fgt" only where the adapter saved full
    values of the tensor; `delta` is what it changes (None: the task vector is 0 there) and
    `theta0_rows` θ_0's tensor when `delta` needs its rows, as in the merge's `TensorTask`.
    """

    tensor_name: str
    shape: tuple[int, ...]
    sources: dict[str, TensorInfo]
    group: TensorGroup
    delta: AdapterDelta | None = None
    theta0_rows: TensorInfo | None = None

    @property
    def numel(self) -> int:
        return next(iter(self.sources.values())).numel


@dataclass(frozen=True)
class InspectPlan:
    """Everything the measuring pass needs, and everything --dry-run shows.

    Attributes:
        inputs: role -> checkpoint (`a:forget.fisher`, ..., `theta0`, `fgt`).
        tensors: in the order of the first statistics checkpoint's shards (sequential reads).
        sides, kinds, configs: the statistics runs (`a`, and `b` when compared), the kinds read,
            the W configurations.
        task_vector: whether there is a task vector (θ_0 and θ_fgt, a model or an adapter).
        chunk_elements: elements per chunk; larger tensors are read in slices.
        bytes_to_read: input bytes read in the one pass.
        rank_sample_elements: the model's rank sample's target size.
        baseline_rss_bytes: the process's RSS when the run started.
        estimated_added_bytes, max_memory_bytes: what the run adds to it (buffers, rank sample,
            margin), and the budget that was checked against (`--max-memory`).
    """

    inputs: dict[str, Checkpoint | Adapter]
    tensors: tuple[InspectTensor, ...]
    sides: tuple[str, ...]
    kinds: tuple[str, ...]
    configs: tuple[WeightConfig, ...]
    task_vector: bool
    chunk_elements: int
    bytes_to_read: int
    rank_sample_elements: int
    baseline_rss_bytes: int
    estimated_added_bytes: int
    max_memory_bytes: int

    @property
    def estimated_peak_rss_bytes(self) -> int:
        return self.baseline_rss_bytes + self.estimated_added_bytes

    @property
    def fgt_adapter(self) -> Adapter | None:
        fgt = self.inputs.get("fgt")
        return fgt if isinstance(fgt, Adapter) else None

    @property
    def total_elements(self) -> int:
        return sum(tensor.numel for tensor in self.tensors)

    def chunk_ranges(self, tensor: InspectTensor) -> list[tuple[int, int]]:
        """(first element, element count) of each chunk of a tensor, in order."""
        numel = tensor.numel
        return [(start, min(self.chunk_elements, numel - start)) for start in range(0, numel, self.chunk_elements)] or [(0, 0)]


def plan_inspect(
    inputs: dict[str, Checkpoint | Adapter],
    *,
    sides: tuple[str, ...],
    kinds: tuple[str, ...],
    configs: tuple[WeightConfig, ...],
    sampled_quantities: int,
    rank_sample_elements: int,
    max_memory_bytes: int,
    chunk_bytes: int | None,
    baseline_rss_bytes: int,
    problems: list[str],
) -> tuple[InspectPlan | None, list[str]]:
    """Validate the inputs against each other and size the chunks.

    Args:
        inputs: role -> checkpoint: `<side>:<forget|retain>.<kind>` for every side and kind, and
            `theta0` and `fgt` for a task vector ("fgt" may be a LoRA adapter).
        sampled_quantities: how many per-element quantities the rank sample keeps.
        problems: problems found earlier (opening inputs, options); more are appended.

    Returns:
        (plan, problems): the plan is None when problems make it impossible to build.
    """
    stat_roles = [f"{side}:{dataset}.{kind}" for side in sides for kind in kinds for dataset in ("forget", "retain")]
    if not stat_roles or any(role not in inputs for role in stat_roles):
        return None, problems  # why was reported when opening them
    task_vector = all(role in inputs for role in MODEL_ROLES)
    deltas = None
    if task_vector:
        theta0, fgt = inputs["theta0"], inputs["fgt"]
        if isinstance(theta0, Adapter):
            problems.append(f"--theta0 {theta0.location} is an adapter; θ_0 must be a model: pass the model the adapter was trained on")
            return None, problems
        if isinstance(fgt, Adapter):
            deltas = adapter_deltas(fgt, theta0, problems)
    reference = inputs[stat_roles[0]]
    tensors: list[InspectTensor] = []
    # An adapter's tensors are checked against θ_0 (adapter_deltas), θ_0's against the statistics.
    model_roles = ("theta0",) if deltas is not None else MODEL_ROLES if task_vector else ()
    mismatches: dict[str, list[str]] = {role: [] for role in (*stat_roles, *model_roles)}
    for tensor_name, info in reference.tensors.items():
        sources = {stat_roles[0]: info}
        for role in mismatches:
            if role == stat_roles[0]:
                continue
            other = inputs[role].tensors.get(tensor_name)
            if other is None:
                mismatches[role].append(f"it lacks tensor {tensor_name!r}")
            elif other.shape != info.shape:
                mismatches[role].append(f"tensor {tensor_name!r} has shape {list(other.shape)}, the statistics {list(info.shape)}")
            elif other.dtype not in (STAT_DTYPES if role not in MODEL_ROLES else FLOATING_DTYPES):
                mismatches[role].append(f"tensor {tensor_name!r} is {other.dtype}, not {'F32 or BF16' if role not in MODEL_ROLES else 'a floating-point type'}")
            else:
                sources[role] = other
        if info.dtype not in STAT_DTYPES:
            mismatches[stat_roles[0]].append(f"tensor {tensor_name!r} is {info.dtype}, not F32 or BF16")
        if len(sources) == len(mismatches):
            tensors.append(_with_delta(InspectTensor(tensor_name, info.shape, sources, tensor_group(tensor_name)), deltas))
    unread = [name for name in deltas or () if name not in reference.tensors]
    if unread:
        problems.append(f"--fgt {inputs['fgt'].location} changes tensor {unread[0]!r}, which the statistics {reference.location} lack; give the statistics of θ_0")
    for role in mismatches:
        extra = [name for name, other in inputs[role].tensors.items() if name not in reference.tensors and other.dtype in FLOATING_DTYPES]
        mismatches[role] += [f"it holds tensor {name!r}, which the statistics lack" for name in extra]
    for role, found in mismatches.items():
        # One line per input: statistics or models of another architecture differ in every tensor.
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            fix = (
                "give the θ_0 and θ_fgt of the model the statistics were computed at"
                if role in MODEL_ROLES
                else "the statistics of one model hold the same tensors in every kind; recompute them with `perta-stream stats`"
            )
            what = f"--{role} {inputs[role].location}" if role in MODEL_ROLES else f"statistics {inputs[role].location}"
            problems.append(f"{what} does not match the statistics {reference.location}: {found[0]}{more}; {fix}")
    if problems:
        return None, problems
    widest: dict[str, int] = {}
    for tensor in tensors:
        for role, info in tensor.sources.items():
            widest[role] = max(widest.get(role, 0), DTYPE_BYTES[info.dtype])
    per_element = PIPELINE_DEPTH * (sum(widest.values()) + (TASK_VECTOR_BYTES_PER_ELEMENT if deltas is not None else 0))
    total = sum(tensor.numel for tensor in tensors)
    sample_elements = int(min(total, rank_sample_elements) * SAMPLE_SLACK) if sampled_quantities else 0
    sample_bytes = sample_elements * (2 * 4 * sampled_quantities + SAMPLE_INDEX_BYTES + RANKING_BYTES)
    fixed = RUNTIME_MARGIN_BYTES + sample_bytes + factor_bytes(tensor.delta for tensor in tensors if tensor.delta is not None)
    if chunk_bytes is not None:
        chunk_elements = max(1024, chunk_bytes // max(widest.values(), default=4))
    else:
        chunk_elements = min(MAX_CHUNK_ELEMENTS, max(0, max_memory_bytes - fixed) // max(per_element, 1))
        chunk_elements -= chunk_elements % 4096
    estimate = fixed + chunk_elements * per_element
    if chunk_bytes is None and chunk_elements < MIN_CHUNK_ELEMENTS:
        problems.append(
            f"--max-memory {max_memory_bytes / 2**20:.0f} MiB leaves too little room for buffers (the rank sample needs "
            f"{sample_bytes / 2**20:.0f} MiB on top of the {baseline_rss_bytes / 2**20:.0f} MiB the process holds); raise --max-memory"
        )
    elif estimate > max_memory_bytes:
        problems.append(
            f"the plan adds about {estimate / 2**20:.0f} MiB to the process, above --max-memory {max_memory_bytes / 2**20:.0f} MiB; "
            "lower --chunk-size or raise --max-memory"
        )
    if problems:
        return None, problems
    ordered = sorted(tensors, key=lambda tensor: (tensor.sources[stat_roles[0]].file_name, tensor.sources[stat_roles[0]].begin))
    plan = InspectPlan(
        inputs=inputs,
        tensors=tuple(ordered),
        sides=sides,
        kinds=kinds,
        configs=configs,
        task_vector=task_vector,
        chunk_elements=chunk_elements,
        bytes_to_read=sum(tensor_read_bytes(tensor) for tensor in tensors),
        rank_sample_elements=rank_sample_elements,
        baseline_rss_bytes=baseline_rss_bytes,
        estimated_added_bytes=estimate,
        max_memory_bytes=max_memory_bytes,
    )
    return plan, problems


def tensor_read_bytes(tensor: InspectTensor) -> int:
    """Input bytes the pass reads for one tensor: its chunks, and an adapter's factors and θ_0 rows."""
    return sum(info.nbytes for info in tensor.sources.values()) + delta_read_bytes(tensor.delta, tensor.theta0_rows, tensor.shape)


def _with_delta(tensor: InspectTensor, deltas: dict[str, AdapterDelta] | None) -> InspectTensor:
    """With an adapter θ_fgt, what the merge reads of the tensor: θ_0's and the adapter's bytes where
    it saved full values, else none of θ_0's chunks (its rows when the change needs them)."""
    if deltas is None:
        return tensor
    delta = deltas.get(tensor.tensor_name)
    chunked, theta0_rows = delta_inputs(delta, tensor.sources["theta0"])
    sources = {role: info for role, info in tensor.sources.items() if role != "theta0"}
    return InspectTensor(tensor.tensor_name, tensor.shape, {**sources, **chunked}, tensor.group, delta, theta0_rows)


def describe_inspect_plan(plan: InspectPlan) -> str:
    """The human-readable plan that --dry-run prints."""
    from perta_stream.memory import format_bytes

    lines = [f"inspect plan: {', '.join(config.label for config in plan.configs)}"]
    for role, checkpoint in plan.inputs.items():
        if isinstance(checkpoint, Adapter):
            changed = sum(1 for tensor in plan.tensors if tensor.delta is not None)
            what = f"LoRA adapter, rank {checkpoint.config.get('r')}, {changed} tensors changed"
        else:
            what = f"{len(checkpoint.shards)} shard(s)"
        lines.append(f"  input {role:<16} {checkpoint.location}  ({what}, {format_bytes(checkpoint.total_bytes)})")
    lines.append(f"  tensors: {len(plan.tensors)} ({plan.total_elements:,} elements); task vector: {'yes' if plan.task_vector else 'no'}")
    lines.append(f"  bytes to read: {format_bytes(plan.bytes_to_read)}")
    lines.append(
        f"  chunk: {plan.chunk_elements} elements; adds about {format_bytes(plan.estimated_added_bytes)} to the "
        f"{format_bytes(plan.baseline_rss_bytes)} the process holds (budget {format_bytes(plan.max_memory_bytes)} added)"
    )
    return "\n".join(lines)
