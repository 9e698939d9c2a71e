"""One-pass unlearn on a GPU at Llama-70B width, extrapolated to 80 layers (one prepared script).

    python3 benchmarks/gpu_one_pass.py                  # on a CUDA machine (about 3 minutes on an H200)
    .venv/bin/python benchmarks/gpu_one_pass.py --smoke # tiny shapes on CPU: checks the script (writes nothing)

θ_0 is a random bf16 Llama with the width of Llama-70B (hidden 8192, 64 heads, 8 KV heads,
intermediate 28672, vocab 128256, untied) and `--layers` decoder layers; θ_full and θ_fgt are θ_0
plus seeded noise (1e-3) in every tensor. The three are made in a child process on the GPU and
written as 5 GB shards (fsynced: the write speed is measured there). Every input file is then
dropped from the page cache (fsync + POSIX_FADV_DONTNEED), so the run reads from the disk.

Measured, in this process: `perta-stream unlearn --one-pass --method fisher --alpha 1` on the
bundled TOFU forget10 + retain90 at `--fraction 0.2` (the 70B target's data): wall time, peak GPU
memory, peak RSS, and the time of each decoder layer in the forward and in the backward sweep
(each read off when the engine starts the next layer; the backward's includes the previous
layer's merge, which runs beside it).

Extrapolation to 80 layers (the first layer of each sweep carries one-time costs, e.g. the
Triton kernels' compilation, so the per-layer figures are the means of the later layers and the
first layers' excess is counted once, in the rest):
  forward_s  = max(measured forward per layer × target_tokens / measured_tokens,
                   the layer's θ_0 read at the measured cold read speed)
  backward_s = max(measured backward per layer (statistics; the merge runs beside it) × the same,
                   the layer's θ_0, θ_full, θ_fgt read and the output written at the measured speeds)
  total_s    = (wall − the steady layers' time) × target_tokens / measured_tokens
               + 80 × (forward_s + backward_s) + the boundary spill (written once, read once)
The spill and the scratch disk come from the 70B config-only plan on the same data with the same
`--boundary-budget` (host RAM for the layer boundaries; the default spills most of them on a
70B run). The (wall − layers) part (embedding, head, set-up) is scaled by tokens too, which
overstates the set-up. Writes benchmarks/results/one_pass_gpu.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_info, write_results  # noqa: E402
from gpu_stats import LLAMA_70B, SMOKE_70B, cold_read_speed  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LLAMA_70B_CONFIG = ROOT / "configs" / "llama-70b-config.json"
SHARD_BYTES = 5 * 10**9
NOISE = 1e-3


def model_config(shape: dict, layers: int) -> dict:
    return {**shape, "model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": layers, "tie_word_embeddings": False,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}


def build_triplet(work: str, config: dict, device: str) -> dict:
    """θ_0, θ_full = θ_0 + noise, θ_fgt = θ_0 + other noise, as bf16 safetensors shards of at most
    SHARD_BYTES, each fsynced; returns the bytes written and the seconds spent writing."""
    import torch
    from safetensors.torch import save_file

    import bench_stats
    from perta_stream.plan.stats_plan import ModelShape

    work_dir = Path(work)
    roles = ("theta0", "full", "fgt")
    tokenizer = bench_stats.build_tokenizer()
    config = {**config, "vocab_size": max(config["vocab_size"], len(tokenizer))}  # the smoke shape's vocab is smaller
    for role in roles:
        (work_dir / role).mkdir(parents=True, exist_ok=True)
        (work_dir / role / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(work_dir / role)
    shapes = ModelShape.from_config(config).tensor_shapes()
    generator = torch.Generator(device=device).manual_seed(0)
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, dims in shapes.items():
        size = math.prod(dims) * 2
        if shards[-1] and shard_bytes + size > SHARD_BYTES:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += size
    written, write_s = 0, 0.0
    weight_map: dict[str, str] = {}
    for number, names in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors: dict[str, dict[str, torch.Tensor]] = {role: {} for role in roles}
        for name in names:
            dims = shapes[name]
            base = torch.randn(dims, generator=generator, device=device)
            base = base * 0.01 + 1.0 if len(dims) == 1 else base * 0.02  # norms near 1, matrices small
            tensors["theta0"][name] = base.to(torch.bfloat16).cpu()
            for role in roles[1:]:
                tensors[role][name] = (base + NOISE * torch.randn(dims, generator=generator, device=device)).to(torch.bfloat16).cpu()
            del base
            weight_map[name] = file_name
        for role in roles:
            path = work_dir / role / file_name
            started = time.perf_counter()
            save_file(tensors[role], str(path), metadata={"format": "pt"})
            _sync_file(path)
            write_s += time.perf_counter() - started
            written += path.stat().st_size
        del tensors
    index = {"metadata": {"total_size": sum(math.prod(d) * 2 for d in shapes.values())}, "weight_map": weight_map}
    for role in roles:
        (work_dir / role / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"bytes_written": written, "write_s": write_s, "parameters": sum(math.prod(d) for d in shapes.values()), "config": config}


def _sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_from_page_cache(folder: Path) -> None:
    """Flush and evict every file under `folder` from the page cache, so the next read hits the disk."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# Where the time goes: (module, class, method, what it stands for), summed over every thread.
TIMED_CALLS = [
    ("perta_stream.pipelines.group_merge", "GroupMerger", "_read_chunk", "merge: read θ_full, θ_fgt"),
    ("perta_stream.compute.merge_kernel", "MergeKernel", "merge_chunk", "merge: kernel"),
    ("perta_stream.sinks.layered_output", "LayeredModelOutput", "write", "merge: write output"),
    ("perta_stream.sinks.layered_output", "LayeredModelOutput", "tensor_done", "merge: finish tensors / shards"),
    ("perta_stream.sinks.background_writer", "BackgroundWriter", "submit", "sweep: wait for the previous merge"),
    ("perta_stream.sources.layer_weights", "ModuleWeightLoader", "load", "sweep: wait for weights"),
    ("perta_stream.compute.stats.boundaries", "BoundaryStore", "put", "sweep: boundary put"),
    ("perta_stream.compute.stats.boundaries", "BoundaryStore", "pop", "sweep: boundary pop"),
    ("perta_stream.compute.stats.streaming", "StreamingStatsEngine", "_finish_group", "sweep: finish a group (statistics to the host unless merged on the GPU)"),
]


class RunClock:
    """What the running one pass does when, read off it by wrapping its methods (restored on exit):
    when the engine starts each decoder layer (forward, then backward), the head and the embedding
    step; the seconds of each group's merge; the seconds spent in each of TIMED_CALLS, summed over
    every thread (a call inside another timed call counts in both); the padded tokens swept."""

    def __init__(self) -> None:
        import threading

        self.events: list[tuple[str, float]] = []
        self.merge_s: list[float] = []
        self.seconds: dict[str, float] = {}
        self.padded_tokens = 0
        self._lock = threading.Lock()
        self._patches = contextlib.ExitStack()

    def __enter__(self) -> "RunClock":
        import importlib

        from perta_stream.compute.stats.streaming import StreamingStatsEngine
        from perta_stream.pipelines.group_merge import GroupMerger

        self._before(StreamingStatsEngine, "_materialize_layer", lambda *args: self.events.append(("layer", time.perf_counter())))
        self._before(StreamingStatsEngine, "_head", lambda *args: self.events.append(("head", time.perf_counter())))
        self._before(StreamingStatsEngine, "_embedding", lambda *args: self.events.append(("embedding", time.perf_counter())))
        self._before(StreamingStatsEngine, "run", self._count_tokens)
        self._timed(GroupMerger, "merge", self.merge_s.append)
        for module_name, class_name, attribute, what in TIMED_CALLS:
            self._timed(getattr(importlib.import_module(module_name), class_name), attribute, functools.partial(self._add, what))
        return self

    def __exit__(self, *exc: object) -> None:
        self._patches.close()

    def _before(self, owner: type, attribute: str, hook) -> None:
        original = getattr(owner, attribute)

        def wrapped(instance, *args, **kwargs):
            hook(*args, **kwargs)
            return original(instance, *args, **kwargs)

        self._patches.enter_context(mock.patch.object(owner, attribute, wrapped))

    def _timed(self, owner: type, attribute: str, record) -> None:
        original = getattr(owner, attribute)

        def wrapped(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                record(time.perf_counter() - started)

        self._patches.enter_context(mock.patch.object(owner, attribute, wrapped))

    def _add(self, what: str, seconds: float) -> None:
        with self._lock:
            self.seconds[what] = self.seconds.get(what, 0.0) + seconds

    def _count_tokens(self, batches, **kwargs) -> None:
        self.padded_tokens += sum(batch.num_tokens for dataset_batches in batches.values() for batch in dataset_batches)

    def layer_seconds(self, end: float) -> tuple[list[float], list[float]]:
        """Seconds per decoder layer in the forward sweep and in the backward sweep: each layer
        lasts until the engine starts the next thing."""
        times = [t for _, t in self.events] + [end]
        phase = "forward"
        forward, backward = [], []
        for position, (what, started) in enumerate(self.events):
            if what == "head":
                phase = "backward"
            elif what == "layer":
                (forward if phase == "forward" else backward).append(times[position + 1] - started)
        return forward, backward


def seventy_b_plan(data: dict[str, Path], batch_size: int, device: str, boundary_budget_bytes: int | None):
    """The statistics plan of Llama-70B on the same data (boundary spill, tokens), from its config."""
    from perta_stream.config.stats import StatsConfig
    from perta_stream.pipelines.stats import config_only_plan

    budget = {} if boundary_budget_bytes is None else {"boundary_budget_bytes": boundary_budget_bytes}
    return config_only_plan(StatsConfig(model=str(LLAMA_70B_CONFIG), forget=str(data["forget"]), retain=str(data["retain"]), fraction=0.2,
                                        batch_size=batch_size, device=device, config_only=True, dry_run=True, **budget)).plan


def steady(seconds: list[float]) -> float:
    """The mean of a sweep's layers after its first (which carries one-time costs)."""
    later = seconds[1:] or seconds
    return sum(later) / len(later)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, to check the script")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the measured model (each 1.7 GB per model at 70B width)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--boundary-budget", default=None, help="passed to unlearn (host RAM for the layer boundaries, e.g. 96GiB); default: the tool's")
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "gpu_one_pass"), help="folder on the disk to measure (not a tmpfs)")
    args = parser.parse_args()
    import resource

    import torch

    from perta_stream.cli import main as cli_main
    from perta_stream.sizes import parse_size
    from perta_stream.sources.tofu import bundled_tofu_dir

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; run with --smoke to check the script on CPU")
    shape = SMOKE_70B if args.smoke else LLAMA_70B
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    disk = shutil.disk_usage(work)
    print(json.dumps({"disk_free_bytes": disk.free, "disk_total_bytes": disk.total}), flush=True)
    config = model_config(shape, args.layers)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        built = pool.submit(build_triplet, str(work), config, device).result()
    write_bytes_per_s = built["bytes_written"] / built["write_s"]
    print(json.dumps({"built": built, "write_bytes_per_s": write_bytes_per_s}), flush=True)
    largest = max((work / "full").glob("*.safetensors"), key=lambda p: p.stat().st_size)
    read_bytes_per_s = cold_read_speed(largest)
    for role in ("theta0", "full", "fgt"):
        drop_from_page_cache(work / role)
    tofu = bundled_tofu_dir()
    data = {"forget": tofu / "forget10.jsonl", "retain": tofu / "retain90.jsonl"}
    out = work / "out"
    command = ["unlearn", "--one-pass", "--theta0", str(work / "theta0"), "--full", str(work / "full"), "--fgt", str(work / "fgt"),
               "--forget", str(data["forget"]), "--retain", str(data["retain"]), "--fraction", "0.2", "--method", "fisher", "--alpha", "1",
               "--batch-size", str(args.batch_size), "--device", device, "--out", str(out), "-q"]
    boundary_budget_bytes = None if args.boundary_budget is None else parse_size(args.boundary_budget, what="--boundary-budget")
    if boundary_budget_bytes is not None:
        command += ["--boundary-budget", str(boundary_budget_bytes)]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with RunClock() as clock:
        started = time.perf_counter()
        status = cli_main(command)
        ended = time.perf_counter()
    if status != 0:
        raise SystemExit(f"the one pass failed ({status}): perta-stream {' '.join(command)}")
    wall_s = ended - started
    record = json.loads((out / "perta_merge.json").read_text())
    peak_device_bytes = int(torch.cuda.max_memory_allocated()) if device == "cuda" else 0
    peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    forward_s, backward_s = clock.layer_seconds(ended)
    measured_tokens = clock.padded_tokens
    plan = seventy_b_plan(data, args.batch_size, device, boundary_budget_bytes)
    target_tokens = plan.padded_tokens
    layer_bytes = sum(math.prod(d) * 2 for n, d in _shapes(built["config"]).items() if ".layers.0." in n)
    scale = target_tokens / measured_tokens
    forward_measured_s, backward_measured_s = steady(forward_s), steady(backward_s)
    forward_io_s = layer_bytes / read_bytes_per_s
    backward_io_s = 3 * layer_bytes / read_bytes_per_s + layer_bytes / write_bytes_per_s
    forward_layer_s = max(forward_measured_s * scale, forward_io_s)
    backward_layer_s = max(backward_measured_s * scale, backward_io_s)
    layer_s = forward_layer_s + backward_layer_s
    rest_s = (wall_s - len(forward_s) * forward_measured_s - len(backward_s) * backward_measured_s) * scale
    spill_s = plan.boundary_spill_bytes / write_bytes_per_s + plan.boundary_spill_bytes / read_bytes_per_s
    total_s = rest_s + LLAMA_70B["num_hidden_layers"] * layer_s + spill_s
    extrapolation = {
        "target_tokens": target_tokens, "measured_tokens": measured_tokens, "token_scale": scale,
        "forward_measured_s": forward_measured_s, "backward_measured_s": backward_measured_s,
        "forward_io_bound_s": forward_io_s, "backward_io_bound_s": backward_io_s, "layer_s": layer_s,
        "rest_s": rest_s, "boundary_budget_bytes": boundary_budget_bytes, "boundary_spill_bytes": plan.boundary_spill_bytes,
        "boundary_spill_s": spill_s, "total_s": total_s,
        "scratch_disk_bytes": plan.boundary_spill_bytes, "plan_peak_host_bytes": plan.peak_host_bytes, "plan_peak_device_bytes": plan.peak_device_bytes,
        "method": "80 x (max(steady forward per layer scaled by tokens, θ_0 read) + max(steady backward per layer scaled by tokens, θ_0, θ_full, "
        "θ_fgt read and the output written)) at the measured cold read and fsynced write speeds + the rest of the wall time scaled by tokens "
        "+ the 70B plan's boundary spill written and read once",
    }
    result = {
        "benchmark": "one_pass_gpu", "machine": machine_info(), "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)", "settings": vars(args), "model": {**built, "layers": args.layers},
        "disk_free_bytes": disk.free, "read_bytes_per_s": read_bytes_per_s, "write_bytes_per_s": write_bytes_per_s,
        "wall_s": wall_s, "forward_layer_s": forward_s, "backward_layer_s": backward_s, "merge_s": clock.merge_s, "seconds_in": clock.seconds,
        "peak_device_bytes": peak_device_bytes, "peak_rss_bytes": peak_rss_bytes, "output_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")),
        "mean_loss": record.get("one_pass", {}).get("mean_loss"), "extrapolation_70b": extrapolation,
    }
    print(json.dumps(result, indent=2), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    if args.smoke:
        return  # a smoke run checks the script; its numbers mean nothing and are not kept
    gib = 2**30
    rows = [
        {"what": f"one pass, {args.layers} layers at 70B width ({built['parameters'] / 1e9:.2f} B params), {measured_tokens} tokens", "seconds": wall_s,
         "peak GPU (GiB)": peak_device_bytes / gib, "peak RSS (GiB)": peak_rss_bytes / gib},
        {"what": "one decoder layer, forward (mean after the first)", "seconds": forward_measured_s, "peak GPU (GiB)": "", "peak RSS (GiB)": ""},
        {"what": "one decoder layer, backward + statistics, merge beside it (mean after the first)", "seconds": backward_measured_s, "peak GPU (GiB)": "", "peak RSS (GiB)": ""},
        {"what": f"Llama-70B one pass, extrapolated ({target_tokens} tokens)", "seconds": total_s,
         "peak GPU (GiB)": plan.peak_device_bytes / gib, "peak RSS (GiB)": plan.peak_host_bytes / gib},
    ]
    budget = "the default" if boundary_budget_bytes is None else f"{boundary_budget_bytes / gib:.0f} GiB"
    notes = [
        f"disk: cold read {read_bytes_per_s / 1e9:.2f} GB/s, fsynced write {write_bytes_per_s / 1e9:.2f} GB/s; inputs evicted from the page cache before the run",
        f"measured layers: forward {', '.join(f'{t:.2f}' for t in forward_s)} s; backward {', '.join(f'{t:.2f}' for t in backward_s)} s; "
        f"merges {', '.join(f'{t:.2f}' for t in clock.merge_s)} s",
        f"70B: per layer forward {forward_layer_s:.2f} s (measured {forward_measured_s:.2f} s x {scale:.2f} for tokens; θ_0 read {forward_io_s:.2f} s), "
        f"backward {backward_layer_s:.2f} s (measured {backward_measured_s:.2f} s x {scale:.2f}; I/O {backward_io_s:.2f} s); rest {rest_s:.0f} s; "
        f"boundary budget {budget}: spill {plan.boundary_spill_bytes / 1e9:.1f} GB ({spill_s:.0f} s) is the scratch disk",
        extrapolation["method"],
    ]
    write_results("one_pass_gpu", result, rows, title="One-pass unlearn on a GPU at Llama-70B width", notes=notes)


def _shapes(config: dict) -> dict[str, tuple[int, ...]]:
    from perta_stream.plan.stats_plan import ModelShape

    return ModelShape.from_config(config).tensor_shapes()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
