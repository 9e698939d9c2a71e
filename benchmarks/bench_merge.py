"""Merge benchmark: perta-stream (tv, fisher, several alphas) vs an IO floor vs mergekit.

    python benchmarks/bench_merge.py                     # 0.8 GB and 1.7 GB bf16 checkpoints
    python benchmarks/bench_merge.py --sizes-gb 0.8 --skip-mergekit

Synthetic Llama-shaped bf16 checkpoints are made in code (random weights, a config.json that
mergekit recognizes). Every measured command runs as its own process, from the page cache (each
input is read once before timing), so the numbers compare compute and pipeline overheads, not the
disk. The IO floor is what plain tools need for the same bytes: `cat` of every input, `dd` of the
output size with fsync, plus the time of a bare `python -c "import torch"`.
Writes benchmarks/results/merge.json and merge.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_info, run_measured, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = Path(sys.executable)
HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS = 2048, 5632, 32000, 16, 4
LAYER_PARAMS = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * (HIDDEN * KV_HEADS // HEADS) + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN
MERGEKIT_VENV = Path(__file__).parent / "work" / "mergekit-venv"


def layer_count_for(size_gb: float) -> int:
    embedding_bytes = 2 * VOCAB * HIDDEN * 2
    return max(1, round((size_gb * 1e9 - embedding_bytes) / (LAYER_PARAMS * 2)))


def llama_config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "max_position_embeddings": 2048,
    }


def tensor_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    kv = HIDDEN * KV_HEADS // HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        prefix = f"model.layers.{i}"
        shapes.update(
            {
                f"{prefix}.input_layernorm.weight": (HIDDEN,),
                f"{prefix}.self_attn.q_proj.weight": (HIDDEN, HIDDEN),
                f"{prefix}.self_attn.k_proj.weight": (kv, HIDDEN),
                f"{prefix}.self_attn.v_proj.weight": (kv, HIDDEN),
                f"{prefix}.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                f"{prefix}.post_attention_layernorm.weight": (HIDDEN,),
                f"{prefix}.mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
                f"{prefix}.mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
                f"{prefix}.mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
            }
        )
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def write_synthetic(path: Path, shapes: dict[str, tuple[int, ...]], *, seed: int, dtype: str, config: dict | None, positive: bool = False) -> None:
    """A sharded checkpoint of random values (≤ 500 MB per shard), written with the safetensors library."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    element_bytes = torch.tensor([], dtype=torch_dtype).element_size()
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * element_bytes
        if groups[-1] and size + nbytes > 500e6:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    for number, names in enumerate(groups, start=1):
        file_name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            values = torch.randn(shapes[name], generator=generator) * 0.02
            tensors[name] = (values.square() if positive else values).to(torch_dtype)
        save_file(tensors, str(path / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in names})
        del tensors
    total = sum(math.prod(s) * element_bytes for s in shapes.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config, indent=2))


def model_content_sha256(path: Path) -> str:
    """The content digest `stats` records for the model it ran at (sources/content_digest.py)."""
    from perta_stream.sources.content_digest import TensorHasher
    from perta_stream.sources.resolve import open_checkpoint

    checkpoint, source = open_checkpoint(str(path), "theta0")
    try:
        return TensorHasher().complete(checkpoint, source)
    finally:
        source.close()


def make_inputs(work: Path, size_gb: float) -> dict[str, Path]:
    layers = layer_count_for(size_gb)
    root = work / f"{size_gb:g}gb"
    shapes = tensor_shapes(layers)
    paths = {name: root / name for name in ("theta0", "full", "fgt")}
    stats = root / "stats"
    if not (root / ".complete").exists():
        shutil.rmtree(root, ignore_errors=True)
        for seed, (name, path) in enumerate(paths.items()):
            write_synthetic(path, shapes, seed=seed, dtype="bfloat16", config=llama_config(layers))
        for seed, name in enumerate(("forget.fisher", "retain.fisher"), start=10):
            write_synthetic(stats / name, shapes, seed=seed, dtype="float32", config=None, positive=True)
        # merge checks that statistics belong to θ_0 by its content digest, so the record names it.
        model = {"location": str(paths["theta0"]), "content_sha256": model_content_sha256(paths["theta0"])}
        (stats / "perta_stats.json").write_text(json.dumps({"format": "perta_stats", "format_version": 1, "kinds": ["fisher"], "model": model}))
        (root / ".complete").write_text("")
    return {**paths, "stats": stats}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def warm(paths: list[Path]) -> None:
    for path in paths:
        subprocess.run(f"cat {path}/*.safetensors > /dev/null", shell=True, check=True)


def io_floor(inputs: list[Path], output_bytes: int, scratch: Path) -> dict:
    read = run_measured(["bash", "-c", "cat " + " ".join(f"{p}/*.safetensors" for p in inputs) + " > /dev/null"])
    block = 16 * 2**20
    write = run_measured(
        ["dd", "if=/dev/zero", f"of={scratch}", f"bs={block}", f"count={math.ceil(output_bytes / block)}", "conv=fsync", "status=none"]
    )
    scratch.unlink()
    start = run_measured([str(VENV_PYTHON), "-c", "import torch"])
    return {
        "read_s": read["wall_s"],
        "write_s": write["wall_s"],
        "python_torch_import_s": start["wall_s"],
        "wall_s": read["wall_s"] + write["wall_s"] + start["wall_s"],
    }


def perta_merge(paths: dict[str, Path], out: Path, *, method: str, alphas: str) -> dict:
    command = [
        str(VENV_PYTHON), "-m", "perta_stream.cli", "merge", "-q", "--theta0", str(paths["theta0"]), "--full", str(paths["full"]),
        "--fgt", str(paths["fgt"]), "--out", str(out), "--method", method, "--alpha", alphas, "--overwrite",
    ]
    if method == "fisher":
        command += ["--stats", str(paths["stats"])]
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
    result = run_measured(command)
    # What --max-memory bounds: the RSS the merge added to the process it started in.
    record = json.loads(next(out.rglob("perta_merge.json")).read_text())
    result["baseline_rss_bytes"] = record["baseline_rss_bytes"]
    result["added_peak_rss_bytes"] = record["added_peak_rss_bytes"]
    shutil.rmtree(out, ignore_errors=True)
    return result


def mergekit_available() -> bool:
    return (MERGEKIT_VENV / "bin" / "mergekit-yaml").exists()


def mergekit_merge(paths: dict[str, Path], out: Path, work: Path) -> dict:
    config = work / "mergekit.yml"
    config.write_text(
        "merge_method: task_arithmetic\n"
        f"base_model: {paths['theta0']}\n"
        "models:\n"
        f"  - model: {paths['full']}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {paths['fgt']}\n    parameters: {{weight: -1.0}}\n"
        "parameters: {normalize: false}\n"
        "dtype: bfloat16\n"
    )
    result = run_measured([str(MERGEKIT_VENV / "bin" / "mergekit-yaml"), str(config), str(out), "--lazy-unpickle"])
    shutil.rmtree(out, ignore_errors=True)
    return result


def _median_record(records: list[dict]) -> dict:
    """Median of every numeric field over repeated measurements (strings from the last one)."""
    merged = dict(records[-1])
    for key, value in records[-1].items():
        if isinstance(value, (int, float)):
            merged[key] = statistics.median(record[key] for record in records)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-gb", default="0.8,1.7")
    parser.add_argument("--work", default=str(Path(__file__).parent / "work" / "merge"))
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows, runs = [], []
    for size_gb in (float(s) for s in args.sizes_gb.split(",")):
        paths = make_inputs(work, size_gb)
        model_bytes = dir_bytes(paths["full"])
        stats_bytes = dir_bytes(paths["stats"])
        warm([paths["theta0"], paths["full"], paths["fgt"], paths["stats"] / "forget.fisher", paths["stats"] / "retain.fisher"])
        # Rounds interleave the runs so that a noisy moment on the shared machine hits all of them;
        # each figure is the median over the rounds.
        rounds = []
        for _ in range(args.repeats):
            model_inputs = [paths["theta0"], paths["full"], paths["fgt"]]
            fisher_inputs = model_inputs + [paths["stats"] / "forget.fisher", paths["stats"] / "retain.fisher"]
            measured_round = {
                "floor tv": io_floor(model_inputs, model_bytes, work / "dd.out"),
                "floor fisher": io_floor(fisher_inputs, model_bytes, work / "dd.out"),
                "tv": perta_merge(paths, work / "out", method="tv", alphas="1"),
                "fisher": perta_merge(paths, work / "out", method="fisher", alphas="1"),
                "tv x3 alphas (one pass)": perta_merge(paths, work / "out", method="tv", alphas="0.5,1,2"),
            }
            if not args.skip_mergekit and mergekit_available():
                measured_round["mergekit task_arithmetic"] = mergekit_merge(paths, work / "out", work)
            rounds.append(measured_round)
        floors = {kind: _median_record([r[f"floor {kind}"] for r in rounds]) for kind in ("tv", "fisher")}
        measured = {
            name: _median_record([r[name] for r in rounds]) for name in rounds[0] if not name.startswith("floor")
        }
        for name, result in measured.items():
            floor = floors["fisher" if name == "fisher" else "tv"]
            read_bytes = 3 * model_bytes + (stats_bytes if name == "fisher" else 0)
            row = {
                "size per checkpoint (GB)": round(model_bytes / 1e9, 2),
                "run": name,
                "wall (s)": result["wall_s"],
                "read GB/s": read_bytes / 1e9 / result["wall_s"],
                "peak RSS (MiB)": result["peak_rss_bytes"] / 2**20,
                "baseline RSS (MiB)": result["baseline_rss_bytes"] / 2**20 if "baseline_rss_bytes" in result else None,
                "added peak (MiB)": result["added_peak_rss_bytes"] / 2**20 if "added_peak_rss_bytes" in result else None,
                "IO floor (s)": floor["wall_s"],
                "wall / IO floor": result["wall_s"] / floor["wall_s"],
            }
            rows.append(row)
            runs.append({**row, "io_floor": floor, "command_stderr_tail": result["stderr"][-400:]})
        tv_wall = measured["tv"]["wall_s"]
        if "mergekit task_arithmetic" in measured:
            runs.append({"size_gb": model_bytes / 1e9, "perta_tv_over_mergekit_wall": tv_wall / measured["mergekit task_arithmetic"]["wall_s"]})
        runs.append(
            {"size_gb": model_bytes / 1e9, "three_alphas_one_pass_over_three_separate": measured["tv x3 alphas (one pass)"]["wall_s"] / (3 * tv_wall)}
        )
    record = {"machine": machine_info(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": runs}
    json_path, md_path = write_results(
        "merge",
        record,
        rows,
        title="Merge benchmark (synthetic bf16 Llama-shaped checkpoints, page cache warm)",
        notes=[
            "IO floor = cat of every input + dd of the output size with fsync + `python -c 'import torch'`",
            f"medians of {args.repeats} interleaved rounds; command: python benchmarks/bench_merge.py --repeats {args.repeats}",
            "fisher reads two float32 statistics checkpoints besides the three bf16 models",
            "baseline RSS: the merge process's RSS when the merge starts (torch imported); added peak: what the merge adds "
            "to it, the quantity --max-memory bounds (default 512 MiB); peak RSS: the whole process (GNU time %M)",
            f"machine: {machine_info()['cpu_count']} cores",
        ],
    )
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
