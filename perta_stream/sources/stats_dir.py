"""Opening a statistics directory (METHOD.md section 6) for a grad or fisher merge."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perta_stream.errors import CheckpointNotFoundError, PertaStreamError, PlanError, StatisticsError
from perta_stream.sources.byte_source import ByteSource, LocalByteSource
from perta_stream.sources.checkpoint import Checkpoint, pin_local_checkpoint
from perta_stream.sources.pinned_folder import PinnedFolder
from perta_stream.sources.input_location import is_hub_location

STATS_RECORD_NAME = "perta_stats.json"
STATS_FORMAT = "perta_stats"


@dataclass(frozen=True)
class StatsModelInfo:
    """The model a statistics directory was computed at.

    Attributes:
        location: the --model given.
        header_sha256, files: `Checkpoint.header_sha256` and `Checkpoint.file_identity()`.
        content_sha256: the digest of its tensors' bytes (sources/content_digest.py); None in
            records of versions that did not write it.
        model_type: config.json's model_type.
    """

    location: str | None = None
    header_sha256: str | None = None
    files: Any = None
    content_sha256: str | None = None
    model_type: str | None = None


@dataclass(frozen=True)
class StatsRecord:
    """`perta_stats.json`, the one schema of a statistics directory: what was computed, from
    what, and how (METHOD.md section 6). `stats` and the one-pass unlearn write it; merge, the
    merge's statistics check and unlearn's reuse check read it.

    Reading is lenient (a field a record lacks, or holds with the wrong type, is None), so a
    reader reports what differs instead of failing on an older or damaged record.
    """

    model: StatsModelInfo
    kinds: tuple[str, ...]
    stats_dtype: str | None
    compute_dtype: str | None
    device: str | None
    datasets: dict[str, dict[str, Any]]
    fraction: float | None
    seed: int | None
    max_length: int | None
    question_key: str | None
    answer_key: str | None
    system_prompt: str | None
    loss: Any = None
    elapsed_s: float | None = None
    peak_rss_bytes: int | None = None
    tool_version: str | None = None
    format_version: int = 1

    def to_json(self) -> dict[str, Any]:
        """The record as written (the key order of every perta_stats.json so far)."""
        return {
            "format": STATS_FORMAT,
            "format_version": self.format_version,
            "tool_version": self.tool_version,
            "model": {
                "location": self.model.location,
                "header_sha256": self.model.header_sha256,
                "files": self.model.files,
                "content_sha256": self.model.content_sha256,
                "model_type": self.model.model_type,
            },
            "kinds": list(self.kinds),
            **{name: getattr(self, name) for name in _PLAIN_FIELDS},
        }

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "StatsRecord":
        """Read a parsed perta_stats.json (lenient, see the class's docstring)."""
        model = record.get("model") if isinstance(record.get("model"), dict) else {}
        kinds = record.get("kinds") if isinstance(record.get("kinds"), list) else []
        datasets = record.get("datasets") if isinstance(record.get("datasets"), dict) else {}
        return cls(
            model=StatsModelInfo(**{name: model.get(name) for name in ("location", "header_sha256", "files", "content_sha256", "model_type")}),
            kinds=tuple(str(kind) for kind in kinds),
            datasets={str(name): entry if isinstance(entry, dict) else {} for name, entry in datasets.items()},
            format_version=record.get("format_version", 1),
            tool_version=record.get("tool_version"),
            **{name: record.get(name) for name in _PLAIN_FIELDS if name != "datasets"},
        )


# The record's top-level fields after `kinds`, in the order they are written.
_PLAIN_FIELDS = (
    "stats_dtype", "compute_dtype", "device", "datasets", "fraction", "seed", "max_length",
    "question_key", "answer_key", "system_prompt", "loss", "elapsed_s", "peak_rss_bytes",
)  # fmt: skip


def read_stats_record(stats_dir: str | os.PathLike, *, folder: PinnedFolder | None = None) -> StatsRecord:
    """The `perta_stats.json` of a statistics directory.

    Args:
        folder: the directory pinned for the run, read instead of the path.

    Raises:
        StatisticsError: the directory or record is missing or is not a perta_stats record.
    """
    path = Path(stats_dir) / STATS_RECORD_NAME
    exists = STATS_RECORD_NAME in folder.listing() if folder is not None else path.is_file()
    if not exists:
        raise StatisticsError(
            f"{stats_dir} has no {STATS_RECORD_NAME}; pass a directory written by `perta-stream stats`"
        )
    try:
        raw = folder.read_file(STATS_RECORD_NAME) if folder is not None else path.read_bytes()
        record = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise StatisticsError(f"{path} is not valid JSON ({exc}); recompute the statistics") from None
    if not isinstance(record, dict) or record.get("format") != STATS_FORMAT:
        raise StatisticsError(f"{path} is not a perta_stats record; recompute the statistics")
    return StatsRecord.from_json(record)


def open_stats(
    stats_dir: str, roles: tuple[str, ...], problems: list[str]
) -> tuple[dict[str, Checkpoint], dict[str, ByteSource], StatsRecord | None]:
    """Open the statistics checkpoints a method needs (e.g. `forget.fisher`, `retain.fisher`), and
    the record, all from the directory as it is now (pinned for the run: sources/pinned_folder.py).

    Problems (missing kinds, unusable checkpoints) are appended to `problems`, not raised, so the
    merge plan reports them together with everything else.
    """
    checkpoints: dict[str, Checkpoint] = {}
    sources: dict[str, ByteSource] = {}
    if is_hub_location(stats_dir):
        problems.append(f"--stats {stats_dir}: statistics are read from a local directory; download them first")
        return checkpoints, sources, None
    try:
        folder = PinnedFolder(stats_dir)
    except CheckpointNotFoundError:
        problems.append(f"--stats {stats_dir} is not a directory; pass a directory written by `perta-stream stats`")
        return checkpoints, sources, None
    try:
        record = read_stats_record(stats_dir, folder=folder)
        for role in roles:
            kind = role.split(".", 1)[1]
            if kind not in record.kinds:
                problems.append(
                    f"statistics {stats_dir} hold {', '.join(record.kinds) or 'no kinds'}, not {kind}; "
                    f"recompute them with `perta-stream stats --kinds {kind}`"
                )
                continue
            try:
                checkpoints[role], pinned = pin_local_checkpoint(Path(stats_dir) / role, role, parent=folder)
                sources[role] = LocalByteSource(pinned)
            except PlanError as exc:
                problems.extend(exc.problems)
            except PertaStreamError as exc:
                problems.append(str(exc))
    except StatisticsError as exc:
        problems.append(str(exc))
        return checkpoints, sources, None
    finally:
        folder.close()  # the sub-folders stay open through their own descriptors
    return checkpoints, sources, record


def check_stats_content(record: StatsRecord, stats_dir: str, flag: str, location: str, actual: str) -> None:
    """Check the content digest of the model a merge takes statistics at against the record.

    Args:
        record: the statistics' record, as read when the run opened them.
        flag, location: the merge input the statistics are declared to be taken at.
        actual: that input's content digest (sources/content_digest.py).

    Raises:
        StatisticsError: the statistics were computed at other bytes (or by a version that did
            not record them); nothing has been committed.
    """
    expected = record.model.content_sha256
    if not isinstance(expected, str):
        raise StatisticsError(
            f"{stats_dir}/{STATS_RECORD_NAME} does not record the content digest of its model (an older perta-stream "
            f"wrote it), so it cannot be checked against {flag} {location}; recompute the statistics with "
            "`perta-stream stats`"
        )
    if actual != expected:
        raise StatisticsError(
            f"statistics {stats_dir} were computed at {record.model.location!r}, whose tensors differ from those of "
            f"{flag} {location} (content sha256 {expected[:12]}… there, {actual[:12]}… here); nothing was "
            f"committed: compute the statistics at this model (`perta-stream stats --model {location}`), or "
            "pass --stats-at full or fgt if they were computed at that input"
        )
