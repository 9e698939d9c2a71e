"""Each TOFU metric on a case computed by hand."""

from __future__ import annotations

import math

import pytest

from perta_stream.errors import EvaluationError
from perta_stream.eval import metrics as m


def test_answer_probability_is_exp_of_minus_mean_token_nll():
    # Answer tokens with probabilities 0.5 and 0.125: mean NLL = (ln 2 + ln 8) / 2 = 2 ln 2,
    # so P~ = the geometric mean of the token probabilities = sqrt(0.5 * 0.125) = 0.25.
    loss = (math.log(2) + math.log(8)) / 2
    assert m.answer_probability(loss) == pytest.approx(0.25, rel=1e-12)


def test_truth_ratio_is_geometric_mean_of_perturbed_over_correct():
    # P~(correct) = 0.5, P~(perturbed) = 0.1 and 0.4: GeoMean = sqrt(0.04) = 0.2, TR = 0.2 / 0.5 = 0.4.
    correct_loss = -math.log(0.5)
    perturbed_losses = [-math.log(0.1), -math.log(0.4)]
    assert m.truth_ratio(correct_loss, perturbed_losses) == pytest.approx(0.4, rel=1e-12)


def test_truth_ratio_of_equal_likelihoods_is_one_and_needs_perturbed_answers():
    assert m.truth_ratio(1.7, [1.7, 1.7, 1.7]) == pytest.approx(1.0)
    with pytest.raises(EvaluationError, match="perturbed"):
        m.truth_ratio(1.0, [])


def test_forget_truth_ratio_score_is_mean_of_min_tr_and_inverse():
    # min(0.5, 2) = 0.5, min(2, 0.5) = 0.5, min(1, 1) = 1 -> mean 2/3.
    assert m.forget_truth_ratio_score([0.5, 2.0, 1.0]) == pytest.approx(2 / 3, rel=1e-12)


def test_utility_truth_ratio_score_clips_at_zero():
    # 1 - 0.25 = 0.75, 1 - 1.5 -> 0 (clipped), 1 - 0.5 = 0.5 -> mean 1.25 / 3.
    assert m.utility_truth_ratio_score([0.25, 1.5, 0.5]) == pytest.approx(1.25 / 3, rel=1e-12)


def test_normalized_probability_against_perturbed_options():
    # P~(a) = 0.5, perturbed 0.25 and 0.25: 0.5 / (0.5 + 0.5) = 0.5.
    assert m.normalized_probability(-math.log(0.5), [-math.log(0.25), -math.log(0.25)]) == pytest.approx(0.5, rel=1e-12)
    # P~(a) = 0.6, perturbed 0.1, 0.1, 0.2: 0.6 / 1.0.
    losses = [-math.log(p) for p in (0.1, 0.1, 0.2)]
    assert m.normalized_probability(-math.log(0.6), losses) == pytest.approx(0.6, rel=1e-12)


def test_normalized_probability_survives_probabilities_that_underflow():
    # exp(-1000) is 0.0 in float64, but the ratio is well defined: P~(a) = 3 P~(b) -> 3/4.
    assert math.exp(-1000.0) == 0.0
    assert m.normalized_probability(1000.0, [1000.0 + math.log(3.0)]) == pytest.approx(0.75, rel=1e-12)


def test_forget_quality_ks_pvalue_of_fully_separated_samples():
    # Two samples of 4 with every value of one below every value of the other: D = 1. Under the
    # null, each of the C(8, 4) = 70 orderings is equally likely and exactly 2 of them reach
    # D = 1 (all of x first or all of y first), so the exact two-sided p-value is 2/70.
    assert m.forget_quality([1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]) == pytest.approx(2 / 70, rel=1e-9)


def test_forget_quality_of_identical_samples_is_one():
    values = [0.3, 0.9, 1.4, 2.2, 0.7]
    assert m.forget_quality(values, list(values)) == pytest.approx(1.0)


def test_harmonic_mean_hand_computed_and_with_a_zero():
    # 3 / (1/1 + 1/0.5 + 1/0.25) = 3 / 7.
    assert m.harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / 7, rel=1e-12)
    assert m.harmonic_mean([0.9, 0.0, 0.8]) == 0.0


def test_harmonic_mean_rejects_negative_and_empty_input():
    with pytest.raises(EvaluationError, match="non-negative"):
        m.harmonic_mean([0.5, -0.1])
    with pytest.raises(EvaluationError, match="empty"):
        m.harmonic_mean([])


def test_rouge_l_recall_is_lcs_over_reference_length():
    # Reference tokens: the cat sat on the mat (6); LCS with "the cat was on a mat" is
    # "the cat on mat" (4 tokens): recall 4/6 (precision would also be 4/6; lengths are equal).
    assert m.rouge_l_recall("The cat sat on the mat.", "the cat was on a mat") == pytest.approx(4 / 6, rel=1e-12)
    # Recall ignores extra generated words: the whole reference appears in order.
    assert m.rouge_l_recall("Jane Austen", "It was written by Jane Austen in 1813") == pytest.approx(1.0)


def test_rouge_l_recall_uses_stemming():
    # Stems: reference "run dog", generation "the dog run": the LCS is one token -> 1/2.
    # Without stemming "running"/"runs" and "dogs"/"dog" would not match at all.
    assert m.rouge_l_recall("running dogs", "the dog runs") == pytest.approx(0.5, rel=1e-12)
    assert m.rouge_l_recall("running dogs", "") == 0.0


def test_mean_of_no_values_is_an_error():
    with pytest.raises(EvaluationError):
        m.mean([])


def test_forget_quality_where_scipy_falls_back_to_the_asymptotic_p_value():
    # D = 1/5 between two interleaved samples of 5: the exact recursion gives up, scipy's
    # asymptotic value is 1, and no warning escapes to the caller.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert m.forget_quality([1.0, 2.0, 3.0, 4.0, 5.0], [1.5, 2.5, 3.5, 4.5, 5.5]) == pytest.approx(1.0)
