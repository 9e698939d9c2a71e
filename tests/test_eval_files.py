"""`eval --forget F --retain R [--holdout H] [--before M]`: the metrics that need no retain model,
on a tiny random Llama, against a direct forward-pass reference; the side-by-side answers; errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from perta_stream.cli import main
from perta_stream.config.eval import EvalConfig
from perta_stream.errors import EvaluationError, PlanError
from perta_stream.eval.files_report import FILE_METRIC_KEYS
from perta_stream.pipelines.eval import run_eval
from perta_stream.sources.tofu import bundled_tofu_dir

from tiny_models import reference_answer_loss, save_tiny_checkpoint

NEW_TOKENS = 6


def _write_records(path: Path, source: str, start: int, count: int) -> Path:
    lines = (bundled_tofu_dir() / source).read_text(encoding="utf-8").splitlines()[start : start + count]
    records = [json.loads(line) for line in lines]
    # Other field names than the defaults, as a user's file may have.
    path.write_text("".join(json.dumps({"prompt": r["question"], "response": r["answer"]}) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_files")
    save_tiny_checkpoint(root / "after", seed=0)
    save_tiny_checkpoint(root / "before", seed=1)
    _write_records(root / "forget.jsonl", "forget01.jsonl", 0, 4)
    _write_records(root / "retain.jsonl", "forget10.jsonl", 20, 3)
    _write_records(root / "holdout.jsonl", "forget10.jsonl", 30, 3)
    return root


def _config(workdir: Path, out: str, **overrides) -> EvalConfig:
    options = {
        "model": str(workdir / "after"), "forget": str(workdir / "forget.jsonl"), "retain": str(workdir / "retain.jsonl"),
        "holdout": str(workdir / "holdout.jsonl"), "question_key": "prompt", "answer_key": "response", "out": str(out),
        "batch_size": 2, "max_new_tokens": NEW_TOKENS, "device": "cpu", "examples": 2,
    }
    options.update(overrides)
    return EvalConfig(**options)


@pytest.fixture(scope="module")
def result(workdir):
    return run_eval(_config(workdir, workdir / "after.json", before=str(workdir / "before")))


def _reference_tokens(model, tokenizer, question: str, answer: str) -> tuple[list[float], list[bool]]:
    """Per answer token (+EOS): its NLL and whether the argmax predicted it, from one unpadded pass."""
    import torch

    prompt = tokenizer(f"Question: {question}\nAnswer:")["input_ids"]
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([prompt + answer_ids])).logits[0].double(), dim=-1)
    rows = [log_probs[len(prompt) - 1 + k] for k in range(len(answer_ids))]
    return [-float(row[token]) for row, token in zip(rows, answer_ids)], [int(row.argmax()) == token for row, token in zip(rows, answer_ids)]


def _records(path: Path) -> list[tuple[str, str]]:
    return [(r["prompt"], r["response"]) for r in map(json.loads, path.read_text().splitlines())]


def test_metrics_equal_a_direct_forward_pass_reference(workdir, result):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(workdir / "after").eval()
    tokenizer = AutoTokenizer.from_pretrained(workdir / "after")
    record = json.loads(result.json_path.read_text())
    assert set(record["metrics"]) == set(FILE_METRIC_KEYS) and record["data"] == "files"
    expected = {}
    for name in ("forget", "retain"):
        probabilities = [math.exp(-reference_answer_loss(model, tokenizer, q, a)) for q, a in _records(workdir / f"{name}.jsonl")]
        assert record["per_item"][name]["probability"] == pytest.approx(probabilities, rel=1e-4)
        expected[name] = sum(probabilities) / len(probabilities)
        assert record["metrics"][f"{name}_probability"] == pytest.approx(expected[name], rel=1e-4)
    rouge = record["metrics"]["retain_rouge_l"]
    assert rouge == pytest.approx(sum(record["per_item"]["retain"]["rouge_l_recall"]) / 3, rel=1e-12)
    parts = [expected["retain"], rouge]
    assert record["metrics"]["retain_utility"] == pytest.approx(0.0 if min(parts) == 0 else 2 / sum(1 / p for p in parts), rel=1e-4)
    # Extraction strength and Min-40% from the reference's per-token values.
    min_k = {}
    for name in ("forget", "holdout"):
        min_k[name] = []
        for q, a in _records(workdir / f"{name}.jsonl"):
            nlls, hits = _reference_tokens(model, tokenizer, q, a)
            count = max(1, int(0.4 * len(nlls)))
            min_k[name].append(sum(sorted(nlls, reverse=True)[:count]) / count)
            if name == "forget":
                suffix = 0
                while suffix < len(hits) and hits[len(hits) - 1 - suffix]:
                    suffix += 1
                index = len(min_k[name]) - 1
                assert record["per_item"]["forget"]["extraction_strength"][index] == pytest.approx(suffix / len(hits))
    assert record["per_item"]["forget"]["min_k_score"] == pytest.approx(min_k["forget"], rel=1e-4)
    assert record["per_item"]["holdout"]["min_k_score"] == pytest.approx(min_k["holdout"], rel=1e-4)
    pairs = [(f, h) for f in min_k["forget"] for h in min_k["holdout"]]
    auc = sum(1.0 if f > h else 0.5 if f == h else 0.0 for f, h in pairs) / len(pairs)
    assert record["metrics"]["mia_min_k_auc"] == pytest.approx(auc)
    assert record["metrics"]["privleak"] == pytest.approx(100 * (auc - 0.5) / 0.5)


def test_answers_side_by_side_in_the_record_and_the_table(workdir, result):
    record = json.loads(result.json_path.read_text())
    before = record["before"]
    assert before["model"] == str(workdir / "before") and set(before["metrics"]) == set(FILE_METRIC_KEYS)
    shown = record["answers_side_by_side"]
    assert [(entry["set"], entry["index"]) for entry in shown] == [("forget", 0), ("forget", 1), ("retain", 0), ("retain", 1)]
    table = result.markdown_path.read_text()
    for entry in shown:
        set_name, index = entry["set"], entry["index"]
        assert entry["answers"]["after"] == record["per_item"][set_name]["generation"][index]
        assert entry["answers"]["before"] == before["per_item"][set_name]["generation"][index]
        assert entry["question"] == _records(workdir / f"{set_name}.jsonl")[index][0]
        assert entry["question"] in table
    assert "| metric | before | after | what it measures |" in table
    assert "## Forget questions: answers side by side" in table and "## Retain questions" in table


def test_before_as_a_record_equals_before_as_a_model(workdir, result, tmp_path, capsys):
    # The model before, evaluated alone, then given as --before to the after model's evaluation.
    args = ["eval", "--model", str(workdir / "before"), "--forget", str(workdir / "forget.jsonl"), "--retain", str(workdir / "retain.jsonl")]
    args += ["--holdout", str(workdir / "holdout.jsonl"), "--question-key", "prompt", "--answer-key", "response", "--batch-size", "2"]
    args += ["--max-new-tokens", str(NEW_TOKENS), "--device", "cpu", "--examples", "2", "-q"]
    assert main([*args, "--out", str(tmp_path / "before.json")]) == 0
    printed = capsys.readouterr().out
    assert "| metric | model | what it measures |" in printed
    again = run_eval(_config(workdir, tmp_path / "after.json", before=str(tmp_path / "before.json")))
    assert again.markdown_path.read_text().replace(str(tmp_path / "before.json"), str(workdir / "before")) == result.markdown_path.read_text()
    # A record of other files is refused before any model is loaded.
    other = tmp_path / "other_forget.jsonl"
    _write_records(other, "forget01.jsonl", 1, 4)
    with pytest.raises(EvaluationError, match="another forget file"):
        run_eval(_config(workdir, tmp_path / "x.json", forget=str(other), before=str(tmp_path / "before.json")))


def test_file_options_are_checked_together(workdir, tmp_path):
    with pytest.raises(PlanError) as caught:
        EvalConfig(model=str(workdir / "after"), out=str(tmp_path / "x.json"))
    assert "--split forget01|forget05|forget10 (TOFU), or --forget FILE --retain FILE" in str(caught.value)
    with pytest.raises(PlanError) as caught:
        EvalConfig(model=str(workdir / "after"), out=str(tmp_path / "x.json"), split="forget01", forget=str(workdir / "forget.jsonl"), retain_logs=str(workdir / "forget.jsonl"))
    message = str(caught.value)
    assert "give one or the other" in message and "--retain FILE is needed too" in message and "--retain-logs gives forget quality" in message
    with pytest.raises(PlanError, match="--before applies to an evaluation on your files"):
        EvalConfig(model=str(workdir / "after"), out=str(tmp_path / "x.json"), split="forget01", before=str(workdir / "before"))
    records = tmp_path / "records.json"
    records.write_text("[]")
    with pytest.raises(PlanError, match="would replace the --forget file"):
        _config(workdir, str(records), forget=str(records), overwrite=True)
