"""Checkpoint inputs written as transformers takes them: a bare `org/name[@rev]` means the Hub."""

from __future__ import annotations

from typing import Any


def normalize_inputs(config: Any, *field_names: str) -> None:
    """Rewrite the named checkpoint-input fields of a frozen config with `normalize_location`
    (called from `__post_init__`, before validation)."""
    from perta_stream.sources.resolve import normalize_location

    for name in field_names:
        value = getattr(config, name)
        if value:
            object.__setattr__(config, name, normalize_location(value))
