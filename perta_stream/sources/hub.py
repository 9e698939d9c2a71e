"""Checkpoints in Hugging Face Hub repos, read by HTTP range requests: nothing touches the disk.

`open_hub_checkpoint("hf://ORG/NAME[@REVISION]", role)` pins the revision to its commit, lists
the repo's files, reads the index and each shard's safetensors header with two small range
requests, and validates them with exactly the code that validates a local checkpoint
(sources/checkpoint.py). So every planning error of a merge appears before a tensor byte moves.

Tensor bytes are then read by `HubByteSource.read_into` straight into the engine's reused
buffers: each chunk is one ranged GET (split into a few concurrent GETs when it is large, so one
slow connection does not bound the throughput), so the bytes fetched equal the bytes needed
plus the headers, and no shard is ever stored locally.

The Hub publishes the sha256 of every LFS file (every shard). The source hashes a file's bytes
as long as they arrive in order (a merge reads each shard's header, then its tensors front to
back), and a file read whole whose digest differs raises before anything is committed: a byte
corrupted in transit never becomes a different model with exit 0.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from perta_stream.errors import CheckpointError, CheckpointNotFoundError, HeaderError, HubError
from perta_stream.notices import notice
from perta_stream.sources.checkpoint import (
    SINGLE_FILE_NAME,
    Checkpoint,
    assemble_checkpoint,
    is_side_file,
    parse_config,
    resolve_layout,
)
from perta_stream.sources.hub_http import RangeReader, make_api, parse_hub_location, with_retries
from perta_stream.sources.input_location import hub_input_notice
from perta_stream.sources.safetensors_header import SafetensorsHeader, parse_header

# Repo bookkeeping, never part of a model: not copied into an output as a side file.
REPO_FILES = frozenset({".gitattributes", ".gitignore"})
# A chunk at least twice this size is fetched as concurrent parts of this size.
PART_BYTES = 8 * 2**20
PARALLEL_PARTS = 4


def open_hub_checkpoint(location: str, role: str) -> tuple[Checkpoint, HubByteSource]:
    """The header-level view of a Hub checkpoint and a range-reading source for its bytes.

    Args:
        location: `hf://ORG/NAME[@REVISION][/FOLDER]`.
        role: the checkpoint's role in the run, for messages.

    Raises:
        UsageError: the location is malformed.
        HubError: the repo or revision does not exist, the token is refused, or the Hub keeps failing.
        CheckpointNotFoundError, PickleCheckpointError: no usable weights in the repo.
        PlanError: every index and header problem, at once (as for a local checkpoint).
    """
    hub_location = parse_hub_location(location)
    api = make_api()
    info = with_retries(
        lambda: api.model_info(hub_location.repo_id, revision=hub_location.revision, files_metadata=True),
        action=f"opening {role} checkpoint",
        location=location,
    )
    if not info.sha:
        raise HubError(f"opening {role} checkpoint {location}: the Hub did not say which commit it serves; retry later")
    sizes = folder_sizes(info.siblings or [], hub_location.path_in_repo)
    pinned = hub_location.pinned(info.sha)
    notice(hub_input_notice(role, location, pinned))
    reader = RangeReader(hub_location, info.sha)
    source = HubByteSource(reader, sizes, folder_sha256(info.siblings or [], hub_location.path_in_repo))
    where = f"{role} ({pinned})"
    names = sorted(sizes)
    index_name, index_bytes, weight_map, problems = resolve_layout(
        sizes, lambda name: reader.read_bytes(name, 0, sizes[name]), location=pinned, role=role
    )
    shard_names = list(dict.fromkeys(weight_map.values())) if index_name else [SINGLE_FILE_NAME]
    headers: dict[str, SafetensorsHeader] = {}
    for file_name in shard_names:
        if file_name not in sizes:
            problems.append(f"{where}: the index names shard {file_name}, which the repo does not hold")
            continue
        try:
            headers[file_name] = parse_header(
                lambda offset, length, name=file_name: source.read_bytes(name, offset, max(0, min(length, sizes[name] - offset))),
                sizes[file_name],
                file_name,
            )
        except HeaderError as exc:
            problems.append(f"{where}: {exc}")
    if index_name is None and SINGLE_FILE_NAME in headers:
        weight_map = {tensor_name: SINGLE_FILE_NAME for tensor_name in headers[SINGLE_FILE_NAME].tensors}
    config = {}
    if "config.json" in sizes:
        config = parse_config(reader.read_bytes("config.json", 0, sizes["config.json"]), where, problems)
    checkpoint = assemble_checkpoint(
        location=pinned,
        role=role,
        index_name=index_name,
        index_bytes=index_bytes,
        weight_map=weight_map,
        headers=headers,
        problems=problems,
        side_files=tuple(n for n in names if is_side_file(n) and n not in REPO_FILES),
        config=config,
    )
    return checkpoint, source


def folder_sizes(siblings: list, folder: str) -> dict[str, int]:
    """File name -> size of the files directly inside `folder` of the repo."""
    prefix = f"{folder}/" if folder else ""
    sizes: dict[str, int] = {}
    for sibling in siblings:
        path = sibling.rfilename
        if not path.startswith(prefix) or "/" in path[len(prefix) :]:
            continue
        size = sibling.lfs.size if sibling.lfs is not None else sibling.size
        if size is None:
            raise HubError(f"the Hub listed {path} without its size; retry later, or use a Hub that reports file sizes")
        sizes[path[len(prefix) :]] = int(size)
    return sizes


def folder_sha256(siblings: list, folder: str) -> dict[str, str]:
    """File name -> the sha256 the Hub publishes, for the LFS files directly inside `folder`."""
    prefix = f"{folder}/" if folder else ""
    published: dict[str, str] = {}
    for sibling in siblings:
        path = sibling.rfilename
        sha256 = getattr(sibling.lfs, "sha256", None) if sibling.lfs is not None else None
        if path.startswith(prefix) and "/" not in path[len(prefix) :] and isinstance(sha256, str):
            published[path[len(prefix) :]] = sha256.lower()
    return published


class _InOrderDigest:
    """sha256 of a file whose bytes are handed over front to back; gives up at the first gap."""

    def __init__(self) -> None:
        self.next_offset = 0
        self.in_order = True
        self.hasher = hashlib.sha256()


class HubByteSource:
    """Reads a Hub checkpoint's bytes into caller-owned buffers by HTTP range requests.

    Args:
        reader: the pinned-commit range reader of the repo.
        sizes: file name -> size of the checkpoint's files.
        published_sha256: file name -> the sha256 the Hub publishes for it (LFS files).
    """

    def __init__(self, reader: RangeReader, sizes: dict[str, int], published_sha256: dict[str, str] | None = None):
        self._reader = reader
        self._sizes = dict(sizes)
        self._published = dict(published_sha256 or {})
        self._digests: dict[str, _InOrderDigest] = {}
        self.verified_files: set[str] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def read_bytes(self, file_name: str, offset: int, length: int) -> bytes:
        """`length` bytes of `file_name` at `offset` (headers, small files), checked like any read."""
        buffer = bytearray(length)
        self.read_into(file_name, offset, memoryview(buffer))
        return bytes(buffer)

    def _observe(self, file_name: str, offset: int, view: memoryview) -> None:
        """Feed bytes just read to the file's running digest; compare once the file is complete.

        Raises:
            HubError: the whole file was read and its sha256 is not the published one.
        """
        published = self._published.get(file_name)
        if published is None:
            return
        with self._lock:
            digest = self._digests.setdefault(file_name, _InOrderDigest())
            if not digest.in_order or offset + len(view) <= digest.next_offset:
                return  # out of order earlier, or bytes already hashed (a re-read)
            if offset != digest.next_offset:
                digest.in_order = False
                return
            digest.hasher.update(view)
            digest.next_offset += len(view)
            if digest.next_offset != self._sizes[file_name]:
                return
            actual = digest.hasher.hexdigest()
        if actual != published:
            raise HubError(
                f"{self._reader.location}: {file_name} arrived with sha256 {actual[:16]}…, but the Hub publishes "
                f"{published[:16]}… for it: bytes were corrupted in transit; nothing was committed, rerun the command"
            )
        self.verified_files.add(file_name)

    @property
    def bytes_received(self) -> int:
        """Bytes of file content received so far (headers included)."""
        return self._reader.bytes_received

    @property
    def requests(self) -> int:
        return self._reader.requests

    def read_into(self, file_name: str, offset: int, buffer: memoryview) -> None:
        view = buffer.cast("B") if buffer.format != "B" else buffer
        if len(view) == 0:
            return
        size = self._sizes.get(file_name)
        if size is None or offset + len(view) > size:
            raise CheckpointError(f"{self._reader.location}: {file_name} has no bytes {offset}..{offset + len(view)}; the plan is stale")
        if len(view) < 2 * PART_BYTES:
            self._reader.read_into(file_name, offset, view)
            self._observe(file_name, offset, view)
            return
        parts = [(start, min(PART_BYTES, len(view) - start)) for start in range(0, len(view), PART_BYTES)]
        futures = [self._executor().submit(self._reader.read_into, file_name, offset + start, view[start : start + length]) for start, length in parts]
        # Wait for every part before raising, so no part still writes into a buffer the
        # engine may reuse once the error reached it.
        wait(futures)
        for future in futures:
            future.result()
        self._observe(file_name, offset, view)

    def done_with(self, file_name: str, offset: int, length: int) -> None:
        """Nothing is cached locally, so there is nothing to drop."""

    def changed_files(self) -> list[str]:
        """None: every read is pinned to one commit (and checked against its published sha256)."""
        return []

    def fetch_file(self, file_name: str, destination: str | os.PathLike) -> None:
        """Download a whole (small, side) file to `destination`, byte for byte."""
        size = self._sizes.get(file_name)
        if size is None:
            raise CheckpointNotFoundError(f"{self._reader.location}: the repo has no {file_name}")
        target = Path(destination)
        tmp = target.with_name(target.name + ".download")
        block = bytearray(max(1, min(size, PART_BYTES)))
        try:
            with open(tmp, "wb") as handle:
                for start in range(0, size, len(block)):
                    view = memoryview(block)[: min(len(block), size - start)]
                    self._reader.read_into(file_name, start, view)
                    handle.write(view)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=PARALLEL_PARTS, thread_name_prefix="perta-hub-read")
            return self._pool



# What a model folder needs to be loaded by transformers: weights, configs, tokenizer files and a
# chat template. Never Python files (no remote code) and never pickles.
SNAPSHOT_PATTERNS = ("*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken")


def download_model_folder(location: str, role: str = "model") -> Path:
    """A local copy of a Hub model (in the huggingface_hub cache) for commands that load a whole
    model with transformers (eval, finetune); the weights come as safetensors only.

    Raises:
        UsageError: the location is malformed. HubError: the repo cannot be read.
    """
    from huggingface_hub import snapshot_download

    hub_location = parse_hub_location(location)
    api = make_api()
    info = with_retries(lambda: api.model_info(hub_location.repo_id, revision=hub_location.revision), action=f"opening {role}", location=location)
    if not info.sha:
        raise HubError(f"opening {role} {location}: the Hub did not say which commit it serves; retry later")
    # Every file from the one commit announced, however the branch moves meanwhile.
    notice(hub_input_notice(role, location, hub_location.pinned(info.sha)))
    folder = with_retries(
        lambda: snapshot_download(
            hub_location.repo_id,
            revision=info.sha,
            allow_patterns=[hub_location.file_path(pattern) for pattern in SNAPSHOT_PATTERNS],
        ),
        action="downloading model",
        location=location,
    )
    return Path(folder) / hub_location.path_in_repo


def download_config_json(location: str) -> Path:
    """A Hub model's config.json alone (in the huggingface_hub cache): what a config-only dry run
    plans from, without a byte of the weights.

    Raises:
        UsageError: the location is malformed. HubError: the repo or its config.json cannot be read.
    """
    from huggingface_hub import hf_hub_download

    hub_location = parse_hub_location(location)
    return Path(
        with_retries(
            lambda: hf_hub_download(hub_location.repo_id, hub_location.file_path("config.json"), revision=hub_location.revision),
            action="downloading config.json",
            location=location,
        )
    )
