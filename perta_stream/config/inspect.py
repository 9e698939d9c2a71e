"""`InspectConfig`: the options of `perta-stream inspect` (W's figures from statistics, streamed)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from perta_stream.config.locations import normalize_inputs
from perta_stream.config.merge import DEFAULT_TAU, METHODS, STATS_AT, arithmetic_problems, default_max_memory_bytes
from perta_stream.config.options import from_options, given_options, numbers, option, size, words
from perta_stream.errors import PlanError, UsageError

# The files inspect writes into its output folder.
RECORD_NAME = "inspect.json"
SUMMARY_NAME = "inspect.md"
INSPECT_FORMAT = "perta_inspect"
# The rank sample's target size over the whole model (compute/rank_sample.py): Spearman's ρ on
# half a million elements has a standard error of about 0.0014, and its ranking costs a second.
DEFAULT_RANK_SAMPLE_ELEMENTS = 1 << 19
HELP = "W per tensor, layer and module: histograms, effective scale ‖W⊙TV‖/‖TV‖, forget/retain agreement (JSON, Markdown, PNG)"
DESCRIPTION = (
    "Read statistics (and, with --theta0 and --fgt, the task vector) chunk by chunk, as the merge does, and report "
    "W of every method: its distribution, how far it shortens the task vector (the effective scale, whose inverse is "
    "the matched alpha of `--alpha-unit matched`), and how the forget and retain gradients agree; per tensor, layer, "
    "module kind and for the model. With --compare, how far W of two statistics runs differ."
)


@dataclass(frozen=True)
class InspectConfig:
    """What `run_inspect` does.

    Attributes:
        stats: the statistics directory (`perta-stream stats`).
        out: the output folder: `inspect.json`, `inspect.md` and PNG plots.
        compare: another statistics directory of the same model; W of `compare` (a) and of
            `stats` (b) are compared element by element.
        theta0, fgt: both or neither: the task vector θ_fgt − θ_0, for the effective scale
            (`fgt` may be a PEFT LoRA adapter of `theta0`, as in `perta-stream merge`).
        methods: grad, fisher, uniform, tv; None: the kinds the statistics hold, then uniform and tv.
        taus: W's exponents for grad and fisher; None: each method's default (1 and 2).
        uniform_weight, fallback_weight: as in `perta-stream merge`.
        stats_at: the model the statistics were computed at; with a task vector, inspect checks
            the statistics' recorded content digest against that input's bytes (theta0 or fgt;
            `full` is not an input of inspect, so it is not checked).
        max_memory_bytes, chunk_bytes: what the run may add to the memory the process holds
            when it starts, and the chunk size (None: from the budget), as in the merge.
        dry_run: print the plan, read nothing.
        overwrite: replace an earlier inspect output at `out`.
        rank_sample_elements: the model's rank-sample target (Python only).
    """

    stats: str = option(flags=("stats",), help="statistics directory from `perta-stream stats`")
    out: str = option(help="output folder: inspect.json, inspect.md and the PNG plots")
    compare: str | None = option(
        None, metavar="STATS_A", help="another statistics directory of the same model: compare its W (a) with W of STATS (b)"
    )
    theta0: str | None = option(None, help="the original model; with --fgt, the task vector for the effective scale")
    fgt: str | None = option(None, help="the model fine-tuned on the forget set, or its PEFT LoRA adapter folder; with --theta0, the task vector")
    methods: tuple[str, ...] | None = option(
        None, flags=("--method", "--methods"), parse=words, help="grad, fisher, uniform, tv (default: the kinds the statistics hold, then uniform and tv)"
    )
    taus: tuple[float, ...] | None = option(
        None, flags=("--tau",), parse=numbers, help="exponent(s) of grad and fisher W, e.g. 1,2 (default 1 for grad, 2 for fisher)"
    )
    uniform_weight: float = option(0.5, help="W for --method uniform (default 0.5)")
    fallback_weight: float = option(0.5, help="W where both statistics are exactly 0 (default 0.5)")
    stats_at: str = option(
        "theta0", choices=STATS_AT, help="the model the statistics were computed at (default theta0); its bytes are checked against them"
    )
    max_memory_bytes: int = option(
        flags=("--max-memory",), parse=size, default_factory=default_max_memory_bytes, help="memory the run may add to this process (default 512MiB, or $PERTA_MAX_MEMORY)"
    )
    chunk_bytes: int | None = option(None, flags=("--chunk-size",), parse=size, help="bytes per input chunk (default: derived from --max-memory)")
    dry_run: bool = option(False, help="print the plan and exit without reading tensors")
    overwrite: bool = option(False, help="replace an existing --out (only an earlier inspect output or an empty folder)")
    rank_sample_elements: int = DEFAULT_RANK_SAMPLE_ELEMENTS

    def __post_init__(self) -> None:
        normalize_inputs(self, "theta0", "fgt")
        problems = self.problems()
        if problems:
            raise PlanError("invalid inspect options", problems)

    @property
    def task_vector(self) -> bool:
        return bool(self.theta0 and self.fgt)

    def problems(self) -> list[str]:
        """Every inconsistency among the options (empty when the config is usable)."""
        found: list[str] = []
        if bool(self.theta0) != bool(self.fgt):
            found.append("--theta0 and --fgt go together (the task vector is θ_fgt − θ_0); give both or neither")
        for method in self.methods or ():
            if method not in METHODS:
                found.append(f"--methods: {method!r} is unknown; choose from {', '.join(METHODS)}")
        if self.methods is not None and not self.methods:
            found.append(f"--methods needs at least one of {', '.join(METHODS)}")
        if self.methods and len(set(self.methods)) != len(self.methods):
            found.append("--methods lists the same method twice")
        if self.taus is not None:
            if not self.taus:
                found.append("--tau needs at least one value")
            if len(set(self.taus)) != len(self.taus):
                found.append("--tau lists the same value twice")
        for tau in self.taus or (None,):
            found += arithmetic_problems((1.0,), tau, self.uniform_weight, self.fallback_weight, alpha_flag="--alpha")
        if self.compare and self.methods and not set(self.methods) & {"grad", "fisher"}:
            found.append("--compare compares W of grad and fisher; --methods lists neither")
        if self.max_memory_bytes < 64 * 2**20:
            found.append("--max-memory below 64MiB cannot hold the Python runtime; raise it")
        if self.chunk_bytes is not None and self.chunk_bytes < 4096:
            found.append("--chunk-size must be at least 4KiB")
        if self.rank_sample_elements < 2:
            found.append(f"rank_sample_elements {self.rank_sample_elements} must be at least 2")
        for flag, location in (("STATS", self.stats), ("--compare", self.compare)):
            if location and str(location).startswith("hf://"):
                found.append(f"{flag} {location}: statistics are read from a local directory; download them first")
        return list(dict.fromkeys(found))

    def taus_of(self, method: str) -> tuple[float, ...]:
        """The exponents W of `method` is computed with."""
        return self.taus if self.taus else (DEFAULT_TAU[method],)

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> "InspectConfig":
        """Build from parsed `perta-stream inspect` arguments."""
        return cls.from_options(given_options(args, cls))

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "InspectConfig":
        """Build from options named as the flags (YAML keys, API keywords); every problem at once.

        Raises:
            UsageError: every unknown or invalid option, at once.
        """
        try:
            return from_options(cls, options, title="invalid inspect options")
        except PlanError as exc:
            raise UsageError(str(exc)) from None
