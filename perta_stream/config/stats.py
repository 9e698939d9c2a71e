"""`StatsConfig`: every option of `perta-stream stats`, validated in one place.

All problems are collected and reported together (PlanError) before any file is read, so a
user fixes a command line in one round.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perta_stream.config.locations import normalize_inputs, with_typos
from perta_stream.config.options import RESUME_HELP, empty_is_none, from_options, given_options, option, size_or_zero, words
from perta_stream.devices import DEVICE_HELP, device_problem
from perta_stream.errors import PlanError

STATS_KINDS = ("grad", "fisher")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
STATS_DTYPES = ("F32", "BF16")
DEFAULT_BOUNDARY_BUDGET_BYTES = 2 * 2**30
# A saved resume state costs about as much disk I/O as one layer boundary (tokens × hidden);
# every 5 minutes keeps that cost small and bounds the work a crash loses.
DEFAULT_CHECKPOINT_INTERVAL_S = 300.0


def _stats_dtype(value: object, flag: str) -> str:
    from perta_stream.dtypes import parse_user_dtype

    return parse_user_dtype(str(value), allowed=STATS_DTYPES)


@dataclass(frozen=True, kw_only=True)
class StatsOptions:
    """How statistics are computed: the options `stats` and `unlearn` share, declared once.

    Attributes:
        kinds: `grad` (mean gradient) and/or `fisher` (mean squared per-sample gradient).
        fraction, seed: a seeded random subset of each data file (1.0: all samples).
        max_length: tokens per sample (prompt cut from its start; answers are never cut).
        batch_size: samples per batch on the compute device.
        device: `auto` (cuda when available), `cpu`, `cuda` or `cuda:N`.
        compute_dtype: dtype of the layers' weights and activations: `auto` (float32 on cpu,
            bfloat16 on cuda), `float32` or `bfloat16`; statistics accumulate in float32 always.
        stats_dtype: storage dtype of the statistics, `F32` or `BF16` (accumulation is float32).
        question_key, answer_key: field names of the records.
        system_prompt: optional system turn of the chat template (or a line before the prompt).
        boundary_budget_bytes: host RAM for layer-boundary states before spilling to disk.
        checkpoint_interval_s: the least time between two saved resume states (at the resume
            points after the head and after each backward layer); 0 saves at every one.
    """

    kinds: tuple[str, ...] = option(STATS_KINDS, parse=words, help="statistics to compute: grad, fisher or grad,fisher (default)")
    fraction: float = option(1.0, help="seeded random fraction of each data file (default 1.0: all)")
    seed: int = option(0, help="seed of the --fraction subset (default 0)")
    max_length: int = option(512, help="tokens per sample; the prompt is cut from its start, never the answer (default 512)")
    batch_size: int = option(8, help="samples per batch on the compute device (default 8)")
    device: str = option("auto", help=f"compute device: {DEVICE_HELP} (default auto)")
    compute_dtype: str = option(
        "auto",
        choices=COMPUTE_DTYPES,
        help="dtype of weights and activations (default auto: float32 on cpu, bfloat16 on cuda); statistics accumulate in float32",
    )
    stats_dtype: str = option("F32", parse=_stats_dtype, help="storage dtype of the statistics: float32 (default) or bfloat16")
    question_key: str = option("question", help="record field holding the question (default question)")
    answer_key: str = option("answer", help="record field holding the answer (default answer)")
    system_prompt: str | None = option(None, parse=empty_is_none, help="system turn for the chat template (or a line before the plain prompt)")
    boundary_budget_bytes: int = option(
        DEFAULT_BOUNDARY_BUDGET_BYTES,
        flags=("--boundary-budget",),
        parse=size_or_zero,
        help="host RAM for layer-boundary hidden states before spilling to disk (default 2GiB; 0: spill all)",
    )
    checkpoint_interval_s: float = option(
        DEFAULT_CHECKPOINT_INTERVAL_S,
        flags=("--checkpoint-interval",),
        metavar="SECONDS",
        help="save the sweep's state for --resume at most this often, after the head or a backward layer (default 300; 0: after each)",
    )

    def encoding(self) -> dict[str, Any]:
        """The options the chosen, encoded samples depend on (recorded, and matched before a reuse)."""
        return {name: getattr(self, name) for name in ("fraction", "seed", "max_length", "question_key", "answer_key", "system_prompt")}

    def stats_option_problems(self) -> list[str]:
        """Every problem with these options (empty when they are usable)."""
        problems: list[str] = []
        if not self.kinds:
            problems.append("--kinds is empty; choose grad, fisher or grad,fisher")
        unknown = [k for k in self.kinds if k not in STATS_KINDS]
        if unknown:
            problems.append(f"--kinds {','.join(unknown)} unknown; choose from {', '.join(STATS_KINDS)}")
        if len(set(self.kinds)) != len(self.kinds):
            problems.append(f"--kinds {','.join(self.kinds)} names a statistic twice")
        if not 0 < self.fraction <= 1:
            problems.append(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.seed < 0:
            problems.append(f"--seed must be >= 0, got {self.seed}")
        if self.max_length < 2:
            problems.append(f"--max-length must be at least 2 tokens, got {self.max_length}")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be at least 1, got {self.batch_size}")
        if device_problem(self.device):
            problems.append(str(device_problem(self.device)))
        if self.compute_dtype not in COMPUTE_DTYPES:
            problems.append(f"--compute-dtype {self.compute_dtype!r} unsupported; choose from {', '.join(COMPUTE_DTYPES)}")
        if self.stats_dtype not in STATS_DTYPES:
            problems.append(f"--stats-dtype {self.stats_dtype!r} unsupported; choose float32 or bfloat16")
        if self.boundary_budget_bytes < 0:
            problems.append(f"--boundary-budget must be >= 0, got {self.boundary_budget_bytes}")
        if not (math.isfinite(self.checkpoint_interval_s) and self.checkpoint_interval_s >= 0):
            problems.append(f"--checkpoint-interval must be a number of seconds >= 0 (0: at every resume point), got {self.checkpoint_interval_s}")
        for flag, key in (("--question-key", self.question_key), ("--answer-key", self.answer_key)):
            if not key:
                problems.append(f"{flag} is empty")
        if self.question_key and self.question_key == self.answer_key:
            problems.append(f"--question-key and --answer-key are both {self.question_key!r}")
        return problems

    def compute_dtype_on(self, device: str) -> str:
        """The compute dtype's name on `device` (`cpu` or `cuda`): `auto` is float32 on cpu, bfloat16 on cuda."""
        if self.compute_dtype != "auto":
            return self.compute_dtype
        return "float32" if device == "cpu" else "bfloat16"


@dataclass(frozen=True)
class StatsConfig(StatsOptions):
    """Options of one statistics run: the shared `StatsOptions` and these.

    Attributes:
        model: checkpoint directory or `hf://org/name[@rev]`; with `config_only`, a config.json
            file, a directory holding one, or a Hub model (whose config.json alone is fetched).
        forget, retain: data files (JSON Lines or a JSON array of records).
        out: the statistics directory to create (not needed for a dry run).
        dry_run: print the plan only; config_only: plan from config.json, without weights.
        overwrite: replace an existing `out`.
        resume: continue an interrupted identical run from `<out>.partial/` (finished shards are
            re-hashed and kept, the sweep restarts from its latest saved state).
        other_inputs: role -> path of the inputs of a surrounding run (unlearn's theta0, full,
            fgt) that `out` must not overlap.
    """

    model: str = option(help="checkpoint directory or hf://org/name[@rev] (with --config-only: a config.json)")
    forget: str = option(help="forget-set data file (.jsonl or a .json array of records)")
    retain: str = option(help="retain-set data file (.jsonl or a .json array of records)")
    out: str | None = option(None, help="statistics directory to create (not needed with --dry-run)")
    dry_run: bool = option(False, help="print the plan (bytes, boundary storage, memory, FLOPs) and exit")
    config_only: bool = option(False, help="with --dry-run: plan from config.json alone (local, or fetched alone from the Hub), no weights needed")
    overwrite: bool = option(False, help="replace an existing --out")
    resume: bool = option(False, help=RESUME_HELP)
    other_inputs: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        problems = with_typos(normalize_inputs(self, "model"), self.stats_option_problems() + self._problems())
        if problems:
            raise PlanError("stats options are invalid", problems)

    def _problems(self) -> list[str]:
        problems: list[str] = []
        if self.config_only and not self.dry_run:
            problems.append("--config-only only plans (it has no weights to compute with); add --dry-run")
        if self.out is None and not self.dry_run:
            problems.append("--out is required (the statistics directory to create), unless --dry-run")
        for flag, path in (("--forget", self.forget), ("--retain", self.retain)):
            if not Path(path).is_file():
                problems.append(f"{flag} {path} is not a file; pass a .jsonl or .json data file")
        if not str(self.model).startswith("hf://"):
            model_path = Path(self.model)
            if self.config_only:
                if not (model_path.is_file() or (model_path / "config.json").is_file()):
                    problems.append(f"--model {self.model}: no config.json there (with --config-only, pass a config.json or a folder holding one)")
            elif not model_path.is_dir():
                problems.append(f"--model {self.model} is not a directory; pass a Hugging Face model directory")
        return problems

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> "StatsConfig":
        """Build from parsed `stats` arguments; every bad value is reported at once.

        Raises:
            PlanError: listing every invalid option.
        """
        return cls.from_options(given_options(args, cls))

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "StatsConfig":
        """Build from options named as the flags (YAML keys, API keywords).

        Raises:
            PlanError: listing every invalid option.
        """
        return from_options(cls, options, title="stats options are invalid")
