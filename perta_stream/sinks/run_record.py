"""What a merge writes besides tensors: the index, `perta_merge.json` and the model card."""

from __future__ import annotations

import json
from collections.abc import Sequence

from perta_stream.sinks.shard_writer import ShardRecord

MERGE_RECORD_NAME = "perta_merge.json"
MERGE_RECORD_FORMAT = "perta_merge"
MODEL_CARD_NAME = "README.md"


def index_json(weight_map: dict[str, str], total_size: int) -> bytes:
    """A `model.safetensors.index.json` in the layout transformers writes."""
    document = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    return (json.dumps(document, indent=2) + "\n").encode()


def record_json(record: dict) -> bytes:
    return (json.dumps(record, indent=2, sort_keys=False) + "\n").encode()


def shard_entries(records: Sequence[ShardRecord]) -> list[dict]:
    return [{"file_name": r.file_name, "size_bytes": r.size_bytes, "sha256": r.sha256} for r in records]


def _hub_id(location: str) -> str | None:
    if location.startswith("hf://"):
        return location.removeprefix("hf://").split("@", 1)[0]
    return None


def model_card(*, full_location: str, method: str, alpha: float, tau: float | None, copied: Sequence[str], tool_version: str) -> bytes:
    """A README.md with YAML front matter the Hub understands (base_model, tags)."""
    base = _hub_id(full_location)
    front = ["---"]
    if base:
        front.append(f"base_model: {base}")
    front += ["tags:", "- unlearning", "- perta", "- perta-stream", "- task-arithmetic", "library_name: transformers", "---"]
    weights = {
        "tv": "W = 1 (plain task arithmetic)",
        "uniform": "W = a constant",
        "grad": f"PerTA-grad, W = |g_f|^tau / (|g_f|^tau + |g_r|^tau), tau = {tau:g}" if tau else "PerTA-grad",
        "fisher": f"PerTA-fisher, W = F_f^(tau/2) / (F_f^(tau/2) + F_r^(tau/2)), tau = {tau:g}" if tau else "PerTA-fisher",
    }[method]
    body = [
        "",
        "# Unlearned model (per-parameter task arithmetic)",
        "",
        f"Made by perta-stream {tool_version} from `{full_location}`:",
        "",
        f"theta_out = theta_full - {alpha:g} * W * (theta_fgt - theta0), with {weights}.",
        "",
        "The inputs, options and the sha256 of every shard are in `perta_merge.json`.",
    ]
    if copied:
        body += ["", f"{len(copied)} tensor(s) only present in the input model were copied unchanged (listed in perta_merge.json)."]
    return ("\n".join(front + body) + "\n").encode()
