"""The one progress-bar wrapper: tqdm on stderr, silenced by `-q` or PERTA_DISABLE_PROGRESS_BARS."""

from __future__ import annotations

import os
import sys
from typing import Any

_enabled_by_caller = True


def set_progress_enabled(enabled: bool) -> None:
    """Switch every later progress bar on or off (the CLI's `-q` calls this)."""
    global _enabled_by_caller
    _enabled_by_caller = enabled


def progress_enabled_by_caller() -> bool:
    """What `set_progress_enabled` last said (the environment variable aside)."""
    return _enabled_by_caller


def progress_enabled() -> bool:
    disabled_by_env = os.environ.get("PERTA_DISABLE_PROGRESS_BARS", "").strip().lower() in {"1", "true", "yes", "on"}
    return _enabled_by_caller and not disabled_by_env


def progress(*, total: float | None, desc: str, unit: str = "B", unit_scale: bool = True, **kwargs: Any):
    """A tqdm bar on stderr showing throughput (`unit`/s); disabled bars cost nothing."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit_scale,
        unit_divisor=1000,
        file=sys.stderr,
        disable=not progress_enabled(),
        dynamic_ncols=True,
        leave=True,
        **kwargs,
    )
