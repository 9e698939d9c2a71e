"""MUSE's metrics (Shi et al. 2024), one small function each, from their definitions.

- VerbMem(f, D) = mean over forget items of ROUGE-L F1(f(prompt), true continuation): how much of
  the forget text the model reproduces verbatim from its opening. The true continuation is cut
  to as many tokens as the model may generate (MUSE's choice: both sides get the same budget).
- KnowMem(f, D) = mean over QA items of ROUGE-L F1(f(few-shot prompt + question), answer): how
  much of the forget (or, for utility, retain) knowledge the model still states.
- PrivLeak: eval/memorization.py (`mia_auc`, `privleak`); MUSE computes it on the Min-40% score
  of the privleak forget and holdout texts.

Values are fractions in [0, 1] (MUSE prints them times 100); PrivLeak is in percent. ROUGE-L is
rouge-score's, without stemming, as MUSE scores it (TOFU's ROUGE-L stems; see metrics.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from perta_stream.errors import EvaluationError

ROUGE_KINDS = ("f1", "recall")


def make_muse_rouge_scorer():
    """rouge-score's ROUGE-L scorer without stemming."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(reference: str, generated: str, *, kind: str = "f1", scorer=None) -> float:
    """ROUGE-L of a generation against a reference: its F1 (MUSE's) or recall.

    Raises:
        EvaluationError: an unknown `kind`.
    """
    if kind not in ROUGE_KINDS:
        raise EvaluationError(f"ROUGE-L kind {kind!r} is not one of {', '.join(ROUGE_KINDS)}")
    score = (scorer or make_muse_rouge_scorer()).score(reference, generated)["rougeL"]
    return float(score.fmeasure if kind == "f1" else score.recall)


def verbmem(continuations: Sequence[str], generations: Sequence[str], *, scorer=None) -> float:
    """VerbMem: the mean ROUGE-L F1 of each generation against the true continuation it should not reproduce.

    Raises:
        EvaluationError: no items, or the two lists differ in length.
    """
    return _mean_rouge(continuations, generations, scorer=scorer, what="VerbMem")


def knowmem(answers: Sequence[str], generations: Sequence[str], *, scorer=None) -> float:
    """KnowMem: the mean ROUGE-L F1 of each generated answer against the reference answer.

    Raises:
        EvaluationError: no items, or the two lists differ in length.
    """
    return _mean_rouge(answers, generations, scorer=scorer, what="KnowMem")


def knowmem_prompt(question: str, examples: Sequence[tuple[str, str]]) -> str:
    """The few-shot prompt of one KnowMem question: each example as a question-answer block, then the question.

    The answer the model gives is read up to its first line break (`first_line`).
    """
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in examples)
    return f"{shots}Question: {question}\nAnswer:"


def first_line(generation: str) -> str:
    """A KnowMem answer ends at the first line break (the model goes on with the next few-shot block)."""
    return generation.strip().split("\n", 1)[0].strip()


def _mean_rouge(references: Sequence[str], generations: Sequence[str], *, scorer, what: str) -> float:
    if len(references) != len(generations):
        raise EvaluationError(f"{what}: {len(generations)} generations for {len(references)} references")
    if not references:
        raise EvaluationError(f"{what}: no items to score; the data file is empty")
    scorer = scorer or make_muse_rouge_scorer()
    return math.fsum(rouge_l(ref, gen, kind="f1", scorer=scorer) for ref, gen in zip(references, generations)) / len(references)
