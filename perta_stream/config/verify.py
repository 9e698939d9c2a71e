"""`VerifyConfig`: the validated options of `perta-stream verify` (check a finished merge output)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from perta_stream.errors import PlanError, UsageError
from perta_stream.sizes import parse_size

# 8 MiB per read keeps verification fast (large sequential reads) and its memory flat; the
# buffer is allocated once and reused for every shard.
DEFAULT_CHUNK_BYTES = 8 * 2**20
_MIN_CHUNK_BYTES = 4096


@dataclass(frozen=True)
class VerifyConfig:
    """What `run_verify` checks.

    Attributes:
        out_dir: a finished merge output (a directory holding `perta_merge.json`).
        finite: also check that no floating-point value is NaN or infinite.
        chunk_bytes: bytes read per step (the only buffer verification allocates).
    """

    out_dir: str
    finite: bool = False
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise PlanError("invalid verify options", problems)

    def problems(self) -> list[str]:
        """Every problem with these options (empty when they are usable)."""
        found: list[str] = []
        if not self.out_dir:
            found.append("verify needs the output directory to check")
        elif self.out_dir.startswith("hf://"):
            found.append(f"{self.out_dir}: verify checks a local directory; download the repo first")
        if self.chunk_bytes < _MIN_CHUNK_BYTES:
            found.append(f"--chunk-size must be at least {_MIN_CHUNK_BYTES} bytes")
        elif self.chunk_bytes % 8:
            found.append("--chunk-size must be a multiple of 8 bytes (whole elements of every dtype)")
        return found

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> "VerifyConfig":
        """Build from parsed `perta-stream verify` arguments."""
        try:
            chunk_bytes = parse_size(args.chunk_size, what="--chunk-size") if args.chunk_size else DEFAULT_CHUNK_BYTES
            return cls(out_dir=args.dir, finite=args.finite, chunk_bytes=chunk_bytes)
        except PlanError as exc:
            raise UsageError(str(exc)) from None
