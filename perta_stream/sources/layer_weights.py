"""Load the tensors of one module (a decoder layer, the embeddings, the head) onto the compute device.

The engine needs one module's weights at a time. `ModuleWeightLoader` reads them straight from the
checkpoint's shards through a `ByteSource` (positional reads into fresh host buffers, no mmap of
whole shards), converts them to the compute dtype on the compute device, and can read the next
module on a background thread while the current one computes: file reads and the host-to-device
copy release the GIL, so the prefetch overlaps the compute.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from perta_stream.dtypes import torch_dtype
from perta_stream.sources.byte_source import ByteSource
from perta_stream.sources.checkpoint import Checkpoint
from perta_stream.sources.content_digest import TensorHasher

logger = logging.getLogger(__name__)


class ModuleWeightLoader:
    """Reads groups of tensors by name, one group ahead of the caller.

    Args:
        checkpoint: where each tensor lives (from headers).
        source: the checkpoint's bytes.
        device: where loaded tensors go.
        dtype: the compute dtype (floating tensors are converted to it).
        hasher: when given, every tensor's bytes are hashed into it as they are read (the model's
            content identity, sources/content_digest.py).

    Use `prefetch(names)` to start reading a group in the background and `load(names)` to get it
    (reading it now when it was not prefetched). `close()` waits for a pending read and stops the
    thread; the caller owns `source` and closes it.
    """

    def __init__(
        self, checkpoint: Checkpoint, source: ByteSource, *, device: torch.device, dtype: torch.dtype, hasher: TensorHasher | None = None
    ):
        self._checkpoint = checkpoint
        self._hasher = hasher
        self._source = source
        self._device = device
        self._dtype = dtype
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="perta-prefetch")
        self._pending: dict[tuple[str, ...], Future] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0

    def _read(self, tensor_names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for tensor_name in tensor_names:
            info = self._checkpoint.tensors[tensor_name]
            raw = torch.empty(info.nbytes, dtype=torch.uint8)
            if info.nbytes:
                self._source.read_into(info.file_name, info.begin, memoryview(raw.numpy()))
                self._source.done_with(info.file_name, info.begin, info.nbytes)
            if self._hasher is not None:
                self._hasher.update(tensor_name, memoryview(raw.numpy()), last=True)
            tensor = raw.view(torch_dtype(info.dtype)).reshape(info.shape)
            target = self._dtype if tensor.is_floating_point() else tensor.dtype
            tensors[tensor_name] = tensor.to(device=self._device, dtype=target)
            with self._lock:
                self.bytes_read += info.nbytes
        return tensors

    def prefetch(self, tensor_names: Sequence[str]) -> None:
        """Start reading a group in the background (no-op when already pending)."""
        key = tuple(tensor_names)
        if key not in self._pending:
            self._pending[key] = self._executor.submit(self._read, key)

    def load(self, tensor_names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The group's tensors (waits for its prefetch, or reads it now).

        Raises:
            CheckpointError: a shard is truncated or changed (from the byte source).
        """
        key = tuple(tensor_names)
        future = self._pending.pop(key, None)
        if future is None:
            return self._read(key)
        return future.result()

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self._executor.shutdown(wait=True)

    def __enter__(self) -> "ModuleWeightLoader":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
