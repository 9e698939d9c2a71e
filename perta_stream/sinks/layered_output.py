"""Merged checkpoints whose tensors arrive out of shard order (the one-pass unlearn's outputs).

A merge writes each output shard front to back. The one-pass unlearn cannot: statistics finish
layer by layer from the last layer down (then the embeddings), while θ_full's shards list
layers upwards. So every output shard is created at its full size up front (header written,
data area sized) under `<shard>.inprogress`, and each merged chunk is written with `os.pwrite`
at its own offset, in whatever order it comes. Once every tensor of a shard is in, the file is
fsynced, hashed by reading it back (the one extra read of the output this costs is sequential),
renamed to its final name and reported to the model output (`shard_finished`),
exactly as a merged shard is. That finishing runs on a thread of its own, so the merge step goes
on with the next tensors meanwhile: on a GPU the merge step's thread sets the pace of the whole
pass, and sha256 alone runs at about 1 GB/s on one core. Finished shards are reported on the
caller's thread, at the next write of a tensor, at a checkpoint and at the end.

Resume: after each group the pipeline calls `checkpoint()`, which fdatasyncs the shards in
progress and records, in `.perta_one_pass.json` (atomically, with the run's fingerprint), which
tensors each of them holds. A resumed run keeps those files and tensors; the record is written
only after the bytes it lists are on disk, so it never claims a tensor that is not there. The
record is removed before the output is committed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from perta_stream.errors import PertaStreamError, WriteError
from perta_stream.sinks.atomic_file import write_bytes_atomically
from perta_stream.sinks.model_output import SAFETENSORS_METADATA, LocalModelOutput
from perta_stream.sinks.resume_record import RESUME_HINT
from perta_stream.sinks.shard_writer import ShardRecord, TensorSpec, encode_header

if TYPE_CHECKING:
    from perta_stream.sinks.hub_output import HubModelOutput

IN_PROGRESS_SUFFIX = ".inprogress"
PROGRESS_RECORD_NAME = ".perta_one_pass.json"
_HASH_BLOCK_BYTES = 2**20


class _ShardInProgress:
    """One output shard being filled at tensor offsets."""

    def __init__(self, final_path: Path, tensors: Sequence[TensorSpec], *, keep: Iterable[str] = (), open_file: bool = True):
        self.final_path = final_path
        self._specs = list(tensors)
        self.path = final_path.with_name(final_path.name + IN_PROGRESS_SUFFIX)
        header = encode_header(tensors, SAFETENSORS_METADATA)
        self.offsets: dict[str, int] = {}
        offset = len(header)
        for spec in tensors:
            self.offsets[spec.tensor_name] = offset
            offset += spec.nbytes
        self.size_bytes = offset
        self.pending = {spec.tensor_name for spec in tensors}
        kept = set(keep) & self.pending
        self.fd = -1
        if not open_file:
            return
        try:
            if kept and self.intact(header):
                self.fd = os.open(self.path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
                self.pending -= kept
            else:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
                os.pwrite(self.fd, header, 0)
                os.ftruncate(self.fd, self.size_bytes)
        except OSError as exc:
            raise _write_error(self.path, exc) from exc

    def intact(self, header: bytes | None = None) -> bool:
        """Whether a file in progress from an earlier run has this shard's size and header."""
        header = header if header is not None else encode_header(self._specs, SAFETENSORS_METADATA)
        try:
            if not self.path.is_file() or self.path.stat().st_size != self.size_bytes:
                return False
            with open(self.path, "rb") as handle:
                return handle.read(len(header)) == header
        except OSError:
            return False

    @property
    def written(self) -> list[str]:
        return sorted(set(self.offsets) - self.pending)

    def write(self, tensor_name: str, byte_offset: int, data: memoryview) -> None:
        view = data.cast("B") if data.format != "B" else data
        position = self.offsets[tensor_name] + byte_offset
        try:
            while view:
                count = os.pwrite(self.fd, view, position)
                view = view[count:]
                position += count
        except OSError as exc:
            raise _write_error(self.path, exc) from exc

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise _write_error(self.path, exc) from exc

    def finish(self) -> ShardRecord:
        """fsync, hash the whole file by reading it back, rename it to its final name."""
        digest = hashlib.sha256()
        buffer = bytearray(_HASH_BLOCK_BYTES)
        view = memoryview(buffer)
        try:
            os.fsync(self.fd)
            position = 0
            while position < self.size_bytes:
                count = os.preadv(self.fd, [view[: min(len(view), self.size_bytes - position)]], position)
                if count == 0:
                    raise PertaStreamError(f"{self.path} ended at byte {position} of {self.size_bytes} while hashing")
                digest.update(view[:count])
                position += count
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(self.fd)
            self.fd = -1
            os.replace(self.path, self.final_path)
        except OSError as exc:
            raise _write_error(self.final_path, exc) from exc
        return ShardRecord(self.final_path.name, self.size_bytes, digest.hexdigest())

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LayeredModelOutput:
    """One merged checkpoint (a local folder or a Hub push) filled tensor by tensor in any order.

    Args:
        output: the opened output (its finished shards are kept and skipped); shards are built
            in its `partial` folder (a push's staging folder).
        shards: file name -> the shard's tensors in data order (θ_full's layout).
        fingerprint: the run's fingerprint; a progress record with another one is ignored.
    """

    def __init__(self, output: LocalModelOutput | HubModelOutput, shards: Mapping[str, Sequence[TensorSpec]], fingerprint: str):
        self.output = output
        self._layout = {name: list(specs) for name, specs in shards.items()}
        self._fingerprint = fingerprint
        self._shard_of = {spec.tensor_name: name for name, specs in self._layout.items() for spec in specs}
        self._open: dict[str, _ShardInProgress] = {}
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-finish")
        self._finishing: dict[str, Future[ShardRecord]] = {}
        # Tensors an interrupted run recorded, in files still intact (a damaged file is redone).
        progress = {name: tensors for name, tensors in self._read_progress().items() if name in self._layout}
        self._reclaim_unrecorded_finishes(progress)
        self._kept = {
            name: tensors for name, tensors in progress.items() if _ShardInProgress(self.output.partial / name, self._layout[name], open_file=False).intact()
        }

    def _reclaim_unrecorded_finishes(self, progress: Mapping[str, Sequence[str]]) -> None:
        """A run killed between a shard's rename and the output's record of it left the shard
        under its final name, unrecorded: it goes back to its name in progress, where the
        progress record's tensors are checked and kept like any other (only this run's partial
        folder is touched, and only files the progress record names)."""
        finished = self.output.finished_shards()
        for name in progress:
            final_path = self.output.partial / name
            in_progress = final_path.with_name(final_path.name + IN_PROGRESS_SUFFIX)
            if name not in finished and final_path.is_file() and not final_path.is_symlink() and not in_progress.exists():
                os.replace(final_path, in_progress)

    @property
    def _record_path(self) -> Path:
        return self.output.partial / PROGRESS_RECORD_NAME

    def _read_progress(self) -> dict[str, list[str]]:
        try:
            record = json.loads(self._record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(record, dict) or record.get("fingerprint") != self._fingerprint or not isinstance(record.get("shards"), dict):
            return {}
        return {str(name): [str(t) for t in names] for name, names in record["shards"].items() if isinstance(names, list)}

    def has_tensor(self, tensor_name: str) -> bool:
        """Whether the tensor is on disk already (a finished shard, or kept in a shard in progress)."""
        shard = self._shard_of[tensor_name]
        if shard in self._finishing or shard in self.output.finished_shards():
            return True
        if shard in self._open:
            return tensor_name not in self._open[shard].pending
        return tensor_name in self._kept.get(shard, ())

    def write(self, tensor_name: str, byte_offset: int, data: memoryview) -> None:
        """Write bytes of a tensor at `byte_offset` within it."""
        self._shard(self._shard_of[tensor_name]).write(tensor_name, byte_offset, data)

    def tensor_done(self, tensor_name: str) -> None:
        """Every byte of the tensor is written; finishes its shard (in the background) when it was the last one.

        Raises:
            WriteError: finishing an earlier shard failed.
        """
        name = self._shard_of[tensor_name]
        shard = self._shard(name)
        shard.pending.discard(tensor_name)
        if not shard.pending:
            del self._open[name]
            self._kept.pop(name, None)
            self._finishing[name] = self._finisher.submit(_finish, shard)
        self._settle(wait=False)

    def _settle(self, *, wait: bool) -> None:
        """Report the shards whose finishing is over (every one when `wait`) to the output; raises
        the first finishing's error."""
        for name, future in list(self._finishing.items()):
            if wait or future.done():
                del self._finishing[name]
                self.output.shard_finished(future.result())

    def _shard(self, name: str) -> _ShardInProgress:
        if name not in self._open:
            self._open[name] = _ShardInProgress(self.output.partial / name, self._layout[name], keep=self._kept.get(name, ()))
        return self._open[name]

    def checkpoint(self) -> None:
        """Make every written tensor durable, then record which ones a resume may keep."""
        self._settle(wait=True)
        for shard in self._open.values():
            shard.sync()
        progress = {name: shard.written for name, shard in self._open.items()}
        for name, names in self._kept.items():
            progress.setdefault(name, names)
        document = {"format": "perta_one_pass_progress", "fingerprint": self._fingerprint, "shards": progress}
        write_bytes_atomically(self._record_path, (json.dumps(document, indent=1) + "\n").encode(), hint=RESUME_HINT)

    def missing_shards(self) -> list[str]:
        self._settle(wait=True)
        return [name for name in self._layout if name not in self.output.finished_shards()]

    def close(self) -> None:
        """Wait for the shards being finished, close the files in progress (they stay, with their
        record, for a resume).

        Raises:
            WriteError: finishing a shard failed.
        """
        try:
            self._settle(wait=True)
        finally:
            self._finisher.shutdown(wait=True)
            for shard in self._open.values():
                shard.close()
            self._open.clear()

    def drop_progress_record(self) -> None:
        """Before the commit: a finished output carries no resume files."""
        self._record_path.unlink(missing_ok=True)
        for leftover in self.output.partial.glob(f"*{IN_PROGRESS_SUFFIX}"):
            leftover.unlink()


def _finish(shard: _ShardInProgress) -> ShardRecord:
    try:
        return shard.finish()
    except BaseException:
        shard.close()
        raise


def _write_error(path: Path, exc: OSError) -> WriteError:
    import errno

    if exc.errno == errno.ENOSPC:
        return WriteError(f"{path}: disk full while writing; free space (or point --out elsewhere) and rerun with --resume")
    return WriteError(f"{path}: write failed ({exc.strerror or exc}); fix the cause and rerun with --resume")
