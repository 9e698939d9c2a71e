"""The resume record of a `<out>.partial/` folder, shared by `merge` and `stats`.

`.perta_resume.json` holds the run's fingerprint (a digest of every input and option the output
bytes depend on) and, for each finished shard, its size and sha256. It is rewritten atomically
after every shard, so an interrupted run can continue: on `--resume` each listed shard is
re-hashed before it is trusted, and a different fingerprint is refused. Pipelines may keep more
keys in it (`stats` keeps its mean losses and its latest resume state); readers ignore keys they
do not know.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from perta_stream.errors import ResumeError
from perta_stream.hashing import file_sha256
from perta_stream.sinks.atomic_file import write_bytes_atomically
from perta_stream.sinks.output_dir import PARTIAL_MARKER_NAME
from perta_stream.sinks.shard_writer import TMP_SUFFIX, ShardRecord

RESUME_RECORD_NAME = ".perta_resume.json"
RESUME_HINT = "fix the cause and rerun with --resume"


def write_resume_record(path: Path, fingerprint: str, finished: Mapping[str, ShardRecord], **extra: Any) -> None:
    """Atomically (re)write a resume record: the fingerprint, the finished shards, any `extra` keys.

    Raises:
        WriteError: naming the file; the previous record stays intact.
    """
    record = {
        "fingerprint": fingerprint,
        "finished_shards": {name: {"size_bytes": r.size_bytes, "sha256": r.sha256} for name, r in finished.items()},
        **extra,
    }
    write_bytes_atomically(path, json.dumps(record, indent=1).encode(), hint=RESUME_HINT)


def read_resume_record(
    partial: Path, path: Path, fingerprint: str, *, explain: Callable[[dict[str, Any]], str] | None = None
) -> dict[str, Any] | None:
    """The record at `path` of an earlier run in `partial`, checked against this run's fingerprint.

    Returns None when the folder holds no record and nothing but unfinished (`.tmp`) files and
    the partial marker: the earlier run was killed between creating the folder and writing its
    first record.

    Args:
        explain: given the record of another run, says what differs (added to the refusal).

    Raises:
        ResumeError: the record is missing from a folder that holds other files, is unreadable,
            or was written for other inputs or options.
    """
    if not path.is_file():
        if all(entry.name.endswith(TMP_SUFFIX) or entry.name == PARTIAL_MARKER_NAME for entry in partial.iterdir()):
            return None
        raise ResumeError(f"{partial} has no {RESUME_RECORD_NAME}; it was not written by this tool: delete it and rerun")
    try:
        record = json.loads(path.read_text())
        if not isinstance(record["finished_shards"], dict) or not isinstance(record["fingerprint"], str):
            raise TypeError("finished_shards or fingerprint has the wrong type")
    except (ValueError, KeyError, TypeError) as exc:
        raise ResumeError(f"{path} is unreadable ({exc}); delete {partial} and rerun without --resume") from None
    if record["fingerprint"] != fingerprint:
        difference = explain(record) if explain is not None else ""
        raise ResumeError(
            f"{partial} was started with other inputs or options{f' ({difference})' if difference else ''}; "
            f"rerun the original command with --resume, or delete {partial} to start over"
        )
    return record


def verified_shards(partial: Path, record: Mapping[str, Any]) -> dict[str, ShardRecord]:
    """The shards a resume record lists that are still intact, each re-hashed; others are deleted.

    Shard names are paths relative to `partial` (a sub-directory is allowed).
    """
    kept: dict[str, ShardRecord] = {}
    for file_name, entry in record["finished_shards"].items():
        relative = Path(file_name)
        if relative.is_absolute() or ".." in relative.parts:
            continue  # not a file of this folder: never trusted, never deleted
        shard_path = partial / relative
        try:
            size_bytes, sha256 = int(entry["size_bytes"]), str(entry["sha256"])
        except (KeyError, TypeError, ValueError):
            size_bytes, sha256 = -1, ""
        if shard_path.is_file() and shard_path.stat().st_size == size_bytes and file_sha256(shard_path) == sha256:
            kept[file_name] = ShardRecord(file_name, size_bytes, sha256)
        else:
            shard_path.unlink(missing_ok=True)
    return kept
