"""`stats --resume`: kill the real CLI at chosen points, resume, get the bytes of an uninterrupted run.

Each interrupted run is `perta_stream.cli.main` in a child process whose sinks are wrapped so
that the process SIGKILLs itself at an exact point: right after a resume state is saved, after
the n-th group's shards are written, between writing a resume state and renaming it into place,
or instead of the final rename. Watching the folder from outside cannot stop a run this small
(well under a second of compute) at a chosen group; the wrapper can, and it changes no product
code (the same trick as the final-rename test of tests/test_resume.py). One more test kills
from outside at a moment only polling decides. The children start together (most of their time
is importing torch and transformers); each resume then runs in this process and must produce
every file of an uninterrupted run byte for byte (perta_stats.json except its timings),
keeping the shards the interrupted run had recorded.

Tied (llama) and untied (qwen2) models, --checkpoint-interval 0 (a state at every resume
point) and the default (no state in a run this short: the resume recomputes from the start).
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

from perta_stream.cli import main
from perta_stream.config.stats import StatsConfig
from perta_stream.errors import PlanError, ResumeError, UsageError
from perta_stream.pipelines import stats as stats_pipeline
from perta_stream.sinks.resume_record import RESUME_RECORD_NAME
from perta_stream.sinks.stats_output import STATE_PREFIX
from reliability_fixtures import cli_command, cli_env, killer_script, output_digest, partial_of, refused
from stats_fixtures import fail_write_group, save_tiny_model, write_data, write_jsonl

# Group order of a 2-layer model, each for forget then retain: head, layer 1, layer 0, embeddings.
GROUPS_PER_DATASET = 4
KILL_TIMEOUT_S = 120

# The child: the real CLI with one sink method wrapped to SIGKILL the process at an exact point.
KILLER = killer_script(r"""
from perta_stream.sinks import output_dir, stats_output, stats_store
if point == "state-saved":
    die_after(stats_output.StatsOutput, "offer_state")
elif point == "group-written":
    die_after(stats_store.StatsStore, "write_group")
elif point == "state-rename":
    replace = os.replace
    def replace_or_die(src, dst, *args, **kwargs):
        if os.path.basename(dst).startswith(stats_output.STATE_PREFIX):
            seen[0] += 1
            if seen[0] == count:
                die()
        return replace(src, dst, *args, **kwargs)
    os.replace = replace_or_die
elif point == "commit":
    output_dir.AtomicOutputDir.commit = lambda self: die()
""")

# name -> (model, where the child dies, on which occurrence, extra flags)
KILLS = {
    "tied-after-head-state": ("llama", "state-saved", 1, ("--checkpoint-interval", "0")),
    # boundaries spilled to disk (budget 0): the killed run leaves its spill folder behind
    "tied-mid-backward": ("llama", "group-written", 5, ("--checkpoint-interval", "0", "--boundary-budget", "0")),
    "tied-while-saving-a-state": ("llama", "state-rename", 2, ("--checkpoint-interval", "0")),
    "tied-before-the-final-rename": ("llama", "commit", 0, ("--checkpoint-interval", "0")),
    "untied-in-the-embedding-step": ("qwen2", "group-written", 7, ("--checkpoint-interval", "0")),
    "untied-mid-backward-no-state": ("qwen2", "group-written", 5, ()),
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stats-resume")
    forget, retain = write_data(root / "data")
    models = {kind: save_tiny_model(root / "models", kind) for kind in ("llama", "qwen2")}
    return {"root": root, "forget": forget, "retain": retain, **models}


def stats_digest(out: Path) -> dict[str, str]:
    return output_digest(out, "perta_stats.json")


def stats_args(ws: dict[str, Path], kind: str, out: Path, *extra: str) -> list[str]:
    return ["stats", "--model", str(ws[kind]), "--forget", str(ws["forget"]), "--retain", str(ws["retain"]), "--out", str(out), "--batch-size", "2", "--device", "cpu", "-q", *extra]


def resume_record(out: Path) -> dict:
    return json.loads((partial_of(out) / RESUME_RECORD_NAME).read_text())


def identities(folder: Path, names) -> dict[str, tuple[int, int]]:
    """(inode, mtime) per file: a kept shard keeps both, a rewritten one does not."""
    return {name: ((folder / name).stat().st_ino, (folder / name).stat().st_mtime_ns) for name in names}


@pytest.fixture(scope="module")
def references(workspace: dict[str, Path]) -> dict[str, dict[str, str]]:
    """The uninterrupted runs, one per model (the checkpoint interval does not change the bytes)."""
    digests = {}
    for kind in ("llama", "qwen2"):
        out = workspace["root"] / f"reference-{kind}"
        assert main(stats_args(workspace, kind, out)) == 0
        digests[kind] = stats_digest(out)
    return digests


@pytest.fixture(scope="module")
def interrupted(workspace: dict[str, Path]) -> dict[str, Path]:
    """Every KILLS run, started together; name -> its `--out` (only `<out>.partial` exists)."""
    children = {}
    for name, (kind, point, count, extra) in KILLS.items():
        out = workspace["root"] / "killed" / name / "out"
        out.parent.mkdir(parents=True)
        command = [sys.executable, "-c", KILLER, point, str(count), *stats_args(workspace, kind, out, *extra)]
        children[name] = (out, subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    outs = {}
    for name, (out, child) in children.items():
        _, stderr = child.communicate(timeout=KILL_TIMEOUT_S)
        assert child.returncode == -signal.SIGKILL, f"{name}: exit {child.returncode}: {stderr.decode()[-2000:]}"
        assert partial_of(out).is_dir() and not out.exists(), name
        outs[name] = out
    return outs


def copy_interrupted(interrupted: dict[str, Path], name: str, tmp_path: Path) -> Path:
    """A private copy of one interrupted run's partial folder (the fixture's stay untouched)."""
    out = tmp_path / "out"
    shutil.copytree(partial_of(interrupted[name]), partial_of(out))
    return out


def resume_and_compare(ws: dict[str, Path], kind: str, out: Path, reference: dict[str, str], *extra: str, damaged: str | None = None) -> None:
    kept = [name for name in resume_record(out)["finished_shards"] if name != damaged]
    before = identities(partial_of(out), kept)
    from perta_stream.cli import parse_arguments
    from perta_stream.config.stats import StatsConfig

    result = stats_pipeline.run_stats(StatsConfig.from_cli(parse_arguments(stats_args(ws, kind, out, *extra, "--resume"))))
    # It says what it kept.
    assert result.resumed is not None and f"kept {len(kept)} finished shard(s)" in result.summary()
    assert not partial_of(out).exists()
    assert stats_digest(out) == reference
    # The recorded shards were verified and kept, not rewritten; nothing of the resume is left.
    assert identities(out, kept) == before
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp") or p.name.startswith("perta-boundaries-")]


# ---------------------------------------------------------------- kill, resume, same bytes


@pytest.mark.parametrize("name", list(KILLS))
def test_kill_then_resume_gives_identical_output(workspace, references, interrupted, tmp_path, name):
    kind = KILLS[name][0]
    out = copy_interrupted(interrupted, name, tmp_path)
    record = resume_record(out)
    finished = set(record["finished_shards"])
    state = record["state"]
    states = sorted(p.name for p in partial_of(out).glob(f"{STATE_PREFIX}*.safetensors"))
    if name == "tied-after-head-state":
        assert state["next_layer"] == 1 and len(finished) == 2 * 2  # head of both datasets, grad + fisher
    elif name == "tied-mid-backward":
        # state after layer 1; layer 0 of forget written after it (kept, not recomputed into a new file)
        assert state["next_layer"] == 0 and len(finished) == 5 * 2
        assert list(partial_of(out).glob("perta-boundaries-*/*.bin"))
    elif name == "tied-while-saving-a-state":
        # The second state never got its name: the record still names the first, which is intact.
        assert state["next_layer"] == 1 and states == [f"{STATE_PREFIX}layer-1.safetensors"]
        assert any(p.name.endswith(".tmp") for p in partial_of(out).iterdir())
    elif name == "tied-before-the-final-rename":
        assert state is None and len(finished) == 2 * GROUPS_PER_DATASET * 2 and (partial_of(out) / "perta_stats.json").is_file()
    elif name == "untied-in-the-embedding-step":
        assert state["next_layer"] == -1 and len(finished) == 7 * 2
    else:
        assert state is None and not states and len(finished) == 5 * 2
    if state is not None:
        assert states == [state["file_name"]]
    resume_and_compare(workspace, kind, out, references[kind])


def test_external_kill_at_a_polled_moment(workspace, references, tmp_path):
    """SIGKILL from outside once a layer shard appears (where it lands is up to the scheduler)."""
    out = tmp_path / "out"
    layer_shard = partial_of(out) / "forget.grad" / "model-00003-of-00004.safetensors"
    for _ in range(3):
        child = subprocess.Popen(cli_command(stats_args(workspace, "llama", out, "--checkpoint-interval", "0")), env=cli_env(), stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while not layer_shard.exists() and child.poll() is None:
            assert time.monotonic() < deadline, "the run never wrote a layer shard"
            time.sleep(0.0005)
        child.send_signal(signal.SIGKILL)
        child.wait()
        if child.returncode == -signal.SIGKILL and not out.exists():
            break
        shutil.rmtree(out, ignore_errors=True)  # finished before the signal landed: try again
    else:
        pytest.fail("the run finished before the kill landed, 3 times")
    resume_and_compare(workspace, "llama", out, references["llama"], "--checkpoint-interval", "0")


# ---------------------------------------------------------------- what a resume refuses


def test_without_resume_the_partial_folder_is_reported(capsys, workspace, interrupted, tmp_path):
    out = copy_interrupted(interrupted, "tied-mid-backward", tmp_path)
    for extra in ((), ("--overwrite",)):
        message = refused(capsys, stats_args(workspace, "llama", out, *extra), out)
        assert f"{partial_of(out)} exists from an earlier run that did not finish" in message and "--resume" in message


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (("--kinds", "grad"), "kinds: ['grad', 'fisher'] then, ['grad'] now"),
        (("--max-length", "64"), "max_length: 512 then, 64 now"),
        (("--stats-dtype", "bf16"), "stats_dtype: 'F32' then, 'BF16' now"),
        (("--seed", "3", "--fraction", "0.5"), "fraction: 1.0 then, 0.5 now"),
    ],
    ids=["kinds", "max-length", "stats-dtype", "fraction"],
)
def test_resume_with_other_options_is_refused(capsys, workspace, interrupted, tmp_path, change, named):
    out = copy_interrupted(interrupted, "tied-mid-backward", tmp_path)
    message = refused(capsys, stats_args(workspace, "llama", out, "--checkpoint-interval", "0", "--resume", *change), out)
    assert "was started with other inputs or options" in message and named in message and "delete" in message


def test_resume_with_another_data_file_or_model_is_refused(capsys, workspace, interrupted, tmp_path):
    out = copy_interrupted(interrupted, "tied-mid-backward", tmp_path)
    records = [json.loads(line) for line in workspace["forget"].read_text().splitlines()]
    other = write_jsonl(tmp_path / "forget.jsonl", records[:-1])
    args = stats_args(workspace, "llama", out, "--resume")
    args[args.index("--forget") + 1] = str(other)
    assert "forget_sha256 differs" in refused(capsys, args, out)
    args = stats_args(workspace, "qwen2", out, "--resume")
    assert "model_files differs" in refused(capsys, args, out)


def test_resume_under_a_launcher_is_refused(workspace, interrupted, tmp_path, monkeypatch):
    import contextlib

    class TwoRanks:
        is_distributed, is_main, rank, world_size = True, True, 0, 2

    monkeypatch.setattr(stats_pipeline, "distributed", lambda **_: contextlib.nullcontext(TwoRanks()))
    out = copy_interrupted(interrupted, "tied-mid-backward", tmp_path)
    config = StatsConfig(model=str(workspace["llama"]), forget=str(workspace["forget"]), retain=str(workspace["retain"]), out=str(out), resume=True, device="cpu")
    with pytest.raises(UsageError, match="--resume runs in one process.*without the launcher"):
        stats_pipeline.run_stats(config)


def test_unlearn_resumes_its_statistics_and_its_merge(workspace, monkeypatch, tmp_path):
    from types import SimpleNamespace

    from perta_stream.cli import build_parser
    from perta_stream.config.unlearn import UnlearnConfig
    from perta_stream.pipelines import unlearn

    seen = []
    monkeypatch.setattr(stats_pipeline, "run_stats", lambda config: seen.append(config) or SimpleNamespace(summary=lambda: ""))
    model, forget, retain = str(workspace["llama"]), str(workspace["forget"]), str(workspace["retain"])
    argv = ["unlearn", "--theta0", model, "--full", model, "--fgt", model, "--forget", forget, "--retain", retain, "--out", str(tmp_path / "clean")]
    config = UnlearnConfig.from_cli(build_parser().parse_args(argv + ["--resume"]))
    unlearn._run_stats(config, str(tmp_path / "stats"), overwrite=False)
    assert seen[0].resume and config.merge_config(out=config.out, method=config.method, alphas=config.alphas, stats=str(tmp_path / "stats")).resume
    assert not UnlearnConfig.from_cli(build_parser().parse_args(argv)).resume


def test_invalid_checkpoint_interval_is_reported(workspace):
    with pytest.raises(PlanError, match="--checkpoint-interval must be a number of seconds >= 0"):
        StatsConfig(model=str(workspace["llama"]), forget=str(workspace["forget"]), retain=str(workspace["retain"]), out="x", checkpoint_interval_s=-1)


# ---------------------------------------------------------------- damage and failures


@pytest.mark.parametrize(
    "damaged",
    [
        "forget.fisher/model-00004-of-00004.safetensors",  # the head, before the saved state: start over
        "forget.grad/model-00002-of-00004.safetensors",  # layer 0, after it: redone from the state
    ],
    ids=["before-the-state", "after-the-state"],
)
def test_damaged_kept_shard_is_detected_and_redone(workspace, references, interrupted, tmp_path, caplog, damaged):
    out = copy_interrupted(interrupted, "tied-mid-backward", tmp_path)
    assert damaged in resume_record(out)["finished_shards"]
    with open(partial_of(out) / damaged, "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 0x01]))
    with caplog.at_level("INFO", logger="perta_stream"):
        resume_and_compare(workspace, "llama", out, references["llama"], "--checkpoint-interval", "0", damaged=damaged)
    continued = "continuing from the start" if damaged.endswith("model-00004-of-00004.safetensors") else "continuing from the state saved at layer 0"
    assert continued in caplog.text


def test_damaged_resume_state_means_starting_over_with_the_kept_shards(workspace, references, interrupted, tmp_path, caplog):
    out = copy_interrupted(interrupted, "untied-in-the-embedding-step", tmp_path)
    state = partial_of(out) / resume_record(out)["state"]["file_name"]
    with open(state, "r+b") as handle:
        handle.seek(-3, os.SEEK_END)
        handle.write(b"\x00\x01\x02")
    resume_and_compare(workspace, "qwen2", out, references["qwen2"], "--checkpoint-interval", "0")
    assert "is missing or damaged; recomputing from the start" in caplog.text


def test_failure_leaves_a_resumable_partial_folder(workspace, references, tmp_path, monkeypatch):
    fail_write_group(monkeypatch, 4)
    out = tmp_path / "out"
    config = StatsConfig(model=str(workspace["llama"]), forget=str(workspace["forget"]), retain=str(workspace["retain"]), out=str(out), batch_size=2, checkpoint_interval_s=0, device="cpu")
    with pytest.raises(OSError, match="simulated"):
        stats_pipeline.run_stats(config)
    assert not out.exists()
    partial = partial_of(out)
    assert not list(partial.rglob("*.tmp")) and not list(partial.glob("perta-boundaries-*"))
    assert not (partial / "perta_stats.json").exists() and not list(partial.rglob("model.safetensors.index.json"))
    record = resume_record(out)
    assert record["state"]["next_layer"] == 1 and len(record["finished_shards"]) == 3 * 2
    monkeypatch.undo()
    resume_and_compare(workspace, "llama", out, references["llama"], "--checkpoint-interval", "0")


def test_resume_without_a_partial_folder_runs_normally(workspace, references, tmp_path):
    out = tmp_path / "out"
    assert main(stats_args(workspace, "qwen2", out, "--resume")) == 0
    assert stats_digest(out) == references["qwen2"]


def test_unreadable_resume_record_is_refused(workspace, interrupted, tmp_path):
    out = copy_interrupted(interrupted, "tied-before-the-final-rename", tmp_path)
    (partial_of(out) / RESUME_RECORD_NAME).write_text("not json")
    config = StatsConfig(model=str(workspace["llama"]), forget=str(workspace["forget"]), retain=str(workspace["retain"]), out=str(out), batch_size=2, resume=True, device="cpu")
    with pytest.raises(ResumeError, match=r"\.perta_resume\.json is unreadable .*; delete .*\.partial and rerun without --resume"):
        stats_pipeline.run_stats(config)


def test_a_resume_while_the_first_run_still_writes_is_refused(capsys, workspace, interrupted, tmp_path):
    """The running process holds a lock on its partial folder; a second one must not write into it."""
    from perta_stream.sinks.output_dir import AtomicOutputDir

    out = copy_interrupted(interrupted, "tied-mid-backward", tmp_path)
    running = AtomicOutputDir(out, overwrite=False, keep_partial=True)
    running.open()
    try:
        message = refused(capsys, stats_args(workspace, "llama", out, "--resume"), out)
        assert "being written by another running process" in message
    finally:
        running.release()
    assert main(stats_args(workspace, "llama", out, "--resume")) == 0
