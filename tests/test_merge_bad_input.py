"""Bad input to `perta-stream merge` (issue 2's list): one clear error line, no output, inputs untouched.

Every case runs the command line (`perta_stream.cli.main`, one case through a real child process)
on a copy of a good synthetic triplet with exactly one thing broken, and checks the contract:
a non-zero exit, exactly one `error: ...` line and it is the last line on stderr, the message
names the problem, nothing at --out or <out>.partial, and every input byte-identical.
"""

from __future__ import annotations

import json
import shlex
import shutil
import struct
from pathlib import Path

import pytest
import torch

from merge_fixtures import load_checkpoint, write_stats
from perta_stream.cli import build_parser, main
from reliability_fixtures import (
    merge_args,
    run_cli,
    synthetic_shapes,
    synthetic_tensors,
    tree_digest,
    write_model,
)

SHARD_1 = "model-00001-of-00003.safetensors"
SHARD_2 = "model-00002-of-00003.safetensors"


def run_failing(capsys, inputs: list[Path], args: list[str], out: Path) -> str:
    """Run the CLI expecting failure; check the whole contract; return the error message."""
    before = {path: tree_digest(path) for path in inputs}
    out_before = tree_digest(out) if out.exists() else None
    code = main(args)
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert err_lines and err_lines[-1].startswith("error: "), err_lines
    assert sum(line.startswith("error:") for line in err_lines) == 1, err_lines
    assert {path: tree_digest(path) for path in inputs} == before
    assert not Path(str(out) + ".partial").exists()
    if out_before is None:
        assert not out.exists()
    else:
        assert tree_digest(out) == out_before
    return err_lines[-1]


def merge_fails(capsys, triplet, tmp_path, *extra: str, out: Path | None = None, inputs: list[Path] | None = None) -> str:
    out = out or tmp_path / "out"
    theta0, full, fgt = triplet
    return run_failing(capsys, inputs or [theta0, full, fgt], merge_args(theta0, full, fgt, out, *extra), out)


def rewrite_header(path: Path, change) -> None:
    """Let `change` edit a shard's header JSON; keep the data bytes as they are."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    document = json.loads(raw[8 : 8 + length])
    change(document)
    header = json.dumps(document).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + length :])


def first_tensor(document: dict) -> str:
    return next(name for name in document if name != "__metadata__")


def index_of(path: Path) -> dict:
    return json.loads((path / "model.safetensors.index.json").read_text())


def write_index(path: Path, index: dict) -> None:
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def replace_tensors(path: Path, change) -> None:
    """Rewrite a checkpoint with `change(tensors)` applied (same sharding)."""
    tensors = load_checkpoint(path)
    change(tensors)
    shutil.rmtree(path)
    write_model(path, tensors, shards=3)


# ---------------------------------------------------------------- tensors that do not match


def test_tensor_missing_from_theta0(capsys, triplet, tmp_path):
    replace_tensors(triplet[0], lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    message = merge_fails(capsys, triplet, tmp_path)
    assert "'model.layers.1.mlp.up_proj.weight' is in full but missing from theta0" in message


def test_tensor_of_fgt_missing_from_full(capsys, triplet, tmp_path):
    replace_tensors(triplet[2], lambda t: t.update({"model.layers.9.extra.weight": torch.zeros(4, dtype=torch.bfloat16)}))
    message = merge_fails(capsys, triplet, tmp_path)
    assert "'model.layers.9.extra.weight' of fgt" in message and "missing from full" in message


def test_extra_tensors_of_full_are_copied_and_listed(triplet, tmp_path):
    extra = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    replace_tensors(triplet[1], lambda t: t.update({"model.value_head.weight": extra}))
    before = tree_digest(triplet[1])
    assert main(merge_args(*triplet, tmp_path / "out")) == 0
    merged = load_checkpoint(tmp_path / "out")
    assert torch.equal(merged["model.value_head.weight"], extra)
    record = json.loads((tmp_path / "out" / "perta_merge.json").read_text())
    assert {"tensor_name": "model.value_head.weight", "reason": "only in full"} in record["copied_tensors"]
    assert "model.value_head.weight" in index_of(tmp_path / "out")["weight_map"]
    assert tree_digest(triplet[1]) == before


def test_shape_mismatch(capsys, triplet, tmp_path):
    replace_tensors(triplet[2], lambda t: t.update({"model.norm.weight": torch.ones(31, dtype=torch.bfloat16)}))
    message = merge_fails(capsys, triplet, tmp_path)
    assert "'model.norm.weight': shape [31] in fgt vs [32] in full" in message


def test_tying_mismatch(capsys, triplet, tmp_path):
    theta0, full, fgt = triplet
    # full ties lm_head to the embedding (stores none); theta0 and fgt store their own.
    replace_tensors(full, lambda t: t.pop("lm_head.weight"))
    (full / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": True}))
    message = merge_fails(capsys, triplet, tmp_path)
    assert "tying mismatch" in message and "full" in message and "ties lm_head to the input embedding" in message
    assert "problems" not in message  # the missing lm_head is part of the tying mismatch, not a second problem


# ---------------------------------------------------------------- broken files


def test_unknown_dtype(capsys, triplet, tmp_path):
    def to_unknown(document):
        document[first_tensor(document)]["dtype"] = "F4_E2M1"

    rewrite_header(triplet[2] / SHARD_1, to_unknown)
    message = merge_fails(capsys, triplet, tmp_path)
    assert f"fgt ({triplet[2]}): {SHARD_1}" in message and "unknown dtype 'F4_E2M1'" in message


def test_truncated_shard(capsys, triplet, tmp_path):
    shard = triplet[1] / SHARD_2
    shard.write_bytes(shard.read_bytes()[:-100])
    message = merge_fails(capsys, triplet, tmp_path)
    assert SHARD_2 in message and "truncated" in message and "re-download" in message


def test_header_length_past_end_of_file(capsys, triplet, tmp_path):
    shard = triplet[0] / SHARD_1
    raw = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    message = merge_fails(capsys, triplet, tmp_path)
    assert f"header length {len(raw)} runs past the end of the {len(raw)}-byte file" in message


def test_absurd_header_length(capsys, triplet, tmp_path):
    shard = triplet[0] / SHARD_1
    raw = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", 2**63) + raw[8:])
    message = merge_fails(capsys, triplet, tmp_path)
    assert "above the 104857600-byte cap" in message and "corrupt or not safetensors" in message


def test_header_that_is_not_json(capsys, triplet, tmp_path):
    shard = triplet[0] / SHARD_2
    raw = bytearray(shard.read_bytes())
    raw[8:12] = b"<htm"
    shard.write_bytes(bytes(raw))
    message = merge_fails(capsys, triplet, tmp_path)
    assert f"{SHARD_2}: header is not valid JSON" in message


def test_overlapping_data_offsets(capsys, triplet, tmp_path):
    def overlap(document):
        names = sorted((n for n in document if n != "__metadata__"), key=lambda n: document[n]["data_offsets"][0])
        second = document[names[1]]
        # Move the second tensor one element back so it overlaps the first (sizes unchanged).
        begin, end = second["data_offsets"]
        second["data_offsets"] = [begin - 2, end - 2]

    rewrite_header(triplet[2] / SHARD_2, overlap)
    message = merge_fails(capsys, triplet, tmp_path)
    assert "overlaps the previous tensor" in message and "tile the data area" in message


def test_data_offsets_past_end_of_file(capsys, triplet, tmp_path):
    def past_end(document):
        last = max((n for n in document if n != "__metadata__"), key=lambda n: document[n]["data_offsets"][1])
        begin, end = document[last]["data_offsets"]
        document[last]["data_offsets"] = [begin + 64, end + 64]

    rewrite_header(triplet[2] / SHARD_2, past_end)
    message = merge_fails(capsys, triplet, tmp_path)
    assert "leaves a gap" in message or "the file holds" in message


def test_index_names_missing_shard(capsys, triplet, tmp_path):
    index = index_of(triplet[0])
    moved = next(iter(index["weight_map"]))
    index["weight_map"][moved] = "model-00009-of-00009.safetensors"
    write_index(triplet[0], index)
    message = merge_fails(capsys, triplet, tmp_path)
    assert "the index names shard model-00009-of-00009.safetensors, which does not exist" in message


@pytest.mark.parametrize("outside", ["../full/" + SHARD_1, "/etc/passwd"], ids=["dotdot", "absolute"])
def test_index_names_path_outside_checkpoint(capsys, triplet, tmp_path, outside):
    index = index_of(triplet[2])
    index["weight_map"][next(iter(index["weight_map"]))] = outside
    write_index(triplet[2], index)
    message = merge_fails(capsys, triplet, tmp_path)
    assert f"points to {outside!r}, outside the checkpoint directory" in message


def test_pickle_only_checkpoint_is_refused_with_conversion_hint(capsys, triplet, tmp_path):
    fgt = triplet[2]
    for path in fgt.glob("*.safetensors*"):
        path.unlink()
    # Never a real pickle: the refusal must come from the file names alone, nothing is unpickled.
    (fgt / "pytorch_model.bin").write_bytes(b"not a pickle, and never opened")
    message = merge_fails(capsys, triplet, tmp_path)
    assert "has only pickle weights (pytorch_model.bin)" in message
    hint = f"perta-stream convert --allow-pickle {fgt} --out DIR"
    assert hint in message
    # The hint is a command this tool really has, with flags it really takes.
    parsed = build_parser().parse_args(shlex.split(hint)[1:])
    assert parsed.command == "convert" and parsed.allow_pickle and parsed.model == str(fgt)


# ---------------------------------------------------------------- statistics


@pytest.fixture(scope="module")
def stats_for_other_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("other")
    shapes = synthetic_shapes(layers=2, hidden=24, vocab=48)
    write_model(root / "model", synthetic_tensors(shapes, seed=5, dtype=torch.bfloat16), shards=3)
    return write_stats(root / "stats", root / "model", kinds=("fisher",))


def test_statistics_of_another_model(capsys, triplet, tmp_path, stats_for_other_model):
    message = merge_fails(
        capsys, triplet, tmp_path, "--method", "fisher", "--stats", str(stats_for_other_model),
        inputs=[*triplet, stats_for_other_model],
    )
    # One line per statistics checkpoint, not one per tensor.
    assert f"statistics forget.fisher ({stats_for_other_model / 'forget.fisher'}) do not match the model: tensor" in message
    assert "has shape [48, 24], the model [48, 32]" in message and "more tensor(s)" in message
    assert "problems: (1)" in message and "(3)" not in message
    assert "recompute them for this model with `perta-stream stats`" in message


def test_statistics_without_the_needed_kind(capsys, triplet, tmp_path, stats_for_other_model):
    message = merge_fails(
        capsys, triplet, tmp_path, "--method", "grad", "--stats", str(stats_for_other_model),
        inputs=[*triplet, stats_for_other_model],
    )
    assert "hold fisher, not grad" in message and "--kinds grad" in message
    assert message.count("hold fisher, not grad") == 1


def test_statistics_directory_without_record(capsys, triplet, tmp_path):
    (tmp_path / "empty_stats").mkdir()
    message = merge_fails(capsys, triplet, tmp_path, "--method", "fisher", "--stats", str(tmp_path / "empty_stats"))
    assert "has no perta_stats.json" in message


# ---------------------------------------------------------------- arguments and output location


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--alpha", "-1"], "--alpha -1.0 must be a positive finite number"),
        (["--alpha", "nan"], "must be a positive finite number"),
        (["--method", "fisher"], "--method fisher needs --stats DIR"),
        (["--uniform-weight", "1.5", "--method", "uniform"], "--uniform-weight 1.5 must be within [0, 1]"),
        (["--tau", "2"], "--tau is not used by --method tv"),
        (["--max-shard-size", "lots"], "--max-shard-size 'lots' is not a size"),
        (["--out-dtype", "int8"], "dtype 'int8' is not supported here"),
        (["--max-memory", "1MiB"], "--max-memory below 64MiB"),
        (["--chunk-size", "0"], "--chunk-size must be positive"),
    ],
    ids=["negative-alpha", "nan-alpha", "fisher-without-stats", "uniform-weight", "tau-with-tv", "shard-size",
         "out-dtype", "tiny-memory", "zero-chunk"],
)
def test_nonsensical_arguments(capsys, good, tmp_path, args, expected):
    message = merge_fails(capsys, good, tmp_path, *args)
    assert expected in message


def test_existing_out_without_overwrite(capsys, good, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    message = merge_fails(capsys, good, tmp_path, out=out)
    assert f"--out {out} already exists; pass --overwrite" in message


@pytest.mark.parametrize("where", ["equal", "inside"])
def test_out_equal_to_or_inside_an_input(capsys, triplet, tmp_path, where):
    full = triplet[1]
    out = full if where == "equal" else full / "merged"
    message = merge_fails(capsys, triplet, tmp_path, "--overwrite", out=out)
    assert f"overlaps the full input {full}" in message


def test_all_problems_are_reported_at_once(capsys, triplet, tmp_path):
    theta0, full, fgt = triplet
    replace_tensors(theta0, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    replace_tensors(fgt, lambda t: t.update({"model.norm.weight": torch.ones(31, dtype=torch.bfloat16)}))
    (tmp_path / "out").mkdir()
    message = merge_fails(capsys, triplet, tmp_path)
    assert "problems: (1)" in message
    assert "missing from theta0" in message
    assert "shape [31] in fgt vs [32] in full" in message
    assert "already exists; pass --overwrite" in message


def test_broken_shard_and_bad_index_in_two_inputs_at_once(capsys, triplet, tmp_path):
    theta0, full, fgt = triplet
    (theta0 / SHARD_1).write_bytes((theta0 / SHARD_1).read_bytes()[:-10])
    index = index_of(fgt)
    index["weight_map"][next(iter(index["weight_map"]))] = "../escape.safetensors"
    write_index(fgt, index)
    message = merge_fails(capsys, triplet, tmp_path)
    assert f"theta0 ({theta0}): {SHARD_1}" in message and "truncated" in message
    assert "outside the checkpoint directory" in message


def test_error_contract_through_a_real_process(triplet, tmp_path):
    theta0, full, fgt = triplet
    shard = full / SHARD_2
    shard.write_bytes(shard.read_bytes()[:-100])
    before = {path: tree_digest(path) for path in triplet}
    completed = run_cli(merge_args(theta0, full, fgt, tmp_path / "out"))
    lines = completed.stderr.strip().splitlines()
    assert completed.returncode == 1
    assert lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1
    assert "Traceback" not in completed.stderr
    assert SHARD_2 in lines[-1] and "truncated" in lines[-1]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    assert {path: tree_digest(path) for path in triplet} == before
