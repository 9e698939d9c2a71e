"""The Python API: one function per command, its keywords spelled exactly as the command's flags.

    import perta_stream as ps
    ps.stats(model="base/", forget="forget.jsonl", retain="retain.jsonl", out="stats/")
    ps.merge(theta0="base/", full="full/", fgt="forget/", out="clean/", method="fisher", stats="stats/", alpha=[0.5, 1])

Every keyword is a flag of the command line with `-` written `_` (`--max-memory 2G` is
`max_memory="2G"`), and `config="run.yaml"` reads a YAML file of them as `--config` does. Both
the flags and the keywords come from the same metadata on the config's fields
(config/options.py), and each value goes through the option's own parsing, so the two cannot
drift apart: a keyword the command does not have is an error that names the closest one. Values
may be given as the flag's text (`"0.5,1"`, `"2G"`) or as Python values (`[0.5, 1]`, paths).
`max_memory` is what the call may add to the memory the process already holds (a notebook has
loaded other things before).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

__all__ = ["evaluate", "inspect", "merge", "stats", "sweep", "unlearn"]


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

    given = _options(MergeConfig, dict(theta0=theta0, full=full, fgt=fgt, out=out, **options))
    config = MergeConfig.from_options(given)
    if given.get("max_memory") is not None:
        config = dataclasses.replace(config, max_memory_bytes=current_rss_bytes() + config.max_memory_bytes)
    return run_merge(config)


def stats(*, model: str | os.PathLike, forget: str | os.PathLike, retain: str | os.PathLike, **options: Any) -> Any:
    """`perta-stream stats`: per-parameter gradient statistics of the forget and retain sets.

    Args:
        model: the checkpoint the statistics are taken at.
        forget, retain: data files (.jsonl or a .json array of records).
        **options: any other flag of `perta-stream stats` (out, kinds, fraction, device, ...).

    Returns:
        StatsResult (the output folder and its record, or the plan of a dry run).

    Raises:
        PlanError: an unknown keyword, a bad value or invalid options, all listed at once.
    """
    from perta_stream.config.stats import StatsConfig
    from perta_stream.pipelines.stats import run_stats

    return run_stats(StatsConfig.from_options(_options(StatsConfig, dict(model=model, forget=forget, retain=retain, **options))))


def unlearn(**options: Any) -> Any:
    """`perta-stream unlearn`: statistics (reused when they match) and the merge, in one call.

    Args:
        **options: the flags of `perta-stream unlearn` (theta0, full, fgt, out, forget, retain,
            method, alpha, config, ...).

    Returns:
        UnlearnResult.

    Raises:
        UsageError: an unknown keyword, a bad value or invalid options, all listed at once.
    """
    from perta_stream.config.unlearn import UnlearnConfig
    from perta_stream.pipelines.unlearn import run_unlearn

    return run_unlearn(UnlearnConfig.from_options(_options(UnlearnConfig, options)))


def evaluate(*, model: str | os.PathLike, split: str, out: str | os.PathLike, **options: Any) -> Any:
    """`perta-stream eval`: TOFU forgetting and utility metrics of one model.

    Returns:
        EvalResult (every metric and the paths of the JSON record and Markdown table).

    Raises:
        PlanError: an unknown keyword, a bad value or invalid options, all listed at once.
    """
    from perta_stream.config.eval import EvalConfig
    from perta_stream.pipelines.eval import run_eval

    return run_eval(EvalConfig.from_options(_options(EvalConfig, dict(model=model, split=split, out=out, **options))))


def sweep(**options: Any) -> Any:
    """`perta-stream sweep`: several methods × alphas, evaluated, with a table and a plot.

    Returns:
        SweepResult.

    Raises:
        UsageError: an unknown keyword, a bad value or invalid options, all listed at once.
    """
    from perta_stream.config.sweep import SweepConfig
    from perta_stream.pipelines.sweep import run_sweep

    return run_sweep(SweepConfig.from_options(_options(SweepConfig, options)))


def inspect(*, stats: str | os.PathLike, out: str | os.PathLike, **options: Any) -> Any:
    """`perta-stream inspect`: W's figures per tensor, layer and module kind, streamed.

    Args:
        stats: the statistics directory (`compare=` another one of the same model to compare W).
        out: the output folder (inspect.json, inspect.md, PNG plots).
        **options: any other flag of `perta-stream inspect` (theta0, fgt, methods, tau, ...).

    Returns:
        InspectResult (the folder, the model's effective scale per method, the record).

    Raises:
        UsageError: an unknown keyword or a bad value. PlanError and the other PertaStreamError
            subclasses: as the command line reports them.
    """
    from perta_stream.config.inspect import InspectConfig
    from perta_stream.memory import current_rss_bytes
    from perta_stream.pipelines.inspect import run_inspect

    given = _options(InspectConfig, dict(stats=stats, out=out, **options))
    config = InspectConfig.from_options(given)
    if given.get("max_memory") is not None:
        config = dataclasses.replace(config, max_memory_bytes=current_rss_bytes() + config.max_memory_bytes)
    return run_inspect(config)


def _options(cls: type, keywords: dict[str, Any]) -> dict[str, Any]:
    """The keywords of a call, under the keys of its `config=` YAML file (if any), each named by
    its canonical keyword (`alphas=` is `alpha`)."""
    from perta_stream.config.options import with_config_file

    path = keywords.pop("config", None)
    return with_config_file(cls, path, keywords)
