"""One merged checkpoint being written: shards, side files, index, model card, run record.

`LocalModelOutput` writes into `<out>.partial/` and renames it at the end. It also keeps a small
resume record there (`.perta_resume.json`: the run's fingerprint and each finished shard's
sha256), rewritten atomically after every shard, so an interrupted run can continue where it
stopped. The Hub output (sinks/hub_output.py) implements the same methods and uploads instead.

Under a launcher several ranks write shards into one `<out>.partial/`. Rank 0 prepares the
folder (`open`), the others join it; each rank > 0 keeps its own resume record
(`.perta_resume.rank-<r>.json`), so no two processes ever write one file. Rank 0 adopts the
other ranks' shards (`add_finished`) before it writes the index and commits; a resumed run, with
any number of ranks, reads every rank's record.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from perta_stream.errors import WriteError
from perta_stream.sinks.atomic_file import write_bytes_atomically
from perta_stream.sinks.output_dir import AtomicOutputDir
from perta_stream.sinks.resume_record import RESUME_HINT, RESUME_RECORD_NAME, read_resume_record, verified_shards, write_resume_record
from perta_stream.sinks.shard_writer import TMP_SUFFIX, ShardRecord, ShardWriter, TensorSpec

__all__ = ["RESUME_RECORD_NAME", "LocalModelOutput", "ModelOutput", "rank_record_name"]
RANK_RECORD_GLOB = ".perta_resume.rank-*.json"
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

    def note_stopped(self, reason: str) -> None:
        """Say, where a later run looks (the partial folder), why this run stopped."""

    def close(self) -> None:
        """Let go of the output (a local folder's lock) once the run has ended, however it ended."""


def copy_side_files(output: ModelOutput, source: Any, names: Sequence[str]) -> dict[str, str]:
    """Copy θ_full's side files (config, tokenizer, ...) byte for byte into `output`; returns
    each one's sha256, which the run record keeps for `verify`.

    Raises:
        WriteError: a copy failed (a full disk); the shards stay finished for --resume.
    """
    from perta_stream.errors import PertaStreamError
    from perta_stream.hashing import file_sha256

    digests = {}
    for file_name in names:
        try:
            source.fetch_file(file_name, output.staging_path(file_name))
            digests[file_name] = file_sha256(output.staging_path(file_name))
        except PertaStreamError:
            raise
        except OSError as exc:
            # A full disk during finalization: the shards stay finished and the rerun redoes only this.
            raise WriteError(
                f"copying side file {file_name} into {output.location} failed ({exc.strerror or exc}); fix the cause and rerun with --resume"
            ) from exc
    return digests


def rank_record_name(rank: int) -> str:
    """The resume record of rank `rank` (rank 0 keeps the main one)."""
    return RESUME_RECORD_NAME if rank == 0 else f".perta_resume.rank-{rank}.json"


class LocalModelOutput:
    """A merged checkpoint written to a local directory, atomically.

    Args:
        out_dir: the final directory.
        overwrite: replace an existing `out_dir` at commit.
        resume: continue from an existing `<out>.partial/`.
        rank: this process's rank in a launched run; ranks > 0 only write shards into the folder
            rank 0 opened (on a file system every node sees), never commit.
    """

    def __init__(self, out_dir: str | os.PathLike, *, overwrite: bool, resume: bool, rank: int = 0):
        self.location = str(out_dir)
        self._atomic = AtomicOutputDir(out_dir, overwrite=overwrite, keep_partial=resume)
        self._resume = resume
        self._rank = rank
        self._finished: dict[str, ShardRecord] = {}
        self._fingerprint = ""
        self._writer: ShardWriter | None = None

    @property
    def partial(self) -> Path:
        return self._atomic.partial

    def open(self, fingerprint: str) -> dict[str, ShardRecord]:
        self._fingerprint = fingerprint
        if self._rank != 0:
            return self._join()
        existed = self.partial.exists()
        self._atomic.open()
        if self._resume and existed:
            self._finished = _load_resume_record(self.partial, self.partial / RESUME_RECORD_NAME, fingerprint)
            for path in sorted(self.partial.glob(RANK_RECORD_GLOB)):
                self._finished.update(_load_resume_record(self.partial, path, fingerprint))
        for leftover in self.partial.glob(f"*{TMP_SUFFIX}"):
            leftover.unlink()
        self._save_resume_record()
        self._drop_rank_records()
        return dict(self._finished)

    def _join(self) -> dict[str, ShardRecord]:
        # Rank 0 has created (or resumed) the folder and cleaned it; touching leftovers here
        # could delete another rank's shard in progress. The finished shards are rank 0's to tell.
        if not self.partial.is_dir():
            raise WriteError(
                f"rank {self._rank} cannot see {self.partial}, which rank 0 created; with several nodes, "
                "--out must be on a file system every node mounts at the same path"
            )
        return {}

    def add_finished(self, records: Sequence[ShardRecord]) -> None:
        """Rank 0 adopts shards the other ranks finished (their records then become redundant)."""
        for record in records:
            self._finished[record.file_name] = record
        self._save_resume_record()
        self._drop_rank_records()

    def _drop_rank_records(self) -> None:
        for path in self.partial.glob(RANK_RECORD_GLOB):
            path.unlink(missing_ok=True)

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
        write_bytes_atomically(self.partial / file_name, data, hint=RESUME_HINT)

    def staging_path(self, file_name: str) -> Path:
        return self.partial / file_name

    def commit(self) -> str:
        if self._rank != 0:
            raise WriteError(f"rank {self._rank} tried to commit {self.location}; only rank 0 commits")
        # Rename first, then drop the resume record: a crash in between leaves a complete output
        # with a stray hidden file, never a partial folder that can no longer be resumed.
        out = self._atomic.commit()
        (out / RESUME_RECORD_NAME).unlink(missing_ok=True)
        return str(out)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def note_stopped(self, reason: str) -> None:
        self._atomic.note_stopped(reason)

    def close(self) -> None:
        self._atomic.release()

    def _save_resume_record(self) -> None:
        write_resume_record(self.partial / rank_record_name(self._rank), self._fingerprint, self._finished)


def _load_resume_record(partial: Path, path: Path, fingerprint: str) -> dict[str, ShardRecord]:
    """Finished shards of an earlier identical run, each re-hashed before it is trusted."""
    record = read_resume_record(partial, path, fingerprint)
    return {} if record is None else verified_shards(partial, record)
