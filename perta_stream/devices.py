"""Compute devices as users write them: `auto`, `cpu`, `cuda` or `cuda:N`."""

from __future__ import annotations

import re

from perta_stream.errors import UsageError

DEVICE_HELP = "auto (cuda when available), cpu, cuda or cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def device_problem(device: str) -> str | None:
    """A one-line problem for a config's report, or None when `device` is well-formed."""
    if _DEVICE.fullmatch(str(device)):
        return None
    return f"--device {device!r} is not a device; give {DEVICE_HELP}"


def resolve_device(device: str) -> str:
    """`auto` -> `cuda` when a GPU is visible, else `cpu`; `cuda:N` selects GPU N as the current
    device and is then used as `cuda` (so every later `cuda` tensor lands on it).

    Raises:
        UsageError: a GPU was asked for and none (or not that one) is visible.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            raise UsageError(f"--device {device} was asked for but {count} CUDA device(s) are visible; use --device cpu, auto or cuda:0..")
        if ":" in device:
            torch.cuda.set_device(index)
        return "cuda"
    return device
