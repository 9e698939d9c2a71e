"""A local input folder pinned for the whole run: every file opened once, read only through that.

A run reads its inputs for minutes or hours. If another command replaces an input folder
meanwhile (`merge --out x --overwrite` while a merge reads `x`), a reader that opens files by path
as it goes would take the first shards from the old folder and the rest from the new one, and
write a model that is neither, with exit 0. `PinnedFolder` opens the folder first and each file
relative to it, when the run starts: a folder renamed or replaced later, or a file replaced by a
rename, cannot be mixed in (the old files stay readable through their descriptors until closed).

A file rewritten in place (the same inode) is what no descriptor can hide: `changed()` compares
each open file's size and modification time with those it had when opened, and a run checks it
before it commits (`check_inputs_unchanged`), so a changed input never becomes a finished output.
Both cost one `stat` per file, never a pass over the bytes.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import stat
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perta_stream.errors import CheckpointError, CheckpointNotFoundError, InputChangedError

logger = logging.getLogger(__name__)
_COPY_BLOCK_BYTES = 1 << 22


@dataclass(frozen=True)
class FileIdentity:
    """Which file a name held when it was opened: device, inode, size, modification time."""

    name: str
    device: int
    inode: int
    size_bytes: int
    mtime_ns: int

    @classmethod
    def of(cls, name: str, status: os.stat_result) -> "FileIdentity":
        return cls(name, status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)

    def to_json(self) -> list:
        return [self.name, self.device, self.inode, self.size_bytes, self.mtime_ns]


class PinnedFolder:
    """A local folder whose files are opened once (`pin`) and then read only through those descriptors.

    Args:
        root: the folder's path (for messages and the checks that are about paths).
        parent, name: open `name` inside an already pinned folder instead of `root` by path.

    Raises:
        CheckpointNotFoundError: the folder does not exist or is not a folder.
    """

    def __init__(self, root: str | os.PathLike, *, parent: PinnedFolder | None = None, name: str | None = None):
        self.root = Path(root)
        flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            self._dir_fd = _open(name, flags, parent._dir_fd) if parent is not None and name is not None else _open(os.fspath(root), flags, None)
        except (FileNotFoundError, NotADirectoryError):
            raise CheckpointNotFoundError(f"{root} is not a directory") from None
        self._folder = os.fstat(self._dir_fd)
        self._fds: dict[str, int] = {}
        self._opened: dict[str, FileIdentity] = {}
        self._lock = threading.Lock()

    def listing(self) -> dict[str, int]:
        """File name -> size of every regular file in the folder (a link counts as its target)."""
        sizes: dict[str, int] = {}
        with os.scandir(self._dir_fd) as entries:
            for entry in entries:
                try:
                    if entry.is_file():
                        sizes[entry.name] = entry.stat().st_size
                except OSError:
                    continue  # a dangling link or a file removed meanwhile: not a file of this folder
        return sizes

    def fd(self, name: str) -> int:
        """The descriptor of file `name`, opened now if it is not yet.

        Raises:
            CheckpointNotFoundError: no such file. CheckpointError: not a regular file, or the
                folder changed while its files were being opened.
        """
        with self._lock:
            fd = self._fds.get(name)
            if fd is not None:
                return fd
            try:
                fd = _open(name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0), self._dir_fd)
            except FileNotFoundError:
                raise CheckpointNotFoundError(f"{self.root / name} does not exist (the folder changed while the run opened it?)") from None
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                os.close(fd)
                raise CheckpointError(f"{self.root / name} is not a regular file")
            self._fds[name] = fd
            self._opened[name] = FileIdentity.of(name, status)
        self._check_same_as_path(name, status)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return fd

    def _check_same_as_path(self, name: str, status: os.stat_result) -> None:
        """The checks about paths (links out of the folder) looked at `root/name`: it must be the
        file just opened, or the folder was swapped while the run opened it."""
        try:
            by_path = os.stat(self.root / name)
        except OSError:
            by_path = None
        if by_path is None or (by_path.st_dev, by_path.st_ino) != (status.st_dev, status.st_ino):
            raise CheckpointError(f"{self.root / name} changed while the run opened its folder; rerun once the folder stays put")

    def pin(self, names: list[str] | tuple[str, ...]) -> None:
        """Open every file of `names` now (the run then reads these, whatever happens to the paths)."""
        for name in names:
            self.fd(name)

    def identity(self, name: str) -> FileIdentity:
        """The identity `name` had when it was opened (it is opened now if it was not)."""
        self.fd(name)
        return self._opened[name]

    def read_at(self, name: str, offset: int, length: int) -> bytes:
        return os.pread(self.fd(name), length, offset)

    def read_file(self, name: str) -> bytes:
        """A whole (small) file: index, config."""
        fd = self.fd(name)
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0)
        if len(data) != size:
            raise CheckpointError(f"{self.root / name} ended early while being read; it changed during the run")
        return data

    def copy_file(self, name: str, destination: str | os.PathLike) -> None:
        """Copy the pinned file `name`, byte for byte, to `destination`."""
        fd = self.fd(name)
        offset = 0
        with open(destination, "wb") as out:
            while block := os.pread(fd, _COPY_BLOCK_BYTES, offset):
                out.write(block)
                offset += len(block)

    def changed(self) -> list[str]:
        """The open files whose size or modification time is not what it was when opened
        (rewritten in place: the only change the descriptors cannot hide)."""
        with self._lock:
            opened = [(name, self._fds[name], identity) for name, identity in self._opened.items()]
        found = []
        for name, fd, identity in opened:
            now = os.fstat(fd)
            if (now.st_size, now.st_mtime_ns) != (identity.size_bytes, identity.mtime_ns):
                found.append(name)
        return found

    def replaced(self) -> bool:
        """Whether the folder's path now names another folder (or nothing)."""
        try:
            now = os.stat(self.root)
        except OSError:
            return True
        return (now.st_dev, now.st_ino) != (self._folder.st_dev, self._folder.st_ino)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            if self._dir_fd >= 0:
                os.close(self._dir_fd)
                self._dir_fd = -1


def _open(name: str, flags: int, dir_fd: int | None) -> int:
    """`os.open`, raising the soft limit of open files to the hard one once when it is reached
    (a merge of a 405B model holds a descriptor per shard of every input)."""
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno != errno.EMFILE:
            raise
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            logger.info("raised the limit of open files from %d to %s", soft, hard)
            try:
                return os.open(name, flags, dir_fd=dir_fd)
            except OSError as again:
                if again.errno != errno.EMFILE:
                    raise
        raise CheckpointError(
            f"cannot open {name}: too many open files (the run keeps every input file open from start to end); "
            "raise the limit (`ulimit -n`) and rerun"
        ) from None


def check_inputs_unchanged(
    sources: Mapping[str, Any], locations: Mapping[str, str], *, partial: str | None = None, outputs: Sequence[Any] = ()
) -> None:
    """Before a commit: refuse when an input file was rewritten in place during the run.

    Args:
        sources: role -> byte source (local sources have `changed_files` and `replaced`).
        locations: role -> the location given, for messages.
        partial: the working folder left behind, named in the advice.
        outputs: what the run writes (each has `note_stopped`): told why the run stopped, for
            the next run's advice.

    Raises:
        InputChangedError: naming the input and file; nothing is committed.
    """
    for role, source in sources.items():
        changed = source.changed_files() if hasattr(source, "changed_files") else []
        if changed:
            start_over = f" delete {partial} (its shards may hold the old bytes) and" if partial else ""
            error = InputChangedError(
                f"{role} input {locations.get(role, '')}: {changed[0]} was rewritten while this run read it (its size or "
                f"modification time changed{f', and {len(changed) - 1} more file(s)' if len(changed) > 1 else ''}); "
                f"nothing was committed:{start_over} rerun once the input stays unchanged"
            )
            for output in outputs:
                output.note_stopped(str(error))
            raise error
    for role, source in sources.items():
        if hasattr(source, "replaced") and source.replaced():
            logger.warning(
                "%s input %s was replaced during the run; the output was computed from the files as they were when the run started",
                role,
                locations.get(role, ""),
            )
