"""`run_files_eval`: a model on one's own forget and retain files, beside the model before unlearning.

Recipe, top to bottom: read the files (cut to --max-items) and hash them; read or evaluate the
model before unlearning (`--before`: its record is checked against these files before any model is
loaded); load the model; score the forget file (probability, ROUGE-L, extraction strength, Min-K%),
the retain file (probability, ROUGE-L) and the holdout file (Min-K%); combine into the metrics
(eval/qa_runner.py); write the record and the before/after table (eval/files_report.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from perta_stream import __version__
from perta_stream.compute.prompts import LabelConvention
from perta_stream.config.eval import EvalConfig
from perta_stream.eval.files_report import FILES_DATA, ModelColumn, answer_examples, format_comparison, load_files_record
from perta_stream.eval.qa_runner import UNSEEN_REFERENCE_AUC, score_qa_set, summarize_qa_metrics
from perta_stream.eval.report import RECORD_FORMAT, EvalResult, write_json_atomic
from perta_stream.eval.runner import memorization_scores
from perta_stream.hashing import file_sha256
from perta_stream.sinks.atomic_file import write_text_atomically
from perta_stream.sources.hf_model import load_model_and_tokenizer
from perta_stream.sources.qa_dataset import load_qa_samples

__all__ = ["file_pairs", "run_files_eval"]

logger = logging.getLogger(__name__)


def file_pairs(config: EvalConfig) -> tuple[dict[str, list[tuple[str, str]]], dict[str, dict]]:
    """The (question, answer) pairs of the forget, retain (and holdout) files, each cut to
    --max-items, and what the record says of each file (name, sha256, items).

    Raises:
        DatasetError: a file is empty or a record lacks the question or answer field.
    """
    pairs: dict[str, list[tuple[str, str]]] = {}
    described: dict[str, dict] = {}
    for name, path in (("forget", config.forget), ("retain", config.retain), ("holdout", config.holdout)):
        if path is None:
            continue
        samples = load_qa_samples(path, question_key=config.question_key, answer_key=config.answer_key)[: config.max_items]
        pairs[name] = [(sample.question, sample.answer) for sample in samples]
        described[name] = {"file": str(path), "sha256": file_sha256(path), "items": len(samples)}
    return pairs, described


def run_files_eval(config: EvalConfig) -> EvalResult:
    """Evaluate `config.model` on `config.forget` and `config.retain` and write `config.out` (+ `.md`).

    Returns:
        EvalResult with the FILE_METRIC_KEYS metrics (the membership AUC and PrivLeak None
        without a holdout file) and the paths; `split` is None.

    Raises:
        EvaluationError: the --before record is of other files or items; the model and its
            tokenizer do not match.
        CheckpointError: the model cannot be loaded. DatasetError: a bad record, or an answer
            longer than --max-length.
    """
    started = time.perf_counter()
    pairs, data_files = file_pairs(config)
    before = None
    if config.before is not None:
        if config.before.endswith(".json"):
            before = load_files_record(config.before, data_files=data_files)
        else:
            before = _evaluate(dataclasses.replace(config, model=config.before, before=None), pairs, data_files, time.perf_counter())
    record = _evaluate(config, pairs, data_files, started)
    columns = [ModelColumn.from_record("after" if before is not None else "model", record)]
    if before is not None:
        columns.insert(0, ModelColumn.from_record("before", before))
        record["before"] = {key: before.get(key) for key in ("model", "metrics", "per_item", "elapsed_s")}
    questions = {name: pairs[name] for name in ("forget", "retain")}
    record["answers_side_by_side"] = answer_examples(columns, questions, config.examples)
    json_path = write_json_atomic(config.out, record)
    title = f"Evaluation of {config.model} on your files" + (f", beside {config.before}" if before is not None else "")
    notes = [f"{name}: `{described['file']}` ({described['items']} records)" for name, described in data_files.items()]
    markdown_path = write_text_atomically(config.markdown_path, format_comparison(columns, questions=questions, examples=config.examples, title=title, notes=notes))
    logger.info("wrote %s and %s", json_path, markdown_path)
    return EvalResult(
        metrics=record["metrics"],
        json_path=json_path,
        markdown_path=markdown_path,
        model=config.model,
        split=None,
        sample_counts=record["sample_counts"],
        elapsed_s=time.perf_counter() - started,
    )


def _evaluate(config: EvalConfig, pairs: dict[str, list[tuple[str, str]]], data_files: dict[str, dict], started: float) -> dict:
    """The record of one model on the files (everything but the side-by-side answers)."""
    labels = LabelConvention(config.labels)
    loaded = load_model_and_tokenizer(config.model, device=config.device)
    options = {"batch_size": config.batch_size, "max_length": config.max_length, "system_prompt": config.system_prompt, "labels": labels}
    forget = score_qa_set(loaded, "forget", pairs["forget"], max_new_tokens=config.max_new_tokens, memorization=True, **options)
    retain = score_qa_set(loaded, "retain", pairs["retain"], max_new_tokens=config.max_new_tokens, **options)
    holdout_min_k = None
    if "holdout" in pairs:
        _, holdout_min_k = memorization_scores(loaded, pairs["holdout"], desc="holdout: memorization", **options)
    del loaded
    metrics = summarize_qa_metrics(forget, retain, holdout_min_k=holdout_min_k)
    return {
        "format": RECORD_FORMAT,
        "data": FILES_DATA,
        "tool_version": __version__,
        "model": config.model,
        "max_items": config.max_items,
        "metrics": metrics,
        "privleak_reference_auc": UNSEEN_REFERENCE_AUC,
        "sample_counts": {name: len(items) for name, items in pairs.items()},
        "data_files": data_files,
        "config": config.to_dict(),
        "elapsed_s": time.perf_counter() - started,
        "questions": {name: [{"question": q, "answer": a} for q, a in items] for name, items in pairs.items() if name != "holdout"},
        "per_item": {
            "forget": forget.per_item(),
            "retain": retain.per_item(),
            **({"holdout": {"min_k_score": holdout_min_k}} if holdout_min_k is not None else {}),
        },
    }


def read_files_record(path: str | Path) -> dict:
    """A files evaluation record as written (for the unlearn and sweep tables)."""
    import json

    return json.loads(Path(path).read_text(encoding="utf-8"))
