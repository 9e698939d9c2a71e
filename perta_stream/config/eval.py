"""`EvalConfig`: the validated options of `perta-stream eval` (TOFU metrics of one model)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perta_stream.config.locations import normalize_inputs, with_typos
from perta_stream.config.options import from_options, integer, option, options_from_cli
from perta_stream.devices import DEVICE_HELP, device_problem
from perta_stream.errors import PlanError

# How chat-template answers are labelled (compute/prompts.py LabelConvention); open-unlearning's
# is the default so that numbers compare with theirs.
LABEL_CONVENTIONS = ("open_unlearning", "assistant_turn", "end_of_turn")
# The TOFU splits a model can be evaluated on; each names its forget set's perturbed file.
TOFU_SPLITS = ("forget01", "forget05", "forget10")
LABELS_HELP = "which tokens of a chat-template answer are scored (default open_unlearning; docs: Coming from open-unlearning, 'Label conventions')"
HOLDOUT_HELP = "question-answer file the model never saw (TOFU holdout): gives the membership AUC and PrivLeak"


@dataclass(frozen=True, kw_only=True)
class EvalOptions:
    """How a model is evaluated on TOFU: the options `eval` and `sweep` share, declared once.

    Attributes:
        tofu_dir: the TOFU data directory; empty means the copy bundled with perta_stream.
        max_length: tokens per sample; the prompt's start is cut first, answers never.
        max_new_tokens: greedy generation length for ROUGE-L.
        max_items: evaluate only the first N items of each set (quick runs); None = all.
        device: `auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`.
        system_prompt: an optional system prompt for chat-template models.
        labels: which tokens of a chat-template answer are scored (LABEL_CONVENTIONS;
            docs/guides/from-open-unlearning.md, "Label conventions").
        holdout: a question-answer file the model never saw (TOFU's holdout split); with it the
            forget-vs-holdout membership AUC is computed, and PrivLeak when the retain logs have one.
    """

    tofu_dir: str = option("", flags=("--tofu",), help="TOFU data directory (default: the subset bundled with perta_stream)")
    max_length: int = option(512, help="tokens per sample; prompts are cut first (default 512)")
    max_new_tokens: int = option(200, help="greedy generation length for ROUGE-L (default 200)")
    max_items: int | None = option(None, parse=integer, help="evaluate only the first N items of each set (quick runs)")
    device: str = option("auto", help=f"{DEVICE_HELP} (default auto)")
    system_prompt: str | None = option(None, help="system prompt for models with a chat template")
    labels: str = option("open_unlearning", choices=LABEL_CONVENTIONS, help=LABELS_HELP)
    holdout: str | None = option(None, help=HOLDOUT_HELP)

    def resolve_tofu_dir(self) -> None:
        """An empty tofu_dir becomes the bundled copy (called from `__post_init__`)."""
        if not self.tofu_dir:
            from perta_stream.sources.tofu import bundled_tofu_dir

            object.__setattr__(self, "tofu_dir", str(bundled_tofu_dir()))

    def eval_option_problems(self) -> list[str]:
        problems: list[str] = []
        if not Path(self.tofu_dir).is_dir():
            problems.append(f"--tofu {self.tofu_dir} is not a directory; give the folder holding the TOFU .jsonl files")
        for flag, value in (("--max-length", self.max_length), ("--max-new-tokens", self.max_new_tokens)):
            if value < 1:
                problems.append(f"{flag} must be at least 1, got {value}")
        if self.max_items is not None and self.max_items < 1:
            problems.append(f"--max-items must be at least 1, got {self.max_items}")
        if device_problem(self.device):
            problems.append(str(device_problem(self.device)))
        if self.labels not in LABEL_CONVENTIONS:
            problems.append(f"--labels {self.labels!r} is not one of {', '.join(LABEL_CONVENTIONS)}")
        if self.holdout is not None and not Path(self.holdout).is_file():
            problems.append(f"--holdout {self.holdout} does not exist; give a .jsonl/.json file of question-answer records the model never saw")
        return problems


@dataclass(frozen=True, kw_only=True)
class QaFilesOptions:
    """One's own question-answer files to evaluate on instead of a TOFU split (eval, sweep).

    Attributes:
        forget, retain: .jsonl/.json files of question-answer records: what the model should
            forget, and what it should keep (gives the utility figure).
        question_key, answer_key: the records' field names.
    """

    forget: str | None = option(None, help="your forget file (.jsonl/.json of question-answer records), instead of a TOFU --split")
    retain: str | None = option(None, help="your retain file (.jsonl/.json): what the model must keep (with --forget)")
    question_key: str = option("question", help="record field holding the question (default question)")
    answer_key: str = option("answer", help="record field holding the answer (default answer)")

    @property
    def on_files(self) -> bool:
        return self.forget is not None or self.retain is not None

    def files_problems(self, split: str | None) -> list[str]:
        """Exactly one of a TOFU split and the pair of files; the files exist."""
        found: list[str] = []
        if split is None and not self.on_files:
            found.append("give --split forget01|forget05|forget10 (TOFU), or --forget FILE --retain FILE (your own question-answer files)")
        elif split is not None and self.on_files:
            found.append(f"--split {split} evaluates on TOFU; --forget/--retain on your files: give one or the other")
        if self.on_files:
            for flag, path in (("--forget", self.forget), ("--retain", self.retain)):
                if path is None:
                    found.append(f"{flag} FILE is needed too: the forget file gives the forgetting metrics, the retain file the utility")
                elif not Path(path).is_file():
                    found.append(f"{flag} {path} does not exist; give a .jsonl or .json file of question-answer records")
        if not self.question_key or not self.answer_key:
            found.append("--question-key and --answer-key must not be empty")
        return found


@dataclass(frozen=True, kw_only=True)
class EvalConfig(EvalOptions, QaFilesOptions):
    """What to evaluate and how: the shared `EvalOptions` and `QaFilesOptions`, and these.

    Attributes:
        model: the checkpoint directory (model and tokenizer files).
        split: the TOFU forget split, `forget01`, `forget05` or `forget10` (forget05 needs a TOFU
            directory that holds it; the bundled data has forget01 and forget10); None with
            `forget` and `retain` (one's own files: the metrics that need no retain model).
        out: the JSON record to write; the Markdown table goes next to it (`.md`).
        retain_logs: the JSON record of the retain-only model on the same split (gives forget quality).
        batch_size: samples per forward pass (likelihoods) and per generate call.
        overwrite: replace an existing `out` (and its `.md`); a file inside the evaluated model
            or the TOFU folder is never replaced.
        before: with files, the model before unlearning (a checkpoint, evaluated on the same
            items, or its record of an earlier `eval` on the same files): shown beside this one.
        examples: with files, how many forget and retain questions get their answers side by side.
    """

    model: str = option(help="checkpoint directory (model and tokenizer)")
    split: str | None = option(None, help="TOFU forget split: forget01, forget05 or forget10 (or --forget/--retain: your own files)")
    out: str = option(help="JSON record to write (the Markdown table goes next to it, .md)")
    retain_logs: str | None = option(None, help="the eval JSON of the retain-only model on the same split (gives forget quality)")
    batch_size: int = option(8, help="samples per forward pass and per generate call (default 8)")
    overwrite: bool = option(False, help="replace an existing --out record (never a file inside the model)")
    before: str | None = option(
        None, help="with --forget/--retain: the model before unlearning (a folder, or its eval .json on the same files), shown side by side"
    )
    examples: int = option(3, help="with --forget/--retain: forget and retain questions whose answers are shown side by side (default 3)")

    def __post_init__(self) -> None:
        typos = normalize_inputs(self, "model", "before")
        self.resolve_tofu_dir()
        problems = with_typos(typos, self.problems())
        if problems:
            raise PlanError("invalid eval options", problems)

    def problems(self) -> list[str]:
        """Every problem with these options (empty when they are usable)."""
        problems: list[str] = self.files_problems(self.split)
        if self.split is not None and self.split not in TOFU_SPLITS:
            problems.append(f"--split {self.split!r} is not a TOFU split; choose one of {', '.join(TOFU_SPLITS)}")
        if self.on_files and self.retain_logs is not None:
            problems.append("--retain-logs gives forget quality, which needs TOFU's perturbed answers (--split); on your files no retain model is needed")
        if not self.on_files:
            for flag, given in (("--before", self.before is not None), ("--examples", self.examples != 3)):
                if given:
                    problems.append(f"{flag} applies to an evaluation on your files (--forget/--retain)")
        if self.examples < 0:
            problems.append(f"--examples must be at least 0, got {self.examples}")
        if self.before is not None and not self.before.startswith("hf://") and not Path(self.before).exists():
            problems.append(f"--before {self.before} does not exist; give the model folder before unlearning, or its eval .json")
        if not self.model.startswith("hf://") and not Path(self.model).is_dir():
            problems.append(f"--model {self.model} is not a directory; give a checkpoint folder with config.json and tokenizer files")
        if self.retain_logs is not None:
            if not Path(self.retain_logs).is_file():
                problems.append(f"--retain-logs {self.retain_logs} does not exist; give the JSON that `perta-stream eval` wrote for the retain-only model")
            elif Path(self.retain_logs).resolve() == Path(self.out).resolve():
                problems.append("--out is the --retain-logs file; writing the result would replace that input")
        if not self.out.endswith(".json"):
            problems.append(f"--out {self.out} must end in .json (the Markdown table is written next to it)")
        elif Path(self.out).is_dir():
            problems.append(f"--out {self.out} is a directory; give a .json file path")
        else:
            problems += self._output_problems()
        if self.batch_size < 1:
            problems.append(f"--batch-size must be at least 1, got {self.batch_size}")
        problems += self.eval_option_problems()
        return problems

    @property
    def markdown_path(self) -> Path:
        return Path(self.out).with_suffix(".md")

    def _output_problems(self) -> list[str]:
        """The record and its table never replace an input, nor an existing file without --overwrite."""
        found: list[str] = []
        inputs = {"--model": self.model, "--tofu": self.tofu_dir}
        if self.before is not None and not self.before.endswith(".json"):
            inputs["--before"] = self.before
        for flag, given in (("--forget", self.forget), ("--retain", self.retain), ("--holdout", self.holdout), ("--before", self.before)):
            if given and Path(given).resolve() in (Path(self.out).resolve(), self.markdown_path.resolve()):
                found.append(f"--out {self.out} would replace the {flag} file; write the record elsewhere")
        for path in (Path(self.out), self.markdown_path):
            resolved = path.resolve()
            for flag, folder in inputs.items():
                if folder and resolved.is_relative_to(Path(folder).resolve()):
                    found.append(f"--out {self.out} would write {path} inside the {flag} folder {folder}; write the record elsewhere")
                    break
            else:
                if (path.exists() or path.is_symlink()) and not self.overwrite:
                    found.append(f"{path} already exists; pass --overwrite to replace it, or choose another --out")
        return found

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> "EvalConfig":
        """Build from parsed `perta-stream eval` arguments (and its --config file)."""
        return cls.from_options(options_from_cli(args, cls))

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "EvalConfig":
        """Build from options named as the flags (YAML keys, API keywords); every problem at once."""
        return from_options(cls, options, title="invalid eval options")

    def to_dict(self) -> dict:
        """The resolved options, as saved into the JSON record."""
        return {
            "model": self.model,
            "split": self.split,
            "out": self.out,
            "tofu_dir": self.tofu_dir,
            "retain_logs": self.retain_logs,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "max_new_tokens": self.max_new_tokens,
            "max_items": self.max_items,
            "device": self.device,
            "system_prompt": self.system_prompt,
            "labels": self.labels,
            "holdout": self.holdout,
            "forget": self.forget,
            "retain": self.retain,
            "question_key": self.question_key,
            "answer_key": self.answer_key,
            "before": self.before,
            "examples": self.examples,
        }
