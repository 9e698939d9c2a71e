"""What an input location names: a local folder, `hf://org/name[@revision]`, or a bare Hub id
(as transformers reads one); the lines that announce and summarise the Hub inputs a run read."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from perta_stream.sources.hub_http import HUB_PREFIX

if TYPE_CHECKING:
    from perta_stream.sources.checkpoint import Checkpoint

# `org/name` or `org/name@revision`, as transformers' from_pretrained takes a Hub id.
_BARE_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?")


def is_hub_location(location: str | os.PathLike) -> bool:
    return str(location).startswith(HUB_PREFIX)


def normalize_location(location: str | os.PathLike) -> str:
    """A checkpoint *input* as the tool reads it.

    `hf://...` and paths that exist stay as they are; a bare `org/name[@revision]` that is not a
    local path means that Hub repo, as in transformers. Outputs are never normalized: a new local
    folder `results/merged` must not become a push to the Hub.
    """
    text = os.fspath(location)
    if is_hub_location(text) or os.path.lexists(text) or not _BARE_HUB_ID.fullmatch(text):
        return text
    return HUB_PREFIX + text


def mistyped_folder(location: str | os.PathLike) -> str | None:
    """The local folder a bare Hub id starts with, when `location` would be read from the Hub
    although its first component is a folder here (`results/base` while `results/` exists): a
    mistyped path is likelier than a Hub repo of that name. None otherwise (no network is asked)."""
    text = os.fspath(location)
    if is_hub_location(text) or os.path.lexists(text) or not _BARE_HUB_ID.fullmatch(text):
        return None
    first = text.split("/", 1)[0]
    return first if os.path.isdir(first) else None


def hub_input_notice(role: str, location: str, pinned: str) -> str:
    """The line that announces a Hub input before any work: what was asked, and the commit read."""
    asked = location[len(HUB_PREFIX) :] if is_hub_location(location) else location
    repo = pinned[len(HUB_PREFIX) :]
    where = "" if os.path.lexists(asked) else f"{asked} is not a local folder; "
    return f"{role}: {where}reading Hub repo {repo}"


def hub_inputs(checkpoints: Mapping[str, Checkpoint]) -> tuple[str, ...]:
    """`role hf://org/name@commit` of every Hub checkpoint among `checkpoints` (for summaries)."""
    return tuple(f"{role} {checkpoint.location}" for role, checkpoint in checkpoints.items() if is_hub_location(checkpoint.location))


def hub_summary(inputs: tuple[str, ...]) -> str:
    """The summary line's tail naming the Hub commits read ("" when every input was local)."""
    return f"; read from the Hub: {', '.join(inputs)}" if inputs else ""
