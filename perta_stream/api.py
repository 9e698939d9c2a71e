"""The Python API: one function per command, its keywords spelled exactly as the command's flags.

    import perta_stream as ps
    ps.stats(model="base/", forget="forget.jsonl", retain="retain.jsonl", out="stats/")
    ps.merge(theta0="base/", full="full/", fgt="forget/", out="clean/", method="fisher", stats="stats/", alpha=[0.5, 1])

Every keyword is a flag of the command line with `-` written `_` (`--max-memory 2G` is
`max_memory="2G"`), and `config="run.yaml"` reads a YAML file of them as `--config` does
(`config=["base.yaml", "run.yaml"]` layers several, later files winning, keywords over all). Both
the flags and the keywords come from the same metadata on the config's fields
(config/options.py), and each value goes through the option's own parsing, so the two cannot
drift apart: a keyword the command does not have is an error that names the closest one. Values
may be given as the flag's text (`"0.5,1"`, `"2G"`) or as Python values (`[0.5, 1]`, paths).
`max_memory` is what the call may add to the memory the process already holds (a notebook has
loaded other things before), as `--max-memory` is on the command line. `quiet=True` is `-q`: no
progress bars during the call.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["evaluate", "finetune", "inspect", "merge", "stats", "sweep", "unlearn"]


def merge(*, theta0: str | os.PathLike, full: str | os.PathLike, fgt: str | os.PathLike, out: str | os.PathLike, **options: Any) -> Any:
    """`perta-stream merge`: θ_out = θ_full − α · W ⊙ (θ_fgt − θ_0), streamed.

    Args:
        theta0: the original model: a checkpoint folder, `hf://org/name[@rev]` or a bare Hub id.
        full: the model to clean (θ_0 fine-tuned on forget ∪ retain), likewise.
        fgt: θ_0 fine-tuned on the forget set only, likewise.
        out: the output folder (or `hf://org/name` to push).
        **options: any other flag of `perta-stream merge` (method, stats, alpha, tau, ...).

    Returns:
        MergeResult (outputs, bytes read and written, peak RSS, ...).

    Raises:
        UsageError: an unknown keyword or a bad value. PlanError and the other PertaStreamError
            subclasses: as the command line reports them.
    """
    from perta_stream.config.merge import MergeConfig
    from perta_stream.pipelines.merge import run_merge

    keywords = dict(theta0=theta0, full=full, fgt=fgt, out=out, **options)
    with _quiet(keywords):
        return run_merge(MergeConfig.from_options(_options(MergeConfig, keywords)))


def stats(*, model: str | os.PathLike, forget: str | os.PathLike, retain: str | os.PathLike, **options: Any) -> Any:
    """`perta-stream stats`: per-parameter gradient statistics of the forget and retain sets.

    Args:
        model: the checkpoint the statistics are taken at.
        forget: the forget set's data file (.jsonl or a .json array of records).
        retain: the retain set's data file, likewise.
        **options: any other flag of `perta-stream stats` (out, kinds, fraction, device, ...).

    Returns:
        StatsResult (the output folder and its record, or the plan of a dry run).

    Raises:
        PlanError: an unknown keyword, a bad value or invalid options, all listed at once.
    """
    from perta_stream.config.stats import StatsConfig
    from perta_stream.pipelines.stats import run_stats

    keywords = dict(model=model, forget=forget, retain=retain, **options)
    with _quiet(keywords):
        return run_stats(StatsConfig.from_options(_options(StatsConfig, keywords)))


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

    with _quiet(options):
        return run_unlearn(UnlearnConfig.from_options(_options(UnlearnConfig, options)))


def evaluate(*, model: str | os.PathLike, out: str | os.PathLike, **options: Any) -> Any:
    """`perta-stream eval`: TOFU metrics of one model (`split="forget01"`), or the metrics that
    need no retain model on one's own files (`forget="F.jsonl", retain="R.jsonl"`).

    Returns:
        EvalResult (every metric and the paths of the JSON record and Markdown table).

    Raises:
        PlanError: an unknown keyword, a bad value or invalid options, all listed at once.
    """
    from perta_stream.config.eval import EvalConfig
    from perta_stream.pipelines.eval import run_eval

    keywords = dict(model=model, out=out, **options)
    with _quiet(keywords):
        return run_eval(EvalConfig.from_options(_options(EvalConfig, keywords)))


def sweep(**options: Any) -> Any:
    """`perta-stream sweep`: several methods × alphas, evaluated, with a table and a plot.

    Returns:
        SweepResult.

    Raises:
        UsageError: an unknown keyword, a bad value or invalid options, all listed at once.
    """
    from perta_stream.config.sweep import SweepConfig
    from perta_stream.pipelines.sweep import run_sweep

    with _quiet(options):
        return run_sweep(SweepConfig.from_options(_options(SweepConfig, options)))


def finetune(*, model: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, **options: Any) -> Any:
    """`perta-stream finetune`: full fine-tuning on question-answer pairs with the answer-only loss.

    Args:
        model: the checkpoint to start from; data: a .jsonl/.json file of records; out: the new checkpoint.
        **options: any other flag of `perta-stream finetune` (epochs, lr, max_steps, batch_size, ...).

    Returns:
        FinetuneResult (the output folder, steps, losses, seconds).

    Raises:
        PlanError: an unknown keyword, a bad value or invalid options, all listed at once.
    """
    from perta_stream.config.finetune import FinetuneConfig
    from perta_stream.pipelines.finetune import run_finetune

    keywords = dict(model=model, data=data, out=out, **options)
    with _quiet(keywords):
        return run_finetune(FinetuneConfig.from_options(_options(FinetuneConfig, keywords)))


@contextmanager
def _quiet(keywords: dict[str, Any]) -> Iterator[None]:
    """`quiet=True` (the command line's -q): no progress bars until the call returns."""
    from perta_stream.config.options import switch
    from perta_stream.progress import progress_enabled_by_caller, set_progress_enabled

    quiet = switch(keywords.pop("quiet", False), "quiet")
    before = progress_enabled_by_caller()
    if quiet:
        set_progress_enabled(False)
    try:
        yield
    finally:
        set_progress_enabled(before)


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
    from perta_stream.pipelines.inspect import run_inspect

    keywords = dict(stats=stats, out=out, **options)
    with _quiet(keywords):
        return run_inspect(InspectConfig.from_options(_options(InspectConfig, keywords)))


def _options(cls: type, keywords: dict[str, Any]) -> dict[str, Any]:
    """The keywords of a call, under the keys of its `config=` YAML file (if any), each named by
    its canonical keyword (`alphas=` is `alpha`)."""
    from perta_stream.config.config_file import config_paths
    from perta_stream.config.options import with_config_file

    return with_config_file(cls, config_paths(keywords.pop("config", None), "config="), keywords)
