"""A header-first, incremental safetensors writer.

Written by hand because the safetensors library only serializes tensors it holds in memory in
full; a streamed merge knows every output tensor's name, dtype and shape from the plan, so it
can write the header first and then append each tensor's bytes chunk by chunk, in header order.
The file is written under a temporary name, fsynced and renamed, so a shard that exists under its
final name is always complete. The sha256 is computed while writing (hashlib releases the GIL).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from perta_stream.dtypes import DTYPE_BYTES
from perta_stream.errors import PertaStreamError, WriteError

TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of an output shard: name, safetensors dtype and shape."""

    tensor_name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class ShardRecord:
    """A finished shard: its name, size and content digest."""

    file_name: str
    size_bytes: int
    sha256: str


def encode_header(tensors: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length prefix plus the JSON header, padded with spaces to 8-byte alignment.

    Tensors are laid out in the given order; alignment keeps every tensor's data 8-byte aligned
    relative to the data area start, as the safetensors serializer does.
    """
    document: dict[str, object] = {}
    if metadata:
        document["__metadata__"] = dict(metadata)
    offset = 0
    for spec in tensors:
        document[spec.tensor_name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    header = json.dumps(document, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


class ShardWriter:
    """Writes one safetensors shard: header at open, then tensor bytes strictly in order.

    Args:
        final_path: where the finished shard will be; bytes go to `final_path + ".tmp"` first.
        tensors: the shard's tensors in data order.
        metadata: the `__metadata__` map (e.g. {"format": "pt"} so transformers loads it).
        compute_sha256: hash the bytes while writing (ShardRecord.sha256 is "" when False).

    Raises:
        WriteError: on any OSError (disk full, permissions), naming the file.
    """

    def __init__(
        self,
        final_path: str | os.PathLike,
        tensors: Sequence[TensorSpec],
        metadata: dict[str, str] | None = None,
        *,
        compute_sha256: bool = True,
    ):
        self.final_path = Path(final_path)
        self.tmp_path = self.final_path.with_name(self.final_path.name + TMP_SUFFIX)
        self._tensors = list(tensors)
        # Outputs whose record lists no digest (statistics) skip the hashing cost.
        self._hash = hashlib.sha256() if compute_sha256 else None
        header = encode_header(self._tensors, metadata)
        self._expected_bytes = len(header) + sum(spec.nbytes for spec in self._tensors)
        self._written_bytes = 0
        try:
            self._fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise _write_error(self.tmp_path, exc) from exc
        self.write(header)

    @property
    def remaining_bytes(self) -> int:
        return self._expected_bytes - self._written_bytes

    def write(self, data: bytes | memoryview) -> None:
        """Append bytes; the caller supplies tensors in header order."""
        view = memoryview(data).cast("B")
        if len(view) > self.remaining_bytes:
            raise PertaStreamError(f"{self.tmp_path}: writing {len(view)} bytes past the planned shard size")
        if self._hash is not None:
            self._hash.update(view)
        start = self._written_bytes
        try:
            while view:
                count = os.write(self._fd, view)
                view = view[count:]
                self._written_bytes += count
        except OSError as exc:
            raise _write_error(self.tmp_path, exc) from exc
        _start_writeback(self._fd, start, self._written_bytes - start)

    def finish(self, *, drop_page_cache: bool = True) -> ShardRecord:
        """Check the shard is complete, fsync it and rename it to its final name."""
        if self.remaining_bytes:
            raise PertaStreamError(f"{self.tmp_path}: {self.remaining_bytes} planned bytes were never written")
        try:
            os.fsync(self._fd)
            if drop_page_cache and hasattr(os, "posix_fadvise"):
                # The pages are clean after fsync; dropping them keeps a 100 GB output from
                # evicting the inputs we are still reading.
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(self._fd)
            self._fd = -1
            os.replace(self.tmp_path, self.final_path)
        except OSError as exc:
            raise _write_error(self.final_path, exc) from exc
        return ShardRecord(self.final_path.name, self._expected_bytes, self._hash.hexdigest() if self._hash is not None else "")

    def abort(self) -> None:
        """Close and delete the temporary file (used on failure)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.tmp_path.unlink(missing_ok=True)


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range = None
_sync_file_range_looked_up = False


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask Linux to start writing a just-written range to disk, without waiting for it.

    Written by hand with ctypes because the os module has no sync_file_range. Without it the
    kernel flushes a shard only at the final fsync, and the pipeline stalls there for the whole
    shard's disk write; with it the disk works while the next chunks are computed, and the fsync
    finds little left to do. Where the call is missing (not Linux), this does nothing.
    """
    global _sync_file_range, _sync_file_range_looked_up
    if not _sync_file_range_looked_up:
        _sync_file_range_looked_up = True
        try:
            import ctypes

            function = ctypes.CDLL(None, use_errno=True).sync_file_range
            function.argtypes = (ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint)
            _sync_file_range = function
        except (OSError, AttributeError):
            _sync_file_range = None
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _write_error(path: Path, exc: OSError) -> WriteError:
    if exc.errno == errno.ENOSPC:
        return WriteError(f"{path}: disk full while writing; free space (or point --out elsewhere) and rerun with --resume")
    return WriteError(f"{path}: write failed ({exc.strerror or exc}); fix the cause and rerun with --resume")
