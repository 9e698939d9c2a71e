"""Statistics writing: how fast one group's shards reach the disk (hashed, fsynced), CPU only.

    flock /tmp/perta_bench.lock .venv/bin/python benchmarks/bench_stats_write.py   # a Llama-3-8B layer, about 1 minute

A statistics run writes, per decoder layer and dataset, one float32 shard per statistic (grad,
fisher), each hashed with sha256 while it is written, on a background thread while the next
layer computes. For a 70B model that is 4 x 280 GB, so the writer's speed can bound the whole
run. Measured on one group of random float32 statistics with the shapes of one decoder layer
(default: Llama-3-8B's, 0.87 GB per statistic), alternating, best of `--repeats`:
  concurrent      StatsStore.write_group with both statistics (the shards written at the same time)
  one by one      the same shards written one after the other (one StatsStore per statistic)
  sha256 only     hashing the same bytes on one thread, no disk
Writes benchmarks/results/stats_write.json and stats_write.md. `write_throughput` is also what
gpu_stats.py uses to put the writer into its 70B extrapolation.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_info, write_results  # noqa: E402

KINDS = ("grad", "fisher")


def layer_group_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The statistics group of one decoder layer of a Llama config: tensor_name -> shape."""
    from perta_stream.plan.stats_plan import ModelShape, group_tensor_names, layer_group

    shape = ModelShape.from_config({"model_type": "llama", **config})
    shapes = shape.tensor_shapes()
    return {name: shapes[name] for name in group_tensor_names(shapes, shape.num_layers)[layer_group(0)]}


def write_throughput(shapes: dict[str, tuple[int, ...]], directory: Path, repeats: int) -> dict:
    """Bytes per second of the three ways in the module docstring (best of `repeats`, alternating)."""
    import torch

    from perta_stream.sinks.stats_store import StatsStore

    generator = torch.Generator().manual_seed(0)
    stats = {name: {kind: torch.rand(shape, generator=generator) for kind in KINDS} for name, shape in shapes.items()}
    group_bytes = sum(t.numel() * 4 for entry in stats.values() for t in entry.values())

    def store(root: Path, kinds: tuple[str, ...]) -> StatsStore:
        return StatsStore(root, datasets=("forget",), kinds=kinds, groups={"layer": list(shapes)}, shapes=shapes, stats_dtype="F32")

    def concurrent(root: Path) -> None:
        store(root, KINDS).write_group("forget", "layer", stats)

    def one_by_one(root: Path) -> None:
        for kind in KINDS:
            store(root / kind, (kind,)).write_group("forget", "layer", {name: {kind: entry[kind]} for name, entry in stats.items()})

    def sha256_only(root: Path) -> None:
        for kind in KINDS:
            digest = hashlib.sha256()
            for entry in stats.values():
                digest.update(memoryview(entry[kind].view(torch.uint8).reshape(-1).numpy()))

    seconds: dict[str, list[float]] = {"concurrent": [], "one by one": [], "sha256 only": []}
    for _ in range(repeats):
        for name, job in (("concurrent", concurrent), ("one by one", one_by_one), ("sha256 only", sha256_only)):
            root = directory / "out"
            started = time.perf_counter()
            job(root)
            seconds[name].append(time.perf_counter() - started)
            shutil.rmtree(root, ignore_errors=True)
    return {
        "group_bytes": group_bytes,
        "seconds_all": seconds,
        "bytes_per_s": {name: group_bytes / min(values) for name, values in seconds.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shapes = layer_group_shapes({"hidden_size": args.hidden, "intermediate_size": args.intermediate, "num_attention_heads": args.heads,
                                 "num_key_value_heads": args.kv_heads, "num_hidden_layers": 1, "vocab_size": 1})
    with tempfile.TemporaryDirectory(prefix="perta-write-", dir=Path(__file__).parent / "work") as tmp:
        measured = write_throughput(shapes, Path(tmp), args.repeats)
    rates = measured["bytes_per_s"]
    record = {"benchmark": "stats_write", "machine": machine_info(), "settings": vars(args), **measured,
              "concurrent_vs_one_by_one": rates["concurrent"] / rates["one by one"],
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    rows = [{"way": name, "GB/s": rate / 1e9, "best (s)": min(measured["seconds_all"][name])} for name, rate in rates.items()]
    notes = [
        f"one decoder layer's statistics: hidden {args.hidden}, intermediate {args.intermediate}, {args.heads} heads, {args.kv_heads} KV heads; "
        f"{measured['group_bytes'] / 1e9:.2f} GB of float32 (grad + fisher), hashed and fsynced",
        f"best of {args.repeats} alternating runs; {machine_info()['cpu_count']} CPU cores; concurrent / one by one: {record['concurrent_vs_one_by_one']:.2f}x",
    ]
    _, md_path = write_results("stats_write", record, rows, title="perta-stream stats: writing one group's shards", notes=notes)
    print(md_path.read_text())


if __name__ == "__main__":
    main()
