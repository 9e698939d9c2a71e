"""`perta-stream sweep`: option checks, and a tiny end-to-end sweep (merges, evaluations, table, plot)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perta_stream.cli import main
from perta_stream.config.sweep import SweepConfig
from perta_stream.errors import EvaluationError, PlanError
from perta_stream.sinks.output_dir import PARTIAL_MARKER_NAME
from perta_stream.sinks.report import MERGE, REFERENCE, SweepRow, best_forget_quality, compare_at_matched_forgetting


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """θ_0, θ_full, θ_fgt, θ_ret (a tiny Llama and perturbed copies) and statistics at θ_0."""
    import torch

    from perta_stream.config.stats import StatsConfig
    from perta_stream.demo.model import DemoModelShape, build_demo_model, save_checkpoint
    from perta_stream.demo.tokenizer import train_demo_tokenizer
    from perta_stream.pipelines.stats import run_stats
    from perta_stream.sources.qa_dataset import load_records
    from perta_stream.sources.tofu import bundled_tofu_dir

    root = tmp_path_factory.mktemp("sweep")
    tofu = bundled_tofu_dir()
    forget = load_records(tofu / "forget01.jsonl")[:4]
    retain = load_records(tofu / "retain90.jsonl")[:4]
    tokenizer = train_demo_tokenizer([text for r in forget + retain for text in (r["question"], r["answer"])], vocab_size=400)
    shape = DemoModelShape(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)
    save_checkpoint(build_demo_model(tokenizer, shape, seed=0), tokenizer, root / "theta0")
    generator = torch.Generator().manual_seed(0)
    for name, scale in (("full", 0.05), ("fgt", 0.03), ("ret", 0.04)):
        model = build_demo_model(tokenizer, shape, seed=0)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
        save_checkpoint(model, tokenizer, root / name)
    for name, records in (("forget", forget), ("retain", retain)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    run_stats(StatsConfig(model=str(root / "theta0"), forget=str(root / "forget.jsonl"), retain=str(root / "retain.jsonl"), out=str(root / "stats"), max_length=1024, device="cpu"))
    return root


def _config(root: Path, out: str, **changes) -> SweepConfig:
    options = dict(
        theta0=str(root / "theta0"), full=str(root / "full"), fgt=str(root / "fgt"), out=str(root / out),
        stats=str(root / "stats"), retain_model=str(root / "ret"), methods=("tv", "fisher"), alphas=(1.0, 2.0),
        max_items=3, max_new_tokens=4, max_length=1024, eval_batch_size=8, device="cpu",
    )
    options.update(changes)
    return SweepConfig(**options)


def test_sweep_options_are_checked_together(tiny_setup):
    root = tiny_setup
    with pytest.raises(PlanError) as caught:
        _config(root, "bad", methods=("tv", "grad", "magic"), stats=None, retain_model=None, alphas=(1.0, 1.0, -2.0), split="forget99")
    text = str(caught.value)
    for expected in ("'magic' is unknown", "need --stats", "same value twice", "-2.0 must be", "exactly one of --retain-model", "forget99"):
        assert expected in text
    with pytest.raises(PlanError, match="overlaps the full input"):
        _config(root, "full/sweep")


def test_tiny_sweep_end_to_end(tiny_setup):
    import torch
    from safetensors.torch import load_file

    from perta_stream.pipelines.sweep import run_sweep

    root = tiny_setup
    result = run_sweep(_config(root, "sweep"))
    out = root / "sweep"
    assert result.out == out and not (root / "sweep.partial").exists()
    assert [row.label for row in result.rows] == ["retain", "full", "tv α=1", "tv α=2", "fisher α=1", "fisher α=2"]
    assert (out / "sweep.md").read_text() == result.table
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"

    record = json.loads((out / "sweep.json").read_text())
    assert record["format"] == "perta_sweep" and len(record["rows"]) == 6
    # Every row's metrics are the ones its own evaluation record holds.
    for row in record["rows"]:
        evaluation = json.loads((out / row["eval_json"]).read_text())
        for key, value in evaluation["metrics"].items():
            if key != "forget_quality" or row["label"] != "retain":
                assert row["metrics"][key] == (None if value is None else pytest.approx(value))
        assert evaluation["sample_counts"]["forget"] == 3
    retain_row = record["rows"][0]
    assert retain_row["kind"] == REFERENCE and retain_row["metrics"]["forget_quality"] == 1.0

    # tv at alpha 2 is theta_full - 2 (theta_fgt - theta0), element for element.
    tv_dir = Path(next(row["model_dir"] for row in record["rows"] if row["label"] == "tv α=2"))
    merged = load_file(tv_dir / "model.safetensors")
    theta0, full, fgt = (load_file(root / name / "model.safetensors") for name in ("theta0", "full", "fgt"))
    for tensor_name, value in merged.items():
        torch.testing.assert_close(value, full[tensor_name] - 2.0 * (fgt[tensor_name] - theta0[tensor_name]), rtol=1e-6, atol=1e-7)

    # The second sweep reads the retain model's record instead of re-evaluating it, and deletes models.
    again = run_sweep(_config(root, "sweep_logs", retain_model=None, retain_logs=str(out / "eval" / "retain.json"), methods=("tv",), alphas=(2.0,), keep_models=False))
    assert not (root / "sweep_logs" / "models" / "tv").exists()
    tv_again = next(row for row in again.rows if row.label == "tv α=2")
    tv_first = next(row for row in result.rows if row.label == "tv α=2")
    assert tv_again.metrics["forget_quality"] == pytest.approx(tv_first.metrics["forget_quality"])
    assert tv_again.model_dir is None

    # Retain logs of another split, or of another number of items, fail before anything is written.
    other_split = json.loads((out / "eval" / "retain.json").read_text())
    other_split["split"] = "forget10"
    (root / "retain_forget10.json").write_text(json.dumps(other_split))
    with pytest.raises(EvaluationError, match="split 'forget10'"):
        run_sweep(_config(root, "sweep_bad", retain_model=None, retain_logs=str(root / "retain_forget10.json"), methods=("tv",), alphas=(1.0,)))
    with pytest.raises(EvaluationError, match="3 forget items"):
        run_sweep(_config(root, "sweep_bad", retain_model=None, retain_logs=str(out / "eval" / "retain.json"), methods=("tv",), alphas=(1.0,), max_items=2))
    assert not (root / "sweep_bad").exists() and not (root / "sweep_bad.partial").exists()


def test_sweep_on_your_own_files_needs_no_retain_model(tiny_setup, capsys):
    from perta_stream.eval.files_report import FILE_METRIC_KEYS

    root = tiny_setup
    args = ["sweep", "--theta0", str(root / "theta0"), "--full", str(root / "full"), "--fgt", str(root / "fgt"), "--stats", str(root / "stats")]
    args += ["--forget", str(root / "forget.jsonl"), "--retain", str(root / "retain.jsonl"), "--methods", "tv,fisher", "--alphas", "1,2"]
    args += ["--max-items", "3", "--max-new-tokens", "4", "--max-length", "1024", "--device", "cpu", "--out", str(root / "sweep_files"), "-q"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| model | method | α | forget prob. ↓ | retain utility ↑ |")
    record = json.loads((root / "sweep_files" / "sweep.json").read_text())
    assert record["data"] == "files" and [row["label"] for row in record["rows"]] == ["full", "tv α=1", "tv α=2", "fisher α=1", "fisher α=2"]
    full_eval = json.loads((root / "sweep_files" / "eval" / "full.json").read_text())
    for row in record["rows"]:
        evaluation = json.loads((root / "sweep_files" / row["eval_json"]).read_text())
        assert set(evaluation["metrics"]) == set(FILE_METRIC_KEYS)
        assert row["metrics"]["forget_probability"] == pytest.approx(evaluation["metrics"]["forget_probability"])
        if row["label"] != "full":  # each merge is shown beside θ_full, the model before
            assert evaluation["before"]["per_item"] == full_eval["per_item"]
    assert (root / "sweep_files" / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(PlanError, match="no retain model is needed: drop it"):
        _config(root, "x", forget=str(root / "forget.jsonl"), retain=str(root / "retain.jsonl"))


def test_sweep_cli_prints_table_and_plot_path(tiny_setup, capsys):
    root = tiny_setup
    code = main([
        "sweep", "--theta0", str(root / "theta0"), "--full", str(root / "full"), "--fgt", str(root / "fgt"),
        "--out", str(root / "sweep_cli"), "--retain-model", str(root / "ret"), "--methods", "uniform", "--alphas", "1",
        "--max-items", "2", "--max-new-tokens", "2", "--max-length", "1024", "--device", "cpu", "-q",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| uniform α=1 | uniform | 1 |" in printed
    assert f"plot: {root / 'sweep_cli' / 'tradeoff.png'}" in printed
    assert main(["sweep", "--theta0", "a", "--full", "b", "--fgt", "c", "--out", str(root / "x"), "--methods", "grad"]) == 2


def test_sweep_refuses_a_leftover_partial_folder_unless_overwrite(tiny_setup):
    from perta_stream.errors import OutputExistsError
    from perta_stream.pipelines.sweep import run_sweep

    root = tiny_setup
    (root / "sweep_left.partial" / "eval").mkdir(parents=True)
    (root / "sweep_left.partial" / PARTIAL_MARKER_NAME).write_bytes(b"")  # made by an earlier run of the tool
    config = _config(root, "sweep_left", methods=("tv",), alphas=(1.0,), max_items=2, max_new_tokens=2)
    with pytest.raises(OutputExistsError, match="did not finish"):
        run_sweep(config)
    result = run_sweep(_config(root, "sweep_left", methods=("tv",), alphas=(1.0,), max_items=2, max_new_tokens=2, overwrite=True))
    assert result.out.is_dir() and not (root / "sweep_left.partial").exists()


def test_sweep_counts_alphas_in_matched_units(tiny_setup):
    from perta_stream.pipelines.matched_alpha import matched_alphas
    from perta_stream.pipelines.sweep import run_sweep

    root = tiny_setup
    result = run_sweep(_config(root, "sweep_matched", methods=("tv", "fisher"), alphas=(1.0, 2.0), alpha_unit="matched", max_items=2, max_new_tokens=2, keep_models=False))
    matched = matched_alphas(
        ("tv", "fisher"), stats=str(root / "stats"), theta0=str(root / "theta0"), fgt=str(root / "fgt"), tau=None,
        uniform_weight=0.5, fallback_weight=0.5, max_memory_bytes=16 * 2**30,
    )  # fmt: skip
    assert matched["tv"] == 1.0 and matched["fisher"] > 1.0
    merges = [row for row in result.rows if row.kind == MERGE]
    assert [row.label for row in merges] == ["tv α=1×matched", "tv α=2×matched", "fisher α=1×matched", "fisher α=2×matched"]
    assert [row.alpha for row in merges] == [1.0, 2.0, matched["fisher"], 2.0 * matched["fisher"]]
    assert merges[-1].extra == {"alpha_multiple": 2.0, "matched_alpha": matched["fisher"]}
    record = json.loads(result.record_path.read_text())
    assert record["matched_alphas"] == matched and record["config"]["alpha_unit"] == "matched"


def _row(method: str, alpha: float, quality: float, utility: float) -> SweepRow:
    return SweepRow(label=f"{method} α={alpha:g}", kind=MERGE, method=method, alpha=alpha, metrics={"forget_quality": quality, "model_utility": utility})


def test_matched_forgetting_interpolates_tv_in_log_forget_quality():
    rows = [
        _row("tv", 0.5, 1e-6, 0.50),
        _row("tv", 1.0, 1e-2, 0.30),
        _row("tv", 2.0, 1e-4, 0.10),  # over-forgetting: forget quality falls again
        _row("fisher", 1.0, 1e-4, 0.45),  # matches tv on both segments: 0.40 (first) and 0.10 (second)
        _row("grad", 1.0, 1e-8, 0.60),  # outside tv's range
    ]
    lines = compare_at_matched_forgetting(rows)
    assert lines[0] == "fisher α=1: forget quality 1.00e-04, utility 0.450 vs tv 0.400 (+0.050)"
    assert lines[1] == "grad α=1: forget quality 1.00e-08 is outside tv's range [1.00e-06, 0.010]; not compared"
    assert lines[-1] == "1 of 1 compared points keep more utility than tv at the same forget quality"
    assert compare_at_matched_forgetting([_row("fisher", 1.0, 0.1, 0.3)]) == ["no tv rows with forget quality and model utility to compare with"]


def test_best_forget_quality_per_method():
    rows = [
        SweepRow(label="full", kind=REFERENCE, metrics={"forget_quality": 0.9, "model_utility": 0.5}),
        _row("tv", 0.5, 1e-6, 0.50),
        _row("tv", 1.0, 1e-2, 0.30),
        _row("fisher", 1.0, 0.4, 0.45),
        _row("fisher", 2.0, float("nan"), 0.45),
    ]
    assert best_forget_quality(rows) == [
        "tv: forget quality 0.010 at α=1, utility 0.300",
        "fisher: forget quality 0.400 at α=1, utility 0.450",
    ]
