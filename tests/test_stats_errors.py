"""Bad inputs get typed errors with clear messages; a failed run leaves nothing that looks finished."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from perta_stream.cli import main
from perta_stream.config.stats import StatsConfig
from perta_stream.errors import DatasetError, ModelNotSupportedError, OutputExistsError, PlanError, UsageError
from perta_stream.pipelines.stats import run_stats
from perta_stream.sinks.resume_record import RESUME_RECORD_NAME
from stats_fixtures import fail_write_group, FORGET_RECORDS, save_tiny_model, write_data, write_jsonl


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stats-errors")
    forget, retain = write_data(root / "data")
    return {"root": root, "forget": forget, "retain": retain, "llama": save_tiny_model(root / "models", "llama")}


def _config(ws: dict[str, Path], out_name: str, **options) -> StatsConfig:
    fields = {"model": str(ws["llama"]), "forget": str(ws["forget"]), "retain": str(ws["retain"]), "out": str(ws["root"] / out_name), "device": "cpu"}
    fields.update(options)
    return StatsConfig(**fields)


def _assert_no_output(ws: dict[str, Path], out: str) -> None:
    assert not (ws["root"] / out).exists()
    assert not (ws["root"] / f"{out}.partial").exists()


def test_answer_longer_than_max_length_is_a_clear_error(workspace: dict[str, Path]) -> None:
    with pytest.raises(DatasetError, match=r"answer needs \d+ tokens, more than --max-length 5"):
        run_stats(_config(workspace, "out-long", max_length=5))
    _assert_no_output(workspace, "out-long")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        ('{"question": "a", "answer": "b"}\nnot json\n', "line 2: not valid JSON"),
        ('[{"question": "a"}]', "field 'answer' is missing"),
        ('{"question": "a", "answer": 3}\n', "field 'answer' is missing or not a non-empty string"),
    ],
)
def test_empty_or_malformed_data_files(workspace: dict[str, Path], content: str, message: str) -> None:
    bad = workspace["root"] / "data" / "bad.jsonl"
    bad.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError, match=message):
        run_stats(_config(workspace, "out-bad", retain=str(bad)))
    _assert_no_output(workspace, "out-bad")


def test_unsupported_architecture_names_the_supported_ones(tmp_path: Path, workspace: dict[str, Path]) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
    model.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ModelNotSupportedError, match="'gpt2' is not supported.*llama, mistral, qwen2"):
        run_stats(_config(workspace, "out-gpt2", model=str(tmp_path / "gpt2")))
    _assert_no_output(workspace, "out-gpt2")


def test_every_invalid_option_is_reported_at_once(workspace: dict[str, Path]) -> None:
    with pytest.raises(PlanError) as caught:
        _config(workspace, "out-x", kinds=("grad", "hessian"), fraction=0.0, batch_size=0, max_length=1, device="tpu", compute_dtype="float16", config_only=True)
    assert len(caught.value.problems) == 7
    assert "hessian" in str(caught.value) and "--fraction" in str(caught.value) and "--dry-run" in str(caught.value)
    assert "--compute-dtype 'float16' unsupported; choose from auto, float32, bfloat16" in str(caught.value)
    with pytest.raises(PlanError, match="--out is required"):
        _config(workspace, "unused", out=None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_requested_without_cuda(workspace: dict[str, Path]) -> None:
    with pytest.raises(UsageError, match="0 CUDA device"):
        run_stats(_config(workspace, "out-cuda", device="cuda"))
    _assert_no_output(workspace, "out-cuda")


def test_failure_midway_leaves_only_a_resumable_partial_folder(workspace: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    fail_write_group(monkeypatch, 3)
    with pytest.raises(OSError, match="simulated"):
        run_stats(_config(workspace, "out-fail"))
    # No `<out>`, no index or record that could pass for finished statistics; the partial folder
    # stays for --resume (tests/test_stats_resume.py resumes such folders).
    partial = workspace["root"] / "out-fail.partial"
    assert not (workspace["root"] / "out-fail").exists()
    assert (partial / RESUME_RECORD_NAME).is_file() and not (partial / "perta_stats.json").exists()
    assert not list(partial.rglob("model.safetensors.index.json")) and not list(partial.rglob("*.tmp"))
    assert not list(partial.glob("perta-boundaries-*"))


def test_existing_output_needs_overwrite(workspace: dict[str, Path]) -> None:
    (workspace["root"] / "out-exists").mkdir()
    with pytest.raises(PlanError, match="already exists; pass --overwrite"):
        run_stats(_config(workspace, "out-exists"))
    (workspace["root"] / "out-stale.partial").mkdir()
    for overwrite in (False, True):  # --overwrite replaces a finished output, never a resumable one
        with pytest.raises(OutputExistsError, match="did not finish; rerun the same command with --resume"):
            run_stats(_config(workspace, "out-stale", overwrite=overwrite))
    result = run_stats(_config(workspace, "out-stale", resume=True, kinds=("grad",)))
    assert (result.out / "forget.grad" / "model.safetensors.index.json").is_file()
    assert not (workspace["root"] / "out-stale.partial").exists()


def test_cli_runs_and_reports_errors_in_one_line(workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = workspace["root"] / "out-cli"
    argv = ["stats", "--model", str(workspace["llama"]), "--forget", str(workspace["forget"]), "--retain", str(workspace["retain"])]
    assert main(argv + ["--out", str(out), "--kinds", "grad", "--batch-size", "2", "--stats-dtype", "bf16", "--device", "cpu", "--compute-dtype", "bfloat16", "-q"]) == 0
    record = json.loads((out / "perta_stats.json").read_text())
    assert (record["stats_dtype"], record["compute_dtype"]) == ("bfloat16", "bfloat16")
    long_answers = write_jsonl(workspace["root"] / "data" / "long.jsonl", FORGET_RECORDS)
    code = main(argv[:3] + ["--forget", str(long_answers), "--retain", str(workspace["retain"]), "--out", str(out) + "2", "--max-length", "4"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and "--max-length 4" in err
    assert main(argv + ["--kinds", "bogus", "--boundary-budget", "lots"]) == 1
    err = capsys.readouterr().err
    assert "bogus" in err and "--boundary-budget" in err and "--out is required" in err
