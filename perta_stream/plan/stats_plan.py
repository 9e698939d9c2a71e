"""Pure planning for `perta-stream stats`: model shape, tensor groups, batches, and the estimate.

Nothing here reads a tensor byte or imports torch, so `--dry-run` is instant and the estimate for
a 70B model can be printed from its config.json alone (`--dry-run --config-only`). The same
functions decide the layout the engine really uses (tensor groups -> output shards, batches), so
the plan and the run cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from perta_stream.errors import ModelNotSupportedError
from perta_stream.memory import format_bytes
from perta_stream.plan.model_families import family_of

CPU_BLOCK_ELEMENTS = 4_718_592
"""On CPU, per-sample weight gradients are formed this many elements (18 MiB float32) at a time."""
ROUNDING_CHUNK_ELEMENTS = 1 << 24
"""Statistics elements rounded to the storage dtype at a time when a shard is written (64 MiB of float32)."""
EMBED_TENSOR_NAME = "model.embed_tokens.weight"
LM_HEAD_TENSOR_NAME = "lm_head.weight"
EMBED_GROUP = "embed"
HEAD_GROUP = "head"
LAYER_PREFIX = "model.layers."
# RSS of a Python process that has imported torch and transformers, measured on this project's
# CPU image (about 0.5 GiB); the estimate adds it so "peak host memory" means the whole process.
BASELINE_HOST_BYTES = 550 * 2**20
_WEIGHT_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def layer_group(index: int) -> str:
    return f"layer.{index}"


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a supported decoder-only model, read from its config.json.

    `num_experts` is 0 for a dense model; in a mixture-of-experts model each token runs
    `experts_per_token` of the `num_experts` experts, each of width `expert_intermediate_size`.
    """

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    ties_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    weight_dtype_bytes: int
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0

    @classmethod
    def from_config(cls, config: Mapping[str, object], *, ties_embeddings: bool | None = None, where: str = "config.json") -> "ModelShape":
        """Read the dimensions; `ties_embeddings` overrides the config (the checkpoint decides).

        Raises:
            ModelNotSupportedError: not a supported family (model_families.FAMILIES), or fields are missing.
        """
        family = family_of(config, where=where)
        model_type = family.model_type
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size") if not isinstance(config.get(k), int)]
        if missing:
            raise ModelNotSupportedError(f"{where}: config lacks integer field(s) {', '.join(missing)}; is it a complete {model_type} config?")
        hidden = int(config["hidden_size"])  # type: ignore[arg-type]
        heads = int(config["num_attention_heads"])  # type: ignore[arg-type]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
        dtype_name = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
        tied = bool(config.get("tie_word_embeddings", False)) if ties_embeddings is None else ties_embeddings
        attention_bias = bool(config.get("attention_bias", False))
        return cls(
            model_type=model_type,
            hidden_size=hidden,
            num_layers=int(config["num_hidden_layers"]),  # type: ignore[arg-type]
            num_heads=heads,
            num_kv_heads=int(kv_heads),  # type: ignore[arg-type]
            head_dim=int(head_dim),  # type: ignore[arg-type]
            intermediate_size=int(config["intermediate_size"]),  # type: ignore[arg-type]
            vocab_size=int(config["vocab_size"]),  # type: ignore[arg-type]
            ties_embeddings=tied,
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(config.get("mlp_bias", False)),
            weight_dtype_bytes=_WEIGHT_DTYPE_BYTES.get(dtype_name, 2),
            num_experts=int(config.get("num_local_experts") or config.get("num_experts") or 0) if family.mixture_of_experts else 0,  # type: ignore[arg-type]
            experts_per_token=int(config.get("num_experts_per_tok") or 0) if family.mixture_of_experts else 0,  # type: ignore[arg-type]
            expert_intermediate_size=int(config.get("moe_intermediate_size") or config["intermediate_size"]) if family.mixture_of_experts else 0,  # type: ignore[arg-type]
        )

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's name and shape for the Llama layout (llama, mistral, qwen2, granite).

        Other families' layers hold other tensors; their shapes come from the meta-device model
        (`compute.stats.skeleton.config_tensor_shapes`), which needs transformers.
        """
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {EMBED_TENSOR_NAME: (self.vocab_size, h)}
        for layer in range(self.num_layers):
            p = f"{LAYER_PREFIX}{layer}."
            shapes[p + "input_layernorm.weight"] = (h,)
            for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                shapes[p + f"self_attn.{proj}.weight"] = (rows, h)
                if self.qkv_bias:
                    shapes[p + f"self_attn.{proj}.bias"] = (rows,)
            shapes[p + "self_attn.o_proj.weight"] = (h, q)
            if self.o_bias:
                shapes[p + "self_attn.o_proj.bias"] = (h,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
            for proj, out_features, in_features in (("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)):
                shapes[p + f"mlp.{proj}.weight"] = (out_features, in_features)
                if self.mlp_bias:
                    shapes[p + f"mlp.{proj}.bias"] = (out_features,)
        shapes["model.norm.weight"] = (h,)
        if not self.ties_embeddings:
            shapes[LM_HEAD_TENSOR_NAME] = (self.vocab_size, h)
        return shapes


def group_of(tensor_name: str) -> str:
    """The group (and so the output shard) of a tensor: `embed`, `layer.<i>` or `head`."""
    if tensor_name == EMBED_TENSOR_NAME:
        return EMBED_GROUP
    if tensor_name.startswith(LAYER_PREFIX):
        index = tensor_name[len(LAYER_PREFIX) :].split(".", 1)[0]
        if index.isdigit():
            return layer_group(int(index))
    return HEAD_GROUP


def group_tensor_names(tensor_names: Iterable[str], num_layers: int) -> dict[str, list[str]]:
    """Tensor names by group, in shard order: embed, layer.0 .. layer.{L-1}, head (names sorted).

    Every group is present, even an empty one, so shard numbers depend on the layer count only.
    """
    groups: dict[str, list[str]] = {EMBED_GROUP: []}
    groups.update({layer_group(i): [] for i in range(num_layers)})
    groups[HEAD_GROUP] = []
    for tensor_name in tensor_names:
        groups.setdefault(group_of(tensor_name), []).append(tensor_name)
    return {group: sorted(names) for group, names in groups.items()}


def plan_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Sample indices per batch: longest first (an out-of-memory shows in the first batch) and
    similar lengths together, so little compute and boundary storage is spent on padding."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


@dataclass(frozen=True)
class StatsPlan:
    """What a statistics run will read, write, store and compute (all sizes in bytes)."""

    model_type: str
    num_layers: int
    num_parameters: int
    samples: dict[str, int]
    tokens: dict[str, int]
    padded_tokens: int
    tokens_estimated: bool
    kinds: tuple[str, ...]
    device: str
    bytes_read: int
    bytes_written: int
    boundary_bytes: int
    boundary_ram_bytes: int
    boundary_spill_bytes: int
    peak_host_bytes: int
    peak_device_bytes: int
    flops: float

    def to_text(self) -> str:
        samples = ", ".join(f"{name} {count} samples / {self.tokens[name]} tokens" for name, count in self.samples.items())
        estimated = " (estimated from characters: no tokenizer used)" if self.tokens_estimated else ""
        lines = [
            f"statistics plan: {self.model_type}, {self.num_layers} layers, {self.num_parameters / 1e9:.3f} B parameters, kinds {','.join(self.kinds)}",
            f"  data:            {samples}{estimated}; {self.padded_tokens} tokens with padding",
            f"  read:            {format_bytes(self.bytes_read)} (each decoder layer twice: forward, then backward)",
            f"  write:           {format_bytes(self.bytes_written)} of statistics",
            f"  boundaries:      {format_bytes(self.boundary_bytes)} of layer-boundary hidden states at the peak; "
            f"{format_bytes(self.boundary_ram_bytes)} in RAM, {format_bytes(self.boundary_spill_bytes)} spilled to disk",
            f"  peak host RAM:   {format_bytes(self.peak_host_bytes)} (estimate, whole process)",
            f"  peak {self.device + ' memory:':<11} {format_bytes(self.peak_device_bytes)} (estimate)",
            f"  compute:         {self.flops / 1e12:.2f} TFLOP (forward, recomputed forward, backward, per-sample gradients)",
        ]
        return "\n".join(lines)


def plan_stats(
    shape: ModelShape,
    tensor_shapes: Mapping[str, tuple[int, ...]],
    *,
    lengths: Mapping[str, Sequence[int]],
    batch_size: int,
    kinds: tuple[str, ...],
    stats_dtype_bytes: int,
    compute_dtype_bytes: int,
    boundary_budget_bytes: int,
    device: str,
    weight_bytes: Mapping[str, int] | None = None,
    tokens_estimated: bool = False,
) -> StatsPlan:
    """Estimate a run from the model's tensor shapes and the token count of every sample.

    Args:
        shape: the model's dimensions.
        tensor_shapes: tensor_name -> shape of every stored tensor (the checkpoint's, or derived).
        lengths: dataset name -> token count of each sample.
        weight_bytes: tensor_name -> stored bytes (defaults to the config's dtype size).
        device: `cpu` or `cuda` (where the compute runs; on cpu, device memory is host memory).

    Returns:
        The plan; memory figures are estimates with the assumptions stated in the module.
    """
    groups = group_tensor_names(tensor_shapes, shape.num_layers)
    numel = {name: math.prod(dims) for name, dims in tensor_shapes.items()}
    stored = {name: (weight_bytes or {}).get(name, numel[name] * shape.weight_dtype_bytes) for name in tensor_shapes}
    group_bytes = {g: sum(stored[n] for n in names) for g, names in groups.items()}
    group_numel = {g: sum(numel[n] for n in names) for g, names in groups.items()}
    layer_groups = [layer_group(i) for i in range(shape.num_layers)]
    head_bytes = group_bytes[HEAD_GROUP] + (stored.get(EMBED_TENSOR_NAME, 0) if shape.ties_embeddings else 0)
    bytes_read = group_bytes[EMBED_GROUP] + 2 * sum(group_bytes[g] for g in layer_groups) + head_bytes
    total_numel = sum(numel.values())
    bytes_written = len(lengths) * len(kinds) * total_numel * stats_dtype_bytes

    padded = 0
    attention_flops = 0.0
    widest_batch_tokens = 0
    widest = 0
    for sample_lengths in lengths.values():
        for batch in plan_batches(sample_lengths, batch_size):
            width = max(sample_lengths[i] for i in batch)
            padded += width * len(batch)
            widest = max(widest, width)
            widest_batch_tokens = max(widest_batch_tokens, width * len(batch))
            attention_flops += 4.0 * len(batch) * width * width * shape.num_heads * shape.head_dim
    real_tokens = {name: sum(values) for name, values in lengths.items()}
    hidden_bytes = padded * shape.hidden_size * compute_dtype_bytes
    boundary_bytes = (shape.num_layers + 1) * hidden_bytes
    if shape.ties_embeddings and "fisher" in kinds:
        # each sample's lm_head gradient rows at its token ids wait for the embedding step
        boundary_bytes += sum(real_tokens.values()) * shape.hidden_size * 4
    boundary_ram = min(boundary_bytes, boundary_budget_bytes)

    largest_layer = max((group_numel[g] for g in layer_groups), default=0)
    # Expert weights (stored per expert, or fused [experts, rows, columns]) get the generic rule
    # in one fused module per layer: one sample at a time, a float32 copy of the layer's experts,
    # the sample's dense gradient and its square.
    expert_numel = {n: numel[n] for n in tensor_shapes if n.startswith(LAYER_PREFIX) and ".experts." in n}
    experts_by_layer: dict[str, int] = {}
    for tensor_name, count in expert_numel.items():
        experts_by_layer[group_of(tensor_name)] = experts_by_layer.get(group_of(tensor_name), 0) + count
    generic_scratch = 3 * 4 * max(experts_by_layer.values(), default=0)
    largest_matrix = max((numel[n] for n in tensor_shapes if len(tensor_shapes[n]) == 2 and n != EMBED_TENSOR_NAME and n not in expert_numel), default=0)
    head_matrix = shape.vocab_size * shape.hidden_size
    per_sample_numel = min(largest_matrix, CPU_BLOCK_ELEMENTS) if device == "cpu" else largest_matrix
    per_sample_matrix = 4 * (per_sample_numel if "fisher" in kinds else 0)
    accumulator_factor = 4 * len(kinds)
    intermediate = max(shape.intermediate_size, shape.experts_per_token * shape.expert_intermediate_size)
    layer_activations = widest_batch_tokens * (8 * shape.hidden_size + 6 * intermediate) * 4 + 3 * 4 * widest_batch_tokens * widest * shape.num_heads
    layer_device = (
        2 * largest_layer * compute_dtype_bytes
        + largest_layer * accumulator_factor
        + per_sample_matrix
        + generic_scratch
        + layer_activations
    )
    head_device = (
        head_matrix * compute_dtype_bytes
        + largest_layer * compute_dtype_bytes
        + head_matrix * accumulator_factor
        + (4 * head_matrix if "fisher" in kinds else 0)
        + 3 * 4 * widest_batch_tokens * shape.vocab_size
    )
    peak_device = max(layer_device, head_device)
    staging = 2 * max(max(group_bytes.values()), head_bytes)
    # A finished group's float32 statistics move to the host and are written on a background
    # thread while the next group is computed (two groups at most); each kind's shard rounds one
    # chunk at a time.
    flush_buffers = 2 * max(group_numel.values()) * 4 * len(kinds) + len(kinds) * min(max(numel.values()), ROUNDING_CHUNK_ELEMENTS) * stats_dtype_bytes
    tied_accumulators = head_matrix * accumulator_factor * len(lengths) if shape.ties_embeddings else 0
    if device == "cpu":
        peak_host = BASELINE_HOST_BYTES + boundary_ram + peak_device + flush_buffers + tied_accumulators
    else:
        peak_host = BASELINE_HOST_BYTES + boundary_ram + staging + flush_buffers + tied_accumulators
    linear_numel = total_numel - numel.get(EMBED_TENSOR_NAME, 0) - (0 if shape.ties_embeddings else head_matrix)
    if shape.num_experts:
        # Each token runs experts_per_token of the num_experts experts.
        linear_numel -= sum(expert_numel.values()) * (1 - shape.experts_per_token / shape.num_experts)
    # The head is counted at every position: an upper bound, as it runs only where the loss reads.
    flops = 8.0 * linear_numel * padded + 6.0 * head_matrix * padded + 4 * attention_flops
    return StatsPlan(
        model_type=shape.model_type,
        num_layers=shape.num_layers,
        num_parameters=total_numel,
        samples={name: len(values) for name, values in lengths.items()},
        tokens=real_tokens,
        padded_tokens=padded,
        tokens_estimated=tokens_estimated,
        kinds=kinds,
        device=device,
        bytes_read=bytes_read,
        bytes_written=bytes_written,
        boundary_bytes=boundary_bytes,
        boundary_ram_bytes=boundary_ram,
        boundary_spill_bytes=boundary_bytes - boundary_ram,
        peak_host_bytes=peak_host,
        peak_device_bytes=peak_device,
        flops=flops,
    )
