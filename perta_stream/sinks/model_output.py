"""One merged checkpoint being written: shards, side files, index, model card, run record.

`LocalModelOutput` writes into `<out>.partial/` and renames it at the end. It also keeps a small
resume record there (`.perta_resume.json`: the run's fingerprint and each finished shard's
sha256), rewritten atomically after every shard, so an interrupted run can continue where it
stopped. The Hub output (sinks/hub_output.py) implements the same methods and uploads instead.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from perta_stream.errors import ResumeError, WriteError
from perta_stream.sinks.output_dir import AtomicOutputDir
from perta_stream.sinks.shard_writer import TMP_SUFFIX, ShardRecord, ShardWriter, TensorSpec

RESUME_RECORD_NAME = ".perta_resume.json"
SAFETENSORS_METADATA = {"format": "pt"}


class ModelOutput(Protocol):
    """Where one merged checkpoint goes (a local folder or a Hub repo)."""

    location: str

    def open(self, fingerprint: str) -> dict[str, ShardRecord]:
        """Prepare the output; return shards already finished by an interrupted identical run."""

    def begin_shard(self, file_name: str, tensors: Sequence[TensorSpec]) -> ShardWriter:
        """A writer for the next shard."""

    def shard_finished(self, record: ShardRecord) -> None:
        """Called after a shard is complete under its final name."""

    def finished_shards(self) -> dict[str, ShardRecord]:
        """Every shard finished so far (this run's and a resumed run's), by file name."""

    def write_file(self, file_name: str, data: bytes) -> None:
        """Write a small file (index, card, record) into the output."""

    def staging_path(self, file_name: str) -> Path:
        """The local path a file of the output is staged at (for side-file copies)."""

    def commit(self) -> str:
        """Make the output visible at its final location, all at once; return that location."""

    def abort(self) -> None:
        """Drop what is unfinished; finished shards stay for a resume."""


class LocalModelOutput:
    """A merged checkpoint written to a local directory, atomically."""

    def __init__(self, out_dir: str | os.PathLike, *, overwrite: bool, resume: bool):
        self.location = str(out_dir)
        self._atomic = AtomicOutputDir(out_dir, overwrite=overwrite, keep_partial=resume)
        self._resume = resume
        self._finished: dict[str, ShardRecord] = {}
        self._fingerprint = ""
        self._writer: ShardWriter | None = None

    @property
    def partial(self) -> Path:
        return self._atomic.partial

    def open(self, fingerprint: str) -> dict[str, ShardRecord]:
        self._fingerprint = fingerprint
        existed = self.partial.exists()
        self._atomic.open()
        if self._resume and existed:
            self._finished = _load_resume_record(self.partial, fingerprint)
        for leftover in self.partial.glob(f"*{TMP_SUFFIX}"):
            leftover.unlink()
        self._save_resume_record()
        return dict(self._finished)

    def begin_shard(self, file_name: str, tensors: Sequence[TensorSpec]) -> ShardWriter:
        self._writer = ShardWriter(self.partial / file_name, tensors, SAFETENSORS_METADATA)
        return self._writer

    def shard_finished(self, record: ShardRecord) -> None:
        self._writer = None
        self._finished[record.file_name] = record
        self._save_resume_record()

    def finished_shards(self) -> dict[str, ShardRecord]:
        return dict(self._finished)

    def write_file(self, file_name: str, data: bytes) -> None:
        _write_atomically(self.partial / file_name, data)

    def staging_path(self, file_name: str) -> Path:
        return self.partial / file_name

    def commit(self) -> str:
        # Rename first, then drop the resume record: a crash in between leaves a complete output
        # with a stray hidden file, never a partial folder that can no longer be resumed.
        out = self._atomic.commit()
        (out / RESUME_RECORD_NAME).unlink(missing_ok=True)
        return str(out)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def _save_resume_record(self) -> None:
        record = {
            "fingerprint": self._fingerprint,
            "finished_shards": {name: {"size_bytes": r.size_bytes, "sha256": r.sha256} for name, r in self._finished.items()},
        }
        _write_atomically(self.partial / RESUME_RECORD_NAME, json.dumps(record, indent=1).encode())


def _load_resume_record(partial: Path, fingerprint: str) -> dict[str, ShardRecord]:
    """Finished shards of an earlier identical run, each re-hashed before it is trusted."""
    path = partial / RESUME_RECORD_NAME
    if not path.is_file():
        if all(entry.name.endswith(TMP_SUFFIX) for entry in partial.iterdir()):
            # Killed between creating the folder and writing the first record: nothing was finished.
            return {}
        raise ResumeError(f"{partial} has no {RESUME_RECORD_NAME}; it was not written by this tool: delete it and rerun")
    try:
        record = json.loads(path.read_text())
        finished = record["finished_shards"]
        recorded_fingerprint = record["fingerprint"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ResumeError(f"{path} is unreadable ({exc}); delete {partial} and rerun without --resume") from None
    if recorded_fingerprint != fingerprint:
        raise ResumeError(
            f"{partial} was started with other inputs or options; rerun the original command with --resume, "
            f"or delete {partial} to start over"
        )
    kept: dict[str, ShardRecord] = {}
    for file_name, entry in finished.items():
        shard_path = partial / file_name
        if shard_path.is_file() and shard_path.stat().st_size == entry["size_bytes"] and file_sha256(shard_path) == entry["sha256"]:
            kept[file_name] = ShardRecord(file_name, entry["size_bytes"], entry["sha256"])
        else:
            shard_path.unlink(missing_ok=True)
    return kept


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"{path}: write failed ({exc.strerror or exc}); fix the cause and rerun with --resume") from exc
