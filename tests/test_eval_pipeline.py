"""`run_eval` end to end on a tiny random Llama: numbers against a direct forward-pass reference,
the JSON layout, forget quality from retain logs, and every bad-input error."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from perta_stream.cli import main
from perta_stream.config.eval import EvalConfig
from perta_stream.errors import DatasetError, EvaluationError, PlanError
from perta_stream.eval.report import METRIC_KEYS, UTILITY_KEYS
from perta_stream.pipelines.eval import run_eval
from perta_stream.sources.tofu import bundled_tofu_dir, load_eval_sets

from tiny_models import reference_answer_loss, save_tiny_checkpoint, write_tofu_subset

ITEMS = 3
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    save_tiny_checkpoint(root / "model_a", seed=0)
    save_tiny_checkpoint(root / "model_b", seed=1)
    write_tofu_subset(root / "tofu", items=ITEMS)
    return root


def _config(workdir: Path, model_name: str, out: str, **overrides) -> EvalConfig:
    options = {"model": str(workdir / model_name), "split": "forget01", "out": str(out), "tofu_dir": str(workdir / "tofu"), "batch_size": 2, "max_new_tokens": NEW_TOKENS, "device": "cpu"}
    options.update(overrides)
    return EvalConfig(**options)


@pytest.fixture(scope="module")
def result_a(workdir):
    return run_eval(_config(workdir, "model_a", workdir / "a.json"))


def _reference_greedy(model, tokenizer, question: str) -> str:
    """Greedy decoding without padding or a KV cache: argmax of a full forward pass per step."""
    import torch

    ids = tokenizer(f"Question: {question}\nAnswer:")["input_ids"]
    new_ids: list[int] = []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            token = int(model(input_ids=torch.tensor([ids + new_ids])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new_ids.append(token)
    return tokenizer.decode(new_ids, skip_special_tokens=True).strip()


def test_per_item_values_equal_a_direct_forward_pass_reference(workdir, result_a):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(workdir / "model_a").eval()
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model_a")
    record = json.loads(result_a.json_path.read_text())
    sets = load_eval_sets(workdir / "tofu", "forget01")
    for set_name, tofu_set in sets.items():
        per_item = record["per_item"][set_name]
        for i, item in enumerate(tofu_set.items):
            answer_loss = reference_answer_loss(model, tokenizer, item.question, item.answer)
            correct_loss = reference_answer_loss(model, tokenizer, item.question, item.correct_answer)
            perturbed = [reference_answer_loss(model, tokenizer, item.question, p) for p in item.perturbed_answers]
            if set_name in ("forget", "retain"):
                expected_probability = math.exp(-answer_loss)
            else:
                weights = [math.exp(-answer_loss)] + [math.exp(-loss) for loss in perturbed]
                expected_probability = weights[0] / sum(weights)
            geo_mean_perturbed = math.prod(math.exp(-loss) for loss in perturbed) ** (1 / len(perturbed))
            expected_truth_ratio = geo_mean_perturbed / math.exp(-correct_loss)
            assert per_item["probability"][i] == pytest.approx(expected_probability, rel=1e-4), (set_name, i)
            assert per_item["truth_ratio"][i] == pytest.approx(expected_truth_ratio, rel=1e-4), (set_name, i)
            assert per_item["perturbed_loss"][i] == pytest.approx(perturbed, rel=1e-5)
        # Aggregation from the reference per-item values, as the README defines it.
        truth_ratios = per_item["truth_ratio"]
        if set_name == "forget":
            expected_tr_metric = sum(min(t, 1 / t) for t in truth_ratios) / len(truth_ratios)
        else:
            expected_tr_metric = sum(max(0.0, 1 - t) for t in truth_ratios) / len(truth_ratios)
        assert record["metrics"][f"{set_name}_truth_ratio"] == pytest.approx(expected_tr_metric, rel=1e-12)
        assert record["metrics"][f"{set_name}_probability"] == pytest.approx(sum(per_item["probability"]) / ITEMS, rel=1e-12)


def test_batched_left_padded_generation_matches_unpadded_greedy_decoding(workdir, result_a):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(workdir / "model_a").eval()
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model_a")
    record = json.loads(result_a.json_path.read_text())
    forget = load_eval_sets(workdir / "tofu", "forget01")["forget"]
    expected = [_reference_greedy(model, tokenizer, item.question) for item in forget.items]
    assert record["per_item"]["forget"]["generation"] == expected


def test_json_record_layout_and_markdown(workdir, result_a):
    record = json.loads(result_a.json_path.read_text())
    assert set(record["metrics"]) == set(METRIC_KEYS)
    assert set(result_a.metrics) == set(METRIC_KEYS)
    assert record["metrics"]["forget_quality"] is None and result_a.metrics["forget_quality"] is None
    assert record["split"] == "forget01" and record["model"] == str(workdir / "model_a")
    assert record["sample_counts"] == {"forget": ITEMS, "retain": ITEMS, "real_authors": ITEMS, "world_facts": ITEMS}
    for set_name, per_item in record["per_item"].items():
        for key in ("answer_loss", "correct_loss", "probability", "truth_ratio", "rouge_l_recall", "generation", "perturbed_loss"):
            assert len(per_item[key]) == ITEMS, (set_name, key)
    assert [len(row) for row in record["per_item"]["forget"]["perturbed_loss"]] == [5] * ITEMS
    assert [len(row) for row in record["per_item"]["real_authors"]["perturbed_loss"]] == [3] * ITEMS
    parts = [record["metrics"][key] for key in UTILITY_KEYS]
    expected_utility = 0.0 if min(parts) == 0 else len(parts) / sum(1 / p for p in parts)
    assert record["metrics"]["model_utility"] == pytest.approx(expected_utility, rel=1e-12)
    assert result_a.markdown_path == workdir / "a.md"
    table = result_a.markdown_path.read_text()
    assert "| model_utility |" in table and "no --retain-logs" in table


def test_retain_logs_give_forget_quality_ks_pvalue(workdir, result_a):
    from scipy.stats import ks_2samp

    result_b = run_eval(_config(workdir, "model_b", workdir / "b.json", retain_logs=str(result_a.json_path)))
    truth_ratios_a = json.loads(result_a.json_path.read_text())["per_item"]["forget"]["truth_ratio"]
    truth_ratios_b = json.loads(result_b.json_path.read_text())["per_item"]["forget"]["truth_ratio"]
    expected = ks_2samp(truth_ratios_b, truth_ratios_a).pvalue
    assert result_b.metrics["forget_quality"] == pytest.approx(expected, rel=1e-12)
    assert json.loads(result_b.json_path.read_text())["metrics"]["forget_quality"] == result_b.metrics["forget_quality"]


def test_max_items_is_applied_and_recorded(workdir):
    result = run_eval(_config(workdir, "model_a", workdir / "two.json", max_items=2, max_new_tokens=2))
    record = json.loads(result.json_path.read_text())
    assert record["max_items"] == 2
    assert result.sample_counts == {"forget": 2, "retain": 2, "real_authors": 2, "world_facts": 2}
    assert len(record["per_item"]["retain"]["truth_ratio"]) == 2


def test_retain_logs_from_another_split_are_refused(workdir, result_a):
    record = json.loads(result_a.json_path.read_text())
    record["split"] = "forget10"
    other = workdir / "other_split.json"
    other.write_text(json.dumps(record))
    with pytest.raises(EvaluationError, match="split 'forget10'"):
        run_eval(_config(workdir, "model_b", workdir / "x.json", retain_logs=str(other)))
    assert not (workdir / "x.json").exists()


def test_retain_logs_with_other_items_are_refused(workdir, result_a):
    with pytest.raises(EvaluationError, match="same --max-items"):
        run_eval(_config(workdir, "model_b", workdir / "x.json", retain_logs=str(result_a.json_path), max_items=2))
    not_a_record = workdir / "not_a_record.json"
    not_a_record.write_text('{"metrics": {}}')
    with pytest.raises(EvaluationError, match="not a `perta-stream eval` record"):
        run_eval(_config(workdir, "model_b", workdir / "x.json", retain_logs=str(not_a_record)))


def test_tofu_directory_missing_a_file_names_it(workdir, tmp_path):
    broken = shutil.copytree(workdir / "tofu", tmp_path / "tofu")
    (broken / "world_facts_perturbed.jsonl").unlink()
    with pytest.raises(EvaluationError, match="world_facts_perturbed.jsonl"):
        run_eval(_config(workdir, "model_a", tmp_path / "x.json", tofu_dir=str(broken)))


def test_split_missing_from_the_directory_lists_the_splits_found(workdir, tmp_path):
    with pytest.raises(EvaluationError, match=r"forget05.*splits found there: forget01, forget10"):
        run_eval(_config(workdir, "model_a", tmp_path / "x.json", tofu_dir=str(bundled_tofu_dir()), split="forget05"))


def test_unknown_split_name_and_bad_options_are_reported_together(workdir, tmp_path):
    with pytest.raises(PlanError) as caught:
        _config(workdir, "model_a", tmp_path / "x.txt", split="forget7", batch_size=0)
    text = str(caught.value)
    assert "forget7" in text and "--batch-size" in text and ".json" in text


def test_model_and_tokenizer_that_do_not_match(workdir, tmp_path):
    save_tiny_checkpoint(tmp_path / "small_vocab", vocab_size=100)
    with pytest.raises(EvaluationError, match="do not match"):
        run_eval(_config(workdir, "model_a", tmp_path / "x.json", model=str(tmp_path / "small_vocab")))


def test_answer_longer_than_max_length_is_an_error(workdir, tmp_path):
    with pytest.raises(DatasetError, match="--max-length"):
        run_eval(_config(workdir, "model_a", tmp_path / "x.json", max_length=8))


def test_cli_prints_one_error_line_for_a_missing_split(workdir, tmp_path, capsys):
    code = main(["eval", "--model", str(workdir / "model_a"), "--split", "forget05", "--out", str(tmp_path / "x.json"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error: split 'forget05'")


CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


@pytest.mark.parametrize("chat_template", [None, CHAT_TEMPLATE], ids=["plain", "chat"])
def test_generation_prompt_is_the_masked_prefix_of_the_scored_sample(chat_template):
    from perta_stream.compute.prompts import IGNORE_INDEX, encode_prompt, encode_sample

    from tiny_models import build_tokenizer

    tokenizer = build_tokenizer(chat_template=chat_template)
    question, answer = "Who wrote the novel?", "A fictitious author from Kuwait City."
    sample = encode_sample(tokenizer, question, answer, max_length=256, system_prompt="Be brief.")
    prompt_length = sample.labels.index(next(label for label in sample.labels if label != IGNORE_INDEX))
    prompt = encode_prompt(tokenizer, question, max_length=256, system_prompt="Be brief.")
    assert prompt == sample.input_ids[:prompt_length]
    if chat_template:
        assert tokenizer.decode(prompt).endswith("<s>assistant:")
    assert encode_prompt(tokenizer, question, max_length=4) == prompt[-4:]


@pytest.mark.gpu
def test_cuda_evaluation_matches_cpu(workdir, result_a):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    result = run_eval(_config(workdir, "model_a", workdir / "cuda.json", device="cuda"))
    cpu_items = json.loads(result_a.json_path.read_text())["per_item"]
    cuda_items = json.loads(result.json_path.read_text())["per_item"]
    for set_name in cpu_items:
        assert cuda_items[set_name]["probability"] == pytest.approx(cpu_items[set_name]["probability"], rel=1e-3)
        assert cuda_items[set_name]["truth_ratio"] == pytest.approx(cpu_items[set_name]["truth_ratio"], rel=1e-3)


def test_bundled_tofu_data_is_complete_and_attributed():
    from perta_stream.sources.tofu import available_splits, tofu_file

    directory = bundled_tofu_dir()
    assert available_splits(directory) == ["forget01", "forget10"]
    counts = {name: len(load_eval_sets(directory, name)["forget"].items) for name in ("forget01", "forget10")}
    assert counts == {"forget01": 40, "forget10": 400}
    sets = load_eval_sets(directory, "forget01")
    assert {name: len(s.items) for name, s in sets.items()} == {"forget": 40, "retain": 400, "real_authors": 100, "world_facts": 117}
    assert sum(1 for _ in tofu_file(directory, "retain90.jsonl").open()) == 3600
    assert "MIT License" in (directory / "LICENSE").read_text() and "locuslab/TOFU" in (directory / "README.md").read_text()
    with pytest.raises(EvaluationError, match="lacks retain99.jsonl; files found there: forget01.jsonl"):
        tofu_file(directory, "retain99.jsonl")


def test_record_without_a_needed_field_names_file_and_record(workdir, tmp_path):
    broken = shutil.copytree(workdir / "tofu", tmp_path / "tofu")
    lines = (broken / "retain_perturbed.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    del record["paraphrased_answer"]
    lines[1] = json.dumps(record)
    (broken / "retain_perturbed.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"retain_perturbed.jsonl, record 1: field 'paraphrased_answer'"):
        load_eval_sets(broken, "forget01")


@pytest.mark.parametrize("how", ["rewritten", "replaced"])
def test_a_model_changed_during_the_evaluation_writes_no_result(workdir, tmp_path, monkeypatch, how):
    """transformers reads the folder by path (and offloaded layers again later): metrics of a
    model changed meanwhile would be of no one model, so none are written."""
    import os

    from perta_stream.errors import InputChangedError
    from perta_stream.pipelines import eval as eval_pipeline

    model = Path(shutil.copytree(workdir / "model_a", tmp_path / "model"))
    original = eval_pipeline.summarize_metrics

    def change_then_summarize(*args, **kwargs):  # noqa: ANN002, ANN003
        shard = sorted(model.glob("*.safetensors"))[0]
        if how == "rewritten":
            data = bytearray(shard.read_bytes())
            data[-1] ^= 1
            with open(shard, "r+b") as handle:
                handle.write(data)
            os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
        else:
            os.rename(model, model.with_name("model.old"))
            shutil.copytree(workdir / "model_b", model)
        return original(*args, **kwargs)

    monkeypatch.setattr(eval_pipeline, "summarize_metrics", change_then_summarize)
    out = tmp_path / "result.json"
    with pytest.raises(InputChangedError, match=r"model .*: \S+ was replaced or rewritten while this run used it"):
        run_eval(_config(workdir, "model_a", out, model=str(model)))
    assert not out.exists()
