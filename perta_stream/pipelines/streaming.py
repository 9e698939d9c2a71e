"""The merge executor: a reader thread, the compute loop, and a writer thread, overlapped.

    reader ──(filled input buffers)──▶ compute ──(filled output buffers)──▶ writer
       ▲                                  │ ▲                                  │
       └──────── free input buffers ──────┘ └──────── free output buffers ─────┘

A fixed pool of PIPELINE_DEPTH buffer sets circulates on each side, so memory is allocated once
and stays flat. File reads (os.preadv), torch kernels and file writes all release the GIL, so the
three stages run in parallel on separate cores. Any failure in any stage stops the others and is
re-raised in the caller's thread; the writer aborts its unfinished shard.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from perta_stream.compute.merge_kernel import MergeKernel, NonFiniteValues, nonfinite_error
from perta_stream.compute.task_vector import covering_rows, task_vector_chunk
from perta_stream.dtypes import DTYPE_BYTES, torch_dtype
from perta_stream.memory import RssWatchdog
from perta_stream.plan.merge_plan import PIPELINE_DEPTH, MergePlan, OutputShard, TensorTask
from perta_stream.sinks.model_output import ModelOutput
from perta_stream.sinks.shard_writer import ShardWriter
from perta_stream.sources.byte_source import ByteSource
from perta_stream.sources.content_digest import TensorHasher
from perta_stream.sources.task_vector import DeltaReader

_POLL_S = 0.1
_DONE = object()


@dataclass(frozen=True)
class ChunkJob:
    shard_position: int
    task: TensorTask
    start: int
    count: int
    last_of_shard: bool

    @property
    def bytes_read(self) -> int:
        return sum(info.itemsize * self.count for info in self.task.sources.values())


class _Buffers:
    """Byte buffers for one chunk, one per name, each a torch uint8 tensor with a memoryview."""

    def __init__(self, sizes: dict[str, int]):
        self.tensors = {name: torch.empty(size, dtype=torch.uint8) for name, size in sizes.items()}
        self.views = {name: memoryview(t.numpy()) for name, t in self.tensors.items()}

    def typed(self, name: str, dtype: str, count: int) -> torch.Tensor:
        return self.tensors[name][: count * DTYPE_BYTES[dtype]].view(torch_dtype(dtype))


class _Stop(Exception):
    pass


def iter_jobs(plan: MergePlan, skip_shards: set[str]) -> Iterator[ChunkJob]:
    """Every chunk of every tensor of every shard still to write, in output order."""
    for position, shard in enumerate(plan.shards):
        if shard.file_name in skip_shards:
            continue
        chunks = [(task, start, count) for task in shard.tasks for start, count in plan.chunk_ranges(task)]
        for number, (task, start, count) in enumerate(chunks):
            yield ChunkJob(position, task, start, count, number == len(chunks) - 1)


def run_stream(
    plan: MergePlan,
    *,
    sources: dict[str, ByteSource],
    kernel: MergeKernel,
    outputs: Sequence[ModelOutput],
    skip_shards: set[str],
    watchdog: RssWatchdog,
    on_progress: Callable[[int], None],
    hasher: TensorHasher | None = None,
    hash_role: str | None = None,
) -> None:
    """Stream every remaining chunk from `sources` through `kernel` into `outputs`.

    With `hasher`, the reader hashes every tensor of input `hash_role` as it reads it (the
    content identity the statistics are checked against). With an adapter θ_fgt, the reader
    also reads each changed tensor's factors (sources/task_vector.py) and the compute stage
    makes the chunk's task vector from them (compute/task_vector.py).
    """
    roles = sorted({role for task in plan.tasks for role in task.sources})
    in_sizes = {role: plan.chunk_elements * max(t.sources[role].itemsize for t in plan.tasks if role in t.sources) for role in roles}
    delta_reader = None
    if plan.fgt_adapter is not None:
        in_sizes["tv"] = plan.chunk_elements * 4
        delta_reader = DeltaReader(sources["fgt"], sources["theta0"])
    out_itemsize = max(DTYPE_BYTES[t.out_dtype] for t in plan.tasks)
    out_sizes = {str(k): plan.chunk_elements * out_itemsize for k in range(len(outputs))}
    free_inputs: queue.Queue = queue.Queue()
    free_outputs: queue.Queue = queue.Queue()
    for _ in range(PIPELINE_DEPTH):
        free_inputs.put(_Buffers(in_sizes))
        free_outputs.put(_Buffers(out_sizes))
    filled: queue.Queue = queue.Queue(maxsize=PIPELINE_DEPTH)
    computed: queue.Queue = queue.Queue(maxsize=PIPELINE_DEPTH)
    stop = threading.Event()
    failures: list[BaseException] = []

    def guarded(body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except _Stop:
                pass
            except BaseException as exc:  # re-raised in the caller's thread below
                failures.append(exc)
                stop.set()

        return run

    def read_all() -> None:
        for job in iter_jobs(plan, skip_shards):
            buffers = _get(free_inputs, stop)
            prepared = None
            task = job.task
            if delta_reader is not None and task.delta is not None:
                loaded = delta_reader.load(task.delta, task.shape)
                rows = None
                if loaded.needs_theta0_rows:
                    rows = delta_reader.theta0_rows(task.theta0_rows, *covering_rows(task.shape, job.start, job.count))
                prepared = (loaded, rows)
            for role, info in job.task.sources.items():
                if role == "full" and plan.full_is_theta0 and "theta0" in job.task.sources:
                    continue  # the same bytes as θ_0's, read once
                nbytes = job.count * info.itemsize
                offset = info.begin + job.start * info.itemsize
                sources[role].read_into(info.file_name, offset, buffers.views[role][:nbytes])
                sources[role].done_with(info.file_name, offset, nbytes)
                if hasher is not None and role == hash_role:
                    hasher.update(job.task.tensor_name, buffers.views[role][:nbytes], last=offset + nbytes == info.end)
            _put(filled, (job, buffers, prepared), stop)
        _put(filled, _DONE, stop)

    def write_all() -> None:
        writers: list[ShardWriter] = []
        while True:
            item = _get(computed, stop)
            if item is _DONE:
                return
            job, buffers = item
            if not writers:
                shard: OutputShard = plan.shards[job.shard_position]
                writers = [output.begin_shard(shard.file_name, [t.out_spec for t in shard.tasks]) for output in outputs]
            nbytes = job.count * DTYPE_BYTES[job.task.out_dtype]
            for k, writer in enumerate(writers):
                writer.write(buffers.views[str(k)][:nbytes])
            free_outputs.put(buffers)
            on_progress(job.bytes_read)
            if job.last_of_shard:
                for writer, output in zip(writers, outputs):
                    output.shard_finished(writer.finish())
                writers = []

    reader = threading.Thread(target=guarded(read_all), name="perta-reader", daemon=True)
    writer = threading.Thread(target=guarded(write_all), name="perta-writer", daemon=True)
    # One intra-op thread for the kernel: the reader and the writer (which hashes every byte) keep
    # the other cores busy, and splitting its cache-sized blocks across OpenMP threads costs more in
    # synchronization than it gains, badly so when the cores are shared.
    intra_op_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reader.start()
    writer.start()
    try:
        guarded(lambda: _compute_all(kernel, filled, computed, free_inputs, free_outputs, stop, watchdog, len(outputs), plan.full_is_theta0))()
    except BaseException:
        stop.set()
        raise
    finally:
        if failures or stop.is_set():
            stop.set()
        reader.join()
        writer.join()
        torch.set_num_threads(intra_op_threads)
    if failures:
        for output in outputs:
            output.abort()
        raise failures[0]


def _compute_all(
    kernel: MergeKernel,
    filled: queue.Queue,
    computed: queue.Queue,
    free_inputs: queue.Queue,
    free_outputs: queue.Queue,
    stop: threading.Event,
    watchdog: RssWatchdog,
    output_count: int,
    full_is_theta0: bool = False,
) -> None:
    while True:
        item = _get(filled, stop)
        if item is _DONE:
            _put(computed, _DONE, stop)
            return
        job, inputs, prepared = item
        outputs = _get(free_outputs, stop)
        task = job.task
        if task.action == "merge":
            typed_inputs = {role: inputs.typed(role, info.dtype, job.count) for role, info in task.sources.items()}
            if "full" in typed_inputs and "theta0" in typed_inputs and full_is_theta0:
                typed_inputs["full"] = typed_inputs["theta0"]
            if prepared is not None:
                loaded, rows = prepared
                typed_inputs["tv"] = inputs.typed("tv", "F32", job.count)
                task_vector_chunk(loaded, job.start, job.count, typed_inputs["tv"], rows)
            typed_outputs = [outputs.typed(str(k), task.out_dtype, job.count) for k in range(output_count)]
            try:
                kernel.merge_chunk(typed_inputs, typed_outputs)
            except NonFiniteValues as exc:
                raise nonfinite_error(task.tensor_name, exc) from None
        elif task.out_dtype != task.sources["full"].dtype:
            # θ_full's values in the output dtype (a tensor the adapter leaves alone, under --out-dtype).
            source = inputs.typed("full", task.sources["full"].dtype, job.count)
            for k in range(output_count):
                outputs.typed(str(k), task.out_dtype, job.count).copy_(source)
        else:
            nbytes = job.count * task.sources["full"].itemsize
            for k in range(output_count):
                outputs.tensors[str(k)][:nbytes].copy_(inputs.tensors["full"][:nbytes])
        free_inputs.put(inputs)
        _put(computed, (job, outputs), stop)
        watchdog.check()


def _get(source: queue.Queue, stop: threading.Event):
    while True:
        if stop.is_set():
            raise _Stop
        try:
            return source.get(timeout=_POLL_S)
        except queue.Empty:
            continue


def _put(target: queue.Queue, item: object, stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise _Stop
        try:
            target.put(item, timeout=_POLL_S)
            return
        except queue.Full:
            continue
