"""Durations as people read them: `45 s`, `6.2 min`, `3.4 h` (estimates and summaries)."""

from __future__ import annotations


def format_duration(seconds: float) -> str:
    """Seconds below two minutes, minutes below two hours, hours above."""
    if seconds < 120:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
