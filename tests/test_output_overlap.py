"""Every output of a run is checked against every other before any work, and refusals say
what is wrong with this run (not "an earlier run" or "another process" when it is this one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from perta_stream.cli import main
from reliability_fixtures import merge_args, partial_of


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from one_pass_fixtures import make_workspace

    return make_workspace(tmp_path_factory.mktemp("overlap"), kinds=("llama",))


def _unlearn_args(ws: dict, *extra: str) -> list[str]:
    from one_pass_fixtures import data_args, model_args

    return ["unlearn", *model_args(ws, "llama"), *data_args(ws), "--method", "fisher", "-q", *extra]


def _refused_before_work(capsys, args: list[str], *never_created: Path) -> str:  # noqa: ANN001
    assert main(args) == 2  # a usage error: refused while the options are checked
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for path in never_created:
        assert not path.exists() and not partial_of(path).exists(), path
    return err


@pytest.mark.parametrize("resume", [False, True])
def test_save_stats_inside_out_is_refused_before_the_sweep(workspace, tmp_path, capsys, resume):
    out = tmp_path / "out"
    stats = out / "stats"
    err = _refused_before_work(capsys, _unlearn_args(workspace, "--one-pass", "--out", str(out), "--save-stats", str(stats), *(["--resume"] if resume else [])), out, stats)
    assert f"--save-stats {stats} lies inside --out {out}" in err


def test_save_stats_equal_to_out_is_named_as_this_runs_mistake(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    for extra in ([], ["--resume"], ["--overwrite"]):
        err = _refused_before_work(capsys, _unlearn_args(workspace, "--one-pass", "--out", str(out), "--save-stats", str(out), *extra), out)
        assert f"--out {out} and --save-stats {out} are the same folder" in err
        assert "earlier run" not in err and "another running process" not in err


def test_an_output_inside_another_outputs_working_folder_is_refused(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    stats = tmp_path / "out.partial" / "stats"
    err = _refused_before_work(capsys, _unlearn_args(workspace, "--one-pass", "--out", str(out), "--save-stats", str(stats)), out)
    assert "lies inside --out" in err and "working folder" in err


def test_two_pass_statistics_inside_the_output_are_refused_before_they_are_computed(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    stats = out / "perta_stats"
    err = _refused_before_work(capsys, _unlearn_args(workspace, "--out", str(out), "--stats-dir", str(stats)), out, stats)
    assert f"--stats-dir {stats} lies inside --out {out}" in err


def test_outputs_of_several_methods_and_alphas_are_apart(workspace, tmp_path, capsys):
    # `{alpha}` alone leaves the two methods one folder each.
    out = tmp_path / "{alpha}"
    err = _refused_before_work(capsys, _unlearn_args(workspace, "--one-pass", "--method", "grad,fisher", "--alpha", "0.5,1", "--out", str(out), "--save-stats", str(tmp_path / "0.5")))
    assert "same folder" in err or "lies inside" in err


def test_after_a_statistics_refusal_the_advice_is_not_a_plain_resume(triplet, tmp_path, capsys):
    from merge_fixtures import write_stats

    theta0, full, fgt = triplet
    stats = write_stats(tmp_path / "stats", fgt)  # computed at another model than --theta0
    out = tmp_path / "out"
    args = merge_args(theta0, full, fgt, out, "--method", "fisher", "--stats", str(stats))
    assert main(args) == 1
    assert "whose tensors differ" in capsys.readouterr().err
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "stopped because: statistics" in err and "whose tensors differ" in err
    assert "rerun the same command with --resume" not in err
    # The fix it names, with --resume, keeps the merged shards and finishes.
    assert main([*args, "--stats-at", "fgt", "--resume"]) == 0
    assert not (out / ".perta_stopped").exists()
