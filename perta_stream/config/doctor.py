"""`DoctorConfig`: the options of `perta-stream doctor` (what to check beyond the installation)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from perta_stream.config.options import from_options, numbers, option, options_from_cli


@dataclass(frozen=True)
class DoctorConfig:
    """What to check beyond the installation.

    Attributes:
        model: a checkpoint whose unlearn's disk needs are checked (None: only the free space).
        out: where outputs will go (its nearest existing folder is measured).
        alphas: the α values an unlearn would write (one output each).
    """

    model: str | None = option(None, help="a checkpoint (folder or Hub id): check the disk an unlearn of it needs")
    out: str = option(".", help="where outputs will go (default: the current folder)")
    alphas: tuple[float, ...] = option((1.0,), flags=("--alpha", "--alphas"), parse=numbers, help="the alphas an unlearn would write, one output each (default 1)")

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> "DoctorConfig":
        return cls.from_options(options_from_cli(args, cls))

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "DoctorConfig":
        return from_options(cls, options, title="invalid doctor options")
