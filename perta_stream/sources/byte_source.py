"""Reading tensor bytes into caller-owned buffers.

A `ByteSource` fills a buffer the engine reuses, so reading a model never allocates per tensor
and never maps a whole shard into the process (a mapped shard's touched pages count in RSS and
can pin gigabytes). `LocalByteSource` uses `os.preadv` (positional, thread-safe, releases the
GIL) and can tell the kernel to drop pages it has consumed, so streaming a 140 GB model does
not push everything else out of the page cache.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Protocol

from perta_stream.errors import CheckpointError


class ByteSource(Protocol):
    """Where a checkpoint's shard bytes come from."""

    def read_into(self, file_name: str, offset: int, buffer: memoryview) -> None:
        """Fill `buffer` completely with the bytes of `file_name` starting at `offset`."""

    def done_with(self, file_name: str, offset: int, length: int) -> None:
        """Tell the source a byte range has been consumed (it may drop caches or files)."""

    def fetch_file(self, file_name: str, destination: str | os.PathLike) -> None:
        """Copy a whole (side) file of the checkpoint, byte for byte, to `destination`."""

    def close(self) -> None:
        """Release open files and connections."""


class LocalByteSource:
    """Reads shards of one local checkpoint directory, one open read-only descriptor per shard.

    Args:
        root: the checkpoint directory.
        drop_page_cache: advise the kernel to drop pages once consumed (POSIX_FADV_DONTNEED).
    """

    def __init__(self, root: str | os.PathLike, *, drop_page_cache: bool = False):
        self._root = Path(root)
        self._drop_page_cache = drop_page_cache and hasattr(os, "posix_fadvise")
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _fd(self, file_name: str) -> int:
        with self._lock:
            fd = self._fds.get(file_name)
            if fd is None:
                fd = os.open(self._root / file_name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                self._fds[file_name] = fd
            return fd

    def read_into(self, file_name: str, offset: int, buffer: memoryview) -> None:
        fd = self._fd(file_name)
        view = buffer.cast("B") if buffer.format != "B" else buffer
        filled = 0
        while filled < len(view):
            count = os.preadv(fd, [view[filled:]], offset + filled)
            if count == 0:
                raise CheckpointError(
                    f"{self._root / file_name}: ended at byte {offset + filled} while reading; "
                    "the file was truncated or changed during the run"
                )
            filled += count

    def done_with(self, file_name: str, offset: int, length: int) -> None:
        if self._drop_page_cache:
            os.posix_fadvise(self._fd(file_name), offset, length, os.POSIX_FADV_DONTNEED)

    def fetch_file(self, file_name: str, destination: str | os.PathLike) -> None:
        source = self._root / file_name
        if not source.resolve().is_relative_to(self._root.resolve()):
            raise CheckpointError(f"{source} resolves outside {self._root}; it is not copied (replace the link by the file itself)")
        shutil.copyfile(source, destination)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
