"""A full disk mid-run: a clear WriteError, a resumable partial folder, nothing complete-looking.

Two ways to fill the disk: a real size-limited tmpfs mounted for the test (needs root and mount
rights; skipped where the mount fails, as in unprivileged CI), and, always, ENOSPC injected at
the write call of the shard writer (and at the side-file copy of the finalization). Each time,
freeing space and rerunning with --resume must finish the output byte-identical to a run that
never failed.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from perta_stream.cli import main
from perta_stream.sinks import shard_writer
from perta_stream.sinks.model_output import RESUME_RECORD_NAME
from perta_stream.sources import pinned_folder
from reliability_fixtures import merge_args, output_digest, partial_of, synthetic_triplet, tree_digest

OPTIONS = ("--chunk-size", "16KiB")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path, Path]:
    return synthetic_triplet(tmp_path_factory.mktemp("disk_full"), layers=2, hidden=256, vocab=512, shards=4)


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main(merge_args(*inputs, out, *OPTIONS)) == 0
    return output_digest(out)


def fails_with_write_error(capsys, args: list[str], out: Path) -> str:
    assert main(args) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1
    message = lines[-1]
    assert "rerun with --resume" in message
    # Nothing that looks complete: no --out, and the partial folder holds no index or run record.
    assert not out.exists()
    leftovers = set(os.listdir(partial_of(out)))
    assert RESUME_RECORD_NAME in leftovers
    assert not {"perta_merge.json", "model.safetensors.index.json"} & leftovers
    assert not [name for name in leftovers if name.endswith(".tmp")], "an unfinished shard was left behind"
    return message


class _FailingOs:
    """The `os` module as the shard writer sees it, with `write` failing after `budget` bytes."""

    def __init__(self, budget_bytes: int):
        self.remaining = budget_bytes
        self.failures = 0

    def write(self, fd: int, data) -> int:
        if len(data) > self.remaining:
            self.failures += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.remaining -= len(data)
        return os.write(fd, data)

    def __getattr__(self, name: str):
        return getattr(os, name)


def test_injected_enospc_mid_shard_then_resume(capsys, monkeypatch, inputs, reference, tmp_path):
    out = tmp_path / "out"
    before = {path: tree_digest(path) for path in inputs}
    total = sum(size for name, size in _sizes(inputs[1]).items() if name.endswith(".safetensors"))
    failing = _FailingOs(budget_bytes=total // 2)  # about half the shards fit
    monkeypatch.setattr(shard_writer, "os", failing)
    message = fails_with_write_error(capsys, merge_args(*inputs, out, *OPTIONS), out)
    assert failing.failures == 1
    assert "disk full while writing" in message and "free space" in message
    record = json.loads((partial_of(out) / RESUME_RECORD_NAME).read_text())
    finished = sorted(record["finished_shards"])
    assert 1 <= len(finished) < 4
    kept = {name: (partial_of(out) / name).stat().st_ino for name in finished}
    monkeypatch.undo()  # the disk has space again
    assert main(merge_args(*inputs, out, *OPTIONS, "--resume")) == 0
    assert output_digest(out) == reference
    assert {name: (out / name).stat().st_ino for name in finished} == kept
    assert {path: tree_digest(path) for path in inputs} == before


def test_injected_enospc_while_copying_side_files_then_resume(capsys, monkeypatch, inputs, reference, tmp_path):
    out = tmp_path / "out"

    def full_disk_copy(self, name, destination):  # noqa: ANN001
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(destination))

    # Side files are copied from the input folder pinned when the run started.
    monkeypatch.setattr(pinned_folder.PinnedFolder, "copy_file", full_disk_copy)
    message = fails_with_write_error(capsys, merge_args(*inputs, out, *OPTIONS), out)
    assert "copying side file" in message and "No space left on device" in message
    record = json.loads((partial_of(out) / RESUME_RECORD_NAME).read_text())
    assert len(record["finished_shards"]) == 4  # every shard was done before the copy failed
    monkeypatch.undo()
    assert main(merge_args(*inputs, out, *OPTIONS, "--resume")) == 0
    assert output_digest(out) == reference


def _sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir()}


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 1000 KiB mounted for the test, or a skip where mounting is not allowed."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1000k", "tmpfs", str(mount_point)],
            check=True, capture_output=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({exc}); the injected variant covers this")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def test_real_full_filesystem_then_resume(capsys, inputs, reference, small_disk):
    out = small_disk / "out"
    output_bytes = sum(size for name, size in _sizes(inputs[1]).items() if name.endswith(".safetensors"))
    assert output_bytes > 1000 * 1024  # the output cannot fit
    message = fails_with_write_error(capsys, merge_args(*inputs, out, *OPTIONS), out)
    assert "disk full" in message or "No space left on device" in message, message
    assert json.loads((partial_of(out) / RESUME_RECORD_NAME).read_text())["finished_shards"], "fill the disk later"
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True, capture_output=True, timeout=30)
    assert main(merge_args(*inputs, out, *OPTIONS, "--resume")) == 0
    assert output_digest(out) == reference
