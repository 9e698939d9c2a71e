"""What a merge checks before it commits: no input was rewritten while it was read, and the
statistics were computed at the θ_0 they are declared at.

The statistics record the content digest of their model (`perta_stats.json`). `merge` compares
it with the digest of the input they belong to: taken while that input is streamed (a dense θ_fgt,
or θ_full = θ_0); with an adapter θ_fgt θ_0 is not streamed, so its files vouch for it when they are
the ones the statistics record (a stat per shard), else θ_0 is hashed whole before anything is written.
"""

from __future__ import annotations

import logging

from perta_stream.config.merge import MergeConfig
from perta_stream.errors import StatisticsError
from perta_stream.memory import format_bytes
from perta_stream.plan.merge_plan import STAT_ROLES, MergePlan
from perta_stream.sinks.model_output import LocalModelOutput, ModelOutput
from perta_stream.sources.byte_source import ByteSource
from perta_stream.sources.checkpoint import Checkpoint
from perta_stream.sources.content_digest import TensorHasher
from perta_stream.sources.pinned_folder import check_inputs_unchanged
from perta_stream.sources.stats_dir import StatsRecord, check_stats_content

logger = logging.getLogger(__name__)
STATS_AT_FLAGS = {"theta0": "--theta0", "full": "--full", "fgt": "--fgt"}


def settled_before(config: MergeConfig, plan: MergePlan) -> bool:
    """The statistics belong to θ_0, which the merge does not stream (an adapter θ_fgt, θ_full another model)."""
    return config.method in STAT_ROLES and config.stats_at == "theta0" and plan.fgt_adapter is not None and not plan.full_is_theta0


def adapter_stats_identity(config: MergeConfig, plan: MergePlan, sources: dict[str, ByteSource], record: StatsRecord) -> str | None:
    """The statistics' content digest when θ_0 is not streamed (`_settled_before`), checked first.

    By θ_0's files when they are the ones the statistics were computed from (a stat per shard);
    else θ_0 is read whole and hashed (one model-size of reads) and compared.

    Raises:
        StatisticsError: the statistics were computed at other bytes; nothing is written.
    """
    if not settled_before(config, plan):
        return None
    by_files = stats_identity_by_files(plan.inputs["theta0"], record)
    if by_files is not None:
        return by_files
    logger.info("θ_0's files are not those the statistics record; hashing θ_0 (%s) before merging", format_bytes(plan.inputs["theta0"].total_bytes))
    return check_stats_identity(config, plan, sources, TensorHasher(), "theta0", record)


def stats_identity_by_files(theta0: Checkpoint, record: StatsRecord) -> str | None:
    """The statistics' recorded content digest, when θ_0's files are the ones the statistics
    were computed from: same header digest, and, for local files, the same resolved folder with
    every shard's size and modification time (a Hub model: the same commit); else None.
    (`merge` and `inspect` with an adapter θ_fgt, which do not stream θ_0 whole.)"""
    same = record.model.header_sha256 == theta0.header_sha256 and record.model.files == theta0.file_identity()
    return record.model.content_sha256 if same and isinstance(record.model.content_sha256, str) else None


def check_stats_identity(
    config: MergeConfig, plan: MergePlan, sources: dict[str, ByteSource], hasher: TensorHasher, hash_role: str, record: StatsRecord
) -> str:
    """The statistics' content digest, after checking it is that of the input they belong to
    (hashed by `hasher`, which reads what it has not seen from `sources[hash_role]`).

    Args:
        record: the statistics' record, as read when the run opened them.

    Raises:
        StatisticsError: the statistics were computed at other bytes (or by a version that did
            not record them); nothing has been committed.
    """
    checkpoint = plan.inputs[config.stats_at]
    flag = STATS_AT_FLAGS[config.stats_at]
    if not isinstance(checkpoint, Checkpoint):
        raise StatisticsError(f"statistics cannot have been computed at the adapter {flag} {checkpoint.location}; pass --stats-at theta0")
    actual = hasher.complete(checkpoint, sources[hash_role])
    check_stats_content(record, str(config.stats), flag, checkpoint.location, actual)
    return actual


def check_before_commit(
    config: MergeConfig,
    plan: MergePlan,
    sources: dict[str, ByteSource],
    hasher: TensorHasher | None,
    hash_role: str,
    settled: str | None,
    record: StatsRecord | None,
    outputs: list[ModelOutput],
) -> str | None:
    """Before the commit: no input was rewritten during the run, and the statistics belong to the
    input they are declared at (its content digest, hashed while streamed, is the record's; or
    `settled` before the run, when that input is not streamed). Returns that digest (None without
    statistics).

    Raises:
        InputChangedError, StatisticsError: nothing is committed; each output's partial folder
            notes why, so a rerun is not told that --resume alone would finish it.
    """
    locations = {role: checkpoint.location for role, checkpoint in plan.inputs.items()}
    check_inputs_unchanged(sources, locations, partial=_partials(outputs), outputs=outputs)
    if hasher is None or record is None:
        return settled
    try:
        return check_stats_identity(config, plan, sources, hasher, hash_role, record)
    except StatisticsError as exc:
        for output in outputs:
            output.note_stopped(str(exc))
        raise


def _partials(outputs: list[ModelOutput]) -> str | None:
    folders = [str(output.partial) for output in outputs if isinstance(output, LocalModelOutput)]
    return ", ".join(folders) or None
