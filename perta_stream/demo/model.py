"""The demo's model: a small Llama-architecture causal LM with random weights, built from a config.

The shape follows Llama-3.2-1B in kind (RMSNorm, rotary positions, SwiGLU MLP, grouped-query
attention, tied input/output embeddings), only much smaller, so every code path the real model
takes (tied embeddings included) is exercised on CPU in seconds.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from perta_stream.errors import UsageError


@dataclass(frozen=True)
class DemoModelShape:
    """Dimensions of the demo model (the vocabulary size comes from the tokenizer).

    Attributes:
        hidden_size: width of the residual stream.
        intermediate_size: width of the SwiGLU MLP.
        num_hidden_layers: decoder blocks.
        num_attention_heads: query heads; hidden_size must be a multiple.
        num_key_value_heads: key/value heads (grouped-query attention); divides num_attention_heads.
        max_position_embeddings: longest sequence the rotary table is sized for.
        tie_word_embeddings: share the input embedding with the output head (as Llama-3.2-1B does).
    """

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = True

    def problems(self) -> list[str]:
        """Every inconsistency among the dimensions (empty when buildable)."""
        found = []
        for name, value in asdict(self).items():
            if name != "tie_word_embeddings" and value < 1:
                found.append(f"model {name} must be at least 1, got {value}")
        if self.num_attention_heads >= 1 and self.hidden_size % self.num_attention_heads:
            found.append(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}")
        if self.num_key_value_heads >= 1 and self.num_attention_heads % self.num_key_value_heads:
            found.append(f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads {self.num_key_value_heads}")
        return found


def build_demo_model(tokenizer: Any, shape: DemoModelShape, *, seed: int) -> Any:
    """A randomly initialised `LlamaForCausalLM` sized for `tokenizer`, in float32.

    Args:
        tokenizer: the demo tokenizer (gives vocab size, EOS and pad ids).
        shape: the model dimensions.
        seed: the initialisation seed (the same seed gives the same weights).

    Raises:
        UsageError: inconsistent dimensions.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    problems = shape.problems()
    if problems:
        raise UsageError("invalid demo model shape: " + "; ".join(problems))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        torch_dtype="float32",
    )
    # Seeding the global generator is how transformers' _init_weights draws; restore it after so
    # the caller's random state is not changed by building a model.
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.to(torch.float32)


def save_checkpoint(model: Any, tokenizer: Any, out: str | os.PathLike) -> Path:
    """Write model (safetensors) and tokenizer files into `out`, a new or empty folder."""
    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_path, safe_serialization=True)
    tokenizer.save_pretrained(out_path)
    return out_path
