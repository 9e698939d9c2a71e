"""Statistics benchmark across families: the streamed engine's CPU time on Llama and on other
families of the same width and depth.

    flock /tmp/perta_bench.lock .venv/bin/python benchmarks/bench_stats_families.py
    .venv/bin/python benchmarks/bench_stats_families.py --samples 8 --layers 2 --repeats 1   # a quick look

Random bf16 models (untied, GQA, 128-wide heads, seed 0) are made in code with the word-level
TOFU tokenizer of bench_stats.py:
  llama      the reference shape
  qwen3      the same shape plus q/k RMSNorms in every layer (per-head norms: the generic rule)
  mixtral    the same attention; the MLP is a router and 4 fused experts of a quarter of the
             width each, 2 per token (the same MLP parameters, half the MLP products per token);
             the experts run through the generic rule one sample at a time
Each run is `perta-stream stats` in its own process (float32 on CPU, grad + fisher, forget +
retain); streamed runs alternate between families and each family's fastest counts.
Writes benchmarks/results/stats_families.json and stats_families.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_stats import WORK as STATS_WORK  # noqa: E402
from bench_stats import build_tokenizer, random_llama_config, streamed_command, tofu_subset  # noqa: E402
from common import machine_info, run_measured, write_results  # noqa: E402

WORK = Path(__file__).parent / "work" / "stats_families"
FAMILIES = ("llama", "qwen3", "mixtral")


def family_config(family: str, hidden: int, intermediate: int, layers: int, vocab: int) -> dict:
    """The config of `family` at the benchmark's shape (Llama's, with the family's own parts)."""
    config = random_llama_config(hidden, intermediate, layers, vocab)
    if family == "qwen3":
        config.update(head_dim=128)
    elif family == "mixtral":
        config.update(intermediate_size=intermediate // 4, num_local_experts=4, num_experts_per_tok=2)
    return {"model_type": family, **config}


def save_model(path: Path, family: str, args: argparse.Namespace, tokenizer) -> int:
    """Save a random bf16 model of `family` and the tokenizer (once); returns its parameter count."""
    if (path / "params.json").is_file():  # written last
        return json.loads((path / "params.json").read_text())["parameters"]
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = family_config(family, args.hidden, args.intermediate, args.layers, max(len(tokenizer), args.vocab))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[family](**{k: v for k, v in config.items() if k != "model_type"})).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="500MB")
    tokenizer.save_pretrained(path)
    count = sum(p.numel() for p in model.parameters())
    (path / "params.json").write_text(json.dumps({"parameters": count}))
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32, help="TOFU samples per set (forget10 and retain90, first N)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=16384, help="minimum vocabulary (rows beyond the tokenizer's are unused)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--boundary-budget", default="256MiB")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs; the fastest of each family counts")
    parser.add_argument("--families", default=",".join(FAMILIES))
    args = parser.parse_args()

    WORK.mkdir(parents=True, exist_ok=True)
    STATS_WORK.mkdir(parents=True, exist_ok=True)  # where tofu_subset writes
    tokenizer = build_tokenizer()
    families = args.families.split(",")
    tag = f"h{args.hidden}-i{args.intermediate}-l{args.layers}-v{args.vocab}"
    models = {family: WORK / f"{family}-{tag}" for family in families}
    parameters = {family: save_model(path, family, args, tokenizer) for family, path in models.items()}
    forget, retain = tofu_subset("forget10", args.samples), tofu_subset("retain90", args.samples)

    from perta_stream.compute.prompts import encode_sample
    from perta_stream.sources.qa_dataset import load_qa_samples

    tokens = sum(len(encode_sample(tokenizer, s.question, s.answer, max_length=512).input_ids) for p in (forget, retain) for s in load_qa_samples(p))
    runs: dict[str, dict] = {}
    for _ in range(args.repeats):
        for family in families:
            out = WORK / f"out-{family}"
            shutil.rmtree(Path(str(out) + ".partial"), ignore_errors=True)
            measured = run_measured(streamed_command(models[family], forget, retain, out, args))
            shutil.rmtree(out, ignore_errors=True)
            run = runs.setdefault(family, {"parameters": parameters[family], "wall_s_all": [], "peak_rss_bytes_all": []})
            run["wall_s_all"].append(measured["wall_s"])
            run["peak_rss_bytes_all"].append(measured["peak_rss_bytes"])
            run["wall_s"] = min(run["wall_s_all"])
            run["tokens_per_s"] = tokens / run["wall_s"]
            run["peak_rss_bytes"] = max(run["peak_rss_bytes_all"])
    base = runs[families[0]]["wall_s"]
    summary = {f"{family}_time_vs_{families[0]}": runs[family]["wall_s"] / base for family in families[1:]}
    record = {
        "benchmark": "stats_families",
        "machine": machine_info(),
        "settings": vars(args),
        "tokens": tokens,
        "runs": runs,
        "summary": summary,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    rows = [
        {"family": family, "params (M)": r["parameters"] / 1e6, "wall (s)": r["wall_s"], f"vs {families[0]}": r["wall_s"] / base,
         "tokens/s": r["tokens_per_s"], "peak RSS (MiB)": r["peak_rss_bytes"] / 2**20}
        for family, r in runs.items()
    ]
    notes = [
        f"{args.layers} layers, hidden {args.hidden}, MLP width {args.intermediate} (mixtral: 4 experts of {args.intermediate // 4}, 2 per token), bf16 checkpoints",
        f"{args.samples} + {args.samples} TOFU samples (forget10, retain90), {tokens} tokens, batch {args.batch_size}; float32 compute on CPU, grad + fisher",
        f"wall: fastest of {args.repeats} alternating runs per family (all runs in the JSON); each run is its own process; "
        f"{machine_info()['cpu_count']} CPU cores shared with other work",
    ]
    json_path, md_path = write_results("stats_families", record, rows, title="perta-stream stats: one model size, several families (CPU)", notes=notes)
    print(md_path.read_text())


if __name__ == "__main__":
    main()
