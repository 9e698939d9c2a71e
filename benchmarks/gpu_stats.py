"""GPU benchmark of the statistics engine, with a Llama-70B extrapolation (one prepared script).

    .venv/bin/python benchmarks/gpu_stats.py                 # on a CUDA machine (2 minutes on an H200)
    .venv/bin/python benchmarks/gpu_stats.py --smoke         # tiny shapes on CPU: checks the script runs (writes nothing)

Three measurements, in this process (the random checkpoint is built in a child), bfloat16 compute
with float32 accumulation:
  1. end to end: `run_stats` on a random Llama-shaped checkpoint (hidden 2048, 16 layers) with
     64 + 64 TOFU samples: wall time, tokens/s, peak GPU memory, peak RSS.
  2. one decoder layer of Llama-70B's shape (hidden 8192, 64 heads, 8 KV heads, intermediate
     28672) with random bf16 weights: the engine's forward (no grad) and its backward (recompute,
     autograd, exact per-sample grad + fisher statistics) on batches of TOFU-like length, timed
     per token, with the peak GPU memory; the same backward without the statistics; and, where
     the engine uses the fused Triton kernel (compute/stats/triton_linear.py), the same backward
     through the torch path it replaces.
  3. the 70B head (final norm + lm_head 128256 x 8192 + per-sample loss) in the same way (with,
     without statistics, and through the torch path), the Triton kernel alone on the layer's
     largest weight and on the lm_head for a few tilings, the speed of reading a 70B layer's
     bytes (1.7 GB) from local disk with the page cache dropped, and the speed of writing a 70B
     layer's float32 statistics (grad + fisher, 6.9 GB) the way a run does
     (bench_stats_write.write_throughput: shards hashed and fsynced, concurrently).
`--smoke` runs the kernel through Triton's interpreter (TRITON_INTERPRET=1), to check the script.
Extrapolation to a 70B run on `--tokens` tokens (default: TOFU forget10 + retain90 at fraction
0.2, about 62 k tokens with padding, the figure `--dry-run --config-only` prints):
  compute_s = tokens * (80 * (forward_s + backward_s) + head_s) per token
  io_s      = 2 * 80 * layer_bytes / read_bytes_per_s     (each layer read twice)
            + 2 datasets * 2 statistics * 70B params * 4 bytes / write_bytes_per_s
            (both overlap compute: the prefetch and the background writer; they share the disk)
  total_s   = max(compute_s, io_s) + boundary spill traffic / disk bytes_per_s
The assumptions (per-token cost independent of batch composition, prefetch hiding the smaller of
compute and reads) are stated in the result. Writes benchmarks/results/stats_gpu.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_stats_write import layer_group_shapes, write_throughput  # noqa: E402
from common import machine_info, write_results  # noqa: E402

LLAMA_70B = {"hidden_size": 8192, "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 128256, "num_hidden_layers": 80}
SMOKE_70B = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 512, "vocab_size": 1024, "num_hidden_layers": 80}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_device_bytes(device) -> int:
    import torch

    return int(torch.cuda.max_memory_allocated()) if device.type == "cuda" else 0


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def end_to_end(args: argparse.Namespace, device) -> dict:
    """`run_stats` on a random Llama-shaped checkpoint and 64 + 64 TOFU samples."""
    import bench_stats

    from perta_stream.config.stats import StatsConfig
    from perta_stream.pipelines.stats import run_stats

    work = Path(tempfile.mkdtemp(prefix="perta-gpu-bench-"))
    bench_stats.WORK = work
    tokenizer = bench_stats.build_tokenizer()
    tokenizer.save_pretrained(work / "model")
    hidden, layers = (256, 4) if args.smoke else (2048, 16)
    config = bench_stats.random_llama_config(hidden, 4 * hidden, layers, max(len(tokenizer), 16384))
    # Made in a child process, so that this process's peak RSS is the run's and not that of a
    # float32 model being built (4 GB at 1 B parameters).
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        parameters = pool.submit(bench_stats.save_random_llama, work / "model", config, "1GB").result()
    samples = 8 if args.smoke else 64
    forget, retain = bench_stats.tofu_subset("forget10", samples), bench_stats.tofu_subset("retain90", samples)
    _reset_peak(device)
    started = time.perf_counter()
    result = run_stats(StatsConfig(model=str(work / "model"), forget=str(forget), retain=str(retain), out=str(work / "out"), device=device.type, batch_size=args.batch_size))
    wall_s = time.perf_counter() - started
    shutil.rmtree(work, ignore_errors=True)
    tokens = sum(d["num_tokens"] for d in result.record.datasets.values())
    return {"hidden": hidden, "layers": layers, "parameters": parameters, "samples_per_set": samples, "tokens": tokens, "wall_s": wall_s,
            "tokens_per_s": tokens / wall_s, "peak_device_bytes": _peak_device_bytes(device), "plan_peak_device_bytes": result.plan.peak_device_bytes,
            "peak_rss_bytes": result.record.peak_rss_bytes, "plan_peak_host_bytes": result.plan.peak_host_bytes}


@contextlib.contextmanager
def _products_path(fused: bool):
    """Make the engine form the per-sample linear products with the Triton kernel or the torch path."""
    from perta_stream.compute.stats import per_sample

    chosen = per_sample._fused_products_kernel
    per_sample._fused_products_kernel = lambda device: fused
    try:
        yield
    finally:
        per_sample._fused_products_kernel = chosen


def _kernel_in_use(args: argparse.Namespace, device) -> bool:
    """Whether the engine uses the Triton kernel here (always in a smoke run: interpreted)."""
    from perta_stream.compute.stats import triton_linear

    return (args.smoke and triton_linear.triton_importable()) or triton_linear.fused_kernel_applies(device)


def one_layer(args: argparse.Namespace, device, shape: dict) -> dict:
    """Forward and backward (with exact per-sample statistics) of one 70B-shaped decoder layer."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from perta_stream.compute.stats.per_sample import PerSampleHooks, StatsAccumulator
    from perta_stream.compute.stats.skeleton import LastProjectionSkipped, attention_mask

    config = LlamaConfig(**{**shape, "num_hidden_layers": 1}, attn_implementation="sdpa")
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with device:  # initialised where it runs: 0.9 B random parameters take seconds on a CPU
        layer = LlamaDecoderLayer(config, 0).to(dtype=torch.bfloat16).eval()
    for p in layer.parameters():
        p.requires_grad_(False)
    names = {}
    for path, module in layer.named_modules():
        for attr, _ in module.named_parameters(recurse=False):
            names.setdefault(path, {})[attr] = f"{path}.{attr}"
    shapes = {n: tuple(layer.get_submodule(path).get_parameter(attr).shape) for path, attrs in names.items() for attr, n in attrs.items()}
    rotary = LlamaRotaryEmbedding(config).to(device)
    batch, width = args.batch_size, args.seq_len
    hidden = torch.randn(batch, width, shape["hidden_size"], device=device, dtype=torch.bfloat16)
    valid = torch.ones(batch, width, dtype=torch.bool, device=device)
    valid[batch // 2 :, width * 3 // 4 :] = False  # some padding, as in real batches
    positions = torch.arange(width, device=device)[None]
    context = {"attention_mask": attention_mask(valid, None), "position_ids": positions, "position_embeddings": rotary(hidden, positions)}
    output_grad = torch.randn_like(hidden) * 1e-3
    acc = StatsAccumulator(shapes, ("grad", "fisher"), device)
    _reset_peak(device)

    def forward() -> None:
        with torch.no_grad():
            layer(hidden, **context)

    def backward(with_statistics: bool) -> None:
        h = hidden.clone().requires_grad_(True)
        hooks = PerSampleHooks(layer, names, acc, valid) if with_statistics else contextlib.nullcontext()
        with torch.enable_grad(), LastProjectionSkipped(layer), hooks:
            out = layer(h, **context)
            torch.autograd.backward(out, output_grad)

    kernel = _kernel_in_use(args, device)
    with _products_path(kernel):
        timings = {"forward": _timed(forward, args.repeats, device), "backward": _timed(lambda: backward(True), args.repeats, device)}
    peak_device_bytes = _peak_device_bytes(device)
    timings["backward_without_statistics"] = _timed(lambda: backward(False), args.repeats, device)
    if kernel:
        with _products_path(False):
            timings["backward_torch_path"] = _timed(lambda: backward(True), args.repeats, device)
    tokens = int(valid.sum())
    layer_bytes = sum(p.numel() for p in layer.parameters()) * 2
    return {"batch": batch, "seq_len": width, "tokens_per_batch": tokens, "triton_kernel": kernel,
            "forward_s_per_batch": timings["forward"], "backward_s_per_batch": timings["backward"],
            "forward_s_per_token": timings["forward"] / tokens, "backward_s_per_token": timings["backward"] / tokens,
            "backward_without_statistics_s_per_batch": timings["backward_without_statistics"],
            "backward_torch_path_s_per_batch": timings.get("backward_torch_path"),
            "backward_over_plain_backward": timings["backward"] / timings["backward_without_statistics"],
            "layer_bf16_bytes": layer_bytes, "accumulator_bytes": sum(t.numel() * 4 for t in list(acc.sums.values()) + list(acc.squares.values())),
            "peak_device_bytes": peak_device_bytes}


def _timed(step, repeats: int, device) -> float:
    """Seconds per call of `step`, after one warm-up call."""
    step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    _sync(device)
    return (time.perf_counter() - started) / repeats


def head(args: argparse.Namespace, device, shape: dict) -> dict:
    """Final norm + lm_head + per-sample loss + per-sample statistics, for one batch."""
    import torch

    from perta_stream.compute.prompts import per_sample_loss
    from perta_stream.compute.stats.per_sample import PerSampleHooks, StatsAccumulator

    hidden_size, vocab = shape["hidden_size"], shape["vocab_size"]
    norm = torch.nn.RMSNorm(hidden_size, eps=1e-5, device=device, dtype=torch.bfloat16)
    lm_head = torch.nn.Linear(hidden_size, vocab, bias=False, device=device, dtype=torch.bfloat16)
    for p in list(norm.parameters()) + list(lm_head.parameters()):
        p.requires_grad_(False)
    module = torch.nn.ModuleDict({"norm": norm, "lm_head": lm_head})
    names = {"norm": {"weight": "norm"}, "lm_head": {"weight": "lm_head"}}
    acc = StatsAccumulator({"norm": (hidden_size,), "lm_head": (vocab, hidden_size)}, ("grad", "fisher"), device)
    batch, width = args.batch_size, args.seq_len
    valid = torch.ones(batch, width, dtype=torch.bool, device=device)
    labels = torch.randint(0, vocab, (batch, width), device=device)
    labels[:, : width // 2] = -100  # the prompt half is masked, as in the answer-only loss
    hidden = torch.randn(batch, width, hidden_size, device=device, dtype=torch.bfloat16)
    _reset_peak(device)

    def step(with_statistics: bool = True) -> None:
        h = hidden.clone().requires_grad_(True)
        hooks = PerSampleHooks(module, names, acc, valid) if with_statistics else contextlib.nullcontext()
        with torch.enable_grad(), hooks:
            per_sample_loss(lm_head(norm(h)), labels).sum().backward()

    kernel = _kernel_in_use(args, device)
    with _products_path(kernel):
        seconds = _timed(step, args.repeats, device)
    peak_device_bytes = _peak_device_bytes(device)
    without_statistics = _timed(lambda: step(False), args.repeats, device)
    torch_path = None
    if kernel:
        with _products_path(False):
            torch_path = _timed(step, args.repeats, device)
    return {"triton_kernel": kernel, "s_per_batch": seconds, "s_per_token": seconds / (batch * width), "without_statistics_s_per_batch": without_statistics,
            "torch_path_s_per_batch": torch_path, "over_plain_backward": seconds / without_statistics, "peak_device_bytes": peak_device_bytes}


KERNEL_TILES = [(64, 128, 32, 4, 3), (128, 64, 32, 8, 3), (128, 128, 32, 8, 3), (64, 64, 32, 4, 4), (128, 64, 64, 8, 3), (256, 64, 32, 8, 3)]
"""(out_rows, in_cols, tokens, num_warps, num_stages) tried for the kernel alone; the first is DEFAULT_TILES."""


def kernel_tiles(args: argparse.Namespace, device, shape: dict) -> list[dict]:
    """The Triton kernel alone (grad + fisher, ragged bf16 samples) on the MLP weight and the
    lm_head, for each tiling of KERNEL_TILES; a tiling that does not compile is reported as such."""
    import torch

    from perta_stream.compute.stats.triton_linear import ProductTiles, add_per_sample_products

    batch, width = args.batch_size, args.seq_len
    extents = [width if n < batch // 2 else width * 3 // 4 for n in range(batch)]
    results = []
    weights = {"mlp": (shape["intermediate_size"], shape["hidden_size"]), "lm_head": (shape["vocab_size"], shape["hidden_size"])}
    for what, (out_features, in_features) in weights.items():
        x = torch.randn(batch, width, in_features, device=device, dtype=torch.bfloat16)
        delta = torch.randn(batch, width, out_features, device=device, dtype=torch.bfloat16)
        sums, squares = (torch.zeros(out_features, in_features, device=device) for _ in range(2))
        for tiling in KERNEL_TILES[:2] if args.smoke else KERNEL_TILES:
            tiles = ProductTiles(*tiling)
            entry = {"weight": what, "shape": [out_features, in_features], "tiles": list(tiling)}
            try:
                seconds = _timed(lambda: add_per_sample_products(x, delta, extents, squares=squares, sums=sums, tiles=tiles), args.repeats, device)
            except Exception as error:  # a tiling that needs more shared memory than the GPU has
                entry["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            else:
                entry["s_per_call"] = seconds
                entry["matmul_tflop_per_s"] = 2 * out_features * in_features * sum(extents) / seconds / 1e12
            results.append(_reported("kernel_tiles", entry))
        del x, delta, sums, squares
    return results


def read_speed(layer_bytes: int, directory: Path) -> float:
    """Bytes per second reading a layer-sized file with ModuleWeightLoader-style preadv, cold cache."""
    path = directory / "layer.bin"
    block = os.urandom(1 << 20)
    with open(path, "wb") as handle:
        for _ in range(layer_bytes >> 20):
            handle.write(block)
    try:
        return cold_read_speed(path)
    finally:
        path.unlink()


def cold_read_speed(path: Path) -> float:
    """Bytes per second reading `path` once with preadv, the file flushed and evicted from the page
    cache first (and evicted again after)."""
    buffer = memoryview(bytearray(64 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        started = time.perf_counter()
        offset = 0
        while count := os.preadv(fd, [buffer], offset):
            offset += count
        seconds = time.perf_counter() - started
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return offset / seconds


def _reported(part: str, numbers: dict) -> dict:
    print(json.dumps({part: numbers}), flush=True)
    return numbers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, to check the script")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=96, help="tokens per sample in the per-layer timing (TOFU samples are 60-150)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-end-to-end", action="store_true", help="leave out part 1 (benchmarks/gpu_one_pass.py runs a whole model end to end)")
    parser.add_argument("--tokens", type=int, default=61976, help="padded tokens of the 70B run to extrapolate (see --dry-run)")
    args = parser.parse_args()

    if args.smoke:
        # Before Triton is imported: its helpers are built for the interpreter or the GPU on import.
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; run with --smoke to check the script on CPU")
    shape = SMOKE_70B if args.smoke else LLAMA_70B
    if args.smoke:
        args.seq_len, args.repeats = min(args.seq_len, 32), 1
    # Each part is printed as soon as it is measured, so that a run cut short still reports.
    e2e = None if args.skip_end_to_end else _reported("end_to_end", end_to_end(args, device))
    layer = _reported("llama70b_layer", one_layer(args, device, shape))
    head_numbers = _reported("llama70b_head", head(args, device, shape))
    tilings = kernel_tiles(args, device, shape) if _kernel_in_use(args, device) else []
    with tempfile.TemporaryDirectory(prefix="perta-read-") as tmp:
        read_bytes_per_s = read_speed(min(layer["layer_bf16_bytes"], 2 << 30), Path(tmp))
        writes = write_throughput(layer_group_shapes(shape), Path(tmp), repeats=1)
    write_bytes_per_s = writes["bytes_per_s"]["concurrent"]
    layers = shape["num_hidden_layers"]
    from perta_stream.plan.stats_plan import ModelShape

    parameters = sum(math.prod(dims) for dims in ModelShape.from_config({"model_type": "llama", **shape}).tensor_shapes().values())
    stats_bytes = 2 * 2 * parameters * 4
    compute_s = args.tokens * (layers * (layer["forward_s_per_token"] + layer["backward_s_per_token"]) + head_numbers["s_per_token"])
    weight_read_s = 2 * layers * layer["layer_bf16_bytes"] / read_bytes_per_s
    stats_write_s = stats_bytes / write_bytes_per_s
    io_s = weight_read_s + stats_write_s
    boundary_bytes = (layers + 1) * args.tokens * shape["hidden_size"] * 2
    spill_s = 2 * boundary_bytes / read_bytes_per_s  # written once, read once; write speed assumed equal to read speed
    total_s = max(compute_s, io_s) + spill_s
    extrapolation = {
        "tokens": args.tokens,
        "compute_s": compute_s,
        "weight_read_s": weight_read_s,
        "stats_bytes": stats_bytes,
        "stats_write_s": stats_write_s,
        "boundary_spill_s": spill_s,
        "total_s": total_s,
        "peak_device_bytes_estimate": max(layer["peak_device_bytes"] + layer["layer_bf16_bytes"], head_numbers["peak_device_bytes"] + layer["layer_bf16_bytes"]),
        "method": "per-token layer/head times measured on one 70B-shaped layer and the 70B head, times 80 layers and the token count; "
        "weight reads (each layer twice) and the float32 statistics writes (forget + retain, grad + fisher) overlap compute through the "
        "prefetch and the background writer and share the disk, so max(compute, reads + writes); boundary spill written and read once "
        "at the measured read speed",
    }
    record = {"benchmark": "stats_gpu", "machine": machine_info(), "torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
              "settings": vars(args), "end_to_end": e2e, "llama70b_layer": layer, "llama70b_head": head_numbers,
              "kernel_tiles": tilings, "read_bytes_per_s": read_bytes_per_s, "stats_write": writes, "extrapolation_70b": extrapolation}
    rows = [
        {"what": "70B layer forward (per batch)", "seconds": layer["forward_s_per_batch"], "tokens/s": 1 / layer["forward_s_per_token"], "peak device (GiB)": layer["peak_device_bytes"] / 2**30},
        {"what": "70B layer backward + per-sample stats (per batch)", "seconds": layer["backward_s_per_batch"], "tokens/s": 1 / layer["backward_s_per_token"], "peak device (GiB)": layer["peak_device_bytes"] / 2**30},
        {"what": "70B layer backward, no statistics (per batch)", "seconds": layer["backward_without_statistics_s_per_batch"], "tokens/s": layer["tokens_per_batch"] / layer["backward_without_statistics_s_per_batch"], "peak device (GiB)": layer["peak_device_bytes"] / 2**30},
        {"what": "70B head + per-sample stats (per batch)", "seconds": head_numbers["s_per_batch"], "tokens/s": 1 / head_numbers["s_per_token"], "peak device (GiB)": head_numbers["peak_device_bytes"] / 2**30},
        {"what": "70B head, no statistics (per batch)", "seconds": head_numbers["without_statistics_s_per_batch"], "tokens/s": args.batch_size * args.seq_len / head_numbers["without_statistics_s_per_batch"], "peak device (GiB)": head_numbers["peak_device_bytes"] / 2**30},
        {"what": f"70B run extrapolated ({args.tokens} tokens)", "seconds": total_s, "tokens/s": args.tokens / total_s, "peak device (GiB)": extrapolation["peak_device_bytes_estimate"] / 2**30},
    ]
    if layer["triton_kernel"]:
        rows[3:3] = [{"what": "70B layer backward + per-sample stats, torch path (per batch)", "seconds": layer["backward_torch_path_s_per_batch"],
                      "tokens/s": layer["tokens_per_batch"] / layer["backward_torch_path_s_per_batch"], "peak device (GiB)": layer["peak_device_bytes"] / 2**30}]
        rows.insert(-1, {"what": "70B head + per-sample stats, torch path (per batch)", "seconds": head_numbers["torch_path_s_per_batch"],
                         "tokens/s": args.batch_size * args.seq_len / head_numbers["torch_path_s_per_batch"], "peak device (GiB)": head_numbers["peak_device_bytes"] / 2**30})
    fastest = {}
    for entry in tilings:
        if "s_per_call" in entry and entry["s_per_call"] < fastest.get(entry["weight"], {"s_per_call": math.inf})["s_per_call"]:
            fastest[entry["weight"]] = entry
    if e2e is not None:
        rows.insert(0, {"what": f"end to end, {e2e['parameters'] / 1e9:.2f} B params, {e2e['layers']} layers", "seconds": e2e["wall_s"], "tokens/s": e2e["tokens_per_s"], "peak device (GiB)": e2e["peak_device_bytes"] / 2**30})
    notes = [
        f"per-sample products: {'the fused Triton kernel' if layer['triton_kernel'] else 'the torch path (Triton kernel not in use)'}; "
        f"backward + statistics over plain backward: layer {layer['backward_over_plain_backward']:.2f}x, head {head_numbers['over_plain_backward']:.2f}x",
        *(f"kernel alone on the {w} weight {e['shape']}: fastest tiling {e['tiles']} (out_rows, in_cols, tokens, warps, stages), "
          f"{e['s_per_call'] * 1e3:.2f} ms, {e['matmul_tflop_per_s']:.0f} TFLOP/s of the batch matmul" for w, e in fastest.items()),
        extrapolation["method"],
        f"layer read speed {read_bytes_per_s / 1e9:.2f} GB/s (cold page cache); statistics write speed {write_bytes_per_s / 1e9:.2f} GB/s "
        f"(one 70B layer's grad + fisher shards, hashed, fsynced); {stats_bytes / 1e12:.2f} TB of float32 statistics in all",
    ]
    if e2e is not None:
        notes.append(f"end to end: peak device memory {e2e['peak_device_bytes'] / 2**30:.2f} GiB (the plan estimated {e2e['plan_peak_device_bytes'] / 2**30:.2f}), "
                     f"peak RSS {e2e['peak_rss_bytes'] / 2**30:.2f} GiB (the plan estimated {e2e['plan_peak_host_bytes'] / 2**30:.2f})")
    if args.smoke:
        # A smoke run checks the script; its numbers mean nothing and are not kept.
        print(json.dumps(rows, indent=2))
    else:
        _, md_path = write_results("stats_gpu", record, rows, title=f"perta-stream stats on {record['device']}", notes=notes)
        print(md_path.read_text())
    print(json.dumps(extrapolation, indent=2))


if __name__ == "__main__":
    main()
