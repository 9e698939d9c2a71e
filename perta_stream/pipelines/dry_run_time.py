"""The wall-time line of a dry run: measure this machine (machine_speed.py), then estimate
(plan/wall_time.py) from the plan's FLOPs and bytes. Shared by the dry runs of stats, merge and
unlearn (and its θ_fgt fine-tuning)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

from perta_stream.machine_speed import MachineSpeed, measure_machine_speed
from perta_stream.plan.merge_plan import MergePlan
from perta_stream.plan.stats_plan import StatsPlan
from perta_stream.plan.wall_time import STATS_MATMUL_SHARE, TRAINING_MATMUL_SHARE, estimate_wall_time, training_flops


def measure(*, device: str, dtype_name: str, num_parameters: int, num_layers: int, read_paths: Iterable[str | os.PathLike] = (), write_to: str | None = None) -> MachineSpeed:
    """This machine's speeds, the matmul sized like the model's (its hidden size, from the
    parameter count of a dense decoder: about 12 h² per layer); no matmul for 0 parameters."""
    hidden = int(math.sqrt(num_parameters / (12 * max(1, num_layers)))) if num_parameters else None
    return measure_machine_speed(device=device, dtype_name=dtype_name, hidden_size=hidden, read_paths=list(read_paths), write_dir=existing_folder(write_to))


def stats_line(plan: StatsPlan, speed: MachineSpeed) -> str:
    estimate = estimate_wall_time(
        flops=plan.flops,
        matmul_share=STATS_MATMUL_SHARE,
        bytes_read=plan.bytes_read,
        bytes_written=plan.bytes_written,
        matmul_flops_per_s=speed.matmul_flops_per_s,
        read_bytes_per_s=speed.read_bytes_per_s,
        write_bytes_per_s=speed.write_bytes_per_s,
    )
    return f"  wall time:       {estimate.describe(speed.describe())}"


def merge_line(plan: MergePlan, speed: MachineSpeed) -> str:
    estimate = estimate_wall_time(
        flops=0.0,
        matmul_share=1.0,
        bytes_read=plan.bytes_to_read,
        bytes_written=plan.bytes_to_write,
        matmul_flops_per_s=speed.matmul_flops_per_s,
        read_bytes_per_s=speed.read_bytes_per_s,
        write_bytes_per_s=speed.write_bytes_per_s,
    )
    return f"  wall time: {estimate.describe(speed.describe())}"


def merge_wall_time(plan: MergePlan) -> str:
    """A merge's wall time at this machine's measured disk speeds (no compute probe: a merge is I/O)."""
    files = [path for c in plan.inputs.values() for path in checkpoint_files(c.location, [shard.file_name for shard in c.shards])]
    speed = measure(device="cpu", dtype_name="float32", num_parameters=0, num_layers=1, read_paths=files, write_to=plan.out_dirs[0])
    return merge_line(plan, speed)


def finetune_line(num_parameters: int, tokens_per_epoch: int, epochs: float, model_bytes: int, speed: MachineSpeed) -> str:
    estimate = estimate_wall_time(
        flops=training_flops(num_parameters, tokens_per_epoch, epochs),
        matmul_share=TRAINING_MATMUL_SHARE,
        bytes_read=model_bytes,
        bytes_written=model_bytes,
        matmul_flops_per_s=speed.matmul_flops_per_s,
        read_bytes_per_s=speed.read_bytes_per_s,
        write_bytes_per_s=speed.write_bytes_per_s,
    )
    return f"  wall time: {estimate.describe(speed.describe())} (training {epochs:g} epoch(s) of {tokens_per_epoch} tokens)"


def checkpoint_files(location: str, file_names: Iterable[str]) -> list[Path]:
    """The local files of a checkpoint (none for a Hub location: its speed is the download's)."""
    if location.startswith("hf://"):
        return []
    return [Path(location) / name for name in file_names]


def existing_folder(path: str | None) -> str | None:
    """The nearest existing folder at or above `path`'s parent (where a new output will go)."""
    if path is None or path.startswith("hf://"):
        return None
    folder = Path(path).absolute().parent
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    return str(folder)


def forget_model_wall_time(model: str, data_lengths: list[int], *, epochs: int, max_steps: int | None, batch_size: int, device: str, write_to: str) -> str:
    """θ_fgt's fine-tuning time (`unlearn --model --dry-run`): the model's parameters from its
    headers, the forget file's tokens estimated from its characters, training in float32."""
    from perta_stream.devices import resolve_device
    from perta_stream.sources.resolve import open_checkpoint

    checkpoint, source = open_checkpoint(model, "model")
    source.close()
    parameters = sum(info.numel for info in checkpoint.tensors.values())
    steps_per_epoch = max(1, math.ceil(len(data_lengths) / batch_size))
    passes = float(epochs) if max_steps is None else min(float(epochs), max_steps / steps_per_epoch)
    files = checkpoint_files(checkpoint.location, [shard.file_name for shard in checkpoint.shards])
    layers = int(checkpoint.config.get("num_hidden_layers") or 1)
    speed = measure(device=resolve_device(device), dtype_name="float32", num_parameters=parameters, num_layers=layers, read_paths=files, write_to=write_to)
    return finetune_line(parameters, sum(data_lengths), passes, checkpoint.total_bytes, speed)
