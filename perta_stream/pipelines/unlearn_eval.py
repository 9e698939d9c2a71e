"""The before/after evaluation of an unlearn: θ_full and every output, on the user's files.

θ_full (the model before unlearning) is evaluated once on the forget and retain files (and the
holdout file), each output beside it (`eval --forget --retain --before`); the records go to the
work folder's `eval-<out>-<key>/`, and one table puts every model side by side: the metrics that
need no retain model, then the answers to the first forget and retain questions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from perta_stream.config.eval import EvalConfig
from perta_stream.config.merge import format_alpha
from perta_stream.config.unlearn import UnlearnConfig
from perta_stream.eval.files_report import ModelColumn, format_comparison
from perta_stream.sinks.atomic_file import write_text_atomically

TABLE_NAME = "before_after.md"


def evaluate_before_after(config: UnlearnConfig, outputs: tuple[str, ...], *, on_stage: Callable[[str], None] | None = None) -> tuple[str, Path]:
    """Evaluate θ_full and each output of `config` on its forget and retain files.

    Returns:
        (the Markdown table, its path in the work folder).

    Raises:
        EvaluationError, CheckpointError, DatasetError: from the evaluations.
    """
    from perta_stream.pipelines.eval import run_eval
    from perta_stream.pipelines.eval_files import read_files_record

    say = on_stage or (lambda line: None)
    folder = _eval_folder(config)
    labels = _labels(config, outputs)

    def evaluate(model: str, name: str, before: str | None) -> dict:
        say(f"[unlearn] evaluating {model} on {config.forget} and {config.retain}")
        result = run_eval(_eval_config(config, model, str(folder / f"{name}.json"), before))
        return read_files_record(result.json_path)

    before = evaluate(str(config.full), "before", None)
    columns = [ModelColumn.from_record("before", before)]
    for label, out_dir in zip(labels, outputs):
        columns.append(ModelColumn.from_record(label, evaluate(out_dir, _file_name(label), str(folder / "before.json"))))
    questions = {name: [(item["question"], item["answer"]) for item in before["questions"][name]] for name in ("forget", "retain")}
    notes = [f"before: `{config.full}` (theta_full); after: " + ", ".join(f"{label} `{out}`" for label, out in zip(labels, outputs))]
    notes += [f"{name}: `{described['file']}` ({described['items']} records)" for name, described in before["data_files"].items()]
    table = format_comparison(columns, questions=questions, examples=config.examples, title="Before and after unlearning, on your files", notes=notes)
    path = write_text_atomically(folder / TABLE_NAME, table)
    return table, path


def _eval_folder(config: UnlearnConfig) -> Path:
    """`<work>/eval-<output name>-<key of the output path>`: one per output location."""
    out = str(Path(config.out).resolve())
    return config.work_folder_path / f"eval-{Path(config.out).name.replace('{', '').replace('}', '')}-{hashlib.sha256(out.encode()).hexdigest()[:8]}"


def _labels(config: UnlearnConfig, outputs: tuple[str, ...]) -> list[str]:
    if len(outputs) == len(config.alphas):
        return [f"{config.method} α={format_alpha(alpha)}" for alpha in config.alphas]
    return [Path(out).name for out in outputs]  # one pass over several methods: the folders say which


def _file_name(label: str) -> str:
    return label.replace(" α=", "_alpha_").replace(",", "_")


def _eval_config(config: UnlearnConfig, model: str, out: str, before: str | None) -> EvalConfig:
    return EvalConfig(
        model=model,
        forget=config.forget,
        retain=config.retain,
        holdout=config.holdout,
        question_key=config.question_key,
        answer_key=config.answer_key,
        out=out,
        before=before,
        overwrite=True,  # this run's own records, replaced on a rerun
        batch_size=config.eval_batch_size,
        max_length=config.max_length,
        max_new_tokens=config.max_new_tokens,
        max_items=config.max_items,
        device=config.device,
        system_prompt=config.system_prompt,
        examples=config.examples,
    )
