"""`DemoConfig`: the options of `perta-stream demo` (where to cache, what to rebuild, which split)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace

from perta_stream.demo.recipe import DemoRecipe
from perta_stream.errors import PlanError, UsageError

DEMO_SPLITS = ("forget01", "forget10")
DEFAULT_CACHE_DIR = ".perta_cache/demo"
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DemoConfig:
    """What `run_demo` does.

    Attributes:
        cache_dir: where built models, statistics and sweeps are kept, one folder per recipe key.
        rebuild: ignore (and replace) cached results of this recipe.
        device: where training, statistics and evaluation run (`cpu` keeps the demo reproducible).
        threads: torch intra-op threads on CPU. 1 by default: the demo's matrices are too small
            to gain much from more, and on cores shared with other work OpenMP threads that
            spin-wait made training 10x slower in our measurements (2 threads vs 1, load 5 on 2 cores).
        recipe: every number of the demo.
    """

    cache_dir: str = DEFAULT_CACHE_DIR
    rebuild: bool = False
    device: str = "cpu"
    threads: int = 1
    recipe: DemoRecipe = field(default_factory=DemoRecipe)

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise PlanError("invalid demo options", problems)

    def problems(self) -> list[str]:
        found: list[str] = []
        recipe = self.recipe
        if recipe.split not in DEMO_SPLITS:
            found.append(f"--split {recipe.split!r}: the bundled TOFU data has {', '.join(DEMO_SPLITS)}")
        if self.device not in DEVICES:
            found.append(f"--device {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.threads < 1:
            found.append(f"--threads must be at least 1, got {self.threads}")
        if recipe.retain_count < 1:
            found.append(f"--retain-count must be at least 1, got {recipe.retain_count}")
        for name in ("pretrain_epochs", "finetune_epochs", "batch_size", "max_length", "max_new_tokens", "eval_batch_size"):
            if getattr(recipe, name) < 1:
                found.append(f"{name} must be at least 1, got {getattr(recipe, name)}")
        if recipe.lora_rank is not None and recipe.lora_rank < 1:
            found.append(f"--lora must be a rank of at least 1, got {recipe.lora_rank}")
        if recipe.eval_max_items is not None and recipe.eval_max_items < 1:
            found.append(f"--max-items must be at least 1, got {recipe.eval_max_items}")
        if not recipe.alphas or any(alpha <= 0 for alpha in recipe.alphas):
            found.append("--alphas must be positive numbers")
        found += [f"model: {problem}" for problem in recipe.shape.problems()]
        return found

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> "DemoConfig":
        """Build from parsed `perta-stream demo` arguments (unset flags keep the recipe's defaults)."""
        recipe = DemoRecipe()
        changes = {
            name: value
            for name, value in (
                ("split", args.split),
                ("retain_count", args.retain_count),
                ("alphas", tuple(args.alphas) if args.alphas else None),
                ("eval_max_items", args.max_items),
                ("lora_rank", args.lora),
            )
            if value is not None
        }
        try:
            return cls(cache_dir=args.cache_dir, rebuild=args.rebuild, device=args.device, threads=args.threads, recipe=replace(recipe, **changes))
        except PlanError as exc:
            raise UsageError(str(exc)) from None
