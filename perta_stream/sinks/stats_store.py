"""The statistics directory (METHOD.md section 6): one checkpoint per dataset and statistic.

Layout inside the output folder (written in `<out>.partial/`, renamed by the pipeline):
  perta_stats.json
  forget.grad/  forget.fisher/  retain.grad/  retain.fisher/      (only the kinds asked)
    model-0000k-of-0000N.safetensors   one shard per tensor group (embeddings, each decoder layer, head)
    model.safetensors.index.json       written last, once every shard is complete
Each sub-directory holds exactly the model checkpoint's tensor names and shapes, so any
safetensors or transformers tool reads it. Groups arrive in the engine's order (head, layers in
reverse, embeddings) and are written as they arrive, so no more than one group's statistics is
ever held for writing. A group's shards are written at the same time, each on its own thread;
each is hashed while it is written and reported to `on_shard_finished` (the resume record);
shards a resumed run already holds are not rewritten.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from perta_stream.dtypes import DTYPE_BYTES, torch_dtype
from perta_stream.errors import PertaStreamError, WriteError
from perta_stream.plan.stats_plan import ROUNDING_CHUNK_ELEMENTS
from perta_stream.sinks.shard_writer import ShardRecord, ShardWriter, TensorSpec
from perta_stream.sources.stats_dir import StatsRecord

STATS_RECORD_NAME = "perta_stats.json"
INDEX_NAME = "model.safetensors.index.json"
SHARD_METADATA = {"format": "pt"}


def stats_subdir(dataset: str, kind: str) -> str:
    """`forget.grad`, `retain.fisher`, ...: the sub-directory of one dataset's statistic."""
    return f"{dataset}.{kind}"


def shard_file_name(number: int, total: int) -> str:
    return f"model-{number:05d}-of-{total:05d}.safetensors"


class StatsStore:
    """Writes statistics groups as shards and, at the end, the indexes and the run record.

    Args:
        root: the (partial) output folder.
        datasets: dataset names (`forget`, `retain`).
        kinds: statistics to write (`grad`, `fisher`).
        groups: group -> tensor names, in shard order (empty groups get no shard).
        shapes: tensor_name -> shape.
        stats_dtype: `F32` or `BF16`.
        finished: shards already complete and verified (paths relative to `root`, as
            `shard_path` gives them): an interrupted run's, kept by a resume. Their groups are
            still handed over by the engine (it must recompute them to go on); they are not
            written again.
        on_shard_finished: called with each shard written (its name relative to `root`), once it
            is complete under its final name.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        datasets: Sequence[str],
        kinds: Sequence[str],
        groups: Mapping[str, Sequence[str]],
        shapes: Mapping[str, tuple[int, ...]],
        stats_dtype: str,
        finished: Collection[str] = (),
        on_shard_finished: Callable[[ShardRecord], None] | None = None,
    ):
        self.root = Path(root)
        self._finished = set(finished)
        self._on_shard_finished = on_shard_finished
        self._datasets = tuple(datasets)
        self._kinds = tuple(kinds)
        self._groups = {group: list(names) for group, names in groups.items() if names}
        self._shapes = dict(shapes)
        self._dtype = stats_dtype
        total = len(self._groups)
        self._shard_names = {group: shard_file_name(i, total) for i, group in enumerate(self._groups, start=1)}
        # Groups whose shards are all on disk: kept by a resume, or written by this run.
        self._written: set[tuple[str, str]] = {
            (dataset, group)
            for dataset in self._datasets
            for group in self._groups
            if all(self.shard_path(dataset, kind, group) in self._finished for kind in self._kinds)
        }
        self._received: set[tuple[str, str]] = set()
        self.bytes_written = 0
        self._lock = threading.Lock()
        for dataset in self._datasets:
            for kind in self._kinds:
                try:
                    (self.root / stats_subdir(dataset, kind)).mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise WriteError(f"cannot create {self.root / stats_subdir(dataset, kind)}: {exc.strerror or exc}") from exc

    @property
    def complete(self) -> bool:
        """Whether every group of every dataset is written (a resume may find nothing left to compute)."""
        return all((dataset, group) in self._written for dataset in self._datasets for group in self._groups)

    def has_group(self, dataset: str, group: str) -> bool:
        """Whether the group's shards of `dataset` are all written (always, for a group without tensors)."""
        return group not in self._groups or (dataset, group) in self._written

    def shard_path(self, dataset: str, kind: str, group: str) -> str:
        """The shard of one group of one dataset's statistic, relative to the root (`forget.grad/model-...`)."""
        return f"{stats_subdir(dataset, kind)}/{self._shard_names[group]}"

    def write_group(self, dataset: str, group: str, stats: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Write one group's statistics of one dataset: a shard in each kind's sub-directory.

        Args:
            stats: tensor_name -> {kind -> float32 tensor}, for exactly the group's tensors.

        Raises:
            PertaStreamError: the tensors or shapes differ from the group's (an engine bug).
            WriteError: the disk refused the write.
        """
        names = self._groups.get(group, [])
        if sorted(stats) != sorted(names):
            raise PertaStreamError(f"statistics of group {group!r} ({dataset}) hold {sorted(stats)}, expected {names}")
        if (dataset, group) in self._received:
            raise PertaStreamError(f"statistics of group {group!r} ({dataset}) were written twice")
        self._received.add((dataset, group))
        for tensor_name in names:
            for kind in self._kinds:
                tensor = stats[tensor_name][kind]
                if tuple(tensor.shape) != tuple(self._shapes[tensor_name]):
                    raise PertaStreamError(f"{tensor_name}: statistic shape {list(tensor.shape)}, expected {list(self._shapes[tensor_name])}")
        shards = [(kind, self.shard_path(dataset, kind, group)) for kind in self._kinds]
        # Kept shards (an interrupted run's, verified) would get the same bytes: not rewritten.
        shards = [(kind, relative) for kind, relative in shards if relative not in self._finished]
        if shards:
            # One thread per shard: sha256 runs at about 1 GB/s on one core, slower than a fast
            # disk, and hashlib and os.write release the GIL, so the shards of a group hash on
            # as many cores as there are statistics. Leaving the pool waits for every shard, so
            # none is still being written when an error is raised.
            with ThreadPoolExecutor(max_workers=len(shards), thread_name_prefix="perta-shard") as pool:
                futures = [pool.submit(self._write_shard, relative, names, stats, kind) for kind, relative in shards]
                for future in futures:
                    future.result()
        self._written.add((dataset, group))

    def _write_shard(self, relative: str, names: Sequence[str], stats: Mapping[str, Mapping[str, torch.Tensor]], kind: str) -> None:
        """Write one shard (from a worker thread); a failed shard leaves no file behind."""
        target = torch_dtype(self._dtype)
        writer = ShardWriter(self.root / relative, [TensorSpec(n, self._dtype, tuple(self._shapes[n])) for n in names], SHARD_METADATA)
        try:
            for tensor_name in names:
                flat = stats[tensor_name][kind].detach().reshape(-1)
                for start in range(0, flat.numel(), ROUNDING_CHUNK_ELEMENTS):
                    # Rounded to the storage dtype once (round-to-nearest-even for bfloat16), a
                    # chunk at a time, so rounding never holds a second copy of a whole tensor.
                    data = flat[start : start + ROUNDING_CHUNK_ELEMENTS].to(device="cpu", dtype=target).contiguous()
                    writer.write(memoryview(data.view(torch.uint8).numpy()))
            record = writer.finish()
        except BaseException:
            writer.abort()
            raise
        with self._lock:
            self.bytes_written += record.size_bytes
            self._finished.add(relative)
        if self._on_shard_finished is not None:
            self._on_shard_finished(ShardRecord(relative, record.size_bytes, record.sha256))

    def finish(self, record: StatsRecord) -> None:
        """Write every sub-directory's index, then `perta_stats.json`.

        Raises:
            PertaStreamError: a group was never written (the run is incomplete).
        """
        missing = [(d, g) for d in self._datasets for g in self._groups if (d, g) not in self._written]
        if missing:
            raise PertaStreamError(f"statistics are incomplete: groups never written: {missing[:5]}")
        element = DTYPE_BYTES[self._dtype]
        total_size = sum(element * _numel(self._shapes[n]) for names in self._groups.values() for n in names)
        weight_map = {n: self._shard_names[g] for g, names in self._groups.items() for n in names}
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        for dataset in self._datasets:
            for kind in self._kinds:
                _write_json(self.root / stats_subdir(dataset, kind) / INDEX_NAME, index)
        _write_json(self.root / STATS_RECORD_NAME, record.to_json())


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _write_json(path: Path, document: Mapping[str, object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise WriteError(f"{path}: write failed ({exc.strerror or exc})") from exc
