"""Open a checkpoint given as a local directory or as `hf://org/name[@revision]`."""

from __future__ import annotations

import os

from perta_stream.sources.byte_source import ByteSource, LocalByteSource
from perta_stream.sources.checkpoint import Checkpoint, open_local_checkpoint

HUB_PREFIX = "hf://"


def is_hub_location(location: str | os.PathLike) -> bool:
    return str(location).startswith(HUB_PREFIX)


def open_checkpoint(location: str | os.PathLike, role: str, *, drop_page_cache: bool = False) -> tuple[Checkpoint, ByteSource]:
    """The header-level view of a checkpoint and a source for its bytes.

    Raises:
        CheckpointError and subclasses, PlanError: as `open_local_checkpoint` (or the Hub reader).
    """
    if is_hub_location(location):
        from perta_stream.sources.hub import open_hub_checkpoint

        return open_hub_checkpoint(str(location), role)
    checkpoint = open_local_checkpoint(location, role)
    return checkpoint, LocalByteSource(location, drop_page_cache=drop_page_cache)
