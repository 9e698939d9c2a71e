"""Extraction strength, Min-K%, the membership AUC and PrivLeak on cases computed by hand, and the
token-level scores they are computed from against a direct forward pass."""

from __future__ import annotations

import random

import pytest

from perta_stream.errors import EvaluationError
from perta_stream.eval import memorization as mem


def test_extraction_strength_is_one_minus_the_start_of_the_longest_reproduced_suffix():
    assert mem.extraction_strength([1, 2, 3], [1, 2, 3]) == 1.0
    # The first guess is wrong, the rest right: from y[:1] the model reproduces y[1:] -> 1 - 1/3.
    assert mem.extraction_strength([9, 2, 3], [1, 2, 3]) == pytest.approx(2 / 3)
    # A wrong token in the middle: only y[2:] is reproduced -> 1 - 2/3, the right first guess does not count.
    assert mem.extraction_strength([1, 9, 3], [1, 2, 3]) == pytest.approx(1 / 3)
    # The last token wrong: nothing is reproduced, k* = |y| -> 0.
    assert mem.extraction_strength([1, 2, 9], [1, 2, 3]) == 0.0


def test_extraction_strength_rejects_empty_and_mismatched_inputs():
    with pytest.raises(EvaluationError, match="at least one target"):
        mem.extraction_strength([], [])
    with pytest.raises(EvaluationError, match="2 predictions for 3 targets"):
        mem.extraction_strength([1, 2], [1, 2, 3])


def test_min_k_percent_is_the_mean_of_the_largest_token_nlls():
    nlls = [0.1, 2.0, 0.5, 3.0, 1.0]
    # 40% of 5 tokens = 2 tokens: the two least likely have NLL 3.0 and 2.0.
    assert mem.min_k_percent_score(nlls, 0.4) == pytest.approx(2.5)
    # 10% of 5 is 0.5, floored to 0, and at least one token is kept.
    assert mem.min_k_percent_score(nlls, 0.1) == pytest.approx(3.0)
    assert mem.min_k_percent_score(nlls, 1.0) == pytest.approx(6.6 / 5)
    with pytest.raises(EvaluationError, match="fraction"):
        mem.min_k_percent_score(nlls, 0.0)
    with pytest.raises(EvaluationError, match="at least one token"):
        mem.min_k_percent_score([])


def test_mia_auc_by_hand():
    # A model that memorized the forget set: every forget score below every holdout score.
    assert mem.mia_auc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert mem.mia_auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    # Pairs (1,2) no, (1,3) no, (3,2) yes, (3,3) a tie counting half -> 1.5 / 4.
    assert mem.mia_auc([1.0, 3.0], [2.0, 3.0]) == pytest.approx(0.375)
    with pytest.raises(EvaluationError, match="empty"):
        mem.mia_auc([], [1.0])


def test_mia_auc_equals_the_mann_whitney_u_statistic_over_all_pairs():
    from scipy.stats import mannwhitneyu

    rng = random.Random(0)
    # Rounded to one decimal so that ties occur.
    forget = [round(rng.gauss(1.0, 1.0), 1) for _ in range(37)]
    holdout = [round(rng.gauss(1.5, 1.0), 1) for _ in range(23)]
    u_statistic = mannwhitneyu(forget, holdout).statistic
    assert mem.mia_auc(forget, holdout) == pytest.approx(u_statistic / (len(forget) * len(holdout)), rel=1e-12)


def test_privleak_is_the_relative_auc_difference_in_percent():
    assert mem.privleak(0.25, 0.5) == pytest.approx(-50.0)
    assert mem.privleak(0.5, 0.5) == 0.0
    assert mem.privleak(0.6, 0.4) == pytest.approx(50.0)
    with pytest.raises(EvaluationError, match="retrained model's AUC"):
        mem.privleak(0.3, 0.0)


def test_token_scores_equal_an_unpadded_forward_pass_per_sample():
    import torch

    from perta_stream.compute.prompts import encode_sample
    from perta_stream.eval.scoring import token_scores
    from perta_stream.sources.hf_model import LoadedModel

    from tiny_models import build_llama, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_llama(len(tokenizer))
    loaded = LoadedModel(model=model, tokenizer=tokenizer, input_device=torch.device("cpu"), pad_token_id=tokenizer.pad_token_id)
    pairs = [("Who is she?", "A writer."), ("Where was the author born?", "In a small town by the sea, long ago."), ("Why?", "No.")]
    samples = [encode_sample(tokenizer, q, a, max_length=128) for q, a in pairs]
    scores = token_scores(loaded, samples, batch_size=3)
    for sample, score in zip(samples, scores):
        first = next(i for i, label in enumerate(sample.labels) if label != -100)
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([sample.input_ids])).logits[0].double(), dim=-1)
        targets = list(sample.input_ids[first:])
        rows = log_probs[first - 1 : len(sample.input_ids) - 1]
        assert list(score.targets) == targets
        assert list(score.predicted) == rows.argmax(dim=-1).tolist()
        assert score.nll == pytest.approx([-float(rows[k, t]) for k, t in enumerate(targets)], abs=1e-5)
