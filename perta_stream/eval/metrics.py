"""The TOFU metrics, one small function each, exactly as data/tofu/README.md defines them.

Inputs are answer losses L (mean token NLL over the answer tokens, METHOD.md section 2), so
P~ = exp(-L). Working with losses keeps the truth ratio's geometric mean exact and stable:
GeoMean_j exp(-L_j) = exp(-mean_j L_j), hence TR = exp(L_correct - mean_j L_j).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence

from perta_stream.errors import EvaluationError

logger = logging.getLogger(__name__)


def answer_probability(loss: float) -> float:
    """P~ = exp(-L): the per-token geometric-mean probability of an answer."""
    return math.exp(-loss)


def truth_ratio(correct_loss: float, perturbed_losses: Sequence[float]) -> float:
    """TR = GeoMean_j P~(perturbed_j) / P~(correct) for one item.

    Raises:
        EvaluationError: no perturbed answers.
    """
    if not perturbed_losses:
        raise EvaluationError("a truth ratio needs at least one perturbed answer")
    mean_perturbed_loss = math.fsum(perturbed_losses) / len(perturbed_losses)
    log_ratio = correct_loss - mean_perturbed_loss
    # exp() overflows past ~709; such a ratio is infinite for every purpose of the metrics.
    return math.inf if log_ratio > 709.0 else math.exp(log_ratio)


def forget_truth_ratio_score(truth_ratios: Sequence[float]) -> float:
    """The forget set's truth-ratio metric: mean over items of min(TR, 1/TR) (1 = indistinguishable)."""
    _require_values(truth_ratios, "forget truth ratios")
    return math.fsum(min(tr, 1.0 / tr) if tr > 0 else 0.0 for tr in truth_ratios) / len(truth_ratios)


def utility_truth_ratio_score(truth_ratios: Sequence[float]) -> float:
    """The truth-ratio metric of the retain, real-author and world-fact sets: mean of max(0, 1 - TR)."""
    _require_values(truth_ratios, "truth ratios")
    return math.fsum(max(0.0, 1.0 - tr) for tr in truth_ratios) / len(truth_ratios)


def normalized_probability(answer_loss: float, perturbed_losses: Sequence[float]) -> float:
    """P~(a) / (P~(a) + sum_j P~(perturbed_j)): the real-author and world-fact probability.

    Computed as a softmax over the negated losses, shifted by the smallest loss, so that
    probabilities that underflow exp() on their own still give the right ratio.
    """
    losses = [answer_loss, *perturbed_losses]
    smallest = min(losses)
    weights = [math.exp(smallest - loss) for loss in losses]
    return weights[0] / math.fsum(weights)


def mean(values: Sequence[float]) -> float:
    """The arithmetic mean (the per-set aggregation of probability and ROUGE-L)."""
    _require_values(values, "values")
    return math.fsum(values) / len(values)


def forget_quality(unlearned_truth_ratios: Sequence[float], retain_truth_ratios: Sequence[float]) -> float:
    """The p-value of the two-sample Kolmogorov-Smirnov test between per-item forget-set truth ratios.

    High (close to 1) means the unlearned model's truth ratios are distributed like those of the
    retain-only model; scipy's default ("auto": exact for small samples) is used, as in TOFU.
    """
    from scipy.stats import ks_2samp

    _require_values(unlearned_truth_ratios, "truth ratios of the evaluated model")
    _require_values(retain_truth_ratios, "truth ratios of the retain model")
    with warnings.catch_warnings(record=True) as caught:
        # scipy falls back to the asymptotic p-value where its exact recursion fails (it warns,
        # e.g. for D = 1/n with equal sizes, where p = 1); the library reports that as a log line.
        warnings.simplefilter("always", RuntimeWarning)
        pvalue = float(ks_2samp(list(unlearned_truth_ratios), list(retain_truth_ratios)).pvalue)
    for warning in caught:
        logger.info("forget quality: %s", warning.message)
    return pvalue


def harmonic_mean(values: Sequence[float]) -> float:
    """The harmonic mean of non-negative numbers; any zero gives 0 (model utility's definition).

    Raises:
        EvaluationError: no values, or a negative value.
    """
    _require_values(values, "values")
    if any(value < 0 for value in values):
        raise EvaluationError(f"the harmonic mean is defined for non-negative numbers, got {list(values)}")
    if any(value == 0 for value in values):
        return 0.0
    return len(values) / math.fsum(1.0 / value for value in values)


def rouge_l_recall(reference: str, generated: str, *, scorer=None) -> float:
    """ROUGE-L recall of a generation against the reference answer (rouge-score, Porter stemming).

    Args:
        reference: the ground-truth answer (the recall's denominator).
        generated: the model's greedy generation.
        scorer: a reusable `rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)`; made when None.
    """
    if scorer is None:
        scorer = make_rouge_scorer()
    return float(scorer.score(reference, generated)["rougeL"].recall)


def make_rouge_scorer():
    """The ROUGE-L scorer TOFU uses: rouge-score's RougeScorer with stemming."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _require_values(values: Sequence[float], what: str) -> None:
    if len(values) == 0:
        raise EvaluationError(f"no {what} to aggregate; the evaluation set is empty")
