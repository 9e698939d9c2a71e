"""MUSE: its data layout, VerbMem/KnowMem on cases computed by hand, and the runner end to end on
a tiny model with synthetic records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perta_stream.errors import DatasetError, EvaluationError
from perta_stream.eval import muse
from perta_stream.sources.muse import load_muse_dir


def test_rouge_l_f1_and_recall_by_hand():
    # LCS of "the cat sat" in "the cat sat on the mat" is 3 words: recall 3/6, precision 3/3, F1 2/3.
    assert muse.rouge_l("the cat sat on the mat", "the cat sat", kind="recall") == pytest.approx(0.5)
    assert muse.rouge_l("the cat sat on the mat", "the cat sat", kind="f1") == pytest.approx(2 / 3)
    with pytest.raises(EvaluationError, match="kind"):
        muse.rouge_l("a", "a", kind="precision")


def test_verbmem_and_knowmem_are_mean_rouge_l_f1():
    references = ["the cat sat on the mat", "alpha beta", "one two three"]
    generations = ["the cat sat", "alpha beta", "four five"]
    # F1 per item: 2/3, 1, 0.
    assert muse.verbmem(references, generations) == pytest.approx((2 / 3 + 1.0) / 3)
    assert muse.knowmem(references, generations) == pytest.approx((2 / 3 + 1.0) / 3)
    with pytest.raises(EvaluationError, match="2 generations for 3 references"):
        muse.verbmem(references, generations[:2])
    with pytest.raises(EvaluationError, match="no items"):
        muse.knowmem([], [])


def test_knowmem_prompt_and_answer_line():
    prompt = muse.knowmem_prompt("Who?", [("Q1", "A1"), ("Q2", "A2")])
    assert prompt == "Question: Q1\nAnswer: A1\n\nQuestion: Q2\nAnswer: A2\n\nQuestion: Who?\nAnswer:"
    assert muse.first_line(" Paris.\n\nQuestion: next") == "Paris."


def _write_muse(root: Path, *, jsonl: bool = False) -> Path:
    corpus = root / "news"
    (corpus / "verbmem").mkdir(parents=True)
    (corpus / "knowmem").mkdir()
    (corpus / "privleak").mkdir()

    def write(path: Path, records: list) -> None:
        if jsonl:
            path.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        else:
            path.write_text(json.dumps(records), encoding="utf-8")

    write(corpus / "verbmem" / "forget.json", [{"prompt": "The author was born in", "gt": " a small town by the sea."}] * 2)
    write(corpus / "knowmem" / "forget_qa.json", [{"question": "Where was the author born?", "answer": "By the sea."}])
    write(corpus / "knowmem" / "forget_qa_icl.json", [{"question": "Who wrote it?", "answer": "A writer."}])
    write(corpus / "knowmem" / "retain_qa.json", [{"question": "What genre?", "answer": "Mystery."}])
    write(corpus / "privleak" / "forget.json", ["The author was born in a small town by the sea.", "Her first novel won an award."])
    write(corpus / "privleak" / "holdout.json", [{"text": "The painter lived in a large city."}, {"text": "His song was played on the radio."}, {"text": "They met at school."}])
    return corpus


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_load_muse_dir_reads_every_part(tmp_path, jsonl):
    data = load_muse_dir(_write_muse(tmp_path, jsonl=jsonl))
    assert len(data.verbmem_forget) == 2 and data.verbmem_forget[0].continuation == " a small town by the sea."
    questions, examples = data.knowmem["forget"]
    assert questions[0].answer == "By the sea." and examples[0].question == "Who wrote it?"
    assert data.knowmem["retain"][1] == ()
    assert data.privleak["forget"][1] == "Her first novel won an award." and len(data.privleak["holdout"]) == 3


def test_load_muse_dir_errors_name_the_file_and_record(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_muse_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds none of"):
        load_muse_dir(tmp_path / "empty")
    corpus = _write_muse(tmp_path / "bad")
    (corpus / "verbmem" / "forget.json").write_text(json.dumps([{"prompt": "x"}]), encoding="utf-8")
    with pytest.raises(DatasetError, match=r"verbmem.forget\.json, record 0: needs a non-empty string field 'gt'"):
        load_muse_dir(corpus)


def test_score_muse_end_to_end_on_a_tiny_model(tmp_path):
    import torch

    from perta_stream.eval import memorization as mem
    from perta_stream.eval.muse_runner import score_muse
    from perta_stream.sources.hf_model import LoadedModel

    from tiny_models import build_llama, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_llama(len(tokenizer))
    loaded = LoadedModel(model=model, tokenizer=tokenizer, input_device=torch.device("cpu"), pad_token_id=tokenizer.pad_token_id)
    data = load_muse_dir(_write_muse(tmp_path))
    scores = score_muse(loaded, data, batch_size=2, verbmem_max_new_tokens=5, knowmem_max_new_tokens=4)
    assert scores.privleak is None  # no retrained model's AUC given
    assert 0.0 <= scores.verbmem_forget <= 1.0 and set(scores.knowmem) == {"forget", "retain"}
    assert scores.verbmem_forget == pytest.approx(muse.verbmem(scores.per_item["verbmem_forget"]["reference"], scores.per_item["verbmem_forget"]["generation"]))

    # The Min-40% score of each text, from a direct forward pass over all its tokens but the first.
    def min_k(text: str) -> float:
        ids = tokenizer(text)["input_ids"]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
        return mem.min_k_percent_score([-float(log_probs[k - 1, ids[k]]) for k in range(1, len(ids))])

    forget = [min_k(t) for t in data.privleak["forget"]]
    holdout = [min_k(t) for t in data.privleak["holdout"]]
    assert scores.per_item["privleak_forget"]["min_k_score"] == pytest.approx(forget, abs=1e-5)
    assert scores.per_item["privleak_holdout"]["min_k_score"] == pytest.approx(holdout, abs=1e-5)
    assert scores.mia_auc == mem.mia_auc(scores.per_item["privleak_forget"]["min_k_score"], scores.per_item["privleak_holdout"]["min_k_score"])
    with_reference = score_muse(loaded, data, reference_auc=0.5, batch_size=2, verbmem_max_new_tokens=5, knowmem_max_new_tokens=4)
    assert with_reference.privleak == pytest.approx(100.0 * (with_reference.mia_auc - 0.5) / 0.5)


@pytest.mark.parametrize(
    "content, message",
    [
        (b'[{"prompt": "caf\xe9", "gt": "x"}]', r"verbmem.forget\.json, line 1: not UTF-8 text \(byte 0xe9 at offset 16\)"),
        (b"[" * 200_000 + b"]" * 200_000, "nests lists or objects too deeply"),
        (b'{"prompt": ' + b"[" * 200_000 + b"]" * 200_000 + b"}\n", "nests lists or objects too deeply"),
    ],
    ids=["latin-1", "deep-array", "deep-jsonl"],
)
def test_load_muse_dir_turns_undecodable_and_deeply_nested_files_into_dataset_errors(tmp_path, content, message):
    corpus = _write_muse(tmp_path)
    (corpus / "verbmem" / "forget.json").write_bytes(content)
    with pytest.raises(DatasetError, match=message):
        load_muse_dir(corpus)


def test_data_files_nested_too_deeply_are_dataset_errors(tmp_path):
    from perta_stream.sources.qa_dataset import load_qa_samples

    for name, content in (("array.json", b"[" * 200_000 + b"]" * 200_000), ("lines.jsonl", b'{"q": ' + b"[" * 200_000 + b"]" * 200_000 + b"}\n")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DatasetError, match="too deeply"):
            load_qa_samples(tmp_path / name)
