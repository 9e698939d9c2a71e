"""Question-answer data files: JSON Lines or a JSON array of records."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from perta_stream.errors import DatasetError, UsageError


@dataclass(frozen=True)
class QASample:
    """One (question, answer) pair and its position in the file it came from."""

    question: str
    answer: str
    index: int


def load_records(path: str | os.PathLike) -> list[dict]:
    """All records of a `.jsonl` file (one object a line) or a `.json` file holding an array.

    Raises:
        DatasetError: the file is missing, empty, or not records; names the line at fault.
    """
    file_path = Path(path)
    if not file_path.is_file():
        raise DatasetError(f"data file {path} does not exist")
    raw = file_path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_number = raw[: exc.start].count(b"\n") + 1
        raise DatasetError(
            f"data file {path}, line {line_number}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start}); "
            "re-save the file as UTF-8"
        ) from None
    if not text.strip():
        raise DatasetError(f"data file {path} is empty; it needs at least one record")
    stripped = text.lstrip()
    records: list[object]
    if stripped.startswith("["):
        try:
            records = json.loads(stripped)
        except ValueError as exc:
            raise DatasetError(f"data file {path} is not a valid JSON array ({exc})") from None
        except RecursionError:
            raise DatasetError(f"data file {path} nests lists or objects too deeply to be records") from None
    else:
        records = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as exc:
                raise DatasetError(f"data file {path}, line {line_number}: not valid JSON ({exc}); expected one object a line") from None
            except RecursionError:
                raise DatasetError(f"data file {path}, line {line_number}: nests lists or objects too deeply to be a record") from None
    for position, record in enumerate(records):
        if not isinstance(record, dict):
            raise DatasetError(f"data file {path}, record {position}: is a {type(record).__name__}, expected an object")
    return records  # type: ignore[return-value]


def load_qa_samples(path: str | os.PathLike, *, question_key: str = "question", answer_key: str = "answer") -> list[QASample]:
    """The (question, answer) pairs of a data file.

    Raises:
        DatasetError: a record lacks a field or holds a non-string (names the record and the key flags).
    """
    samples = []
    for position, record in enumerate(load_records(path)):
        question, answer = record.get(question_key), record.get(answer_key)
        for key, value in ((question_key, question), (answer_key, answer)):
            if not isinstance(value, str) or not value.strip():
                raise DatasetError(
                    f"data file {path}, record {position}: field {key!r} is missing or not a non-empty string; "
                    "set --question-key/--answer-key to the file's field names"
                )
        samples.append(QASample(question=question, answer=answer, index=position))  # type: ignore[arg-type]
    return samples


def select_fraction(samples: list[QASample], fraction: float, seed: int) -> list[QASample]:
    """A seeded random subset of round(fraction * N) samples (at least one), in file order."""
    if not 0 < fraction <= 1:
        raise UsageError(f"--fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return list(samples)
    count = max(1, round(fraction * len(samples)))
    chosen = sorted(random.Random(seed).sample(range(len(samples)), count))
    return [samples[i] for i in chosen]


