"""The memory a fine-tune of θ_fgt needs, from the model's tensor shapes, and the line a plan
prints when a full fine-tune would not fit where it trains.

`finetune` (pipelines/finetune.py) trains in float32 with AdamW. A full fine-tune holds, per
parameter, the weight, its gradient and AdamW's two moments: 16 bytes. A LoRA keeps the frozen
weights (4 bytes per parameter, float32 as `finetune` loads them) and trains r·(rows + cols)
values on every linear module of the decoder layers (peft's `all-linear`), 16 bytes each.
Activations are apart: they grow with the batch and the sequence, not with the model alone.
"""

from __future__ import annotations

import math

from perta_stream.memory import format_bytes

FROZEN_BYTES_PER_PARAMETER = 4
TRAINED_BYTES_PER_PARAMETER = 16  # float32 weight + gradient + AdamW's exp_avg and exp_avg_sq
SUGGESTED_LORA_RANK = 16


def lora_parameter_count(shapes: dict[str, tuple[int, ...]], rank: int) -> int:
    """A rank-`rank` LoRA's factor values on every linear module (every 2-D tensor of a decoder layer)."""
    return sum(rank * (dims[0] + dims[1]) for name, dims in shapes.items() if len(dims) == 2 and ".layers." in name)


def finetune_bytes(shapes: dict[str, tuple[int, ...]], lora_rank: int | None) -> int:
    """Weights, gradients and AdamW state of a fine-tune of the model of `shapes` (tensor_name ->
    shape, tied tensors once): full when `lora_rank` is None, else a LoRA of that rank."""
    parameters = sum(math.prod(dims) for dims in shapes.values())
    if lora_rank is None:
        return TRAINED_BYTES_PER_PARAMETER * parameters
    return FROZEN_BYTES_PER_PARAMETER * parameters + TRAINED_BYTES_PER_PARAMETER * lora_parameter_count(shapes, lora_rank)


def lora_advice(shapes: dict[str, tuple[int, ...]], memory_bytes: int, where: str) -> str | None:
    """One line when a full fine-tune of the model of `shapes` needs more than `memory_bytes`
    (`where` names that memory: "the GPU's memory"), saying to train θ_fgt as a LoRA with
    `--lora R` (or, when that does not fit either, elsewhere); None when it fits."""
    full = finetune_bytes(shapes, None)
    if full <= memory_bytes:
        return None
    parameters = sum(math.prod(dims) for dims in shapes.values())
    rank = SUGGESTED_LORA_RANK
    lora = finetune_bytes(shapes, rank)
    said = (
        f"theta_fgt: a full fine-tune needs about {format_bytes(full)} ({parameters:,} parameters x 16 bytes: float32 weights, "
        f"gradients and AdamW state; activations apart), more than {where} ({format_bytes(memory_bytes)})"
    )
    if lora <= memory_bytes:
        return f"{said}: add --lora {rank} (a rank-{rank} LoRA adapter needs about {format_bytes(lora)}, the frozen weights in float32)"
    return (
        f"{said}; a rank-{rank} LoRA (--lora {rank}) needs about {format_bytes(lora)}, the frozen weights in float32: "
        "fine-tune theta_fgt where it fits and give --theta0, --full and --fgt"
    )
