"""`perta-stream verify`: a good output passes; each kind of damage is named as the first problem."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from perta_stream.cli import main
from perta_stream.config.merge import MergeConfig
from perta_stream.config.verify import VerifyConfig
from perta_stream.errors import UsageError, VerificationError
from perta_stream.pipelines.merge import run_merge
from perta_stream.pipelines.verify import run_verify
from reliability_fixtures import file_sha256, synthetic_triplet

# 4 KiB reads are smaller than most tensors below, so the finite check spans several chunks.
SMALL_CHUNK_BYTES = 4096


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("verify")
    theta0, full, fgt = synthetic_triplet(root, hidden=48, vocab=64, dtype=torch.float32)
    run_merge(MergeConfig(theta0=str(theta0), full=str(full), fgt=str(fgt), out=str(root / "out")))
    return root / "out"


@pytest.fixture
def out(merged, tmp_path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(merged, copy)
    return copy


def _verify(out: Path, *, finite: bool = False) -> None:
    run_verify(VerifyConfig(out_dir=str(out), finite=finite, chunk_bytes=SMALL_CHUNK_BYTES))


def _record(out: Path) -> dict:
    return json.loads((out / "perta_merge.json").read_text())


def _shards(out: Path) -> list[str]:
    return [entry["file_name"] for entry in _record(out)["shards"]]


def _rewrite_record(out: Path, change) -> None:
    record = _record(out)
    change(record)
    (out / "perta_merge.json").write_text(json.dumps(record))


def _tensor_location(out: Path, shard: str) -> tuple[str, int, int, str]:
    """(name, absolute begin, end, dtype) of the largest tensor of a shard, read independently."""
    raw = (out / shard).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header.pop("__metadata__", None)
    name, entry = max(header.items(), key=lambda item: item[1]["data_offsets"][1] - item[1]["data_offsets"][0])
    begin, end = entry["data_offsets"]
    return name, 8 + length + begin, 8 + length + end, entry["dtype"]


def test_good_output_passes_with_and_without_finite(out, capsys):
    _verify(out)
    _verify(out, finite=True)
    assert main(["verify", str(out), "--finite", "--chunk-size", "4KiB"]) == 0
    assert "verified" in capsys.readouterr().err


def test_single_file_output_passes(tmp_path):
    theta0, full, fgt = synthetic_triplet(tmp_path, shards=1)
    run_merge(MergeConfig(theta0=str(theta0), full=str(full), fgt=str(fgt), out=str(tmp_path / "out")))
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    _verify(tmp_path / "out", finite=True)


def test_changed_byte_is_a_sha256_mismatch(out):
    shard = _shards(out)[1]
    _, begin, _, _ = _tensor_location(out, shard)
    with open(out / shard, "r+b") as handle:
        handle.seek(begin + 5)
        value = handle.read(1)
        handle.seek(begin + 5)
        handle.write(bytes([value[0] ^ 0x01]))
    with pytest.raises(VerificationError, match=f"shard {shard} has sha256 .* records"):
        _verify(out)


def test_truncated_shard_is_a_size_mismatch(out):
    shard = _shards(out)[0]
    size = (out / shard).stat().st_size
    with open(out / shard, "r+b") as handle:
        handle.truncate(size - 4)
    with pytest.raises(VerificationError, match=f"shard {shard} is {size - 4} bytes, perta_merge.json records {size}"):
        _verify(out)


def test_missing_shard(out):
    shard = _shards(out)[2]
    (out / shard).unlink()
    with pytest.raises(VerificationError, match=f"shard {shard} listed in perta_merge.json is missing"):
        _verify(out)


def test_corrupt_header_is_named(out):
    shard = _shards(out)[0]
    raw = bytearray((out / shard).read_bytes())
    raw[8] = ord("[")  # the JSON object now opens as a list
    (out / shard).write_bytes(bytes(raw))
    _rewrite_record(out, lambda r: r["shards"][0].update(sha256=file_sha256(out / shard)))
    with pytest.raises(VerificationError, match="not valid JSON"):
        _verify(out)


def test_index_that_places_a_tensor_in_the_wrong_shard(out):
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    tensor_name = next(iter(index["weight_map"]))
    first, second = _shards(out)[:2]
    index["weight_map"][tensor_name] = second if index["weight_map"][tensor_name] == first else first
    index_path.write_text(json.dumps(index))
    with pytest.raises(VerificationError, match=f"tensor '{tensor_name}' but model.safetensors.index.json places it in"):
        _verify(out)


def test_index_that_lists_a_tensor_no_shard_holds(out):
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.extra.weight"] = _shards(out)[0]
    index_path.write_text(json.dumps(index))
    with pytest.raises(VerificationError, match="places 'model.extra.weight' in .*whose header lacks it"):
        _verify(out)


def test_index_that_omits_a_tensor(out):
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    dropped = sorted(index["weight_map"])[0]
    del index["weight_map"][dropped]
    index_path.write_text(json.dumps(index))
    with pytest.raises(VerificationError, match=f"holds tensor '{dropped}' but model.safetensors.index.json does not list it"):
        _verify(out)


def test_wrong_total_size(out):
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    true_size = index["metadata"]["total_size"]
    index["metadata"]["total_size"] = true_size + 2
    index_path.write_text(json.dumps(index))
    with pytest.raises(VerificationError, match=f"total_size is {true_size + 2}, the shards hold {true_size}"):
        _verify(out)


def test_wrong_total_size_in_record(out):
    _rewrite_record(out, lambda r: r.update(total_size=r["total_size"] - 8))
    with pytest.raises(VerificationError, match="perta_merge.json total_size"):
        _verify(out)


def test_stray_shard_is_reported(out):
    shutil.copyfile(out / _shards(out)[0], out / "model-00009-of-00009.safetensors")
    with pytest.raises(VerificationError, match="model-00009-of-00009.safetensors, which perta_merge.json does not list"):
        _verify(out)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_value_found_only_with_finite(out, bad):
    shard = _shards(out)[1]
    name, begin, end, dtype = _tensor_location(out, shard)
    assert dtype == "F32" and end - begin > 2 * SMALL_CHUNK_BYTES  # the value lies past the first chunk
    element = (end - begin) // 4 - 3
    with open(out / shard, "r+b") as handle:
        handle.seek(begin + 4 * element)
        handle.write(struct.pack("<f", bad))
    _rewrite_record(out, lambda r: r["shards"][1].update(sha256=file_sha256(out / shard)))
    _verify(out)  # hashes match the record: only the value check can see it
    with pytest.raises(VerificationError, match=f"tensor '{name}' holds a NaN or infinite value at element {element}"):
        _verify(out, finite=True)


def test_missing_or_foreign_record(out):
    (out / "perta_merge.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(VerificationError, match="not a perta_merge record"):
        _verify(out)
    (out / "perta_merge.json").unlink()
    with pytest.raises(VerificationError, match="has no perta_merge.json"):
        _verify(out)


def test_record_cannot_point_outside_the_output(out):
    _rewrite_record(out, lambda r: r["shards"][0].update(file_name="../theta0/model-00001-of-00003.safetensors"))
    with pytest.raises(VerificationError, match="malformed entry"):
        _verify(out)


def test_unfinished_output_points_to_resume(tmp_path):
    (tmp_path / "out.partial").mkdir()
    with pytest.raises(VerificationError, match="unfinished merge: rerun the same merge command with --resume"):
        _verify(tmp_path / "out")


def test_cli_prints_one_error_line(out, capsys):
    (out / _shards(out)[0]).unlink()
    assert main(["verify", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: verify ") and "is missing" in err[-1]


def test_bad_options_are_usage_errors():
    with pytest.raises(UsageError):
        VerifyConfig.from_cli(type("Args", (), {"dir": "x", "finite": False, "chunk_size": "100"})())


def test_side_files_are_checked_against_the_record(out, capsys):
    record = _record(out)
    assert record["side_files"] and set(record["side_files_sha256"]) == set(record["side_files"])
    assert main(["verify", str(out)]) == 0
    assert f"{len(record['side_files'])} side file(s)" in capsys.readouterr().err
    side_file = record["side_files"][0]
    (out / side_file).write_bytes((out / side_file).read_bytes() + b" ")
    with pytest.raises(VerificationError, match=f"side file {side_file} does not match the sha256 perta_merge.json records"):
        _verify(out)


def test_side_file_digests_must_cover_the_listed_side_files(out):
    _rewrite_record(out, lambda record: record["side_files_sha256"].popitem())
    with pytest.raises(VerificationError, match="'side_files_sha256' does not match its 'side_files'"):
        _verify(out)
