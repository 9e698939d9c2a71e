"""The Python API: one function per command, its keywords spelled exactly as the command's flags.

    import perta_stream as ps
    ps.stats(model="base/", forget="forget.jsonl", retain="retain.jsonl", out="stats/")
    ps.merge(theta0="base/", full="full/", fgt="forget/", out="clean/", method="fisher", stats="stats/", alpha=[0.5, 1])

Every keyword is a flag of the command line with `-` written `_` (`--max-memory 2G` is
`max_memory="2G"`). The keywords are read from the command line's own parser and each value goes
through the flag's own parsing, so the two cannot drift apart: a keyword the command does not have
is a UsageError that names the closest flag. Values may be given as the flag's text (`"0.5,1"`,
`"2G"`) or as Python values (`[0.5, 1]`, paths). `max_memory` is what the call may add to the
memory the process already holds (a notebook has loaded other things before).
"""

from __future__ import annotations

import argparse
import difflib
import os
from typing import Any

from perta_stream.errors import UsageError

__all__ = ["evaluate", "merge", "stats", "sweep", "unlearn"]


def merge(*, theta0: str | os.PathLike, full: str | os.PathLike, fgt: str | os.PathLike, out: str | os.PathLike, **options: Any) -> Any:
    """`perta-stream merge`: θ_out = θ_full − α · W ⊙ (θ_fgt − θ_0), streamed.

    Args:
        theta0, full, fgt: checkpoint folders, `hf://org/name[@rev]` or bare Hub ids.
        out: the output folder (or `hf://org/name` to push).
        **options: any other flag of `perta-stream merge` (method, stats, alpha, tau, ...).

    Returns:
        MergeResult (outputs, bytes read and written, peak RSS, ...).

    Raises:
        UsageError: an unknown keyword or a bad value. PlanError and the other PertaStreamError
            subclasses: as the command line reports them.
    """
    from perta_stream.config.merge import MergeConfig
    from perta_stream.memory import current_rss_bytes
    from perta_stream.pipelines.merge import run_merge

    config = MergeConfig.from_cli(_namespace("merge", dict(theta0=theta0, full=full, fgt=fgt, out=out, **options)))
    if "max_memory" in options:
        config = _replace(config, max_memory_bytes=current_rss_bytes() + config.max_memory_bytes)
    return run_merge(config)


def stats(*, model: str | os.PathLike, forget: str | os.PathLike, retain: str | os.PathLike, **options: Any) -> Any:
    """`perta-stream stats`: per-parameter gradient statistics of the forget and retain sets.

    Args:
        model: the checkpoint the statistics are taken at.
        forget, retain: data files (.jsonl or a .json array of records).
        **options: any other flag of `perta-stream stats` (out, kinds, fraction, device, ...).

    Returns:
        StatsResult (the output folder and its record, or the plan of a dry run).
    """
    from perta_stream.config.stats import StatsConfig
    from perta_stream.pipelines.stats import run_stats

    return run_stats(StatsConfig.from_cli(_namespace("stats", dict(model=model, forget=forget, retain=retain, **options))))


def unlearn(**options: Any) -> Any:
    """`perta-stream unlearn`: statistics (reused when they match) and the merge, in one call.

    Args:
        **options: the flags of `perta-stream unlearn` (theta0, full, fgt, out, forget, retain,
            method, alpha, config, ...).

    Returns:
        UnlearnResult.
    """
    from perta_stream.config.unlearn import UnlearnConfig
    from perta_stream.pipelines.unlearn import run_unlearn

    return run_unlearn(UnlearnConfig.from_cli(_namespace("unlearn", options)))


def evaluate(*, model: str | os.PathLike, split: str, out: str | os.PathLike, **options: Any) -> Any:
    """`perta-stream eval`: TOFU forgetting and utility metrics of one model.

    Returns:
        EvalResult (every metric and the paths of the JSON record and Markdown table).
    """
    from perta_stream.config.eval import EvalConfig
    from perta_stream.pipelines.eval import run_eval

    return run_eval(EvalConfig.from_cli(_namespace("eval", dict(model=model, split=split, out=out, **options))))


def sweep(**options: Any) -> Any:
    """`perta-stream sweep`: several methods × alphas, evaluated, with a table and a plot.

    Returns:
        SweepResult.
    """
    from perta_stream.config.sweep import SweepConfig
    from perta_stream.pipelines.sweep import run_sweep

    return run_sweep(SweepConfig.from_cli(_namespace("sweep", options)))


def _namespace(command: str, options: dict[str, Any]) -> argparse.Namespace:
    """The parsed arguments `perta-stream <command>` would produce for these keywords."""
    from perta_stream.cli import build_parser, command_parser

    parser = command_parser(build_parser(), command)
    arguments = [action for action in parser._actions if action.dest not in ("help", "verbose")]
    # Every spelling of a flag is a keyword (`--stats`/`--stats-dir`: stats= and stats_dir=).
    by_keyword = {keyword_of(flag): action for action in arguments for flag in action.option_strings if flag.startswith("--")}
    by_keyword.update({action.dest: action for action in arguments if not action.option_strings})
    values = {action.dest: action.default for action in arguments}
    given: set[str] = set()
    problems: list[str] = []
    for keyword, value in options.items():
        action = by_keyword.get(keyword)
        if action is None:
            close = difflib.get_close_matches(keyword, list(by_keyword), n=1)
            problems.append(f"{command}() has no keyword {keyword!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
            continue
        if action.dest in given:
            problems.append(f"{command}() got {keyword!r} and another spelling of the same option")
        given.add(action.dest)
        try:
            values[action.dest] = _value(action, value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            problems.append(f"{command}({keyword}=...): {exc}")
    missing = [action for action in arguments if action.required and values.get(action.dest) is None]
    problems += [f"{command}() needs {keyword_of(action.option_strings[0])}=..." for action in missing]
    if problems:
        raise UsageError("; ".join(problems))
    return argparse.Namespace(command=command, verbose=False, **values)


def keyword_of(flag: str) -> str:
    """The Python keyword of a flag: `--max-memory` -> `max_memory`."""
    return flag.lstrip("-").replace("-", "_")


def _value(action: argparse.Action, value: Any) -> Any:
    """A keyword's value as the flag would have parsed it."""
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise TypeError(f"expected True or False, got {value!r}")
        return value
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, (list, tuple)):
        value = ",".join(str(item) for item in value)
    if action.type is not None and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = action.type(str(value)) if action.type is not int or not isinstance(value, int) else value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # a size or dtype flag (`max_memory=2**30`) is text on the command line
    if action.choices is not None and value not in action.choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in action.choices], n=1)
        raise ValueError(f"{value!r} is not one of {', '.join(map(str, action.choices))}" + (f"; did you mean {close[0]!r}?" if close else ""))
    return value


def _replace(config: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(config, **changes)
