"""A dry run's wall time: the plan's FLOPs and bytes at this machine's measured speeds.

Pure: the speeds come from machine_speed.py. Each part is timed on its own and the parts are
added (reading, computing and writing overlap in the engines, so the sum leans long):

- compute: FLOPs / (measured matmul FLOP/s × the share of it the engine reaches). The shares are
  measured (docs/guides/your-model.md): SmolLM2-135M on this project's 2-core CPU, 1024² float32
  matmuls at 180-200 GFLOP/s; the statistics (3.03 TFLOP as the plan counts them) took about 21 s
  of compute, STATS_MATMUL_SHARE; θ_fgt's fine-tuning (6 FLOPs per parameter and token, the tokens
  estimated from characters) about 52 s for 1.89 TFLOP, TRAINING_MATMUL_SHARE (small batches,
  AdamW's per-parameter updates);
- read and write: bytes / the measured disk speeds (omitted where a speed was not measured, and said).
"""

from __future__ import annotations

from dataclasses import dataclass

from perta_stream.durations import format_duration

STATS_MATMUL_SHARE = 0.6
TRAINING_MATMUL_SHARE = 0.2
# Forward and backward of a dense decoder: about 6 FLOPs per parameter and token.
TRAINING_FLOPS_PER_PARAMETER_TOKEN = 6.0


@dataclass(frozen=True)
class WallTime:
    """Seconds per part of a run, and which speeds were not measured.

    Attributes:
        parts: name -> seconds (`compute`, `read`, `write`, ...).
        unmeasured: parts whose speed could not be measured (left out of the total).
    """

    parts: dict[str, float]
    unmeasured: tuple[str, ...] = ()

    @property
    def total_s(self) -> float:
        return sum(self.parts.values())

    def describe(self, speed_text: str) -> str:
        detail = ", ".join(f"{name} {format_duration(seconds)}" for name, seconds in self.parts.items())
        missing = f"; not counted: {', '.join(self.unmeasured)} (speed not measured)" if self.unmeasured else ""
        return f"about {format_duration(self.total_s)} ({detail}{missing}) at this machine's measured speed: {speed_text}"


def estimate_wall_time(
    *,
    flops: float,
    matmul_share: float,
    bytes_read: int,
    bytes_written: int,
    matmul_flops_per_s: float | None,
    read_bytes_per_s: float | None,
    write_bytes_per_s: float | None,
) -> WallTime:
    """The parts of a run's wall time (see the module's docstring)."""
    parts = {"compute": flops / (matmul_flops_per_s * matmul_share)} if flops and matmul_flops_per_s else {}
    unmeasured = ["compute"] if flops and not matmul_flops_per_s else []
    for name, count, rate in (("read", bytes_read, read_bytes_per_s), ("write", bytes_written, write_bytes_per_s)):
        if not count:
            continue
        if rate:
            parts[name] = count / rate
        else:
            unmeasured.append(name)
    return WallTime(parts, tuple(unmeasured))


def training_flops(num_parameters: int, tokens_per_epoch: int, epochs: float) -> float:
    """FLOPs of fine-tuning every parameter on `tokens_per_epoch` tokens `epochs` times."""
    return TRAINING_FLOPS_PER_PARAMETER_TOKEN * num_parameters * tokens_per_epoch * epochs
