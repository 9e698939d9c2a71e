"""The identity of a checkpoint by content: a digest of every tensor's bytes, taken while reading.

Two fine-tunes of one base model have identical headers, so a header digest cannot tell which
model statistics were computed at. The bytes can: `stats` hashes each tensor of its model as it
reads it anyway, and `merge` hashes the input the statistics belong to as it streams it, so the
check costs no extra pass. The digest is over (tensor_name, sha256 of the tensor's bytes) in
name order: it does not depend on how the tensors are split into shards or in which order they
are read. Tensors a run did not read (a resumed run skips finished work) are read and hashed at
the end.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping

import torch

from perta_stream.sources.byte_source import ByteSource
from perta_stream.sources.checkpoint import Checkpoint

_READ_BYTES = 8 * 2**20


def content_sha256(tensor_sha256: Mapping[str, str]) -> str:
    """One digest of a model's tensors from the digests of their bytes (name order)."""
    digest = hashlib.sha256()
    for tensor_name in sorted(tensor_sha256):
        digest.update(f"{tensor_name}\0{tensor_sha256[tensor_name]}\n".encode())
    return digest.hexdigest()


class TensorHasher:
    """Per-tensor sha256 of bytes handed over in order, chunk by chunk (thread-safe).

    `update(tensor_name, data, last=...)` feeds the next bytes of a tensor; with `last` its digest
    is final. `digests` holds every finished one.
    """

    def __init__(self) -> None:
        self.digests: dict[str, str] = {}
        self._open: dict[str, "hashlib._Hash"] = {}
        self._lock = threading.Lock()

    def update(self, tensor_name: str, data: memoryview | bytes, *, last: bool) -> None:
        with self._lock:
            if tensor_name in self.digests:
                return
            running = self._open.pop(tensor_name, None) or hashlib.sha256()
        running.update(data)  # outside the lock: hashlib releases the GIL on large buffers
        with self._lock:
            if last:
                self.digests[tensor_name] = running.hexdigest()
            else:
                self._open[tensor_name] = running

    def add(self, digests: Mapping[str, str]) -> None:
        """Adopt digests computed elsewhere (another rank, a resumed run)."""
        with self._lock:
            self.digests.update(digests)

    def complete(self, checkpoint: Checkpoint, source: ByteSource) -> str:
        """Hash every tensor of `checkpoint` not hashed yet, then return its content digest."""
        buffer = torch.empty(_READ_BYTES, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        for tensor_name, info in checkpoint.tensors.items():
            if tensor_name in self.digests:
                continue
            if info.nbytes == 0:
                self.update(tensor_name, b"", last=True)
            for offset in range(info.begin, info.end, _READ_BYTES):
                count = min(_READ_BYTES, info.end - offset)
                source.read_into(info.file_name, offset, view[:count])
                self.update(tensor_name, view[:count], last=offset + count == info.end)
        return content_sha256({name: self.digests[name] for name in checkpoint.tensors})
