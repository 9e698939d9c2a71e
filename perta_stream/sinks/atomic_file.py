"""Small files written all at once: a temporary file in the same folder, fsynced, then renamed."""

from __future__ import annotations

import os
from pathlib import Path

from perta_stream.errors import WriteError


def write_bytes_atomically(path: str | os.PathLike, data: bytes, *, hint: str = "fix the cause and rerun") -> Path:
    """Write `data` to `path` so that `path` holds either its old content or all of `data`.

    The temporary name ends in `.tmp` (unfinished files are recognized by that suffix) and is
    created with open(), so the file gets the user's umask permissions like any other output.

    Raises:
        WriteError: naming the file and the cause, followed by `hint`.
    """
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException as exc:
        # Interrupted (SIGINT, SIGTERM) or failed: no stray temporary file either way.
        temporary.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise WriteError(f"{target}: write failed ({exc.strerror or exc}); {hint}") from exc
        raise
    return target


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """`write_bytes_atomically` for UTF-8 text."""
    return write_bytes_atomically(path, text.encode("utf-8"))
