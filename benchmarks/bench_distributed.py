"""Distributed benchmark: `merge` and `stats` in one process vs under torchrun (gloo, CPU).

    flock /tmp/perta_bench.lock python benchmarks/bench_distributed.py                 # 1 and 2 ranks
    flock /tmp/perta_bench.lock python benchmarks/bench_distributed.py --ranks 1,2,4 --skip-stats

merge: the synthetic 0.8 GB bf16 Llama-shaped triplet of bench_merge.py (made once under
benchmarks/work/merge), method fisher, re-sharded to 100 MB output shards so the ranks have
shards to share; inputs are read once before timing (page cache). stats: a small random Llama
(4 layers, hidden 256) on the bundled TOFU forget01/retain subset, CPU float32.
Each configuration runs `--repeats` times; the table shows the fastest. Every output is compared
byte for byte (merge) or within float32 summation tolerance (stats) with the one-process output.
Peak RSS is that of the largest process (GNU time's %M over the launcher's process tree).
Writes benchmarks/results/distributed.json and distributed.md.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge import dir_bytes, make_inputs, warm  # noqa: E402
from common import machine_info, run_measured, write_results  # noqa: E402

VENV_PYTHON = Path(sys.executable)
TOFU = Path(__file__).resolve().parent.parent / "perta_stream" / "data" / "tofu"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(ranks: int, cli_args: list[str]) -> list[str]:
    if ranks == 1:
        return [str(VENV_PYTHON), "-m", "perta_stream.cli", *cli_args]
    return [str(VENV_PYTHON), "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port", str(_free_port()), "-m", "perta_stream.cli", *cli_args]


def fastest(command: list[str], out: Path, repeats: int) -> dict:
    """The fastest of `repeats` runs, with every run's wall time (the machine may be shared)."""
    runs = []
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        runs.append(run_measured(command))
    best = min(runs, key=lambda r: r["wall_s"])
    return {**best, "all_wall_s": [round(r["wall_s"], 2) for r in runs]}


def same_merge_output(one: Path, other: Path) -> bool:
    names = sorted(p.name for p in one.iterdir() if p.name != "perta_merge.json")
    match, mismatch, errors = filecmp.cmpfiles(one, other, names, shallow=False)
    return not mismatch and not errors and sorted(p.name for p in other.iterdir() if p.name != "perta_merge.json") == names


def bench_merge(work: Path, ranks_list: list[int], repeats: int) -> list[dict]:
    paths = make_inputs(work / "merge", 0.8)
    warm([paths["theta0"], paths["full"], paths["fgt"], paths["stats"] / "forget.fisher", paths["stats"] / "retain.fisher"])
    read_bytes = 3 * dir_bytes(paths["full"]) + dir_bytes(paths["stats"])
    rows = []
    reference = work / "dist-merge-1"
    for ranks in ranks_list:
        out = work / f"dist-merge-{ranks}"
        args = ["merge", "-q", "--theta0", str(paths["theta0"]), "--full", str(paths["full"]), "--fgt", str(paths["fgt"]), "--method", "fisher"]
        args += ["--stats", str(paths["stats"]), "--max-shard-size", "100MB", "--out", str(out)]
        result = fastest(launch(ranks, args), out, repeats)
        identical = ranks == 1 or same_merge_output(reference, out)
        rows.append(
            {
                "stage": "merge fisher 0.8 GB",
                "ranks": ranks,
                "wall (s)": result["wall_s"],
                "read GB/s": read_bytes / 1e9 / result["wall_s"],
                "peak RSS (MiB)": result["peak_rss_bytes"] / 2**20,
                "equal to 1 rank": "byte-identical" if identical else "DIFFERENT",
                "all runs (s)": " ".join(str(w) for w in result["all_wall_s"]),
            }
        )
    for ranks in ranks_list:
        if ranks != 1:
            shutil.rmtree(work / f"dist-merge-{ranks}", ignore_errors=True)
    shutil.rmtree(reference, ignore_errors=True)
    return rows


def bench_stats(work: Path, ranks_list: list[int], repeats: int) -> list[dict]:
    import torch
    from safetensors.torch import load_file

    model = _small_llama(work / "dist-stats-model")
    forget, retain = TOFU / "forget01.jsonl", TOFU / "retain_perturbed.jsonl"
    rows = []
    reference: dict[str, torch.Tensor] = {}
    for ranks in ranks_list:
        out = work / f"dist-stats-{ranks}"
        args = ["stats", "-q", "--model", str(model), "--forget", str(forget), "--retain", str(retain), "--device", "cpu", "--batch-size", "8", "--fraction", "0.25"]
        result = fastest(launch(ranks, [*args, "--out", str(out)]), out, repeats)
        tensors = {f"{d}/{f.name}/{k}": v for d in ("forget.fisher", "retain.fisher") for f in sorted((out / d).glob("*.safetensors")) for k, v in load_file(f).items()}
        if ranks == 1:
            reference = tensors
            error = 0.0
        else:
            error = max(float((tensors[k].double() - v.double()).norm() / v.double().norm().clamp_min(1e-30)) for k, v in reference.items())
        rows.append(
            {
                "stage": "stats grad+fisher, 4-layer h256, 10 + 100 TOFU samples",
                "ranks": ranks,
                "wall (s)": result["wall_s"],
                "read GB/s": "",
                "peak RSS (MiB)": result["peak_rss_bytes"] / 2**20,
                "equal to 1 rank": f"max rel. error {error:.1e}",
                "all runs (s)": " ".join(str(w) for w in result["all_wall_s"]),
            }
        )
    for ranks in ranks_list:
        shutil.rmtree(work / f"dist-stats-{ranks}", ignore_errors=True)
    return rows


def _small_llama(path: Path) -> Path:
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from perta_stream.demo.tokenizer import train_demo_tokenizer
    from perta_stream.sources.qa_dataset import load_qa_samples

    texts = [t for name in ("forget01", "retain_perturbed") for s in load_qa_samples(TOFU / f"{name}.jsonl") for t in (s.question, s.answer)]
    tokenizer = train_demo_tokenizer(texts, vocab_size=2000)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(path, max_shard_size="2MB")
    tokenizer.save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="1,2", help="world sizes to run, 1 first (the reference)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", default=str(Path(__file__).parent / "work"))
    parser.add_argument("--skip-stats", action="store_true")
    args = parser.parse_args()
    ranks_list = [int(r) for r in args.ranks.split(",")]
    if ranks_list[0] != 1:
        parser.error("--ranks must start with 1 (the single-process reference)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = bench_merge(work, ranks_list, args.repeats)
    if not args.skip_stats:
        rows += bench_stats(work, ranks_list, args.repeats)
    load_1min = __import__("os").getloadavg()[0]
    record = {"machine": machine_info(), "load_average_1min_at_end": load_1min, "repeats": args.repeats, "rows": rows}
    notes = [
        f"machine: {record['machine']['cpu_count']} CPU cores shared with other work (load average {load_1min:.1f} at the end), gloo backend",
        "the speed-up on a GPU node comes from one rank per GPU; these CPU numbers show the overhead and the split",
    ]
    json_path, md_path = write_results("distributed", record, rows, title="merge and stats: one process vs torchrun", notes=notes)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
