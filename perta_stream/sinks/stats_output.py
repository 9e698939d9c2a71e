"""The `<out>.partial/` folder of a statistics run, and what lets an interrupted run resume.

While a run lasts, the folder holds, next to the statistics StatsStore writes:
  .perta_resume.json                         the resume record (sinks/resume_record.py): the
                                             fingerprint and the options it was made of, every
                                             finished shard's sha256, the mean losses, and which
                                             resume state is the latest
  .perta_stats_state.<position>.safetensors  the latest resume state (compute/stats/resume_state.py):
                                             raw tensors in a safetensors file, never a pickle
  perta-boundaries-*/                        boundary spill files (deleted when a run ends)
A state is written under a new name (temporary name, fsync, rename), then the record is
rewritten to point at it, then the older state is deleted: a crash at any moment leaves a record
that names a complete state. At the end the record is rewritten without a state, the state is
deleted, the folder is renamed to `<out>`, and the record is deleted from it.

Saving a state writes tokens × hidden values (plus, with tied embeddings, the tied sums), so it
happens at a resume point only when `checkpoint_interval_s` has passed since the last save (or
since the run started); 0 saves at every resume point.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from perta_stream.compute.stats.resume_state import ResumeState, SavedTensor
from perta_stream.dtypes import safetensors_dtype, torch_dtype
from perta_stream.errors import HeaderError, PertaStreamError, ResumeError
from perta_stream.sinks.output_dir import AtomicOutputDir
from perta_stream.hashing import file_sha256
from perta_stream.sinks.resume_record import RESUME_RECORD_NAME, read_resume_record, verified_shards, write_resume_record
from perta_stream.sinks.shard_writer import TMP_SUFFIX, ShardRecord, ShardWriter, TensorSpec
from perta_stream.sources.safetensors_header import read_local_header

logger = logging.getLogger(__name__)

STATE_PREFIX = ".perta_stats_state."
STATE_FORMAT = "perta_stats_resume"


@dataclass(frozen=True)
class ResumedRun:
    """What an interrupted identical run left that this run may continue from.

    Attributes:
        finished: relative shard path -> record, each re-hashed and intact.
        mean_loss: the losses the head reported (empty when the head had not finished).
        next_layer: the saved state's position (see ResumeState.next_layer), or None without one.
        tensors: the saved state's tensors (empty without one).
    """

    finished: dict[str, ShardRecord]
    mean_loss: dict[str, float]
    next_layer: int | None
    tensors: tuple[SavedTensor, ...]


class StatsOutput:
    """The partial folder of one statistics run: resume record, resume states, final rename.

    Args:
        out: the final statistics directory.
        overwrite: replace an existing `out` at the end.
        resume: continue from an existing `<out>.partial/` (without it, one is refused).
        checkpoint_interval_s: the least time between two saved resume states; 0 saves at
            every resume point.
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(
        self,
        out: str | os.PathLike,
        *,
        overwrite: bool,
        resume: bool,
        checkpoint_interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._atomic = AtomicOutputDir(out, overwrite=overwrite, keep_partial=resume)
        self._resume = resume
        self._interval_s = checkpoint_interval_s
        self._clock = clock
        self._last_save = clock()
        self._fingerprint = ""
        self._identity: dict[str, Any] = {}
        self._finished: dict[str, ShardRecord] = {}
        self._mean_loss: dict[str, float] = {}
        self._state: dict[str, Any] | None = None
        # Shards are finished on the writer thread while the sweep offers states on its own.
        self._record_lock = threading.Lock()

    @property
    def partial(self) -> Path:
        return self._atomic.partial

    def open(self, identity: Mapping[str, Any]) -> ResumedRun:
        """Create `<out>.partial/`, or take over the one an identical interrupted run left.

        Args:
            identity: every input and option the statistics' bytes depend on (JSON values);
                its digest is the run's fingerprint.

        Raises:
            OutputExistsError: a partial folder exists and resume was not asked.
            ResumeError: the partial folder belongs to other inputs or options, or is not this tool's.
            WriteError: the folder cannot be created or the record written.
        """
        self._identity = json.loads(json.dumps(dict(identity), sort_keys=True))
        self._fingerprint = hashlib.sha256(json.dumps(self._identity, sort_keys=True).encode()).hexdigest()
        existed = self.partial.exists()
        self._atomic.open()
        resumed = ResumedRun({}, {}, None, ())
        if self._resume and existed:
            resumed = self._take_over()
        for leftover in self.partial.rglob(f"*{TMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)
        self._last_save = self._clock()
        self._save_record()
        return resumed

    def _take_over(self) -> ResumedRun:
        record = read_resume_record(self.partial, self.partial / RESUME_RECORD_NAME, self._fingerprint, explain=self._explain)
        if record is None:
            return ResumedRun({}, {}, None, ())
        self._finished = verified_shards(self.partial, record)
        for shard in self.partial.glob("*/*.safetensors"):
            if shard.relative_to(self.partial).as_posix() not in self._finished:
                shard.unlink()  # finished after the record was last written: redone, identically
        loss = record.get("mean_loss")
        self._mean_loss = {str(k): float(v) for k, v in loss.items()} if isinstance(loss, dict) else {}
        self._state = self._verified_state(record.get("state"))
        for path in self._state_files():
            if self._state is None or path.name != self._state["file_name"]:
                path.unlink()
        if self._state is None:
            return ResumedRun(dict(self._finished), dict(self._mean_loss), None, ())
        tensors = self._read_state(self.partial / self._state["file_name"])
        return ResumedRun(dict(self._finished), dict(self._mean_loss), self._state["next_layer"], tensors)

    def _explain(self, record: Mapping[str, Any]) -> str:
        """The options that differ from the interrupted run's, for the refusal."""
        before = record.get("identity")
        if not isinstance(before, dict):
            return ""
        changed = []
        for key in sorted(set(before) | set(self._identity)):
            old, new = before.get(key), self._identity.get(key)
            if old == new:
                continue
            # Short values are shown; digests and file lists are only named.
            if len(repr(old)) + len(repr(new)) < 120 and not key.endswith(("sha256", "_files")):
                changed.append(f"{key}: {old!r} then, {new!r} now")
            else:
                changed.append(f"{key} differs")
        return "; ".join(changed)

    def _verified_state(self, entry: Any) -> dict[str, Any] | None:
        """The record's state entry when its file is intact, else None (the run starts over, keeping the shards)."""
        if entry is None:
            return None
        try:
            file_name, next_layer = str(entry["file_name"]), int(entry["next_layer"])
            size_bytes, sha256 = int(entry["size_bytes"]), str(entry["sha256"])
        except (KeyError, TypeError, ValueError):
            logger.warning("%s: the resume state entry is unreadable; recomputing from the start (finished shards are kept)", self.partial / RESUME_RECORD_NAME)
            return None
        path = self.partial / file_name
        named_here = file_name.startswith(STATE_PREFIX) and "/" not in file_name
        if not (named_here and path.is_file() and path.stat().st_size == size_bytes and file_sha256(path) == sha256):
            logger.warning("%s is missing or damaged; recomputing from the start (finished shards are kept)", path)
            return None
        return {"file_name": file_name, "next_layer": next_layer, "size_bytes": size_bytes, "sha256": sha256}

    def _read_state(self, path: Path) -> tuple[SavedTensor, ...]:
        try:
            header = read_local_header(str(path))
        except HeaderError as exc:
            raise ResumeError(f"{path}: {exc}; delete {self.partial} and rerun without --resume") from None
        if header.metadata.get("format") != STATE_FORMAT:
            raise ResumeError(f"{path} is not a resume state of this tool; delete {self.partial} and rerun without --resume")

        def reader(begin: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> Callable[[], torch.Tensor]:
            def read() -> torch.Tensor:
                raw = torch.empty(nbytes, dtype=torch.uint8)
                with open(path, "rb") as handle:
                    handle.seek(begin)
                    if handle.readinto(memoryview(raw.numpy())) != nbytes:
                        raise ResumeError(f"{path} is truncated; delete {self.partial} and rerun without --resume")
                return raw.view(dtype).reshape(shape)

            return read

        return tuple(
            SavedTensor(name, torch_dtype(info.dtype), info.shape, reader(info.begin, info.nbytes, torch_dtype(info.dtype), info.shape))
            for name, info in header.tensors.items()
        )

    def shard_finished(self, record: ShardRecord) -> None:
        """Record a shard (path relative to the folder) as finished, with its sha256 (from any thread)."""
        with self._record_lock:
            self._finished[record.file_name] = record
            self._save_record()

    def offer_state(self, state: ResumeState, *, before_save: Callable[[], None] = lambda: None) -> None:
        """A resume point: save `state` when the checkpoint interval has passed, else only the losses.

        Args:
            before_save: runs first when the state is saved (e.g. to wait until every group
                before it is on disk and in the record).

        Raises:
            WriteError: the state or the record could not be written (the previous state stays).
        """
        if self._clock() - self._last_save < self._interval_s:
            if dict(state.mean_loss) != self._mean_loss:
                with self._record_lock:
                    self._mean_loss = dict(state.mean_loss)
                    self._save_record()
            return
        before_save()
        position = "embedding" if state.next_layer < 0 else f"layer-{state.next_layer}"
        path = self.partial / f"{STATE_PREFIX}{position}.safetensors"
        specs = [TensorSpec(t.name, safetensors_dtype(t.dtype), tuple(t.shape)) for t in state.tensors]
        writer = ShardWriter(path, specs, {"format": STATE_FORMAT, "next_layer": str(state.next_layer)})
        try:
            for tensor, spec in zip(state.tensors, specs):
                data = tensor.read().detach().cpu().contiguous()
                if tuple(data.shape) != spec.shape or data.dtype != tensor.dtype:
                    raise PertaStreamError(f"resume state tensor {tensor.name}: {data.dtype} {list(data.shape)}, announced {tensor.dtype} {list(spec.shape)}")
                writer.write(memoryview(data.view(torch.uint8).reshape(-1).numpy()))
            written = writer.finish()
        except BaseException:
            writer.abort()
            raise
        with self._record_lock:
            self._mean_loss = dict(state.mean_loss)
            self._state = {"file_name": path.name, "next_layer": state.next_layer, "size_bytes": written.size_bytes, "sha256": written.sha256}
            self._save_record()
        for older in self._state_files():
            if older.name != path.name:
                older.unlink(missing_ok=True)
        self._last_save = self._clock()
        logger.info("saved the resume state at %s (%d bytes)", position, written.size_bytes)

    def note_stopped(self, reason: str) -> None:
        """Say in the partial folder why this run stopped (see AtomicOutputDir.note_stopped)."""
        self._atomic.note_stopped(reason)

    def close(self) -> None:
        """Unlock the partial folder (after a failure it stays for --resume); idempotent."""
        self._atomic.release()

    def __enter__(self) -> "StatsOutput":
        return self

    def __exit__(self, *exc_info: object) -> None:
        # The partial folder stays locked while this run writes it, whatever ends the run.
        self.close()

    def commit(self) -> Path:
        """Drop the resume state, rename the folder to `out`, then drop the record; returns `out`."""
        # Record first: a crash after it leaves a folder whose record names no state, which a
        # resume finishes without computing (every shard is listed).
        self._state = None
        self._save_record()
        for path in self._state_files():
            path.unlink(missing_ok=True)
        out = self._atomic.commit()
        (out / RESUME_RECORD_NAME).unlink(missing_ok=True)
        return out

    def _state_files(self) -> list[Path]:
        return [p for p in self.partial.glob(f"{STATE_PREFIX}*") if not p.name.endswith(TMP_SUFFIX)]

    def _save_record(self) -> None:
        write_resume_record(
            self.partial / RESUME_RECORD_NAME,
            self._fingerprint,
            self._finished,
            identity=self._identity,
            mean_loss=self._mean_loss,
            state=self._state,
        )
