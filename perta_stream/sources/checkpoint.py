"""A checkpoint as the planner sees it: tensor locations from headers, side files, tying.

`Checkpoint` is built from headers only (index + one header per shard), so every mismatch is
found before a tensor byte is read. The bytes themselves come from a `ByteSource`
(sources/byte_source.py for local files, sources/hub.py for Hub repos), which keeps the engine
independent of where a checkpoint lives.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from perta_stream.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    HeaderError,
    PickleCheckpointError,
    PlanError,
)
from perta_stream.sources.pinned_folder import FileIdentity, PinnedFolder
from perta_stream.sources.safetensors_header import SafetensorsHeader, TensorInfo, parse_header

SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files that describe weights, never copied as side files: the merge writes its own.
WEIGHT_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
OWN_FILES = frozenset({INDEX_FILE_NAME, "README.md", "perta_merge.json", "perta_stats.json", "perta_finetune.json", "perta_convert.json"})
OUTPUT_EMBEDDING_NAMES = ("lm_head.weight",)
INPUT_EMBEDDING_SUFFIX = "embed_tokens.weight"
_MAX_INDEX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Checkpoint:
    """The header-level view of one sharded safetensors checkpoint.

    Attributes:
        location: the directory path, or `hf://org/name@revision` for a Hub repo.
        role: what the checkpoint is for in this run (`theta0`, `full`, ...), used in messages.
        shards: the shard headers, in index order.
        tensors: tensor_name -> TensorInfo across all shards.
        side_files: files to copy into an output (config, tokenizer, ...), relative names.
        config: the parsed config.json, or {} when there is none.
        ties_embeddings: whether the output embedding is tied to (stored as) the input embedding.
        index_name: the index file's name, or None for a single-file checkpoint.
        header_sha256: digest over the index and every shard header (identifies the layout).
        files: the identity (device, inode, size, modification time) of every shard when it was
            opened; empty for a Hub checkpoint, which its pinned commit identifies.
    """

    location: str
    role: str
    shards: tuple[SafetensorsHeader, ...]
    tensors: dict[str, TensorInfo]
    side_files: tuple[str, ...]
    config: dict
    ties_embeddings: bool
    index_name: str | None
    header_sha256: str
    files: tuple[FileIdentity, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def shard_of(self, tensor_name: str) -> str:
        return self.tensors[tensor_name].file_name

    def file_identity(self) -> list:
        """The checkpoint's files as the run opened them, for the fingerprint of a resumable run
        and the record of statistics.

        Header digests alone cannot tell two fine-tunes of one base model apart (their headers are
        identical); the resolved folder and every shard's device, inode, size and modification
        time do, and also notice a shard replaced or rewritten in place. A Hub checkpoint is its
        `hf://org/name@revision`.
        """
        if self.location.startswith("hf://"):
            return [self.location]
        return [str(Path(self.location).resolve()), [identity.to_json() for identity in self.files]]


def same_checkpoint(first: Checkpoint, second: Checkpoint) -> bool:
    """Whether two inputs are one checkpoint, so that what both need is read once: the same Hub
    commit and folder, or local shards that are the same files (same folder, or every shard the
    same device and inode: a link). Equal headers are required too. Two copies of one model in
    two places are not recognised (that would need their bytes)."""
    if first.header_sha256 != second.header_sha256:
        return False
    if first.location.startswith("hf://") or second.location.startswith("hf://"):
        return first.location == second.location
    files = []
    for checkpoint in (first, second):
        root = Path(checkpoint.location).resolve()
        files.append([((stat := (root / shard.file_name).stat()).st_dev, stat.st_ino) for shard in checkpoint.shards])
    return files[0] == files[1]


def describe_tying(checkpoint: Checkpoint) -> str:
    return "ties lm_head to the input embedding" if checkpoint.ties_embeddings else "stores a separate lm_head"


def ties_embeddings(config: dict, tensor_names: set[str]) -> bool:
    """Whether the model reuses its input embedding as the output layer.

    A checkpoint that stores `lm_head.weight` has its own output layer whatever the config says
    (transformers re-ties on load, but the merge must treat the stored tensor as a tensor). One
    that stores none is tied when its config says so or is silent, the transformers default.
    """
    if any(name in tensor_names for name in OUTPUT_EMBEDDING_NAMES):
        return False
    has_input_embedding = any(name.endswith(INPUT_EMBEDDING_SUFFIX) for name in tensor_names)
    return has_input_embedding and bool(config.get("tie_word_embeddings", True))


def combined_header_sha256(index_bytes: bytes | None, shards: list[SafetensorsHeader]) -> str:
    digest = hashlib.sha256(index_bytes or b"")
    for shard in shards:
        digest.update(shard.file_name.encode())
        digest.update(shard.sha256.encode())
    return digest.hexdigest()


def parse_index(raw: bytes, where: str) -> tuple[dict[str, str], list[str]]:
    """Validate a `model.safetensors.index.json`; return its weight map and the problems found.

    Shard names must stay inside the checkpoint: absolute paths and `..` are refused, because a
    crafted index must not make the tool read (or a later copy write) outside the directory.
    Names are normalized (`./model-00001-of-00002.safetensors` is that file), and names in a
    sub-folder are refused: outputs are written with the input's shard names, one folder deep.
    """
    problems: list[str] = []
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{where}: index is not valid JSON ({exc}); re-download or re-save the checkpoint") from None
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{where}: index has no 'weight_map' object; re-download or re-save the checkpoint")
    clean: dict[str, str] = {}
    for tensor_name, file_name in weight_map.items():
        if not isinstance(file_name, str) or not file_name:
            problems.append(f"{where}: tensor {tensor_name!r} maps to {file_name!r}, not a file name")
            continue
        parts = Path(file_name).parts
        if Path(file_name).is_absolute() or ".." in parts or "\\" in file_name:
            problems.append(
                f"{where}: tensor {tensor_name!r} points to {file_name!r}, outside the checkpoint directory; "
                "shard names must be relative names inside it"
            )
            continue
        normalized = posixpath.normpath(file_name)
        if "/" in normalized or normalized in (".", ""):
            problems.append(
                f"{where}: tensor {tensor_name!r} points to {file_name!r}, not a file directly in the checkpoint "
                "directory; move the shard next to the index and write its bare name in the weight_map"
            )
            continue
        clean[tensor_name] = normalized
    return clean, problems


def assemble_checkpoint(
    *,
    location: str,
    role: str,
    index_name: str | None,
    index_bytes: bytes | None,
    weight_map: dict[str, str],
    headers: dict[str, SafetensorsHeader],
    problems: list[str],
    side_files: tuple[str, ...],
    config: dict,
    files: tuple[FileIdentity, ...] = (),
) -> Checkpoint:
    """Cross-check an index against its shard headers and build the Checkpoint.

    Raises:
        PlanError: listing every problem of this checkpoint (including `problems` passed in).
    """
    tensors: dict[str, TensorInfo] = {}
    where = f"{role} ({location})"
    for file_name, header in headers.items():
        for tensor_name, info in header.tensors.items():
            mapped = weight_map.get(tensor_name)
            if index_name is not None and mapped != file_name:
                problems.append(
                    f"{where}: shard {file_name} holds tensor {tensor_name!r}, which the index "
                    + ("does not list" if mapped is None else f"places in {mapped}")
                )
                continue
            tensors[tensor_name] = info
    for tensor_name, file_name in weight_map.items():
        header = headers.get(file_name)
        if header is not None and tensor_name not in header.tensors:
            problems.append(f"{where}: the index places {tensor_name!r} in {file_name}, whose header lacks it")
    if problems:
        raise PlanError(f"{role} checkpoint {location} is unusable", problems)
    ordered = [headers[name] for name in dict.fromkeys(weight_map.values()) if name in headers]
    return Checkpoint(
        location=location,
        role=role,
        shards=tuple(ordered),
        tensors=tensors,
        side_files=side_files,
        config=config,
        ties_embeddings=ties_embeddings(config, set(tensors)),
        index_name=index_name,
        header_sha256=combined_header_sha256(index_bytes, ordered),
        files=files,
    )


def is_side_file(file_name: str) -> bool:
    return file_name not in OWN_FILES and not file_name.endswith(WEIGHT_SUFFIXES) and not file_name.endswith(".index.json")


def pickle_refusal(location: str, role: str, pickles: list[str]) -> PickleCheckpointError:
    listed = ", ".join(sorted(pickles)[:3])
    return PickleCheckpointError(
        f"{role} checkpoint {location} has only pickle weights ({listed}); pickles can run code when loaded, "
        "so they are refused: if you trust the file, convert it once with "
        f"`perta-stream convert --allow-pickle {location} --out DIR` and pass DIR instead"
    )


def resolve_layout(
    file_sizes: dict[str, int], read_file: Callable[[str], bytes], *, location: str, role: str
) -> tuple[str | None, bytes | None, dict[str, str], list[str]]:
    """Which weight files a checkpoint (a directory or a Hub repo folder) holds.

    Args:
        file_sizes: file name -> size of every file in the checkpoint.
        read_file: reads a whole (small) file of the checkpoint.

    Returns:
        (index name or None for a single file, index bytes, weight map, problems found in the index).

    Raises:
        CheckpointError: an index too large to be real.
        PickleCheckpointError: only pickle weights are present.
        CheckpointNotFoundError: no weights at all.
    """
    where = f"{role} ({location})"
    if INDEX_FILE_NAME in file_sizes:
        if file_sizes[INDEX_FILE_NAME] > _MAX_INDEX_BYTES:
            raise CheckpointError(f"{where}: {INDEX_FILE_NAME} is larger than {_MAX_INDEX_BYTES} bytes; it is corrupt")
        index_bytes = read_file(INDEX_FILE_NAME)
        weight_map, problems = parse_index(index_bytes, f"{where}/{INDEX_FILE_NAME}")
        return INDEX_FILE_NAME, index_bytes, weight_map, problems
    if SINGLE_FILE_NAME in file_sizes:
        return None, None, {}, []
    names = sorted(file_sizes)
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise pickle_refusal(location, role, pickles)
    others = [n for n in names if n.endswith(".safetensors")]
    hint = f" (found {', '.join(others[:3])} without {INDEX_FILE_NAME})" if others else ""
    raise CheckpointNotFoundError(
        f"{role} checkpoint {location} has no {SINGLE_FILE_NAME} and no {INDEX_FILE_NAME}{hint}; "
        "pass a model saved with save_pretrained (safetensors)"
    )


def open_local_checkpoint(path: str | os.PathLike, role: str) -> Checkpoint:
    """Read the index and every shard header of a local checkpoint directory (headers only).

    Args:
        path: a Hugging Face model directory (`model.safetensors` or sharded with an index).
        role: the checkpoint's role in the run, for messages.

    Raises:
        CheckpointNotFoundError: the directory, the index's shards or any weights are missing.
        PickleCheckpointError: only pickle weights are present.
        PlanError: every header and index problem of the checkpoint, at once.
    """
    checkpoint, folder = pin_local_checkpoint(path, role)
    folder.close()
    return checkpoint


def pin_local_checkpoint(path: str | os.PathLike, role: str, *, parent: PinnedFolder | None = None) -> tuple[Checkpoint, PinnedFolder]:
    """`open_local_checkpoint`, keeping the folder pinned for the run (sources/pinned_folder.py):
    its index, shards, config and side files are opened here and stay open for every later read.

    Args:
        parent: the pinned folder `path` is a sub-folder of (a statistics directory), which it
            is then opened from.

    Raises:
        as `open_local_checkpoint`.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointNotFoundError(f"{role} checkpoint {path} is not a directory; pass a Hugging Face model directory")
    folder = PinnedFolder(root, parent=parent, name=root.name) if parent is not None else PinnedFolder(root)
    try:
        return _read_checkpoint(folder, str(path), role), folder
    except BaseException:
        folder.close()
        raise


def _read_checkpoint(folder: PinnedFolder, location: str, role: str) -> Checkpoint:
    root = folder.root
    file_sizes = folder.listing()
    escaping = outside_links(root, file_sizes)
    names = sorted(name for name in file_sizes if name not in escaping)
    index_name, index_bytes, weight_map, problems = resolve_layout(
        {name: size for name, size in file_sizes.items() if name not in escaping},
        folder.read_file,
        location=location,
        role=role,
    )
    for name, target in sorted(escaping.items()):
        problems.append(
            f"{role} ({location}): {name} is a symbolic link to {target}, outside the checkpoint; files of a checkpoint "
            "are copied into outputs, so links out of it are refused: replace the link by the file itself, or remove it"
        )
    shard_names = list(dict.fromkeys(weight_map.values())) if index_name else [SINGLE_FILE_NAME]
    headers: dict[str, SafetensorsHeader] = {}
    for file_name in shard_names:
        shard_path = root / file_name
        if not shard_path.resolve().is_relative_to(root.resolve()):
            problems.append(f"{role} ({location}): shard {file_name} resolves outside the checkpoint directory")
            continue
        if file_name not in file_sizes:
            problems.append(f"{role} ({location}): the index names shard {file_name}, which does not exist; re-download it")
            continue
        try:
            headers[file_name] = parse_header(
                lambda offset, length, name=file_name: folder.read_at(name, offset, length), folder.identity(file_name).size_bytes, file_name
            )
        except HeaderError as exc:
            problems.append(f"{role} ({location}): {exc}")
    if index_name is None and SINGLE_FILE_NAME in headers:
        weight_map = {tensor_name: SINGLE_FILE_NAME for tensor_name in headers[SINGLE_FILE_NAME].tensors}
    config = {}
    if "config.json" in file_sizes and "config.json" not in escaping:
        config = parse_config(folder.read_file("config.json"), f"{role} ({location})", problems)
    side_files = tuple(n for n in names if is_side_file(n))
    folder.pin(side_files)  # copied into the output at its end: from the folder as it is now
    return assemble_checkpoint(
        location=location,
        role=role,
        index_name=index_name,
        index_bytes=index_bytes,
        weight_map=weight_map,
        headers=headers,
        problems=problems,
        side_files=side_files,
        config=config,
        files=tuple(folder.identity(name) for name in headers),
    )


def outside_links(root: Path, names: Iterable[str]) -> dict[str, str]:
    """name -> target of every file in `root` that is a symbolic link resolving outside `root`.

    Such a file is never read or copied: a side file linked to e.g. /proc/self/environ would put
    the environment (tokens included) into an output, and from there into a Hub commit.
    """
    inside = root.resolve()
    found: dict[str, str] = {}
    for name in names:
        path = root / name
        if path.is_symlink() and not path.resolve().is_relative_to(inside):
            found[name] = os.readlink(path)
    return found


def parse_config(raw: bytes, where: str, problems: list[str]) -> dict:
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        problems.append(f"{where}: config.json is not valid JSON ({exc})")
        return {}
    if not isinstance(config, dict):
        problems.append(f"{where}: config.json is not a JSON object")
        return {}
    return config
