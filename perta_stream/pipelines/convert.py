"""`run_convert`: turn a pickle checkpoint (.bin/.pt) into safetensors, only when the user opts in.

Unpickling can execute code, so every other command refuses pickle checkpoints. This one reads
them with `torch.load(weights_only=True, mmap=True)` (torch's restricted unpickler, tensors memory
mapped, one shard at a time) and writes each shard's tensors with the project's shard writer, then
copies the side files, all inside `<out>.partial/` until the final rename.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from perta_stream import __version__
from perta_stream.dtypes import safetensors_dtype
from perta_stream.errors import CheckpointError, CheckpointNotFoundError, UsageError
from perta_stream.sinks.model_output import SAFETENSORS_METADATA
from perta_stream.sinks.output_dir import AtomicOutputDir, check_output_location
from perta_stream.sinks.report import write_json_atomic
from perta_stream.sinks.run_record import index_json
from perta_stream.sinks.shard_writer import ShardWriter, TensorSpec
from perta_stream.sources.checkpoint import PICKLE_SUFFIXES, is_side_file, outside_links

PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
RECORD_NAME = "perta_convert.json"
RECORD_FORMAT = "perta_convert"


@dataclass(frozen=True)
class ConvertConfig:
    """Convert the pickle checkpoint in `model` to safetensors in `out` (requires `allow_pickle`)."""

    model: str
    out: str
    allow_pickle: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.allow_pickle:
            raise UsageError(
                "converting unpickles the checkpoint, which can run code it contains; "
                "pass --allow-pickle if you trust its source"
            )


def _pickle_shards(root: Path) -> list[str]:
    index = root / PICKLE_INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        names = list(dict.fromkeys(weight_map.values()))
    else:
        names = sorted(p.name for p in root.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
    for name in names:
        if Path(name).name != name or not (root / name).is_file():
            raise CheckpointNotFoundError(f"{root}: pickle shard {name!r} is missing or outside the directory")
    if not names:
        raise CheckpointNotFoundError(f"{root} holds no .bin/.pt weights to convert")
    return names


def run_convert(config: ConvertConfig) -> str:
    """Write a safetensors copy of a pickle checkpoint; return the output directory.

    Raises:
        CheckpointError: the directory holds no pickle weights, or a file is not a state dict.
        PlanError-like problems with the output are raised as OutputExistsError.
    """
    import torch

    root = Path(config.model)
    problems = check_output_location(config.out, overwrite=config.overwrite, inputs={"model": config.model}, record=(RECORD_NAME, RECORD_FORMAT))
    if root.is_dir():
        side_files = sorted(p.name for p in root.iterdir() if p.is_file() and is_side_file(p.name) and p.name != PICKLE_INDEX_NAME)
        for name, target in sorted(outside_links(root, side_files).items()):
            problems.append(f"{root}/{name} is a symbolic link to {target}, outside the checkpoint; replace it by the file itself or remove it")
    if problems:
        raise UsageError("; ".join(problems))
    shard_names = _pickle_shards(root)
    output = AtomicOutputDir(config.out, overwrite=config.overwrite)
    partial = output.open()
    weight_map: dict[str, str] = {}
    total_size = 0
    count = len(shard_names)
    for number, name in enumerate(shard_names, start=1):
        state = torch.load(root / name, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{root / name} is not a state dict of tensors; it cannot be converted")
        file_name = "model.safetensors" if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
        tensors = {tensor_name: tensor.contiguous() for tensor_name, tensor in state.items()}
        specs = [TensorSpec(n, safetensors_dtype(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
        writer = ShardWriter(partial / file_name, specs, SAFETENSORS_METADATA)
        for tensor_name, tensor in tensors.items():
            writer.write(tensor.view(-1).view(torch.uint8).numpy().data if tensor.numel() else b"")
            weight_map[tensor_name] = file_name
        total_size += sum(spec.nbytes for spec in specs)
        writer.finish()
    if count > 1:
        (partial / "model.safetensors.index.json").write_bytes(index_json(weight_map, total_size))
    for side in side_files:
        shutil.copyfile(root / side, partial / side)
    write_json_atomic(partial / RECORD_NAME, {"format": RECORD_FORMAT, "tool_version": __version__, "source": str(config.model), "shards": shard_names})
    return str(output.commit())
