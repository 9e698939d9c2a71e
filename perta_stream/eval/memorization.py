"""Memorization and membership metrics: extraction strength, Min-K% scores, MIA AUC, PrivLeak.

Each is a small function of per-token values the caller computed (teacher-forced argmax
predictions, token negative log-likelihoods), so it is defined and tested without a model.

- Extraction strength (Carlini et al. 2021; as used by open-unlearning's TOFU evaluation):
  ES(x, y) = 1 - k*/|y|, k* the smallest k such that the model, given x and y[:k], reproduces
  y[k:]. With teacher forcing, "reproduces" means every argmax prediction from position k on
  equals its target: greedy decoding from y[:k] then feeds back exactly the targets, so the two
  are the same event. k* = |y| (nothing reproduced) gives ES = 0; k* = 0 gives ES = 1.
- Min-K% (Shi et al. 2024, "Detecting Pretraining Data"): the mean NLL of the k fraction of a
  text's tokens the model finds least likely (at least one token). Higher means "looks unseen".
- MIA AUC, in MUSE's orientation: the probability that a forget text scores higher (looks more
  unseen) than a holdout text, ties counting half. A model that memorized the forget set scores
  its texts low, so its AUC goes to 0; a model that never saw either set is near 0.5.
- PrivLeak (MUSE): (AUC(model) - AUC(retrained)) / AUC(retrained). Near 0 is ideal; negative
  means the forget set is still recognisable (under-unlearning), positive over-unlearning.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from perta_stream.errors import EvaluationError

# MUSE's PrivLeak uses Min-40%.
DEFAULT_MIN_K_FRACTION = 0.4


def extraction_strength(predictions: Sequence[int], targets: Sequence[int]) -> float:
    """ES of one answer from its teacher-forced argmax predictions and its target tokens.

    Args:
        predictions: the argmax token at each labelled position (the model's guess of the target).
        targets: the labelled target tokens, in order.

    Raises:
        EvaluationError: no targets, or the two lengths differ.
    """
    if len(predictions) != len(targets):
        raise EvaluationError(f"extraction strength: {len(predictions)} predictions for {len(targets)} targets")
    if not targets:
        raise EvaluationError("extraction strength needs at least one target token; the answer is empty")
    # The longest matching suffix, read from the end: k* is where it starts.
    start = len(targets)
    while start > 0 and predictions[start - 1] == targets[start - 1]:
        start -= 1
    return 1.0 - start / len(targets)


def min_k_percent_score(token_nlls: Sequence[float], fraction: float = DEFAULT_MIN_K_FRACTION) -> float:
    """The mean NLL of the `fraction` least likely tokens (the largest NLLs), at least one token.

    The count is floor(fraction * tokens), as Min-K%'s authors and MUSE take it.

    Raises:
        EvaluationError: no tokens, or a fraction outside (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise EvaluationError(f"the Min-K% fraction must be in (0, 1], got {fraction}")
    if not token_nlls:
        raise EvaluationError("a Min-K% score needs at least one token")
    count = max(1, int(len(token_nlls) * fraction))
    return math.fsum(sorted(token_nlls, reverse=True)[:count]) / count


def mia_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """P(forget score > holdout score) + P(equal)/2 over all pairs (MUSE's orientation, see module doc).

    Computed over every pair, so it is exact for any sizes and for ties.

    Raises:
        EvaluationError: either set is empty.
    """
    if not forget_scores or not holdout_scores:
        raise EvaluationError("a membership AUC needs forget and holdout scores; one of the sets is empty")
    ordered = sorted(holdout_scores)
    wins = 0.0
    for score in forget_scores:
        below = bisect.bisect_left(ordered, score)
        equal = bisect.bisect_right(ordered, score) - below
        wins += below + 0.5 * equal
    return wins / (len(forget_scores) * len(ordered))


def privleak(auc: float, reference_auc: float) -> float:
    """PrivLeak in percent: 100 * (AUC - AUC_ref) / AUC_ref, AUC_ref that of the retrained model.

    Raises:
        EvaluationError: the reference AUC is 0 (the ratio is undefined).
    """
    if reference_auc <= 0.0:
        raise EvaluationError(
            f"PrivLeak divides by the retrained model's AUC, which is {reference_auc}; "
            "its forget and holdout scores must not be perfectly separated"
        )
    return 100.0 * (auc - reference_auc) / reference_auc
