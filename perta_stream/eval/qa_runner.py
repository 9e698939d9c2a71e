"""Evaluate a loaded model on one's own question-answer files: the metrics that need no retain model.

A user has the model, the forget file and the retain file (and perhaps a holdout file of similar
records the model never saw); no retain-only model and no perturbed answers. What can be measured
from those alone, per item and per set, with the same parts as the TOFU evaluation (runner.py):

- forget and retain: the answer probability P~ = exp(-L) and the ROUGE-L recall of the greedy
  answer against the reference (metrics.py);
- forget: the extraction strength and the Min-K% membership score of each answer (memorization.py);
- holdout: the Min-K% score of each answer, which gives the forget-vs-holdout membership AUC, and
  PrivLeak against the AUC a model that never saw either set has when the two files are drawn
  alike, 0.5 (MUSE defines PrivLeak against a retrained model's AUC; without one, 0.5 is its
  ideal value);
- retain utility: the harmonic mean of the retain probability and ROUGE-L (TOFU's model utility
  restricted to the one utility set a user has; 0 when either is 0).

Forget quality and the truth ratio need a retain model and perturbed answers: they stay for TOFU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from perta_stream.compute.prompts import LabelConvention
from perta_stream.eval import memorization as mem
from perta_stream.eval import metrics as m
from perta_stream.eval.runner import memorization_scores
from perta_stream.eval.scoring import answer_losses, greedy_generations
from perta_stream.sources.hf_model import LoadedModel

# The membership AUC of a model that never saw the forget set nor the holdout set, when the two are
# drawn from the same distribution: the reference of PrivLeak without a retrained model.
UNSEEN_REFERENCE_AUC = 0.5


@dataclass(frozen=True)
class QaSetScores:
    """Per-item values of one file, in record order, and its two means.

    Attributes:
        name: `forget` or `retain`.
        answer_loss, probability, rouge_l_recall, generation: per item.
        extraction_strength, min_k_score: per item on the forget file, empty elsewhere.
    """

    name: str
    answer_loss: tuple[float, ...]
    probability: tuple[float, ...]
    rouge_l_recall: tuple[float, ...]
    generation: tuple[str, ...]
    extraction_strength: tuple[float, ...] = ()
    min_k_score: tuple[float, ...] = ()

    @property
    def probability_metric(self) -> float:
        return m.mean(self.probability)

    @property
    def rouge_l_metric(self) -> float:
        return m.mean(self.rouge_l_recall)

    def per_item(self) -> dict[str, list]:
        """The JSON form of the per-item values."""
        return {
            "answer_loss": list(self.answer_loss),
            "probability": list(self.probability),
            "rouge_l_recall": list(self.rouge_l_recall),
            "generation": list(self.generation),
            **({"extraction_strength": list(self.extraction_strength)} if self.extraction_strength else {}),
            **({"min_k_score": list(self.min_k_score)} if self.min_k_score else {}),
        }


def score_qa_set(
    loaded: LoadedModel,
    name: str,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int,
    max_length: int,
    max_new_tokens: int,
    system_prompt: str | None = None,
    labels: LabelConvention = LabelConvention.OPEN_UNLEARNING,
    memorization: bool = False,
) -> QaSetScores:
    """The per-item values of one file of (question, answer) pairs; with `memorization`, also the
    extraction strength and Min-K% score of each answer.

    Raises:
        DatasetError: an answer does not fit in `max_length` tokens.
    """
    options = {"batch_size": batch_size, "max_length": max_length, "system_prompt": system_prompt}
    losses = answer_losses(loaded, pairs, desc=f"{name}: likelihoods", labels=labels, **options)
    generation = greedy_generations(loaded, [q for q, _ in pairs], max_new_tokens=max_new_tokens, desc=f"{name}: generation", **options)
    scorer = m.make_rouge_scorer()
    extraction: list[float] = []
    min_k: list[float] = []
    if memorization:
        extraction, min_k = memorization_scores(loaded, pairs, desc=f"{name}: memorization", labels=labels, **options)
    return QaSetScores(
        name=name,
        answer_loss=tuple(losses),
        probability=tuple(m.answer_probability(loss) for loss in losses),
        rouge_l_recall=tuple(m.rouge_l_recall(answer, text, scorer=scorer) for (_, answer), text in zip(pairs, generation)),
        generation=tuple(generation),
        extraction_strength=tuple(extraction),
        min_k_score=tuple(min_k),
    )


def summarize_qa_metrics(forget: QaSetScores, retain: QaSetScores, *, holdout_min_k: Sequence[float] | None = None) -> dict[str, float | None]:
    """Every metric of FILE_METRIC_KEYS (eval/files_report.py); the AUC and PrivLeak are None
    without holdout scores."""
    values: dict[str, float | None] = {
        "forget_probability": forget.probability_metric,
        "forget_rouge_l": forget.rouge_l_metric,
        "forget_extraction_strength": m.mean(forget.extraction_strength) if forget.extraction_strength else None,
        "retain_probability": retain.probability_metric,
        "retain_rouge_l": retain.rouge_l_metric,
    }
    values["retain_utility"] = m.harmonic_mean([retain.probability_metric, retain.rouge_l_metric])
    auc = mem.mia_auc(forget.min_k_score, holdout_min_k) if holdout_min_k and forget.min_k_score else None
    values["mia_min_k_auc"] = auc
    values["privleak"] = None if auc is None else mem.privleak(auc, UNSEEN_REFERENCE_AUC)
    return values
