"""`unlearn --one-pass --resume`: kill the real CLI at chosen points, resume, get the same bytes.

As in tests/test_stats_resume.py, each interrupted run is the CLI in a child process with one
method wrapped to SIGKILL the process at an exact point: after the n-th group is merged into
the outputs (on the background thread, before or after a resume state claims it), after the n-th
resume state is saved, after the n-th output shard is finished (or renamed, before the output
records it), or instead of the first rename into place. The children start together; each resume runs in this process and must give every
output file of an uninterrupted run byte for byte (perta_merge.json apart from timings), keep
the shards the killed run had finished (same inode and mtime), and leave no resume files.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from one_pass_fixtures import assert_same_output, data_args, make_workspace, model_args
from perta_stream.cli import main
from perta_stream.sinks.resume_record import RESUME_RECORD_NAME
from reliability_fixtures import cli_env, killer_script, partial_of

KILL_TIMEOUT_S = 180
METHODS = "grad,fisher"
ALPHAS = "0.5,1"

KILLER = killer_script(r"""
from perta_stream.pipelines import group_merge
from perta_stream.sinks import layered_output, model_output, output_dir, stats_output
if point == "merged":
    die_after(group_merge.GroupMerger, "merge")
elif point == "state-saved":
    die_after(stats_output.StatsOutput, "offer_state")
elif point == "shard-finished":
    die_after(model_output.LocalModelOutput, "shard_finished")
elif point == "shard-renamed":
    die_after(layered_output._ShardInProgress, "finish")
elif point == "commit":
    output_dir.AtomicOutputDir.commit = lambda self: die()
""")

CONTINUED = "continuing from the state saved at"
SWEPT_AGAIN = None
FINISHED_ONLY = "every output shard and statistic is on disk already"
# name -> (model, where the child dies, on which occurrence, extra flags, what the resume does)
KILLS = {
    "tied-after-the-second-state": ("llama", "state-saved", 2, ("--checkpoint-interval", "0"), CONTINUED + " layer 0"),
    "tied-merged-past-the-last-state-spilled": ("llama", "merged", 2, ("--checkpoint-interval", "0", "--boundary-budget", "0"), CONTINUED + " layer 1"),
    "tied-shard-renamed-before-its-record": ("llama", "shard-renamed", 1, ("--checkpoint-interval", "0"), CONTINUED + " layer 1"),
    "untied-shards-finished-no-state": ("qwen2", "shard-finished", 3, (), SWEPT_AGAIN),
    "untied-saving-stats-mid-backward": ("qwen2", "merged", 3, ("--checkpoint-interval", "0", "--save-stats", "{saved}"), CONTINUED + " layer 0"),
    "tied-before-the-final-rename": ("llama", "commit", 0, ("--checkpoint-interval", "0"), FINISHED_ONLY),
}


def one_pass_args(ws: dict[str, Path], kind: str, out: Path, *extra: str) -> list[str]:
    extra = tuple(part.replace("{saved}", str(out.parent / "saved")) for part in extra)
    return ["unlearn", "--one-pass", *model_args(ws, kind), *data_args(ws), "--method", METHODS, "--alpha", ALPHAS, "--out", str(out), "-q", *extra]


def output_folders(out: Path) -> list[Path]:
    return [out / method / f"alpha_{alpha}" for method in METHODS.split(",") for alpha in ALPHAS.split(",")]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_workspace(tmp_path_factory.mktemp("one-pass-resume"))


@pytest.fixture(scope="module")
def references(workspace: dict[str, Path]) -> dict[str, Path]:
    """Uninterrupted one-pass runs (equal to stats + merge: tests/test_one_pass.py)."""
    found = {}
    for kind in ("llama", "qwen2"):
        out = workspace["root"] / "reference" / kind / "out"
        assert main(one_pass_args(workspace, kind, out, "--save-stats", "{saved}")) == 0
        found[kind] = out
    return found


@pytest.fixture(scope="module")
def interrupted(workspace: dict[str, Path]) -> dict[str, Path]:
    children = {}
    for name, (kind, point, count, extra, _) in KILLS.items():
        out = workspace["root"] / "killed" / name / "out"
        out.parent.mkdir(parents=True)
        command = [sys.executable, "-c", KILLER, point, str(count), *one_pass_args(workspace, kind, out, *extra)]
        children[name] = (out, subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    outs = {}
    for name, (out, child) in children.items():
        _, stderr = child.communicate(timeout=KILL_TIMEOUT_S)
        assert child.returncode == -signal.SIGKILL, f"{name}: exit {child.returncode}: {stderr.decode()[-2000:]}"
        assert not any(folder.exists() for folder in output_folders(out)), name
        outs[name] = out
    return outs


def finished_shards(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of each shard the output's resume record lists as finished."""
    partial = partial_of(folder)
    if not (partial / RESUME_RECORD_NAME).exists():
        return {}
    names = json.loads((partial / RESUME_RECORD_NAME).read_text())["finished_shards"]
    return {name: ((partial / name).stat().st_ino, (partial / name).stat().st_mtime_ns) for name in names}


@pytest.mark.parametrize("name", list(KILLS))
def test_kill_then_resume_gives_identical_output(workspace, references, interrupted, tmp_path, caplog, name):
    kind, _, _, extra, expected = KILLS[name]
    out = tmp_path / "out"
    shutil.copytree(interrupted[name].parent, tmp_path, dirs_exist_ok=True)
    kept = {folder: finished_shards(folder) for folder in output_folders(out)}
    from perta_stream.cli import parse_arguments
    from perta_stream.config.unlearn import UnlearnConfig
    from perta_stream.pipelines.unlearn import run_unlearn

    with caplog.at_level("INFO", logger="perta_stream"):
        result = run_unlearn(UnlearnConfig.from_cli(parse_arguments(one_pass_args(workspace, kind, out, *extra, "--resume"))))
    # It says what it kept of each output.
    said = [f"{folder}: kept {len(kept[folder])} of" for folder in output_folders(out) if kept[folder]]
    assert len(result.resumed) == len(said) and all(any(note.startswith(line) for note in result.resumed) for line in said)
    for message in (CONTINUED, FINISHED_ONLY):
        assert (message in caplog.text) == (expected is not None and expected.startswith(message)), caplog.text[-3000:]
    if expected is not None:
        assert expected in caplog.text
    for folder, reference in zip(output_folders(out), output_folders(references[kind])):
        assert_same_output(folder, reference)
        assert {n: ((folder / n).stat().st_ino, (folder / n).stat().st_mtime_ns) for n in kept[folder]} == kept[folder]
    if "--save-stats" in extra:
        saved, reference_saved = out.parent / "saved", references[kind].parent / "saved"
        shards = sorted(p.relative_to(saved) for p in saved.rglob("*.safetensors"))
        assert shards == sorted(p.relative_to(reference_saved) for p in reference_saved.rglob("*.safetensors"))
        assert all((saved / s).read_bytes() == (reference_saved / s).read_bytes() for s in shards)
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".perta") or p.name.endswith((".partial", ".inprogress", ".tmp"))]
    assert not leftovers


def test_without_resume_the_partial_folder_is_reported(workspace, interrupted, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(interrupted["tied-after-the-second-state"].parent, tmp_path, dirs_exist_ok=True)
    assert main(one_pass_args(workspace, "llama", out, "--checkpoint-interval", "0")) != 0
    assert "--resume" in capsys.readouterr().err


def test_resume_with_another_tau_is_refused(workspace, interrupted, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(interrupted["tied-after-the-second-state"].parent, tmp_path, dirs_exist_ok=True)
    assert main(one_pass_args(workspace, "llama", out, "--checkpoint-interval", "0", "--tau", "3", "--resume")) != 0
    assert "other inputs or options" in capsys.readouterr().err
