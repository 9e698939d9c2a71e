"""Evaluate a loaded model on the four TOFU sets: per-item values, then the per-set metrics.

Per item (data/tofu/README.md): the loss of the answer, of the truth ratio's correct answer and
of each perturbed answer; the probability (P~ on forget and retain, normalized against the
perturbed answers on real authors and world facts); the truth ratio; the ROUGE-L recall of the
greedy generation against the answer. On the forget set also the extraction strength and the
Min-K% membership score of each answer (eval/memorization.py), and the Min-K% score of each
holdout answer when a holdout set is given. Per set: the means the README defines. Forget quality,
model utility, the membership AUC and PrivLeak combine sets (and another model's record) and are
computed by `summarize_metrics`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from collections.abc import Sequence

from perta_stream.compute.prompts import EncodedSample, LabelConvention, encode_sample
from perta_stream.eval import memorization as mem
from perta_stream.eval import metrics as m
from perta_stream.eval.report import UTILITY_KEYS
from perta_stream.eval.scoring import answer_losses, greedy_generations, token_scores
from perta_stream.sources.hf_model import LoadedModel
from perta_stream.sources.tofu import TofuSet

logger = logging.getLogger(__name__)

# Sets whose probability is normalized against the perturbed answers (the README's definition).
_NORMALIZED_PROBABILITY_SETS = frozenset({"real_authors", "world_facts"})


@dataclass(frozen=True)
class SetScores:
    """Per-item values of one evaluation set, in item order, and its three aggregated metrics."""

    name: str
    answer_loss: tuple[float, ...]
    correct_loss: tuple[float, ...]
    perturbed_loss: tuple[tuple[float, ...], ...]
    probability: tuple[float, ...]
    truth_ratio: tuple[float, ...]
    rouge_l_recall: tuple[float, ...]
    generation: tuple[str, ...]
    probability_metric: float
    truth_ratio_metric: float
    rouge_l_metric: float
    extraction_strength: tuple[float, ...] = ()
    min_k_score: tuple[float, ...] = ()

    def per_item(self) -> dict[str, list]:
        """The JSON form of the per-item values."""
        return {
            "answer_loss": list(self.answer_loss),
            "correct_loss": list(self.correct_loss),
            "perturbed_loss": [list(row) for row in self.perturbed_loss],
            "probability": list(self.probability),
            "truth_ratio": list(self.truth_ratio),
            "rouge_l_recall": list(self.rouge_l_recall),
            "generation": list(self.generation),
            **({"extraction_strength": list(self.extraction_strength)} if self.extraction_strength else {}),
            **({"min_k_score": list(self.min_k_score)} if self.min_k_score else {}),
        }


def score_set(
    loaded: LoadedModel,
    tofu_set: TofuSet,
    *,
    batch_size: int,
    max_length: int,
    max_new_tokens: int,
    system_prompt: str | None = None,
    labels: LabelConvention = LabelConvention.OPEN_UNLEARNING,
) -> SetScores:
    """Every per-item value and the three metrics of one set (on the forget set also the
    extraction strength and Min-K% score of each answer).

    Raises:
        DatasetError: an answer does not fit in `max_length` tokens.
    """
    items = tofu_set.items
    options = {"batch_size": batch_size, "max_length": max_length, "system_prompt": system_prompt}
    # One scoring call for every answer of the set: length-sorted batches then mix answers,
    # paraphrases and perturbations, so fewer forward passes run on short, padded batches.
    separate_correct = any(it.correct_answer != it.answer for it in items)
    pairs = [(it.question, it.answer) for it in items]
    if separate_correct:
        pairs += [(it.question, it.correct_answer) for it in items]
    pairs += [(it.question, wrong) for it in items for wrong in it.perturbed_answers]
    losses = answer_losses(loaded, pairs, desc=f"{tofu_set.name}: likelihoods", labels=labels, **options)
    answer_loss = losses[: len(items)]
    correct_loss = losses[len(items) : 2 * len(items)] if separate_correct else list(answer_loss)
    position = 2 * len(items) if separate_correct else len(items)
    perturbed_loss: list[tuple[float, ...]] = []
    for it in items:
        perturbed_loss.append(tuple(losses[position : position + len(it.perturbed_answers)]))
        position += len(it.perturbed_answers)
    generation = greedy_generations(
        loaded,
        [it.question for it in items],
        max_new_tokens=max_new_tokens,
        desc=f"{tofu_set.name}: generation",
        **options,
    )

    if tofu_set.name in _NORMALIZED_PROBABILITY_SETS:
        probability = [m.normalized_probability(a, p) for a, p in zip(answer_loss, perturbed_loss)]
    else:
        probability = [m.answer_probability(a) for a in answer_loss]
    truth_ratio = [m.truth_ratio(c, p) for c, p in zip(correct_loss, perturbed_loss)]
    scorer = m.make_rouge_scorer()
    rouge = [m.rouge_l_recall(it.answer, text, scorer=scorer) for it, text in zip(items, generation)]
    aggregate_tr = m.forget_truth_ratio_score if tofu_set.name == "forget" else m.utility_truth_ratio_score
    extraction: list[float] = []
    min_k: list[float] = []
    if tofu_set.name == "forget":
        answers = [(it.question, it.answer) for it in items]
        extraction, min_k = memorization_scores(loaded, answers, desc="forget: memorization", labels=labels, **options)
    return SetScores(
        name=tofu_set.name,
        answer_loss=tuple(answer_loss),
        correct_loss=tuple(correct_loss),
        perturbed_loss=tuple(perturbed_loss),
        probability=tuple(probability),
        truth_ratio=tuple(truth_ratio),
        rouge_l_recall=tuple(rouge),
        generation=tuple(generation),
        probability_metric=m.mean(probability),
        truth_ratio_metric=aggregate_tr(truth_ratio),
        rouge_l_metric=m.mean(rouge),
        extraction_strength=tuple(extraction),
        min_k_score=tuple(min_k),
    )


def memorization_scores(
    loaded: LoadedModel,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int,
    max_length: int,
    system_prompt: str | None = None,
    labels: LabelConvention = LabelConvention.OPEN_UNLEARNING,
    desc: str = "memorization",
) -> tuple[list[float], list[float]]:
    """The extraction strength and the Min-K% score (k = 40%) of each answer, in input order.

    Raises:
        DatasetError: an answer does not fit in `max_length` tokens.
    """
    encoded: list[EncodedSample] = [
        encode_sample(loaded.tokenizer, q, a, max_length=max_length, system_prompt=system_prompt, labels=labels, where=f"{desc}, pair {i}")
        for i, (q, a) in enumerate(pairs)
    ]
    scores = token_scores(loaded, encoded, batch_size=batch_size, desc=desc)
    extraction = [mem.extraction_strength(s.predicted, s.targets) for s in scores]
    min_k = [mem.min_k_percent_score(s.nll) for s in scores]
    return extraction, min_k


def summarize_metrics(
    scores: dict[str, SetScores],
    retain_forget_truth_ratios: tuple[float, ...] | None,
    *,
    holdout_min_k: Sequence[float] | None = None,
    reference_auc: float | None = None,
) -> dict[str, float | None]:
    """All metrics: the forget-set ones, the 9 utility numbers, model utility, forget quality,
    the forget-vs-holdout membership AUC and PrivLeak.

    Forget quality is None when no retain model's truth ratios are given: it is a comparison
    with that model and cannot be computed from this model alone. The AUC is None without holdout
    scores, PrivLeak without the AUC of the retain model (`reference_auc`).
    """
    values: dict[str, float | None] = {}
    for set_name, set_scores in scores.items():
        values[f"{set_name}_probability"] = set_scores.probability_metric
        values[f"{set_name}_rouge_l"] = set_scores.rouge_l_metric
        values[f"{set_name}_truth_ratio"] = set_scores.truth_ratio_metric
    utility_parts = [values[key] for key in UTILITY_KEYS]
    values["model_utility"] = m.harmonic_mean(utility_parts)  # type: ignore[arg-type]
    values["forget_quality"] = (
        None if retain_forget_truth_ratios is None else m.forget_quality(scores["forget"].truth_ratio, retain_forget_truth_ratios)
    )
    forget = scores["forget"]
    values["forget_extraction_strength"] = m.mean(forget.extraction_strength) if forget.extraction_strength else None
    auc = mem.mia_auc(forget.min_k_score, holdout_min_k) if holdout_min_k and forget.min_k_score else None
    values["mia_min_k_auc"] = auc
    values["privleak"] = None
    if auc is not None and reference_auc is not None:
        if reference_auc > 0.0:
            values["privleak"] = mem.privleak(auc, reference_auc)
        else:
            # PrivLeak is relative to the retain model's AUC; at 0 (its forget and holdout scores
            # fully separated, likely with few items) it is undefined, not an error of this model.
            logger.warning("PrivLeak not computed: the retain model's membership AUC is 0 (forget and holdout fully separated)")
    return values
