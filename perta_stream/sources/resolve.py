"""Open a checkpoint given as a local directory, as `hf://org/name[@revision]`, or as a bare Hub id."""

from __future__ import annotations

import os
from typing import Any

from perta_stream.sources.byte_source import ByteSource, LocalByteSource
from perta_stream.sources.checkpoint import Checkpoint, pin_local_checkpoint
from perta_stream.sources.input_location import is_hub_location


def open_checkpoint(location: str | os.PathLike, role: str, *, drop_page_cache: bool = False) -> tuple[Checkpoint, ByteSource]:
    """The header-level view of a checkpoint and a source for its bytes.

    Raises:
        CheckpointError and subclasses, PlanError: as `pin_local_checkpoint` (or the Hub reader).
    """
    if is_hub_location(location):
        from perta_stream.sources.hub import open_hub_checkpoint

        return open_hub_checkpoint(str(location), role)
    # Every file the run reads is opened now, and read through that descriptor to the end.
    checkpoint, folder = pin_local_checkpoint(location, role)
    return checkpoint, LocalByteSource(folder, drop_page_cache=drop_page_cache)


def open_model_input(location: str | os.PathLike, role: str, *, drop_page_cache: bool = False) -> tuple[Any, ByteSource]:
    """A checkpoint, or a PEFT LoRA adapter (a folder with adapter_config.json), and its byte source.

    Raises:
        as `open_checkpoint` and `sources.adapter.open_adapter`.
    """
    from perta_stream.errors import CheckpointNotFoundError
    from perta_stream.sources.adapter import is_local_adapter, open_adapter

    if not is_hub_location(location):
        if is_local_adapter(location):
            return open_adapter(str(location), role)
        return open_checkpoint(location, role, drop_page_cache=drop_page_cache)
    try:
        return open_checkpoint(location, role)
    except CheckpointNotFoundError:
        # A repo without model weights may be an adapter (one more listing, only then).
        try:
            return open_adapter(str(location), role)
        except CheckpointNotFoundError:
            pass
        raise
