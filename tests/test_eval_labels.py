"""The answer-label conventions of chat-template samples, and the eval record's memorization metrics
(extraction strength, membership AUC, PrivLeak against a retain model's record)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perta_stream.compute.prompts import IGNORE_INDEX, LabelConvention, encode_sample
from perta_stream.config.eval import EvalConfig
from perta_stream.errors import EvaluationError, PlanError
from perta_stream.eval import memorization as mem
from perta_stream.pipelines.eval import run_eval

from tiny_models import build_tokenizer, save_tiny_checkpoint, write_tofu_subset

# A ChatML-shaped template over the tiny tokenizer's tokens: each turn ends "</s>" + newline, as
# SmolLM2's ends "<|im_end|>" + newline; "</s>" is the tokenizer's EOS.
CHATML_LIKE = (
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
QUESTION, ANSWER = "Who wrote the novel?", "A fictitious author."


def _labelled_text(tokenizer, labels: LabelConvention) -> str:
    sample = encode_sample(tokenizer, QUESTION, ANSWER, max_length=256, labels=labels)
    labelled = [token for token in sample.labels if token != IGNORE_INDEX]
    # Labels are the tail of the input (nothing follows the last labelled token).
    assert list(sample.input_ids[len(sample.input_ids) - len(labelled) :]) == labelled
    return tokenizer.decode(labelled)


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (LabelConvention.ASSISTANT_TURN, ANSWER + "</s>\n"),
        (LabelConvention.END_OF_TURN, ANSWER + "</s>"),
        (LabelConvention.OPEN_UNLEARNING, ANSWER + "</s>\n</s>"),
    ],
)
def test_each_label_convention_scores_its_tokens_of_a_chatml_turn(labels, expected):
    tokenizer = build_tokenizer(chat_template=CHATML_LIKE)
    assert _labelled_text(tokenizer, labels) == expected


def test_label_conventions_agree_on_plain_prompts_and_default_to_the_assistant_turn():
    tokenizer = build_tokenizer()
    texts = {_labelled_text(tokenizer, labels) for labels in LabelConvention}
    assert texts == {" " + ANSWER + "</s>"}
    chat = build_tokenizer(chat_template=CHATML_LIKE)
    assert encode_sample(chat, QUESTION, ANSWER, max_length=256) == encode_sample(chat, QUESTION, ANSWER, max_length=256, labels=LabelConvention.ASSISTANT_TURN)


def test_open_unlearning_adds_no_second_eos_when_the_turn_ends_with_it():
    template = (
        "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    tokenizer = build_tokenizer(chat_template=template)
    assert _labelled_text(tokenizer, LabelConvention.OPEN_UNLEARNING).endswith(ANSWER + "</s>")
    assert _labelled_text(tokenizer, LabelConvention.OPEN_UNLEARNING) == _labelled_text(tokenizer, LabelConvention.END_OF_TURN)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_labels")
    save_tiny_checkpoint(root / "model", seed=0)
    save_tiny_checkpoint(root / "retain", seed=1)
    write_tofu_subset(root / "tofu", items=3)
    records = [json.loads(line) for line in (root / "tofu" / "retain_perturbed.jsonl").read_text().splitlines()]
    (root / "holdout.jsonl").write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in records))
    return root


def _config(workdir: Path, model: str, out: str, **overrides) -> EvalConfig:
    options = dict(model=str(workdir / model), split="forget01", out=str(workdir / out), tofu_dir=str(workdir / "tofu"), batch_size=2, max_new_tokens=4, device="cpu")
    options.update(overrides)
    return EvalConfig(**options)


def test_eval_record_has_extraction_strength_auc_and_privleak(workdir):
    holdout = str(workdir / "holdout.jsonl")
    retain = run_eval(_config(workdir, "retain", "retain.json", holdout=holdout))
    assert retain.metrics["privleak"] is None and retain.metrics["mia_min_k_auc"] is not None
    result = run_eval(_config(workdir, "model", "model.json", holdout=holdout, retain_logs=str(retain.json_path)))
    record = json.loads(result.json_path.read_text())
    forget = record["per_item"]["forget"]
    assert record["config"]["labels"] == "open_unlearning"
    assert result.metrics["forget_extraction_strength"] == pytest.approx(sum(forget["extraction_strength"]) / 3)
    auc = mem.mia_auc(forget["min_k_score"], record["per_item"]["holdout"]["min_k_score"])
    assert result.metrics["mia_min_k_auc"] == auc
    assert result.metrics["privleak"] == pytest.approx(mem.privleak(auc, retain.metrics["mia_min_k_auc"]))
    assert "| privleak |" in result.markdown_path.read_text()


def test_eval_without_holdout_leaves_auc_and_privleak_empty(workdir):
    result = run_eval(_config(workdir, "model", "plain.json", labels="end_of_turn"))
    assert result.metrics["mia_min_k_auc"] is None and result.metrics["privleak"] is None
    assert "not computed: no --holdout given" in result.markdown_path.read_text()


def test_eval_refuses_unknown_labels_and_a_retain_record_on_another_holdout(workdir):
    with pytest.raises(PlanError, match="--labels 'answer_only'"):
        _config(workdir, "model", "x.json", labels="answer_only")
    other = workdir / "other_holdout.jsonl"
    other.write_text(json.dumps({"question": "Q?", "answer": "A."}) + "\n")
    retain = run_eval(_config(workdir, "retain", "retain_other.json", holdout=str(other)))
    with pytest.raises(EvaluationError, match="another holdout file"):
        run_eval(_config(workdir, "model", "y.json", holdout=str(workdir / "holdout.jsonl"), retain_logs=str(retain.json_path)))


def test_privleak_is_left_empty_when_the_retain_models_auc_is_zero():
    from perta_stream.eval.runner import SetScores, summarize_metrics

    def scores(name: str, **extra) -> SetScores:
        return SetScores(name=name, answer_loss=(1.0,), correct_loss=(1.0,), perturbed_loss=((1.0,),), probability=(0.5,), truth_ratio=(1.0,),
                         rouge_l_recall=(0.5,), generation=("x",), probability_metric=0.5, truth_ratio_metric=0.5, rouge_l_metric=0.5, **extra)

    sets = {"forget": scores("forget", extraction_strength=(0.5,), min_k_score=(1.0,)), **{n: scores(n) for n in ("retain", "real_authors", "world_facts")}}
    metrics = summarize_metrics(sets, None, holdout_min_k=[2.0], reference_auc=0.0)
    assert metrics["mia_min_k_auc"] == 0.0 and metrics["privleak"] is None
    assert summarize_metrics(sets, None, holdout_min_k=[2.0], reference_auc=0.5)["privleak"] == pytest.approx(-100.0)
