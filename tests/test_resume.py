"""Kill tests: SIGKILL the real CLI at several points, resume with --resume, get the same bytes.

The merge runs as `python -m perta_stream.cli merge ...` in a child process on inputs large
enough (about 20 MB each, 4 KiB chunks) that it takes a few seconds. The test watches
`<out>.partial/` and sends SIGKILL when the folder reaches the wanted state: just created (after
the plan), a shard in progress after another finished (mid-shard), the moment a second shard is
renamed into place (between shards), or the side files being copied (finalization). One more
point, just before the final rename, is reached deterministically by a wrapper that replaces
the commit with a self-SIGKILL. After each kill the same command with --resume must finish the
output byte-identical to an uninterrupted run (the run record may differ only in its timings),
keeping the shards the interrupted run had recorded as finished.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from perta_stream.cli import main
from perta_stream.config.verify import VerifyConfig
from perta_stream.pipelines.verify import run_verify
from perta_stream.sinks.model_output import RESUME_RECORD_NAME
from reliability_fixtures import cli_command, cli_env, merge_args, output_digest, partial_of, refused, synthetic_triplet, tree_digest

SHARDS = 4
# 4 KiB chunks make the run slow enough (thousands of chunks per shard) to stop it where we want.
OPTIONS = ("--method", "uniform", "--uniform-weight", "0.3", "--chunk-size", "4KiB")
SIDE_FILE_BYTES = 48 * 2**20  # a large tokenizer file keeps the finalization phase observable
POLL_S = 0.0005
KILL_TIMEOUT_S = 90

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path, Path]:
    return synthetic_triplet(
        tmp_path_factory.mktemp("resume_inputs"),
        layers=3,
        hidden=1024,
        vocab=1024,
        shards=SHARDS,
        dtype=torch.bfloat16,
        side_file_bytes=SIDE_FILE_BYTES,
    )


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main(merge_args(*inputs, out, *OPTIONS)) == 0
    return output_digest(out)


def snapshot(folder: Path) -> dict[str, int] | None:
    """File name -> size in `folder`, or None when it does not exist (yet, or any more)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return None
    sizes = {}
    for name in names:
        try:
            sizes[name] = os.stat(folder / name).st_size
        except FileNotFoundError:
            pass
    return sizes


def finished_shards(state: dict[str, int] | None) -> list[str]:
    return sorted(n for n in state or {} if n.endswith(".safetensors"))


def shards_in_progress(state: dict[str, int] | None) -> dict[str, int]:
    return {n: size for n, size in (state or {}).items() if n.endswith(".safetensors.tmp")}


KILL_POINTS = {
    # the plan is done and the output folder exists, nothing written yet
    "after-plan": lambda s: s is not None,
    # one shard finished and the next one partly written
    "mid-shard": lambda s: len(finished_shards(s)) >= 1 and any(size > 256 * 1024 for size in shards_in_progress(s).values()),
    # the instant a second shard is renamed into place
    "between-shards": lambda s: len(finished_shards(s)) >= 2,
    # every shard done; the side files are being copied
    "finalization": lambda s: s is not None and "tokenizer.json" in s,
}


def kill_when(args: list[str], out: Path, point: str, *, attempts: int = 3) -> dict[str, int]:
    """Run the CLI, SIGKILL it once `<out>.partial` matches `point`; return the folder afterwards.

    The finalization phase lasts only tens of milliseconds; on a busy machine the run may finish
    between the test seeing it and the signal landing. Such an attempt proves nothing, so its
    output is removed and the run is repeated (at most `attempts` times).
    """
    for _ in range(attempts):
        process = subprocess.Popen(cli_command(args), env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + KILL_TIMEOUT_S
        try:
            while not KILL_POINTS[point](snapshot(partial_of(out))):
                if process.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    pytest.fail(f"the run did not reach {point} within {KILL_TIMEOUT_S} s")
                time.sleep(POLL_S)
            else:
                process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            stderr = process.stderr.read()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stderr.close()
        if process.returncode == 0 and out.exists():
            shutil.rmtree(out)  # finished before the kill landed: try again
            continue
        assert process.returncode == -signal.SIGKILL, f"exit {process.returncode} before {point}: {stderr!r}"
        state = snapshot(partial_of(out))
        assert state is not None and not out.exists()
        return state
    pytest.fail(f"the run finished before the kill landed, {attempts} times; make the inputs larger")


def kept_shards(out: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of the shards the resume record lists as finished."""
    record = json.loads((partial_of(out) / RESUME_RECORD_NAME).read_text())
    return {name: _identity(partial_of(out) / name) for name in record["finished_shards"]}


def _identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def resume_and_compare(inputs, out: Path, reference: dict[str, str], kept: dict[str, tuple[int, int]]) -> None:
    from perta_stream.cli import parse_arguments
    from perta_stream.config.merge import MergeConfig
    from perta_stream.pipelines.merge import run_merge

    result = run_merge(MergeConfig.from_cli(parse_arguments(merge_args(*inputs, out, *OPTIONS, "--resume"))))
    # It says what it kept.
    assert set(result.kept_shards) == set(kept)
    assert ("resumed: kept " in result.summary()) == bool(kept)
    assert not partial_of(out).exists()
    assert not (out / RESUME_RECORD_NAME).exists()
    assert output_digest(out) == reference
    # The shards the interrupted run had finished were verified and kept, not rewritten.
    assert {name: _identity(out / name) for name in kept} == kept
    run_verify(VerifyConfig(out_dir=str(out)))


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_then_resume_gives_identical_output(inputs, reference, tmp_path, point):
    out = tmp_path / "out"
    before = {path: tree_digest(path) for path in inputs}
    state = kill_when(merge_args(*inputs, out, *OPTIONS), out, point)
    finished = finished_shards(state)
    if point == "after-plan":
        assert not finished
    elif point == "mid-shard":
        assert 1 <= len(finished) < SHARDS and shards_in_progress(state)
    elif point == "between-shards":
        assert 2 <= len(finished) < SHARDS
    else:
        assert len(finished) == SHARDS and not shards_in_progress(state)
    kept = kept_shards(out) if RESUME_RECORD_NAME in state else {}
    if point != "after-plan":
        assert kept, "the resume record lists no finished shard"
    resume_and_compare(inputs, out, reference, kept)
    assert {path: tree_digest(path) for path in inputs} == before


def test_kill_just_before_the_final_rename(inputs, reference, tmp_path):
    out = tmp_path / "out"
    # The real CLI, with the commit replaced by a self-SIGKILL: every file is in place, the
    # folder has not been renamed yet.
    wrapper = (
        "import os, signal, sys\n"
        "from perta_stream.sinks import output_dir\n"
        "output_dir.AtomicOutputDir.commit = lambda self: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from perta_stream.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = merge_args(*inputs, out, *OPTIONS)
    completed = subprocess.run([sys.executable, "-c", wrapper, *args], env=cli_env(), capture_output=True, timeout=120)
    assert completed.returncode == -signal.SIGKILL
    state = snapshot(partial_of(out))
    assert not out.exists() and {"perta_merge.json", "README.md", RESUME_RECORD_NAME} <= set(state)
    assert len(finished_shards(state)) == SHARDS
    resume_and_compare(inputs, out, reference, kept_shards(out))


# ---------------------------------------------------------------- what a resume refuses


@pytest.fixture(scope="module")
def interrupted(inputs, tmp_path_factory) -> Path:
    """A `<out>.partial` left by a run killed mid-shard (tests copy it before touching it)."""
    out = tmp_path_factory.mktemp("interrupted") / "out"
    kill_when(merge_args(*inputs, out, *OPTIONS), out, "mid-shard")
    return partial_of(out)


def copy_partial(interrupted: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(interrupted, partial_of(out))
    return out


def test_without_resume_the_partial_folder_is_reported(capsys, inputs, interrupted, tmp_path):
    out = copy_partial(interrupted, tmp_path)
    message = refused(capsys, merge_args(*inputs, out, *OPTIONS), out)
    assert f"{partial_of(out)} exists from an earlier run that did not finish" in message
    assert "--resume" in message


def test_a_resume_while_another_process_writes_is_refused(capsys, inputs, interrupted, tmp_path):
    out = copy_partial(interrupted, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)", str(partial_of(out))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        message = refused(capsys, merge_args(*inputs, out, *OPTIONS, "--resume"), out)
        assert "being written by another running process" in message
    finally:
        holder.kill()
        holder.wait()
    assert main(merge_args(*inputs, out, *OPTIONS, "--resume")) == 0


@pytest.mark.parametrize(
    "change",
    [("--uniform-weight", "0.4"), ("--alpha", "2"), ("--out-dtype", "float32"), ("--max-shard-size", "4MB")],
    ids=["weight", "alpha", "out-dtype", "shard-layout"],
)
def test_resume_with_other_options_is_refused(capsys, inputs, interrupted, tmp_path, change):
    out = copy_partial(interrupted, tmp_path)
    args = merge_args(*inputs, out, *OPTIONS, "--resume")
    flag, value = change
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    message = refused(capsys, args, out)
    assert "was started with other inputs or options" in message and "delete" in message


def test_resume_with_another_input_of_the_same_layout_is_refused(capsys, inputs, interrupted, tmp_path):
    theta0, full, fgt = inputs
    other_fgt = Path(shutil.copytree(fgt, tmp_path / "other_fgt"))
    # Same header bytes, other values: a second fine-tune of the same base model.
    shard = sorted(other_fgt.glob("*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0x40
    shard.write_bytes(bytes(raw))
    out = copy_partial(interrupted, tmp_path)
    message = refused(capsys, merge_args(theta0, full, other_fgt, out, *OPTIONS, "--resume"), out)
    assert "was started with other inputs or options" in message


def test_damaged_finished_shard_is_redone(inputs, reference, interrupted, tmp_path):
    out = copy_partial(interrupted, tmp_path)
    kept = kept_shards(out)
    damaged = sorted(kept)[0]
    with open(partial_of(out) / damaged, "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 0x01]))
    del kept[damaged]
    resume_and_compare(inputs, out, reference, kept)


def test_resume_without_a_partial_folder_runs_normally(inputs, reference, tmp_path):
    out = tmp_path / "out"
    assert main(merge_args(*inputs, out, *OPTIONS, "--resume")) == 0
    assert output_digest(out) == reference


def test_a_file_system_without_locks_still_gets_its_output(tmp_path, monkeypatch):
    import errno
    import fcntl

    from perta_stream.sinks.output_dir import AtomicOutputDir

    def no_locks(fd, operation):  # noqa: ANN001
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    output = AtomicOutputDir(tmp_path / "out", overwrite=False)
    assert output.open().is_dir()
    assert output.commit() == tmp_path / "out"
