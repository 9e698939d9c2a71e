"""One-pass unlearn vs the two-pass way (stats, then merge), CPU.

    flock /tmp/perta_bench.lock .venv/bin/python benchmarks/bench_one_pass.py               # 16 + 16 TOFU samples
    .venv/bin/python benchmarks/bench_one_pass.py --samples 8 --layers 4 --repeats 1          # a quick look

θ_0 is the random Llama of benchmarks/bench_stats.py (bf16, untied, GQA; `--layers` decoder
layers, 1536 wide by default), θ_full and θ_fgt are θ_0 with seeded noise in every tensor (same
shards). Each measured run is its own process:
  two passes  `perta-stream stats --kinds fisher`, then `perta-stream merge --method fisher`
  one pass    `perta-stream unlearn --one-pass --method fisher` (no statistics written)
The runs alternate, each way's fastest wall time counts. Per run: wall, peak RSS (the process's
VmHWM through GNU time), and the bytes it read and wrote through system calls (rchar and wchar of
/proc/self/io, read at exit; page-cache hits included, so they count what the run asks of the
disk whether or not the cache answers). The one-pass output is checked byte for byte against the
merge's. Writes benchmarks/results/one_pass.json and one_pass.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_stats import build_tokenizer, random_llama_config, save_random_llama, tofu_subset  # noqa: E402
from common import machine_info, run_measured, write_results  # noqa: E402

import bench_stats  # noqa: E402

WORK = Path(__file__).parent / "work" / "one_pass"
# The real CLI in-process, reporting its own I/O counters when it exits.
IO_WRAPPER = (
    "import atexit, sys\n"
    "def report():\n"
    "    fields = dict(line.split(': ') for line in open('/proc/self/io').read().split('\\n') if line)\n"
    "    sys.stderr.write('PERTA_IO=' + fields['rchar'] + ',' + fields['wchar'] + '\\n')\n"
    "atexit.register(report)\n"
    "from perta_stream.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def perturbed_copy(source: Path, target: Path, seed: int) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    done = target / "perturbed.json"
    if done.is_file():
        return
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    generator = torch.Generator().manual_seed(seed)
    for shard in sorted(target.glob("*.safetensors")):
        tensors = load_file(shard)
        save_file({n: (t.float() + 0.01 * torch.randn(t.shape, generator=generator)).to(t.dtype) for n, t in tensors.items()}, shard, metadata={"format": "pt"})
    done.write_text(json.dumps({"seed": seed}))


def measured(args: list[str]) -> dict:
    """One CLI run in its own process: wall, peak RSS, bytes read and written through system calls."""
    result = run_measured([sys.executable, "-c", IO_WRAPPER, *args])
    line = next(line for line in result["stderr"].splitlines() if line.startswith("PERTA_IO="))
    read, written = (int(x) for x in line.removeprefix("PERTA_IO=").split(","))
    return {"wall_s": result["wall_s"], "peak_rss_bytes": result["peak_rss_bytes"], "bytes_read": read, "bytes_written": written}


def combine(parts: list[dict]) -> dict:
    """Two processes in sequence: times and bytes add up, the peak RSS is the larger one."""
    return {
        "wall_s": sum(p["wall_s"] for p in parts),
        "peak_rss_bytes": max(p["peak_rss_bytes"] for p in parts),
        "bytes_read": sum(p["bytes_read"] for p in parts),
        "bytes_written": sum(p["bytes_written"] for p in parts),
        "parts": parts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16, help="TOFU samples per set (forget10 and retain90, first N)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--intermediate", type=int, default=6144)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--boundary-budget", default="256MiB")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    WORK.mkdir(parents=True, exist_ok=True)
    bench_stats.WORK = WORK  # tofu_subset writes its files there
    tokenizer = build_tokenizer()
    tag = f"h{args.hidden}-i{args.intermediate}-v{args.vocab}-l{args.layers}"
    theta0, full, fgt = WORK / f"theta0-{tag}", WORK / f"full-{tag}", WORK / f"fgt-{tag}"
    if not (theta0 / "model.safetensors.index.json").is_file():
        parameters = save_random_llama(theta0, random_llama_config(args.hidden, args.intermediate, args.layers, max(len(tokenizer), args.vocab)), "500MB")
        tokenizer.save_pretrained(theta0)
        (theta0 / "params.json").write_text(json.dumps({"parameters": parameters}))
    parameters = json.loads((theta0 / "params.json").read_text())["parameters"]
    perturbed_copy(theta0, full, 1)
    perturbed_copy(theta0, fgt, 2)
    forget, retain = tofu_subset("forget10", args.samples), tofu_subset("retain90", args.samples)
    models = ["--theta0", str(theta0), "--full", str(full), "--fgt", str(fgt)]
    data = ["--forget", str(forget), "--retain", str(retain)]
    sweep = ["--batch-size", str(args.batch_size), "--boundary-budget", args.boundary_budget, "--device", "cpu"]
    stats_dir, merged, one = WORK / "stats", WORK / "merged", WORK / "one"

    runs: dict[str, list[dict]] = {"two passes": [], "one pass": []}
    for _ in range(args.repeats):
        for folder in (stats_dir, merged, one):
            shutil.rmtree(folder, ignore_errors=True)
        stats = measured(["stats", "--model", str(theta0), *data, "--out", str(stats_dir), "--kinds", "fisher", *sweep, "-q"])
        merge = measured(["merge", *models, "--method", "fisher", "--stats", str(stats_dir), "--out", str(merged), "--max-memory", "4GiB", "-q"])
        runs["two passes"].append(combine([stats, merge]))
        runs["one pass"].append(measured(["unlearn", "--one-pass", *models, *data, "--method", "fisher", "--out", str(one), *sweep, "-q"]))
    identical = all(
        (one / p.name).read_bytes() == p.read_bytes() for p in merged.glob("*.safetensors")
    ) and sorted(p.name for p in one.glob("*.safetensors")) == sorted(p.name for p in merged.glob("*.safetensors"))
    output_bytes = sum(p.stat().st_size for p in one.glob("*.safetensors"))
    stats_bytes = sum(p.stat().st_size for p in stats_dir.rglob("*.safetensors"))
    best = {way: min(found, key=lambda r: r["wall_s"]) for way, found in runs.items()}
    for way, found in runs.items():
        best[way] = {**best[way], "peak_rss_bytes": max(r["peak_rss_bytes"] for r in found)}
    stats_rss = max(r["parts"][0]["peak_rss_bytes"] for r in runs["two passes"])
    summary = {
        "wall_ratio_one_to_two": best["one pass"]["wall_s"] / best["two passes"]["wall_s"],
        "one_pass_written_over_output": best["one pass"]["bytes_written"] / output_bytes,
        "one_pass_rss_over_stats_rss": best["one pass"]["peak_rss_bytes"] / stats_rss,
    }
    targets = {"wall_ratio_one_to_two": "<= 0.75", "one_pass_written_over_output": "~1 (+ boundary spill)", "one_pass_rss_over_stats_rss": "<= 1"}
    record = {
        "benchmark": "one_pass",
        "machine": machine_info(),
        "settings": vars(args),
        "parameters": parameters,
        "output_bytes": output_bytes,
        "stats_bytes": stats_bytes,
        "identical_to_merge": identical,
        "runs": runs,
        "best": best,
        "summary": summary,
        "targets": targets,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    rows = [
        {"way": way, "wall (s)": r["wall_s"], "read (MiB)": r["bytes_read"] / 2**20, "written (MiB)": r["bytes_written"] / 2**20, "peak RSS (MiB)": r["peak_rss_bytes"] / 2**20}
        for way, r in best.items()
    ]
    rows.append({"way": "stats alone (two passes' first)", "wall (s)": min(r["parts"][0]["wall_s"] for r in runs["two passes"]), "read (MiB)": best["two passes"]["parts"][0]["bytes_read"] / 2**20,
                 "written (MiB)": best["two passes"]["parts"][0]["bytes_written"] / 2**20, "peak RSS (MiB)": stats_rss / 2**20})
    notes = [
        f"{parameters / 1e6:.0f} M parameters ({args.layers} layers, hidden {args.hidden}, bf16), {args.samples} + {args.samples} TOFU samples, fisher, alpha 1, "
        f"batch {args.batch_size}, boundary budget {args.boundary_budget}; output {output_bytes / 2**20:.0f} MiB, statistics {stats_bytes / 2**20:.0f} MiB",
        f"wall: fastest of {args.repeats} alternating runs; peak RSS: the largest; read/written: rchar/wchar of each process; "
        f"{machine_info()['cpu_count']} CPU cores shared with other work",
        f"one-pass output identical to the merge's, every shard: {identical}",
    ]
    notes += [f"{key}: {value:.3f} (target {targets[key]})" for key, value in summary.items()]
    json_path, md_path = write_results("one_pass", record, rows, title="perta-stream unlearn --one-pass vs stats + merge (CPU)", notes=notes)
    for folder in (stats_dir, merged, one):
        shutil.rmtree(folder, ignore_errors=True)
    print(md_path.read_text())


if __name__ == "__main__":
    main()
