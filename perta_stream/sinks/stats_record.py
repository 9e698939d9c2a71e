"""The record of a statistics directory (`perta_stats.json`, `StatsRecord`) as a run fills it
in, and the identity a resume must match.

`stats` and the one-pass unlearn (with --save-stats) write the same record, so a later `merge`
or `unlearn` reads either the same way (`read_stats_record`).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import TYPE_CHECKING, Any

from perta_stream import __version__
from perta_stream.memory import peak_rss_bytes
from perta_stream.sources.stats_dir import StatsModelInfo, StatsRecord

if TYPE_CHECKING:
    from perta_stream.compute.prompts import EncodedSample
    from perta_stream.config.stats import StatsConfig
    from perta_stream.plan.stats_plan import ModelShape
    from perta_stream.sources.checkpoint import Checkpoint
    from perta_stream.sources.encoded_data import DatasetInfo


def stats_record(
    config: StatsConfig,
    checkpoint: Checkpoint,
    shape: ModelShape,
    datasets: dict[str, tuple[DatasetInfo, list[EncodedSample]]],
    device_name: str,
    compute_dtype_name: str,
    started: float,
    content_sha256: str,
) -> StatsRecord:
    """`perta_stats.json`: what was computed, from what, and how (METHOD.md section 6).

    `content_sha256` identifies the model by its tensors' bytes (sources/content_digest.py);
    merges check their θ_0 against it before they commit.
    """
    from perta_stream.compute.prompts import LOSS_DEFINITION

    return StatsRecord(
        tool_version=__version__,
        model=StatsModelInfo(
            location=str(config.model),
            header_sha256=checkpoint.header_sha256,
            files=checkpoint.file_identity(),
            content_sha256=content_sha256,
            model_type=shape.model_type,
        ),
        kinds=tuple(config.kinds),
        stats_dtype="float32" if config.stats_dtype == "F32" else "bfloat16",
        compute_dtype=compute_dtype_name,
        device=device_name,
        datasets={name: info.to_json() for name, (info, _) in datasets.items()},
        **config.encoding(),
        loss=LOSS_DEFINITION,
        elapsed_s=round(time.perf_counter() - started, 3),
        peak_rss_bytes=peak_rss_bytes(),
    )


def run_identity(
    config: StatsConfig, checkpoint: Checkpoint, datasets: dict[str, tuple[DatasetInfo, list[EncodedSample]]], device_name: str, compute_dtype_name: str
) -> dict[str, Any]:
    """Everything the statistics' bytes depend on; its digest is the fingerprint a resume must match.

    The options are listed one by one so that a refused resume can name what changed; the
    digest of the token ids also covers what no option shows (a tokenizer or chat template
    changed in place). --out, --overwrite, --boundary-budget and --checkpoint-interval change
    where and how the work is done, not the result, and are left out.
    """
    tokens = hashlib.sha256()
    for name, (_, samples) in datasets.items():
        tokens.update(json.dumps([name, [[s.input_ids, s.labels] for s in samples]]).encode())
    return {
        "tool_version": __version__,
        "model_header_sha256": checkpoint.header_sha256,
        "model_files": checkpoint.file_identity(),
        **{f"{name}_sha256": info.sha256 for name, (info, _) in datasets.items()},
        "kinds": list(config.kinds),
        "fraction": config.fraction,
        "seed": config.seed,
        "max_length": config.max_length,
        "batch_size": config.batch_size,
        "question_key": config.question_key,
        "answer_key": config.answer_key,
        "system_prompt": config.system_prompt,
        "stats_dtype": config.stats_dtype,
        "device": device_name,
        "compute_dtype": compute_dtype_name,
        "token_ids_sha256": tokens.hexdigest(),
    }
