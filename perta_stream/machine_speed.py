"""How fast this machine is, measured in about a second, for the wall-time estimate of a dry run.

Three probes, each cheap and bounded: the matrix-multiply speed of the compute device in the
compute dtype (square products of the model's hidden size, repeated for a fixed time), the read
speed of the model's files (up to 256 MiB of its largest shard, read as the run will read it:
whatever the page cache holds is fast for the run too) and the write speed of the output's disk
(a 64 MiB file written, fsynced and removed in the folder the output goes to). plan/wall_time.py
turns them and the plan's FLOPs and bytes into hours.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

READ_SAMPLE_BYTES = 256 * 2**20
WRITE_SAMPLE_BYTES = 64 * 2**20
MATMUL_SECONDS = 0.4
_BLOCK_BYTES = 8 * 2**20


@dataclass(frozen=True)
class MachineSpeed:
    """Measured speeds (None where not measured: no local file to read, no folder to write).

    Attributes:
        device: where the matmuls ran (`cpu`, `cuda`).
        matmul_flops_per_s: dense matrix-multiply throughput in the compute dtype (None: a run
            without compute, a merge, did not measure it).
        read_bytes_per_s, write_bytes_per_s: file throughput of the inputs' and the output's disks.
        probe_s: how long measuring took.
    """

    device: str
    matmul_flops_per_s: float | None
    read_bytes_per_s: float | None
    write_bytes_per_s: float | None
    probe_s: float

    def describe(self) -> str:
        parts = [f"{self.device} matmul {self.matmul_flops_per_s / 1e9:.1f} GFLOP/s"] if self.matmul_flops_per_s else []
        if self.read_bytes_per_s is not None:
            parts.append(f"read {self.read_bytes_per_s / 1e9:.2f} GB/s")
        if self.write_bytes_per_s is not None:
            parts.append(f"write {self.write_bytes_per_s / 1e9:.2f} GB/s")
        return ", ".join(parts) + f" (measured in {self.probe_s:.1f} s)"


def measure_machine_speed(
    *, device: str, dtype_name: str, hidden_size: int | None, read_paths: Sequence[str | os.PathLike] = (), write_dir: str | os.PathLike | None = None
) -> MachineSpeed:
    """Measure the three speeds (a probe that cannot run is None, never a guess); no matmuls
    without a `hidden_size`."""
    started = time.perf_counter()
    flops = matmul_flops_per_s(device, dtype_name, hidden_size) if hidden_size else None
    read = read_bytes_per_s(read_paths)
    write = write_bytes_per_s(write_dir) if write_dir is not None else None
    return MachineSpeed(device, flops, read, write, time.perf_counter() - started)


def matmul_flops_per_s(device: str, dtype_name: str, hidden_size: int) -> float:
    """FLOP/s of [n, n] @ [n, n] products for MATMUL_SECONDS: n = 1024 on a CPU (a small model's
    [tokens, hidden] @ [hidden, 4 hidden] products run near that rate, and a 4096 product alone
    takes seconds) and the hidden size, 1024 to 4096, on a GPU (which needs large products)."""
    import torch

    size = 1024 if device == "cpu" else min(4096, max(1024, hidden_size))
    dtype = getattr(torch, dtype_name)
    left = torch.randn(size, size, device=device).to(dtype)
    right = torch.randn(size, size, device=device).to(dtype)
    (left @ right).sum().item()  # warm-up: kernels chosen, memory allocated
    count = 0
    started = time.perf_counter()
    while True:
        product = left @ right
        count += 1
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        if elapsed >= MATMUL_SECONDS:
            del product
            return 2.0 * size**3 * count / elapsed


def read_bytes_per_s(paths: Sequence[str | os.PathLike]) -> float | None:
    """Bytes/s reading up to READ_SAMPLE_BYTES of the largest existing file of `paths`."""
    files = [Path(path) for path in paths if Path(path).is_file()]
    if not files:
        return None
    largest = max(files, key=lambda path: path.stat().st_size)
    buffer = bytearray(_BLOCK_BYTES)
    total = 0
    started = time.perf_counter()
    with open(largest, "rb", buffering=0) as handle:
        while total < READ_SAMPLE_BYTES:
            count = handle.readinto(buffer)
            if not count:
                break
            total += count
    elapsed = time.perf_counter() - started
    return total / elapsed if total and elapsed > 0 else None


def write_bytes_per_s(folder: str | os.PathLike) -> float | None:
    """Bytes/s writing and fsyncing WRITE_SAMPLE_BYTES in `folder` (the file is removed)."""
    target = Path(folder)
    if not target.is_dir():
        return None
    probe = target / f".perta_speed_probe.{os.getpid()}.tmp"
    block = os.urandom(_BLOCK_BYTES)
    try:
        started = time.perf_counter()
        with open(probe, "wb", buffering=0) as handle:
            for _ in range(WRITE_SAMPLE_BYTES // _BLOCK_BYTES):
                handle.write(block)
            os.fsync(handle.fileno())
        elapsed = time.perf_counter() - started
    except OSError:
        return None  # a read-only folder or a full disk: the plan's own checks say so
    finally:
        probe.unlink(missing_ok=True)
    return WRITE_SAMPLE_BYTES / elapsed if elapsed > 0 else None
