"""All-or-nothing output directories, and the rules for replacing one.

Everything is written into `<out>.partial/`; only when every file is complete is the folder
renamed to `<out>`. A crash leaves a `.partial` folder, never an `<out>` that looks finished.

Nothing a user made is ever deleted: `--overwrite` replaces only a folder that holds the record
its own command writes (a previous output of this tool) or an empty one; a partial folder is
reused or removed only when it carries the marker this tool puts into every partial folder it
creates; the folder an old output is moved to before deletion is created by this run under a
fresh name.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from perta_stream.errors import OutputExistsError, WriteError

PARTIAL_SUFFIX = ".partial"
# The kernel's table of mounts of this process (Linux); bind mounts of one file system are only here.
MOUNTINFO_PATH = "/proc/self/mountinfo"
# Written into every partial folder this tool creates; removed from the output after the rename.
PARTIAL_MARKER_NAME = ".perta_partial"
# Why the run that left a partial folder stopped, when a plain --resume would stop the same way.
STOPPED_NOTE_NAME = ".perta_stopped"
_MAX_NOTE_CHARS = 600
# Older versions marked their partial folders with the resume record alone.
_LEGACY_PARTIAL_MARKERS = (".perta_resume.json",)


def partial_path(out: str | os.PathLike) -> Path:
    out_path = Path(out)
    return out_path.with_name(out_path.name + PARTIAL_SUFFIX)


def is_own_partial(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a partial folder this tool created (it holds the marker), or an empty
    one (a run killed between creating it and marking it; reusing it loses nothing)."""
    root = Path(folder)
    if root.is_symlink() or not root.is_dir():
        return False
    return not any(root.iterdir()) or any((root / name).is_file() for name in (PARTIAL_MARKER_NAME, *_LEGACY_PARTIAL_MARKERS))


def holds_record(folder: str | os.PathLike, record_name: str, record_format: str) -> bool:
    """Whether `folder` holds `record_name`, a JSON object whose "format" is `record_format`."""
    path = Path(folder) / record_name
    if path.is_symlink() or not path.is_file():
        return False
    try:
        document = json.loads(path.read_bytes()[: 64 * 2**20])
    except (ValueError, OSError):
        return False
    return isinstance(document, dict) and document.get("format") == record_format


def check_output_location(
    out: str | os.PathLike,
    *,
    overwrite: bool,
    inputs: dict[str, str | os.PathLike],
    record: tuple[str, str] | None = None,
) -> list[str]:
    """Problems with writing to `out`, as lines for a plan (nothing is touched).

    Everything the final rename needs is checked here, before any work: `out` names a folder
    (not `.`), is no symbolic link and no mount point (neither can be replaced by a rename). An
    output that is, contains or lies inside an input, or whose `<out>.partial` working folder
    would be an input, is always refused. An existing output is replaced only with `overwrite`,
    and only when it is empty or holds `record` (file name, format): its own command's record.
    """
    problems: list[str] = []
    out_path = Path(out)
    if out_path.name in ("", ".", "..") or not str(out).strip():
        return [f"--out {str(out)!r} does not name a new folder; give a folder name, e.g. {os.path.join(str(out) or '.', 'result')}"]
    resolved = out_path.resolve()
    partial = partial_path(resolved)
    for role, location in inputs.items():
        if str(location).startswith("hf://") or not str(location):
            continue
        input_path = Path(location).resolve()
        if resolved == input_path or resolved.is_relative_to(input_path) or input_path.is_relative_to(resolved):
            problems.append(f"--out {out} overlaps the {role} input {location}; choose an output outside every input")
        elif partial == input_path or input_path.is_relative_to(partial):
            problems.append(
                f"the working folder {partial} of --out {out} is the {role} input {location}; "
                "move that input or choose another --out"
            )
    if problems:
        return problems
    if out_path.is_symlink():
        target = os.readlink(out_path)
        return [f"--out {out} is a symbolic link (to {target}); the finished output replaces it by a rename, so give the real path"]
    if not out_path.exists():
        return problems
    if not overwrite:
        problems.append(f"--out {out} already exists; pass --overwrite to replace it, or choose another path")
    elif not out_path.is_dir():
        problems.append(f"--out {out} exists and is not a directory; remove it or choose another path")
    elif is_mount_point(out_path):
        problems.append(f"--out {out} is a mount point, which cannot be replaced by a rename; give a new folder inside it")
    elif any(out_path.iterdir()) and (record is None or not holds_record(out_path, *record)):
        what = f"holds no {record[0]}" if record else "is not empty"
        problems.append(
            f"--out {out} {what}, so it is not an earlier output of this command; --overwrite replaces only those "
            "(or an empty folder): move it away yourself or choose another path"
        )
    return problems


def is_mount_point(path: str | os.PathLike) -> bool:
    """Whether `path` is a mount point, bind mounts of the same file system included.

    `os.path.ismount` compares the device of a folder with its parent's, which a bind mount of a
    folder of the same file system shares: the kernel's mount table (`MOUNTINFO_PATH`, Linux)
    lists those too.
    """
    if os.path.ismount(path):
        return True
    try:
        table = Path(MOUNTINFO_PATH).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    resolved = str(Path(path).resolve())
    for line in table.splitlines():
        fields = line.split()
        # `ID PARENT MAJOR:MINOR ROOT MOUNT_POINT ...`, with space, tab, newline and `\` as octal escapes.
        if len(fields) > 4 and re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), fields[4]) == resolved:
            return True
    return False


def overlapping_outputs(outputs: Sequence[tuple[str, str]]) -> list[str]:
    """Problems for outputs of one run that would write into each other, as lines for a plan.

    Two outputs overlap when they are one folder, one lies inside the other, or one lies at or
    inside the other's working folder `<out>.partial` (nothing is touched; Hub locations are
    apart by nature). Checked before any work: the second output's commit would fail only after
    the whole run, and neither --resume nor --overwrite could get past it.

    Args:
        outputs: (flag, location) of every output of the run.
    """
    local = [(flag, str(location), Path(location).resolve()) for flag, location in outputs if str(location) and not str(location).startswith("hf://")]
    problems: list[str] = []
    for position, (flag, location, resolved) in enumerate(local):
        for other_flag, other, other_resolved in local[position + 1 :]:
            if resolved == other_resolved:
                problems.append(f"{flag} {location} and {other_flag} {other} are the same folder; the outputs of one run must lie apart")
                continue
            for inner_flag, inner, inner_path, outer_flag, outer, outer_path in (
                (other_flag, other, other_resolved, flag, location, resolved),
                (flag, location, resolved, other_flag, other, other_resolved),
            ):
                if inner_path.is_relative_to(outer_path) or inner_path.is_relative_to(partial_path(outer_path)):
                    where = "" if inner_path.is_relative_to(outer_path) else f"'s working folder {partial_path(outer)}"
                    problems.append(
                        f"{inner_flag} {inner} lies inside {outer_flag} {outer}{where}; the outputs of one run must lie apart: "
                        f"give {inner_flag} a folder outside {outer}"
                    )
    return problems


def remove_stale_partials(root: str | os.PathLike | None, prefix: str) -> list[Path]:
    """Remove the partial folders named `<prefix>*.partial` in `root` (default: the system
    temporary folder) that a killed run left: those this tool marked (a folder is marked only
    once its run holds the lock) and no running process holds locked. Returns what was removed.

    Working folders in the temporary folder (a Hub push's staging, the one pass's state for a
    push) have no `--out` a rerun would come back to; this is how they are cleaned.
    """
    removed = []
    for folder in sorted(Path(root or tempfile.gettempdir()).glob(f"{prefix}*{PARTIAL_SUFFIX}")):
        if not (folder / PARTIAL_MARKER_NAME).is_file():
            continue  # not ours, or one a run has created and not yet locked and marked
        try:
            AtomicOutputDir(folder.with_name(folder.name[: -len(PARTIAL_SUFFIX)]), overwrite=False).discard()
        except (OutputExistsError, OSError):
            continue  # another run's, still running; or not ours
        if not folder.exists():
            removed.append(folder)
    return removed


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
        if not self._partial_is_ours():
            return
        if not self._keep_partial:
            note = self.stopped_note()
            if note:
                raise OutputExistsError(
                    f"{self.partial} exists from an earlier run that stopped because: {note} -- once that is fixed, rerun "
                    "with --resume to keep its finished work, or delete that folder to start over"
                )
            raise OutputExistsError(
                f"{self.partial} exists from an earlier run that did not finish; rerun the same command with --resume "
                "to continue it, or delete that folder to start over"
            )

    def note_stopped(self, reason: str) -> None:
        """Record in the partial folder why this run stopped, when rerunning it unchanged with
        --resume would stop the same way (an input rewritten, statistics of another model);
        the next run's advice then says so. A resumed run removes the note."""
        try:
            (self.partial / STOPPED_NOTE_NAME).write_text(" ".join(reason.split())[:_MAX_NOTE_CHARS], encoding="utf-8")
        except OSError:
            pass  # only advice is lost

    def stopped_note(self) -> str | None:
        """The note `note_stopped` left, if any."""
        try:
            with open(self.partial / STOPPED_NOTE_NAME, encoding="utf-8", errors="replace") as handle:
                return handle.read(_MAX_NOTE_CHARS) or None
        except OSError:
            return None

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
            created = not self.partial.exists()
            if created:
                self.partial.mkdir(parents=True)
            lock_fd = os.open(self.partial, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
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
            lock_fd = None
        self._lock_fd = lock_fd
        # Marked once locked: a marked folder whose lock is free is one whose run has ended
        # (remove_stale_partials relies on it).
        if created:
            self._write_marker()
        (self.partial / STOPPED_NOTE_NAME).unlink(missing_ok=True)
        return self.partial

    def _write_marker(self) -> None:
        try:
            (self.partial / PARTIAL_MARKER_NAME).write_bytes(b"")
        except OSError as exc:
            self.release()
            raise WriteError(f"cannot create {self.partial}: {exc.strerror or exc}") from exc

    def release(self) -> None:
        """Unlock the folder (a failed run's partial folder stays for a resume); idempotent."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def discard(self) -> None:
        """Delete an unfinished partial folder this tool made (a fresh start).

        Raises:
            OutputExistsError: the folder is not this tool's, or a running process holds it
                (its lock); it is left alone.
        """
        if not self._partial_is_ours():
            return
        try:
            lock_fd = os.open(self.partial, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            lock_fd = None
        if lock_fd is not None:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputExistsError(f"{self.partial} is being written by another running process; wait for it to end (or stop it)") from None
            except OSError:
                pass  # a file system without locks
            finally:
                os.close(lock_fd)
        shutil.rmtree(self.partial)

    def _partial_is_ours(self) -> bool:
        """False when there is no partial folder; True when there is one this tool made.

        Raises:
            OutputExistsError: a partial folder someone else made; it is never reused or removed.
        """
        if not (self.partial.exists() or self.partial.is_symlink()):
            return False
        if not is_own_partial(self.partial):
            raise OutputExistsError(
                f"{self.partial} exists and was not made by perta-stream (no {PARTIAL_MARKER_NAME}); "
                "it is never reused or removed: move it away, or choose another --out"
            )
        return True

    def commit(self) -> Path:
        """Rename the finished partial folder to `out` (replacing it when overwrite was asked).

        The replaced output is first renamed into an empty folder this call creates under a fresh
        name (`<out>.replaced-XXXX`), so the only thing ever deleted is what was at `out`.
        """
        _fsync_dir(self.partial)
        trash = None
        if self.out.exists() or self.out.is_symlink():
            if not self._overwrite:
                raise OutputExistsError(f"--out {self.out} appeared during the run; pass --overwrite to replace it")
            try:
                trash = Path(tempfile.mkdtemp(prefix=f"{self.out.name}.replaced-", dir=self.out.parent))
                os.replace(self.out, trash)
            except OSError as exc:
                raise WriteError(
                    f"cannot move the old --out {self.out} aside ({exc.strerror or exc}); the finished output stays in "
                    f"{self.partial}: move it into place by hand"
                ) from exc
        os.replace(self.partial, self.out)
        _fsync_dir(self.out.parent)
        self.release()
        (self.out / PARTIAL_MARKER_NAME).unlink(missing_ok=True)
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
