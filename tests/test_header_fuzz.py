"""Fuzzing the safetensors header parser: any input gives a HeaderError or a header that is provably sound.

`parse_header` guards every byte offset the engine later trusts, so it must never crash with
another exception, hang, or allocate in proportion to a length field. Each property below feeds
it thousands of generated files (random bytes, mutated valid headers, hostile length fields,
deep nesting, wrong JSON types, overlapping/gapped/out-of-file offsets) through an in-memory
`read_at` that refuses reads outside the file, so an out-of-bounds request fails the test too.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perta_stream.dtypes import DTYPE_BYTES
from perta_stream.errors import HeaderError
from perta_stream.sources.safetensors_header import MAX_HEADER_BYTES, SafetensorsHeader, parse_header

# Bounded per property so the whole file runs in well under 30 s on two cores (about 5,000
# cases, the same ones every run); the deadline turns a hang or a quadratic blow-up into a
# failure. PERTA_FUZZ_EXAMPLES=20000 runs a longer, randomly seeded campaign by hand.
_LONG_RUN = int(os.environ.get("PERTA_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=_LONG_RUN or 700, deadline=2000, suppress_health_check=[HealthCheck.too_slow], derandomize=not _LONG_RUN
)
FUZZ_SMALL = settings(
    max_examples=_LONG_RUN // 4 or 250, deadline=2000, suppress_health_check=[HealthCheck.too_slow], derandomize=not _LONG_RUN
)

DTYPES = sorted(DTYPE_BYTES)
JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


class InMemoryFile:
    """`read_at` over bytes that fails the test on any read outside the file or above the cap."""

    def __init__(self, data: bytes, claimed_size: int | None = None):
        self.data = data
        self.size = len(data) if claimed_size is None else claimed_size
        self.largest_read = 0

    def read_at(self, offset: int, length: int) -> bytes:
        assert 0 <= offset and 0 <= length, (offset, length)
        assert offset + length <= self.size, f"read past the end: {offset}+{length} > {self.size}"
        assert length <= MAX_HEADER_BYTES, f"read of {length} bytes above the header cap"
        self.largest_read = max(self.largest_read, length)
        return self.data[offset : offset + length]


def parse(data: bytes, claimed_size: int | None = None) -> SafetensorsHeader | None:
    """Parse, allowing only HeaderError; a returned header is checked for soundness."""
    source = InMemoryFile(data, claimed_size)
    try:
        header = parse_header(source.read_at, source.size, "fuzz.safetensors")
    except HeaderError as exc:
        assert str(exc).startswith("fuzz.safetensors"), str(exc)  # every message names the file
        return None
    assert_sound(header, source.size)
    return header


def assert_sound(header: SafetensorsHeader, file_size: int) -> None:
    """What the engine relies on: byte ranges match shapes and tile the data area exactly."""
    position = header.data_start
    for info in sorted(header.tensors.values(), key=lambda i: (i.begin, i.end)):
        assert info.dtype in DTYPE_BYTES
        assert info.begin == position and info.end >= info.begin
        assert info.end - info.begin == math.prod(info.shape) * DTYPE_BYTES[info.dtype]
        position = info.end
    assert position == file_size


def encode(document: object, *, data_bytes: int, pad: int = 0, length: int | None = None) -> bytes:
    header = json.dumps(document).encode() + b" " * pad
    prefix = struct.pack("<Q", len(header) if length is None else length)
    return prefix + header + bytes(data_bytes)


@st.composite
def tensor_specs(draw) -> list[tuple[str, str, list[int]]]:
    names = draw(st.lists(st.text(min_size=1, max_size=10), max_size=6, unique=True))
    return [
        (name, draw(st.sampled_from(DTYPES)), draw(st.lists(st.integers(0, 5), max_size=3)))
        for name in names
        if name != "__metadata__"
    ]


def valid_document(specs: list[tuple[str, str, list[int]]], metadata: dict | None = None) -> tuple[dict, int]:
    document: dict[str, object] = {}
    if metadata is not None:
        document["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        document[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return document, offset


# ---------------------------------------------------------------- anything goes


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes(data):
    parse(data)


@FUZZ
@given(st.binary(max_size=128), st.integers(0, 2**64 - 1))
def test_random_header_after_any_length_field(body, length):
    parse(struct.pack("<Q", length) + body)


@FUZZ
@given(JSON_VALUES, st.integers(0, 64))
def test_any_json_document(document, data_bytes):
    parse(encode(document, data_bytes=data_bytes))


# ---------------------------------------------------------------- valid files, and mutations of them


@FUZZ_SMALL
@given(tensor_specs(), st.integers(0, 7), st.booleans())
def test_valid_headers_are_accepted_exactly(specs, pad, with_metadata):
    document, data_bytes = valid_document(specs, {"format": "pt"} if with_metadata else None)
    header = parse(encode(document, data_bytes=data_bytes, pad=pad))
    assert header is not None
    assert [(i.tensor_name, i.dtype, list(i.shape)) for i in header.tensors.values()] == [tuple(s) for s in specs]
    assert header.metadata == ({"format": "pt"} if with_metadata else {})


@FUZZ
@given(tensor_specs(), st.data())
def test_byte_level_mutations(specs, data):
    document, data_bytes = valid_document(specs)
    raw = bytearray(encode(document, data_bytes=data_bytes))
    action = data.draw(st.sampled_from(["flip", "truncate", "append", "insert", "delete"]))
    if action == "flip" and raw:
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    elif action == "truncate":
        del raw[data.draw(st.integers(0, len(raw))) :]
    elif action == "append":
        raw += data.draw(st.binary(min_size=1, max_size=16))
    elif action == "insert":
        at = data.draw(st.integers(0, len(raw)))
        raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    elif action == "delete" and raw:
        at = data.draw(st.integers(0, len(raw) - 1))
        del raw[at : at + data.draw(st.integers(1, 8))]
    parse(bytes(raw))


FIELD_MUTATIONS = ["dtype", "shape", "data_offsets", "extra_key", "missing_key", "entry", "metadata"]


@FUZZ
@given(tensor_specs().filter(bool), st.sampled_from(FIELD_MUTATIONS), JSON_VALUES, st.data())
def test_wrong_types_and_values_in_entries(specs, field, value, data):
    document, data_bytes = valid_document(specs)
    name = data.draw(st.sampled_from([s[0] for s in specs]))
    entry = document[name]
    if field in ("dtype", "shape", "data_offsets"):
        entry[field] = value
    elif field == "extra_key":
        entry[data.draw(st.text(max_size=6).filter(lambda k: k not in entry))] = value
    elif field == "missing_key":
        del entry[data.draw(st.sampled_from(sorted(entry)))]
    elif field == "entry":
        document[name] = value
    else:
        document["__metadata__"] = value
    header = parse(encode(document, data_bytes=data_bytes))
    if header is not None:  # only a mutation that happens to be valid may pass
        original = valid_document(specs)[0][name]
        if field == "shape":
            assert math.prod(value) * DTYPE_BYTES[original["dtype"]] == math.prod(original["shape"]) * DTYPE_BYTES[original["dtype"]]


@FUZZ
@given(tensor_specs().filter(lambda s: len(s) >= 1), st.data())
def test_offsets_that_overlap_gap_or_leave_the_file(specs, data):
    document, data_bytes = valid_document(specs)
    name = data.draw(st.sampled_from([s[0] for s in specs]))
    begin, end = document[name]["data_offsets"]
    shift = data.draw(st.integers(-(2**40), 2**40).filter(lambda d: d != 0))
    which = data.draw(st.sampled_from(["begin", "end", "both"]))
    new = [begin + shift if which != "end" else begin, end + shift if which != "begin" else end]
    document[name]["data_offsets"] = new
    header = parse(encode(document, data_bytes=data_bytes))
    # Moving one range while the others stay put can only stay valid when it moves a
    # zero-length tensor to another tensor boundary.
    if header is not None:
        assert begin == end and new[0] == new[1]


@FUZZ_SMALL
@given(st.integers(1, 4), st.integers(1, 64))
def test_overlap_and_gap_are_rejected(count, size):
    document = {f"t{i}": {"dtype": "U8", "shape": [size], "data_offsets": [i * size, (i + 1) * size]} for i in range(count + 1)}
    document["t0"]["data_offsets"] = [1, size + 1]  # overlaps t1 (or leaves a gap at 0)
    with pytest.raises(HeaderError, match="overlaps|gap"):
        parse_header(InMemoryFile(encode(document, data_bytes=(count + 1) * size)).read_at, len(encode(document, data_bytes=(count + 1) * size)), "f")


# ---------------------------------------------------------------- hostile sizes and nesting


@FUZZ_SMALL
@given(st.integers(MAX_HEADER_BYTES + 1, 2**64 - 1), st.binary(max_size=32))
def test_absurd_length_is_refused_without_reading(length, body):
    source = InMemoryFile(struct.pack("<Q", length) + body, claimed_size=2**62)
    with pytest.raises(HeaderError, match="cap"):
        parse_header(source.read_at, source.size, "f")
    assert source.largest_read == 8


@FUZZ_SMALL
@given(st.integers(1, MAX_HEADER_BYTES), st.binary(max_size=32))
def test_length_past_the_end_is_refused(length, body):
    data = struct.pack("<Q", length) + body
    if 8 + length <= len(data):
        return
    with pytest.raises(HeaderError, match="past the end"):
        parse_header(InMemoryFile(data).read_at, len(data), "f")


def test_length_within_a_file_that_claims_more_than_it_has_reads_little():
    # A remote file whose size says 1 TiB but whose bytes stop early: the parser asks for the
    # header (capped), gets less, and refuses; memory stays proportional to what exists.
    data = struct.pack("<Q", MAX_HEADER_BYTES) + b"{}"
    tracemalloc.start()
    try:
        with pytest.raises(HeaderError, match="shorter"):
            parse_header(InMemoryFile(data, claimed_size=2**40).read_at, 2**40, "f")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 * 2**20


@pytest.mark.parametrize("depth", [100, 10_000, 200_000])
@pytest.mark.parametrize("opener,closer", [("[", "]"), ('{"a":', "}")])
def test_deep_nesting(depth, opener, closer):
    body = (opener * depth + "0" + closer * depth).encode()
    assert parse(struct.pack("<Q", len(body)) + body) is None
    nested_entry = {"t": {"dtype": "U8", "shape": json.loads("[" * 50 + "]" * 50), "data_offsets": [0, 0]}}
    assert parse(encode(nested_entry, data_bytes=0)) is None


@pytest.mark.parametrize(
    "shape",
    [[2**62, 2**62], [10**30], [-1], [1.0], [True], ["3"], [None], list(range(1, 3000))],
    ids=["product-overflow", "huge", "negative", "float", "bool", "string", "null", "many-dims"],
)
def test_hostile_shapes(shape):
    document = {"t": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}
    with pytest.raises(HeaderError, match="shape|byte range"):
        parse_header(InMemoryFile(encode(document, data_bytes=4)).read_at, len(encode(document, data_bytes=4)), "f")


def test_giant_integer_literal_and_duplicate_keys():
    digits = b"9" * 5000
    body = b'{"t":{"dtype":"U8","shape":[' + digits + b'],"data_offsets":[0,0]}}'
    with pytest.raises(HeaderError, match="not valid JSON"):
        parse_header(InMemoryFile(struct.pack("<Q", len(body)) + body).read_at, 8 + len(body), "f")
    body = b'{"t":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"t":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'
    with pytest.raises(HeaderError, match="appears twice"):
        parse_header(InMemoryFile(struct.pack("<Q", len(body)) + body).read_at, 8 + len(body), "f")


def test_files_written_by_the_safetensors_library_are_accepted():
    import torch
    from safetensors.torch import save

    tensors = {
        "a": torch.zeros(3, 5, dtype=torch.bfloat16),
        "b": torch.ones(7, dtype=torch.float32),
        "c": torch.zeros(0, 4, dtype=torch.float16),
        "d": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e": torch.zeros(2, dtype=torch.float8_e4m3fn),
    }
    header = parse(save(tensors, metadata={"format": "pt"}))
    assert header is not None
    assert {n: (i.dtype, i.shape) for n, i in header.tensors.items()} == {
        "a": ("BF16", (3, 5)), "b": ("F32", (7,)), "c": ("F16", (0, 4)), "d": ("I64", (2, 3)), "e": ("F8_E4M3", (2,))
    }
