"""Several processes under `torchrun` or `accelerate launch`, on PyTorch's own runtime.

Both launchers start one process per device and tell each where it stands through environment
variables (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `distributed()` reads them,
joins the process group (`torch.distributed`, NCCL for CUDA tensors, gloo for CPU tensors and
Python objects) and yields a `DistContext`; without a launcher it yields a single-process context
whose collectives return at once, so a pipeline has one code path for both.

    with distributed(device_type="cpu") as dist:
        mine = [s for s, owner in zip(shards, partition_by_size(sizes, dist.world_size)) if owner == dist.rank]
        ...
        records = dist.all_gather_objects(my_records)
        if dist.is_main:
            ...
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from perta_stream.errors import DistributedError

logger = logging.getLogger(__name__)

LAUNCH_ENV_KEYS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# How long a rank waits in a collective for the others. A merge rank waits while rank 0 copies
# side files and commits, a stats rank while the slowest rank finishes a layer: minutes at most.
TIMEOUT_ENV = "PERTA_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process stands in a launched run, as the launcher's environment says."""

    world_size: int
    rank: int
    local_rank: int
    master_addr: str
    master_port: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "LaunchInfo | None":
        """The launch this process is part of, or None when it runs alone (no WORLD_SIZE, or 1).

        Raises:
            DistributedError: WORLD_SIZE > 1 but the other variables are missing or inconsistent.
        """
        env = os.environ if environ is None else environ
        if int(_read_int(env, "WORLD_SIZE", default=1)) <= 1:
            return None
        missing = [key for key in LAUNCH_ENV_KEYS if not env.get(key)]
        if missing:
            raise DistributedError(
                f"WORLD_SIZE={env['WORLD_SIZE']} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; "
                "start several processes with `torchrun` or `accelerate launch`, which set all of them, or unset WORLD_SIZE"
            )
        info = cls(
            world_size=_read_int(env, "WORLD_SIZE"),
            rank=_read_int(env, "RANK"),
            local_rank=_read_int(env, "LOCAL_RANK"),
            master_addr=env["MASTER_ADDR"],
            master_port=_read_int(env, "MASTER_PORT"),
        )
        if not 0 <= info.rank < info.world_size or info.local_rank < 0:
            raise DistributedError(f"RANK={info.rank}, LOCAL_RANK={info.local_rank} do not fit WORLD_SIZE={info.world_size}; check the launcher's settings")
        return info


def _read_int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    text = env.get(key)
    if text is None or text == "":
        if default is None:
            raise DistributedError(f"{key} is not set; the launcher should set it")
        return default
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"{key}={text!r} is not an integer; check the launcher's settings") from None


class DistContext:
    """This process's rank in a run, and the few collectives the pipelines need.

    A context with world_size 1 is the plain single-process run: every collective returns
    immediately with the one value it was given.
    """

    def __init__(self, *, rank: int = 0, world_size: int = 1, local_rank: int = 0, backend: str | None = None):
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.backend = backend

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes shared files (indexes, records) and commits."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank got here."""
        if self.is_distributed:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_(self, tensor: Any) -> Any:
        """Sum `tensor` over all ranks, in place; returns it. CUDA tensors go over NCCL, CPU ones over gloo."""
        if self.is_distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable, small), in rank order, on every rank."""
        if not self.is_distributed:
            return [obj]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` in rank order on rank 0; None on the other ranks."""
        if not self.is_distributed:
            return [obj]
        import torch.distributed as dist

        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (the others' argument is ignored)."""
        if not self.is_distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def __repr__(self) -> str:
        return f"DistContext(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank}, backend={self.backend!r})"


SINGLE_PROCESS = DistContext()


@contextmanager
def distributed(*, device_type: str = "cpu", environ: Mapping[str, str] | None = None) -> Iterator[DistContext]:
    """Join the launcher's process group for the duration of the block (or run alone).

    Args:
        device_type: "cuda" when the run's tensors live on GPUs: NCCL carries CUDA tensors and
            this process uses the GPU numbered LOCAL_RANK; "cpu": gloo only.
        environ: the environment to read (default: os.environ).

    Yields:
        The single-process context when no launcher started this process; else this rank's
        context. A process group that is already initialized (by the caller, or an outer
        `distributed()` block) is reused and left for its owner to tear down.

    Raises:
        DistributedError: inconsistent launcher settings, or more local ranks than GPUs.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        yield DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)), backend=str(dist.get_backend()))
        return
    info = LaunchInfo.from_env(environ)
    if info is None:
        yield SINGLE_PROCESS
        return
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; install a standard PyTorch build to run under a launcher")
    backend = _backend_for(device_type, info)
    env = os.environ if environ is None else environ
    timeout_s = float(env.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)
    # env:// reads MASTER_ADDR/MASTER_PORT (or, under torchrun, the agent's store) itself.
    dist.init_process_group(
        backend=backend, init_method="env://", world_size=info.world_size, rank=info.rank, timeout=datetime.timedelta(seconds=timeout_s)
    )
    logger.info("rank %d of %d (local rank %d) joined the %s process group", info.rank, info.world_size, info.local_rank, backend)
    try:
        yield DistContext(rank=info.rank, world_size=info.world_size, local_rank=info.local_rank, backend=backend)
    finally:
        dist.destroy_process_group()


def _backend_for(device_type: str, info: LaunchInfo) -> str:
    if device_type != "cuda":
        return "gloo"
    import torch

    count = torch.cuda.device_count()
    if info.local_rank >= count:
        raise DistributedError(
            f"LOCAL_RANK={info.local_rank} but this node has {count} visible CUDA device(s); "
            f"start at most {count} processes per node (--nproc-per-node / --num_processes)"
        )
    # Each process owns one GPU; "cuda" then means this rank's GPU everywhere in the run.
    torch.cuda.set_device(info.local_rank)
    # CUDA tensors (the statistics) are summed over NCCL; CPU tensors and pickled Python objects
    # (shard records, counts) over gloo.
    return "cpu:gloo,cuda:nccl"


def partition_by_size(sizes: Sequence[int], world_size: int) -> list[int]:
    """Owner rank of each item, balancing the summed sizes: largest first, to the least loaded rank.

    Deterministic (ties go to the earlier item and the lower rank), so every rank computes the
    same partition without talking to the others. The largest rank load is at most the mean plus
    the largest single item.
    """
    if world_size < 1:
        raise DistributedError(f"world size {world_size} must be at least 1")
    loads = [0] * world_size
    owners = [0] * len(sizes)
    for position in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[position] = rank
        loads[rank] += sizes[position]
    return owners
