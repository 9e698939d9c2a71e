"""Statistics benchmark: the layer-streamed engine vs the naive per-sample autograd loop (CPU).

    flock /tmp/perta_bench.lock .venv/bin/python benchmarks/bench_stats.py            # 64 + 64 TOFU samples
    .venv/bin/python benchmarks/bench_stats.py --samples 16 --layers 8 --skip-naive   # a quick look

A random Llama-shaped model (bf16 checkpoint, untied, GQA) of `--layers` decoder layers and the
same model with twice the layers are made in code, with a word-level tokenizer trained offline on
the TOFU text. Each measured run is its own process (wall time and the kernel's peak RSS of that
process):
  streamed  `perta-stream stats` (float32 on CPU, grad + fisher, forget + retain)
  naive     the whole model in float32 memory, one sample at a time, plain autograd, accumulating
            Σ g and Σ g² per dataset for every parameter
  streamed at 2x the layers, for the growth of the peak RSS
Both write the same statistics directory (every parameter, grad and fisher, forget and retain),
and every tensor of the two is compared, so the runs are known to compute the same thing.
Writes benchmarks/results/stats.json and stats.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_info, run_measured, write_results  # noqa: E402

from perta_stream.sources.tofu import bundled_tofu_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(__file__).parent / "work" / "stats"
TOFU = bundled_tofu_dir()
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]


def tofu_subset(name: str, count: int) -> Path:
    lines = (TOFU / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[:count]
    path = WORK / f"{name}-{count}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for name in ("forget10", "retain90"):
        for line in (TOFU / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            texts += [record["question"], record["answer"]]
    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator(texts + ["Question : Answer :"], trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def random_llama_config(hidden: int, intermediate: int, layers: int, vocab: int) -> dict:
    """The untied Llama shape every statistics benchmark uses: 128-wide heads, a KV head per 4."""
    return {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": hidden // 128, "num_key_value_heads": max(1, hidden // 512), "max_position_embeddings": 2048,
            "tie_word_embeddings": False}


def save_random_llama(path: Path, config: dict, max_shard_size: str) -> int:
    """Save a random bf16 LlamaForCausalLM with `config` (seed 0) to `path`; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return sum(p.numel() for p in model.parameters())


def build_model(path: Path, layers: int, args: argparse.Namespace, tokenizer) -> int:
    """Save a random bf16 Llama with `layers` layers and the tokenizer (once); returns its parameter count."""
    if (path / "model.safetensors.index.json").is_file():
        return json.loads((path / "params.json").read_text())["parameters"]
    count = save_random_llama(path, random_llama_config(args.hidden, args.intermediate, layers, max(len(tokenizer), args.vocab)), "500MB")
    tokenizer.save_pretrained(path)
    (path / "params.json").write_text(json.dumps({"parameters": count}))
    return count


def naive_worker(model_dir: str, forget: str, retain: str, out: str) -> None:
    """The naive loop (run in its own process): whole model in memory, one sample at a time.

    It delivers what the streamed run delivers: every statistic of every parameter, written to
    `out` in the statistics layout (one shard per dataset and kind, float32).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from perta_stream.compute.prompts import encode_sample, per_sample_loss
    from perta_stream.sinks.stats_store import StatsStore
    from perta_stream.sources.qa_dataset import load_qa_samples

    torch.set_grad_enabled(True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    store = StatsStore(
        out, datasets=("forget", "retain"), kinds=("grad", "fisher"), groups={"all": list(params)},
        shapes={n: tuple(p.shape) for n, p in params.items()}, stats_dtype="F32",
    )
    for dataset, path in (("forget", forget), ("retain", retain)):
        sums = {n: torch.zeros_like(p) for n, p in params.items()}
        squares = {n: torch.zeros_like(p) for n, p in params.items()}
        samples = load_qa_samples(path)
        for sample in samples:
            encoded = encode_sample(tokenizer, sample.question, sample.answer, max_length=512)
            logits = model(input_ids=torch.tensor([encoded.input_ids])).logits
            loss = per_sample_loss(logits, torch.tensor([encoded.labels]))[0]
            grads = torch.autograd.grad(loss, list(params.values()))
            for name, grad in zip(params, grads):
                sums[name] += grad
                squares[name].addcmul_(grad, grad)
            del grads, logits, loss
        store.write_group(dataset, "all", {n: {"grad": sums[n].div_(len(samples)), "fisher": squares[n].div_(len(samples))} for n in params})
        del sums, squares
    store.finish({"format": "perta_stats", "producer": "naive benchmark loop"})


def compare(streamed_out: Path, naive_out: Path) -> float:
    """The largest relative error (Frobenius) between the naive statistics and the streamed ones,
    over every tensor of every dataset and kind."""
    from safetensors import safe_open

    worst = 0.0
    for sub in ("forget.grad", "forget.fisher", "retain.grad", "retain.fisher"):
        streamed_index = json.loads((streamed_out / sub / "model.safetensors.index.json").read_text())["weight_map"]
        naive_index = json.loads((naive_out / sub / "model.safetensors.index.json").read_text())["weight_map"]
        if set(streamed_index) != set(naive_index):
            raise SystemExit(f"{sub}: the streamed and naive statistics hold different tensors")
        for tensor_name in sorted(naive_index):
            with safe_open(str(naive_out / sub / naive_index[tensor_name]), framework="pt") as naive, safe_open(
                str(streamed_out / sub / streamed_index[tensor_name]), framework="pt"
            ) as streamed:
                a, b = streamed.get_tensor(tensor_name).double(), naive.get_tensor(tensor_name).double()
            worst = max(worst, float((a - b).norm() / b.norm().clamp_min(1e-30)))
    return worst


def streamed_command(model: Path, forget: Path, retain: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, "-m", "perta_stream.cli", "stats", "--model", str(model), "--forget", str(forget), "--retain", str(retain),
        "--out", str(out), "--batch-size", str(args.batch_size), "--boundary-budget", args.boundary_budget, "--device", "cpu", "--overwrite", "-q",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64, help="TOFU samples per set (forget10 and retain90, first N)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--intermediate", type=int, default=6144)
    parser.add_argument("--vocab", type=int, default=16384, help="minimum vocabulary (rows beyond the tokenizer's are unused)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--boundary-budget", default="256MiB")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--repeats", type=int, default=2, help="alternating streamed/naive runs; the fastest of each counts")
    parser.add_argument("--naive-worker", nargs=4, metavar=("MODEL", "FORGET", "RETAIN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_worker:
        naive_worker(*args.naive_worker)
        return

    WORK.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    shape_tag = f"h{args.hidden}-i{args.intermediate}-v{args.vocab}"
    models = {layers: WORK / f"llama-{shape_tag}-l{layers}" for layers in (args.layers, 2 * args.layers)}
    parameters = {layers: build_model(path, layers, args, tokenizer) for layers, path in models.items()}
    forget, retain = tofu_subset("forget10", args.samples), tofu_subset("retain90", args.samples)

    from perta_stream.compute.prompts import encode_sample
    from perta_stream.sources.qa_dataset import load_qa_samples

    tokens = sum(len(encode_sample(tokenizer, s.question, s.answer, max_length=512).input_ids) for p in (forget, retain) for s in load_qa_samples(p))
    runs: dict[str, dict] = {}
    # The machine is shared: streamed and naive runs alternate, and each method's fastest run counts
    # (peak RSS: the largest seen), so a burst of load from elsewhere does not decide the comparison.
    out = WORK / f"out-l{args.layers}"
    for leftover in WORK.glob("out-*.partial"):
        shutil.rmtree(leftover)  # from an interrupted benchmark; a stats run refuses to overwrite it
    naive_out = WORK / "naive-out"
    for _ in range(args.repeats):
        _record(runs, f"streamed-l{args.layers}", args.layers, parameters[args.layers], run_measured(streamed_command(models[args.layers], forget, retain, out, args)), tokens)
        if not args.skip_naive:
            shutil.rmtree(naive_out, ignore_errors=True)
            command = [sys.executable, __file__, "--naive-worker", str(models[args.layers]), str(forget), str(retain), str(naive_out)]
            _record(runs, f"naive-l{args.layers}", args.layers, parameters[args.layers], run_measured(command), tokens)
    if not args.skip_naive:
        runs[f"naive-l{args.layers}"]["max_relative_error_vs_streamed"] = compare(out, naive_out)
        shutil.rmtree(naive_out, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    double_out = WORK / f"out-l{2 * args.layers}"
    _record(runs, f"streamed-l{2 * args.layers}", 2 * args.layers, parameters[2 * args.layers], run_measured(streamed_command(models[2 * args.layers], forget, retain, double_out, args)), tokens)
    shutil.rmtree(double_out, ignore_errors=True)

    base, double = runs[f"streamed-l{args.layers}"], runs[f"streamed-l{2 * args.layers}"]
    summary = {"rss_growth_at_2x_layers": double["peak_rss_bytes"] / base["peak_rss_bytes"] - 1}
    if not args.skip_naive:
        naive = runs[f"naive-l{args.layers}"]
        summary["speedup_vs_naive"] = naive["wall_s"] / base["wall_s"]
        summary["rss_fraction_of_naive"] = base["peak_rss_bytes"] / naive["peak_rss_bytes"]
    targets = {"speedup_vs_naive": ">= 2", "rss_fraction_of_naive": "<= 0.35", "rss_growth_at_2x_layers": "<= 0.15"}
    record = {
        "benchmark": "stats",
        "machine": machine_info(),
        "settings": {k: v for k, v in vars(args).items() if k != "naive_worker"},
        "tokens": tokens,
        "runs": runs,
        "summary": summary,
        "targets": targets,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    rows = [
        {"run": name, "layers": r["layers"], "params (M)": r["parameters"] / 1e6, "wall (s)": r["wall_s"], "tokens/s": r["tokens_per_s"], "peak RSS (MiB)": r["peak_rss_bytes"] / 2**20}
        for name, r in runs.items()
    ]
    notes = [
        f"{args.samples} + {args.samples} TOFU samples (forget10, retain90), {tokens} tokens, batch {args.batch_size}, boundary budget {args.boundary_budget}",
        f"wall: fastest of {args.repeats} alternating runs at {args.layers} layers (all runs in the JSON); each run is its own process; "
        f"{machine_info()['cpu_count']} CPU cores shared with other work",
    ]
    notes += [f"{key}: {value:.3f} (target {targets[key]})" for key, value in summary.items()]
    if not args.skip_naive:
        notes.append(f"naive vs streamed statistics, every tensor, largest relative error: {runs[f'naive-l{args.layers}']['max_relative_error_vs_streamed']:.2e}")
    json_path, md_path = write_results("stats", record, rows, title="perta-stream stats: layer-streamed vs naive (CPU)", notes=notes)
    print(md_path.read_text())


def _record(runs: dict[str, dict], name: str, layers: int, parameters: int, measured: dict, tokens: int) -> None:
    """Add one measured run: the fastest wall time and the largest peak RSS over repeats."""
    run = runs.setdefault(name, {"layers": layers, "parameters": parameters, "wall_s_all": [], "peak_rss_bytes_all": []})
    run["wall_s_all"].append(measured["wall_s"])
    run["peak_rss_bytes_all"].append(measured["peak_rss_bytes"])
    run["wall_s"] = min(run["wall_s_all"])
    run["tokens_per_s"] = tokens / run["wall_s"]
    run["peak_rss_bytes"] = max(run["peak_rss_bytes_all"])


if __name__ == "__main__":
    main()
