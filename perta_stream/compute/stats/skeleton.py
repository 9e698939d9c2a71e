"""The model without weights: transformers modules on the meta device, materialized one at a time.

transformers builds the model's modules from its config with no memory behind the parameters
(meta device). The engine gives one module (a decoder layer, or the final norm and lm_head)
real tensors with `load_state_dict(assign=True)`, runs it, and returns it to the meta device, so
the code that runs a layer is exactly the library's, for every supported architecture.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from perta_stream.errors import CheckpointError, ModelNotSupportedError
from perta_stream.plan.stats_plan import EMBED_TENSOR_NAME, LAYER_PREFIX, LM_HEAD_TENSOR_NAME, SUPPORTED_MODEL_TYPES

NORM_TENSOR_NAME = "model.norm.weight"


@dataclass
class ModelSkeleton:
    """A meta-device causal LM and what the engine needs to know about it.

    Attributes:
        config: the transformers config.
        model: the meta-device model (its modules are materialized one at a time).
        ties_embeddings: lm_head reuses the input embedding.
        padding_idx: the embedding's padding row (autograd gives it no gradient), or None.
        tensor_shapes: tensor_name -> shape of every parameter, as the checkpoint stores them.
    """

    config: object
    model: torch.nn.Module
    ties_embeddings: bool
    padding_idx: int | None
    tensor_shapes: dict[str, tuple[int, ...]]

    @property
    def num_layers(self) -> int:
        return len(self.model.model.layers)

    def layer(self, index: int) -> torch.nn.Module:
        return self.model.model.layers[index]

    def layer_prefix(self, index: int) -> str:
        return f"{LAYER_PREFIX}{index}."

    def layer_tensor_names(self, index: int) -> dict[str, dict[str, str]]:
        """Module path inside the layer -> {parameter attribute -> tensor_name}."""
        prefix = self.layer_prefix(index)
        names: dict[str, dict[str, str]] = {}
        for path, module in self.layer(index).named_modules():
            for attr, _ in module.named_parameters(recurse=False):
                names.setdefault(path, {})[attr] = f"{prefix}{path}.{attr}" if path else f"{prefix}{attr}"
        return names

    @property
    def head_weight_name(self) -> str:
        return EMBED_TENSOR_NAME if self.ties_embeddings else LM_HEAD_TENSOR_NAME

    def sliding_window(self, index: int) -> int | None:
        """The attention window of layer `index` (None: full causal attention)."""
        window = getattr(self.config, "sliding_window", None)
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types is not None and getattr(self.config, "model_type", "") != "mistral":
            return window if layer_types[index] == "sliding_attention" else None
        return window if getattr(self.config, "model_type", "") == "mistral" else None

    def rotary(self, device: torch.device) -> torch.nn.Module:
        """The rotary position-embedding module with real buffers (it holds no weights)."""
        rotary_type = type(self.model.model.rotary_emb)
        return rotary_type(config=self.config).to(device)


def build_skeleton(config_dict: Mapping[str, object], checkpoint_shapes: Mapping[str, tuple[int, ...]], *, ties_embeddings: bool, where: str) -> ModelSkeleton:
    """Build the meta-device model and check that it has exactly the checkpoint's tensors.

    Args:
        config_dict: the checkpoint's parsed config.json.
        checkpoint_shapes: tensor_name -> shape of every tensor the checkpoint stores.
        ties_embeddings: whether the checkpoint stores no lm_head (it reuses the embedding).
        where: the checkpoint's location, for messages.

    Raises:
        ModelNotSupportedError: an architecture other than Llama, Mistral, Qwen2.
        CheckpointError: the checkpoint's tensors differ from the model's parameters.
    """
    model_type = str(config_dict.get("model_type", ""))
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelNotSupportedError(
            f"{where}: model_type {model_type or '(missing)'!r} is not supported by the statistics engine; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} (dense decoder-only transformers models)"
        )
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = CONFIG_MAPPING[model_type].from_dict(dict(config_dict))
    config.tie_word_embeddings = ties_embeddings
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
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
        tensor_shapes=expected,
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


def attention_mask(valid: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean [batch, 1, tokens, tokens] mask for sdpa: causal, no padding keys, optional window.

    Right padding keeps every real query's keys real; a padding query still sees the real keys
    before it, so no row is empty (an empty row would give NaN).
    """
    tokens = valid.shape[1]
    positions = torch.arange(tokens, device=valid.device)
    allowed = positions[None, :] <= positions[:, None]
    if window is not None and window < tokens:
        allowed &= positions[:, None] - positions[None, :] < window
    return (allowed[None, :, :] & valid[:, None, :].bool())[:, None, :, :]



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

    The layer's output is `residual + down_proj(...)` in every supported architecture, and the
    backward of that sum and of a linear map needs no forward value: recomputing a layer only
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
