"""The record and the before/after table of an evaluation on one's own files (eval/qa_runner.py).

The JSON record (`perta_stream.eval/1`, `"data": "files"`) holds every metric, every per-item
value and every generation, and the questions and reference answers, so that a later evaluation
of another model on the same files can be put beside it (`eval --before RECORD.json`) without
running this model again. The table puts models side by side, a column each: the metrics, then
for the first few forget and retain questions the reference answer and each model's answer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from perta_stream.errors import EvaluationError
from perta_stream.eval.report import RECORD_FORMAT

FILES_DATA = "files"
FILE_SETS = ("forget", "retain")
# In table order; the arrow says which way is better after unlearning.
FILE_METRICS: tuple[tuple[str, str, str], ...] = (
    ("forget_probability", "forget probability ↓", "mean P~(answer) = exp(-mean token NLL) over the forget file"),
    ("forget_rouge_l", "forget ROUGE-L ↓", "mean ROUGE-L recall of the greedy answer against the forget file's answer"),
    ("forget_extraction_strength", "forget extraction strength ↓", "mean 1 - (shortest answer prefix from which the rest is reproduced)/length"),
    ("mia_min_k_auc", "membership AUC (Min-K%) → 0.5", "P(forget answer's Min-40% NLL > holdout answer's); near 0 = forget set recognisable"),
    ("privleak", "PrivLeak → 0", "100 (AUC - 0.5) / 0.5: the AUC against that of a model that saw neither file; negative = recognisable"),
    ("retain_probability", "retain probability ↑", "mean P~(answer) over the retain file"),
    ("retain_rouge_l", "retain ROUGE-L ↑", "mean ROUGE-L recall of the greedy answer against the retain file's answer"),
    ("retain_utility", "retain utility ↑", "harmonic mean of the retain probability and ROUGE-L"),
)
FILE_METRIC_KEYS = tuple(key for key, _, _ in FILE_METRICS)


@dataclass(frozen=True)
class ModelColumn:
    """One model of a before/after table.

    Attributes:
        label: the column's title (`before`, `after`, `α=1`).
        metrics: its FILE_METRIC_KEYS values (None where not measured).
        generations: set name -> its answer to each question, in record order.
    """

    label: str
    metrics: dict[str, float | None]
    generations: dict[str, list[str]]

    @classmethod
    def from_record(cls, label: str, record: dict) -> "ModelColumn":
        per_item = record.get("per_item", {})
        return cls(label, dict(record["metrics"]), {name: list(per_item.get(name, {}).get("generation", [])) for name in FILE_SETS})


def load_files_record(path: str | os.PathLike, *, data_files: dict, flag: str = "--before") -> dict:
    """An earlier evaluation record on the same files (and items), to be shown beside this one.

    Raises:
        EvaluationError: not a files evaluation record, or one of other files or another item count.
    """
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"{flag} {path} is not a readable JSON file ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT or record.get("data") != FILES_DATA:
        raise EvaluationError(f"{flag} {path} is not the record of `perta-stream eval --forget ... --retain ...`; give a model folder or such a record")
    for name in FILE_SETS:
        theirs, ours = record.get("data_files", {}).get(name, {}), data_files[name]
        if theirs.get("sha256") != ours["sha256"] or theirs.get("items") != ours["items"]:
            raise EvaluationError(
                f"{flag} {path} was evaluated on {theirs.get('items')} records of another {name} file ({theirs.get('file')}); "
                f"evaluate both models on the same files and --max-items"
            )
    return record


def format_metric_value(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}" if abs(value) >= 0.001 or value == 0 else f"{value:.2e}"


def format_comparison(columns: Sequence[ModelColumn], *, questions: dict[str, list[tuple[str, str]]], examples: int, title: str, notes: Sequence[str] = ()) -> str:
    """The Markdown table of `columns` side by side, then the answers to the first `examples`
    questions of each file: the reference answer and each model's."""
    lines = [f"# {title}", ""] + [f"{note}  " for note in notes] + ([""] if notes else [])
    lines += ["| metric | " + " | ".join(column.label for column in columns) + " | what it measures |"]
    lines += ["| --- |" + " ---: |" * len(columns) + " --- |"]
    for key, name, meaning in FILE_METRICS:
        lines.append(f"| {name} | " + " | ".join(format_metric_value(column.metrics.get(key)) for column in columns) + f" | {meaning} |")
    width = max(len("reference"), *(len(column.label) for column in columns))
    for set_name in FILE_SETS:
        shown = questions.get(set_name, [])[:examples]
        if not shown:
            continue
        lines += ["", f"## {set_name.capitalize()} questions: answers side by side", ""]
        for number, (question, reference) in enumerate(shown, start=1):
            lines.append(f"{number}. **{_one_line(question)}**")
            lines.append("   ```")
            lines.append(f"   {'reference'.ljust(width)}  {_one_line(reference)}")
            for column in columns:
                answers = column.generations.get(set_name, [])
                lines.append(f"   {column.label.ljust(width)}  {_one_line(answers[number - 1]) if number - 1 < len(answers) else '—'}")
            lines.append("   ```")
    return "\n".join(lines) + "\n"


def answer_examples(columns: Sequence[ModelColumn], questions: dict[str, list[tuple[str, str]]], examples: int) -> list[dict]:
    """The side-by-side answers as the record stores them: one entry per shown question."""
    shown = []
    for set_name in FILE_SETS:
        for index, (question, reference) in enumerate(questions.get(set_name, [])[:examples]):
            answers = {column.label: column.generations.get(set_name, [None] * (index + 1))[index] for column in columns}
            shown.append({"set": set_name, "index": index, "question": question, "reference": reference, "answers": answers})
    return shown


def _one_line(text: str, limit: int = 160) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
