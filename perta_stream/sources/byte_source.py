"""Reading tensor bytes into caller-owned buffers.

A `ByteSource` fills a buffer the engine reuses, so reading a model never allocates per tensor
and never maps a whole shard into the process (a mapped shard's touched pages count in RSS and
can pin gigabytes). `LocalByteSource` uses `os.preadv` (positional, thread-safe, releases the
GIL) and can tell the kernel to drop pages it has consumed, so streaming a 140 GB model does
not push everything else out of the page cache. It reads through a `PinnedFolder`
(sources/pinned_folder.py): every file opened once, when the run starts.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Protocol

from perta_stream.errors import CheckpointError
from perta_stream.sources.pinned_folder import PinnedFolder

if TYPE_CHECKING:
    from perta_stream.sources.safetensors_header import TensorInfo


class ByteSource(Protocol):
    """Where a checkpoint's shard bytes come from."""

    def read_into(self, file_name: str, offset: int, buffer: memoryview) -> None:
        """Fill `buffer` completely with the bytes of `file_name` starting at `offset`."""

    def done_with(self, file_name: str, offset: int, length: int) -> None:
        """Tell the source a byte range has been consumed (it may drop caches or files)."""

    def fetch_file(self, file_name: str, destination: str | os.PathLike) -> None:
        """Copy a whole (side) file of the checkpoint, byte for byte, to `destination`."""

    def changed_files(self) -> list[str]:
        """Files rewritten in place since the run opened them (none for a source pinned otherwise)."""

    def close(self) -> None:
        """Release open files and connections."""


def read_elements(source: ByteSource, info: TensorInfo, start: int, count: int, buffer: memoryview) -> memoryview:
    """Elements [start, start + count) of the stored tensor `info` into the front of `buffer`, then
    marked consumed (`done_with`); returns the filled part of `buffer`."""
    nbytes = count * info.itemsize
    offset = info.begin + start * info.itemsize
    view = buffer[:nbytes]
    source.read_into(info.file_name, offset, view)
    source.done_with(info.file_name, offset, nbytes)
    return view


class LocalByteSource:
    """Reads the files of one local checkpoint folder through a `PinnedFolder`: one read-only
    descriptor per file, opened when the checkpoint is opened (or at first use), so a folder
    replaced during the run is never mixed in.

    Args:
        root: the checkpoint folder, or the `PinnedFolder` its checkpoint was opened from (which
            the source then owns and closes).
        drop_page_cache: advise the kernel to drop pages once consumed (POSIX_FADV_DONTNEED).
    """

    def __init__(self, root: str | os.PathLike | PinnedFolder, *, drop_page_cache: bool = False):
        self._folder = root if isinstance(root, PinnedFolder) else PinnedFolder(root)
        self._root = self._folder.root
        self._drop_page_cache = drop_page_cache and hasattr(os, "posix_fadvise")

    def read_into(self, file_name: str, offset: int, buffer: memoryview) -> None:
        fd = self._folder.fd(file_name)
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
            os.posix_fadvise(self._folder.fd(file_name), offset, length, os.POSIX_FADV_DONTNEED)

    def fetch_file(self, file_name: str, destination: str | os.PathLike) -> None:
        source = self._root / file_name
        if not source.resolve().is_relative_to(self._root.resolve()):
            raise CheckpointError(f"{source} resolves outside {self._root}; it is not copied (replace the link by the file itself)")
        self._folder.copy_file(file_name, destination)

    def changed_files(self) -> list[str]:
        """Files read so far that were rewritten in place since they were opened."""
        return self._folder.changed()

    def replaced(self) -> bool:
        """Whether the folder's path now names another folder."""
        return self._folder.replaced()

    def close(self) -> None:
        self._folder.close()
