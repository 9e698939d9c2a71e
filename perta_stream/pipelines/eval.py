"""`run_eval`: the TOFU metrics of one model, written as a JSON record and a Markdown table.

Recipe, top to bottom: validate the retain logs against the data (before the model is loaded,
so a wrong file fails in seconds), load the model and tokenizer, score the four sets, combine
into the metrics, write the record and the table.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from perta_stream import __version__
from perta_stream.compute.prompts import LabelConvention
from perta_stream.config.eval import EvalConfig
from perta_stream.errors import EvaluationError
from perta_stream.hashing import file_sha256
from perta_stream.sinks.atomic_file import write_text_atomically
from perta_stream.eval.report import (
    RECORD_FORMAT,
    EvalResult,
    format_markdown,
    load_retain_logs,
    write_json_atomic,
)
from perta_stream.eval.runner import memorization_scores, score_set, summarize_metrics
from perta_stream.sources.hf_model import load_model_and_tokenizer
from perta_stream.sources.qa_dataset import load_qa_samples
from perta_stream.sources.tofu import load_eval_sets

__all__ = ["EvalConfig", "EvalResult", "run_eval"]

logger = logging.getLogger(__name__)


def run_eval(config: EvalConfig) -> EvalResult:
    """Evaluate `config.model` on TOFU `config.split` and write `config.out` (+ `.md`); with
    `config.forget` and `config.retain`, on those files instead (pipelines/eval_files.py).

    Returns:
        EvalResult with every metric (forget quality None without retain logs) and the paths.

    Raises:
        EvaluationError: a TOFU file or split is missing, the retain logs do not fit this run,
            or the model and tokenizer do not match.
        CheckpointError: the model cannot be loaded.
        DatasetError: a TOFU record is malformed, or an answer exceeds --max-length.
    """
    if config.on_files:
        from perta_stream.pipelines.eval_files import run_files_eval

        return run_files_eval(config)
    assert config.split is not None  # EvalConfig requires a split or the files
    started = time.perf_counter()
    sets = load_eval_sets(config.tofu_dir, config.split, max_items=config.max_items)
    retain_logs = None
    if config.retain_logs is not None:
        forget = sets["forget"]
        retain_logs = load_retain_logs(config.retain_logs, split=config.split, forget_sha256=forget.sha256, forget_count=len(forget.items))

    holdout = _load_holdout(config)
    if holdout is not None and retain_logs is not None and retain_logs.holdout_sha256 not in (None, holdout[1]):
        raise EvaluationError(
            f"--retain-logs {config.retain_logs} measured its membership AUC on another holdout file than --holdout {config.holdout}; "
            "evaluate both models with the same holdout"
        )
    labels = LabelConvention(config.labels)
    loaded = load_model_and_tokenizer(config.model, device=config.device)
    scores = {
        name: score_set(
            loaded,
            tofu_set,
            batch_size=config.batch_size,
            max_length=config.max_length,
            max_new_tokens=config.max_new_tokens,
            system_prompt=config.system_prompt,
            labels=labels,
        )
        for name, tofu_set in sets.items()
    }
    holdout_min_k: list[float] | None = None
    if holdout is not None:
        _, holdout_min_k = memorization_scores(
            loaded, holdout[0], batch_size=config.batch_size, max_length=config.max_length, system_prompt=config.system_prompt, labels=labels, desc="holdout: memorization"
        )
    metrics = summarize_metrics(
        scores,
        None if retain_logs is None else retain_logs.forget_truth_ratios,
        holdout_min_k=holdout_min_k,
        reference_auc=None if retain_logs is None or holdout is None else retain_logs.mia_auc,
    )
    elapsed_s = time.perf_counter() - started
    loaded.check_unchanged()  # the metrics are of one model, or nothing is written

    sample_counts = {name: len(tofu_set.items) for name, tofu_set in sets.items()}
    record = {
        "format": RECORD_FORMAT,
        "tool_version": __version__,
        "model": config.model,
        "split": config.split,
        "tofu_dir": config.tofu_dir,
        "max_items": config.max_items,
        "retain_logs": config.retain_logs,
        "metrics": metrics,
        "sample_counts": sample_counts,
        "data_files": {
            **{name: {"file": tofu_set.path.name, "sha256": tofu_set.sha256} for name, tofu_set in sets.items()},
            **({"holdout": {"file": Path(config.holdout).name, "sha256": holdout[1]}} if holdout is not None and config.holdout else {}),
        },
        "config": config.to_dict(),
        "device": str(loaded.input_device),
        "elapsed_s": elapsed_s,
        "per_item": {
            **{name: set_scores.per_item() for name, set_scores in scores.items()},
            **({"holdout": {"min_k_score": holdout_min_k}} if holdout_min_k is not None else {}),
        },
    }
    json_path = write_json_atomic(config.out, record)
    markdown_path = write_text_atomically(config.markdown_path, format_markdown(record))
    logger.info("wrote %s and %s", json_path, markdown_path)
    return EvalResult(
        metrics=metrics,
        json_path=json_path,
        markdown_path=markdown_path,
        model=config.model,
        split=config.split,
        sample_counts=sample_counts,
        elapsed_s=elapsed_s,
    )


def _load_holdout(config: EvalConfig) -> tuple[list[tuple[str, str]], str] | None:
    """The holdout (question, answer) pairs, cut to --max-items like the other sets, and the file's sha256."""
    if config.holdout is None:
        return None
    samples = load_qa_samples(config.holdout)
    if config.max_items is not None:
        samples = samples[: config.max_items]
    return [(s.question, s.answer) for s in samples], file_sha256(config.holdout)
