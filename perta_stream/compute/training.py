"""Full fine-tuning math: the answer-only loss, AdamW, the linear warmup/decay schedule, batches.

The training objective is METHOD.md section 2 averaged over a batch: (1/B) Σ_n ℓ_n(θ), each
ℓ_n the mean NLL over sample n's answer tokens. Averaging per sample (not per token) weights
every question equally whatever its answer length, which is also what the statistics use.
Nothing here opens a file.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from perta_stream.compute.prompts import EncodedSample, collate, per_sample_loss

if TYPE_CHECKING:
    import torch


def answer_only_loss(model: Any, batch: dict[str, "torch.Tensor"]) -> "torch.Tensor":
    """Mean over the batch's samples of the per-sample answer loss (a scalar with a graph)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_sample_loss(logits, batch["labels"]).mean()


def make_optimizer(model: Any, *, lr: float, weight_decay: float) -> "torch.optim.AdamW":
    """AdamW with decay on matrices only: biases and norm gains (1-D) are not pulled towards 0.

    Tied parameters appear once (`model.parameters()` deduplicates them), so a tied embedding
    gets one update from the sum of both uses' gradients.
    """
    import torch

    decayed = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    not_decayed = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": not_decayed, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-8)


def linear_warmup_decay(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate factor of optimizer step `step` (0-based).

    Rises linearly over `warmup_steps` (the first step already moves, at 1/(warmup+1) of the
    peak), is 1 at step `warmup_steps`, then falls linearly to 1/(total - warmup) at the last step.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def make_scheduler(optimizer: Any, *, warmup_steps: int, total_steps: int) -> Any:
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: linear_warmup_decay(step, warmup_steps=warmup_steps, total_steps=total_steps)
    )


def steps_per_epoch(sample_count: int, batch_size: int) -> int:
    """Optimizer steps in one pass (the last batch may be smaller)."""
    return math.ceil(sample_count / batch_size)


def epoch_batches(samples: Sequence[EncodedSample], *, batch_size: int, seed: int, epoch: int, pad_token_id: int) -> Iterator[dict[str, "torch.Tensor"]]:
    """The batches of one epoch in a seeded random order (the same seed and epoch give the same order)."""
    order = list(range(len(samples)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield collate([samples[i] for i in order[start : start + batch_size]], pad_token_id)


def train_step(model: Any, batch: dict[str, "torch.Tensor"], optimizer: Any, scheduler: Any, *, max_grad_norm: float) -> float:
    """One optimizer step on one batch; returns the batch loss before the update."""
    import torch

    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    loss = answer_only_loss(model, batch)
    loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def cast_to_dtypes(model: Any, dtypes: dict[str, "torch.dtype"], default: "torch.dtype") -> None:
    """Cast every parameter and buffer back to the dtype its checkpoint stored it in (training runs in float32).

    Args:
        dtypes: tensor_name -> dtype from the source checkpoint's headers.
        default: the dtype of tensors the checkpoint did not store (e.g. a tied lm_head).
    """
    tensors = [(name, tensor, dtypes.get(name, default)) for name, tensor in model.named_parameters()]
    # Buffers the checkpoint does not store (rotary frequencies) stay as transformers made them.
    tensors += [(name, tensor, dtypes[name]) for name, tensor in model.named_buffers() if name in dtypes]
    for _, tensor, target in tensors:
        if tensor.is_floating_point() and tensor.dtype != target:
            tensor.data = tensor.data.to(target)
