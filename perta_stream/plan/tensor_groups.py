"""Where a tensor sits in a decoder: its layer, its module kind and its expert, from its name alone.

`inspect` aggregates its figures by these groups. The names are the checkpoints' own (the
statistics are stored under them): `model.layers.<i>.self_attn.q_proj.weight`,
`model.layers.<i>.mlp.down_proj.weight`, `model.embed_tokens.weight`, `lm_head.weight`, and in a
mixture of experts `...block_sparse_moe.experts.<e>.w1.weight` (Mixtral) or
`...mlp.experts.<e>.gate_proj.weight` (Qwen3-MoE), with the router at `...gate.weight`. Fused
projections keep their own kind (`qkv` and `gate_up` in Phi-3), a bias belongs to its module's
kind, and a name no rule knows is `other`, so every tensor is counted somewhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EMBEDDING, HEAD, NORM, ROUTER, OTHER = "embedding", "head", "norm", "router", "other"
EXPERT_PREFIX = "expert "
# The projections of attention and MLP blocks; Mixtral's experts call gate, down and up w1, w2, w3.
_PROJECTIONS = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "qkv_proj": "qkv",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "gate_up_proj": "gate_up",
    "w1": "gate", "w3": "up", "w2": "down",
}  # fmt: skip
# The order kinds are listed and drawn in: a layer's modules in the order data flows through them.
KIND_ORDER = (
    EMBEDDING, "q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", ROUTER,
    *(EXPERT_PREFIX + kind for kind in ("gate", "up", "gate_up", "down")), NORM, HEAD, OTHER,
)  # fmt: skip
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


@dataclass(frozen=True)
class TensorGroup:
    """The groups one tensor is aggregated into.

    Attributes:
        layer: the decoder layer's index, or None outside the layers (embedding, final norm, head).
        module_kind: one of KIND_ORDER.
        expert: the expert's index in a mixture-of-experts block (per-expert matrices), else None.
    """

    layer: int | None
    module_kind: str
    expert: int | None


def tensor_group(tensor_name: str) -> TensorGroup:
    """The layer, module kind and expert of a state-dict key (see the module's docstring)."""
    layer_match = _LAYER.search(tensor_name)
    expert_match = _EXPERT.search(tensor_name)
    return TensorGroup(
        layer=int(layer_match.group(1)) if layer_match else None,
        module_kind=module_kind(tensor_name),
        expert=int(expert_match.group(1)) if expert_match else None,
    )


def module_kind(tensor_name: str) -> str:
    """`q`, `k`, `v`, `o`, `qkv`, `gate`, `up`, `down`, `gate_up`, `norm`, `embedding`, `head`,
    `router`, `expert gate` / `expert up` / `expert down` / `expert gate_up`, or `other`."""
    parts = tensor_name.split(".")
    # `...q_proj.weight` is the q_proj module's; fused expert parameters (`...experts.down_proj`)
    # are parameters of the experts module, named after the projection they hold.
    module = parts[-2] if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts[-1]
    in_experts = "experts" in parts
    if module in _PROJECTIONS:
        kind = _PROJECTIONS[module]
        return EXPERT_PREFIX + kind if in_experts else kind
    if module == "embed_tokens" or module == "wte":
        return EMBEDDING
    if module == "lm_head":
        return HEAD
    if module.endswith("norm") or module.endswith("layernorm"):
        return NORM
    if module == "gate" and not in_experts:
        return ROUTER
    return OTHER


def kind_sort_key(kind: str) -> int:
    """Position of a kind in KIND_ORDER (unknown kinds last)."""
    return KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)
