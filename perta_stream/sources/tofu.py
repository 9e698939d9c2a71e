"""The TOFU benchmark files: the bundled copy, and validated loading of the evaluation sets.

An evaluation needs four sets (see data/tofu/README.md): the forget split's perturbed file, the
retain perturbed file, and the real-author and world-fact files. Each item holds a question, the
answer, the answer the truth ratio treats as correct (the paraphrased answer on forget and retain,
the answer itself on real authors and world facts), and the perturbed (wrong) answers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from perta_stream.errors import DatasetError, EvaluationError
from perta_stream.hashing import file_sha256
from perta_stream.sources.qa_dataset import load_records

# The evaluation sets in the order they are reported, with the file each is read from. The
# forget set's file depends on the split ("forget01" -> forget01_perturbed.jsonl).
EVAL_SET_NAMES = ("forget", "retain", "real_authors", "world_facts")
_FIXED_FILES = {
    "retain": "retain_perturbed.jsonl",
    "real_authors": "real_authors_perturbed.jsonl",
    "world_facts": "world_facts_perturbed.jsonl",
}
# Sets whose truth ratio compares against the paraphrased answer (TOFU's definition); the others
# compare against the answer itself.
_PARAPHRASED_SETS = frozenset({"forget", "retain"})
_SPLIT_FILE = re.compile(r"^(forget\d+)_perturbed\.jsonl$")


@dataclass(frozen=True)
class TofuItem:
    """One evaluation item.

    Attributes:
        question: the question asked.
        answer: the reference answer (probability and ROUGE-L are measured against it).
        correct_answer: the truth ratio's denominator answer (paraphrased or the answer itself).
        perturbed_answers: the wrong answers of the truth ratio's numerator.
    """

    question: str
    answer: str
    correct_answer: str
    perturbed_answers: tuple[str, ...]


@dataclass(frozen=True)
class TofuSet:
    """One evaluation set as loaded: its name, source file (and hash) and items."""

    name: str
    path: Path
    sha256: str
    items: tuple[TofuItem, ...]


def bundled_tofu_dir() -> Path:
    """The TOFU subset shipped inside the package (forget01, forget10, retain, real authors, world facts)."""
    return Path(__file__).resolve().parent.parent / "data" / "tofu"


def available_splits(tofu_dir: str | os.PathLike) -> list[str]:
    """The forget splits a TOFU directory can evaluate (those with a `forgetNN_perturbed.jsonl`)."""
    names = os.listdir(tofu_dir) if Path(tofu_dir).is_dir() else []
    return sorted(match.group(1) for match in map(_SPLIT_FILE.match, names) if match)


def eval_set_files(tofu_dir: str | os.PathLike, split: str) -> dict[str, Path]:
    """The file of each evaluation set for `split`, checked to exist.

    Raises:
        EvaluationError: the directory does not exist, the split has no file there (lists the
            splits that do), or one of the other files is missing (names it).
    """
    directory = Path(tofu_dir)
    if not directory.is_dir():
        raise EvaluationError(f"TOFU directory {directory} does not exist; pass --tofu with the folder holding the TOFU .jsonl files")
    forget_file = directory / f"{split}_perturbed.jsonl"
    if not forget_file.is_file():
        found = available_splits(directory)
        listed = ", ".join(found) if found else "none (no forgetNN_perturbed.jsonl file)"
        raise EvaluationError(f"split {split!r} has no file {forget_file.name} in {directory}; splits found there: {listed}")
    files = {"forget": forget_file}
    for set_name, file_name in _FIXED_FILES.items():
        path = directory / file_name
        if not path.is_file():
            raise EvaluationError(f"TOFU directory {directory} lacks {file_name} (the {set_name} evaluation set); copy it from the TOFU dataset")
        files[set_name] = path
    return files


def load_eval_sets(tofu_dir: str | os.PathLike, split: str, *, max_items: int | None = None) -> dict[str, TofuSet]:
    """The four evaluation sets of `split`, in EVAL_SET_NAMES order, optionally cut to the first `max_items`.

    Raises:
        EvaluationError: a file or split is missing (see eval_set_files).
        DatasetError: a record lacks a field the metrics need (names file, record and field).
    """
    sets = {}
    for set_name, path in eval_set_files(tofu_dir, split).items():
        records = load_records(path)
        if max_items is not None:
            records = records[:max_items]
        items = tuple(_parse_item(record, set_name, path, position) for position, record in enumerate(records))
        sets[set_name] = TofuSet(name=set_name, path=path, sha256=file_sha256(path), items=items)
    return sets


def _parse_item(record: dict, set_name: str, path: Path, position: int) -> TofuItem:
    where = f"TOFU file {path}, record {position}"
    question = _text_field(record, "question", where)
    answer = _text_field(record, "answer", where)
    correct = _text_field(record, "paraphrased_answer", where) if set_name in _PARAPHRASED_SETS else answer
    perturbed = record.get("perturbed_answer")
    if isinstance(perturbed, str):
        perturbed = [perturbed]
    if not isinstance(perturbed, list) or not perturbed or not all(isinstance(p, str) and p.strip() for p in perturbed):
        raise DatasetError(f"{where}: field 'perturbed_answer' must be a non-empty list of non-empty strings")
    return TofuItem(question=question, answer=answer, correct_answer=correct, perturbed_answers=tuple(perturbed))


def _text_field(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: field {key!r} is missing or not a non-empty string; is this a TOFU *_perturbed.jsonl file?")
    return value


def tofu_file(tofu_dir: str | os.PathLike, file_name: str) -> Path:
    """A training file of a TOFU directory (e.g. `forget01.jsonl`, `retain90.jsonl`), checked to exist.

    Raises:
        EvaluationError: the file is not there (lists the .jsonl files that are).
    """
    path = Path(tofu_dir) / file_name
    if not path.is_file():
        present = sorted(p.name for p in Path(tofu_dir).glob("*.jsonl")) if Path(tofu_dir).is_dir() else []
        raise EvaluationError(f"TOFU directory {tofu_dir} lacks {file_name}; files found there: {', '.join(present) or 'none'}")
    return path
