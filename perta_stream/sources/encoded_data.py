"""The data files of a statistics run, read and encoded: the tokenizer, the chosen samples, their token ids.

`stats` and the one-pass unlearn encode their forget and retain files with exactly these
functions, so the two see the same samples (the fraction), the same prompts and the same labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from perta_stream.errors import CheckpointError
from perta_stream.hashing import file_sha256
from perta_stream.sources.qa_dataset import load_qa_samples, select_fraction

if TYPE_CHECKING:
    from perta_stream.compute.prompts import EncodedSample
    from perta_stream.config.stats import StatsConfig

DATASETS = ("forget", "retain")
# Characters per token when a plan has no tokenizer (--config-only): typical of English BPE.
_CHARS_PER_TOKEN = 4
_TEMPLATE_TOKENS = 16


@dataclass(frozen=True)
class DatasetInfo:
    """One data file as the run used it (the `datasets` entries of perta_stats.json)."""

    path: str
    sha256: str
    num_records: int
    num_samples: int
    num_tokens: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "num_records": self.num_records, "num_samples": self.num_samples, "num_tokens": self.num_tokens}


def load_tokenizer(location: str) -> Any:
    """The tokenizer saved with a model (a folder or an `hf://` location, best pinned to the commit
    its weights are read at), never running its code.

    Raises:
        CheckpointError: no tokenizer there.
    """
    from transformers import AutoTokenizer

    from perta_stream.sources.input_location import is_hub_location

    try:
        if is_hub_location(location):
            from perta_stream.sources.hub_http import parse_hub_location

            # `hf://org/name@rev/folder`: the revision and the folder are two arguments, not one.
            hub = parse_hub_location(location)
            return AutoTokenizer.from_pretrained(hub.repo_id, revision=hub.revision, subfolder=hub.path_in_repo, trust_remote_code=False)
        # trust_remote_code=False: Python files of a model folder never run, whatever stdin says.
        return AutoTokenizer.from_pretrained(location, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{location}: no usable tokenizer ({exc}); save the tokenizer next to the weights (tokenizer.save_pretrained)") from None


def encode_dataset(config: StatsConfig, path: str, tokenizer: Any) -> tuple[DatasetInfo, list[EncodedSample]]:
    """The seeded fraction of a data file, encoded for the answer-only loss (METHOD.md section 2).

    Raises:
        DatasetError: a missing, empty or malformed file, or an answer longer than max_length.
    """
    from perta_stream.compute.prompts import encode_sample

    samples = load_qa_samples(path, question_key=config.question_key, answer_key=config.answer_key)
    chosen = select_fraction(samples, config.fraction, config.seed)
    encoded = [
        encode_sample(tokenizer, s.question, s.answer, max_length=config.max_length, system_prompt=config.system_prompt, where=f"{path}, record {s.index}")
        for s in chosen
    ]
    info = DatasetInfo(path=str(path), sha256=file_sha256(path), num_records=len(samples), num_samples=len(chosen), num_tokens=sum(len(e.input_ids) for e in encoded))
    return info, encoded


def encode_datasets(config: StatsConfig, tokenizer: Any) -> dict[str, tuple[DatasetInfo, list[EncodedSample]]]:
    """Both data files of a statistics run (forget, retain), encoded as `encode_dataset` does."""
    return {name: encode_dataset(config, getattr(config, name), tokenizer) for name in DATASETS}


def estimated_lengths(config: StatsConfig, path: str) -> list[int]:
    """Token counts of the chosen samples without a tokenizer (a config-only plan): from characters."""
    chosen = select_fraction(load_qa_samples(path, question_key=config.question_key, answer_key=config.answer_key), config.fraction, config.seed)
    extra = len(config.system_prompt or "")
    return [min(config.max_length, math.ceil((len(s.question) + len(s.answer) + extra) / _CHARS_PER_TOKEN) + _TEMPLATE_TOKENS) for s in chosen]


def pad_token_id(tokenizer: Any) -> int:
    """The id padding is filled with: any works (padding is masked everywhere); the tokenizer's own first."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(candidate, int):
            return candidate
    return 0
