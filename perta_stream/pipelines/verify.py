"""`run_verify`: check a finished merge output against its `perta_merge.json`.

A merge output is trusted only when every byte a loader will read is accounted for: each shard
recorded in the run record exists with the recorded size and sha256, its header is well formed
(the hardened parser also proves every tensor's bytes lie inside the file, tiling its data area),
the index lists exactly the tensors the shard headers hold, in the shards that hold them, and
`total_size` adds up. Optionally every floating-point value is checked to be finite.

Each shard is read once, sequentially, through one reused buffer, so verifying a 140 GB model
needs a few megabytes of memory; with `finite` the same pass hashes and checks values, walking
the shard tensor by tensor so every chunk starts on an element boundary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from perta_stream.config.verify import VerifyConfig
from perta_stream.dtypes import DTYPE_BYTES, FLOATING_DTYPES, torch_dtype
from perta_stream.errors import CheckpointError, HeaderError, VerificationError
from perta_stream.hashing import file_sha256
from perta_stream.progress import progress
from perta_stream.sinks.output_dir import partial_path
from perta_stream.sinks.run_record import MERGE_RECORD_NAME
from perta_stream.sources.byte_source import LocalByteSource
from perta_stream.sources.checkpoint import INDEX_FILE_NAME, SINGLE_FILE_NAME
from perta_stream.sources.safetensors_header import SafetensorsHeader, read_local_header

logger = logging.getLogger(__name__)

_RERUN = "the output is damaged or was changed after the merge: rerun the merge"


@dataclass(frozen=True)
class VerifyResult:
    """What a successful verification checked.

    Attributes:
        out_dir: the verified directory.
        shard_count, tensor_count: how many shards and tensors were checked.
        bytes_checked: bytes read and hashed.
        finite_checked: whether every floating-point value was checked to be finite.
        elapsed_s: wall time of the check.
        side_file_count: side files checked against their recorded sha256.
    """

    out_dir: str
    shard_count: int
    tensor_count: int
    bytes_checked: int
    finite_checked: bool
    elapsed_s: float
    side_file_count: int = 0

    def summary(self) -> str:
        finite = ", every value finite" if self.finite_checked else ""
        side_files = f", {self.side_file_count} side file(s)" if self.side_file_count else ""
        return (
            f"verified {self.out_dir}: {self.shard_count} shard(s), {self.tensor_count} tensors{side_files}, "
            f"{self.bytes_checked / 1e9:.2f} GB match perta_merge.json{finite} ({self.elapsed_s:.1f} s)"
        )


@dataclass(frozen=True)
class _RecordedShard:
    file_name: str
    size_bytes: int
    sha256: str


def run_verify(config: VerifyConfig) -> VerifyResult:
    """Check the output in `config.out_dir` against its run record; stop at the first problem.

    Raises:
        VerificationError: naming the first problem found (file, tensor, what differs).
    """
    started = time.perf_counter()
    root = Path(config.out_dir)
    _check_directory(root)
    record = _read_record(root)
    recorded = _recorded_shards(root, record)
    headers: dict[str, SafetensorsHeader] = {}
    source = LocalByteSource(root)
    buffer = bytearray(config.chunk_bytes)
    try:
        with progress(total=sum(s.size_bytes for s in recorded), desc="verify") as bar:
            for shard in recorded:
                headers[shard.file_name] = _check_shard(root, shard, source, buffer, config.finite, bar.update)
                logger.info("%s: size, header and sha256 match%s", shard.file_name, ", all values finite" if config.finite else "")
    finally:
        source.close()
    _check_index(root, recorded, headers)
    _check_record_totals(root, record, headers)
    _check_listed_files(root, record, recorded, headers)
    side_files = _check_side_files(root, record)
    return VerifyResult(
        out_dir=str(root),
        shard_count=len(recorded),
        tensor_count=sum(len(h.tensors) for h in headers.values()),
        bytes_checked=sum(s.size_bytes for s in recorded),
        finite_checked=config.finite,
        elapsed_s=time.perf_counter() - started,
        side_file_count=side_files,
    )


def _fail(root: Path, problem: str) -> VerificationError:
    return VerificationError(f"verify {root}: {problem}")


def _check_directory(root: Path) -> None:
    if root.is_dir():
        return
    if partial_path(root).is_dir():
        raise _fail(
            root,
            f"does not exist, but {partial_path(root).name} holds an unfinished merge: rerun the same merge "
            "command with --resume to finish it",
        )
    raise _fail(root, "is not a directory; pass the --out directory of a finished merge")


def _read_record(root: Path) -> dict:
    path = root / MERGE_RECORD_NAME
    if not path.is_file():
        raise _fail(root, f"has no {MERGE_RECORD_NAME}; only outputs of `perta-stream merge` can be verified")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail(root, f"{MERGE_RECORD_NAME} is not valid JSON ({exc}); {_RERUN}") from None
    if not isinstance(record, dict) or record.get("format") != "perta_merge":
        raise _fail(root, f"{MERGE_RECORD_NAME} is not a perta_merge record; {_RERUN}")
    return record


def _recorded_shards(root: Path, record: dict) -> list[_RecordedShard]:
    entries = record.get("shards")
    root_hint = f"verify {root}: {MERGE_RECORD_NAME} 'shards'"
    if not isinstance(entries, list) or not entries:
        raise VerificationError(f"{root_hint} is missing or empty; {_RERUN}")
    shards: list[_RecordedShard] = []
    for entry in entries:
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("file_name"), str)
            and isinstance(entry.get("size_bytes"), int)
            and isinstance(entry.get("sha256"), str)
        )
        # A record naming a path (not a plain file name) must not make verify read outside the output.
        if not ok or Path(entry["file_name"]).name != entry["file_name"] or entry["file_name"] in ("", ".", ".."):
            raise VerificationError(f"{root_hint} has a malformed entry {entry!r}; {_RERUN}")
        shards.append(_RecordedShard(entry["file_name"], entry["size_bytes"], entry["sha256"]))
    if len({s.file_name for s in shards}) != len(shards):
        raise VerificationError(f"{root_hint} lists a shard twice; {_RERUN}")
    return shards


def _check_shard(
    root: Path,
    shard: _RecordedShard,
    source: LocalByteSource,
    buffer: bytearray,
    finite: bool,
    on_bytes: Callable[[int], object],
) -> SafetensorsHeader:
    """Size, header, sha256 and (optionally) finiteness of one shard, in one sequential read."""
    path = root / shard.file_name
    if not path.is_file():
        raise _fail(root, f"shard {shard.file_name} listed in {MERGE_RECORD_NAME} is missing; {_RERUN}")
    size = path.stat().st_size
    if size != shard.size_bytes:
        raise _fail(root, f"shard {shard.file_name} is {size} bytes, {MERGE_RECORD_NAME} records {shard.size_bytes}; {_RERUN}")
    try:
        header = read_local_header(str(path), shard.file_name)
    except HeaderError as exc:
        raise _fail(root, f"shard {exc}") from None
    digest = hashlib.sha256()
    first_non_finite: str | None = None
    for begin, end, dtype in _segments(header, finite):
        for offset in range(begin, end, len(buffer)):
            view = memoryview(buffer)[: min(len(buffer), end - offset)]
            try:
                source.read_into(shard.file_name, offset, view)
            except (CheckpointError, OSError) as exc:
                raise _fail(root, f"shard {shard.file_name}: reading failed ({exc})") from None
            digest.update(view)
            on_bytes(len(view))
            if dtype is not None and first_non_finite is None:
                bad = _first_non_finite(view, dtype)
                if bad is not None:
                    first_non_finite = _locate(header, offset, bad, dtype)
    if digest.hexdigest() != shard.sha256:
        raise _fail(
            root,
            f"shard {shard.file_name} has sha256 {digest.hexdigest()[:16]}..., {MERGE_RECORD_NAME} records "
            f"{shard.sha256[:16]}...; {_RERUN}",
        )
    if first_non_finite is not None:
        raise _fail(root, f"shard {shard.file_name}: {first_non_finite}; the merge inputs or options produce NaN/inf")
    return header


def _segments(header: SafetensorsHeader, finite: bool) -> list[tuple[int, int, str | None]]:
    """Byte ranges covering the whole file in order; a dtype marks ranges whose values are checked."""
    if not finite:
        return [(0, header.file_size, None)]
    segments: list[tuple[int, int, str | None]] = [(0, header.data_start, None)]
    # The parser guarantees the tensors tile [data_start, file_size) in this order.
    for info in header.tensors.values():
        segments.append((info.begin, info.end, info.dtype if info.dtype in FLOATING_DTYPES else None))
    return segments


def _first_non_finite(view: memoryview, dtype: str) -> int | None:
    """Index of the first NaN/inf element in `view` (whole elements of `dtype`), or None."""
    import torch

    values = torch.frombuffer(view, dtype=torch.uint8).view(torch_dtype(dtype))
    if dtype.startswith("F8"):
        # float8 kernels are sparse on CPU; the widening copy is bounded by the chunk size.
        values = values.float()
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return None
    return int((~finite).nonzero()[0, 0])


def _locate(header: SafetensorsHeader, chunk_offset: int, element: int, dtype: str) -> str:
    byte = chunk_offset + element * DTYPE_BYTES[dtype]
    for info in header.tensors.values():
        if info.begin <= byte < info.end:
            return f"tensor {info.tensor_name!r} holds a NaN or infinite value at element {(byte - info.begin) // info.itemsize}"
    return f"a NaN or infinite value at byte {byte}"


def _check_index(root: Path, recorded: list[_RecordedShard], headers: dict[str, SafetensorsHeader]) -> None:
    index_path = root / INDEX_FILE_NAME
    if not index_path.is_file():
        if [s.file_name for s in recorded] == [SINGLE_FILE_NAME]:
            return
        raise _fail(root, f"has {len(recorded)} shards but no {INDEX_FILE_NAME}; loaders cannot find the tensors; {_RERUN}")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        total_size = index["metadata"]["total_size"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError) as exc:
        raise _fail(root, f"{INDEX_FILE_NAME} is malformed ({exc}); {_RERUN}") from None
    for file_name, header in headers.items():
        for tensor_name in header.tensors:
            mapped = weight_map.get(tensor_name)
            if mapped != file_name:
                where = "does not list it" if mapped is None else f"places it in {mapped}"
                raise _fail(root, f"shard {file_name} holds tensor {tensor_name!r} but {INDEX_FILE_NAME} {where}; {_RERUN}")
    for tensor_name, file_name in weight_map.items():
        header = headers.get(file_name) if isinstance(file_name, str) else None
        if header is None:
            raise _fail(
                root, f"{INDEX_FILE_NAME} places {tensor_name!r} in {file_name!r}, not a shard of {MERGE_RECORD_NAME}; {_RERUN}"
            )
        if tensor_name not in header.tensors:
            raise _fail(root, f"{INDEX_FILE_NAME} places {tensor_name!r} in {file_name}, whose header lacks it; {_RERUN}")
    data_bytes = _data_bytes(headers)
    if total_size != data_bytes:
        raise _fail(root, f"{INDEX_FILE_NAME} metadata.total_size is {total_size}, the shards hold {data_bytes} tensor bytes; {_RERUN}")


def _data_bytes(headers: dict[str, SafetensorsHeader]) -> int:
    return sum(info.nbytes for header in headers.values() for info in header.tensors.values())


def _check_record_totals(root: Path, record: dict, headers: dict[str, SafetensorsHeader]) -> None:
    data_bytes = _data_bytes(headers)
    if "total_size" in record and record["total_size"] != data_bytes:
        raise _fail(
            root,
            f"{MERGE_RECORD_NAME} total_size is {record['total_size']}, the shards hold {data_bytes} tensor bytes; {_RERUN}"
        )


def _check_listed_files(root: Path, record: dict, recorded: list[_RecordedShard], headers: dict[str, SafetensorsHeader]) -> None:
    names = {s.file_name for s in recorded}
    strays = sorted(p.name for p in root.glob("*.safetensors") if p.name not in names)
    if strays:
        raise _fail(root, f"holds {strays[0]}, which {MERGE_RECORD_NAME} does not list (a leftover of another run?); remove it or rerun the merge")
    tensor_names = {name for header in headers.values() for name in header.tensors}
    for entry in record.get("copied_tensors") or []:
        tensor_name = entry.get("tensor_name") if isinstance(entry, dict) else entry
        if tensor_name not in tensor_names:
            raise _fail(root, f"{MERGE_RECORD_NAME} lists copied tensor {tensor_name!r}, which no shard holds; {_RERUN}")
    for file_name in record.get("side_files") or []:
        if not isinstance(file_name, str) or Path(file_name).name != file_name or not (root / file_name).is_file():
            raise _fail(root, f"side file {file_name!r} listed in {MERGE_RECORD_NAME} is missing; {_RERUN}")


def _check_side_files(root: Path, record: dict) -> int:
    """Every side file (config, tokenizer, ...) against the sha256 the record keeps; returns how
    many were checked (0 for a record of a version that kept none: their presence is checked)."""
    digests = record.get("side_files_sha256")
    if digests is None:
        logger.info("%s keeps no side-file digests (an older perta-stream wrote it); only their presence is checked", MERGE_RECORD_NAME)
        return 0
    if not isinstance(digests, dict) or set(digests) != set(record.get("side_files") or []):
        raise _fail(root, f"{MERGE_RECORD_NAME} 'side_files_sha256' does not match its 'side_files'; {_RERUN}")
    for file_name, expected in sorted(digests.items()):
        path = root / file_name
        if Path(file_name).name != file_name or not path.is_file() or path.is_symlink():
            raise _fail(root, f"side file {file_name!r} listed in {MERGE_RECORD_NAME} is missing; {_RERUN}")
        if file_sha256(path) != expected:
            raise _fail(root, f"side file {file_name} does not match the sha256 {MERGE_RECORD_NAME} records (changed after the merge?); {_RERUN}")
    return len(digests)
