"""Batched answer likelihoods and greedy generations of a loaded model.

The answer loss is the very per-sample loss of METHOD.md section 2 (compute/prompts.py): the
mean token NLL over the answer (+EOS/end-of-turn) tokens, prompt masked. Batches are formed from
samples sorted by length, which keeps padding (wasted compute) small; results come back in input
order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from perta_stream.compute.prompts import IGNORE_INDEX, EncodedSample, LabelConvention, collate, encode_prompt, encode_sample, per_sample_loss
from perta_stream.progress import progress
from perta_stream.sources.hf_model import LoadedModel


@dataclass(frozen=True)
class TokenScores:
    """Per labelled token of one sample: its NLL, the model's argmax guess and the true token."""

    nll: tuple[float, ...]
    predicted: tuple[int, ...]
    targets: tuple[int, ...]


def answer_losses(
    loaded: LoadedModel,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int,
    max_length: int,
    system_prompt: str | None = None,
    labels: LabelConvention = LabelConvention.ASSISTANT_TURN,
    desc: str = "answer likelihoods",
) -> list[float]:
    """L(q, a) for every (question, answer) pair, in input order.

    Raises:
        DatasetError: an answer does not fit in `max_length` tokens (from encode_sample).
    """
    import torch

    encoded = [
        encode_sample(loaded.tokenizer, question, answer, max_length=max_length, system_prompt=system_prompt, labels=labels, where=f"{desc}, pair {i}")
        for i, (question, answer) in enumerate(pairs)
    ]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    losses: list[float] = [0.0] * len(encoded)
    with progress(total=len(encoded), desc=desc, unit="answer", unit_scale=False) as bar, torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch_indices = order[start : start + batch_size]
            batch = collate([encoded[i] for i in batch_indices], loaded.pad_token_id)
            logits = loaded.model(
                input_ids=batch["input_ids"].to(loaded.input_device),
                attention_mask=batch["attention_mask"].to(loaded.input_device),
            ).logits
            batch_losses = per_sample_loss(logits, batch["labels"].to(logits.device)).tolist()
            for index, loss in zip(batch_indices, batch_losses):
                losses[index] = float(loss)
            bar.update(len(batch_indices))
    return losses


def token_scores(loaded: LoadedModel, samples: Sequence[EncodedSample], *, batch_size: int, desc: str = "token scores") -> list[TokenScores]:
    """The NLL and the argmax prediction at every labelled token of each sample, in input order.

    Position t predicts token t+1 (as in `per_sample_loss`), so the scores of a sample are read at
    the positions whose next token is labelled.
    """
    import torch

    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))
    scores: list[TokenScores | None] = [None] * len(samples)
    with progress(total=len(samples), desc=desc, unit="sample", unit_scale=False) as bar, torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch_indices = order[start : start + batch_size]
            batch = collate([samples[i] for i in batch_indices], loaded.pad_token_id)
            logits = loaded.model(
                input_ids=batch["input_ids"].to(loaded.input_device),
                attention_mask=batch["attention_mask"].to(loaded.input_device),
            ).logits[:, :-1, :].float()
            targets = batch["labels"][:, 1:].to(logits.device)
            log_probs = torch.log_softmax(logits, dim=-1)
            for row, index in enumerate(batch_indices):
                scored = targets[row] != IGNORE_INDEX
                row_targets = targets[row][scored]
                row_log_probs = log_probs[row][scored]
                scores[index] = TokenScores(
                    nll=tuple((-row_log_probs.gather(1, row_targets[:, None])[:, 0]).tolist()),
                    predicted=tuple(row_log_probs.argmax(dim=-1).tolist()),
                    targets=tuple(row_targets.tolist()),
                )
            bar.update(len(batch_indices))
    return scores  # type: ignore[return-value]


def greedy_generations(
    loaded: LoadedModel,
    questions: Sequence[str],
    *,
    batch_size: int,
    max_length: int,
    max_new_tokens: int,
    system_prompt: str | None = None,
    desc: str = "generations",
) -> list[str]:
    """The greedy continuation of each question's prompt, decoded without special tokens, in input order.

    Prompts are left-padded so that every row's new tokens start at the same column; the
    attention mask keeps the padding out (transformers derives positions from it). A prompt is
    cut from its start to `max_length` tokens.
    """
    prompts = [encode_prompt(loaded.tokenizer, q, max_length=max_length, system_prompt=system_prompt) for q in questions]
    return greedy_continuations(loaded, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens, desc=desc)


def greedy_continuations(
    loaded: LoadedModel, prompts: Sequence[tuple[int, ...]], *, batch_size: int, max_new_tokens: int, desc: str = "generations"
) -> list[str]:
    """The greedy continuation of each token-id prompt, decoded without special tokens, in input order."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    stop_ids = _stop_token_ids(loaded)
    with progress(total=len(prompts), desc=desc, unit="answer", unit_scale=False) as bar, torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch_indices = order[start : start + batch_size]
            input_ids, attention_mask = _left_pad([prompts[i] for i in batch_indices], loaded.pad_token_id)
            output = loaded.model.generate(
                input_ids=input_ids.to(loaded.input_device),
                attention_mask=attention_mask.to(loaded.input_device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=loaded.pad_token_id,
                eos_token_id=stop_ids,
            )
            new_tokens = output[:, input_ids.shape[1] :].cpu()
            for row, index in enumerate(batch_indices):
                texts[index] = _decode_until_stop(loaded.tokenizer, new_tokens[row].tolist(), stop_ids)
            bar.update(len(batch_indices))
    return texts


def _left_pad(prompts: list[tuple[int, ...]], pad_token_id: int) -> tuple[Any, Any]:
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


def _stop_token_ids(loaded: LoadedModel) -> list[int]:
    # The generation config's EOS (chat models list their end-of-turn tokens there) plus the
    # tokenizer's EOS, which ends every plain-prompt answer the loss was trained on.
    stop: list[int] = []
    configured = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    for token in (configured if isinstance(configured, list) else [configured]) + [loaded.tokenizer.eos_token_id]:
        if token is not None and int(token) not in stop:
            stop.append(int(token))
    return stop


def _decode_until_stop(tokenizer: Any, token_ids: list[int], stop_ids: list[int]) -> str:
    # Rows that finished early are padded after their stop token; cut there before decoding.
    for position, token in enumerate(token_ids):
        if token in stop_ids:
            token_ids = token_ids[:position]
            break
    return tokenizer.decode(token_ids, skip_special_tokens=True).strip()
