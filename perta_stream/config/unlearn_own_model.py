"""The options of `unlearn` for one's own model: θ_fgt made by fine-tuning, a work folder, and the
before/after evaluation on the forget and retain files.

`unlearn --model MINE --forget F --retain R --out CLEAN` takes θ_full = θ_0 = MINE (the model a
user has) and makes θ_fgt by fine-tuning MINE on F (`FinetuneConfig`, the `finetune` command's
pipeline), keeping it, the statistics and the evaluations in a work folder (default `perta_work/`
next to the output) where a later run with the same inputs finds and reuses them; `--lora R` makes
θ_fgt a LoRA adapter instead (`finetune --lora R`), for a model whose full fine-tune does not fit
where it trains. With `--eval` (on by default with `--model`) every output is evaluated beside the
model before unlearning on the user's files (`eval --forget --retain`, no retain model needed) and
the table is printed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perta_stream.config.eval import HOLDOUT_HELP
from perta_stream.config.options import integer, number, option

DEFAULT_WORK_DIR_NAME = "perta_work"
_OWN = "your model (--model): theta_fgt made by fine-tuning"
_EVAL = "the before/after evaluation (--eval)"


@dataclass(frozen=True, kw_only=True)
class OwnModelOptions:
    """θ_fgt made from the user's model, and where the run keeps what it makes.

    Attributes:
        model: the user's model; θ_full = θ_0 = model, θ_fgt = model fine-tuned on the forget file.
            None: θ_0, θ_full and θ_fgt are given.
        work_dir: where θ_fgt, the statistics and the evaluations are kept and found again; None
            means `perta_work/` in the folder that holds the output.
        epochs, lr, max_steps: θ_fgt's fine-tuning (as `finetune`'s flags).
        lora_rank, lora_alpha: θ_fgt as a rank-`lora_rank` LoRA adapter (`finetune --lora R
            --lora-alpha A`, PEFT's format), which the merge reads as `--fgt`; None: a full
            fine-tune (every weight, with AdamW: about 16 bytes per parameter in float32).
    """

    model: str | None = option(None, group=_OWN, help="your model: theta_full = theta0 = MODEL, theta_fgt is made by fine-tuning it on --forget")
    work_dir: str | None = option(
        None, group=_OWN, help="where theta_fgt, statistics and evaluations are kept and reused (default: perta_work/ next to --out)"
    )
    epochs: int = option(3, group=_OWN, help="theta_fgt: passes over the forget file (default 3)")
    lr: float | None = option(None, group=_OWN, parse=number, help="theta_fgt: peak AdamW learning rate (default 1e-5; 1e-4 with --lora)")
    max_steps: int | None = option(None, group=_OWN, parse=integer, help="theta_fgt: stop after this many optimizer steps (default: --epochs passes)")
    lora_rank: int | None = option(
        None, flags=("--lora",), group=_OWN, parse=integer, metavar="R",
        help="theta_fgt: train a rank-R LoRA adapter (peft) instead of every weight, for a model whose full fine-tune does not fit",
    )
    lora_alpha: float | None = option(None, group=_OWN, parse=number, help="theta_fgt: LoRA alpha (default 2 x rank)")

    def work_folder(self, out: str) -> Path:
        """The work folder of a run writing to `out` (its first output folder for several α)."""
        return Path(self.work_dir) if self.work_dir else Path(out).parent / DEFAULT_WORK_DIR_NAME

    def own_model_problems(self, given_models: dict[str, Any]) -> list[str]:
        found: list[str] = []
        if self.model is not None:
            clash = [flag for flag, value in given_models.items() if value]
            if clash:
                found.append(f"--model makes theta0, theta_full and theta_fgt from your model; drop {', '.join(clash)} (or drop --model)")
            if not self.model.startswith("hf://") and not Path(self.model).is_dir():
                found.append(f"--model {self.model} is not a directory; give your model's checkpoint folder (config.json, safetensors, tokenizer)")
        if self.epochs < 1:
            found.append(f"--epochs must be at least 1, got {self.epochs}")
        if not self.lr > 0:
            found.append(f"--lr must be positive, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 1:
            found.append(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.lora_rank is not None and self.model is None:
            found.append("--lora makes theta_fgt from --model as an adapter; without --model, give the adapter folder as --fgt")
        if self.lora_rank is not None and self.lora_rank < 1:
            found.append(f"--lora must be a rank of at least 1, got {self.lora_rank}")
        if self.lora_alpha is not None and self.lora_rank is None:
            found.append("--lora-alpha applies to a LoRA theta_fgt; add --lora R")
        return found


@dataclass(frozen=True, kw_only=True)
class AfterEvalOptions:
    """The evaluation of every output beside the model before unlearning (θ_full).

    Attributes:
        evaluate: evaluate on the forget and retain files; None: only with `model`.
        skip_eval: no evaluation even with `model`.
        holdout: a file of records the model never saw (membership AUC, PrivLeak).
        max_new_tokens, eval_batch_size, max_items, examples: as `eval`'s flags.
    """

    evaluate: bool | None = option(None, flags=("--eval",), group=_EVAL, help="evaluate before and after on --forget/--retain (default with --model)")
    skip_eval: bool = option(False, flags=("--no-eval",), group=_EVAL, help="no evaluation, also with --model")
    holdout: str | None = option(None, group=_EVAL, help=HOLDOUT_HELP)
    max_new_tokens: int = option(200, group=_EVAL, help="greedy generation length for ROUGE-L (default 200)")
    eval_batch_size: int = option(8, group=_EVAL, help="samples per evaluation forward pass")
    max_items: int | None = option(None, group=_EVAL, parse=integer, help="evaluate only the first N items of each set (quick runs)")
    examples: int = option(3, group=_EVAL, help="forget and retain questions whose answers are shown side by side (default 3)")

    def wants_eval(self, own_model: bool) -> bool:
        return not self.skip_eval and (self.evaluate if self.evaluate is not None else own_model)

    def after_eval_problems(self) -> list[str]:
        found: list[str] = []
        if self.skip_eval and self.evaluate:
            found.append("--eval and --no-eval contradict each other; give one")
        if self.holdout is not None and not Path(self.holdout).is_file():
            found.append(f"--holdout {self.holdout} does not exist; give a .jsonl/.json file of question-answer records the model never saw")
        for flag, value, least in (("--max-new-tokens", self.max_new_tokens, 1), ("--eval-batch-size", self.eval_batch_size, 1), ("--examples", self.examples, 0)):
            if value < least:
                found.append(f"{flag} must be at least {least}, got {value}")
        if self.max_items is not None and self.max_items < 1:
            found.append(f"--max-items must be at least 1, got {self.max_items}")
        return found
