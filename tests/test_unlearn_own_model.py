"""`unlearn --model MINE --forget F --retain R --out CLEAN`: θ_fgt made by fine-tuning and reused,
statistics keyed by the model's content digest and the data, the before/after table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from perta_stream.cli import main
from perta_stream.config.unlearn import UnlearnConfig
from perta_stream.errors import PertaStreamError
from perta_stream.pipelines.unlearn import run_unlearn
from perta_stream.sources.tofu import bundled_tofu_dir

from tiny_models import save_tiny_checkpoint

TRAINING = ["--epochs", "2", "--lr", "3e-3", "--device", "cpu", "--batch-size", "2"]
EVAL = ["--max-new-tokens", "4", "--examples", "2", "--eval-batch-size", "4"]


def _data(root: Path, name: str, start: int, count: int) -> Path:
    lines = (bundled_tofu_dir() / "forget10.jsonl").read_text(encoding="utf-8").splitlines()[start : start + count]
    path = root / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("own_model")
    save_tiny_checkpoint(root / "mine", seed=0)
    save_tiny_checkpoint(root / "other", seed=1)
    return {
        "root": root,
        "mine": root / "mine",
        "other": root / "other",
        "forget": _data(root, "forget.jsonl", 0, 4),
        "retain": _data(root, "retain.jsonl", 10, 4),
        "forget2": _data(root, "forget2.jsonl", 4, 4),
    }


def _args(ws: dict[str, Path], out: Path, *extra: str, model: str = "mine", forget: str = "forget") -> list[str]:
    return ["unlearn", "--model", str(ws[model]), "--forget", str(ws[forget]), "--retain", str(ws["retain"]), "--out", str(out), *TRAINING, *EVAL, *extra]


@pytest.fixture(scope="module")
def first_run(workspace):
    from perta_stream.cli import parse_arguments

    out = workspace["root"] / "runs" / "clean"
    lines: list[str] = []
    result = run_unlearn(UnlearnConfig.from_cli(parse_arguments(_args(workspace, out, "--alpha", "0.5,1"))), on_stage=lines.append)
    return out, result, lines


def test_one_command_makes_theta_fgt_merges_and_evaluates(workspace, first_run, tmp_path):
    from merge_fixtures import tree_digest

    out, result, lines = first_run
    work = out / "perta_work"
    assert result.outputs == (str(out / "alpha_0.5"), str(out / "alpha_1"))
    assert result.fgt_dir is not None and Path(result.fgt_dir).parent == work and not result.fgt_reused
    record = json.loads((Path(result.fgt_dir) / "perta_finetune.json").read_text())
    assert record["config"]["model"] == str(workspace["mine"]) and record["config"]["data"] == str(workspace["forget"])
    assert record["steps"] == 2 and record["config"]["epochs"] == 2  # 4 records, batches of 4
    # The estimate is printed before training goes on, measured on the first steps.
    assert any(line.startswith("fine-tuning: 2 steps of 4 samples (4 samples); about ") for line in lines)
    assert Path(result.stats_dir).parent == work and Path(result.stats_dir).name.startswith("stats-")
    # The same merge from explicit inputs: theta0 = full = MINE, fgt = the made one, the same statistics.
    reference = tmp_path / "reference"
    args = ["unlearn", "--theta0", str(workspace["mine"]), "--full", str(workspace["mine"]), "--fgt", result.fgt_dir]
    args += ["--forget", str(workspace["forget"]), "--retain", str(workspace["retain"]), "--stats-dir", result.stats_dir]
    args += ["--out", str(reference), "--alpha", "0.5,1", "-q"]
    assert main(args) == 0
    for alpha in ("alpha_0.5", "alpha_1"):
        merged = {name: digest for name, digest in tree_digest(out / alpha).items() if name.endswith(".safetensors")}
        assert merged == {name: digest for name, digest in tree_digest(reference / alpha).items() if name.endswith(".safetensors")}
    # The before/after table: theta_full and each alpha, metrics and answers.
    table = result.eval_table
    assert "| metric | before | fisher α=0.5 | fisher α=1 | what it measures |" in table
    assert Path(result.eval_table_path).read_text() == table and Path(result.eval_table_path).parent.parent == work
    for name in ("before", "fisher_alpha_0.5", "fisher_alpha_1"):
        assert (Path(result.eval_table_path).parent / f"{name}.json").is_file()


def test_a_second_run_reuses_theta_fgt_and_the_statistics(workspace, first_run, capsys):
    out, result, _ = first_run
    made = {path: path.stat().st_mtime_ns for path in Path(result.fgt_dir).rglob("*")}
    assert main(_args(workspace, out, "--alpha", "0.5,1", "--overwrite", "--no-eval")) == 0
    printed = capsys.readouterr().err
    assert f"reusing {result.fgt_dir}" in printed and f"reused statistics {result.stats_dir}" in printed
    assert {path: path.stat().st_mtime_ns for path in Path(result.fgt_dir).rglob("*")} == made


def test_runs_on_other_models_or_data_in_one_folder_never_share_statistics(workspace, first_run):
    out, result, _ = first_run
    others = []
    for name, (model, forget) in {"other_model": ("other", "forget"), "other_data": ("mine", "forget2")}.items():
        from perta_stream.cli import parse_arguments

        config = UnlearnConfig.from_cli(parse_arguments(_args(workspace, out.parent / name, "--no-eval", "--work-dir", str(out / "perta_work"), model=model, forget=forget)))
        others.append(run_unlearn(config))
    stats_dirs = {result.stats_dir, *(other.stats_dir for other in others)}
    fgt_dirs = {result.fgt_dir, *(other.fgt_dir for other in others)}
    assert len(stats_dirs) == 3 and len(fgt_dirs) == 3
    # The model's digest names its folders: the other model's differ in their first part.
    assert Path(others[0].stats_dir).name.split("-")[1] != Path(result.stats_dir).name.split("-")[1]
    assert Path(others[1].stats_dir).name.split("-")[1] == Path(result.stats_dir).name.split("-")[1]


def test_explicit_models_get_keyed_statistics_next_to_the_output(workspace, tmp_path):
    """Two unlearns of different θ_0 writing next to each other: two statistics folders."""
    from perta_stream.cli import parse_arguments

    results = []
    for name in ("mine", "other"):
        model = str(workspace[name])
        args = ["unlearn", "--theta0", model, "--full", model, "--fgt", model, "--forget", str(workspace["forget"]), "--retain", str(workspace["retain"])]
        args += ["--out", str(tmp_path / f"clean_{name}"), "--device", "cpu", "-q"]
        results.append(run_unlearn(UnlearnConfig.from_cli(parse_arguments(args))))
    assert results[0].stats_dir != results[1].stats_dir
    assert all(Path(result.stats_dir).parent == tmp_path / "perta_work" for result in results)


def test_a_dry_run_makes_nothing(workspace, tmp_path):
    from perta_stream.cli import parse_arguments

    out = tmp_path / "dry" / "clean"
    result = run_unlearn(UnlearnConfig.from_cli(parse_arguments(_args(workspace, out, "--dry-run"))))
    assert "theta_fgt: fine-tune" in result.plan_text and "merge plan" not in result.plan_text
    assert not (tmp_path / "dry").exists()


def test_own_model_options_are_checked_together(workspace, tmp_path):
    from perta_stream.cli import parse_arguments

    args = ["unlearn", "--model", str(workspace["mine"]), "--theta0", str(workspace["mine"]), "--retain", str(workspace["retain"])]
    args += ["--out", str(tmp_path / "x"), "--max-steps", "0"]
    with pytest.raises(PertaStreamError) as caught:
        UnlearnConfig.from_cli(parse_arguments(args))
    message = str(caught.value)
    assert "drop --theta0" in message and "--model needs --forget FILE" in message and "--max-steps must be at least 1" in message
    with pytest.raises(PertaStreamError, match="--theta0 is required .or --model"):
        UnlearnConfig.from_cli(parse_arguments(["unlearn", "--out", str(tmp_path / "x"), "--method", "tv"]))
    shutil.rmtree(tmp_path / "x", ignore_errors=True)
