"""MUSE benchmark files in MUSE's own layout (the user provides them; nothing is bundled).

MUSE (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language Models") ships
each corpus (`news`, `books`) as a folder:

    <corpus>/verbmem/forget.json          [{"prompt": ..., "gt": ...}, ...]   verbatim memorization
    <corpus>/knowmem/forget_qa.json       [{"question": ..., "answer": ...}]  knowledge memorization
    <corpus>/knowmem/forget_qa_icl.json   the few-shot examples put before each forget question
    <corpus>/knowmem/retain_qa.json       (and retain_qa_icl.json): the same on the retain set
    <corpus>/privleak/forget.json         texts ["...", ...] or [{"text": ...}]; also holdout.json
                                          (and retain.json, not used by PrivLeak)

Each file may also be JSON Lines (`.jsonl`, one record a line). A part whose files are absent is
skipped, so a folder holding only `verbmem/` evaluates VerbMem alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from perta_stream.errors import DatasetError


@dataclass(frozen=True)
class MuseQA:
    """One knowledge-memorization question and its reference answer."""

    question: str
    answer: str


@dataclass(frozen=True)
class MuseVerbatim:
    """One verbatim-memorization item: the opening of a forget text and its true continuation."""

    prompt: str
    continuation: str


@dataclass(frozen=True)
class MuseData:
    """What a MUSE corpus folder holds; a part that is absent is an empty tuple.

    Attributes:
        root: the corpus folder.
        verbmem_forget: VerbMem items.
        knowmem: per set ("forget", "retain"), the questions and the few-shot examples.
        privleak: per set ("forget", "holdout", "retain"), the texts.
    """

    root: Path
    verbmem_forget: tuple[MuseVerbatim, ...]
    knowmem: dict[str, tuple[tuple[MuseQA, ...], tuple[MuseQA, ...]]]
    privleak: dict[str, tuple[str, ...]]


def load_muse_dir(root: str | os.PathLike) -> MuseData:
    """Read every MUSE part present under `root` (see the module docstring for the layout).

    Raises:
        DatasetError: `root` is not a folder, holds none of the parts, or a file is malformed
            (names the file and the record).
    """
    directory = Path(root)
    if not directory.is_dir():
        raise DatasetError(f"MUSE data folder {root} does not exist; give the corpus folder (e.g. data/news) holding verbmem/, knowmem/, privleak/")
    verbmem_file = _find(directory / "verbmem", "forget")
    verbmem = tuple(
        MuseVerbatim(prompt=_text(r, "prompt", verbmem_file, i), continuation=_text(r, "gt", verbmem_file, i))
        for i, r in enumerate(_records(verbmem_file))
    ) if verbmem_file else ()
    knowmem: dict[str, tuple[tuple[MuseQA, ...], tuple[MuseQA, ...]]] = {}
    for set_name in ("forget", "retain"):
        qa_file = _find(directory / "knowmem", f"{set_name}_qa")
        if qa_file is None:
            continue
        icl_file = _find(directory / "knowmem", f"{set_name}_qa_icl")
        knowmem[set_name] = (_qa(qa_file), _qa(icl_file) if icl_file else ())
    privleak: dict[str, tuple[str, ...]] = {}
    for set_name in ("forget", "holdout", "retain"):
        text_file = _find(directory / "privleak", set_name)
        if text_file is not None:
            privleak[set_name] = tuple(_plain_text(r, text_file, i) for i, r in enumerate(_records(text_file)))
    if not verbmem and not knowmem and not privleak:
        raise DatasetError(
            f"MUSE data folder {root} holds none of verbmem/forget.json, knowmem/forget_qa.json, privleak/forget.json; "
            "give a corpus folder in MUSE's layout (see docs/guides/reproduce-paper.md, 'MUSE')"
        )
    return MuseData(root=directory, verbmem_forget=verbmem, knowmem=knowmem, privleak=privleak)


def _find(folder: Path, stem: str) -> Path | None:
    for suffix in (".json", ".jsonl"):
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _records(path: Path) -> list[object]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_number = raw[: exc.start].count(b"\n") + 1
        raise DatasetError(
            f"MUSE file {path}, line {line_number}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start}); re-save it as UTF-8"
        ) from None
    if not text.strip():
        raise DatasetError(f"MUSE file {path} is empty")
    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as exc:
        raise DatasetError(f"MUSE file {path} is not valid JSON or JSON Lines ({exc})") from None
    except RecursionError:
        raise DatasetError(f"MUSE file {path} nests lists or objects too deeply to be MUSE records") from None
    if not records:
        raise DatasetError(f"MUSE file {path} holds no records")
    return records


def _text(record: object, key: str, path: Path, index: int) -> str:
    value = record.get(key) if isinstance(record, dict) else None
    if not isinstance(value, str) or not value:
        raise DatasetError(f"MUSE file {path}, record {index}: needs a non-empty string field {key!r}")
    return value


def _plain_text(record: object, path: Path, index: int) -> str:
    if isinstance(record, str) and record:
        return record
    return _text(record, "text", path, index)


def _qa(path: Path) -> tuple[MuseQA, ...]:
    return tuple(MuseQA(question=_text(r, "question", path, i), answer=_text(r, "answer", path, i)) for i, r in enumerate(_records(path)))
