"""The measuring pass of `inspect`: a reader thread fills chunk buffers, the caller's thread measures them.

    reader ──(filled buffers)──▶ FigureAccumulator
       ▲                               │
       └──────── free buffers ─────────┘

The merge's executor (pipelines/streaming.py) without its writer, built from the same parts
(pipelines/chunk_stream.py): the same plan-sized chunks, the same ByteSources, a fixed pool of
PIPELINE_DEPTH buffer sets allocated once, so memory stays flat however large the model is, and
with an adapter θ_fgt the same task vector, made from its factors as the merge makes it. Reads
(os.preadv) and torch kernels release the GIL and overlap. A failure in either stage stops the
other and is raised in the caller's thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from perta_stream.compute.figure_accumulator import FigureAccumulator, TensorFigures
from perta_stream.memory import RssWatchdog, release_free_heap
from perta_stream.pipelines.chunk_stream import (
    DONE,
    TV_ROLE,
    ChunkBuffers,
    ChunkReader,
    Stopped,
    guarded,
    hand,
    input_buffer_sizes,
    one_intra_op_thread,
    take,
    task_vector_into,
)
from perta_stream.plan.adapter_plan import delta_read_bytes
from perta_stream.plan.inspect_plan import InspectPlan
from perta_stream.plan.merge_plan import PIPELINE_DEPTH
from perta_stream.sources.byte_source import ByteSource
from perta_stream.sources.content_digest import TensorHasher


def measure(
    plan: InspectPlan,
    *,
    sources: dict[str, ByteSource],
    accumulator: FigureAccumulator,
    watchdog: RssWatchdog,
    on_progress: Callable[[int], None],
    hasher: TensorHasher | None = None,
    hash_role: str | None = None,
) -> list[TensorFigures]:
    """Read every chunk of every tensor of `plan` and hand it to `accumulator`.

    With `hasher`, the reader hashes every tensor of input `hash_role` as it reads it (the
    content identity the statistics are checked against). With an adapter θ_fgt, the reader also
    reads each changed tensor's factors and the accumulator is given the chunk's task vector (`tv`).

    Returns:
        Each tensor's figures, in the plan's order.
    """
    adapter = plan.fgt_adapter is not None
    reader = ChunkReader(sources, adapter=adapter, hasher=hasher, hash_role=hash_role)
    sizes = input_buffer_sizes(plan.tensors, plan.chunk_elements, adapter=adapter)
    free: queue.Queue = queue.Queue()
    for _ in range(PIPELINE_DEPTH):
        free.put(ChunkBuffers(sizes))
    filled: queue.Queue = queue.Queue(maxsize=PIPELINE_DEPTH)
    stop = threading.Event()
    failures: list[BaseException] = []

    def read_all() -> None:
        for position, tensor in enumerate(plan.tensors):
            for start, count in plan.chunk_ranges(tensor):
                buffers = take(free, stop)
                prepared = reader.read(tensor, start, count, buffers)
                hand(filled, (position, start, count, buffers, prepared), stop)
        hand(filled, DONE, stop)

    reader_thread = threading.Thread(target=guarded(read_all, stop, failures), name="perta-inspect-reader", daemon=True)
    results: list[TensorFigures] = []
    with one_intra_op_thread():
        reader_thread.start()
        try:
            current = -1
            while True:
                try:
                    item = take(filled, stop)
                except Stopped:
                    break
                if item is DONE:
                    break
                position, start, count, buffers, prepared = item
                tensor = plan.tensors[position]
                if position != current:
                    accumulator.begin_tensor(tensor.tensor_name, tensor.numel)
                    current = position
                typed = {role: buffers.typed(role, info.dtype, count) for role, info in tensor.sources.items()}
                if prepared is not None:
                    typed[TV_ROLE] = task_vector_into(prepared, buffers, start, count)
                accumulator.add_chunk(typed, start)
                read = sum(count * info.itemsize for info in tensor.sources.values())
                if start + count >= tensor.numel:
                    results.append(accumulator.end_tensor())
                    release_free_heap()  # the tensor's sample and ranking temporaries, back to the system
                    read += delta_read_bytes(tensor.delta, tensor.theta0_rows, tensor.shape)
                free.put(buffers)
                on_progress(read)
                watchdog.check()
        except BaseException:
            stop.set()
            raise
        finally:
            stop.set()
            reader_thread.join()
    if failures:
        raise failures[0]
    return results
