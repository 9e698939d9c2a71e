"""The measuring pass of `inspect`: a reader thread fills chunk buffers, the caller's thread measures them.

    reader ──(filled buffers)──▶ FigureAccumulator
       ▲                               │
       └──────── free buffers ─────────┘

The merge's executor (pipelines/streaming.py) without its writer: the same plan-sized chunks,
the same ByteSources and a fixed pool of PIPELINE_DEPTH buffer sets allocated once, so memory
stays flat however large the model is. Reads (os.preadv) and torch kernels release the GIL and
overlap. A failure in either stage stops the other and is raised in the caller's thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch

from perta_stream.compute.figure_accumulator import FigureAccumulator, TensorFigures
from perta_stream.dtypes import DTYPE_BYTES, torch_dtype
from perta_stream.memory import RssWatchdog, release_free_heap
from perta_stream.plan.inspect_plan import InspectPlan
from perta_stream.plan.merge_plan import PIPELINE_DEPTH
from perta_stream.sources.byte_source import ByteSource
from perta_stream.sources.content_digest import TensorHasher

_POLL_S = 0.1
_DONE = object()


class _Stop(Exception):
    pass


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
    content identity the statistics are checked against).

    Returns:
        Each tensor's figures, in the plan's order.
    """
    roles = sorted({role for tensor in plan.tensors for role in tensor.sources})
    sizes = {role: plan.chunk_elements * max(DTYPE_BYTES[t.sources[role].dtype] for t in plan.tensors) for role in roles}
    free: queue.Queue = queue.Queue()
    for _ in range(PIPELINE_DEPTH):
        free.put({role: torch.empty(size, dtype=torch.uint8) for role, size in sizes.items()})
    filled: queue.Queue = queue.Queue(maxsize=PIPELINE_DEPTH)
    stop = threading.Event()
    failures: list[BaseException] = []

    def read_all() -> None:
        try:
            for position, tensor in enumerate(plan.tensors):
                for start, count in plan.chunk_ranges(tensor):
                    buffers = _get(free, stop)
                    for role, info in tensor.sources.items():
                        nbytes = count * info.itemsize
                        offset = info.begin + start * info.itemsize
                        view = memoryview(buffers[role].numpy())[:nbytes]
                        sources[role].read_into(info.file_name, offset, view)
                        sources[role].done_with(info.file_name, offset, nbytes)
                        if hasher is not None and role == hash_role:
                            hasher.update(tensor.tensor_name, view, last=offset + nbytes == info.end)
                    _put(filled, (position, start, count, buffers), stop)
            _put(filled, _DONE, stop)
        except _Stop:
            pass
        except BaseException as exc:  # re-raised in the caller's thread below
            failures.append(exc)
            stop.set()

    reader = threading.Thread(target=read_all, name="perta-inspect-reader", daemon=True)
    # One intra-op thread for the arithmetic, as in the merge: its blocks are cache-sized, and the
    # reader keeps another core busy.
    intra_op_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reader.start()
    results: list[TensorFigures] = []
    try:
        current = -1
        while True:
            try:
                item = _get(filled, stop)
            except _Stop:
                break
            if item is _DONE:
                break
            position, start, count, buffers = item
            tensor = plan.tensors[position]
            if position != current:
                accumulator.begin_tensor(tensor.tensor_name, tensor.numel)
                current = position
            typed = {
                role: buffers[role][: count * info.itemsize].view(torch_dtype(info.dtype)) for role, info in tensor.sources.items()
            }
            accumulator.add_chunk(typed, start)
            if start + count >= tensor.numel:
                results.append(accumulator.end_tensor())
                release_free_heap()  # the tensor's sample and ranking temporaries, back to the system
            free.put(buffers)
            on_progress(sum(count * info.itemsize for info in tensor.sources.values()))
            watchdog.check()
    except BaseException:
        stop.set()
        raise
    finally:
        stop.set()
        reader.join()
        torch.set_num_threads(intra_op_threads)
    if failures:
        raise failures[0]
    return results


def _get(source: queue.Queue, stop: threading.Event):
    while True:
        if stop.is_set() and source.empty():
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
