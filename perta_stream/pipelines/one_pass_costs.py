"""What a one-pass unlearn costs next to the two-pass way, from the plans (printed by --dry-run).

The figures come from the statistics plan and the merge plan (plan/one_pass_plan.py computes
them); this module gathers them from a run's options and plans, or from a config.json alone
(`--config-only`), and says where the merge step runs.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from perta_stream.config.merge import DEFAULT_TAU
from perta_stream.config.unlearn import STATS_METHODS, UnlearnConfig
from perta_stream.plan.merge_plan import MODEL_ROLES, MergePlan
from perta_stream.dtypes import DTYPE_BYTES
from perta_stream.plan.finetune_memory import lora_parameter_count
from perta_stream.plan.one_pass_plan import (
    ModelReads,
    PassComparison,
    compare_passes,
    loaded_tensor_names,
    merge_step_bytes,
    model_reads,
    spill_hint,
    theta0_loaded_bytes,
)
from perta_stream.plan.stats_plan import ModelShape, StatsPlan
from perta_stream.pipelines.stats_steps import model_config_path

if TYPE_CHECKING:
    import torch

    from perta_stream.config.stats import StatsConfig

MERGE_CHUNK_BYTES = 2**20


def tau_of(config: UnlearnConfig, method: str) -> float | None:
    if method not in STATS_METHODS:
        return None
    return config.tau if config.tau is not None else DEFAULT_TAU[method]


def merge_device(config: UnlearnConfig, device_name: str) -> torch.device:
    """Where the merge step runs: on the sweep's GPU, where the statistics and θ_0 already are
    (nothing but θ_full, θ_fgt and the outputs crosses to the host), when its arithmetic is
    bitwise the CPU's for every method (compute/weights.py: exponent_is_portable); else on the CPU."""
    import torch

    from perta_stream.compute.weights import exponent_is_portable

    device = torch.device(device_name)
    portable = all(exponent_is_portable(method, tau_of(config, method) or 1.0) for method in config.methods)
    return device if device.type == "cuda" and portable else torch.device("cpu")


def one_pass_comparison(config: UnlearnConfig, stats_plan: StatsPlan, plan: MergePlan, shapes: dict[str, tuple[int, ...]], compute_dtype_bytes: int) -> PassComparison:
    merged = [task for task in plan.tasks if task.action == "merge"]
    widest = [max((t.sources[role].itemsize for t in plan.tasks if role in t.sources), default=0) for role in MODEL_ROLES]
    out_itemsize = max((int(t.out_spec.nbytes / max(t.numel, 1)) for t in plan.tasks), default=4)
    return _compare(
        config,
        stats_plan,
        merged_numel=sum(task.numel for task in merged),
        model_read_bytes=plan.bytes_to_read,
        theta0_loaded_bytes=merge_bytes_loaded(plan, stats_plan.num_layers, compute_dtype_bytes) if config.effective_stats_model == config.theta0 else 0,
        output_bytes=sum(shard.nbytes for shard in plan.shards),
        merge_peak_host_bytes=plan.estimated_peak_rss_bytes,
        merge_buffers=(plan.chunk_elements, widest, out_itemsize, shapes, compute_dtype_bytes),
    )


def merge_bytes_loaded(plan: MergePlan, num_layers: int, compute_dtype_bytes: int) -> int:
    """Bytes the one pass's merge step takes from the sweep's loaded θ_0 instead of reading them:
    θ_0's chunks, θ_full's when it is θ_0 (also of the tensors an adapter leaves alone), DoRA's rows."""
    theta0 = plan.inputs["theta0"]
    loaded = loaded_tensor_names({n: (i.shape, i.dtype) for n, i in theta0.tensors.items()}, num_layers, compute_dtype_bytes)
    total = 0
    for task in plan.tasks:
        if task.tensor_name not in loaded:
            continue
        if "theta0" in task.sources:
            total += task.sources["theta0"].nbytes
        elif plan.full_is_theta0 and (task.action == "merge" or task.reason == "not changed by the fgt adapter"):
            total += task.sources["full"].nbytes
        if task.delta is not None and task.delta.low_rank is not None and task.delta.low_rank.magnitude is not None:
            total += task.theta0_rows.nbytes
    return total


def reads_by_input(config: UnlearnConfig, stats_plan: StatsPlan, theta0_tensors: dict[str, tuple[tuple[int, ...], str]], compute_dtype_bytes: int, adapter_bytes: int, adapter_label: str) -> ModelReads:
    """The model reads of a dense θ_fgt, an adapter, an adapter with θ_full = θ_0 (plan/one_pass_plan.py: model_reads)."""
    import psutil

    model_bytes = sum(math.prod(shape) * DTYPE_BYTES[dtype] for shape, dtype in theta0_tensors.values())
    hint = spill_hint(
        boundary_bytes=stats_plan.boundary_bytes,
        spill_bytes=stats_plan.boundary_spill_bytes,
        budget_bytes=config.boundary_budget_bytes,
        available_ram_bytes=max(0, psutil.virtual_memory().available - stats_plan.peak_host_bytes + stats_plan.boundary_ram_bytes),
        fraction=config.fraction,
    )
    return model_reads(
        stats_read_bytes=stats_plan.bytes_read,
        model_bytes=model_bytes,
        theta0_loaded_bytes=theta0_loaded_bytes(theta0_tensors, stats_plan.num_layers, compute_dtype_bytes),
        adapter_bytes=adapter_bytes,
        adapter_label=adapter_label,
        spill_bytes=stats_plan.boundary_spill_bytes,
        spill_hint=hint,
    )


def run_reads(config: UnlearnConfig, stats_plan: StatsPlan, plan: MergePlan, compute_dtype_bytes: int) -> ModelReads:
    """`reads_by_input` for a run's models: its adapter's bytes, or an assumed rank-16 LoRA on every linear module."""
    theta0 = plan.inputs["theta0"]
    tensors = {name: (info.shape, info.dtype) for name, info in theta0.tensors.items()}
    adapter = plan.fgt_adapter
    if adapter is not None:
        return reads_by_input(config, stats_plan, tensors, compute_dtype_bytes, adapter.total_bytes, f"this rank-{adapter.config.get('r')} adapter")
    itemsize = max((info.itemsize for info in theta0.tensors.values()), default=2)
    assumed = lora_bytes({n: i.shape for n, i in theta0.tensors.items()}, ASSUMED_RANK, itemsize)
    return reads_by_input(config, stats_plan, tensors, compute_dtype_bytes, assumed, f"rank-{ASSUMED_RANK} LoRA (all linear)")


def lora_bytes(shapes: dict[str, tuple[int, ...]], rank: int, dtype_bytes: int) -> int:
    """A rank-`rank` LoRA's factor bytes on every linear module (every 2-D tensor of a decoder layer)."""
    return lora_parameter_count(shapes, rank) * dtype_bytes


def _compare(
    config: UnlearnConfig,
    stats_plan: StatsPlan,
    *,
    merged_numel: int,
    merge_buffers: tuple[int, list[int], int, dict[str, tuple[int, ...]], int],
    **model_figures: Any,
) -> PassComparison:
    """`compare_passes` with the figures that come from the statistics plan and the options; the
    model's figures (reads, output, merge memory) are given, the merge step's memory as
    (chunk elements, input itemsizes, output itemsize, tensor shapes, compute dtype bytes)."""
    stats_itemsize = 4 if (config.stats_dtype or "F32") == "F32" else 2
    chunk_elements, input_itemsizes, out_itemsize, shapes, compute_dtype_bytes = merge_buffers
    merge_host_bytes, merge_device_bytes = merge_step_bytes(
        chunk_elements=chunk_elements,
        input_itemsizes=input_itemsizes,
        out_itemsize=out_itemsize,
        outputs_per_method=len(config.alphas),
        shapes=shapes,
        num_layers=stats_plan.num_layers,
        kinds=len(stats_plan.kinds),
        compute_dtype_bytes=compute_dtype_bytes,
        device=stats_plan.device,
        merge_on_device=merge_device(config, stats_plan.device).type != "cpu",
    )
    return compare_passes(
        merge_buffer_bytes=merge_host_bytes,
        merge_device_bytes=merge_device_bytes,
        stats_read_bytes=stats_plan.bytes_read,
        stats_bytes=stats_plan.bytes_written,
        boundary_spill_bytes=stats_plan.boundary_spill_bytes,
        stats_peak_host_bytes=stats_plan.peak_host_bytes,
        stats_peak_device_bytes=stats_plan.peak_device_bytes,
        outputs_per_method=tuple(len(config.alphas) for _ in config.methods),
        stat_methods=len(config.stat_methods),
        stats_per_method_bytes=2 * merged_numel * stats_itemsize,
        save_stats=bool(config.save_stats),
        device=stats_plan.device,
        **model_figures,
    )


ASSUMED_RANK = 16


def config_only_comparison(config: UnlearnConfig, stats_config: StatsConfig) -> tuple[PassComparison, StatsPlan, ModelReads]:
    """The figures from a config.json alone (e.g. configs/llama-70b-config.json): no weights needed;
    the adapter rows assume a rank-16 LoRA on every linear module."""
    import math

    from perta_stream.pipelines.stats import config_only_plan

    stats_plan = config_only_plan(stats_config).plan
    config_path = model_config_path(stats_config.model)
    shape_config = json.loads(config_path.read_text(encoding="utf-8"))
    shape = ModelShape.from_config(shape_config, where=str(config_path))
    numel = sum(math.prod(dims) for dims in shape.tensor_shapes().values())
    model_bytes = numel * shape.weight_dtype_bytes
    chunk_elements = MERGE_CHUNK_BYTES // shape.weight_dtype_bytes
    stored_dtype = {4: "F32", 2: "BF16"}.get(shape.weight_dtype_bytes, "BF16")
    compute_dtype_bytes = 4 if stats_config.compute_dtype_on(stats_plan.device) == "float32" else 2
    comparison = _compare(
        config,
        stats_plan,
        merged_numel=numel,
        model_read_bytes=3 * model_bytes,
        theta0_loaded_bytes=theta0_loaded_bytes(
            {name: (dims, stored_dtype) for name, dims in shape.tensor_shapes().items()}, shape.num_layers, compute_dtype_bytes
        ),
        output_bytes=model_bytes,
        merge_peak_host_bytes=config.max_memory_bytes,
        merge_buffers=(chunk_elements, [shape.weight_dtype_bytes] * 3, shape.weight_dtype_bytes, shape.tensor_shapes(), compute_dtype_bytes),
    )
    tensors = {name: (dims, stored_dtype) for name, dims in shape.tensor_shapes().items()}
    adapter = lora_bytes(shape.tensor_shapes(), ASSUMED_RANK, shape.weight_dtype_bytes)
    reads = reads_by_input(config, stats_plan, tensors, compute_dtype_bytes, adapter, f"rank-{ASSUMED_RANK} LoRA (all linear)")
    return comparison, stats_plan, reads
