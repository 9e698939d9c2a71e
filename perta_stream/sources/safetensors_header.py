"""Parse and validate a safetensors header without touching tensor bytes.

The safetensors library parses headers too, but only while memory-mapping the whole file and
with errors that do not say which checkpoint or what to do. Planning needs the header alone,
from a local file or from two HTTP range reads, validated strictly enough that every later
byte offset can be trusted: the header length is bounded and inside the file, the JSON is an
object of well-formed entries with known dtypes, every byte range matches its shape and dtype,
and the ranges tile the data area exactly (no gaps, no overlap, nothing past the end).
"""

from __future__ import annotations

import hashlib
import json
import math
import reprlib
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from perta_stream.dtypes import DTYPE_BYTES
from perta_stream.errors import HeaderError

# The safetensors reference implementation refuses headers above 100 MB; so do we, which also
# bounds the allocation a hostile length field can cause.
MAX_HEADER_BYTES = 100 * 1024 * 1024
_LENGTH_PREFIX_BYTES = 8
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlong = 160, 80, 8, 4, 40


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live.

    Attributes:
        tensor_name: the state-dict key.
        dtype: safetensors dtype name (`BF16`, `F32`, ...).
        shape: the tensor's shape.
        file_name: the shard file, relative to its checkpoint.
        begin: absolute byte offset of the first element in `file_name`.
        end: absolute byte offset one past the last element.
    """

    tensor_name: str
    dtype: str
    shape: tuple[int, ...]
    file_name: str
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header.

    Attributes:
        file_name: the shard's name inside its checkpoint.
        file_size: the file's size in bytes.
        data_start: absolute offset of the data area (8 + header length).
        tensors: tensor_name -> TensorInfo, in data order.
        metadata: the optional `__metadata__` string map.
        sha256: digest of the raw header bytes (identifies the layout, not the values).
    """

    file_name: str
    file_size: int
    data_start: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    sha256: str = ""


def read_local_header(path: str, file_name: str | None = None) -> SafetensorsHeader:
    """Read and validate the header of a local safetensors file.

    Raises:
        HeaderError: the header is malformed or inconsistent with the file.
        FileNotFoundError: the file does not exist.
    """
    import os

    name = file_name or os.path.basename(path)
    with open(path, "rb") as handle:
        file_size = os.fstat(handle.fileno()).st_size

        def read_at(offset: int, length: int) -> bytes:
            return os.pread(handle.fileno(), length, offset)

        return parse_header(read_at, file_size, name)


def parse_header(read_at: Callable[[int, int], bytes], file_size: int, file_name: str) -> SafetensorsHeader:
    """Validate a safetensors header given a way to read byte ranges of the file.

    Args:
        read_at: `read_at(offset, length)` returns up to `length` bytes at `offset`.
        file_size: the size of the whole file in bytes.
        file_name: used in error messages and stored in every TensorInfo.

    Raises:
        HeaderError: with the file name, what is wrong, and what to do about it.
    """
    where = f"{file_name}"
    if file_size < _LENGTH_PREFIX_BYTES:
        raise HeaderError(
            f"{where}: file is {file_size} bytes, too short to be safetensors (truncated download?); "
            "re-download or re-save the checkpoint"
        )
    prefix = read_at(0, _LENGTH_PREFIX_BYTES)
    if len(prefix) != _LENGTH_PREFIX_BYTES:
        raise HeaderError(f"{where}: could not read the 8-byte header length; the file is truncated")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_HEADER_BYTES:
        raise HeaderError(
            f"{where}: header length field says {header_len} bytes, above the {MAX_HEADER_BYTES}-byte cap; "
            "the file is corrupt or not safetensors"
        )
    data_start = _LENGTH_PREFIX_BYTES + header_len
    if data_start > file_size:
        raise HeaderError(
            f"{where}: header length {header_len} runs past the end of the {file_size}-byte file; "
            "the file is truncated or corrupt, re-download it"
        )
    raw = read_at(_LENGTH_PREFIX_BYTES, header_len)
    if len(raw) != header_len:
        raise HeaderError(f"{where}: header shorter than its length field says; the file is truncated")
    entries, metadata = _decode_json(raw, where)
    tensors = _validate_entries(entries, where, file_name, data_start, file_size - data_start)
    _check_tiling(tensors, where, data_area_bytes=file_size - data_start, data_start=data_start)
    return SafetensorsHeader(
        file_name=file_name,
        file_size=file_size,
        data_start=data_start,
        tensors={info.tensor_name: info for info in tensors},
        metadata=metadata,
        sha256=hashlib.sha256(raw).hexdigest(),
    )


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice")
        seen[key] = value
    return seen


def _decode_json(raw: bytes, where: str) -> tuple[dict[str, object], dict[str, str]]:
    try:
        text = raw.decode("utf-8")
        # Deeply nested input would recurse; the format is flat, so anything nested past the
        # entry level is rejected below, and RecursionError is caught here as malformed.
        document = json.loads(text, object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise HeaderError(f"{where}: header is not valid JSON ({_short(exc)}); the file is not safetensors or is corrupt") from None
    if not isinstance(document, dict):
        raise HeaderError(f"{where}: header JSON is a {type(document).__name__}, expected an object of tensors")
    metadata_raw = document.pop("__metadata__", {})
    if not isinstance(metadata_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata_raw.items()
    ):
        raise HeaderError(f"{where}: __metadata__ must map strings to strings")
    return document, dict(metadata_raw)


def _validate_entries(
    entries: dict[str, object], where: str, file_name: str, data_start: int, data_area_bytes: int
) -> list[TensorInfo]:
    tensors: list[TensorInfo] = []
    for tensor_name, entry in entries.items():
        at = f"{where}: tensor {_brief(tensor_name)}"
        if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
            raise HeaderError(f"{at}: entry must have exactly the keys dtype, shape, data_offsets")
        dtype = entry["dtype"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            known = ", ".join(sorted(DTYPE_BYTES))
            raise HeaderError(f"{at}: unknown dtype {_brief(dtype)} (known: {known})")
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise HeaderError(f"{at}: shape {_brief(shape)} is not a list of non-negative integers")
        offsets = entry["data_offsets"]
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise HeaderError(f"{at}: data_offsets {_brief(offsets)} is not a pair of non-negative integers")
        begin, end = offsets
        if end < begin:
            raise HeaderError(f"{at}: data_offsets end {end} is before begin {begin}")
        expected = _byte_count(shape, DTYPE_BYTES[dtype], limit=data_area_bytes)
        if expected is None:
            raise HeaderError(
                f"{at}: shape {_brief(shape)} of {dtype} needs more bytes than the file's {data_area_bytes}-byte "
                "data area; the file is corrupt or truncated"
            )
        if end - begin != expected:
            raise HeaderError(
                f"{at}: byte range holds {end - begin} bytes but shape {_brief(shape)} of {dtype} needs {expected}"
            )
        tensors.append(TensorInfo(tensor_name, dtype, tuple(shape), file_name, data_start + begin, data_start + end))
    return tensors


def _check_tiling(tensors: list[TensorInfo], where: str, *, data_area_bytes: int, data_start: int) -> None:
    tensors.sort(key=lambda info: (info.begin, info.end))
    position = data_start
    for info in tensors:
        if info.begin != position:
            kind = "overlaps the previous tensor" if info.begin < position else "leaves a gap before it"
            raise HeaderError(
                f"{where}: tensor {_brief(info.tensor_name)} at data offset {info.begin - data_start} {kind}; "
                "data offsets must tile the data area, the file is corrupt"
            )
        position = info.end
    if position - data_start != data_area_bytes:
        if position - data_start > data_area_bytes:
            raise HeaderError(
                f"{where}: tensors need {position - data_start} data bytes but the file holds {data_area_bytes}; "
                "the file is truncated, re-download it"
            )
        raise HeaderError(
            f"{where}: {data_area_bytes - (position - data_start)} bytes after the last tensor belong to no tensor; "
            "the file is corrupt"
        )


def _byte_count(shape: list[int], itemsize: int, *, limit: int) -> int | None:
    """Bytes of a tensor of `shape`, or None once the count passes `limit`.

    Stopping early matters: a hostile header may list millions of huge dimensions, whose exact
    product would take unbounded time and memory to compute (and could not even be printed).
    """
    if 0 in shape:
        return 0
    count = itemsize
    for dim in shape:
        count *= dim
        if count > limit:
            return None
    return count


def _brief(value: object) -> str:
    """A short repr for messages: a header may hold megabytes of junk in one field."""
    return _REPR.repr(value)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 80 else text[:77] + "..."
