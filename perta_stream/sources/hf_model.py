"""Loading a whole causal LM and its tokenizer with transformers (evaluation and fine-tuning).

The streamed engines never load a whole model; evaluation and the small fine-tuning command do,
through `AutoModelForCausalLM` / `AutoTokenizer`, so anything transformers can run is supported.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perta_stream.devices import resolve_device
from perta_stream.errors import CheckpointError, CheckpointNotFoundError, EvaluationError, InputChangedError
from perta_stream.progress import progress_enabled

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready to run, its tokenizer, and where its inputs must go.

    Attributes:
        model: the `PreTrainedModel` (eval mode).
        tokenizer: the matching tokenizer, with a pad token id set (EOS when it has no pad token).
        input_device: the device of the embedding, where input tensors are placed.
        pad_token_id: the id used for padding (masked everywhere it is used).
        path: the folder it was loaded from.
        files: the identity of the folder's weight and config files before loading, which
            `check_unchanged` compares with what they are at the end of a run.
    """

    model: Any
    tokenizer: Any
    input_device: Any
    pad_token_id: int
    path: Path | None = None
    files: dict[str, tuple[int, int, int, int]] | None = None

    def check_unchanged(self, role: str = "model") -> None:
        """Refuse a result when the model's files changed while it was in use.

        transformers reads the folder by path, and offloaded layers (device_map on a GPU) are
        read again from it during the run: a folder replaced or rewritten meanwhile would mix
        two models into one result. One stat per file, no pass over the bytes.

        Raises:
            InputChangedError: naming the file; the caller writes nothing.
        """
        if self.path is None or self.files is None:
            return
        now = folder_files_identity(self.path)
        changed = sorted(name for name in set(self.files) | set(now) if self.files.get(name) != now.get(name))
        if changed:
            raise InputChangedError(
                f"{role} {self.path}: {changed[0]} was replaced or rewritten while this run used it; nothing was written: "
                "rerun once the model folder stays unchanged"
            )


def folder_files_identity(path: Path) -> dict[str, tuple[int, int, int, int]]:
    """(device, inode, size, modification time) of the weight and config files of a model folder."""
    found = {}
    for entry in sorted(path.iterdir()):
        if entry.name.endswith((".safetensors", ".json")) and entry.is_file():
            status = entry.stat()
            found[entry.name] = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
    return found


def load_model_and_tokenizer(model_dir: str | os.PathLike, *, device: str, for_training: bool = False) -> LoadedModel:
    """Load a checkpoint directory's model and tokenizer and check that they belong together.

    On CPU the weights are float32 (fast, exact kernels); for training they are float32 on any
    device (AdamW updates on bf16 weights lose most small steps). For inference on CUDA the
    checkpoint's own dtype is kept and `device_map="auto"` (accelerate) places the layers,
    offloading what does not fit.

    Args:
        model_dir: a directory with config.json, safetensors weights and tokenizer files.
        device: `auto`, `cpu` or `cuda`.
        for_training: load float32 on a single device (no offloading).

    Raises:
        CheckpointNotFoundError: the directory does not exist.
        CheckpointError: transformers cannot load the model or the tokenizer (its message is kept).
        EvaluationError: the tokenizer produces ids the model's embedding does not have.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from perta_stream.sources.input_location import is_hub_location

    if is_hub_location(model_dir):
        from perta_stream.sources.hub import download_model_folder

        path = download_model_folder(str(model_dir))
    else:
        path = Path(model_dir)
    if not path.is_dir():
        raise CheckpointNotFoundError(f"model directory {path} does not exist")
    resolved = resolve_device(device)
    files = folder_files_identity(path)
    try:
        # Never run Python files of a model folder (an `auto_map` in its configs): transformers
        # would otherwise ask on standard input, and a "y" there would execute them.
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for a missing or broken tokenizer
        raise CheckpointError(f"cannot load a tokenizer from {path}: {exc}; the folder needs the tokenizer files of the model") from exc
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if resolved == "cuda" and not for_training:
        kwargs = {"dtype": "auto", "device_map": "auto"}
    try:
        with transformers_progress_bars(progress_enabled()):
            model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, trust_remote_code=False, **kwargs)
    except Exception as exc:
        raise CheckpointError(f"cannot load a causal LM from {path}: {exc}") from exc
    if "device_map" not in kwargs:
        model.to(resolved)
    model.eval()
    check_tokenizer_fits(model, tokenizer, where=str(path))
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_token_id is None:
        raise EvaluationError(f"the tokenizer of {path} has neither a pad nor an EOS token; set one in its tokenizer_config.json")
    input_device = model.get_input_embeddings().weight.device
    logger.info("loaded %s on %s (%s)", path, input_device, next(model.parameters()).dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, input_device=input_device, pad_token_id=int(pad_token_id), path=path, files=files)


@contextlib.contextmanager
def transformers_progress_bars(enabled: bool) -> Iterator[None]:
    # transformers draws its own loading bars; `-q` / PERTA_DISABLE_PROGRESS_BARS silence them
    # too, and the previous setting is restored so a host application keeps its own choice.
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled and not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()


def check_tokenizer_fits(model: Any, tokenizer: Any, *, where: str) -> None:
    """Raise EvaluationError when the tokenizer has ids past the model's embedding table."""
    embedding_rows = int(model.get_input_embeddings().weight.shape[0])
    tokenizer_ids = len(tokenizer)
    if tokenizer_ids > embedding_rows:
        raise EvaluationError(
            f"the tokenizer in {where} has {tokenizer_ids} token ids but the model's embedding has only "
            f"{embedding_rows} rows: model and tokenizer do not match; use the tokenizer the model was trained with"
        )
