"""`FinetuneConfig`: the validated options of `perta-stream finetune` (small full fine-tuning)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perta_stream.config.locations import normalize_inputs, with_typos
from perta_stream.config.options import from_options, integer, number, option, options_from_cli, words
from perta_stream.devices import DEVICE_HELP, device_problem
from perta_stream.errors import PlanError


# A LoRA's few weights start at zero and move only through a low-rank product: it wants about ten
# times the learning rate of a full fine-tune to move as far (PEFT's and QLoRA's recipes use 1e-4 to 2e-4).
FULL_FINETUNE_LR = 1e-5
LORA_FINETUNE_LR = 1e-4


def default_lr(lora_rank: int | None) -> float:
    """The peak learning rate when none is given: a full fine-tune's, or a LoRA's."""
    return FULL_FINETUNE_LR if lora_rank is None else LORA_FINETUNE_LR


@dataclass(frozen=True)
class FinetuneConfig:
    """Full fine-tuning of a causal LM on (question, answer) pairs with the answer-only loss.

    Attributes:
        model: the checkpoint directory to start from (model and tokenizer files).
        data: a `.jsonl` / `.json` file of records with a question and an answer field.
        out: the checkpoint directory to write (written as `<out>.partial/`, renamed at the end).
        epochs: passes over the data.
        lr: the peak AdamW learning rate.
        batch_size: samples per optimizer step.
        max_length: tokens per sample; the prompt's start is cut first, answers never.
        seed: seeds the data order and torch (the run is deterministic on CPU).
        weight_decay: AdamW decoupled weight decay (not applied to biases and norm weights).
        warmup_ratio: share of the steps over which the learning rate rises linearly from 0;
            it then decays linearly to 0 at the last step.
        question_key / answer_key: the field names of a record.
        overwrite: replace an existing `out`.
        device: `auto` (CUDA when available), `cpu` or `cuda`.
        system_prompt: an optional system prompt for chat-template models.
        max_grad_norm: gradient clipping by global norm; 0 switches it off.
        lora_rank: train a LoRA adapter of this rank (through peft) instead of every weight, and
            write it in PEFT's format (adapter_config.json + adapter_model.safetensors); None:
            full fine-tuning.
        lora_alpha: the LoRA scale's numerator (s = alpha/r, alpha/√r with rsLoRA); None: 2·rank.
        lora_targets: the modules that get a LoRA (peft's target_modules); default every linear
            module of the decoder layers (peft's "all-linear").
        lora_rslora: rank-stabilised scaling alpha/√r.
        max_steps: stop after this many optimizer steps (the schedule spans them); None trains
            `epochs` full passes.
    """

    model: str = option(help="checkpoint directory to start from (model and tokenizer)")
    data: str = option(help=".jsonl or .json file of question-answer records")
    out: str = option(help="output checkpoint directory")
    epochs: int = option(3, help="passes over the data (default 3)")
    lr: float | None = option(None, parse=number, help="peak AdamW learning rate (default 1e-5; 1e-4 with --lora)")
    batch_size: int = option(4, help="samples per optimizer step (default 4)")
    max_length: int = option(512, help="tokens per sample; prompts are cut first (default 512)")
    seed: int = option(0, help="data order and initialization seed (default 0)")
    weight_decay: float = option(0.01, help="AdamW weight decay on matrices (default 0.01)")
    warmup_ratio: float = option(0.1, help="share of steps of linear warmup (default 0.1)")
    question_key: str = option("question", help="record field holding the question")
    answer_key: str = option("answer", help="record field holding the answer")
    overwrite: bool = option(False, help="replace an existing --out")
    device: str = option("auto", help=f"{DEVICE_HELP} (default auto)")
    system_prompt: str | None = option(None, help="system prompt for models with a chat template")
    max_grad_norm: float = option(1.0, help="gradient clipping by global norm, 0 = off (default 1)")
    lora_rank: int | None = option(None, flags=("--lora",), parse=integer, metavar="R", help="train a rank-R LoRA adapter (peft) instead of every weight; writes PEFT's adapter format")
    lora_alpha: float | None = option(None, parse=number, help="LoRA alpha (default 2 x rank)")
    lora_targets: tuple[str, ...] = option(("all-linear",), parse=words, help="modules that get a LoRA, e.g. q_proj,v_proj (default all-linear)")
    lora_rslora: bool = option(False, help="rank-stabilised LoRA scaling alpha/sqrt(r)")
    max_steps: int | None = option(None, parse=integer, help="stop after this many optimizer steps (default: --epochs full passes)")

    def __post_init__(self) -> None:
        if self.lr is None:
            object.__setattr__(self, "lr", default_lr(self.lora_rank))
        problems = with_typos(normalize_inputs(self, "model"), self.problems())
        if problems:
            raise PlanError("invalid finetune options", problems)

    def problems(self) -> list[str]:
        """Every problem with these options (empty when they are usable)."""
        from perta_stream.sinks.output_dir import check_output_location

        problems: list[str] = []
        if not self.model.startswith("hf://") and not Path(self.model).is_dir():
            problems.append(f"--model {self.model} is not a directory; give a checkpoint folder with config.json and tokenizer files")
        if not Path(self.data).is_file():
            problems.append(f"--data {self.data} does not exist; give a .jsonl or .json file of question/answer records")
        problems += check_output_location(
            self.out, overwrite=self.overwrite, inputs={"model": self.model, "data": self.data}, record=("perta_finetune.json", "perta_finetune")
        )
        if self.epochs < 1:
            problems.append(f"--epochs must be at least 1, got {self.epochs}")
        if not self.lr > 0:
            problems.append(f"--lr must be positive, got {self.lr}")
        for flag, value in (("--batch-size", self.batch_size), ("--max-length", self.max_length)):
            if value < 1:
                problems.append(f"{flag} must be at least 1, got {value}")
        if self.weight_decay < 0:
            problems.append(f"--weight-decay must be non-negative, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.max_grad_norm < 0:
            problems.append(f"--max-grad-norm must be non-negative (0 = off), got {self.max_grad_norm}")
        if not self.question_key or not self.answer_key:
            problems.append("--question-key and --answer-key must not be empty")
        if self.lora_rank is not None and self.lora_rank < 1:
            problems.append(f"--lora must be a rank of at least 1, got {self.lora_rank}")
        if self.lora_rank is None and (self.lora_alpha is not None or self.lora_rslora or self.lora_targets != ("all-linear",)):
            problems.append("--lora-alpha, --lora-targets and --lora-rslora apply to a LoRA fine-tune; add --lora R")
        if device_problem(self.device):
            problems.append(str(device_problem(self.device)))
        return problems

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> "FinetuneConfig":
        """Build from parsed `perta-stream finetune` arguments (and its --config file)."""
        return cls.from_options(options_from_cli(args, cls))

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "FinetuneConfig":
        """Build from options named as the flags (YAML keys, API keywords); every problem at once."""
        return from_options(cls, options, title="invalid finetune options")

    def to_dict(self) -> dict:
        """The resolved options, as saved into the output's `perta_finetune.json`."""
        return {
            "model": self.model,
            "data": self.data,
            "out": self.out,
            "epochs": self.epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "seed": self.seed,
            "weight_decay": self.weight_decay,
            "warmup_ratio": self.warmup_ratio,
            "question_key": self.question_key,
            "answer_key": self.answer_key,
            "device": self.device,
            "system_prompt": self.system_prompt,
            "max_grad_norm": self.max_grad_norm,
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "lora_targets": list(self.lora_targets),
            "lora_rslora": self.lora_rslora,
            "max_steps": self.max_steps,
        }
