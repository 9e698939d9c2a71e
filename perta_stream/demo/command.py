"""The flags of `perta-stream demo` and the call of its pipeline (registered by cli.py)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from perta_stream.config.options import float_list


def add_demo(sub: argparse._SubParsersAction, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    parser = sub.add_parser(
        "demo",
        help="the built-in end-to-end run on a tiny Llama and the bundled TOFU data (CPU, offline, cached)",
        description="Build a tokenizer and a tiny Llama, theta0/full/fgt/ret by fine-tuning, statistics, and sweep "
        "tv, uniform, grad and fisher over alphas; print the table and write it beside the plot (tradeoff.png) in --cache-dir.",
    )
    parser.add_argument("--cache-dir", default=".perta_cache/demo", help="where built models and results are kept (the report and plot at its top)")
    parser.add_argument("--rebuild", action="store_true", help="ignore and replace this recipe's cached results")
    parser.add_argument("--split", choices=["forget01", "forget10"], help="TOFU forget split (default forget01)")
    parser.add_argument("--retain-count", type=int, help="retain90 records used for training (default 200)")
    parser.add_argument("--alpha", "--alphas", dest="alphas", type=float_list, help="the sweep's alphas (default 0.5,0.75,1,1.25,1.5,2)")
    parser.add_argument("--max-items", type=int, help="items scored per evaluation set (default 40)")
    parser.add_argument("--lora", type=int, metavar="R", help="theta_fgt as a rank-R LoRA adapter (peft) instead of a full fine-tune")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="default cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fastest for this tiny model on shared cores)")
    add_common(parser)


def run_demo_command(args: argparse.Namespace) -> int:
    from perta_stream.config.demo import DemoConfig
    from perta_stream.pipelines.demo import run_demo

    def on_stage(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    result = run_demo(DemoConfig.from_cli(args), on_stage=on_stage)
    print(result.report())
    return 0
