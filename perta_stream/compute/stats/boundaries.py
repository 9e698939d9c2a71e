"""Layer-boundary tensors (hidden states, output gradients) kept in RAM up to a budget, then on disk.

The layer-major sweep keeps the input of every decoder layer for every batch until the backward
pass reaches that layer again: (layers + 1) × tokens × hidden values, far more than RAM for a
large model and many samples. Tensors are held in host memory while their total stays within the
budget; past it they are written as raw bytes (never pickled) into files in a spill directory the
store owns and deletes on `close()`. Reads of spilled tensors come back through the page cache.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

import torch

from perta_stream.errors import WriteError

logger = logging.getLogger(__name__)

SPILL_DIR_PREFIX = "perta-boundaries-"


@dataclass(frozen=True)
class _Spilled:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]


class BoundaryStore:
    """A key -> tensor store with a RAM budget and disk spill.

    Args:
        budget_bytes: host memory for tensors held in RAM; beyond it they go to disk.
        spill_parent: the folder in which the spill directory is created (e.g. the output's
            `.partial` folder, so the spill lands on the output's disk); None: the system temp dir.
    """

    def __init__(self, budget_bytes: int, *, spill_parent: str | os.PathLike | None = None):
        self.budget_bytes = budget_bytes
        self._spill_parent = spill_parent
        self._spill_dir: Path | None = None
        self._in_ram: dict[Hashable, torch.Tensor] = {}
        self._on_disk: dict[Hashable, _Spilled] = {}
        self.ram_bytes = 0
        self.disk_bytes = 0
        self.peak_ram_bytes = 0
        self.peak_disk_bytes = 0
        self.spilled_count = 0
        self._counter = 0

    def put(self, key: Hashable, tensor: torch.Tensor) -> None:
        """Store `tensor` in host memory (or on disk) under `key`, replacing any old one."""
        self.discard(key)
        host = tensor.detach().to("cpu").contiguous()
        nbytes = host.numel() * host.element_size()
        if self.ram_bytes + nbytes <= self.budget_bytes:
            # A CPU tensor is stored without a copy: the store takes it over, callers must not
            # modify it in place afterwards.
            self._in_ram[key] = host
            self.ram_bytes += nbytes
            self.peak_ram_bytes = max(self.peak_ram_bytes, self.ram_bytes)
            return
        path = self._spill_path()
        try:
            with open(path, "wb") as handle:
                handle.write(memoryview(host.view(torch.uint8).reshape(-1).numpy()))
        except OSError as exc:
            raise WriteError(
                f"spilling layer-boundary states to {path} failed ({exc.strerror or exc}); free disk space there "
                "or raise --boundary-budget"
            ) from exc
        self._on_disk[key] = _Spilled(path, host.dtype, tuple(host.shape))
        self.disk_bytes += nbytes
        self.peak_disk_bytes = max(self.peak_disk_bytes, self.disk_bytes)
        self.spilled_count += 1

    def get(self, key: Hashable, device: torch.device | str = "cpu") -> torch.Tensor:
        """The tensor stored under `key`, on `device` (it stays stored)."""
        if key in self._in_ram:
            return self._in_ram[key].to(device)
        spilled = self._on_disk[key]
        raw = torch.empty(os.path.getsize(spilled.path), dtype=torch.uint8)
        with open(spilled.path, "rb") as handle:
            handle.readinto(memoryview(raw.numpy()))
        return raw.view(spilled.dtype).reshape(spilled.shape).to(device)

    def spec(self, key: Hashable) -> tuple[torch.dtype, tuple[int, ...]]:
        """The dtype and shape of the tensor under `key`, without reading it back from disk."""
        if key in self._in_ram:
            stored = self._in_ram[key]
            return stored.dtype, tuple(stored.shape)
        spilled = self._on_disk[key]
        return spilled.dtype, spilled.shape

    def pop(self, key: Hashable, device: torch.device | str = "cpu") -> torch.Tensor:
        """Remove `key` and return its tensor on `device`."""
        tensor = self.get(key, device)
        self.discard(key)
        return tensor

    def discard(self, key: Hashable) -> None:
        """Remove `key` if present (its file, when spilled, is deleted)."""
        if key in self._in_ram:
            stored = self._in_ram.pop(key)
            self.ram_bytes -= stored.numel() * stored.element_size()
        elif key in self._on_disk:
            spilled = self._on_disk.pop(key)
            self.disk_bytes -= os.path.getsize(spilled.path)
            spilled.path.unlink(missing_ok=True)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._in_ram or key in self._on_disk

    def _spill_path(self) -> Path:
        if self._spill_dir is None:
            parent = Path(self._spill_parent) if self._spill_parent is not None else None
            if parent is not None:
                parent.mkdir(parents=True, exist_ok=True)
            self._spill_dir = Path(tempfile.mkdtemp(prefix=SPILL_DIR_PREFIX, dir=parent))
            logger.info("boundary budget of %d bytes reached; spilling to %s", self.budget_bytes, self._spill_dir)
        self._counter += 1
        return self._spill_dir / f"{self._counter:08d}.bin"

    @staticmethod
    def remove_leftovers(parent: str | os.PathLike) -> None:
        """Delete spill directories that a killed process left in `parent` (a resumed run's
        output folder); their contents are never reused."""
        for leftover in Path(parent).glob(f"{SPILL_DIR_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def close(self) -> None:
        """Forget everything and delete the spill directory."""
        self._in_ram.clear()
        self._on_disk.clear()
        self.ram_bytes = self.disk_bytes = 0
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None

    def __enter__(self) -> "BoundaryStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
