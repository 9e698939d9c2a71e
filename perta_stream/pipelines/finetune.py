"""`run_finetune`: full fine-tuning of a small causal LM on question-answer pairs.

Recipe: read the data, load the model in float32 and tokenize every sample (an answer that does
not fit --max-length stops the run before training and before any output exists), train with the
answer-only loss, AdamW and a linear warmup/decay schedule, cast each tensor back to the dtype
the input checkpoint stored it in, and write a normal checkpoint (safetensors + tokenizer +
`perta_finetune.json`) into `<out>.partial/`, renamed to `<out>` at the end. A run cannot be
resumed, so the `.partial` folder of an interrupted run is discarded. It is how the demo makes
θ_full, θ_fgt and θ_ret from θ_0.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from perta_stream import __version__
from perta_stream.compute.prompts import LOSS_DEFINITION, encode_sample
from perta_stream.compute.training import (
    cast_to_dtypes,
    epoch_batches,
    make_optimizer,
    make_scheduler,
    steps_per_epoch,
    train_step,
)
from perta_stream.config.finetune import FinetuneConfig
from perta_stream.dtypes import torch_dtype
from perta_stream.eval.report import write_json_atomic
from perta_stream.progress import progress, progress_enabled
from perta_stream.sinks.output_dir import AtomicOutputDir
from perta_stream.sources.checkpoint import open_local_checkpoint
from perta_stream.sources.hf_model import load_model_and_tokenizer, transformers_progress_bars
from perta_stream.hashing import file_sha256
from perta_stream.sources.qa_dataset import load_qa_samples

if TYPE_CHECKING:
    import torch

__all__ = ["FinetuneConfig", "FinetuneResult", "run_finetune"]

RECORD_NAME = "perta_finetune.json"
RECORD_FORMAT = "perta_finetune"
# The time estimate is measured on the first steps: the first one pays one-time costs (allocator
# warm-up, lazy initialization), so it is left out of the rate when later steps exist.
ESTIMATE_STEPS = 3
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneResult:
    """What `run_finetune` returns.

    Attributes:
        out: the finished checkpoint directory.
        samples: training samples (question-answer pairs).
        steps: optimizer steps taken.
        step_losses: the batch loss of every step, before its update.
        epoch_losses: the mean step loss of every epoch (the last may be partial under max_steps).
        elapsed_s: wall time of the whole run.
        estimated_train_s: the training time estimated from the first steps.
    """

    out: Path
    samples: int
    steps: int
    step_losses: tuple[float, ...]
    epoch_losses: tuple[float, ...]
    elapsed_s: float
    estimated_train_s: float = 0.0

    def summary(self) -> str:
        return (
            f"fine-tuned on {self.samples} samples, {self.steps} steps in {self.elapsed_s:.1f} s; "
            f"loss per epoch {', '.join(f'{loss:.4f}' for loss in self.epoch_losses)}; wrote {self.out}"
        )


def run_finetune(config: FinetuneConfig, *, on_stage: Callable[[str], None] | None = None) -> FinetuneResult:
    """Fine-tune `config.model` on `config.data` and write the checkpoint to `config.out`.

    Args:
        on_stage: called with a line once the first steps are timed: how many steps, and how
            long training will take at that rate (the CLI prints it).

    Raises:
        DatasetError: the data file is malformed, or an answer needs more than --max-length tokens.
        CheckpointError: the model cannot be loaded.
        EvaluationError: the model and its tokenizer do not match.
        OutputExistsError / WriteError: the output cannot be written.
    """
    import torch

    started = time.perf_counter()
    samples = load_qa_samples(config.data, question_key=config.question_key, answer_key=config.answer_key)
    source = open_local_checkpoint(config.model, role="model")
    stored_dtypes = {name: torch_dtype(info.dtype) for name, info in source.tensors.items()}
    main_dtype = _most_common_float_dtype(stored_dtypes)

    torch.manual_seed(config.seed)
    loaded = load_model_and_tokenizer(config.model, device=config.device, for_training=True)
    encoded = [
        encode_sample(loaded.tokenizer, s.question, s.answer, max_length=config.max_length, system_prompt=config.system_prompt, where=f"{config.data}, record {s.index}")
        for s in samples
    ]
    model = loaded.model
    if config.lora_rank is not None:
        model = with_lora(model, config)
    model.train()
    optimizer = make_optimizer(model, lr=config.lr, weight_decay=config.weight_decay)
    per_epoch = steps_per_epoch(len(encoded), config.batch_size)
    total_steps = config.epochs * per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    warmup_steps = round(config.warmup_ratio * total_steps)
    scheduler = make_scheduler(optimizer, warmup_steps=warmup_steps, total_steps=total_steps)

    step_losses: list[float] = []
    epoch_losses: list[float] = []
    step_ends: list[float] = []
    estimated_train_s = 0.0
    training_started = time.perf_counter()
    with progress(total=total_steps, desc="fine-tuning", unit="step", unit_scale=False) as bar:
        for epoch in range(math.ceil(total_steps / per_epoch)):
            epoch_start = len(step_losses)
            for batch in epoch_batches(encoded, batch_size=config.batch_size, seed=config.seed, epoch=epoch, pad_token_id=loaded.pad_token_id):
                if len(step_losses) == total_steps:
                    break
                step_losses.append(train_step(model, batch, optimizer, scheduler, max_grad_norm=config.max_grad_norm))
                step_ends.append(time.perf_counter())
                bar.update(1)
                bar.set_postfix(loss=f"{step_losses[-1]:.4f}")
                if len(step_ends) == min(ESTIMATE_STEPS, total_steps):
                    estimated_train_s = estimate_training_s(training_started, step_ends, total_steps)
                    if on_stage is not None:
                        on_stage(describe_estimate(total_steps, len(encoded), config.batch_size, estimated_train_s, len(step_ends)))
            epoch_losses.append(sum(step_losses[epoch_start:]) / (len(step_losses) - epoch_start))
            logger.info("epoch %d: mean loss %.4f", epoch + 1, epoch_losses[-1])

    model.eval()
    del optimizer
    if config.lora_rank is None:
        cast_to_dtypes(model, stored_dtypes, main_dtype)
        model.config.dtype = main_dtype
    output = AtomicOutputDir(config.out, overwrite=config.overwrite)
    if output.partial.exists():
        logger.warning("discarding %s left by an interrupted fine-tuning run", output.partial)
        output.discard()
    partial = output.open()
    with transformers_progress_bars(progress_enabled()):
        # A PeftModel writes its adapter only (adapter_config.json, adapter_model.safetensors):
        # PeftModel.from_pretrained(θ_0, out) loads it, and merge/unlearn take it as --fgt.
        model.save_pretrained(partial)
    loaded.tokenizer.save_pretrained(partial)
    elapsed_s = time.perf_counter() - started
    write_json_atomic(
        partial / RECORD_NAME,
        {
            "format": RECORD_FORMAT,
            "tool_version": __version__,
            "config": config.to_dict(),
            "data_sha256": file_sha256(config.data),
            "loss": LOSS_DEFINITION,
            "samples": len(encoded),
            "steps": total_steps,
            "warmup_steps": warmup_steps,
            "epoch_losses": epoch_losses,
            "step_losses": step_losses,
            "elapsed_s": elapsed_s,
            "estimated_train_s": estimated_train_s,
            "train_s": step_ends[-1] - training_started,
        },
    )
    out = output.commit()
    return FinetuneResult(
        out=out,
        samples=len(encoded),
        steps=total_steps,
        step_losses=tuple(step_losses),
        epoch_losses=tuple(epoch_losses),
        elapsed_s=elapsed_s,
        estimated_train_s=estimated_train_s,
    )


def estimate_training_s(started: float, step_ends: list[float], total_steps: int) -> float:
    """The whole training's time from the first steps' end times: the steps after the first give
    the rate (the first pays one-time costs and is counted as it was)."""
    first_s = step_ends[0] - started
    if len(step_ends) == 1:
        return first_s * total_steps
    rate_s = (step_ends[-1] - step_ends[0]) / (len(step_ends) - 1)
    return first_s + rate_s * (total_steps - 1)


def describe_estimate(total_steps: int, samples: int, batch_size: int, estimated_s: float, measured_steps: int) -> str:
    from perta_stream.durations import format_duration

    return (
        f"fine-tuning: {total_steps} steps of {batch_size} samples ({samples} samples); about {format_duration(estimated_s)} "
        f"in all, measured on the first {measured_steps} step(s)"
    )


def with_lora(model, config: FinetuneConfig):  # noqa: ANN001, ANN201  (a transformers model in, a PeftModel out)
    """The model with a LoRA of `config` on its target modules (peft), the base weights frozen."""
    from peft import LoraConfig, get_peft_model

    targets = config.lora_targets[0] if config.lora_targets == ("all-linear",) else list(config.lora_targets)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else 2 * config.lora_rank,
        target_modules=targets,
        use_rslora=config.lora_rslora,
        lora_dropout=0.0,
    )
    return get_peft_model(model, lora)


def _most_common_float_dtype(dtypes: dict[str, "torch.dtype"]) -> "torch.dtype":
    """The dtype most floating tensors of the checkpoint have (what config.json's dtype should say)."""
    import torch

    floating = Counter(dtype for dtype in dtypes.values() if dtype.is_floating_point)
    return floating.most_common(1)[0][0] if floating else torch.float32
