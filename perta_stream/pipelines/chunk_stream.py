"""What the merge's executor (streaming.py) and inspect's pass (inspect_stream.py) share.

Both stream plan-sized chunks of every tensor through a fixed pool of buffer sets, handed between
threads over queues that a failure in any stage stops (`take`, `hand`, `guarded`). `ChunkReader`
fills one chunk's buffers from the ByteSources: each input's bytes (hashed when asked), and with
an adapter θ_fgt the tensor's factors (sources/task_vector.py, once per tensor) and the θ_0 rows
its change needs; `task_vector_into` turns those into the chunk's float32 task vector
(compute/task_vector.py). inspect's effective scale is thus measured on the very task vector the
merge subtracts, read the same way.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

from perta_stream.compute.task_vector import LoadedDelta, covering_rows, task_vector_chunk
from perta_stream.dtypes import DTYPE_BYTES, torch_dtype
from perta_stream.sources.adapter import AdapterDelta
from perta_stream.sources.byte_source import ByteSource, read_elements
from perta_stream.sources.content_digest import TensorHasher
from perta_stream.sources.safetensors_header import TensorInfo
from perta_stream.sources.task_vector import DeltaReader

_POLL_S = 0.1
DONE = object()
TV_ROLE = "tv"


class Stopped(Exception):
    """Raised in a stage when another stage failed: it unwinds without a failure of its own."""


def take(source: queue.Queue, stop: threading.Event):
    """The next item of `source`, or `Stopped` once `stop` is set."""
    while True:
        if stop.is_set():
            raise Stopped
        try:
            return source.get(timeout=_POLL_S)
        except queue.Empty:
            continue


def hand(target: queue.Queue, item: object, stop: threading.Event) -> None:
    """Put `item` on `target` when there is room, or raise `Stopped` once `stop` is set."""
    while True:
        if stop.is_set():
            raise Stopped
        try:
            target.put(item, timeout=_POLL_S)
            return
        except queue.Full:
            continue


def guarded(body: Callable[[], None], stop: threading.Event, failures: list[BaseException]) -> Callable[[], None]:
    """`body` as a stage: its failure is kept in `failures` (re-raised by the caller's thread) and stops the others."""

    def run() -> None:
        try:
            body()
        except Stopped:
            pass
        except BaseException as exc:  # re-raised in the caller's thread
            failures.append(exc)
            stop.set()

    return run


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """One intra-op thread for the arithmetic while the stages run: its blocks are cache-sized and
    the reader (and the merge's writer, which hashes every byte) keep the other cores busy; splitting
    a block across OpenMP threads costs more in synchronization than it gains, badly so on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class ChunkBuffers:
    """Byte buffers for one chunk, one per name, each a torch uint8 tensor with a memoryview."""

    def __init__(self, sizes: Mapping[str, int]):
        self.tensors = {name: torch.empty(size, dtype=torch.uint8) for name, size in sizes.items()}
        self.views = {name: memoryview(t.numpy()) for name, t in self.tensors.items()}

    def typed(self, name: str, dtype: str, count: int) -> torch.Tensor:
        return self.tensors[name][: count * DTYPE_BYTES[dtype]].view(torch_dtype(dtype))


class StreamedTensor(Protocol):
    """A tensor as the plans describe it (merge_plan.TensorTask, inspect_plan.InspectTensor)."""

    @property
    def tensor_name(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def sources(self) -> dict[str, TensorInfo]: ...
    @property
    def delta(self) -> AdapterDelta | None: ...
    @property
    def theta0_rows(self) -> TensorInfo | None: ...


def input_buffer_sizes(tensors: Iterable[StreamedTensor], chunk_elements: int, *, adapter: bool) -> dict[str, int]:
    """Bytes of each input's buffer for a chunk: its widest dtype's, and a float32 task vector's with an adapter."""
    widest: dict[str, int] = {}
    for tensor in tensors:
        for role, info in tensor.sources.items():
            widest[role] = max(widest.get(role, 0), info.itemsize)
    sizes = {role: chunk_elements * itemsize for role, itemsize in widest.items()}
    if adapter:
        sizes[TV_ROLE] = chunk_elements * 4
    return sizes


@dataclass(frozen=True)
class PreparedDelta:
    """What the compute stage needs to make a chunk's task vector: the tensor's factors, and θ_0's
    rows covering the chunk when the change needs them."""

    loaded: LoadedDelta
    theta0_rows: torch.Tensor | None


class ChunkReader:
    """Reads one chunk of a tensor's inputs into `ChunkBuffers` (the reader stage of both passes).

    Args:
        sources: role -> the input's bytes ("fgt" is the adapter's with `adapter`).
        adapter: θ_fgt is a LoRA adapter: tensors with a `delta` also read its factors and θ_0 rows.
        hasher, hash_role: hash every tensor of that input as it is read.
    """

    def __init__(self, sources: dict[str, ByteSource], *, adapter: bool, hasher: TensorHasher | None = None, hash_role: str | None = None):
        self._sources = sources
        self._deltas = DeltaReader(sources["fgt"], sources.get("theta0")) if adapter else None
        self._hasher = hasher
        self._hash_role = hash_role

    def read(self, tensor: StreamedTensor, start: int, count: int, buffers: ChunkBuffers, *, skip: tuple[str, ...] = ()) -> PreparedDelta | None:
        """Fill `buffers` with elements [start, start + count) of every input of `tensor` but `skip`.

        Returns:
            the adapter's change of the tensor, prepared for `task_vector_into`, or None.
        """
        prepared = None
        if self._deltas is not None and tensor.delta is not None:
            loaded = self._deltas.load(tensor.delta, tensor.shape)
            rows = None
            if loaded.needs_theta0_rows and tensor.theta0_rows is not None:
                rows = self._deltas.theta0_rows(tensor.theta0_rows, *covering_rows(tensor.shape, start, count))
            prepared = PreparedDelta(loaded, rows)
        for role, info in tensor.sources.items():
            if role in skip:
                continue
            view = read_elements(self._sources[role], info, start, count, buffers.views[role])
            if self._hasher is not None and role == self._hash_role:
                self._hasher.update(tensor.tensor_name, view, last=start + count == info.numel)
        return prepared


def task_vector_into(prepared: PreparedDelta, buffers: ChunkBuffers, start: int, count: int) -> torch.Tensor:
    """The chunk's float32 task vector, made in `buffers`' task-vector buffer (the compute stage)."""
    out = buffers.typed(TV_ROLE, "F32", count)
    task_vector_chunk(prepared.loaded, start, count, out, prepared.theta0_rows)
    return out
