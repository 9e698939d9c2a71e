"""Evaluate a loaded model on MUSE data (sources/muse.py): VerbMem, KnowMem and the PrivLeak AUC.

Every part present in the data is scored; prompts are plain text (MUSE evaluates base models
without a chat template): VerbMem continues the opening of a forget text, KnowMem answers a
few-shot QA prompt, PrivLeak's Min-40% score reads every token of a text but the first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from perta_stream.compute.prompts import IGNORE_INDEX, EncodedSample
from perta_stream.eval import memorization as mem
from perta_stream.eval import muse
from perta_stream.eval.scoring import greedy_continuations, token_scores
from perta_stream.sources.hf_model import LoadedModel
from perta_stream.sources.muse import MuseData

# MUSE's generation budgets: 128 new tokens for a verbatim continuation, 32 for an answer.
VERBMEM_MAX_NEW_TOKENS = 128
KNOWMEM_MAX_NEW_TOKENS = 32


@dataclass(frozen=True)
class MuseScores:
    """The metrics of one model on one MUSE corpus; a part without data is None.

    Attributes:
        verbmem_forget: VerbMem on the forget texts (fraction).
        knowmem: per set ("forget", "retain"), KnowMem (fraction).
        mia_auc: the forget-vs-holdout AUC of the Min-40% score (MUSE's orientation).
        privleak: PrivLeak in percent (needs the retrained model's AUC).
        per_item: the generations and per-item scores, for the record.
    """

    verbmem_forget: float | None
    knowmem: dict[str, float]
    mia_auc: float | None
    privleak: float | None
    per_item: dict[str, dict[str, list]] = field(default_factory=dict)


def score_muse(
    loaded: LoadedModel,
    data: MuseData,
    *,
    reference_auc: float | None = None,
    batch_size: int = 8,
    max_length: int = 2048,
    verbmem_max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS,
    knowmem_max_new_tokens: int = KNOWMEM_MAX_NEW_TOKENS,
) -> MuseScores:
    """Every MUSE metric the data allows; PrivLeak only when `reference_auc` (the retrained model's) is given.

    Raises:
        EvaluationError: a privleak text of a single token (nothing to score), or a reference AUC of 0.
    """
    tokenizer = loaded.tokenizer
    scorer = muse.make_muse_rouge_scorer()
    per_item: dict[str, dict[str, list]] = {}

    verbmem_value = None
    if data.verbmem_forget:
        prompts = [_tokens(tokenizer, item.prompt, max_length) for item in data.verbmem_forget]
        generations = greedy_continuations(loaded, prompts, batch_size=batch_size, max_new_tokens=verbmem_max_new_tokens, desc="muse verbmem")
        references = [_first_tokens(tokenizer, item.continuation, verbmem_max_new_tokens) for item in data.verbmem_forget]
        verbmem_value = muse.verbmem(references, generations, scorer=scorer)
        per_item["verbmem_forget"] = {"generation": generations, "reference": references}

    knowmem_values: dict[str, float] = {}
    for set_name, (questions, examples) in data.knowmem.items():
        shots = [(e.question, e.answer) for e in examples]
        prompts = [_tokens(tokenizer, muse.knowmem_prompt(qa.question, shots), max_length) for qa in questions]
        raw = greedy_continuations(loaded, prompts, batch_size=batch_size, max_new_tokens=knowmem_max_new_tokens, desc=f"muse knowmem {set_name}")
        answers = [muse.first_line(text) for text in raw]
        knowmem_values[set_name] = muse.knowmem([qa.answer for qa in questions], answers, scorer=scorer)
        per_item[f"knowmem_{set_name}"] = {"generation": answers}

    auc = None
    if "forget" in data.privleak and "holdout" in data.privleak:
        min_k = {}
        for set_name in ("forget", "holdout"):
            samples = [_text_sample(tokenizer, text, max_length) for text in data.privleak[set_name]]
            scores = token_scores(loaded, samples, batch_size=batch_size, desc=f"muse privleak {set_name}")
            min_k[set_name] = [mem.min_k_percent_score(s.nll) for s in scores]
            per_item[f"privleak_{set_name}"] = {"min_k_score": min_k[set_name]}
        auc = mem.mia_auc(min_k["forget"], min_k["holdout"])
    return MuseScores(
        verbmem_forget=verbmem_value,
        knowmem=knowmem_values,
        mia_auc=auc,
        privleak=None if auc is None or reference_auc is None else mem.privleak(auc, reference_auc),
        per_item=per_item,
    )


def _tokens(tokenizer, text: str, max_length: int) -> tuple[int, ...]:
    # A prompt longer than the budget keeps its end: that is what the continuation follows.
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    return tuple(ids[max(0, len(ids) - max_length) :])


def _first_tokens(tokenizer, text: str, count: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:count]
    return tokenizer.decode(ids, skip_special_tokens=True)


def _text_sample(tokenizer, text: str, max_length: int) -> EncodedSample:
    # Every token but the first is scored (the first has no context to be predicted from).
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])[:max_length]
    return EncodedSample(input_ids=tuple(ids), labels=(IGNORE_INDEX, *ids[1:]))
