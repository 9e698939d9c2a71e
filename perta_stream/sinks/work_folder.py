"""The work folder of an `unlearn` run: what the run makes besides its outputs, kept to be reused.

Default `perta_work/` next to the output (`--work-dir` elsewhere). It holds, each under a name
that says what it was made from, so runs on other models or data in the same folder never collide:

- `stats-<model>-<key>/`: statistics, named by the stats model's content digest and the data;
- `fgt-<model>-<key>/`: θ_fgt fine-tuned from the user's model (`unlearn --model`), or
  `fgt-lora-<model>-<key>/`, θ_fgt as a LoRA adapter (`--lora R`);
- `eval-<key>/`: the before/after evaluation records and table;
- `digests.json`: content digests of the models read (sources/content_digest.py), each with the
  files it was computed from (folder, shard sizes and times), so an unchanged model is not read
  again to be named; a changed file is hashed anew.

Nothing outside this folder is written, and nothing in it that the run did not make is removed.
"""

from __future__ import annotations

import json
from pathlib import Path

from perta_stream.sinks.atomic_file import write_text_atomically
from perta_stream.sources.checkpoint import Checkpoint

DIGESTS_NAME = "digests.json"


class WorkFolder:
    """Names inside the work folder, and the cache of model content digests."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def named(self, prefix: str, model_content_sha256: str, key: str) -> Path:
        """`<work>/<prefix>-<first 8 hex of the model digest>-<key>`."""
        return self.path / f"{prefix}-{model_content_sha256[:8]}-{key}"

    def content_sha256(self, location: str) -> str:
        """The content digest of the checkpoint at `location`, from the cache when its files are
        unchanged, else read and hashed (every tensor's bytes) and cached.

        Raises:
            CheckpointError: the checkpoint cannot be opened or read.
        """
        from perta_stream.sources.content_digest import TensorHasher
        from perta_stream.sources.resolve import open_checkpoint

        cached = self.cached_content_sha256(location)
        if cached is not None:
            return cached
        checkpoint, source = open_checkpoint(location, "model")
        try:
            key, files = _identity(checkpoint)
            digest = TensorHasher().complete(checkpoint, source)
        finally:
            source.close()
        cache = self._cache()
        cache[key] = {"files": files, "content_sha256": digest}
        write_text_atomically(self.path / DIGESTS_NAME, json.dumps(cache, indent=1, sort_keys=True) + "\n")
        return digest

    def cached_content_sha256(self, location: str) -> str | None:
        """The cached digest of `location` when its files are unchanged, else None (reads headers only)."""
        from perta_stream.sources.resolve import open_checkpoint

        checkpoint, source = open_checkpoint(location, "model")
        source.close()
        key, files = _identity(checkpoint)
        cached = self._cache().get(key)
        if isinstance(cached, dict) and cached.get("files") == files and isinstance(cached.get("content_sha256"), str):
            return cached["content_sha256"]
        return None

    def _cache(self) -> dict:
        try:
            cache = json.loads((self.path / DIGESTS_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # none yet, or unreadable: hashing again is always correct
        return cache if isinstance(cache, dict) else {}


def _identity(checkpoint: Checkpoint) -> tuple[str, list]:
    """(cache key, the files' identity) of a checkpoint, as JSON round-trips them."""
    files = json.loads(json.dumps(checkpoint.file_identity()))
    return str(files[0]), files
