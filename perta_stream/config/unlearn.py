"""`UnlearnConfig`: the options of `perta-stream unlearn` (statistics, reused when present, then merge).

It is built from the option groups it shares with `stats` and `merge` (`StatsOptions`,
`MergeOptions`, `HubPushOptions`: each option declared once, with its flag) and the options only
unlearn has. The options come from flags, from a YAML file (`--config`), or both: the YAML gives
the base and every flag given on the command line overrides its key. YAML keys are the flag names
without the dashes (`max-length` or `max_length`); an unknown key is an error that names the
closest one. By convention an example config's first line is the exact command that runs it,
e.g. `# perta-stream unlearn --config configs/demo_fisher.yaml`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from perta_stream.config.alpha_unit import AlphaUnitOptions
from perta_stream.config.finetune import default_lr
from perta_stream.config.locations import normalize_inputs, with_typos
from perta_stream.config.merge import DEFAULT_TAU, METHOD_ALIASES, METHODS, HubPushOptions, MergeOptions, format_alpha, output_dirs
from perta_stream.config.options import field_values, from_options, load_config_file, option, options_from_cli
from perta_stream.config.stats import StatsOptions
from perta_stream.config.unlearn_own_model import AfterEvalOptions, OwnModelOptions
from perta_stream.errors import PlanError, UsageError

STATS_METHODS = ("grad", "fisher")
CONFIG_COMMAND_PREFIX = "# perta-stream unlearn --config "


@dataclass(frozen=True)
class UnlearnConfig(StatsOptions, MergeOptions, HubPushOptions, OwnModelOptions, AfterEvalOptions, AlphaUnitOptions):
    """What `run_unlearn` does: the statistics options (`StatsOptions`), the merge options
    (`MergeOptions`; `max_memory_bytes` is what the merge may add to the process's resident
    memory when it starts, as for `merge`), the options of a Hub output (`HubPushOptions`), θ_fgt
    made from the user's model and the work folder (`OwnModelOptions`), the before/after
    evaluation (`AfterEvalOptions`), the unit of α (`AlphaUnitOptions`), and these.

    Attributes:
        theta0, full, fgt: the three models (None with `model`, which gives all three).
        method: tv, uniform, grad or fisher.
        forget, retain: the data files the statistics are computed on (grad and fisher only), and
            with `model` the forget file θ_fgt is fine-tuned on; the evaluation's files.
        stats_dir: where the statistics are found or written; None means a folder of the work
            folder named by the stats model's content digest and the data (`stats_dir_for`).
        stats_model: the checkpoint the statistics are taken at; None means theta0.
        recompute_stats: replace a statistics directory that exists but does not match the inputs.
        dry_run: report what would be reused or computed and the merge plan; write nothing.
        overwrite: replace an existing output.
        resume: continue an interrupted run: the statistics from `<stats_dir>.partial/` and a
            local merge output from `<out>.partial/` (a Hub push skips what the Hub holds anyway).
        one_pass: statistics and merge in one layer-major sweep, with no statistics directory
            (pipelines/one_pass.py); `method` may then list several methods (`grad,fisher`),
            each merged at every α, one output per (method, α).
        save_stats: with one_pass, also write the statistics directory there (for later merges).
        config_only: with one_pass and dry_run, plan from the stats model's config.json alone.
    """

    # unlearn computes the statistics it needs, so its default is the method that uses them
    # (merge's is tv, the one method that needs none).
    method: str = option(
        "fisher",
        flags=("--method", "--methods"),
        help="tv (mergekit: task_arithmetic), uniform, grad or fisher (default fisher: unlearn computes the statistics it needs); "
        "with --one-pass several, e.g. grad,fisher",
    )
    forget: str | None = option(None, help="forget data file (.jsonl/.json): the statistics', theta_fgt's (--model) and the evaluation's")
    retain: str | None = option(None, help="retain data file (.jsonl/.json): the statistics' and the evaluation's")
    stats_dir: str | None = option(
        None,
        flags=("--stats", "--stats-dir"),
        help="statistics directory to reuse or create (default: in the work folder, named by the model's content digest and the data)",
    )
    stats_model: str | None = option(None, help="checkpoint the statistics are taken at (default: --theta0)")
    recompute_stats: bool = option(False, help="replace a statistics directory computed from other inputs")
    dry_run: bool = option(False, help="say what would be reused or computed, print the plan, write nothing")
    overwrite: bool = option(False, help="replace an existing --out")
    resume: bool = option(False, help="continue an interrupted run: the statistics and the merge from their .partial/ folders")
    one_pass: bool = option(
        False, help="statistics and merge in one layer-major sweep: each layer is merged as its statistics complete, none are stored"
    )
    save_stats: str | None = option(None, metavar="DIR", help="with --one-pass: also write the statistics directory to DIR (for later merges)")
    config_only: bool = option(False, help="with --one-pass --dry-run: plan from the stats model's config.json alone")

    def __post_init__(self) -> None:
        typos = normalize_inputs(self, "theta0", "full", "fgt", "stats_model", "model")
        if self.method in METHOD_ALIASES:
            object.__setattr__(self, "method", METHOD_ALIASES[self.method])
        if self.lr is None:
            object.__setattr__(self, "lr", default_lr(self.lora_rank))
        problems = with_typos(typos, self.problems())
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
    def work_folder_path(self) -> Path:
        """The work folder (`--work-dir`, else `perta_work/` next to the first output)."""
        return self.work_folder(output_dirs(self.out, self.alphas)[0])

    def stats_dir_for(self, model_content_sha256: str, data_sha256: tuple[str, str]) -> str:
        """The statistics directory: the given one, or the work folder's for this model (its
        content digest) and these forget and retain files (their sha256) and encoding options,
        so runs on other models or data in one folder never share one."""
        if self.stats_dir:
            return self.stats_dir
        import hashlib
        import json

        identity = json.dumps({"model": model_content_sha256, "data": list(data_sha256), **self.encoding()}, sort_keys=True)
        key = hashlib.sha256(identity.encode()).hexdigest()[:16]
        return str(self.work_folder_path / f"stats-{model_content_sha256[:8]}-{key}")

    @property
    def effective_stats_model(self) -> str:
        return self.stats_model or self.theta0

    def stats_config(self, *, out: str, kinds: tuple[str, ...], overwrite: bool) -> Any:
        """The `StatsConfig` of this run's statistics (into `out`), as `stats` would be given them.

        Raises:
            PlanError: the statistics options are invalid (e.g. a missing data file).
        """
        from perta_stream.config.stats import StatsConfig

        return StatsConfig(
            **{**field_values(self, StatsOptions), "kinds": kinds},
            model=self.effective_stats_model,
            forget=str(self.forget),
            retain=str(self.retain),
            out=out,
            dry_run=self.dry_run,
            config_only=self.config_only,
            overwrite=overwrite,
            resume=self.resume,
            # Whatever --stats-dir says, it never replaces one of the models of this run.
            other_inputs={"theta0": self.theta0, "full": self.full, "fgt": self.fgt},
        )

    def merge_config(self, *, out: str, method: str, alphas: tuple[float, ...], stats: str | None) -> Any:
        """The `MergeConfig` of this run's merge of `method` at `alphas` into `out`, its statistics
        in `stats` (None for tv and uniform)."""
        from perta_stream.config.merge import MergeConfig

        return MergeConfig(
            **{
                **field_values(self, MergeOptions),
                **field_values(self, HubPushOptions),
                "alphas": alphas,
                "tau": self.tau if method in STATS_METHODS else None,
                "out": out,
            },
            method=method,
            stats=stats,
            dry_run=self.dry_run,
            overwrite=self.overwrite,
            resume=self.resume and not out.startswith("hf://"),
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
        required = ("out",) if self.model else ("theta0", "full", "fgt", "out")
        for name in required:
            if not getattr(self, name):
                found.append(f"--{name} is required" + (" (or --model: your model, from which unlearn makes all three)" if name != "out" else ""))
        found += self.own_model_problems({"--theta0": self.theta0, "--full": self.full, "--fgt": self.fgt})
        found += self.after_eval_problems()
        if not self.out:
            return found + self.merge_option_problems() + self.stats_option_problems()  # the rest reads the output's location
        if self.model and not self.forget:
            found.append("--model needs --forget FILE: theta_fgt is fine-tuned on it")
        if self.wants_eval(bool(self.model)) and not (self.forget and self.retain):
            found.append("--eval needs --forget and --retain: the evaluation runs on those files")
        unknown = [method for method in self.methods if method not in METHODS]
        if unknown or not self.methods:
            found.append(f"--method {self.method!r} is unknown; choose one of {', '.join(METHODS)} (several, comma-separated, with --one-pass)")
        elif len(self.methods) > 1 and not self.one_pass:
            found.append(f"--method {self.method} lists several methods; that needs --one-pass (or run unlearn once per method)")
        if len(set(self.methods)) != len(self.methods):
            found.append(f"--method {self.method} lists the same method twice")
        found += self._one_pass_problems() + self.hub_push_problems(self.out)
        found += self.merge_option_problems() + self.stats_option_problems() + self.alpha_unit_problems()
        if self.alphas_are_matched and self.one_pass:
            found.append("--alpha-unit matched measures W over the whole model before merging; the one pass merges each layer as it goes: drop --one-pass")
        if self.needs_stats or self.save_stats:
            for flag, value in (("--forget", self.forget), ("--retain", self.retain)):
                if not value:
                    found.append(f"--method {self.method} needs {flag} FILE (the data its statistics are computed on)")
        if self.kinds and self.needs_stats and not self.one_pass and self.method not in self.kinds:
            found.append(f"--kinds {','.join(self.kinds)} does not include {self.method}, which --method {self.method} needs")
        if self.tau is not None and not self.needs_stats:
            found.append(f"--tau is not used by --method {self.method}")
        if self.stats_model is not None and self.model is not None:
            found.append("--stats-model: with --model the statistics are taken at your model (theta0 = theta_full); drop it")
        elif self.stats_model is not None and self.stats_model not in (self.theta0, self.full, self.fgt):
            found.append(
                f"--stats-model {self.stats_model} must be one of --theta0, --full, --fgt (the merge checks the statistics "
                "against the bytes of the model they were computed at, which it reads anyway)"
            )
        if len(self.alphas) > 1 and "{alpha}" not in self.out and self.out.startswith("hf://"):
            found.append("several alphas pushed to the Hub need a {alpha} placeholder in --out")
        return found + self._overlapping_outputs()

    def _overlapping_outputs(self) -> list[str]:
        """Every output of the run (one per method and α, and the statistics it writes) against
        every other, before any work: the statistics are also an input of the merge."""
        from perta_stream.plan.one_pass_plan import one_pass_outputs
        from perta_stream.sinks.output_dir import overlapping_outputs

        if not self.out or not self.methods or not self.alphas:
            return []
        folders = [folder for _, _, folder in one_pass_outputs(self.out, self.methods, self.alphas)]
        if len(set(folders)) != len(folders):
            return [f"--out {self.out} gives two outputs the same folder; use {{method}} and {{alpha}} placeholders"]
        outputs = [("--out", folder) for folder in folders]
        if self.one_pass and self.save_stats:
            outputs.append(("--save-stats", self.save_stats))
        elif not self.one_pass and self.needs_stats:
            # The default statistics folder is named once the model's digest is known; it lies in the work folder.
            outputs.append(("--stats-dir", self.stats_dir) if self.stats_dir else ("--work-dir", str(self.work_folder_path)))
        return overlapping_outputs(outputs)

    def _one_pass_problems(self) -> list[str]:
        found: list[str] = []
        if not self.one_pass:
            for flag, given in (("--save-stats", self.save_stats), ("--config-only", self.config_only)):
                if given:
                    found.append(f"{flag} applies to --one-pass; add --one-pass or drop it")
            return found
        if self.config_only and not self.dry_run:
            found.append("--config-only plans from config.json alone; it needs --dry-run")
        if self.save_stats and self.save_stats.startswith("hf://"):
            found.append("--save-stats writes a local statistics directory; give a local folder")
        if self.out.startswith("hf://"):
            if self.resume:
                found.append(
                    "--resume with an hf:// --out: a one-pass push stages its shards in a temporary folder, which does not "
                    "outlive the run; rerun without --resume (bytes the Hub already holds are not uploaded again)"
                )
            if len(self.methods) > 1 and "{method}" not in self.out:
                found.append("several methods pushed to the Hub need a {method} placeholder in --out")
        if self.stats_dir or self.recompute_stats:
            found.append("--stats-dir and --recompute-stats belong to the two-pass way; with --one-pass, --save-stats DIR writes the statistics")
        if self.one_pass and not self.needs_stats and not self.save_stats:
            found.append(f"--method {self.method} needs no statistics; a plain unlearn (or merge) is already one pass over the models")
        return found

    @classmethod
    def from_mapping(cls, options: dict[str, Any], *, where: str) -> "UnlearnConfig":
        """Build from a mapping of option names (YAML keys, flags or the Python API's keywords) to values.

        Raises:
            UsageError: unknown keys, values of the wrong type, or invalid options; all reported at once.
        """
        try:
            return from_options(cls, options, title="invalid unlearn options")
        except PlanError as exc:
            raise UsageError(f"{where}: {exc}") from None

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "UnlearnConfig":
        """Build from options named as the flags (the Python API's keywords)."""
        return cls.from_mapping(options, where="options")

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> "UnlearnConfig":
        """Merge `--config` YAML (if any) with the flags given on the command line (flags win)."""
        where = "".join(f"--config {path} + " for path in getattr(args, "config", None) or ()) + "command line"
        return cls.from_mapping(options_from_cli(args, cls), where=where)

    def to_dict(self) -> dict[str, Any]:
        """The resolved options (saved into the run record)."""
        return {field.name: list(value) if isinstance(value := getattr(self, field.name), tuple) else value for field in fields(self)}


# The help of a shared option where unlearn means something else by it.
HELP_OVERRIDES = {
    "max_memory_bytes": "memory the merge may add to this process (default 512MiB, or $PERTA_MAX_MEMORY)",
}


def config_command(path: str | os.PathLike) -> str:
    """The first line an example config carries: the exact command that runs it."""
    return f"{CONFIG_COMMAND_PREFIX}{path}"


__all__ = ["UnlearnConfig", "config_command", "load_config_file", "format_alpha"]
