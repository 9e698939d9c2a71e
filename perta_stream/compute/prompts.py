"""Prompt rendering, answer-only labels and the per-sample loss (METHOD.md section 2).

One implementation serves statistics, fine-tuning and evaluation, so "the loss of a sample"
means the same thing everywhere: the mean token negative log-likelihood over the answer tokens
(plus the end-of-turn/EOS token), with the prompt masked out.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from perta_stream.errors import DatasetError

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100
PLAIN_PROMPT = "Question: {question}\nAnswer:"
LOSS_DEFINITION = "mean token NLL over answer (+EOS/end-of-turn) tokens; prompt masked; chat template when present"


class LabelConvention(str, Enum):
    """Which tokens of a chat-template sample are labelled (scored); METHOD.md section 2 and
    docs/guides/from-open-unlearning.md.

    For a plain `Question: ... Answer:` prompt all three label the answer and EOS. With a chat
    template they differ after the answer; for a ChatML template (SmolLM2, Qwen) whose assistant
    turn renders as `answer<|im_end|>\n`:

    - `assistant_turn`: every token the assistant turn adds: answer, `<|im_end|>`, newline. What
      statistics and fine-tuning use.
    - `end_of_turn`: the answer and the first EOS / end-of-turn token after it; the template's
      trailing tokens are dropped.
    - `open_unlearning`: as open-unlearning's TOFU data does it: the assistant turn, then the EOS
      token appended when the rendered conversation does not already end with it (so ChatML
      gets `answer<|im_end|>\n<|im_end|>`). The evaluation's default, for comparability.
    """

    ASSISTANT_TURN = "assistant_turn"
    END_OF_TURN = "end_of_turn"
    OPEN_UNLEARNING = "open_unlearning"


@dataclass(frozen=True)
class EncodedSample:
    """Token ids of prompt + answer, and labels that are IGNORE_INDEX on the prompt."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def answer_token_count(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def encode_sample(
    tokenizer: Any,
    question: str,
    answer: str,
    *,
    max_length: int,
    system_prompt: str | None = None,
    labels: LabelConvention = LabelConvention.ASSISTANT_TURN,
    where: str = "sample",
) -> EncodedSample:
    """Tokenize one (question, answer) pair for the answer-only loss.

    With a chat template: user turn = question, assistant turn = answer; the prompt is the
    template up to the generation prompt, the labelled answer is what the assistant turn adds,
    cut or extended as `labels` says (LabelConvention). Without one: `Question: {q}\\nAnswer:` then
    ` {a}` and EOS, tokenized in two pieces so the boundary is exact. Past `max_length`, tokens
    are cut from the start of the prompt.

    Raises:
        DatasetError: the answer alone does not fit in `max_length`, or the template is inconsistent.
    """
    prompt_ids, answer_ids = _split_prompt_answer(tokenizer, question, answer, system_prompt, where)
    if getattr(tokenizer, "chat_template", None):
        answer_ids = _apply_label_convention(answer_ids, tokenizer.eos_token_id, LabelConvention(labels))
    if not answer_ids:
        raise DatasetError(f"{where}: the answer encodes to no tokens")
    if len(answer_ids) > max_length:
        raise DatasetError(
            f"{where}: the answer needs {len(answer_ids)} tokens, more than --max-length {max_length}; "
            "raise --max-length (answers are never cut)"
        )
    keep_prompt = max_length - len(answer_ids)
    prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt :] if keep_prompt < len(prompt_ids) else prompt_ids
    return EncodedSample(
        input_ids=tuple(prompt_ids + answer_ids),
        labels=tuple([IGNORE_INDEX] * len(prompt_ids) + answer_ids),
    )


def encode_prompt(tokenizer: Any, question: str, *, max_length: int, system_prompt: str | None = None) -> tuple[int, ...]:
    """The prompt tokens alone, rendered exactly as `encode_sample` renders them: what generation starts from.

    Past `max_length`, tokens are cut from the start of the prompt (as in `encode_sample`).
    """
    prompt_ids = _prompt_ids(tokenizer, question, system_prompt)
    return tuple(prompt_ids[max(0, len(prompt_ids) - max_length) :])


def _chat_messages(question: str, system_prompt: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": question})
    return messages


def _prompt_ids(tokenizer: Any, question: str, system_prompt: str | None) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        return _as_ids(tokenizer.apply_chat_template(_chat_messages(question, system_prompt), add_generation_prompt=True, tokenize=True))
    prompt_text = PLAIN_PROMPT.format(question=question)
    if system_prompt:
        prompt_text = f"{system_prompt}\n{prompt_text}"
    return list(tokenizer(prompt_text, add_special_tokens=True)["input_ids"])


def _split_prompt_answer(tokenizer: Any, question: str, answer: str, system_prompt: str | None, where: str) -> tuple[list[int], list[int]]:
    if getattr(tokenizer, "chat_template", None):
        messages = _chat_messages(question, system_prompt)
        prompt_ids = _prompt_ids(tokenizer, question, system_prompt)
        full_ids = _as_ids(
            tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=True)
        )
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise DatasetError(f"{where}: the chat template renders the prompt differently with and without the answer")
        return prompt_ids, full_ids[len(prompt_ids) :]
    prompt_ids = _prompt_ids(tokenizer, question, system_prompt)
    answer_ids = list(tokenizer(" " + answer, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is None:
        raise DatasetError(f"{where}: the tokenizer has no EOS token and no chat template; set one before use")
    return prompt_ids, answer_ids + [tokenizer.eos_token_id]


def _apply_label_convention(turn_ids: list[int], eos_token_id: int | None, labels: LabelConvention) -> list[int]:
    # turn_ids: every token the assistant turn adds (the assistant_turn convention).
    if eos_token_id is None or labels is LabelConvention.ASSISTANT_TURN:
        return turn_ids
    if labels is LabelConvention.END_OF_TURN:
        return turn_ids[: turn_ids.index(eos_token_id) + 1] if eos_token_id in turn_ids else turn_ids
    return turn_ids if turn_ids and turn_ids[-1] == eos_token_id else turn_ids + [eos_token_id]


def _as_ids(rendered: Any) -> list[int]:
    # transformers returns a list, or a BatchEncoding/dict with input_ids, depending on version.
    if isinstance(rendered, dict) or hasattr(rendered, "keys"):
        rendered = rendered["input_ids"]
    return [int(token) for token in rendered]


def collate(samples: list[EncodedSample], pad_token_id: int) -> dict[str, "torch.Tensor"]:
    """Right-padded `input_ids`, `attention_mask` and `labels` tensors for a batch."""
    import torch

    width = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        length = len(sample.input_ids)
        input_ids[row, :length] = torch.tensor(sample.input_ids)
        labels[row, :length] = torch.tensor(sample.labels)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def per_sample_loss(logits: "torch.Tensor", labels: "torch.Tensor") -> "torch.Tensor":
    """ℓ_n: the mean NLL over each sample's labelled tokens, in float32. Shape [batch].

    Position t predicts token t+1, so logits are shifted against labels.
    """
    return mean_target_nll(logits[:, :-1, :], labels[:, 1:])


def mean_target_nll(logits: "torch.Tensor", targets: "torch.Tensor") -> "torch.Tensor":
    """Per row, the mean NLL of `targets` under `logits` ([batch, positions, vocab]) over the
    targets that are not IGNORE_INDEX, in float32 (0 for a row without any). Shape [batch]."""
    import torch

    token_nll = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(targets.shape)
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    return token_nll.sum(dim=1) / counts.clamp(min=1)


def scored_positions(labels: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """The positions whose logits the loss reads (those predicting a labelled token), packed.

    `per_sample_loss(logits, labels)` equals `mean_target_nll(logits[rows, positions], targets)`,
    so the logits elsewhere (the prompt, the padding) need not be computed at all.

    Returns:
        positions [batch, width] and targets [batch, width] (long): row n's scored positions in
        order, then unscored ones whose target is IGNORE_INDEX; width is the most any row has.
    """
    import torch

    shifted = labels[:, 1:]
    unscored = (shifted == IGNORE_INDEX).to(torch.int8)
    width = int((1 - unscored).sum(dim=1).max()) if shifted.numel() else 0
    # A stable sort on "unscored" moves each row's scored positions to the front, in order.
    positions = torch.sort(unscored, dim=1, stable=True).indices[:, :width]
    return positions, shifted.gather(1, positions)
