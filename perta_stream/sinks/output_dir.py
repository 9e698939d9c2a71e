"""All-or-nothing output directories.

Everything is written into `<out>.partial/`; only when every file is complete is the folder
renamed to `<out>`. A crash leaves a `.partial` folder, never an `<out>` that looks finished.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from perta_stream.errors import OutputExistsError, WriteError

PARTIAL_SUFFIX = ".partial"


def partial_path(out: str | os.PathLike) -> Path:
    out_path = Path(out)
    return out_path.with_name(out_path.name + PARTIAL_SUFFIX)


def check_output_location(out: str | os.PathLike, *, overwrite: bool, inputs: dict[str, str | os.PathLike]) -> list[str]:
    """Problems with writing to `out`, as lines for a plan (nothing is touched).

    An output that is, contains or lies inside an input is always refused, because replacing it
    would destroy the input; an existing output is refused unless `overwrite`.
    """
    problems: list[str] = []
    out_path = Path(out).resolve()
    for role, location in inputs.items():
        if str(location).startswith("hf://"):
            continue
        input_path = Path(location).resolve()
        if out_path == input_path or out_path.is_relative_to(input_path) or input_path.is_relative_to(out_path):
            problems.append(f"--out {out} overlaps the {role} input {location}; choose an output outside every input")
    if problems:
        return problems
    if out_path.exists() and not overwrite:
        problems.append(f"--out {out} already exists; pass --overwrite to replace it, or choose another path")
    elif out_path.exists() and not out_path.is_dir():
        problems.append(f"--out {out} exists and is not a directory; remove it or choose another path")
    return problems


class AtomicOutputDir:
    """A `<out>.partial/` folder that becomes `<out>` on `commit()`.

    Args:
        out: the final output directory.
        overwrite: replace an existing `out` at commit time.
        keep_partial: an existing `<out>.partial/` is reused (resume) instead of refused.
    """

    def __init__(self, out: str | os.PathLike, *, overwrite: bool, keep_partial: bool = False):
        self.out = Path(out)
        self.partial = partial_path(out)
        self._overwrite = overwrite
        self._keep_partial = keep_partial
        self._lock_fd: int | None = None

    def check_partial(self) -> None:
        """Refuse an existing partial folder unless it is to be resumed (nothing is touched).

        Raises:
            OutputExistsError: naming the folder, --resume and how to start over.
        """
        if self.partial.exists() and not self._keep_partial:
            raise OutputExistsError(
                f"{self.partial} exists from an earlier run that did not finish; rerun the same command with --resume "
                "to continue it, or delete that folder to start over"
            )

    def open(self) -> Path:
        """Create (or, when resuming, reuse) the partial folder, lock it, and return its path.

        The lock (flock on the folder, held until `commit` or `release`) keeps a second process,
        e.g. a `--resume` started while the first run still writes, out of the same folder.

        Raises:
            OutputExistsError: the partial folder exists and is not to be resumed, or another
                process holds it.
            WriteError: the folder cannot be created.
        """
        self.check_partial()
        try:
            self.partial.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(self.partial, os.O_RDONLY)
        except OSError as exc:
            raise WriteError(f"cannot create {self.partial}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise OutputExistsError(
                f"{self.partial} is being written by another running process; wait for it to end (or stop it), "
                "then rerun with --resume"
            ) from None
        except OSError:
            # A file system without locks (some network and FUSE mounts): run unguarded rather than not at all.
            os.close(lock_fd)
            return self.partial
        self._lock_fd = lock_fd
        return self.partial

    def release(self) -> None:
        """Unlock the folder (a failed run's partial folder stays for a resume); idempotent."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def commit(self) -> Path:
        """Rename the finished partial folder to `out` (replacing it when overwrite was asked)."""
        _fsync_dir(self.partial)
        trash = None
        if self.out.exists():
            if not self._overwrite:
                raise OutputExistsError(f"--out {self.out} appeared during the run; pass --overwrite to replace it")
            trash = self.out.with_name(self.out.name + ".replaced")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(self.out, trash)
        os.replace(self.partial, self.out)
        _fsync_dir(self.out.parent)
        self.release()
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return self.out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
