"""Several processes: torchrun / accelerate launch (gloo, CPU) give the single-process results.

The end-to-end tests start two ranks with torch's own launcher, the way a user does
(`python -m torch.distributed.run --nproc-per-node 2 -m perta_stream.cli ...`; one merge test
with `accelerate launch`), and compare the outputs with a one-process run of the same command
(merge: byte for byte; stats: up to float32 summation order) and with the dense references.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merge_fixtures import make_triplet, output_bits, reference_merge, write_stats
from perta_stream.distributed import SINGLE_PROCESS, DistContext, LaunchInfo, distributed, partition_by_size
from perta_stream.errors import DistributedError, WriteError
from perta_stream.sinks.model_output import RESUME_RECORD_NAME, LocalModelOutput, rank_record_name
from perta_stream.sinks.shard_writer import TensorSpec

# Fields of perta_merge.json that describe one run's timing and memory, not its result (the chunk
# size follows the memory budget left over the process's measured baseline RSS).
VOLATILE_RECORD_KEYS = {"elapsed_s", "read_gb_per_s", "peak_rss_bytes", "baseline_rss_bytes", "added_peak_rss_bytes", "chunk_elements"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _cli(args: list[str], *, nproc: int, launcher: str = "torchrun", timeout_s: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PERTA_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if nproc == 1:
        command = [sys.executable, "-m", "perta_stream.cli", *args]
    elif launcher == "torchrun":
        start = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(_free_port())]
        command = [*start, "-m", "perta_stream.cli", *args]
    else:
        # accelerate launch runs torch's launcher underneath; --multi_gpu selects it (on CPUs too).
        start = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1"]
        start += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
        command = [*start, "-m", "perta_stream.cli", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _assert_same_output(single: Path, launched: Path) -> None:
    one, two = _files(single), _files(launched)
    assert sorted(one) == sorted(two)
    for name in one:
        if name == "perta_merge.json":
            record_one, record_two = json.loads(one[name]), json.loads(two[name])
            for key in VOLATILE_RECORD_KEYS:
                record_one.pop(key), record_two.pop(key)
            assert record_one == record_two
        else:
            assert one[name] == two[name], f"{name} differs between one process and two"


# ------------------------------------------------------------------ end to end, two ranks
@pytest.fixture(scope="module")
def triplet(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_models")
    theta0, full, fgt = make_triplet(root, tied=True)
    stats = write_stats(root / "stats", theta0, kinds=("fisher",))
    return theta0, full, fgt, stats


def test_merge_under_torchrun_is_byte_identical_to_one_process(triplet, tmp_path):
    theta0, full, fgt, stats = triplet
    common = ["merge", "--theta0", str(theta0), "--full", str(full), "--fgt", str(fgt), "--method", "fisher", "--stats", str(stats)]
    # Two alphas: two outputs written in one pass, each partitioned the same way.
    args = [*common, "--alpha", "0.5,1", "--max-shard-size", "12KB"]
    _cli([*args, "-q", "--out", str(tmp_path / "one-{alpha}")], nproc=1)
    launched_run = _cli([*args, "-v", "--out", str(tmp_path / "two-{alpha}")], nproc=2)
    # Both ranks wrote a share of the shards (-v logs each rank's share).
    shares = [int(n) for n in re.findall(r"rank [01] of 2 writes (\d+) of \d+ shards", launched_run.stderr)]
    assert len(shares) == 2 and min(shares) > 0, launched_run.stderr
    for alpha in ("0.5", "1"):
        single, launched = tmp_path / f"one-{alpha}", tmp_path / f"two-{alpha}"
        assert len(list(launched.glob("*.safetensors"))) >= 4  # enough shards for both ranks
        _assert_same_output(single, launched)
        assert not list(launched.glob(".perta_resume*")) and not (tmp_path / f"two-{alpha}.partial").exists()
        # And both equal the dense reference (a test of the numbers, not only of the agreement).
        expected = reference_merge(theta0, full, fgt, method="fisher", alpha=float(alpha), stats=stats)
        merged = output_bits(launched)
        assert sorted(merged) == sorted(expected)
        for tensor_name, bits in expected.items():
            np.testing.assert_array_equal(merged[tensor_name], bits, err_msg=tensor_name)


def test_merge_under_accelerate_launch_is_byte_identical_to_one_process(triplet, tmp_path):
    theta0, full, fgt, _ = triplet
    args = ["merge", "--theta0", str(theta0), "--full", str(full), "--fgt", str(fgt), "--method", "uniform", "--alpha", "2"]
    _cli([*args, "-q", "--out", str(tmp_path / "one")], nproc=1)
    launched_run = _cli([*args, "-v", "--out", str(tmp_path / "two")], nproc=2, launcher="accelerate")
    assert len(re.findall(r"rank [01] of 2 writes [1-9]\d* of \d+ shards", launched_run.stderr)) == 2, launched_run.stderr
    _assert_same_output(tmp_path / "one", tmp_path / "two")
    expected = reference_merge(theta0, full, fgt, method="uniform", alpha=2.0)
    merged = output_bits(tmp_path / "two")
    for tensor_name, bits in expected.items():
        np.testing.assert_array_equal(merged[tensor_name], bits, err_msg=tensor_name)


def test_two_ranks_resume_a_partial_output_left_by_several_ranks(triplet, tmp_path, monkeypatch):
    from perta_stream.cli import main
    from perta_stream.sinks import output_dir

    theta0, full, fgt, _ = triplet
    args = ["merge", "--theta0", str(theta0), "--full", str(full), "--fgt", str(fgt), "--method", "tv", "-q"]
    _cli([*args, "--out", str(tmp_path / "reference")], nproc=1)
    # A run that got as far as the commit, in this process: every shard and a valid resume record.
    out = tmp_path / "out"

    def interrupted(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(output_dir.AtomicOutputDir, "commit", interrupted)
        assert main([*args, "--out", str(out)]) == 130
    partial = tmp_path / "out.partial"
    record = json.loads((partial / RESUME_RECORD_NAME).read_text())
    shards = sorted(record["finished_shards"])
    assert len(shards) >= 6
    # Make it the state of a 3-rank run stopped mid-way: rank 0 finished shards[0], rank 2
    # finished shards[1] (in its own record), the rest were never finished.
    for name in shards[2:]:
        (partial / name).unlink()
    entries = record["finished_shards"]
    (partial / RESUME_RECORD_NAME).write_text(json.dumps({"fingerprint": record["fingerprint"], "finished_shards": {shards[0]: entries[shards[0]]}}))
    (partial / rank_record_name(2)).write_text(json.dumps({"fingerprint": record["fingerprint"], "finished_shards": {shards[1]: entries[shards[1]]}}))
    kept = {name: (partial / name).stat().st_ino for name in shards[:2]}
    _cli([*args, "--out", str(out), "--resume"], nproc=2)
    assert not partial.exists() and not list(out.glob(".perta_resume*"))
    _assert_same_output(tmp_path / "reference", out)
    assert {name: (out / name).stat().st_ino for name in kept} == kept  # verified and kept, not redone


COLLECTIVES_SCRIPT = """
import json, pathlib, sys, torch
from perta_stream.distributed import distributed
with distributed(device_type="cpu") as dist:
    total = dist.all_reduce_(torch.tensor([dist.rank + 1.0, 10.0 * dist.rank]))
    everyone = dist.all_gather_objects({"rank": dist.rank})
    at_zero = dist.gather_objects(dist.rank * 100)
    told = dist.broadcast_object("from rank 0" if dist.is_main else "ignored")
    dist.barrier()
    report = {"rank": dist.rank, "world": dist.world_size, "backend": dist.backend, "total": total.tolist(),
              "everyone": everyone, "at_zero": at_zero, "told": told}
    # One file per rank: two ranks printing to one pipe may interleave their lines.
    (pathlib.Path(sys.argv[1]) / f"rank-{dist.rank}.json").write_text(json.dumps(report))
"""


def test_collectives_of_two_gloo_ranks(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()), str(script), str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    reports = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1]
    for report in reports:
        assert report["world"] == 2 and report["backend"] == "gloo"
        assert report["total"] == [3.0, 10.0]
        assert report["everyone"] == [{"rank": 0}, {"rank": 1}]
        assert report["told"] == "from rank 0"
    assert reports[0]["at_zero"] == [0, 100] and reports[1]["at_zero"] is None


# ------------------------------------------------------------------ statistics, two ranks
STATS_VOLATILE_KEYS = {"elapsed_s", "peak_rss_bytes"}


@pytest.fixture(scope="module")
def stats_inputs(tmp_path_factory):
    from stats_fixtures import save_tiny_model, write_data

    root = tmp_path_factory.mktemp("dist_stats")
    forget, retain = write_data(root / "data")
    return save_tiny_model(root / "models", "llama"), forget, retain


def _stats_args(stats_inputs, device: str) -> list[str]:
    model, forget, retain = stats_inputs
    return ["stats", "--model", str(model), "--forget", str(forget), "--retain", str(retain), "--device", device, "--batch-size", "2"]


def _assert_shares(run: subprocess.CompletedProcess) -> None:
    """Both ranks swept a part of each dataset, and the parts add up to it (-v logs them)."""
    shares = re.findall(r"rank [01] of 2 sweeps (\d+) forget samples, (\d+) retain samples", run.stderr)
    assert len(shares) == 2 and all(int(f) > 0 and int(r) > 0 for f, r in shares), run.stderr
    assert sum(int(f) for f, _ in shares) == 5 and sum(int(r) for _, r in shares) == 7


def _same_record(one: Path, two: Path) -> None:
    record_one, record_two = (json.loads((d / "perta_stats.json").read_text()) for d in (one, two))
    for key in STATS_VOLATILE_KEYS:
        record_one.pop(key), record_two.pop(key)
    assert record_one == record_two  # sample counts are the whole datasets', not a rank's share


def test_stats_under_torchrun_equal_one_process(stats_inputs, tmp_path):
    from stats_fixtures import load_stats_dir, reference_stats, relative_error

    model, forget, retain = stats_inputs
    # Tied embeddings and a padding_idx (the tied head's sums are summed over the ranks exactly
    # once); 5 forget and 7 retain samples, so the ranks get unequal shares.
    args = _stats_args(stats_inputs, "cpu")
    _cli([*args, "-q", "--out", str(tmp_path / "one")], nproc=1)
    _assert_shares(_cli([*args, "-v", "--out", str(tmp_path / "two")], nproc=2))
    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    _same_record(one, two)
    for dataset, data in (("forget", forget), ("retain", retain)):
        reference = reference_stats(model, data)
        for kind in ("grad", "fisher"):
            single, launched = load_stats_dir(one / f"{dataset}.{kind}"), load_stats_dir(two / f"{dataset}.{kind}")
            assert sorted(single) == sorted(launched)
            for tensor_name, tensor in single.items():
                # Equal up to the order of float32 additions, bounded by what is summed, not by the
                # sum: the mean gradient can cancel to ~0 while its terms do not. sqrt(fisher) is
                # the root mean square of the per-sample gradients, >= the mean of their magnitudes.
                summed = reference[tensor_name]["fisher"].sqrt() if kind == "grad" else reference[tensor_name]["fisher"]
                difference = float((launched[tensor_name].double() - tensor.double()).norm())
                assert difference <= 1e-5 * float(summed.double().norm()), (dataset, kind, tensor_name, difference)
                # And both equal the dense reference.
                assert relative_error(launched[tensor_name], reference[tensor_name][kind]) <= 1e-5, (dataset, kind, tensor_name)


@pytest.mark.gpu
def test_stats_under_torchrun_on_two_gpus_equal_one_gpu(stats_inputs, tmp_path):
    from stats_fixtures import load_stats_dir, relative_error

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices (NCCL between them)")
    args = _stats_args(stats_inputs, "cuda")
    _cli([*args, "-q", "--out", str(tmp_path / "one")], nproc=1)
    _assert_shares(_cli([*args, "-v", "--out", str(tmp_path / "two")], nproc=2))
    _same_record(tmp_path / "one", tmp_path / "two")
    for stat in ("forget.grad", "forget.fisher", "retain.grad", "retain.fisher"):
        single, launched = load_stats_dir(tmp_path / "one" / stat), load_stats_dir(tmp_path / "two" / stat)
        for tensor_name, tensor in single.items():
            # bfloat16 layers on the GPU: the ranks' batches pad differently, so per-sample
            # gradients agree to bfloat16 precision, not bit for bit.
            assert relative_error(launched[tensor_name], tensor) <= 2e-2, (stat, tensor_name)


# ------------------------------------------------------------------ pieces, in one process
def test_launch_info_from_env():
    assert LaunchInfo.from_env({}) is None
    assert LaunchInfo.from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    env = {"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    assert LaunchInfo.from_env(env) == LaunchInfo(world_size=4, rank=2, local_rank=0, master_addr="node0", master_port=29500)
    with pytest.raises(DistributedError, match="MASTER_ADDR"):
        LaunchInfo.from_env({**env, "MASTER_ADDR": ""})
    with pytest.raises(DistributedError, match="RANK=4"):
        LaunchInfo.from_env({**env, "RANK": "4"})
    with pytest.raises(DistributedError, match="not an integer"):
        LaunchInfo.from_env({**env, "MASTER_PORT": "http"})


def test_single_process_context_without_launcher():
    import torch

    with distributed(environ={}) as dist:
        assert dist is SINGLE_PROCESS and dist.is_main and not dist.is_distributed
        tensor = torch.ones(3)
        assert dist.all_reduce_(tensor) is tensor and tensor.tolist() == [1.0, 1.0, 1.0]
        assert dist.all_gather_objects("x") == ["x"] and dist.gather_objects(1) == [1] and dist.broadcast_object(5) == 5
        dist.barrier()


def test_more_local_ranks_than_gpus_is_refused(monkeypatch):
    import torch

    from perta_stream import distributed as distributed_module

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with pytest.raises(DistributedError, match="LOCAL_RANK=1 but this node has 1 visible CUDA device"):
        with distributed_module.distributed(device_type="cuda", environ=env):
            pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10**9), max_size=40), st.integers(min_value=1, max_value=9))
def test_partition_by_size_is_balanced_and_deterministic(sizes, world_size):
    owners = partition_by_size(sizes, world_size)
    assert len(owners) == len(sizes) and all(0 <= owner < world_size for owner in owners)
    assert owners == partition_by_size(list(sizes), world_size)
    loads = [sum(size for size, owner in zip(sizes, owners) if owner == rank) for rank in range(world_size)]
    # Greedy largest-first: no rank carries more than the even share plus one item.
    assert max(loads) <= sum(sizes) / world_size + max(sizes, default=0)


def test_partition_by_size_example():
    # Largest first, each to the least loaded rank (ties to rank 0): 9 -> 0, 5 -> 1, 4 -> 1,
    # 3 -> 0, 2 -> 1, 1 -> 1, giving 9+3 and 5+4+2+1: 12 each.
    assert partition_by_size([5, 9, 1, 4, 3, 2], 2) == [1, 0, 1, 1, 0, 1]
    assert partition_by_size([], 3) == []
    with pytest.raises(DistributedError):
        partition_by_size([1], 0)


def _write_shard(output: LocalModelOutput, file_name: str, payload: bytes) -> None:
    writer = output.begin_shard(file_name, [TensorSpec("w", "U8", (len(payload),))])
    writer.write(memoryview(payload))
    output.shard_finished(writer.finish())


def test_ranks_share_one_partial_folder_and_resume_with_any_world_size(tmp_path):
    out = tmp_path / "out"
    rank0 = LocalModelOutput(out, overwrite=False, resume=False, rank=0)
    rank1 = LocalModelOutput(out, overwrite=False, resume=False, rank=1)
    assert rank0.open("fp") == {}
    assert rank1.open("fp") == {}
    _write_shard(rank0, "a.safetensors", b"aaaa")
    _write_shard(rank1, "b.safetensors", b"bbbbbbbb")
    # Each rank keeps its own record: no file has two writers.
    assert (rank0.partial / RESUME_RECORD_NAME).is_file() and (rank1.partial / rank_record_name(1)).is_file()
    with pytest.raises(WriteError, match="only rank 0"):
        rank1.commit()
    # Interrupted here: the processes end (and with them rank 0's lock on the folder). A resume
    # (in one process) finds both ranks' shards, re-hashed.
    rank0.close()
    rank1.close()
    resumed = LocalModelOutput(out, overwrite=False, resume=True)
    finished = resumed.open("fp")
    assert sorted(finished) == ["a.safetensors", "b.safetensors"]
    assert finished["b.safetensors"].sha256 == rank1.finished_shards()["b.safetensors"].sha256
    assert not (resumed.partial / rank_record_name(1)).exists()


def test_rank_records_are_adopted_by_rank_zero(tmp_path):
    out = tmp_path / "out"
    rank0 = LocalModelOutput(out, overwrite=False, resume=False, rank=0)
    rank2 = LocalModelOutput(out, overwrite=False, resume=False, rank=2)
    rank0.open("fp"), rank2.open("fp")
    _write_shard(rank2, "c.safetensors", b"cc")
    rank0.add_finished(list(rank2.finished_shards().values()))
    assert sorted(rank0.finished_shards()) == ["c.safetensors"]
    assert not (rank0.partial / rank_record_name(2)).exists()
    record = json.loads((rank0.partial / RESUME_RECORD_NAME).read_text())
    assert list(record["finished_shards"]) == ["c.safetensors"]
    assert Path(rank0.commit()) == out and not list(out.glob(".perta_resume*"))


def test_joining_rank_needs_the_folder_rank_zero_created(tmp_path):
    with pytest.raises(WriteError, match="every node mounts"):
        LocalModelOutput(tmp_path / "out", overwrite=False, resume=False, rank=1).open("fp")


def test_hub_output_under_a_launcher_is_refused_before_anything_is_written(triplet, tmp_path, monkeypatch):
    from contextlib import contextmanager

    from perta_stream.config.merge import MergeConfig
    from perta_stream.errors import UsageError
    from perta_stream.pipelines import merge as merge_pipeline

    @contextmanager
    def two_ranks(**_):
        yield DistContext(rank=0, world_size=2)

    monkeypatch.setattr(merge_pipeline, "distributed", two_ranks)
    theta0, full, fgt, _ = triplet
    config = MergeConfig(theta0=str(theta0), full=str(full), fgt=str(fgt), out="hf://org/merged")
    with pytest.raises(UsageError, match="pushed by one process"):
        merge_pipeline.run_merge(config)


class _FakeGroup(DistContext):
    """Rank 0 of two, with the other rank's reports given by the test."""

    def __init__(self, other_report: dict):
        super().__init__(rank=0, world_size=2)
        self._other = other_report

    def all_gather_objects(self, obj):
        return [obj, self._other]


def test_a_failed_rank_is_reported_by_every_rank(tmp_path):
    from perta_stream.pipelines.merge import _collect_shards

    output = LocalModelOutput(tmp_path / "out", overwrite=False, resume=False)
    output.open("fp")
    group = _FakeGroup({"error": "WriteError: disk full", "shards": [[]]})
    with pytest.raises(DistributedError, match="rank 1 of 2 failed.*disk full.*--resume"):
        _collect_shards([output], None, group)
    # The failing rank itself raises its own error after reporting it.
    own = WriteError("no space")
    with pytest.raises(WriteError, match="no space"):
        _collect_shards([output], own, _FakeGroup({"error": None, "shards": [[]]}))
