"""A LoRA adapter θ_fgt against the dense θ_fgt it stands for: merge, and the one pass with θ_full = θ_0.

    flock /tmp/perta_heavy.lock .venv/bin/python benchmarks/bench_adapter.py                # 0.8 GB merge, 8-layer one pass
    .venv/bin/python benchmarks/bench_adapter.py --skip-one-pass --repeats 1                # the merge only

Merge: bench_merge.py's synthetic bf16 Llama (0.8 GB), a rank-16 bf16 LoRA on every linear module
written with safetensors and peft's LoraConfig. Measured (each run its own process, inputs in the
page cache): `merge --method tv|fisher` with the dense θ_fgt and with the adapter; for fisher with
the adapter, once with statistics whose record names θ_0's files (the identity is checked by
them) and once without (θ_0 is hashed whole first). Bytes read: rchar of the process (system
calls, so the hash pass and the side files count).
One pass: bench_one_pass.py's 8-layer model (bf16, hidden 1536): today's dense one pass (θ_full,
θ_fgt perturbed copies) against θ_full = θ_0 with a rank-16 adapter, fisher, same data.
Writes benchmarks/results/adapter.json and adapter.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_stats  # noqa: E402
from bench_merge import make_inputs, warm  # noqa: E402
from bench_one_pass import measured, perturbed_copy  # noqa: E402
from bench_stats import build_tokenizer, random_llama_config, save_random_llama, tofu_subset  # noqa: E402
from common import machine_info, write_results  # noqa: E402

WORK = Path(__file__).parent / "work" / "adapter"
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(model: Path, out: Path, rank: int = 16) -> Path:
    """A rank-`rank` LoRA on every linear module of `model`, random non-zero bf16 factors."""
    import torch
    from peft import LoraConfig
    from safetensors import safe_open
    from safetensors.torch import save_file

    if (out / "adapter_model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(5)
    tensors = {}
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    for name, shard in index.items():
        module = name.removesuffix(".weight")
        if not module.endswith(LINEAR):
            continue
        with safe_open(str(model / shard), framework="pt") as handle:
            rows, cols = handle.get_slice(name).get_shape()
        tensors[f"base_model.model.{module}.lora_A.weight"] = (0.01 * torch.randn(rank, cols, generator=generator)).to(torch.bfloat16)
        tensors[f"base_model.model.{module}.lora_B.weight"] = (0.01 * torch.randn(rows, rank, generator=generator)).to(torch.bfloat16)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LINEAR), base_model_name_or_path=str(model)).save_pretrained(out)
    return out


def stats_by_files(stats: Path, theta0: Path, target: Path) -> Path:
    """A copy of the statistics whose record names θ_0's files (as `stats` writes it)."""
    from perta_stream.sources.checkpoint import open_local_checkpoint

    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(stats, target, symlinks=True)
    record = json.loads((target / "perta_stats.json").read_text())
    checkpoint = open_local_checkpoint(theta0, "theta0")
    record["model"].update(header_sha256=checkpoint.header_sha256, files=checkpoint.file_identity())
    (target / "perta_stats.json").write_text(json.dumps(record))
    return target


def merge_runs(size_gb: float, repeats: int) -> list[dict]:
    paths = make_inputs(Path(__file__).parent / "work" / "adapter-merge", size_gb)
    adapter = write_adapter(paths["theta0"], WORK / f"lora16-{size_gb:g}gb")
    by_files = stats_by_files(paths["stats"], paths["theta0"], WORK / f"stats-by-files-{size_gb:g}gb")
    warm([paths["theta0"], paths["full"], paths["fgt"], paths["stats"] / "forget.fisher", paths["stats"] / "retain.fisher", adapter])
    out = WORK / "merged"
    ways = {
        "tv, dense θ_fgt": ("tv", paths["fgt"], None),
        "tv, adapter θ_fgt": ("tv", adapter, None),
        "fisher, dense θ_fgt": ("fisher", paths["fgt"], paths["stats"]),
        "fisher, adapter θ_fgt (identity by θ_0's files)": ("fisher", adapter, by_files),
        "fisher, adapter θ_fgt (θ_0 hashed first)": ("fisher", adapter, paths["stats"]),
    }
    found: dict[str, list[dict]] = {way: [] for way in ways}
    for _ in range(repeats):
        for way, (method, fgt, stats) in ways.items():
            shutil.rmtree(out, ignore_errors=True)
            args = ["merge", "--theta0", str(paths["theta0"]), "--full", str(paths["full"]), "--fgt", str(fgt), "--out", str(out), "--method", method, "-q"]
            found[way].append(measured(args + (["--stats", str(stats)] if stats else [])))
    shutil.rmtree(out, ignore_errors=True)
    model_bytes = sum(p.stat().st_size for p in paths["theta0"].glob("*.safetensors"))
    return [{"way": way, "size_gb": size_gb, "model_bytes": model_bytes, **min(runs, key=lambda r: r["wall_s"])} for way, runs in found.items()]


def one_pass_runs(repeats: int, samples: int) -> list[dict]:
    work = Path(__file__).parent / "work" / "one_pass"
    work.mkdir(parents=True, exist_ok=True)
    bench_stats.WORK = work
    tokenizer = build_tokenizer()
    tag = "h1536-i6144-v16384-l8"
    theta0, full, fgt = work / f"theta0-{tag}", work / f"full-{tag}", work / f"fgt-{tag}"
    if not (theta0 / "model.safetensors.index.json").is_file():
        parameters = save_random_llama(theta0, random_llama_config(1536, 6144, 8, max(len(tokenizer), 16384)), "500MB")
        tokenizer.save_pretrained(theta0)
        (theta0 / "params.json").write_text(json.dumps({"parameters": parameters}))
    perturbed_copy(theta0, full, 1)
    perturbed_copy(theta0, fgt, 2)
    adapter = write_adapter(theta0, WORK / f"lora16-{tag}")
    data = ["--forget", str(tofu_subset("forget10", samples)), "--retain", str(tofu_subset("retain90", samples))]
    sweep = ["--batch-size", "8", "--boundary-budget", "256MiB", "--device", "cpu", "--method", "fisher", "-q"]
    ways = {
        "dense one pass (θ_full, θ_fgt checkpoints)": ["--theta0", str(theta0), "--full", str(full), "--fgt", str(fgt)],
        "adapter θ_fgt, θ_full = θ_0": ["--theta0", str(theta0), "--full", str(theta0), "--fgt", str(adapter)],
    }
    out = WORK / "one"
    found: dict[str, list[dict]] = {way: [] for way in ways}
    for _ in range(repeats):
        for way, models in ways.items():
            shutil.rmtree(out, ignore_errors=True)
            found[way].append(measured(["unlearn", "--one-pass", *models, *data, "--out", str(out), *sweep]))
    shutil.rmtree(out, ignore_errors=True)
    model_bytes = sum(p.stat().st_size for p in theta0.glob("*.safetensors"))
    return [{"way": way, "model_bytes": model_bytes, **min(runs, key=lambda r: r["wall_s"])} for way, runs in found.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--skip-one-pass", action="store_true")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    merges = merge_runs(args.size_gb, args.repeats)
    one_pass = [] if args.skip_one_pass else one_pass_runs(args.repeats, args.samples)
    rows = [
        {
            "run": f"merge {r['size_gb']:g} GB: {r['way']}" if "size_gb" in r else f"one pass: {r['way']}",
            "wall (s)": r["wall_s"],
            "read (MiB)": r["bytes_read"] / 2**20,
            "read (model sizes)": r["bytes_read"] / r["model_bytes"],
            "written (MiB)": r["bytes_written"] / 2**20,
            "peak RSS (MiB)": r["peak_rss_bytes"] / 2**20,
        }
        for r in merges + one_pass
    ]
    record = {
        "benchmark": "adapter",
        "machine": machine_info(),
        "settings": vars(args),
        "load_average_at_start": load,
        "merge": merges,
        "one_pass": one_pass,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    notes = [
        f"merge: bench_merge.py's synthetic bf16 Llama ({args.size_gb:g} GB), rank-16 bf16 LoRA on every linear module; one pass: bench_one_pass.py's 8-layer model, "
        f"{args.samples} + {args.samples} TOFU samples, fisher, batch 8, boundary budget 256MiB",
        f"wall: fastest of {args.repeats} alternating runs, each its own process, inputs in the page cache; read/written: rchar/wchar of the process; "
        f"{machine_info()['cpu_count']} CPU cores shared with other work (load average at start {load[0]:.2f})",
    ]
    json_path, md_path = write_results("adapter", record, rows, title="LoRA adapter θ_fgt vs dense θ_fgt (CPU)", notes=notes)
    print(md_path.read_text())


if __name__ == "__main__":
    main()
