"""`unlearn --one-pass` with θ_full = θ_0 and a LoRA adapter θ_fgt (task arithmetic's own recipe).

The one pass equals `stats` + `merge` (both through the real CLI, the merge reading the same
adapter) byte for byte; it reads θ_0's bytes about twice (the forward and the backward; the
merge takes θ_full's values from the backward's copy), counted through the byte source; and a
run killed with SIGKILL resumes to the same bytes (as tests/test_one_pass_resume.py).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")

from adapter_fixtures import ALL_LINEAR, make_adapter  # noqa: E402
from one_pass_fixtures import alpha_dirs, assert_same_output, data_args, make_workspace  # noqa: E402
from perta_stream.cli import main  # noqa: E402
from reliability_fixtures import cli_env, killer_script  # noqa: E402
from test_adapter_merge import count_reads  # noqa: E402

METHODS = ["grad", "fisher"]
ALPHAS = ["0.5", "1"]
ADAPTERS = {
    "rslora-all-linear": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=ALL_LINEAR),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True),
}
KILLER = killer_script(r"""
from perta_stream.pipelines import group_merge
from perta_stream.sinks import stats_output
if point == "merged":
    die_after(group_merge.GroupMerger, "merge")
elif point == "state-saved":
    die_after(stats_output.StatsOutput, "offer_state")
""")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = make_workspace(tmp_path_factory.mktemp("one-pass-adapter"), kinds=("llama",))
    for name, options in ADAPTERS.items():
        ws[name] = make_adapter(ws["llama.theta0"], ws["root"] / f"adapter-{name}", **options)
    return ws


def models(ws, adapter: str) -> list[str]:
    theta0 = str(ws["llama.theta0"])
    return ["--theta0", theta0, "--full", theta0, "--fgt", str(ws[adapter])]


def one_pass_args(ws, adapter: str, out: Path, *extra: str) -> list[str]:
    return ["unlearn", "--one-pass", *models(ws, adapter), *data_args(ws), "--method", ",".join(METHODS), "--alpha", ",".join(ALPHAS), "--out", str(out), "-q", *extra]


def two_pass(ws, adapter: str, out: Path) -> dict[str, Path]:
    stats = out / "stats"
    assert main(["stats", "--model", str(ws["llama.theta0"]), *data_args(ws), "--out", str(stats), "-q"]) == 0
    for method in METHODS:
        assert main(["merge", *models(ws, adapter), "--method", method, "--stats", str(stats), "--alpha", ",".join(ALPHAS), "--out", str(out / method), "--max-memory", "4GiB", "-q"]) == 0
    return {method: out / method for method in METHODS}


@pytest.fixture(scope="module")
def references(workspace):
    return {name: two_pass(workspace, name, workspace["root"] / "two-pass" / name) for name in ADAPTERS}


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_one_pass_equals_stats_then_merge_and_reads_theta0_twice(workspace, references, adapter, tmp_path, monkeypatch):
    from perta_stream.sources.checkpoint import open_local_checkpoint

    counts = count_reads(monkeypatch)
    assert main(one_pass_args(workspace, adapter, tmp_path / "one")) == 0
    for method in METHODS:
        for alpha, folder in alpha_dirs(tmp_path / "one" / method, ALPHAS).items():
            assert_same_output(folder, alpha_dirs(references[adapter][method], ALPHAS)[alpha])
    theta0 = open_local_checkpoint(workspace["llama.theta0"], "theta0")
    embedding = theta0.tensors["model.embed_tokens.weight"].nbytes
    # The forward and the backward read θ_0; the merge reads only the embedding again (merged
    # when the sweep ends) and the adapter.
    assert 2 * theta0.total_bytes <= counts["llama"] <= 2 * theta0.total_bytes + embedding


@pytest.fixture(scope="module")
def interrupted(workspace):
    children = {}
    for point, count in (("merged", 2), ("state-saved", 2)):
        out = workspace["root"] / "killed" / point / "out"
        out.parent.mkdir(parents=True)
        command = [sys.executable, "-c", KILLER, point, str(count), *one_pass_args(workspace, "dora", out, "--checkpoint-interval", "0")]
        children[point] = (out, subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    outs = {}
    for point, (out, child) in children.items():
        _, stderr = child.communicate(timeout=180)
        assert child.returncode == -signal.SIGKILL, f"{point}: exit {child.returncode}: {stderr.decode()[-2000:]}"
        outs[point] = out
    return outs


@pytest.mark.parametrize("point", ["merged", "state-saved"])
def test_kill_then_resume_gives_the_same_bytes(workspace, references, interrupted, point, tmp_path, caplog):
    out = tmp_path / "out"
    shutil.copytree(interrupted[point].parent, tmp_path, dirs_exist_ok=True)
    with caplog.at_level("INFO", logger="perta_stream"):
        assert main(one_pass_args(workspace, "dora", out, "--checkpoint-interval", "0", "--resume")) == 0
    assert "continuing from the state saved at" in caplog.text
    for method in METHODS:
        for alpha, folder in alpha_dirs(out / method, ALPHAS).items():
            assert_same_output(folder, alpha_dirs(references["dora"][method], ALPHAS)[alpha])
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".perta") or p.name.endswith((".partial", ".tmp"))]
