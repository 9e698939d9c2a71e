"""The model without weights: transformers modules on the meta device, materialized one at a time.

transformers builds the model's modules from its config with no memory behind the parameters
(meta device). The engine gives one module (a decoder layer, or the final norm and lm_head)
real tensors with `load_state_dict(assign=True)`, runs it, and returns it to the meta device, so
the code that runs a layer is exactly the library's, for every supported architecture. What the
model does between its layers (embedding scale, logit transform, masks, rotary tables) is
reproduced here from the family's description (plan/model_families.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from perta_stream.compute.stats.layout import CheckpointLayout
from perta_stream.errors import CheckpointError
from perta_stream.plan.model_families import (
    WINDOW_ALL_LAYERS,
    WINDOW_BY_LAYER_TYPE,
    FamilyInfo,
    embedding_scale,
    family_of,
    final_logit_softcap,
    logits_divisor,
)
from perta_stream.plan.stats_plan import EMBED_TENSOR_NAME, LAYER_PREFIX, LM_HEAD_TENSOR_NAME

NORM_PREFIX = "model.norm."


@dataclass
class ModelSkeleton:
    """A meta-device causal LM and what the engine needs to know about it.

    Attributes:
        config: the transformers config.
        model: the meta-device model (its modules are materialized one at a time).
        ties_embeddings: lm_head reuses the input embedding.
        padding_idx: the embedding's padding row (autograd gives it no gradient), or None.
        tensor_shapes: module parameter name -> shape of every parameter, as the modules hold them.
        family: what the model does outside its layers.
        layout: the checkpoint's tensors of each module parameter (the same but for fused experts).
        additive_mask: the attention takes a float mask added to its scores (eager attention),
            not a boolean one (sdpa).
        embedding_multiplier: what the model multiplies the embedding output by (embedding_scale).
        logits_divisor, final_softcap: what the model does to lm_head's output (transform_logits).
    """

    config: object
    model: torch.nn.Module
    ties_embeddings: bool
    padding_idx: int | None
    tensor_shapes: dict[str, tuple[int, ...]]
    family: FamilyInfo
    layout: CheckpointLayout
    additive_mask: bool = False
    embedding_multiplier: float = 1.0
    logits_divisor: float = 1.0
    final_softcap: float | None = None

    @property
    def num_layers(self) -> int:
        return len(self.model.model.layers)

    def layer(self, index: int) -> torch.nn.Module:
        return self.model.model.layers[index]

    def layer_prefix(self, index: int) -> str:
        return f"{LAYER_PREFIX}{index}."

    def layer_tensor_names(self, index: int) -> dict[str, dict[str, str]]:
        """Module path inside the layer -> {parameter attribute -> module parameter name}."""
        prefix = self.layer_prefix(index)
        names: dict[str, dict[str, str]] = {}
        for path, module in self.layer(index).named_modules():
            for attr, _ in module.named_parameters(recurse=False):
                names.setdefault(path, {})[attr] = f"{prefix}{path}.{attr}" if path else f"{prefix}{attr}"
        return names

    @property
    def head_weight_name(self) -> str:
        return EMBED_TENSOR_NAME if self.ties_embeddings else LM_HEAD_TENSOR_NAME

    @property
    def norm_tensor_names(self) -> dict[str, str]:
        """The final norm's parameters: attribute -> tensor_name (a weight, and a bias where it has one)."""
        return {attr: NORM_PREFIX + attr for attr, _ in self.model.model.norm.named_parameters()}

    def sliding_window(self, index: int) -> int | None:
        """The attention window of layer `index` (None: full causal attention)."""
        window = getattr(self.config, "sliding_window", None)
        if self.family.window == WINDOW_ALL_LAYERS:
            return window
        if self.family.window == WINDOW_BY_LAYER_TYPE:
            layer_types = getattr(self.config, "layer_types", None) or []
            return window if index < len(layer_types) and layer_types[index] == "sliding_attention" else None
        return None

    def rotary(self, device: torch.device) -> torch.nn.Module:
        """The rotary position-embedding module with real buffers (it holds no weights)."""
        rotary_type = type(self.model.model.rotary_emb)
        return rotary_type(config=self.config).to(device)

    def rotary_layer_type(self, rotary: torch.nn.Module, index: int) -> str | None:
        """The `layer_type` argument the rotary module wants for layer `index` (Gemma 3 keeps one
        table per attention type), or None where it takes none."""
        if "layer_type" not in inspect.signature(rotary.forward).parameters:
            return None
        return self.config.layer_types[index]  # type: ignore[attr-defined]

    def embedding_scale(self, dtype: torch.dtype) -> float:
        """The factor the model multiplies the embedding output by, as it applies it in `dtype`
        (Gemma rounds sqrt(hidden) to the weights' dtype first)."""
        if self.family.embedding_scale == "sqrt_hidden":
            return float(torch.tensor(self.embedding_multiplier, dtype=torch.float32).to(dtype))
        return self.embedding_multiplier

    def transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What the model does to lm_head's output before the loss (Granite's divisor, Gemma's soft-cap)."""
        if self.logits_divisor != 1.0:
            logits = logits / self.logits_divisor
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


def _meta_model(config_dict: Mapping[str, object], *, ties_embeddings: bool | None, where: str) -> tuple[FamilyInfo, object, torch.nn.Module, bool]:
    """(family, transformers config, meta-device causal LM, whether its attention takes additive masks)."""
    family = family_of(config_dict, where=where)
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = CONFIG_MAPPING[family.model_type].from_dict(dict(config_dict))
    if ties_embeddings is not None:
        config.tie_word_embeddings = ties_embeddings
    # sdpa where the family allows it; Gemma 2 soft-caps its attention scores, which only the
    # eager attention does, and eager attention adds its mask to the scores. transformers before
    # 5.21 offers sdpa for Gemma 2 all the same and then skips the soft-capping, hence the second test.
    supports_sdpa = getattr(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], "_supports_sdpa", False)
    eager = not supports_sdpa or getattr(config, "attn_logit_softcapping", None) is not None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager" if eager else "sdpa")
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return family, config, model, eager


def config_tensor_shapes(config_dict: Mapping[str, object], *, where: str) -> dict[str, tuple[int, ...]]:
    """tensor_name -> shape of every parameter a checkpoint of this config stores (no weights read).

    Raises:
        ModelNotSupportedError: not a supported family.
    """
    family, _, model, _ = _meta_model(config_dict, ties_embeddings=None, where=where)
    return CheckpointLayout(family, {name: tuple(p.shape) for name, p in model.named_parameters()}).checkpoint_shapes


def build_skeleton(config_dict: Mapping[str, object], checkpoint_shapes: Mapping[str, tuple[int, ...]], *, ties_embeddings: bool, where: str) -> ModelSkeleton:
    """Build the meta-device model and check that it has exactly the checkpoint's tensors.

    Args:
        config_dict: the checkpoint's parsed config.json.
        checkpoint_shapes: tensor_name -> shape of every tensor the checkpoint stores.
        ties_embeddings: whether the checkpoint stores no lm_head (it reuses the embedding).
        where: the checkpoint's location, for messages.

    Raises:
        ModelNotSupportedError: not one of the families of plan/model_families.py.
        CheckpointError: the checkpoint's tensors differ from the model's parameters.
    """
    family, config, model, eager = _meta_model(config_dict, ties_embeddings=ties_embeddings, where=where)
    model_type = family.model_type
    module_shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    layout = CheckpointLayout(family, module_shapes)
    expected = layout.checkpoint_shapes
    problems = [f"{name} is missing from the checkpoint" for name in sorted(set(expected) - set(checkpoint_shapes))]
    problems += [f"{name} is in the checkpoint but not a parameter of {model_type}" for name in sorted(set(checkpoint_shapes) - set(expected))]
    problems += [
        f"{name} has shape {list(checkpoint_shapes[name])} in the checkpoint, {list(shape)} in the config"
        for name, shape in expected.items()
        if name in checkpoint_shapes and tuple(checkpoint_shapes[name]) != shape
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"{where}: the checkpoint does not match its config.json ({shown}); pass the directory save_pretrained wrote")
    embedding = model.model.embed_tokens
    return ModelSkeleton(
        config=config,
        model=model,
        ties_embeddings=ties_embeddings,
        padding_idx=embedding.padding_idx,
        tensor_shapes=module_shapes,
        family=family,
        layout=layout,
        additive_mask=eager,
        # From the resolved config: the family's defaults where config.json leaves a field out.
        embedding_multiplier=embedding_scale(family, config.to_dict()),
        logits_divisor=logits_divisor(config.to_dict()),
        final_softcap=final_logit_softcap(config.to_dict()),
    )


def materialize(module: torch.nn.Module, weights: Mapping[str, torch.Tensor], prefix: str) -> torch.nn.Module:
    """Give `module` the tensors named `prefix + <its parameter path>` (no copy), frozen."""
    state = {name[len(prefix) :]: tensor for name, tensor in weights.items() if name.startswith(prefix)}
    module.load_state_dict(state, strict=True, assign=True)
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def release(module: torch.nn.Module) -> None:
    """Return a materialized module to the meta device (frees its tensors)."""
    module.to("meta")


def attention_mask(valid: torch.Tensor, window: int | None, *, additive_dtype: torch.dtype | None = None) -> torch.Tensor:
    """[batch, 1, tokens, tokens] mask: causal, no padding keys, optional window.

    Boolean (True: attend) for sdpa; with `additive_dtype`, 0 where allowed and the dtype's
    lowest value elsewhere, as eager attention adds it to the scores.

    Right padding keeps every real query's keys real; a padding query still sees the real keys
    before it, so no row is empty (an empty row would give NaN).
    """
    tokens = valid.shape[1]
    positions = torch.arange(tokens, device=valid.device)
    allowed = positions[None, :] <= positions[:, None]
    if window is not None and window < tokens:
        allowed &= positions[:, None] - positions[None, :] < window
    mask = (allowed[None, :, :] & valid[:, None, :].bool())[:, None, :, :]
    if additive_dtype is None:
        return mask
    return torch.zeros(mask.shape, dtype=additive_dtype, device=mask.device).masked_fill_(~mask, torch.finfo(additive_dtype).min)



class _GradientOnlyLinear(torch.autograd.Function):
    """y = x Wᵀ for autograd's sake only: the backward is exact, the forward value is a stand-in.

    Forward returns zeros without memory behind them (a stride-0 view), so the matmul is not
    done; backward returns the true input gradient δ W. Valid only where nothing reads y's value.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return x.new_zeros(()).expand(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        return grad.matmul(weight), None


class LastProjectionSkipped:
    """Within the context, a decoder layer's MLP down projection computes no forward value.

    Only where the family's layer output is `residual + c * mlp.down_proj(...)`
    (FamilyInfo.last_projection_feeds_residual): the backward of that sum and of a linear map
    needs no forward value, so recomputing a layer only
    to backpropagate through it can skip this matmul (a quarter of the MLP's, about a fifth of
    the layer's) and still produce every input and gradient the statistics use. The module's
    hooks still run, so its per-sample statistics see the same input and output gradient.
    """

    def __init__(self, layer: torch.nn.Module):
        self._projection = layer.mlp.down_proj

    def __enter__(self) -> "LastProjectionSkipped":
        projection = self._projection
        projection.forward = lambda x: _GradientOnlyLinear.apply(x, projection.weight)
        return self

    def __exit__(self, *exc_info: object) -> None:
        del self._projection.forward
