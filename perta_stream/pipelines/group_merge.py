"""Merging one tensor group as soon as its statistics are complete (the one-pass unlearn's merge step).

For every tensor of the group, chunk by chunk (the merge plan's chunks): read θ_full and θ_fgt
into reused buffers (θ_0 too, unless the sweep has it loaded in a dtype that holds it exactly), take the matching slice of each statistic, run the merge kernel of
every method (one output per (method, α)), and write each output's chunk at its offset in its
shard. This is the arithmetic of `merge` (compute/merge_kernel.py, the same kernel objects and
the same chunk boundaries); the statistics are first rounded to the storage dtype the two-pass
way would have written them in (`--stats-dtype`), so both ways give the same bytes.

On a GPU the arithmetic runs where the statistics and θ_0 already are: only θ_full's and
θ_fgt's chunks go to the device and the outputs' chunks come back, through page-locked host
buffers, on a stream of its own (so the merge's waits do not wait for the sweep's queued work).
The chunks are larger there (a kernel launch per op); the kernel's ops are the CPU's, so the
bytes are the same (see compute/merge_kernel.py for the one exception, which the caller keeps on
the CPU).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from perta_stream.compute.merge_kernel import SERIAL_BLOCK_ELEMENTS, MergeKernel, NonFiniteValues, nonfinite_error
from perta_stream.compute.task_vector import LoadedDelta, covering_rows, task_vector_chunk
from perta_stream.dtypes import DTYPE_BYTES, torch_dtype
from perta_stream.plan.merge_plan import STAT_ROLES, MergePlan, TensorTask
from perta_stream.plan.one_pass_plan import DEVICE_CHUNK_ELEMENTS
from perta_stream.sinks.layered_output import LayeredModelOutput
from perta_stream.sources.byte_source import ByteSource, read_elements
from perta_stream.sources.task_vector import DeltaReader

MODEL_INPUTS = ("theta0", "full", "fgt")
# The compute dtypes that hold every value of a stored dtype exactly: a θ_0 tensor the sweep has
# loaded in one of them is used as it is instead of being read again.
_EXACT_IN = {
    "BF16": (torch.bfloat16, torch.float32, torch.float64),
    "F16": (torch.float16, torch.float32, torch.float64),
    "F32": (torch.float32, torch.float64),
    "F64": (torch.float64,),
}


def merges_in_device_chunks(device: torch.device) -> bool:
    """Whether a merge on `device` stages its inputs into device buffers, DEVICE_CHUNK_ELEMENTS at
    a time (on any device but the CPU)."""
    return device.type != "cpu"


def kernel_block_elements(device: torch.device) -> int:
    """The merge kernel's block for a merge on `device`: a whole chunk on a GPU; on the CPU,
    blocks that torch computes on the merging thread alone (SERIAL_BLOCK_ELEMENTS), since the
    merge runs between the sweep's layers, whose intra-op threads are the model's."""
    return DEVICE_CHUNK_ELEMENTS if merges_in_device_chunks(device) else SERIAL_BLOCK_ELEMENTS


@dataclass(frozen=True)
class MethodOutputs:
    """One method's kernel and its outputs, one per α in the kernel's order."""

    kernel: MergeKernel
    outputs: tuple[LayeredModelOutput, ...]


class GroupMerger:
    """Merges tensors into every output while the sweep goes on.

    Args:
        plan: the merge plan (θ_full's layout, the chunking, merge or copy per tensor).
        sources: role -> byte source of θ_0, θ_full and θ_fgt.
        methods: the kernels and outputs, per method.
        stats_dtype: the statistics' storage dtype (`F32` or `BF16`) the merge reads them in.
        device: where the kernels run (theirs, built with `kernel_block_elements(device)`); the
            statistics given to `merge` must be there.
    """

    def __init__(
        self, plan: MergePlan, sources: Mapping[str, ByteSource], methods: Sequence[MethodOutputs], *, stats_dtype: str, device: torch.device = torch.device("cpu")
    ):
        self._plan = plan
        self._sources = sources
        self._methods = tuple(methods)
        self._stats_dtype = torch_dtype(stats_dtype)
        self._tasks = {task.tensor_name: task for task in plan.tasks}
        self.device = device
        on_device = merges_in_device_chunks(device)
        self._chunk_elements = DEVICE_CHUNK_ELEMENTS if on_device else plan.chunk_elements
        widest = {role: max((t.sources[role].itemsize for t in plan.tasks if role in t.sources), default=1) for role in MODEL_INPUTS}
        out_itemsize = max((DTYPE_BYTES[t.out_dtype] for t in plan.tasks), default=4)
        count = max((len(m.outputs) for m in self._methods), default=0)

        def buffers(size: int, where: torch.device) -> torch.Tensor:
            # Page-locked on the host when a device copies from or to it (full-speed DMA).
            return torch.empty(self._chunk_elements * size, dtype=torch.uint8, device=where, pin_memory=device.type == "cuda" and where.type == "cpu")

        host = torch.device("cpu")
        self._in = {role: buffers(size, host) for role, size in widest.items()}
        self._out = [buffers(out_itemsize, host) for _ in range(count)]
        self._in_device = {role: buffers(size, device) for role, size in widest.items()} if on_device else {}
        self._out_device = [buffers(out_itemsize, device) for _ in range(count)] if on_device else []
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.bytes_read = 0
        self._deltas = DeltaReader(sources["fgt"], sources["theta0"], self._count_read) if plan.fgt_adapter is not None else None
        self._tv = torch.empty(self._chunk_elements if self._deltas is not None else 0, dtype=torch.float32, device=device)
        # θ_full = θ_0 with an adapter θ_fgt: the tensors the adapter leaves alone are written
        # from the sweep's loaded θ_0 as their group finishes, not read again up front.
        self.defers_untouched = plan.full_is_theta0 and self._deltas is not None

    def _count_read(self, nbytes: int) -> None:
        self.bytes_read += nbytes

    def swept(self, task: TensorTask) -> bool:
        """Whether the task is written as its group's statistics finish (else up front)."""
        return task.action == "merge" or (self.defers_untouched and task.reason == "not changed by the fgt adapter")

    @property
    def outputs(self) -> list[LayeredModelOutput]:
        return [output for method in self._methods for output in method.outputs]

    def copy_tasks(self) -> None:
        """Write the tensors copied from θ_full (no statistics involved) into every output."""
        for task in self._plan.copied:
            if not self.swept(task):
                self._merge_task(task, {})

    def merge(self, stats: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]], theta0_loaded: Mapping[str, torch.Tensor] | None = None) -> None:
        """Merge the tensors of one finished group.

        Args:
            stats: dataset -> tensor_name -> kind -> float32 statistic (on the merger's device), both datasets.
            theta0_loaded: θ_0's tensors of the group as the sweep loaded them (any device,
                the compute dtype); each one whose dtype holds the stored values exactly is
                used instead of reading θ_0 again.
        """
        if self._stream is None:
            self._merge_group(stats, theta0_loaded)
            return
        # The statistics and θ_0 were made on the sweep's stream; the merge's stream waits for them.
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            self._merge_group(stats, theta0_loaded)
        self._stream.synchronize()

    def _merge_group(self, stats: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]], theta0_loaded: Mapping[str, torch.Tensor] | None) -> None:
        names = sorted(set().union(*(set(per_dataset) for per_dataset in stats.values())))
        for tensor_name in names:
            task = self._tasks.get(tensor_name)
            if task is None or not self.swept(task):
                continue  # a tensor θ_full does not have, or one copied up front
            roles = {f"{dataset}.{kind}": tensors[tensor_name][kind].reshape(-1) for dataset, tensors in stats.items() for kind in tensors[tensor_name]}
            loaded = (theta0_loaded or {}).get(tensor_name)
            stored = self._plan.inputs["theta0"].tensors[tensor_name].dtype
            if loaded is not None and loaded.dtype not in _EXACT_IN.get(stored, ()):
                loaded = None
            self._merge_task(task, roles, None if loaded is None else loaded.detach().reshape(-1))

    def _merge_task(self, task: TensorTask, stat_views: Mapping[str, torch.Tensor], theta0: torch.Tensor | None = None) -> None:
        wanted = [[o for o in method.outputs if not o.has_tensor(task.tensor_name)] for method in self._methods]
        if not any(wanted):
            return
        out_itemsize = DTYPE_BYTES[task.out_dtype]
        out_dtype = torch_dtype(task.out_dtype)
        # θ_full's bytes are θ_0's when they are one checkpoint: taken from the sweep's copy too.
        full_loaded = theta0 is not None and self._plan.full_is_theta0
        skip = ("theta0",) * (theta0 is not None) + ("full",) * full_loaded
        delta = self._deltas.load(task.delta, task.shape) if task.delta is not None and self._deltas is not None else None
        if delta is not None and self.device.type != "cpu":
            delta = LoadedDelta(**{k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in vars(delta).items()})
        for start, count in self._plan.chunk_ranges(task, self._chunk_elements):
            inputs = self._read_chunk(task, start, count, skip=skip)
            merged = task.action == "merge"
            if merged and self._in_device:
                inputs = {role: self._in_device[role][: view.numel() * view.element_size()].view(view.dtype).copy_(view) for role, view in inputs.items()}
            if theta0 is not None:
                inputs["theta0"] = theta0[start : start + count].to(self.device)
                if full_loaded:
                    inputs["full"] = inputs["theta0"]
                if task.sources.get("theta0") is None:
                    inputs.pop("theta0")
            if delta is not None:
                inputs["tv"] = self._tv[:count]
                task_vector_chunk(delta, start, count, inputs["tv"], self._theta0_rows(task, delta, start, count, theta0))
            for method, targets in zip(self._methods, wanted):
                if not targets:
                    continue
                typed_outputs = [self._out[k][: count * out_itemsize].view(out_dtype) for k in range(len(method.outputs))]
                if merged:
                    chunk_inputs = dict(inputs)
                    for role in STAT_ROLES.get(method.kernel.method, ()):
                        # Rounded to the storage dtype as the two-pass way reads it from disk
                        # (a no-op copy for float32).
                        chunk_inputs[role] = stat_views[role][start : start + count].to(self._stats_dtype)
                    kernel_outputs = [buffer[: count * out_itemsize].view(out_dtype) for buffer in self._out_device] or typed_outputs
                    try:
                        method.kernel.merge_chunk(chunk_inputs, kernel_outputs[: len(method.outputs)])
                    except NonFiniteValues as exc:
                        raise nonfinite_error(task.tensor_name, exc) from None
                    if self._out_device:
                        for typed, computed in zip(typed_outputs, kernel_outputs):
                            typed.copy_(computed)
                else:
                    for typed in typed_outputs:
                        # θ_full's stored values (or θ_0's as the sweep loaded them, exact in the stored dtype).
                        typed.copy_(inputs["full"])
                for k, output in enumerate(method.outputs):
                    if output in targets:
                        output.write(task.tensor_name, start * out_itemsize, memoryview(typed_outputs[k].view(torch.uint8).numpy()))
        for targets in wanted:
            for output in targets:
                output.tensor_done(task.tensor_name)

    def _theta0_rows(self, task: TensorTask, delta: LoadedDelta, start: int, count: int, theta0: torch.Tensor | None) -> torch.Tensor | None:
        """θ_0's rows covering a chunk (DoRA, trainable tokens): from the sweep's copy, else read."""
        if not delta.needs_theta0_rows:
            return None
        first, end = covering_rows(task.shape, start, count)
        if theta0 is not None:
            return theta0.reshape(task.shape)[first:end].to(self.device)
        return self._deltas.theta0_rows(task.theta0_rows, first, end).to(self.device)

    def _read_chunk(self, task: TensorTask, start: int, count: int, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        typed: dict[str, torch.Tensor] = {}
        for role, info in task.sources.items():
            if role in skip:
                continue
            nbytes = len(read_elements(self._sources[role], info, start, count, memoryview(self._in[role].numpy())))
            self.bytes_read += nbytes
            typed[role] = self._in[role][:nbytes].view(torch_dtype(info.dtype))
        return typed

    def checkpoint(self) -> None:
        """Make what is written durable and recorded, for a resume (see LayeredModelOutput)."""
        for output in self.outputs:
            output.checkpoint()
