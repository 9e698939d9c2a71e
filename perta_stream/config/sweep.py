"""`SweepConfig`: the validated options of `perta-stream sweep` (methods x alphas -> table + plot)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perta_stream.config.alpha_unit import AlphaUnitOptions
from perta_stream.config.eval import TOFU_SPLITS, EvalOptions, QaFilesOptions
from perta_stream.config.locations import normalize_inputs, with_typos
from perta_stream.config.options import from_options, negated_switch, number, numbers, option, options_from_cli, size, words
from perta_stream.config.merge import DEFAULT_MAX_MEMORY_BYTES, METHODS, arithmetic_problems
from perta_stream.errors import PlanError, UsageError

DEFAULT_METHODS = ("tv", "uniform", "grad", "fisher")
DEFAULT_ALPHAS = (0.5, 1.0, 2.0)
STATS_METHODS = frozenset({"grad", "fisher"})

# The files a sweep writes into its output folder.
TABLE_NAME = "sweep.md"
RECORD_NAME = "sweep.json"
PLOT_NAME = "tradeoff.png"


@dataclass(frozen=True, kw_only=True)
class SweepConfig(EvalOptions, QaFilesOptions, AlphaUnitOptions):
    """Merge θ_full with every method at every α, evaluate each result, and tabulate and plot them.

    On TOFU (`split`) every model gets the TOFU metrics against θ_ret; on one's own files
    (`forget`, `retain`: `QaFilesOptions`) the metrics that need no retain model, θ_full's row
    being the "before" of every other.

    Attributes:
        theta0, full, fgt: the checkpoints of the merge (directories or hf:// locations).
        out: the sweep's folder (written as `<out>.partial/`, renamed at the end): `sweep.md`,
            `sweep.json`, `tradeoff.png`, `eval/` (one evaluation record per model) and `models/`.
        stats: the statistics directory (needed by grad and fisher).
        retain_model: θ_ret, evaluated first to give the forget-quality reference and a table row.
        retain_logs: instead of retain_model, its evaluation JSON from `perta-stream eval`.
        split: the TOFU forget split the models are evaluated on (None: forget01, unless files are given).
        tofu_dir: the TOFU folder; empty means the copy bundled with perta_stream.
        methods: merge methods, in table order.
        alphas: task-vector scales; every method is merged at all of them in one pass.
        alpha_unit: `matched` counts `alphas` in each method's matched α (config/alpha_unit.py).
        tau: weight exponent for grad and fisher; None means each method's default.
        uniform_weight, fallback_weight: as in `perta-stream merge`.
        eval_batch_size, max_length, max_new_tokens, max_items, device, system_prompt: evaluation options.
        labels, holdout: evaluation options too (EvalConfig): the answer-label convention, and a
            holdout file that gives every row its membership AUC and PrivLeak.
        keep_models: keep the merged checkpoints under `models/` (else each is deleted once evaluated).
        max_memory_bytes: what each merge may add to the process's resident memory (the sweep
            process already holds torch and the evaluations' allocations when a merge starts).
        overwrite: replace an existing `out`.
        title: the plot's title (a default when empty).
    """

    theta0: str = option(help="the original model")
    full: str = option(help="the model to clean")
    fgt: str = option(help="the model fine-tuned on the forget set only")
    out: str = option(help="the sweep's output folder")
    stats: str | None = option(None, flags=("--stats", "--stats-dir"), help="statistics directory (needed by grad and fisher)")
    retain_model: str | None = option(None, help="theta_ret, evaluated first (forget-quality reference and a table row)")
    retain_logs: str | None = option(None, help="instead of --retain-model: its `perta-stream eval` JSON")
    split: str | None = option(None, help="TOFU forget split (default forget01; or --forget/--retain: your own files)")
    methods: tuple[str, ...] = option(DEFAULT_METHODS, flags=("--method", "--methods"), parse=words, help="comma-separated (default tv,uniform,grad,fisher)")
    alphas: tuple[float, ...] = option(DEFAULT_ALPHAS, flags=("--alpha", "--alphas"), parse=numbers, help="comma-separated (default 0.5,1,2)")
    tau: float | None = option(None, parse=number, help="weight exponent for grad and fisher (default: each method's)")
    uniform_weight: float = option(0.5, help="W for uniform (default 0.5)")
    fallback_weight: float = option(0.5, help="W where both statistics are 0 (default 0.5)")
    eval_batch_size: int = option(8, help="samples per evaluation forward pass")
    keep_models: bool = option(True, flags=("--delete-models",), parse=negated_switch, help="delete each merged model once evaluated")
    max_memory_bytes: int = option(
        DEFAULT_MAX_MEMORY_BYTES, flags=("--max-memory",), parse=size, help="memory the merge may add to this process (default 512MiB)"
    )
    overwrite: bool = option(False, help="replace an existing --out")
    title: str = ""

    def __post_init__(self) -> None:
        typos = normalize_inputs(self, "theta0", "full", "fgt", "retain_model")
        if not self.on_files and self.split is None:
            object.__setattr__(self, "split", "forget01")
        self.resolve_tofu_dir()
        problems = with_typos(typos, self.problems())
        if problems:
            raise PlanError("invalid sweep options", problems)

    def problems(self) -> list[str]:
        """Every problem with these options (empty when they are usable)."""
        from perta_stream.sinks.output_dir import check_output_location

        found: list[str] = []
        if not self.methods:
            found.append("--methods needs at least one of " + ", ".join(METHODS))
        for method in self.methods:
            if method not in METHODS:
                found.append(f"--methods: {method!r} is unknown; choose from {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            found.append("--methods lists the same method twice")
        if STATS_METHODS & set(self.methods) and not self.stats:
            found.append("--methods grad/fisher need --stats DIR (compute it with `perta-stream stats`)")
        if self.stats and not str(self.stats).startswith("hf://") and not Path(self.stats).is_dir():
            found.append(f"--stats {self.stats} is not a directory")
        found += arithmetic_problems(
            self.alphas, self.tau, self.uniform_weight, self.fallback_weight, alpha_flag="--alphas"
        )
        if self.on_files:
            found += self.files_problems(self.split)
            for flag, given in (("--retain-model", self.retain_model), ("--retain-logs", self.retain_logs)):
                if given is not None:
                    found.append(f"{flag} gives TOFU's forget quality; on your files (--forget/--retain) no retain model is needed: drop it")
        elif (self.retain_model is None) == (self.retain_logs is None):
            found.append("give exactly one of --retain-model DIR (θ_ret, evaluated first) or --retain-logs FILE (its eval JSON): forget quality needs it")
        if self.retain_model is not None and not self.retain_model.startswith("hf://") and not Path(self.retain_model).is_dir():
            found.append(f"--retain-model {self.retain_model} is not a directory")
        if self.retain_logs is not None and not Path(self.retain_logs).is_file():
            found.append(f"--retain-logs {self.retain_logs} does not exist; give the JSON `perta-stream eval` wrote for θ_ret")
        if self.split is not None and self.split not in TOFU_SPLITS:
            found.append(f"--split {self.split!r} is not a TOFU split; choose one of {', '.join(TOFU_SPLITS)}")
        if self.eval_batch_size < 1:
            found.append(f"--eval-batch-size must be at least 1, got {self.eval_batch_size}")
        found += self.eval_option_problems() + self.alpha_unit_problems()
        inputs = {"theta0": self.theta0, "full": self.full, "fgt": self.fgt}
        inputs.update({role: path for role, path in (("stats", self.stats), ("retain model", self.retain_model), ("forget", self.forget), ("retain", self.retain)) if path})
        found += check_output_location(self.out, overwrite=self.overwrite, inputs=inputs, record=(RECORD_NAME, "perta_sweep"))
        return found

    @property
    def table_path(self) -> Path:
        return Path(self.out) / TABLE_NAME

    @property
    def record_path(self) -> Path:
        return Path(self.out) / RECORD_NAME

    @property
    def plot_path(self) -> Path:
        return Path(self.out) / PLOT_NAME

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> "SweepConfig":
        """Build from parsed `perta-stream sweep` arguments (and its --config file)."""
        return cls.from_options(options_from_cli(args, cls))

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "SweepConfig":
        """Build from options named as the flags (YAML keys, API keywords); every problem at once."""
        try:
            return from_options(cls, options, title="invalid sweep options")
        except PlanError as exc:
            raise UsageError(str(exc)) from None

    def to_dict(self) -> dict:
        """The resolved options, as saved into `sweep.json`."""
        return {
            "theta0": self.theta0,
            "full": self.full,
            "fgt": self.fgt,
            "out": self.out,
            "stats": self.stats,
            "retain_model": self.retain_model,
            "retain_logs": self.retain_logs,
            "split": self.split,
            "tofu_dir": self.tofu_dir,
            "methods": list(self.methods),
            "alphas": list(self.alphas),
            "alpha_unit": self.alpha_unit,
            "tau": self.tau,
            "uniform_weight": self.uniform_weight,
            "fallback_weight": self.fallback_weight,
            "eval_batch_size": self.eval_batch_size,
            "max_length": self.max_length,
            "max_new_tokens": self.max_new_tokens,
            "max_items": self.max_items,
            "device": self.device,
            "system_prompt": self.system_prompt,
            "labels": self.labels,
            "holdout": self.holdout,
            "forget": self.forget,
            "retain": self.retain,
            "question_key": self.question_key,
            "answer_key": self.answer_key,
            "keep_models": self.keep_models,
            "max_memory_bytes": self.max_memory_bytes,
        }
