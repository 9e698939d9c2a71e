"""`MergeConfig`: every option of a merge, validated in one place before anything runs."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from typing import Any

from perta_stream.config.locations import normalize_inputs, with_typos
from perta_stream.config.options import RESUME_HELP, dtype, from_options, given_options, number, numbers, option, size
from perta_stream.errors import PlanError, UsageError
from perta_stream.sizes import parse_size

METHODS = ("tv", "uniform", "grad", "fisher")
# Other tools' names for a method (mergekit calls plain task arithmetic `task_arithmetic`).
METHOD_ALIASES = {"task_arithmetic": "tv"}
STATS_AT = ("theta0", "full", "fgt")
DEFAULT_TAU = {"grad": 1.0, "fisher": 2.0}
DEFAULT_MAX_MEMORY_BYTES = 512 * 2**20


def default_max_memory_bytes() -> int:
    """The merge's memory budget when none is given: PERTA_MAX_MEMORY (e.g. `2GiB`), else 512 MiB.

    The budget is what a merge may add to the resident memory the process holds when it starts
    (torch's import, a caller's tensors), so it means the same after `import torch` of any build;
    this is the one place the variable is read.
    """
    text = os.environ.get("PERTA_MAX_MEMORY", "").strip()
    return parse_size(text, what="PERTA_MAX_MEMORY") if text else DEFAULT_MAX_MEMORY_BYTES


def format_alpha(alpha: float) -> str:
    """`1.0` -> `1`, `0.5` -> `0.5`: the spelling used in per-alpha output folder names."""
    return f"{alpha:g}"


def output_dirs(out: str, alphas: tuple[float, ...]) -> tuple[str, ...]:
    """One output folder per alpha.

    A single alpha writes to `out` itself. Several alphas write to `out` with its `{alpha}`
    placeholder filled in, or, without a placeholder, to `out/alpha_<alpha>`.
    """
    if len(alphas) == 1 and "{alpha}" not in out:
        return (out,)
    if "{alpha}" in out:
        return tuple(out.replace("{alpha}", format_alpha(a)) for a in alphas)
    return tuple(os.path.join(out, f"alpha_{format_alpha(a)}") for a in alphas)


def arithmetic_problems(
    alphas: tuple[float, ...], tau: float | None, uniform_weight: float, fallback_weight: float, *, alpha_flag: str
) -> list[str]:
    """Problems with the arithmetic options that merge, unlearn and sweep share."""
    found: list[str] = []
    if not alphas:
        found.append(f"{alpha_flag} needs at least one value")
    for alpha in alphas:
        if not math.isfinite(alpha) or alpha <= 0:
            found.append(f"{alpha_flag} {alpha} must be a positive finite number")
    if len(set(alphas)) != len(alphas):
        found.append(f"{alpha_flag} lists the same value twice")
    if tau is not None and (not math.isfinite(tau) or tau <= 0):
        found.append(f"--tau {tau} must be a positive finite number")
    for flag, value in (("--uniform-weight", uniform_weight), ("--fallback-weight", fallback_weight)):
        if not (0.0 <= value <= 1.0):
            found.append(f"{flag} {value} must be within [0, 1]")
    return found


@dataclass(frozen=True, kw_only=True)
class MergeOptions:
    """The inputs, arithmetic and output options `merge` and `unlearn` share, declared once.

    Attributes:
        theta0, full, fgt: checkpoint directories or `hf://org/name[@revision]`.
        out: output directory (see `output_dirs` for several alphas), or `hf://org/name` to push.
        alphas: one or more task-vector scales; all are written in one pass over the inputs.
        tau: weight exponent; None means 1 for grad, 2 for fisher.
        uniform_weight: W of the uniform method, in [0, 1].
        fallback_weight: W where both statistics are exactly 0, in [0, 1].
        out_dtype: safetensors dtype of every output tensor, or None for theta_full's per tensor.
        max_shard_bytes: re-shard the output to at most this many bytes per shard; None keeps theta_full's layout.
        max_memory_bytes: the memory budget: what the merge may add to the resident memory the
            process holds when the merge starts (torch's import, anything the caller holds).
        allow_nonfinite: merge NaN and infinite input values through instead of stopping.
    """

    # Required, but checked with every other option (`required_problems`), so that a call or a
    # --config file lacking one hears of every problem at once (and `unlearn --model` needs none).
    theta0: str = option(None, help="the original model (directory, hf://org/name[@rev] or a Hub id)")
    full: str = option(None, help="the model to clean (fine-tuned on forget + retain)")
    fgt: str = option(None, help="the model fine-tuned on the forget set only")
    out: str = option(None, help="output directory; with several alphas, a {alpha} placeholder or one folder per alpha")
    alphas: tuple[float, ...] = option(
        (1.0,), flags=("--alpha", "--alphas"), parse=numbers, help="scale(s) of the task vector, e.g. 0.5,1,2: one pass, one output each (default 1)"
    )
    tau: float | None = option(None, parse=number, help="exponent of the weights (default 1 for grad, 2 for fisher)")
    uniform_weight: float = option(0.5, help="W for --method uniform (default 0.5)")
    fallback_weight: float = option(0.5, help="W where both statistics are exactly 0 (default 0.5)")
    out_dtype: str | None = option(None, parse=dtype, help="float32, bfloat16 or float16 (default: theta_full's dtype per tensor)")
    max_shard_bytes: int | None = option(None, flags=("--max-shard-size",), parse=size, help="re-shard the output (e.g. 5GB); default: theta_full's layout")
    max_memory_bytes: int = option(
        flags=("--max-memory",),
        parse=size,
        default_factory=default_max_memory_bytes,
        help="memory the merge may add to what the process holds when it starts (default 512MiB, or $PERTA_MAX_MEMORY)",
    )
    allow_nonfinite: bool = option(False, help="merge NaN and infinite input values through instead of stopping")

    def required_problems(self, names: tuple[str, ...] = ("theta0", "full", "fgt", "out")) -> list[str]:
        return [f"--{name} is required (give it as a flag, a --config key or a Python keyword)" for name in names if getattr(self, name) is None]

    def merge_option_problems(self) -> list[str]:
        return arithmetic_problems(self.alphas, self.tau, self.uniform_weight, self.fallback_weight, alpha_flag="--alpha")


_HUB = "pushing to the Hub (--out hf://ORG/NAME)"


@dataclass(frozen=True, kw_only=True)
class HubPushOptions:
    """The options of an `hf://ORG/NAME` output, shared by `merge` and `unlearn`.

    Attributes:
        hub_private, hub_revision, hub_commit_message, hub_create_repo: as their flags say.
        hub_max_local_shards: output shards kept on local disk at once while they wait for
            upload (>= 1; a one-pass unlearn builds every shard locally, out of order).
    """

    hub_private: bool = option(False, flags=("--private",), group=_HUB, help="create the repo private; refuse to push to an existing public repo")
    hub_revision: str | None = option(None, flags=("--revision",), group=_HUB, help="branch to commit to (created from the default branch when missing)")
    hub_commit_message: str | None = option(None, flags=("--commit-message",), group=_HUB, help="title of the single commit that adds the model")
    hub_create_repo: bool = option(False, flags=("--create-repo",), group=_HUB, help="create the repo when it does not exist")
    hub_max_local_shards: int = option(
        2, flags=("--max-local-shards",), group=_HUB, help="output shards kept on local disk at once while they wait for upload (default 2)"
    )

    def hub_push_problems(self, out: str) -> list[str]:
        """Hub options given without a Hub `out`, and values out of range."""
        from perta_stream.sources.hub_http import HUB_PREFIX

        found = []
        if not str(out).startswith(HUB_PREFIX):
            options = {
                "--private": self.hub_private,
                "--revision": self.hub_revision is not None,
                "--commit-message": self.hub_commit_message is not None,
                "--create-repo": self.hub_create_repo,
            }
            for flag in (flag for flag, given in options.items() if given):
                found.append(f"{flag} only applies to an hf:// --out; drop it or push with --out hf://ORG/NAME")
        if self.hub_max_local_shards < 1:
            found.append(f"--max-local-shards {self.hub_max_local_shards} must be at least 1")
        return found


# merge's default is the one method that needs no --stats; unlearn computes statistics, so its default is fisher.
MERGE_METHOD_HELP = (
    "tv (mergekit: task_arithmetic), uniform, grad or fisher (default tv, the one method that needs no --stats; "
    "unlearn, which computes the statistics, defaults to fisher)"
)


@dataclass(frozen=True)
class MergeConfig(MergeOptions, HubPushOptions):
    """What `run_merge` does: the shared `MergeOptions` and `HubPushOptions`, and these.

    Attributes:
        method: `tv` (W = 1), `uniform` (W = uniform_weight), `grad` or `fisher` (W from `stats`).
        stats: statistics directory written by `perta-stream stats` (grad and fisher only).
        chunk_bytes: bytes of one input chunk; None derives it from the budget.
        dry_run: plan and report, write nothing.
        overwrite: replace existing outputs.
        resume: continue from `<out>.partial/` of an interrupted identical run.
        drop_page_cache: advise the kernel to drop input pages once read.
        stats_at: the input the statistics were computed at (`theta0`, `full` or `fgt`); the merge
            hashes that input's bytes while reading them and refuses to commit when they are not
            the bytes the statistics were computed from.
        extra: keys added to `perta_merge.json` (Python only: how a caller chose α, for instance).
    """

    method: str = option("tv", flags=("--method", "--methods"), choices=(*METHODS, *METHOD_ALIASES), help=MERGE_METHOD_HELP)
    stats: str | None = option(None, flags=("--stats", "--stats-dir"), help="statistics directory from `perta-stream stats` (grad and fisher)")
    stats_at: str = option(
        "theta0",
        choices=STATS_AT,
        help="the input the statistics were computed at (default theta0); its bytes must be the ones the statistics record",
    )
    chunk_bytes: int | None = option(None, flags=("--chunk-size",), parse=size, help="bytes per input chunk (default: derived from --max-memory)")
    dry_run: bool = option(False, help="print the plan and exit without writing")
    overwrite: bool = option(False, help="replace an existing --out (only an earlier merge output or an empty folder)")
    resume: bool = option(False, help=RESUME_HELP)
    drop_page_cache: bool = option(False, help="tell the kernel to drop input pages once read, so a huge merge does not evict everything else")
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        typos = normalize_inputs(self, "theta0", "full", "fgt")
        if self.method in METHOD_ALIASES:
            object.__setattr__(self, "method", METHOD_ALIASES[self.method])
        problems = with_typos(typos, self.problems())
        if problems:
            raise PlanError("invalid merge options", problems)

    @property
    def effective_tau(self) -> float:
        return self.tau if self.tau is not None else DEFAULT_TAU.get(self.method, 1.0)

    @property
    def out_dirs(self) -> tuple[str, ...]:
        return output_dirs(self.out, self.alphas)

    def problems(self) -> list[str]:
        """Every inconsistency among the options (empty when the config is usable)."""
        found: list[str] = self.required_problems()
        if found:
            return found + self.merge_option_problems()  # the other checks read the locations
        if self.method not in METHODS:
            found.append(f"--method {self.method!r} is unknown; choose one of {', '.join(METHODS)}")
        if self.method in ("grad", "fisher") and not self.stats:
            found.append(f"--method {self.method} needs --stats DIR (compute it with `perta-stream stats`)")
        if self.method in ("tv", "uniform") and self.stats:
            found.append(f"--stats is not used by --method {self.method}; drop it or use --method grad/fisher")
        found += self.merge_option_problems()
        if self.tau is not None and self.method in ("tv", "uniform"):
            found.append(f"--tau is not used by --method {self.method}")
        if self.stats_at not in STATS_AT:
            found.append(f"--stats-at {self.stats_at!r} is not one of {', '.join(STATS_AT)}")
        if self.max_memory_bytes < 64 * 2**20:
            found.append("--max-memory below 64MiB leaves no room for the merge's buffers; raise it")
        if self.chunk_bytes is not None and self.chunk_bytes < 4096:
            found.append("--chunk-size must be at least 4KiB")
        found += self._hub_problems()
        if len(self.out_dirs) != len(set(self.out_dirs)):
            found.append("--out gives the same folder to two alphas; use a {alpha} placeholder")
        else:
            from perta_stream.sinks.output_dir import overlapping_outputs

            found += overlapping_outputs([("--out", out_dir) for out_dir in self.out_dirs])
        return found

    def _hub_problems(self) -> list[str]:
        """Malformed `hf://` locations, and Hub options given without a Hub output."""
        from perta_stream.sources.hub_http import HUB_PREFIX, hub_location_problem

        found = []
        for flag, location in (("--theta0", self.theta0), ("--full", self.full), ("--fgt", self.fgt), ("--out", self.out)):
            problem = hub_location_problem(location.replace("{alpha}", "1"), flag)
            if problem:
                found.append(problem)
        if str(self.out).startswith(HUB_PREFIX) and self.resume:
            found.append("--resume applies to local outputs; a Hub push reruns and skips uploads the Hub already holds")
        return found + self.hub_push_problems(self.out)

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> "MergeConfig":
        """Build from parsed `perta-stream merge` arguments (sizes and dtypes parsed here)."""
        return cls.from_options(given_options(args, cls))

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "MergeConfig":
        """Build from options named as the flags (YAML keys, API keywords).

        Raises:
            UsageError: every unknown or invalid option, at once.
        """
        try:
            return from_options(cls, options, title="invalid merge options")
        except PlanError as exc:
            raise UsageError(str(exc)) from None
