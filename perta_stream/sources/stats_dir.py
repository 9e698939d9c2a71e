"""Opening a statistics directory (METHOD.md section 6) for a grad or fisher merge."""

from __future__ import annotations

import json
import os
from pathlib import Path

from perta_stream.errors import PertaStreamError, PlanError, StatisticsError
from perta_stream.sources.byte_source import ByteSource
from perta_stream.sources.checkpoint import Checkpoint
from perta_stream.sources.resolve import is_hub_location, open_checkpoint

STATS_RECORD_NAME = "perta_stats.json"
STATS_FORMAT = "perta_stats"


def read_stats_record(stats_dir: str | os.PathLike) -> dict:
    """The parsed `perta_stats.json` of a statistics directory.

    Raises:
        StatisticsError: the directory or record is missing or is not a perta_stats record.
    """
    path = Path(stats_dir) / STATS_RECORD_NAME
    if not path.is_file():
        raise StatisticsError(
            f"{stats_dir} has no {STATS_RECORD_NAME}; pass a directory written by `perta-stream stats`"
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise StatisticsError(f"{path} is not valid JSON ({exc}); recompute the statistics") from None
    if not isinstance(record, dict) or record.get("format") != STATS_FORMAT:
        raise StatisticsError(f"{path} is not a perta_stats record; recompute the statistics")
    return record


def open_stats(
    stats_dir: str, roles: tuple[str, ...], problems: list[str]
) -> tuple[dict[str, Checkpoint], dict[str, ByteSource]]:
    """Open the statistics checkpoints a method needs (e.g. `forget.fisher`, `retain.fisher`).

    Problems (missing kinds, unusable checkpoints) are appended to `problems`, not raised, so the
    merge plan reports them together with everything else.
    """
    checkpoints: dict[str, Checkpoint] = {}
    sources: dict[str, ByteSource] = {}
    if is_hub_location(stats_dir):
        problems.append(f"--stats {stats_dir}: statistics are read from a local directory; download them first")
        return checkpoints, sources
    try:
        record = read_stats_record(stats_dir)
    except StatisticsError as exc:
        problems.append(str(exc))
        return checkpoints, sources
    kinds = record.get("kinds", [])
    for role in roles:
        kind = role.split(".", 1)[1]
        if kind not in kinds:
            problems.append(
                f"statistics {stats_dir} hold {', '.join(kinds) or 'no kinds'}, not {kind}; "
                f"recompute them with `perta-stream stats --kinds {kind}`"
            )
            continue
        try:
            checkpoints[role], sources[role] = open_checkpoint(Path(stats_dir) / role, role)
        except PlanError as exc:
            problems.extend(exc.problems)
        except PertaStreamError as exc:
            problems.append(str(exc))
    return checkpoints, sources
