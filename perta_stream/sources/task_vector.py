"""The task vector as a source: θ_fgt − θ_0 from two checkpoints, or from a LoRA adapter's factors.

A merge task reads its task vector one of two ways:
- dense: the chunk's bytes of θ_fgt and θ_0 (the merge kernel subtracts them);
- adapter: `DeltaReader.load` reads the factors of one tensor (a few MB even at 70B: r · (rows +
  cols) values) once, as float32, and `DeltaReader.theta0_rows` the rows of θ_0 that DoRA and
  trainable tokens need; compute/task_vector.py turns them into the chunk's task vector.
Both the streamed `merge` and the one pass's group merge read through this module, so an
adapter's bytes are read the same way wherever it is used.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from perta_stream.compute.task_vector import LoadedDelta
from perta_stream.dtypes import torch_dtype
from perta_stream.sources.adapter import AdapterDelta
from perta_stream.sources.byte_source import ByteSource, read_elements
from perta_stream.sources.safetensors_header import TensorInfo


def read_tensor(source: ByteSource, info: TensorInfo) -> torch.Tensor:
    """One whole tensor (small: an adapter's factor) in its stored dtype."""
    raw = torch.empty(info.nbytes, dtype=torch.uint8)
    if info.nbytes:
        source.read_into(info.file_name, info.begin, memoryview(raw.numpy()))
    return raw.view(torch_dtype(info.dtype)).reshape(info.shape)


def read_rows(source: ByteSource, info: TensorInfo, first: int, end: int) -> torch.Tensor:
    """Rows [first, end) of a stored 2-D tensor, in its stored dtype."""
    cols = info.shape[1]
    raw = torch.empty((end - first) * cols * info.itemsize, dtype=torch.uint8)
    if raw.numel():
        read_elements(source, info, first * cols, (end - first) * cols, memoryview(raw.numpy()))
    return raw.view(torch_dtype(info.dtype)).reshape(end - first, cols)


class DeltaReader:
    """Reads what an adapter changes in a tensor, keeping the last tensor's factors (its chunks
    come in order) so each factor is read once per merge.

    Args:
        adapter_source: the adapter's bytes.
        theta0_source: θ_0's bytes (for DoRA's and trainable tokens' rows).
        on_read: called with the byte count of every read (the run's read total).
    """

    def __init__(self, adapter_source: ByteSource, theta0_source: ByteSource | None, on_read: Callable[[int], None] | None = None):
        self._adapter = adapter_source
        self._theta0 = theta0_source
        self._on_read = on_read or (lambda nbytes: None)
        self._cached: tuple[str, LoadedDelta] | None = None
        self._lock = threading.Lock()

    def load(self, delta: AdapterDelta, shape: tuple[int, ...]) -> LoadedDelta:
        """The float32 factors of `delta` for a tensor of `shape` (read once per tensor)."""
        with self._lock:
            if self._cached is not None and self._cached[0] == delta.tensor_name:
                return self._cached[1]
        loaded = self._read(delta, shape)
        with self._lock:
            self._cached = (delta.tensor_name, loaded)
        return loaded

    def _read(self, delta: AdapterDelta, shape: tuple[int, ...]) -> LoadedDelta:
        def factor(info: TensorInfo) -> torch.Tensor:
            self._on_read(info.nbytes)
            return read_tensor(self._adapter, info).to(torch.float32)

        fields: dict = {}
        low_rank = delta.low_rank
        if low_rank is not None:
            left, right = factor(low_rank.left), factor(low_rank.right)
            if low_rank.transposed:
                left, right = left.t().contiguous(), right.t().contiguous()
            fields.update(left=left, right=right, scale=low_rank.scale)
            if low_rank.magnitude is not None:
                fields["magnitude"] = factor(low_rank.magnitude)
        if delta.token_values is not None:
            fields["token_rows"] = torch.tensor(delta.token_rows, dtype=torch.int64)
            fields["token_values"] = factor(delta.token_values)
        return LoadedDelta(shape=(shape[0], shape[1] if len(shape) > 1 else 1), **fields)

    def theta0_rows(self, info: TensorInfo, first: int, end: int) -> torch.Tensor:
        """Rows [first, end) of θ_0's tensor `info`."""
        if self._theta0 is None:
            raise ValueError("θ_0's rows are needed but no θ_0 source was given")
        self._on_read((end - first) * info.shape[1] * info.itemsize)
        return read_rows(self._theta0, info, first, end)
