"""The decoder-only families the statistics engine supports, and what differs between them.

Everything inside a decoder layer is run by transformers' own modules, and every parameterized
module there gets exact per-sample gradients from a rule that depends only on its type (linear,
or the generic rule for anything else). What is left per family is what the model does OUTSIDE
its layers, which the engine reproduces because it runs the layers one at a time: the scale of
the embedding output, a transform of the logits, which layers attend through a sliding window,
and whether a layer's last projection feeds the residual sum directly. This module decides all of
that from config.json alone (no torch), so an unsupported model is refused before any weight is
read and `--dry-run --config-only` can plan every family.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from perta_stream.errors import ModelNotSupportedError

WINDOW_NONE, WINDOW_ALL_LAYERS, WINDOW_BY_LAYER_TYPE = "none", "all-layers", "by-layer-type"


@dataclass(frozen=True)
class ExpertNames:
    """How checkpoints store a mixture-of-experts block whose module fuses the experts.

    transformers 5 runs the experts as two 3-D parameters, `mlp.experts.gate_up_proj`
    [experts, 2 x width, hidden] and `mlp.experts.down_proj` [experts, hidden, width], but
    checkpoints (the Hub's, and what save_pretrained writes) keep one 2-D matrix per expert and
    projection, under the block's own name. Statistics are written under the checkpoint's names.

    Attributes:
        block: the block's name in checkpoints (`mlp.` in the module becomes `<block>.`).
        gate, up, down: each expert's projection names (`<block>.experts.<e>.<name>.weight`).
    """

    block: str
    gate: str
    up: str
    down: str


@dataclass(frozen=True)
class FamilyInfo:
    """What the engine must know about one model_type beyond its layers' modules.

    Attributes:
        model_type: the config's `model_type`.
        window: how the sliding window applies: not at all, to every layer when the config sets
            one, or to the layers `layer_types` marks `sliding_attention`.
        embedding_scale: how the embedding output is scaled: "" (not), "sqrt_hidden" (Gemma:
            by sqrt(hidden_size), rounded to the compute dtype) or a config field it is multiplied by.
        last_projection_feeds_residual: a layer's output is `residual + c * mlp.down_proj(...)`,
            so the backward never reads that projection's value (see skeleton.LastProjectionSkipped).
        experts: a mixture-of-experts family: how its checkpoints name the experts (None: dense).
    """

    model_type: str
    window: str = WINDOW_NONE
    embedding_scale: str = ""
    last_projection_feeds_residual: bool = True
    experts: ExpertNames | None = None

    @property
    def mixture_of_experts(self) -> bool:
        return self.experts is not None


FAMILIES: dict[str, FamilyInfo] = {
    info.model_type: info
    for info in (
        FamilyInfo("llama"),
        FamilyInfo("mistral", window=WINDOW_ALL_LAYERS),
        FamilyInfo("qwen2", window=WINDOW_BY_LAYER_TYPE),
        FamilyInfo("qwen3", window=WINDOW_BY_LAYER_TYPE),
        FamilyInfo("gemma", embedding_scale="sqrt_hidden"),
        # Gemma 2/3 and OLMo 2 normalize the MLP output before the residual sum.
        FamilyInfo("gemma2", window=WINDOW_BY_LAYER_TYPE, embedding_scale="sqrt_hidden", last_projection_feeds_residual=False),
        FamilyInfo("gemma3_text", window=WINDOW_BY_LAYER_TYPE, embedding_scale="sqrt_hidden", last_projection_feeds_residual=False),
        FamilyInfo("phi3", window=WINDOW_ALL_LAYERS),
        FamilyInfo("olmo2", last_projection_feeds_residual=False),
        FamilyInfo("granite", embedding_scale="embedding_multiplier"),
        FamilyInfo("mixtral", window=WINDOW_ALL_LAYERS, last_projection_feeds_residual=False, experts=ExpertNames("block_sparse_moe", "w1", "w3", "w2")),
        FamilyInfo("qwen3_moe", window=WINDOW_ALL_LAYERS, last_projection_feeds_residual=False, experts=ExpertNames("mlp", "gate_proj", "up_proj", "down_proj")),
    )
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def family_of(config: Mapping[str, object], *, where: str) -> FamilyInfo:
    """The family of a parsed config.json, or a ModelNotSupportedError that says why and lists the supported ones.

    Raises:
        ModelNotSupportedError: an encoder-decoder, a model with a vision or audio tower, an
            option the engine does not reproduce, or a model_type not in FAMILIES.
    """
    model_type = str(config.get("model_type", "") or "")
    supported = f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} (decoder-only transformers language models)"
    if config.get("is_encoder_decoder"):
        reason = "is an encoder-decoder model"
    elif any(key in config for key in ("vision_config", "audio_config", "text_config")):
        towers = [key.split("_")[0] for key in ("vision_config", "audio_config") if key in config]
        reason = f"wraps a language model with {' and '.join(towers) or 'other'} towers" + (
            "; for Gemma 3 pass a text-only checkpoint (model_type gemma3_text)" if model_type == "gemma3" else ""
        )
    elif model_type not in FAMILIES:
        reason = "is not supported by the statistics engine"
    elif config.get("use_bidirectional_attention"):
        reason = "uses bidirectional attention (an embedding model), which the engine's causal masks do not reproduce"
    else:
        return FAMILIES[model_type]
    raise ModelNotSupportedError(f"{where}: model_type {model_type or '(missing)'!r} {reason}; {supported}")


def embedding_scale(family: FamilyInfo, config: Mapping[str, object]) -> float:
    """The factor the model multiplies its embedding output by (1.0 for most families)."""
    if family.embedding_scale == "sqrt_hidden":
        return math.sqrt(float(config["hidden_size"]))  # type: ignore[arg-type]
    if family.embedding_scale:
        return float(config.get(family.embedding_scale) or 1.0)  # type: ignore[arg-type]
    return 1.0


def final_logit_softcap(config: Mapping[str, object]) -> float | None:
    """Gemma 2/3: logits become cap * tanh(logits / cap) (None: no soft-capping)."""
    cap = config.get("final_logit_softcapping")
    return float(cap) if cap else None  # type: ignore[arg-type]


def logits_divisor(config: Mapping[str, object]) -> float:
    """Granite divides its logits by `logits_scaling` (1.0 elsewhere)."""
    return float(config.get("logits_scaling") or 1.0)  # type: ignore[arg-type]
