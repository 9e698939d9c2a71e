"""The merge plan: built from headers only, validated completely, before a byte is written.

`plan_merge` cross-checks the three checkpoints (and the statistics), decides for every tensor
whether it is merged or copied, lays out the output shards, sizes the chunks from the memory
budget, and counts the bytes to read and write. Every problem found is collected and reported
at once as a PlanError, so a user fixes everything in one round instead of one error per run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from perta_stream.dtypes import DTYPE_BYTES, FLOATING_DTYPES
from perta_stream.plan.adapter_plan import TASK_VECTOR_BYTES_PER_ELEMENT, adapter_deltas, delta_inputs, delta_read_bytes, factor_bytes
from perta_stream.sources.adapter import Adapter, AdapterDelta
from perta_stream.sources.checkpoint import OUTPUT_EMBEDDING_NAMES, Checkpoint, describe_tying
from perta_stream.sources.safetensors_header import TensorInfo
from perta_stream.sinks.shard_writer import TensorSpec

MODEL_ROLES = ("theta0", "full", "fgt")
STAT_ROLES = {"grad": ("forget.grad", "retain.grad"), "fisher": ("forget.fisher", "retain.fisher")}
STAT_DTYPES = frozenset({"F32", "BF16"})
# Buffers in flight: one chunk being read, one computed, one queued for writing on each side.
PIPELINE_DEPTH = 3
# Room for thread stacks, the kernel's block-sized scratch, the modules the merge imports and
# allocator slack: what the merge adds besides its buffers to the RSS it starts from.
RUNTIME_MARGIN_BYTES = 48 * 2**20
MIN_CHUNK_ELEMENTS = 1 << 16
MAX_CHUNK_ELEMENTS = 1 << 24
SINGLE_SHARD_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: merged from all inputs, or copied from theta_full.

    Attributes:
        tensor_name: the state-dict key.
        action: "merge" or "copy".
        out_dtype: safetensors dtype written.
        shape: the tensor's shape.
        sources: role -> where the input bytes are (copy tasks only have "full"); with an adapter
            θ_fgt, "fgt" and "theta0" only where the adapter saved full values of the tensor.
        reason: why a tensor is copied rather than merged.
        delta: what an adapter θ_fgt changes in the tensor (its task vector), or None (dense θ_fgt).
        theta0_rows: θ_0's tensor, when `delta` needs its rows (DoRA, trainable tokens).
    """

    tensor_name: str
    action: str
    out_dtype: str
    shape: tuple[int, ...]
    sources: dict[str, TensorInfo]
    reason: str = ""
    delta: AdapterDelta | None = None
    theta0_rows: TensorInfo | None = None

    @property
    def delta_bytes(self) -> int:
        """Adapter and θ_0 bytes the task vector of this task reads besides its chunks."""
        return delta_read_bytes(self.delta, self.theta0_rows, self.shape)

    @property
    def numel(self) -> int:
        return self.sources["full"].numel

    @property
    def out_spec(self) -> TensorSpec:
        return TensorSpec(self.tensor_name, self.out_dtype, self.shape)


@dataclass(frozen=True)
class OutputShard:
    file_name: str
    tasks: tuple[TensorTask, ...]

    @property
    def nbytes(self) -> int:
        return sum(task.out_spec.nbytes for task in self.tasks)


@dataclass(frozen=True)
class MergePlan:
    """Everything the executor needs, and everything --dry-run shows.

    Attributes:
        inputs: role -> checkpoint (models and, for grad/fisher, the two statistics checkpoints).
        shards: output shards in write order (the same layout for every alpha).
        chunk_elements: elements per chunk; larger tensors are processed in slices.
        bytes_to_read: input bytes read in one pass.
        bytes_to_write: output bytes written, summed over all alphas.
        baseline_rss_bytes: the process's RSS when the merge started (torch imported, and
            whatever the caller holds).
        estimated_added_bytes: what the merge adds to it: buffers, adapter factors and margin.
        max_memory_bytes: the budget the estimate was checked against: what the merge may add
            to the baseline (`--max-memory`).
        full_is_theta0: θ_full and θ_0 are one checkpoint: a chunk both need is read once.
    """

    inputs: dict[str, Checkpoint | Adapter]
    shards: tuple[OutputShard, ...]
    chunk_elements: int
    bytes_to_read: int
    bytes_to_write: int
    baseline_rss_bytes: int
    estimated_added_bytes: int
    max_memory_bytes: int
    alphas: tuple[float, ...]
    out_dirs: tuple[str, ...]
    method: str
    warnings: tuple[str, ...] = field(default_factory=tuple)
    full_is_theta0: bool = False

    @property
    def fgt_adapter(self) -> Adapter | None:
        fgt = self.inputs.get("fgt")
        return fgt if isinstance(fgt, Adapter) else None

    @property
    def estimated_peak_rss_bytes(self) -> int:
        """The whole process's estimated peak: the baseline and what the merge adds."""
        return self.baseline_rss_bytes + self.estimated_added_bytes

    @property
    def rss_limit_bytes(self) -> int:
        """The resident memory the run may reach before the watchdog stops it: baseline + budget."""
        return self.baseline_rss_bytes + self.max_memory_bytes

    @property
    def tasks(self) -> list[TensorTask]:
        return [task for shard in self.shards for task in shard.tasks]

    @property
    def copied(self) -> list[TensorTask]:
        return [task for task in self.tasks if task.action == "copy"]

    @property
    def single_file(self) -> bool:
        return len(self.shards) == 1 and self.shards[0].file_name == SINGLE_SHARD_NAME

    def chunk_ranges(self, task: TensorTask, chunk_elements: int | None = None) -> list[tuple[int, int]]:
        """(first element, element count) of each chunk of a tensor, in order (chunks of the
        plan's size unless `chunk_elements` says otherwise)."""
        numel = task.numel
        size = chunk_elements or self.chunk_elements
        if numel == 0:
            return [(0, 0)]
        return [(start, min(size, numel - start)) for start in range(0, numel, size)]


def plan_merge(
    inputs: dict[str, Checkpoint],
    *,
    method: str,
    alphas: tuple[float, ...],
    out_dirs: tuple[str, ...],
    out_dtype: str | None,
    max_shard_bytes: int | None,
    max_memory_bytes: int,
    chunk_bytes: int | None,
    baseline_rss_bytes: int,
    problems: list[str],
    full_is_theta0: bool = False,
) -> tuple[MergePlan | None, list[str]]:
    """Validate the inputs against each other and lay out the output.

    Args:
        inputs: role -> checkpoint; roles are MODEL_ROLES plus STAT_ROLES[method] for grad/fisher;
            "fgt" may be a LoRA adapter (its task vector then comes from its factors).
        problems: problems found earlier (opening inputs, options); more are appended.
        max_memory_bytes: what the merge may add to `baseline_rss_bytes` (buffers and margin).
        baseline_rss_bytes: the process's RSS before any buffer is allocated.
        full_is_theta0: θ_full and θ_0 are the same checkpoint (read a chunk both need once).

    Returns:
        (plan, problems): the plan is None when problems make it impossible to build.
    """
    full = inputs.get("full")
    theta0, fgt = inputs.get("theta0"), inputs.get("fgt")
    if full is None or theta0 is None or fgt is None:
        return None, problems
    if isinstance(full, Adapter) or isinstance(theta0, Adapter):
        which = "full" if isinstance(full, Adapter) else "theta0"
        problems.append(
            f"--{which} {inputs[which].location} is an adapter; θ_0 must be a model, and θ_full an adapter is not supported yet: "
            "merge that adapter into its base with peft (merge_and_unload) and pass the merged model"
        )
        return None, problems
    deltas = adapter_deltas(fgt, theta0, problems) if isinstance(fgt, Adapter) else None
    tying_differs = _check_tying(inputs, problems)
    stat_roles = STAT_ROLES.get(method, ())
    if any(role not in inputs for role in stat_roles):
        # The statistics could not be opened; why was already reported. Check the models alone
        # so their problems are still listed in the same error.
        stat_roles = ()
    tasks_by_name: dict[str, TensorTask] = {}
    stat_mismatches: dict[str, list[str]] = {role: [] for role in stat_roles}
    for tensor_name, full_info in full.tensors.items():
        if deltas is not None:
            task = _plan_adapter_tensor(tensor_name, full_info, theta0, deltas, stat_roles, out_dtype, problems)
            if task is not None and task.action == "merge":
                task = _with_stats(task, inputs, stat_roles, stat_mismatches)
        else:
            task = _plan_tensor(tensor_name, full_info, inputs, stat_roles, out_dtype, problems, stat_mismatches)
        if task is not None:
            tasks_by_name[tensor_name] = task
    for role, mismatches in stat_mismatches.items():
        # One line per statistics checkpoint: statistics of another model differ in every tensor.
        if mismatches:
            more = f" (and {len(mismatches) - 1} more tensor(s))" if len(mismatches) > 1 else ""
            problems.append(
                f"statistics {role} ({inputs[role].location}) do not match the model: {mismatches[0]}{more}; "
                "recompute them for this model with `perta-stream stats` on theta0"
            )
    for checkpoint in (theta0, fgt) if deltas is None else (theta0,):
        for tensor_name in checkpoint.tensors:
            if tying_differs and tensor_name in OUTPUT_EMBEDDING_NAMES:
                continue  # already explained by the tying mismatch
            if tensor_name not in full.tensors:
                problems.append(
                    f"tensor {tensor_name!r} of {checkpoint.role} ({checkpoint.location}) is missing from full "
                    f"({full.location}); the checkpoints come from different models"
                )
    if problems:
        return None, problems
    shards = _layout(full, tasks_by_name, max_shard_bytes)
    widest = _widest_sources(tasks_by_name.values())
    input_bytes_per_element = sum(info.itemsize for info in widest)
    if deltas is not None:
        input_bytes_per_element += TASK_VECTOR_BYTES_PER_ELEMENT
    output_bytes_per_element = max((DTYPE_BYTES[t.out_dtype] for t in tasks_by_name.values()), default=4) * len(alphas)
    per_element = PIPELINE_DEPTH * (input_bytes_per_element + output_bytes_per_element)
    available = max_memory_bytes - RUNTIME_MARGIN_BYTES
    if chunk_bytes is not None:
        # --chunk-size counts the bytes of the widest input's slice of one chunk.
        chunk_elements = max(1024, chunk_bytes // max((info.itemsize for info in widest), default=4))
    else:
        chunk_elements = min(MAX_CHUNK_ELEMENTS, max(0, available) // per_element)
        chunk_elements -= chunk_elements % 4096
        # No buffer larger than the largest tensor: a small model's merge holds (and reports) little.
        largest = max((task.numel for task in tasks_by_name.values()), default=0)
        chunk_elements = min(chunk_elements, max(MIN_CHUNK_ELEMENTS, -(-largest // 4096) * 4096))
    factors = factor_bytes(t.delta for t in tasks_by_name.values() if t.delta is not None)
    available -= factors
    if chunk_bytes is None and deltas is not None:
        chunk_elements = min(chunk_elements, max(0, available) // per_element)
        chunk_elements -= chunk_elements % 4096
    added = RUNTIME_MARGIN_BYTES + chunk_elements * per_element + factors
    if chunk_elements < MIN_CHUNK_ELEMENTS and chunk_bytes is None:
        problems.append(
            f"--max-memory {max_memory_bytes / 2**20:.0f} MiB leaves too little room for buffers (they need at least "
            f"{(RUNTIME_MARGIN_BYTES + MIN_CHUNK_ELEMENTS * per_element) / 2**20:.0f} MiB on top of the "
            f"{baseline_rss_bytes / 2**20:.0f} MiB the process holds); raise --max-memory"
        )
    elif added > max_memory_bytes:
        problems.append(
            f"the plan adds about {added / 2**20:.0f} MiB to the process, above --max-memory {max_memory_bytes / 2**20:.0f} MiB; "
            "lower --chunk-size or raise --max-memory"
        )
    if problems:
        return None, problems
    bytes_to_read = sum(task_read_bytes(task, full_is_theta0) for task in tasks_by_name.values())
    bytes_to_write = sum(shard.nbytes for shard in shards) * len(alphas)
    plan = MergePlan(
        inputs=inputs,
        shards=shards,
        chunk_elements=chunk_elements,
        bytes_to_read=bytes_to_read,
        bytes_to_write=bytes_to_write,
        baseline_rss_bytes=baseline_rss_bytes,
        estimated_added_bytes=added,
        max_memory_bytes=max_memory_bytes,
        alphas=alphas,
        out_dirs=out_dirs,
        method=method,
        full_is_theta0=full_is_theta0,
    )
    return plan, problems


def task_read_bytes(task: TensorTask, full_is_theta0: bool) -> int:
    """Input bytes one task reads: its chunks (θ_0's once when θ_full is θ_0), its adapter factors and θ_0 rows."""
    chunks = sum(info.nbytes for role, info in task.sources.items() if not (full_is_theta0 and role == "full" and "theta0" in task.sources))
    return chunks + task.delta_bytes


def _plan_adapter_tensor(
    tensor_name: str,
    full_info: TensorInfo,
    theta0: Checkpoint,
    deltas: dict[str, AdapterDelta],
    stat_roles: tuple[str, ...],
    out_dtype: str | None,
    problems: list[str],
) -> TensorTask | None:
    """A tensor of θ_full when θ_fgt is θ_0 + an adapter: merged with the adapter's task vector
    where it changes the tensor, else θ_full's values (the task vector is 0 there)."""
    theta0_info = theta0.tensors.get(tensor_name)
    if theta0_info is None:
        return TensorTask(tensor_name, "copy", full_info.dtype, full_info.shape, {"full": full_info}, "only in full")
    if theta0_info.shape != full_info.shape:
        problems.append(
            f"tensor {tensor_name!r}: shape {list(theta0_info.shape)} in theta0 vs {list(full_info.shape)} in full; "
            "the checkpoints come from different architectures"
        )
        return None
    delta = deltas.get(tensor_name)
    if delta is None:
        return TensorTask(tensor_name, "copy", full_info.dtype, full_info.shape, {"full": full_info}, "not changed by the fgt adapter")
    if not (full_info.dtype in FLOATING_DTYPES and theta0_info.dtype in FLOATING_DTYPES):
        problems.append(f"tensor {tensor_name!r} is not floating-point, but the fgt adapter changes it")
        return None
    chunked, theta0_rows = delta_inputs(delta, theta0_info)
    return TensorTask(
        tensor_name, "merge", out_dtype or full_info.dtype, full_info.shape, {"full": full_info, **chunked}, delta=delta, theta0_rows=theta0_rows
    )


def _with_stats(task: TensorTask, inputs: dict, stat_roles: tuple[str, ...], stat_mismatches: dict[str, list[str]]) -> TensorTask | None:
    sources = dict(task.sources)
    for role in stat_roles:
        info = inputs[role].tensors.get(task.tensor_name)
        if info is None:
            stat_mismatches[role].append(f"they lack tensor {task.tensor_name!r}")
        elif info.shape != task.shape:
            stat_mismatches[role].append(f"tensor {task.tensor_name!r} has shape {list(info.shape)}, the model {list(task.shape)}")
        elif info.dtype not in STAT_DTYPES:
            stat_mismatches[role].append(f"tensor {task.tensor_name!r} is {info.dtype}, not F32 or BF16")
        else:
            sources[role] = info
    if any(role not in sources for role in stat_roles):
        return None
    return TensorTask(task.tensor_name, task.action, task.out_dtype, task.shape, sources, task.reason, task.delta, task.theta0_rows)


def _check_tying(inputs: dict[str, Checkpoint], problems: list[str]) -> bool:
    """Report (and return) whether the three models disagree on tying lm_head to the embedding."""
    models = [inputs[role] for role in MODEL_ROLES if isinstance(inputs[role], Checkpoint)]
    if len({m.ties_embeddings for m in models}) > 1:
        described = "; ".join(f"{m.role} ({m.location}) {describe_tying(m)}" for m in models)
        problems.append(f"tying mismatch: {described}; all three must come from the same architecture")
        return True
    return False


def _plan_tensor(
    tensor_name: str,
    full_info: TensorInfo,
    inputs: dict[str, Checkpoint],
    stat_roles: tuple[str, ...],
    out_dtype: str | None,
    problems: list[str],
    stat_mismatches: dict[str, list[str]],
) -> TensorTask | None:
    present = {role: inputs[role].tensors.get(tensor_name) for role in ("theta0", "fgt")}
    if all(info is None for info in present.values()):
        return TensorTask(tensor_name, "copy", full_info.dtype, full_info.shape, {"full": full_info}, "only in full")
    for role, info in present.items():
        if info is None:
            problems.append(
                f"tensor {tensor_name!r} is in full but missing from {role} ({inputs[role].location}); "
                "all three checkpoints must hold the same tensors"
            )
        elif info.shape != full_info.shape:
            problems.append(
                f"tensor {tensor_name!r}: shape {list(info.shape)} in {role} vs {list(full_info.shape)} in full; "
                "the checkpoints come from different architectures"
            )
    if any(info is None or info.shape != full_info.shape for info in present.values()):
        return None
    if not all(info.dtype in FLOATING_DTYPES for info in (full_info, *present.values())):
        return TensorTask(tensor_name, "copy", full_info.dtype, full_info.shape, {"full": full_info}, "not a floating-point tensor")
    sources = {"theta0": present["theta0"], "full": full_info, "fgt": present["fgt"]}
    task = TensorTask(tensor_name, "merge", out_dtype or full_info.dtype, full_info.shape, sources)
    return _with_stats(task, inputs, stat_roles, stat_mismatches)


def _widest_sources(tasks) -> list[TensorInfo]:
    widest: dict[str, TensorInfo] = {}
    for task in tasks:
        for role, info in task.sources.items():
            if role not in widest or info.itemsize > widest[role].itemsize:
                widest[role] = info
    return list(widest.values())


def _layout(full: Checkpoint, tasks_by_name: dict[str, TensorTask], max_shard_bytes: int | None) -> tuple[OutputShard, ...]:
    """theta_full's shard layout (names and membership), or greedy packing under max_shard_bytes."""
    ordered = [tasks_by_name[info.tensor_name] for shard in full.shards for info in shard.tensors.values()]
    if max_shard_bytes is None:
        if full.index_name is None:
            return (OutputShard(SINGLE_SHARD_NAME, tuple(ordered)),)
        groups = [
            (shard.file_name, tuple(tasks_by_name[name] for name in shard.tensors)) for shard in full.shards
        ]
        return tuple(OutputShard(name, tasks) for name, tasks in groups)
    packed: list[list[TensorTask]] = [[]]
    size = 0
    for task in ordered:
        nbytes = task.out_spec.nbytes
        if packed[-1] and size + nbytes > max_shard_bytes:
            packed.append([])
            size = 0
        packed[-1].append(task)
        size += nbytes
    if len(packed) == 1:
        return (OutputShard(SINGLE_SHARD_NAME, tuple(packed[0])),)
    count = len(packed)
    return tuple(
        OutputShard(f"model-{i:05d}-of-{count:05d}.safetensors", tuple(tasks)) for i, tasks in enumerate(packed, start=1)
    )


def describe_plan(plan: MergePlan) -> str:
    """The human-readable plan that --dry-run prints (stdout: it is the command's data)."""
    from perta_stream.memory import format_bytes

    lines = [f"merge plan: method {plan.method}, alpha {', '.join(f'{a:g}' for a in plan.alphas)}"]
    for role, checkpoint in plan.inputs.items():
        if isinstance(checkpoint, Adapter):
            lines.append(
                f"  input {role:<14} {checkpoint.location}  (LoRA adapter, rank {checkpoint.config.get('r')}, "
                f"{len(checkpoint.deltas)} tensors changed, {format_bytes(checkpoint.total_bytes)})"
            )
            continue
        lines.append(
            f"  input {role:<14} {checkpoint.location}  ({len(checkpoint.shards)} shard(s), "
            f"{len(checkpoint.tensors)} tensors, {format_bytes(checkpoint.total_bytes)}, {describe_tying(checkpoint)})"
        )
    merged = sum(1 for task in plan.tasks if task.action == "merge")
    lines.append(f"  tensors: {merged} merged, {len(plan.copied)} copied from full")
    for task in plan.copied:
        lines.append(f"    copied {task.tensor_name} ({task.reason})")
    for out_dir in plan.out_dirs:
        lines.append(f"  output {out_dir}: {len(plan.shards)} shard(s)")
    for shard in plan.shards:
        lines.append(f"    {shard.file_name}: {len(shard.tasks)} tensors, {format_bytes(shard.nbytes)}")
    lines.append(f"  bytes to read: {format_bytes(plan.bytes_to_read)}; bytes to write: {format_bytes(plan.bytes_to_write)}")
    lines.append(f"  chunk: {plan.chunk_elements} elements")
    lines.append(
        f"  memory: the process holds {format_bytes(plan.baseline_rss_bytes)} at the start (baseline); the merge adds about "
        f"{format_bytes(plan.estimated_added_bytes)} of a {format_bytes(plan.max_memory_bytes)} budget (--max-memory), "
        f"a peak of about {format_bytes(plan.estimated_peak_rss_bytes)}"
    )
    return "\n".join(lines)
