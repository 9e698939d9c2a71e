"""θ_fgt from the user's model: a fine-tune on the forget file, kept in the work folder and reused.

`unlearn --model MINE` needs θ_fgt = MINE fine-tuned on the forget set. `forget_model_config`
says how (a `FinetuneConfig`: the `finetune` command's pipeline makes it), `make_forget_model`
makes it or finds it made: its folder is named by what it depends on (MINE's content digest, the
forget file's sha256 and every training option), and a finished folder whose record says the same
is reused. With `--lora R` the config trains a LoRA adapter (`fgt-lora-...`, PEFT's format), which
the merge and the one pass read as `--fgt`; a full θ_fgt's folder name is what it was before LoRA
existed, so work folders of earlier runs stay valid. Before a full fine-tune, `memory_advice`
says when it would not fit where it trains (`plan/finetune_memory.py`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from perta_stream.config.finetune import FinetuneConfig
from perta_stream.config.unlearn import UnlearnConfig
from perta_stream.hashing import file_sha256
from perta_stream.sinks.work_folder import WorkFolder

__all__ = ["ForgetModel", "dry_run_notes", "forget_model_config", "make_forget_model", "memory_advice", "trained_from"]

logger = logging.getLogger(__name__)
RECORD_NAME = "perta_finetune.json"
# Options that say where or how fast, not what is trained: left out of the folder's name.
_NOT_IDENTITY = ("model", "data", "out", "overwrite", "device")
# The LoRA options name a LoRA θ_fgt's folder only: a full one's name stays what it always was.
_LORA_IDENTITY = ("lora_rank", "lora_alpha")


@dataclass(frozen=True)
class ForgetModel:
    """θ_fgt as the run got it.

    Attributes:
        path: the checkpoint folder.
        reused: found finished from an earlier run with the same inputs.
        elapsed_s: the fine-tuning's wall time (0 when reused).
        steps: optimizer steps of its training.
    """

    path: str
    reused: bool
    elapsed_s: float
    steps: int


def forget_model_config(config: UnlearnConfig, work: WorkFolder, model_content_sha256: str) -> FinetuneConfig:
    """How θ_fgt is made for `config` (`--model`): the model fine-tuned on the forget file with
    `--epochs --lr --max-steps` (and `--lora --lora-alpha`) and the statistics' encoding options,
    into the work folder under a name of its inputs: `fgt-...` for a full fine-tune, `fgt-lora-...`
    for an adapter, the LoRA options in its key."""
    assert config.model is not None and config.forget is not None
    options = dict(
        model=config.model,
        data=config.forget,
        epochs=config.epochs,
        lr=config.lr,
        max_steps=config.max_steps,
        max_length=config.max_length,
        seed=config.seed,
        question_key=config.question_key,
        answer_key=config.answer_key,
        system_prompt=config.system_prompt,
        device=config.device,
        lora_rank=config.lora_rank,
        lora_alpha=config.lora_alpha,
    )
    lora = config.lora_rank is not None
    identity = {key: value for key, value in options.items() if key not in _NOT_IDENTITY and (lora or key not in _LORA_IDENTITY)}
    identity.update(model_content_sha256=model_content_sha256, data_sha256=file_sha256(config.forget))
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    # overwrite: a folder of this name holds only an earlier θ_fgt of this run's (its record decides reuse).
    return FinetuneConfig(**options, out=str(work.named("fgt-lora" if lora else "fgt", model_content_sha256, key)), overwrite=True)


def trained_from(model: str, lora_rank: int | None) -> str:
    """What is fine-tuned, as the plan says it: the model, or a LoRA adapter of it."""
    return model if lora_rank is None else f"a rank-{lora_rank} LoRA adapter of {model}"


def memory_advice(model: str, device: str) -> str | None:
    """One line when a full fine-tune of `model` (weights, gradients and AdamW state in float32)
    needs more memory than `device` has, saying to add `--lora R`; None when it fits.

    Raises:
        CheckpointError: the model's headers cannot be read. UsageError: `device` is not there.
    """
    from perta_stream.devices import resolve_device
    from perta_stream.memory import training_memory_bytes
    from perta_stream.plan.finetune_memory import lora_advice
    from perta_stream.sources.resolve import open_checkpoint

    checkpoint, source = open_checkpoint(model, "model")
    source.close()
    memory_bytes, where = training_memory_bytes(resolve_device(device))
    return lora_advice({name: info.shape for name, info in checkpoint.tensors.items()}, memory_bytes, where)


def dry_run_notes(config: UnlearnConfig, *, made: bool) -> list[str]:
    """What a dry run says about θ_fgt besides where it comes from: a full fine-tune still to be made
    that would not fit (`memory_advice`); for a LoRA, how the run reads the model with the adapter
    (θ_full = θ_0 = the model) and, until the adapter exists (`made` False), that the plans after
    this take the model itself as θ_fgt."""
    assert config.model is not None
    if config.lora_rank is None:
        advice = None if made else memory_advice(config.model, config.device)
        return [advice] if advice else []
    reads = (
        "the one pass reads it once for the forward and once for the backward, whose loaded weights the merge takes"
        if config.one_pass
        else "the statistics, when computed, read it twice (forward, backward) and the merge once more"
    )
    stand_in = "" if made else f"the plans below take {config.model} itself as theta_fgt until the adapter exists; with it, "
    return [f"theta_fgt: {stand_in}theta_full = theta0 = {config.model}: {reads}, plus the adapter's factors"]


def make_forget_model(finetune: FinetuneConfig, *, on_stage: Callable[[str], None] | None = None, dry_run: bool = False) -> tuple[ForgetModel, str | None]:
    """θ_fgt: reused when `finetune.out` holds a finished fine-tune of the same options and data,
    else trained (the time estimate goes to `on_stage`).

    Returns:
        (the model, a dry run's line saying what would happen; None otherwise).

    Raises:
        DatasetError, CheckpointError, WriteError: from the fine-tuning.
    """
    from perta_stream.pipelines.finetune import run_finetune

    say = on_stage or (lambda line: None)
    if _finished_with(finetune):
        say(f"[unlearn] theta_fgt: reusing {finetune.out} (the same model, forget file and training options)")
        record = json.loads((Path(finetune.out) / RECORD_NAME).read_text(encoding="utf-8"))
        return ForgetModel(finetune.out, True, 0.0, int(record.get("steps", 0))), (f"theta_fgt: reuse {finetune.out}" if dry_run else None)
    trained = trained_from(finetune.model, finetune.lora_rank)
    if dry_run:
        return ForgetModel(finetune.out, False, 0.0, 0), f"theta_fgt: fine-tune {trained} on {finetune.data} into {finetune.out}"
    advice = memory_advice(finetune.model, finetune.device) if finetune.lora_rank is None else None
    if advice is not None:
        say(f"[unlearn] {advice}")
    say(f"[unlearn] theta_fgt: fine-tuning {trained} on {finetune.data} into {finetune.out}")
    result = run_finetune(finetune, on_stage=say)
    say(f"[unlearn] theta_fgt: {result.summary()}")
    return ForgetModel(str(result.out), False, result.elapsed_s, result.steps), None


def _finished_with(finetune: FinetuneConfig) -> bool:
    """A finished θ_fgt in `finetune.out` whose record has these options and this data."""
    try:
        record = json.loads((Path(finetune.out) / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    wanted = {key: value for key, value in finetune.to_dict().items() if key not in _NOT_IDENTITY}
    recorded = {key: value for key, value in record.get("config", {}).items() if key not in _NOT_IDENTITY}
    return recorded == wanted and record.get("data_sha256") == file_sha256(finetune.data)
