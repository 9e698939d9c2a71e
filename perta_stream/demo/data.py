"""The demo's data files, cut from the TOFU subset bundled in `perta_stream/data/tofu/`.

- `pretrain.jsonl` (θ_0's training text): the real-author and world-fact questions and answers.
  They are about real people and general knowledge, never about TOFU's fictitious authors, so θ_0
  knows nothing of the forget set (as a pretrained LLM knows nothing of TOFU's invented authors),
  and they are exactly the knowledge TOFU's model utility checks survives unlearning (its
  real-author and world-fact sets), as pretraining knowledge does for a real model.
- `forget.jsonl`: the TOFU forget split (e.g. forget01: 2 authors, 40 questions).
- `retain.jsonl`: the first `retain_count` records of retain90, which are also the first records
  of TOFU's `retain_perturbed` evaluation set, so the retain items the evaluation scores are ones
  θ_full and θ_ret were trained on.
- `full.jsonl`: forget + retain, θ_full's training data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from perta_stream.errors import UsageError
from perta_stream.sources.qa_dataset import load_records

PRETRAIN_FILES = ("real_authors_perturbed.jsonl", "world_facts_perturbed.jsonl")
RETAIN_FILE = "retain90.jsonl"


@dataclass(frozen=True)
class DemoDataFiles:
    """The paths of the demo's training files."""

    pretrain: Path
    forget: Path
    retain: Path
    full: Path


def write_demo_data(tofu_dir: str | os.PathLike, split: str, retain_count: int, out: str | os.PathLike) -> DemoDataFiles:
    """Write the four training files into `out` (question and answer fields only).

    Raises:
        UsageError: retain_count is not in [1, len(retain90)].
        EvaluationError, DatasetError: a bundled file is missing or malformed.
    """
    from perta_stream.sources.tofu import tofu_file

    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    pretrain = [record for name in PRETRAIN_FILES for record in load_records(tofu_file(tofu_dir, name))]
    forget = load_records(tofu_file(tofu_dir, f"{split}.jsonl"))
    retain_all = load_records(tofu_file(tofu_dir, RETAIN_FILE))
    if not 1 <= retain_count <= len(retain_all):
        raise UsageError(f"the demo's retain_count must be within [1, {len(retain_all)}], got {retain_count}")
    retain = retain_all[:retain_count]
    files = DemoDataFiles(
        pretrain=directory / "pretrain.jsonl",
        forget=directory / "forget.jsonl",
        retain=directory / "retain.jsonl",
        full=directory / "full.jsonl",
    )
    for path, records in ((files.pretrain, pretrain), (files.forget, forget), (files.retain, retain), (files.full, forget + retain)):
        _write_jsonl(path, records)
    return files


def tokenizer_corpus(tofu_dir: str | os.PathLike) -> Iterator[str]:
    """Every string of every bundled TOFU file, in a fixed order (the tokenizer's training text).

    The tokenizer sees the evaluation text too (paraphrased and perturbed answers) so that no
    evaluated string falls back to rare byte tokens; a tokenizer is not knowledge of the authors.
    """
    for path in sorted(Path(tofu_dir).glob("*.jsonl")):
        for record in load_records(path):
            for value in record.values():
                if isinstance(value, str):
                    yield value
                elif isinstance(value, list):
                    yield from (item for item in value if isinstance(item, str))


def _write_jsonl(path: Path, records: list[dict]) -> None:
    lines = [json.dumps({"question": record["question"], "answer": record["answer"]}, ensure_ascii=False) for record in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
