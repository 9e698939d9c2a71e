"""The evaluation record: metric names, `EvalResult`, the JSON and Markdown outputs, retain logs.

The JSON record holds every metric and every per-item value (losses, probabilities, truth ratios,
ROUGE-L recalls and the generations), so the record of a retain-only model can serve as
`--retain-logs` for any other model evaluated on the same split and items.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from perta_stream.errors import EvaluationError
from perta_stream.sinks.atomic_file import write_text_atomically

RECORD_FORMAT = "perta_stream.eval/1"
UTILITY_SETS = ("retain", "real_authors", "world_facts")
# The 9 numbers whose harmonic mean is model utility, in table order.
UTILITY_KEYS = tuple(f"{set_name}_{part}" for set_name in UTILITY_SETS for part in ("probability", "rouge_l", "truth_ratio"))
FORGET_KEYS = ("forget_quality", "forget_truth_ratio", "forget_probability", "forget_rouge_l")
# open-unlearning's other defaults: extraction strength on the forget set, and PrivLeak from the
# forget-vs-holdout membership AUC (None without a holdout set / the retain model's AUC).
MEMORIZATION_KEYS = ("forget_extraction_strength", "mia_min_k_auc", "privleak")
METRIC_KEYS = ("forget_quality", "model_utility", "forget_truth_ratio", "forget_probability", "forget_rouge_l", *MEMORIZATION_KEYS, *UTILITY_KEYS)

_DESCRIPTIONS = {
    "forget_quality": "KS-test p-value of forget-set truth ratios vs. the retain model (higher = closer to retain)",
    "model_utility": "harmonic mean of the 9 utility numbers below",
    "forget_truth_ratio": "forget set: mean of min(TR, 1/TR)",
    "forget_probability": "forget set: mean P~(answer)",
    "forget_rouge_l": "forget set: mean ROUGE-L recall of greedy generations",
    "forget_extraction_strength": "forget set: mean extraction strength, 1 - (shortest answer prefix from which the rest is reproduced)/length",
    "mia_min_k_auc": "P(forget answer's Min-40% NLL > holdout answer's); near 0 = forget set recognisable, 0.5 = not",
    "privleak": "100 (AUC - AUC of the retain model) / AUC of the retain model; 0 is ideal, negative = under-unlearned",
}
for _set in UTILITY_SETS:
    _DESCRIPTIONS[f"{_set}_probability"] = f"{_set}: " + ("mean P~(answer)" if _set == "retain" else "mean normalized probability")
    _DESCRIPTIONS[f"{_set}_rouge_l"] = f"{_set}: mean ROUGE-L recall"
    _DESCRIPTIONS[f"{_set}_truth_ratio"] = f"{_set}: mean of max(0, 1 - TR)"


@dataclass(frozen=True)
class EvalResult:
    """What `run_eval` returns.

    Attributes:
        metrics: every key of METRIC_KEYS; `forget_quality` is None without retain logs.
        json_path: the JSON record written.
        markdown_path: the Markdown table written next to it.
        model: the evaluated checkpoint.
        split: the TOFU forget split; None for one's own files (`metrics` then holds
            eval/files_report.py's FILE_METRIC_KEYS).
        sample_counts: evaluated items per set (forget, retain, real_authors, world_facts).
        elapsed_s: wall time of the whole evaluation.
    """

    metrics: dict[str, float | None]
    json_path: Path
    markdown_path: Path
    model: str
    split: str | None
    sample_counts: dict[str, int]
    elapsed_s: float

    def summary(self) -> str:
        if self.split is None:
            counts = ", ".join(f"{name} {count}" for name, count in self.sample_counts.items())
            return (
                f"evaluated {self.model} on your files ({counts} records) in {self.elapsed_s:.1f} s: forget probability "
                f"{self.metrics['forget_probability']:.4f}, retain utility {self.metrics['retain_utility']:.4f}; "
                f"wrote {self.json_path} and {self.markdown_path}"
            )
        quality = self.metrics["forget_quality"]
        quality_text = "n/a (no --retain-logs)" if quality is None else f"{quality:.4g}"
        return (
            f"evaluated {self.model} on TOFU {self.split} in {self.elapsed_s:.1f} s: forget quality {quality_text}, "
            f"model utility {self.metrics['model_utility']:.4f}; wrote {self.json_path} and {self.markdown_path}"
        )


@dataclass(frozen=True)
class RetainLogs:
    """The part of a retain-only model's record that forget quality needs."""

    path: Path
    forget_truth_ratios: tuple[float, ...]
    mia_auc: float | None = None
    holdout_sha256: str | None = None


def load_retain_logs(path: str | os.PathLike, *, split: str, forget_sha256: str, forget_count: int) -> RetainLogs:
    """Read the forget-set truth ratios of a retain model's eval record, checked against this run.

    Raises:
        EvaluationError: not an eval record, another split, other forget data, or another number
            of forget items (e.g. a different --max-items); the message says which.
    """
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise EvaluationError(f"--retain-logs {path} is not a readable JSON file ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise EvaluationError(f"--retain-logs {path} is not a `perta-stream eval` record (format {RECORD_FORMAT})")
    if record.get("split") != split:
        raise EvaluationError(
            f"--retain-logs {path} was computed on split {record.get('split')!r}, this evaluation is on {split!r}; "
            f"evaluate the retain model on {split} and pass that record"
        )
    forget = record.get("data_files", {}).get("forget", {})
    if forget.get("sha256") != forget_sha256:
        raise EvaluationError(f"--retain-logs {path} was computed on other forget data ({forget.get('file')}); evaluate the retain model on the same TOFU files")
    ratios = record.get("per_item", {}).get("forget", {}).get("truth_ratio")
    if not isinstance(ratios, list) or not all(isinstance(r, (int, float)) for r in ratios):
        raise EvaluationError(f"--retain-logs {path} holds no per-item forget truth ratios")
    if len(ratios) != forget_count:
        raise EvaluationError(
            f"--retain-logs {path} has {len(ratios)} forget items, this evaluation has {forget_count}; "
            "use the same --max-items for both models"
        )
    auc = record.get("metrics", {}).get("mia_min_k_auc")
    holdout = record.get("data_files", {}).get("holdout", {})
    return RetainLogs(
        path=Path(path),
        forget_truth_ratios=tuple(float(r) for r in ratios),
        mia_auc=float(auc) if isinstance(auc, (int, float)) else None,
        holdout_sha256=holdout.get("sha256"),
    )


def write_json_atomic(path: str | os.PathLike, record: dict) -> Path:
    """Write `record` as indented JSON through a temporary file renamed over `path`."""
    return write_text_atomically(path, json.dumps(record, indent=1) + "\n")


def format_markdown(record: dict) -> str:
    """The Markdown table of one eval record: every metric, with what it means, and the sample counts."""
    lines = [
        f"# TOFU evaluation: {record['model']}",
        "",
        f"split `{record['split']}`, TOFU data `{record['tofu_dir']}`"
        + (f", first {record['max_items']} items of each set" if record.get("max_items") else "")
        + (f", answer labels `{record['config']['labels']}`" if record.get("config", {}).get("labels") else ""),
        "",
        "| metric | value | definition |",
        "| --- | ---: | --- |",
    ]
    for key in METRIC_KEYS:
        value = record["metrics"][key]
        shown = "n/a" if value is None else f"{value:.4g}"
        definition = _DESCRIPTIONS[key]
        if key == "forget_quality" and value is None:
            definition += "; not computed: no --retain-logs given"
        elif key == "mia_min_k_auc" and value is None:
            definition += "; not computed: no --holdout given"
        elif key == "privleak" and value is None:
            definition += "; not computed: needs --holdout and --retain-logs with the AUC on the same holdout, and that AUC above 0"
        lines.append(f"| {key} | {shown} | {definition} |")
    lines += ["", "| set | items |", "| --- | ---: |"]
    lines += [f"| {name} | {count} |" for name, count in record["sample_counts"].items()]
    return "\n".join(lines) + "\n"

