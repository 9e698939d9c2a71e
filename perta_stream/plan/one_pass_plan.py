"""What a one-pass unlearn writes where, and what it costs next to the two-pass way (header-only).

One pass: a single layer-major statistics sweep at θ_0; as each group's statistics complete,
its tensors are merged into every output (one per (method, α)). Two passes: `stats` writes the
statistics directory, then one `merge` per method reads it back with the three models. The
figures below are what `unlearn --one-pass --dry-run` prints for both, so a user can see the
disk and the time they save before starting; they are derived from the statistics plan
(plan/stats_plan.py) and the sizes of the tensors to merge, nothing else.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from perta_stream.config.merge import output_dirs
from perta_stream.dtypes import DTYPE_BYTES
from perta_stream.memory import format_bytes
from perta_stream.plan.stats_plan import EMBED_GROUP, group_tensor_names


# The merge kernel's float32 scratch (compute/merge_kernel.py: 5 vectors of one block; on the
# CPU the one pass's blocks are SERIAL_BLOCK_ELEMENTS, 32 Ki); plan/ does not import torch code,
# so it is restated here.
KERNEL_SCRATCH_VECTORS = 5
KERNEL_SCRATCH_BYTES = KERNEL_SCRATCH_VECTORS * 4 * (1 << 15)
# Elements per merge chunk, and kernel block, when the one pass merges on a GPU: 16 Mi elements
# keep the per-op launch cost near a millisecond per chunk while each float32 scratch vector is
# 64 MiB.
DEVICE_CHUNK_ELEMENTS = 1 << 24
# Stored dtype -> the compute dtype sizes (bfloat16: 2, float32: 4) that hold its values exactly.
_EXACT_COMPUTE_BYTES = {"BF16": (2, 4), "F16": (4,), "F32": (4,)}


def one_pass_outputs(out: str, methods: tuple[str, ...], alphas: tuple[float, ...]) -> tuple[tuple[str, float, str], ...]:
    """(method, α, folder) of every output, in method then α order.

    One method uses `out` as `merge` does (see config.merge.output_dirs for several α). Several
    methods fill a `{method}` placeholder of `out`, or else go to `out/<method>`, each with the
    α layout of `merge` below it.
    """
    if len(methods) == 1 and "{method}" not in out:
        return tuple((methods[0], alpha, folder) for alpha, folder in zip(alphas, output_dirs(out, alphas)))
    found = []
    for method in methods:
        base = out.replace("{method}", method) if "{method}" in out else os.path.join(out, method)
        found += [(method, alpha, folder) for alpha, folder in zip(alphas, output_dirs(base, alphas))]
    return tuple(found)


@dataclass(frozen=True)
class WayCost:
    """The disk traffic and peak memory of one way of unlearning (bytes)."""

    bytes_read: int
    bytes_written: int
    scratch_disk_bytes: int
    peak_host_bytes: int
    peak_device_bytes: int


@dataclass(frozen=True)
class PassComparison:
    """One pass next to two passes, with the parts the totals are made of."""

    one_pass: WayCost
    two_pass: WayCost
    outputs: int
    output_bytes: int
    stats_bytes: int
    saved_stats_bytes: int
    boundary_spill_bytes: int
    device: str

    def to_text(self) -> str:
        rows = [
            ("bytes read", "bytes_read"),
            ("bytes written", "bytes_written"),
            ("scratch disk", "scratch_disk_bytes"),
            ("peak host RAM", "peak_host_bytes"),
            (f"peak {self.device} memory", "peak_device_bytes"),
        ]
        lines = [
            f"one pass vs two passes ({self.outputs} output(s) of {format_bytes(self.output_bytes)} each; "
            f"statistics {format_bytes(self.stats_bytes)}, boundary spill {format_bytes(self.boundary_spill_bytes)})",
            f"  {'':<20} {'one pass':>12} {'two passes':>12}",
        ]
        for label, attribute in rows:
            lines.append(f"  {label:<20} {format_bytes(getattr(self.one_pass, attribute)):>12} {format_bytes(getattr(self.two_pass, attribute)):>12}")
        lines.append(
            "  scratch disk = boundary spill + outputs"
            + (f" + saved statistics ({format_bytes(self.saved_stats_bytes)})" if self.saved_stats_bytes else "")
            + " (one pass); + the statistics directory (two passes)"
        )
        return "\n".join(lines)


def compare_passes(
    *,
    stats_read_bytes: int,
    stats_bytes: int,
    boundary_spill_bytes: int,
    stats_peak_host_bytes: int,
    stats_peak_device_bytes: int,
    model_read_bytes: int,
    theta0_loaded_bytes: int,
    output_bytes: int,
    outputs_per_method: tuple[int, ...],
    stat_methods: int,
    stats_per_method_bytes: int,
    merge_peak_host_bytes: int,
    merge_buffer_bytes: int,
    merge_device_bytes: int,
    save_stats: bool,
    device: str,
) -> PassComparison:
    """The two ways' costs.

    Args:
        stats_read_bytes, stats_bytes, boundary_spill_bytes, stats_peak_*: from the statistics
            plan (the weights the sweep reads; every statistic it computes, at the storage dtype).
        model_read_bytes: θ_0 + θ_full + θ_fgt bytes of the tensors to merge (one merge reads them once).
        theta0_loaded_bytes: θ_0 bytes the one pass's merge step takes from the sweep's loaded
            weights instead of reading them again.
        output_bytes: one output's size; outputs_per_method: α count per method.
        stat_methods: how many of the methods read statistics (grad, fisher);
            stats_per_method_bytes: the forget and retain statistics one such merge reads.
        merge_peak_host_bytes: a plain merge's estimated peak RSS;
            merge_buffer_bytes, merge_device_bytes: what the one-pass merge step adds to the
            sweep's host and device memory.
        save_stats: the one pass also writes the statistics directory (`--save-stats`).
    """
    outputs = sum(outputs_per_method)
    all_outputs = outputs * output_bytes
    saved = stats_bytes if save_stats else 0
    one = WayCost(
        # The merge step reads θ_full's and θ_fgt's tensors (and the θ_0 tensors the sweep has
        # not loaded) once, and reads each finished output shard back once to hash it.
        bytes_read=stats_read_bytes + model_read_bytes - theta0_loaded_bytes + all_outputs,
        bytes_written=all_outputs + boundary_spill_bytes + saved,
        scratch_disk_bytes=all_outputs + boundary_spill_bytes + saved,
        peak_host_bytes=stats_peak_host_bytes + merge_buffer_bytes,
        peak_device_bytes=stats_peak_device_bytes + merge_device_bytes,
    )
    two = WayCost(
        bytes_read=stats_read_bytes + len(outputs_per_method) * model_read_bytes + stat_methods * stats_per_method_bytes,
        bytes_written=stats_bytes + boundary_spill_bytes + all_outputs,
        scratch_disk_bytes=stats_bytes + boundary_spill_bytes + all_outputs,
        peak_host_bytes=max(stats_peak_host_bytes, merge_peak_host_bytes),
        peak_device_bytes=stats_peak_device_bytes,
    )
    return PassComparison(one, two, outputs, output_bytes, stats_bytes, saved, boundary_spill_bytes, device)


def loaded_tensor_names(tensors: dict[str, tuple[tuple[int, ...], str]], num_layers: int, compute_dtype_bytes: int) -> set[str]:
    """The tensors whose θ_0 values the merge step takes from the sweep's loaded weights: every
    layer and head tensor whose stored dtype the compute dtype holds exactly (not the embedding:
    it is loaded at the start of the sweep and merged at its end)."""
    groups = group_tensor_names(tensors, num_layers)
    return {
        name
        for group, names in groups.items()
        if group != EMBED_GROUP
        for name in names
        if compute_dtype_bytes in _EXACT_COMPUTE_BYTES.get(tensors[name][1], ())
    }


def theta0_loaded_bytes(tensors: dict[str, tuple[tuple[int, ...], str]], num_layers: int, compute_dtype_bytes: int) -> int:
    """θ_0 bytes of `loaded_tensor_names`."""
    return sum(math.prod(tensors[name][0]) * DTYPE_BYTES[tensors[name][1]] for name in loaded_tensor_names(tensors, num_layers, compute_dtype_bytes))


def merge_step_bytes(
    *,
    chunk_elements: int,
    input_itemsizes: list[int],
    out_itemsize: int,
    outputs_per_method: int,
    shapes: dict[str, tuple[int, ...]],
    num_layers: int,
    kinds: int,
    compute_dtype_bytes: int,
    device: str,
    merge_on_device: bool,
) -> tuple[int, int]:
    """What the merge step adds to the sweep's (host, device) memory.

    - CPU sweep: the chunk buffers (θ_0, θ_full, θ_fgt in, one out per α) and the kernel's blocks.
    - GPU sweep, merge on the host: the same, plus one more group of float32 statistics on the
      host (the group merged in the background while the next is computed); on the device, the
      layer being merged keeps its weights a little longer (the merge reads θ_0 from them).
    - GPU sweep, merge on the GPU: page-locked chunk buffers of DEVICE_CHUNK_ELEMENTS on the
      host; on the device the same buffers, the kernel's scratch, that layer's weights, and the
      group's statistics of both datasets, which stay where they were computed until merged.
    """
    per_element = sum(input_itemsizes) + out_itemsize * outputs_per_method
    if device == "cpu":
        return chunk_elements * per_element + KERNEL_SCRATCH_BYTES, 0
    groups = group_tensor_names(shapes, num_layers)
    largest = max(sum(math.prod(shapes[name]) for name in names) for names in groups.values())
    layer_weights = largest * compute_dtype_bytes
    if not merge_on_device:
        return chunk_elements * per_element + KERNEL_SCRATCH_BYTES + largest * 4 * kinds, layer_weights
    chunk_buffers = DEVICE_CHUNK_ELEMENTS * per_element
    kernel_scratch = DEVICE_CHUNK_ELEMENTS * KERNEL_SCRATCH_VECTORS * 4
    return chunk_buffers, chunk_buffers + kernel_scratch + layer_weights + 2 * largest * 4 * kinds


@dataclass(frozen=True)
class ModelReads:
    """Model bytes a run reads for each kind of θ_fgt (weights and adapters; the boundary spill,
    which depends on the data, and the outputs' read-back for hashing are apart).

    Attributes:
        rows: (label, one pass, two passes) bytes of model reads.
        model_bytes: one model's size (the unit the rows are also given in).
        spill_bytes: layer-boundary states written to disk and read back once.
        spill_hint: how to keep the boundaries in RAM, or "" when they already are.
    """

    rows: tuple[tuple[str, int, int], ...]
    model_bytes: int
    spill_bytes: int
    spill_hint: str = ""

    def to_text(self) -> str:
        lines = [f"model bytes read, by input (one model: {format_bytes(self.model_bytes)}; boundary spill apart)", f"  {'':<46} {'one pass':>22} {'two passes':>22}"]
        for label, one, two in self.rows:
            cells = [f"{format_bytes(value)} ({value / max(self.model_bytes, 1):.2f}x)" for value in (one, two)]
            lines.append(f"  {label:<46} {cells[0]:>22} {cells[1]:>22}")
        lines.append(f"  boundary spill: {format_bytes(self.spill_bytes)} written and read back, whichever the inputs")
        if self.spill_hint:
            lines.append(f"  {self.spill_hint}")
        return "\n".join(lines)


def model_reads(
    *,
    stats_read_bytes: int,
    model_bytes: int,
    theta0_loaded_bytes: int,
    adapter_bytes: int,
    adapter_label: str,
    spill_bytes: int,
    spill_hint: str = "",
) -> ModelReads:
    """The reads of a dense θ_fgt, an adapter θ_fgt, and an adapter with θ_full = θ_0.

    Args:
        stats_read_bytes: the sweep's weight reads (θ_0: forward and backward).
        model_bytes: one model's tensor bytes.
        theta0_loaded_bytes: θ_0 bytes the one pass's merge takes from the sweep's loaded weights
            (every layer and head tensor when the compute dtype holds the stored one).
        adapter_bytes: the adapter's factors (and the θ_0 rows DoRA needs, when not loaded).
    """
    dense = (stats_read_bytes + 3 * model_bytes - theta0_loaded_bytes, stats_read_bytes + 3 * model_bytes)
    adapter = (stats_read_bytes + model_bytes + adapter_bytes,) * 2
    # θ_full = θ_0: the merge writes θ_0's loaded values (and their adapted ones); only the
    # embedding, merged when the sweep ends, is read again.
    same = (stats_read_bytes + model_bytes - theta0_loaded_bytes + adapter_bytes, stats_read_bytes + model_bytes + adapter_bytes)
    rows = (
        ("dense θ_fgt", *dense),
        (f"{adapter_label} θ_fgt", *adapter),
        (f"{adapter_label} θ_fgt, θ_full = θ_0", *same),
    )
    return ModelReads(rows, model_bytes, spill_bytes, spill_hint)


def spill_hint(*, boundary_bytes: int, spill_bytes: int, budget_bytes: int, available_ram_bytes: int, fraction: float) -> str:
    """What would keep the layer-boundary states in RAM on this machine (empty without a spill)."""
    if spill_bytes <= 0:
        return ""
    if boundary_bytes <= available_ram_bytes:
        return f"--boundary-budget {format_bytes(boundary_bytes)} (this machine has {format_bytes(available_ram_bytes)} available) keeps every boundary in RAM: no spill"
    # The boundaries grow with the tokens, so with the sampled fraction.
    fitting = fraction * min(budget_bytes, available_ram_bytes) / boundary_bytes if boundary_bytes else fraction
    return (
        f"the boundaries ({format_bytes(boundary_bytes)}) exceed this machine's available RAM ({format_bytes(available_ram_bytes)}); "
        f"--fraction {fitting:.3g} or less would keep them in the --boundary-budget"
    )
