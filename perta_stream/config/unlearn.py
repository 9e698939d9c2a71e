"""`UnlearnConfig`: the options of `perta-stream unlearn` (statistics, reused when present, then merge).

The options come from flags, from a YAML file (`--config`), or both: the YAML gives the base and
every flag given on the command line overrides its key. YAML keys are the flag names without the
dashes (`max-length` or `max_length`); an unknown key is an error that lists the known ones. By
convention an example config's first line is the exact command that runs it, e.g.
`# perta-stream unlearn --config configs/demo_fisher.yaml`.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from perta_stream.config.locations import normalize_inputs
from perta_stream.devices import device_problem
from perta_stream.config.merge import (
    DEFAULT_MAX_MEMORY_BYTES,
    DEFAULT_TAU,
    METHOD_ALIASES,
    METHODS,
    arithmetic_problems,
    format_alpha,
    output_dirs,
)
from perta_stream.config.stats import COMPUTE_DTYPES, STATS_KINDS
from perta_stream.dtypes import parse_user_dtype
from perta_stream.errors import PlanError, UsageError
from perta_stream.sizes import parse_size

STATS_METHODS = ("grad", "fisher")
DEFAULT_STATS_DIR_NAME = "perta_stats"
CONFIG_COMMAND_PREFIX = "# perta-stream unlearn --config "


@dataclass(frozen=True)
class UnlearnConfig:
    """What `run_unlearn` does.

    Attributes:
        theta0, full, fgt: checkpoints (directories or hf:// locations), as for `merge`.
        out: the output checkpoint directory (a `{alpha}` placeholder with several alphas).
        method: tv, uniform, grad or fisher.
        alphas: task-vector scales, all merged in one pass.
        forget, retain: the data files the statistics are computed on (grad and fisher only).
        stats_dir: where the statistics are found or written; None means `perta_stats/` next to `out`.
        stats_model: the checkpoint the statistics are taken at; None means theta0.
        kinds: the statistics to compute when they are missing (both by default, so one run
            serves grad and fisher merges).
        fraction, seed: the seeded share of each data file used for the statistics.
        max_length, batch_size, device, compute_dtype, stats_dtype, question_key, answer_key,
            system_prompt: statistics options, as for `stats`.
        checkpoint_interval_s: the least time between two saved resume states of the statistics
            (None: the `stats` default).
        boundary_budget_bytes: host RAM for the sweep's layer-boundary states before they spill
            to disk (None: the `stats` default).
        recompute_stats: replace a statistics directory that exists but does not match the inputs.
        tau, uniform_weight, fallback_weight, out_dtype, max_shard_bytes: merge options.
        max_memory_bytes: what the merge may add to the process's resident memory when it starts
            (statistics may have run in the same process before it).
        dry_run: report what would be reused or computed and the merge plan; write nothing.
        overwrite: replace an existing output.
        resume: continue an interrupted run: the statistics from `<stats_dir>.partial/` and a
            local merge output from `<out>.partial/` (a Hub push skips what the Hub holds anyway).
        allow_nonfinite: merge NaN and infinite input values through instead of stopping.
        one_pass: statistics and merge in one layer-major sweep, with no statistics directory
            (pipelines/one_pass.py); `method` may then list several methods (`grad,fisher`),
            each merged at every α, one output per (method, α).
        save_stats: with one_pass, also write the statistics directory there (for later merges).
        config_only: with one_pass and dry_run, plan from the stats model's config.json alone.
    """

    theta0: str
    full: str
    fgt: str
    out: str
    method: str = "fisher"
    alphas: tuple[float, ...] = (1.0,)
    forget: str | None = None
    retain: str | None = None
    stats_dir: str | None = None
    stats_model: str | None = None
    kinds: tuple[str, ...] = STATS_KINDS
    fraction: float = 1.0
    seed: int = 0
    max_length: int = 512
    batch_size: int = 8
    device: str = "auto"
    compute_dtype: str = "auto"
    stats_dtype: str | None = None
    question_key: str = "question"
    answer_key: str = "answer"
    system_prompt: str | None = None
    recompute_stats: bool = False
    tau: float | None = None
    uniform_weight: float = 0.5
    fallback_weight: float = 0.5
    out_dtype: str | None = None
    max_shard_bytes: int | None = None
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES
    dry_run: bool = False
    overwrite: bool = False
    resume: bool = False
    checkpoint_interval_s: float | None = None
    allow_nonfinite: bool = False
    boundary_budget_bytes: int | None = None
    one_pass: bool = False
    save_stats: str | None = None
    config_only: bool = False

    def __post_init__(self) -> None:
        normalize_inputs(self, "theta0", "full", "fgt", "stats_model")
        if self.method in METHOD_ALIASES:
            object.__setattr__(self, "method", METHOD_ALIASES[self.method])
        problems = self.problems()
        if problems:
            raise PlanError("invalid unlearn options", problems)

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods to merge with (several only in one pass)."""
        return tuple(part.strip() for part in self.method.split(",") if part.strip())

    @property
    def stat_methods(self) -> tuple[str, ...]:
        return tuple(method for method in self.methods if method in STATS_METHODS)

    @property
    def needs_stats(self) -> bool:
        return bool(self.stat_methods)

    @property
    def effective_stats_dir(self) -> str:
        """The statistics directory: the given one, or `perta_stats/` in the folder that holds the output."""
        if self.stats_dir:
            return self.stats_dir
        first_out = Path(output_dirs(self.out, self.alphas)[0])
        return str(first_out.parent / DEFAULT_STATS_DIR_NAME)

    @property
    def effective_stats_model(self) -> str:
        return self.stats_model or self.theta0

    def stats_config(self, *, out: str, kinds: tuple[str, ...], overwrite: bool) -> Any:
        """The `StatsConfig` of this run's statistics (into `out`), as `stats` would be given them.

        Raises:
            PlanError: the statistics options are invalid (e.g. a missing data file).
        """
        from perta_stream.config.stats import StatsConfig

        options: dict[str, Any] = {}
        for name in ("stats_dtype", "checkpoint_interval_s", "boundary_budget_bytes"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)  # else the `stats` default
        return StatsConfig(
            model=self.effective_stats_model,
            forget=str(self.forget),
            retain=str(self.retain),
            out=out,
            kinds=kinds,
            fraction=self.fraction,
            seed=self.seed,
            max_length=self.max_length,
            batch_size=self.batch_size,
            device=self.device,
            compute_dtype=self.compute_dtype,
            question_key=self.question_key,
            answer_key=self.answer_key,
            system_prompt=self.system_prompt,
            dry_run=self.dry_run,
            config_only=self.config_only,
            overwrite=overwrite,
            resume=self.resume,
            # Whatever --stats-dir says, it never replaces one of the models of this run.
            other_inputs={"theta0": self.theta0, "full": self.full, "fgt": self.fgt},
            **options,
        )

    def merge_config(self, *, out: str, method: str, alphas: tuple[float, ...], stats: str | None) -> Any:
        """The `MergeConfig` of this run's merge of `method` at `alphas` into `out`, its statistics
        in `stats` (None for tv and uniform)."""
        from perta_stream.config.merge import MergeConfig
        from perta_stream.memory import current_rss_bytes

        return MergeConfig(
            theta0=self.theta0,
            full=self.full,
            fgt=self.fgt,
            out=out,
            method=method,
            stats=stats,
            alphas=alphas,
            tau=self.tau if method in STATS_METHODS else None,
            uniform_weight=self.uniform_weight,
            fallback_weight=self.fallback_weight,
            out_dtype=self.out_dtype,
            max_shard_bytes=self.max_shard_bytes,
            # Statistics may have run in this process (torch, the tokenizer); the budget is what the
            # merge may add on top of what the process holds when it starts.
            max_memory_bytes=current_rss_bytes() + self.max_memory_bytes,
            dry_run=self.dry_run,
            overwrite=self.overwrite,
            resume=self.resume and not out.startswith("hf://"),
            allow_nonfinite=self.allow_nonfinite,
            stats_at=self.stats_at,
        )

    @property
    def stats_at(self) -> str:
        """Which merge input the statistics are taken at (the merge checks them against its bytes)."""
        for role in ("theta0", "full", "fgt"):
            if self.effective_stats_model == getattr(self, role):
                return role
        return "theta0"

    @property
    def effective_tau(self) -> float:
        return self.tau if self.tau is not None else DEFAULT_TAU.get(self.method, 1.0)

    def problems(self) -> list[str]:
        """Every inconsistency among the options (empty when the config is usable)."""
        found: list[str] = []
        for name in ("theta0", "full", "fgt", "out"):
            if not getattr(self, name):
                found.append(f"--{name} is required")
        unknown = [method for method in self.methods if method not in METHODS]
        if unknown or not self.methods:
            found.append(f"--method {self.method!r} is unknown; choose one of {', '.join(METHODS)} (several, comma-separated, with --one-pass)")
        elif len(self.methods) > 1 and not self.one_pass:
            found.append(f"--method {self.method} lists several methods; that needs --one-pass (or run unlearn once per method)")
        if len(set(self.methods)) != len(self.methods):
            found.append(f"--method {self.method} lists the same method twice")
        found += self._one_pass_problems()
        found += arithmetic_problems(
            self.alphas, self.tau, self.uniform_weight, self.fallback_weight, alpha_flag="--alpha"
        )
        if self.needs_stats or self.save_stats:
            for flag, value in (("--forget", self.forget), ("--retain", self.retain)):
                if not value:
                    found.append(f"--method {self.method} needs {flag} FILE (the data its statistics are computed on)")
        if not self.kinds or any(kind not in STATS_KINDS for kind in self.kinds):
            found.append(f"--kinds {','.join(self.kinds)!r}: give one or both of {', '.join(STATS_KINDS)}")
        elif self.needs_stats and not self.one_pass and self.method not in self.kinds:
            found.append(f"--kinds {','.join(self.kinds)} does not include {self.method}, which --method {self.method} needs")
        if not 0 < self.fraction <= 1:
            found.append(f"--fraction must be in (0, 1], got {self.fraction}")
        for flag, value in (("--max-length", self.max_length), ("--batch-size", self.batch_size)):
            if value < 1:
                found.append(f"{flag} must be at least 1, got {value}")
        if device_problem(self.device):
            found.append(str(device_problem(self.device)))
        if self.compute_dtype not in COMPUTE_DTYPES:
            found.append(f"--compute-dtype {self.compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")
        if self.checkpoint_interval_s is not None and not (math.isfinite(self.checkpoint_interval_s) and self.checkpoint_interval_s >= 0):
            found.append(f"--checkpoint-interval must be a number of seconds >= 0 (0: at every resume point), got {self.checkpoint_interval_s}")
        if not self.question_key or not self.answer_key:
            found.append("--question-key and --answer-key must not be empty")
        if self.tau is not None and not self.needs_stats:
            found.append(f"--tau is not used by --method {self.method}")
        if self.stats_model is not None and self.stats_model not in (self.theta0, self.full, self.fgt):
            found.append(
                f"--stats-model {self.stats_model} must be one of --theta0, --full, --fgt (the merge checks the statistics "
                "against the bytes of the model they were computed at, which it reads anyway)"
            )
        if len(self.alphas) > 1 and "{alpha}" not in self.out and self.out.startswith("hf://"):
            found.append("several alphas pushed to the Hub need a {alpha} placeholder in --out")
        return found

    def _one_pass_problems(self) -> list[str]:
        found: list[str] = []
        if not self.one_pass:
            for flag, given in (("--save-stats", self.save_stats), ("--config-only", self.config_only)):
                if given:
                    found.append(f"{flag} applies to --one-pass; add --one-pass or drop it")
            return found
        if self.config_only and not self.dry_run:
            found.append("--config-only plans from config.json alone; it needs --dry-run")
        if self.out.startswith("hf://") or self.save_stats and self.save_stats.startswith("hf://"):
            found.append("--one-pass writes local folders; push an output afterwards, or unlearn without --one-pass")
        if self.stats_dir or self.recompute_stats:
            found.append("--stats-dir and --recompute-stats belong to the two-pass way; with --one-pass, --save-stats DIR writes the statistics")
        if self.one_pass and not self.needs_stats and not self.save_stats:
            found.append(f"--method {self.method} needs no statistics; a plain unlearn (or merge) is already one pass over the models")
        return found

    @classmethod
    def from_mapping(cls, options: dict[str, Any], *, where: str) -> "UnlearnConfig":
        """Build from a mapping of option names (YAML keys or flags) to values.

        Raises:
            UsageError: unknown keys, values of the wrong type, or invalid options; all reported at once.
        """
        known = {field.name for field in fields(cls)}
        normalized: dict[str, Any] = {}
        problems: list[str] = []
        for raw_key, value in options.items():
            key = _ALIASES.get(str(raw_key).replace("-", "_"), str(raw_key).replace("-", "_"))
            if key not in known:
                problems.append(f"{where}: unknown option {raw_key!r}; known: {', '.join(sorted(known | set(_ALIASES)))}")
                continue
            try:
                normalized[key] = _coerce(key, value)
            except (TypeError, ValueError, PlanError, UsageError) as exc:
                problems.append(f"{where}: option {raw_key!r}: {exc}")
        for required in ("theta0", "full", "fgt", "out"):
            if required not in normalized:
                problems.append(f"{where}: --{required} is required (a flag or a key of the --config file)")
        if problems:
            raise UsageError(f"invalid unlearn options: {'; '.join(problems)}")
        try:
            return cls(**normalized)
        except PlanError as exc:
            raise UsageError(f"{where}: {exc}") from None

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> "UnlearnConfig":
        """Merge `--config` YAML (if any) with the flags given on the command line (flags win)."""
        options: dict[str, Any] = {}
        where = "command line"
        if getattr(args, "config", None):
            options.update(load_config_file(args.config))
            where = f"--config {args.config} + command line"
        for key, value in vars(args).items():
            if key in _CLI_ONLY or value is None:
                continue
            if isinstance(value, bool) and value is False:
                continue  # store_true flags not given: keep the YAML's value
            options[key] = value
        return cls.from_mapping(options, where=where)

    def to_dict(self) -> dict[str, Any]:
        """The resolved options (saved into the run record)."""
        return {field.name: list(value) if isinstance(value := getattr(self, field.name), tuple) else value for field in fields(self)}


# YAML/flag spellings that differ from the field names.
_ALIASES = {
    "alpha": "alphas",
    "stats": "stats_dir",
    "max_shard_size": "max_shard_bytes",
    "max_memory": "max_memory_bytes",
    "checkpoint_interval": "checkpoint_interval_s",
    "boundary_budget": "boundary_budget_bytes",
}
# argparse attributes that are not options of the run.
_CLI_ONLY = frozenset({"command", "config", "verbose", "quiet"})


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The options of a YAML config file (a flat mapping).

    Raises:
        UsageError: the file is missing, not YAML, or not a mapping.
    """
    import yaml

    config_path = Path(path)
    if not config_path.is_file():
        raise UsageError(f"--config {path} does not exist; see configs/ for examples")
    try:
        loaded = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UsageError(f"--config {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UsageError(f"--config {path} must hold a mapping of option: value, not a {type(loaded).__name__}")
    return loaded


def config_command(path: str | os.PathLike) -> str:
    """The first line an example config carries: the exact command that runs it."""
    return f"{CONFIG_COMMAND_PREFIX}{path}"


def _coerce(key: str, value: Any) -> Any:
    """Turn a YAML or flag value into the field's type (lists, sizes and dtypes parsed here)."""
    if key == "alphas":
        values = value if isinstance(value, (list, tuple)) else [value]
        if isinstance(value, str):
            values = [part for part in value.split(",") if part.strip()]
        return tuple(float(item) for item in values)
    if key == "kinds":
        values = value.split(",") if isinstance(value, str) else list(value)
        return tuple(str(item).strip() for item in values if str(item).strip())
    if key in ("max_shard_bytes", "max_memory_bytes", "boundary_budget_bytes"):
        if value is None:
            return None
        if key == "boundary_budget_bytes" and str(value).strip() == "0":
            return 0  # spill every boundary (sizes elsewhere must be positive)
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else parse_size(str(value), what=f"--{key}")
    if key in ("out_dtype", "stats_dtype"):
        return None if value is None else parse_user_dtype(str(value))
    if key in ("fraction", "uniform_weight", "fallback_weight", "tau", "checkpoint_interval_s"):
        if value is None:
            return None
        if isinstance(value, bool):
            raise TypeError(f"expected a number, got {value!r}")
        return float(value)
    if key in ("seed", "max_length", "batch_size"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {value!r}")
        return value
    if key in ("recompute_stats", "dry_run", "overwrite", "resume", "allow_nonfinite", "one_pass", "config_only"):
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {value!r}")
        return value
    if value is not None and not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    if key == "system_prompt" and value == "":
        return None  # as `stats` records it, so an empty prompt still reuses the statistics
    return value


__all__ = ["UnlearnConfig", "config_command", "load_config_file", "format_alpha"]
