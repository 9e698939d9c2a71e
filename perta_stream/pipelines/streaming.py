"""The merge executor: a reader thread, the compute loop, and a writer thread, overlapped.

    reader ──(filled input buffers)──▶ compute ──(filled output buffers)──▶ writer
       ▲                                  │ ▲                                  │
       └──────── free input buffers ──────┘ └──────── free output buffers ─────┘

A fixed pool of PIPELINE_DEPTH buffer sets circulates on each side, so memory is allocated once
and stays flat. File reads (os.preadv), torch kernels and file writes all release the GIL, so the
three stages run in parallel on separate cores. Any failure in any stage stops the others and is
re-raised in the caller's thread; the writer aborts its unfinished shard. The queues, the buffers
and the reading of a chunk (an adapter's task vector included) are shared with inspect's pass
(pipelines/chunk_stream.py).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from perta_stream.compute.merge_kernel import MergeKernel, NonFiniteValues, nonfinite_error
from perta_stream.dtypes import DTYPE_BYTES
from perta_stream.memory import RssWatchdog
from perta_stream.pipelines.chunk_stream import (
    DONE,
    TV_ROLE,
    ChunkBuffers,
    ChunkReader,
    guarded,
    hand,
    input_buffer_sizes,
    one_intra_op_thread,
    take,
    task_vector_into,
)
from perta_stream.plan.merge_plan import PIPELINE_DEPTH, MergePlan, OutputShard, TensorTask
from perta_stream.sinks.model_output import ModelOutput
from perta_stream.sinks.shard_writer import ShardWriter
from perta_stream.sources.byte_source import ByteSource
from perta_stream.sources.content_digest import TensorHasher


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
    in_sizes = input_buffer_sizes(plan.tasks, plan.chunk_elements, adapter=plan.fgt_adapter is not None)
    reader = ChunkReader(sources, adapter=plan.fgt_adapter is not None, hasher=hasher, hash_role=hash_role)
    out_itemsize = max(DTYPE_BYTES[t.out_dtype] for t in plan.tasks)
    out_sizes = {str(k): plan.chunk_elements * out_itemsize for k in range(len(outputs))}
    free_inputs: queue.Queue = queue.Queue()
    free_outputs: queue.Queue = queue.Queue()
    for _ in range(PIPELINE_DEPTH):
        free_inputs.put(ChunkBuffers(in_sizes))
        free_outputs.put(ChunkBuffers(out_sizes))
    filled: queue.Queue = queue.Queue(maxsize=PIPELINE_DEPTH)
    computed: queue.Queue = queue.Queue(maxsize=PIPELINE_DEPTH)
    stop = threading.Event()
    failures: list[BaseException] = []

    def read_all() -> None:
        for job in iter_jobs(plan, skip_shards):
            buffers = take(free_inputs, stop)
            # θ_full's chunk is θ_0's when they are one model: the same bytes, read once.
            skip = ("full",) if plan.full_is_theta0 and "theta0" in job.task.sources else ()
            prepared = reader.read(job.task, job.start, job.count, buffers, skip=skip)
            hand(filled, (job, buffers, prepared), stop)
        hand(filled, DONE, stop)

    def write_all() -> None:
        writers: list[ShardWriter] = []
        while True:
            item = take(computed, stop)
            if item is DONE:
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

    def compute_all() -> None:
        _compute_all(kernel, filled, computed, free_inputs, free_outputs, stop, watchdog, len(outputs), plan.full_is_theta0)

    reader_thread = threading.Thread(target=guarded(read_all, stop, failures), name="perta-reader", daemon=True)
    writer_thread = threading.Thread(target=guarded(write_all, stop, failures), name="perta-writer", daemon=True)
    with one_intra_op_thread():
        reader_thread.start()
        writer_thread.start()
        try:
            guarded(compute_all, stop, failures)()
        except BaseException:
            stop.set()
            raise
        finally:
            if failures or stop.is_set():
                stop.set()
            reader_thread.join()
            writer_thread.join()
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
        item = take(filled, stop)
        if item is DONE:
            hand(computed, DONE, stop)
            return
        job, inputs, prepared = item
        outputs = take(free_outputs, stop)
        task = job.task
        if task.action == "merge":
            typed_inputs = {role: inputs.typed(role, info.dtype, job.count) for role, info in task.sources.items()}
            if "full" in typed_inputs and "theta0" in typed_inputs and full_is_theta0:
                typed_inputs["full"] = typed_inputs["theta0"]
            if prepared is not None:
                typed_inputs[TV_ROLE] = task_vector_into(prepared, inputs, job.start, job.count)
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
        hand(computed, (job, outputs), stop)
        watchdog.check()

