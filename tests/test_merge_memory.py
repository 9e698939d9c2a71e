"""The memory budget: what a merge adds to the process stays under --max-memory, whatever the
process held before (torch's CUDA build alone holds ~510 MiB) and whatever the checkpoint size.

Every measurement runs in a child process, read from the child's own VmHWM (wait4's ru_maxrss
would include this test process's RSS, which Linux carries into a child across exec).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from perta_stream.config.merge import DEFAULT_MAX_MEMORY_BYTES

ALLOWANCE_MIB = 150
SHARD_ELEMENTS = 100 * 2**20  # 200 MiB of bf16 per shard
SHARDS = 4  # 800 MiB per checkpoint: each input alone is 5 times the allowance, all three 16 times
# What the child holds before it merges: more than the CUDA build's import (~510 MiB), and more
# than the default budget, so a budget that counted the whole process could not pass.
HELD_MIB = 640

# A child that holds HELD_MIB of its own tensors, then merges; it prints its RSS just before the
# merge and its high-water mark after it. {call} is the merge (the API, or the command line).
_HOLD_THEN_MERGE = """
import json, sys, psutil, torch
held = torch.ones({held_mib} * 2**20 // 4)  # written, so every page is resident
import perta_stream as ps, perta_stream.cli
before = psutil.Process().memory_info().rss
status = {call}
high_water = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"status": status, "rss_before": before, "high_water": high_water, "held": float(held[-1])}}))
"""


def _write_big_checkpoint(path: Path, seed: int, *, shards: int = SHARDS, shard_elements: int = SHARD_ELEMENTS) -> None:
    path.mkdir()
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for number in range(1, shards + 1):
        file_name = f"model-{number:05d}-of-{shards:05d}.safetensors"
        # One tensor per shard, far larger than any chunk, so it is sliced.
        tensor_name = f"model.layers.{number}.mlp.weight"
        # Values repeat with a 1 Mi-element period: generating hundreds of MiB of fresh randoms
        # would dominate the test, and the merge's memory use does not depend on the values.
        period = torch.randn(2**20, generator=generator).to(torch.bfloat16)
        values = period.repeat(shard_elements // 2**20).view(shard_elements // 1024, 1024)
        save_file({tensor_name: values}, str(path / file_name), metadata={"format": "pt"})
        weight_map[tensor_name] = file_name
        del values
    index = {"metadata": {"total_size": shards * shard_elements * 2}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def _vm_hwm_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _env_without_budget() -> dict[str, str]:
    """The child's environment with the default budget (no PERTA_MAX_MEMORY)."""
    return {key: value for key, value in os.environ.items() if key != "PERTA_MAX_MEMORY"}


def _hold_then_merge(call: str) -> dict:
    script = _HOLD_THEN_MERGE.format(held_mib=HELD_MIB, call=call)
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env_without_budget(), timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_default_merge_from_python_adds_to_what_the_process_holds(tmp_path):
    from merge_fixtures import make_triplet

    theta0, full, fgt = make_triplet(tmp_path / "m", tied=True)
    out = tmp_path / "out"
    measured = _hold_then_merge(f"ps.merge(theta0={str(theta0)!r}, full={str(full)!r}, fgt={str(fgt)!r}, out={str(out)!r}) and 0")
    assert measured["rss_before"] >= HELD_MIB * 2**20
    added = measured["high_water"] - measured["rss_before"]
    assert 0 <= added <= DEFAULT_MAX_MEMORY_BYTES, f"the merge added {added / 2**20:.0f} MiB"
    record = json.loads((out / "perta_merge.json").read_text())
    assert record["max_memory_bytes"] == DEFAULT_MAX_MEMORY_BYTES
    assert record["baseline_rss_bytes"] >= HELD_MIB * 2**20
    assert 0 <= record["added_peak_rss_bytes"] <= DEFAULT_MAX_MEMORY_BYTES


def test_command_line_merge_budget_excludes_what_the_process_held(tmp_path):
    """`perta-stream merge` in a process that holds 640 MiB, on inputs 2.25 times a 128 MiB budget."""
    budget_mib = 128
    for seed, name in enumerate(("theta0", "full", "fgt")):
        _write_big_checkpoint(tmp_path / name, seed, shards=3, shard_elements=16 * 2**20)  # 96 MiB each
    out = tmp_path / "out"
    args = ["merge", "-q", "--theta0", str(tmp_path / "theta0"), "--full", str(tmp_path / "full"), "--fgt", str(tmp_path / "fgt")]
    args += ["--out", str(out), "--max-memory", f"{budget_mib}MiB"]
    measured = _hold_then_merge(f"perta_stream.cli.main({args!r})")
    assert measured["status"] == 0
    assert measured["rss_before"] >= HELD_MIB * 2**20
    added = measured["high_water"] - measured["rss_before"]
    assert 0 <= added <= budget_mib * 2**20, f"the merge added {added / 2**20:.0f} MiB to a budget of {budget_mib} MiB"
    record = json.loads((out / "perta_merge.json").read_text())
    assert record["max_memory_bytes"] == budget_mib * 2**20
    assert record["chunk_elements"] < 16 * 2**20  # the budget, not the tensor, sized the chunks
    assert 0 < record["added_peak_rss_bytes"] <= budget_mib * 2**20


@pytest.mark.slow
def test_added_peak_stays_under_budget_on_inputs_larger_than_it(tmp_path):
    budget_mib = ALLOWANCE_MIB
    for seed, name in enumerate(("theta0", "full", "fgt")):
        _write_big_checkpoint(tmp_path / name, seed)
    command = [
        sys.executable, "-m", "perta_stream.cli", "merge", "-q",
        "--theta0", str(tmp_path / "theta0"), "--full", str(tmp_path / "full"), "--fgt", str(tmp_path / "fgt"),
        "--out", str(tmp_path / "out"), "--max-memory", f"{budget_mib}MiB",
    ]
    # The child's own high-water mark, read from outside while it runs.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env_without_budget())
    peak_rss_bytes = 0
    while process.poll() is None:
        peak_rss_bytes = max(peak_rss_bytes, _vm_hwm_bytes(process.pid))
        time.sleep(0.05)
    stderr = process.stderr.read().decode()
    assert process.returncode == 0, stderr
    input_bytes = 3 * SHARDS * SHARD_ELEMENTS * 2
    assert input_bytes >= 16 * ALLOWANCE_MIB * 2**20
    record = json.loads((tmp_path / "out" / "perta_merge.json").read_text())
    # What the merge added to the process it started in (torch and the CLI imported).
    added = peak_rss_bytes - record["baseline_rss_bytes"]
    assert added <= budget_mib * 2**20, f"added {added / 2**20:.0f} MiB, budget {budget_mib} MiB"
    assert record["max_memory_bytes"] == budget_mib * 2**20
    assert 0 < record["added_peak_rss_bytes"] <= budget_mib * 2**20


def test_budget_too_small_for_buffers_is_refused_before_writing(tmp_path, monkeypatch):
    from merge_fixtures import make_triplet

    import perta_stream.plan.merge_plan as merge_plan
    from perta_stream.config.merge import MergeConfig
    from perta_stream.errors import PlanError
    from perta_stream.pipelines.merge import run_merge

    theta0, full, fgt = make_triplet(tmp_path / "m", tied=True)
    # The smallest budget the options accept (64 MiB) holds the margin and the smallest buffers;
    # a larger margin leaves a 64 MiB budget too little room.
    monkeypatch.setattr(merge_plan, "RUNTIME_MARGIN_BYTES", 63 * 2**20)
    with pytest.raises(PlanError, match="--max-memory 64 MiB leaves too little room"):
        run_merge(MergeConfig(theta0=str(theta0), full=str(full), fgt=str(fgt), out=str(tmp_path / "out"), max_memory_bytes=64 * 2**20))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_dry_run_reports_the_baseline_and_the_budget(tmp_path):
    from merge_fixtures import make_triplet

    from perta_stream.config.merge import MergeConfig
    from perta_stream.memory import current_rss_bytes
    from perta_stream.pipelines.merge import run_merge

    theta0, full, fgt = make_triplet(tmp_path / "m", tied=True)
    held = current_rss_bytes()
    result = run_merge(MergeConfig(theta0=str(theta0), full=str(full), fgt=str(fgt), out=str(tmp_path / "out"), dry_run=True))
    line = next(line for line in result.plan_text.splitlines() if "memory:" in line)
    assert "at the start (baseline)" in line and "of a 512.00 MiB budget (--max-memory)" in line
    assert result.baseline_rss_bytes >= held * 0.9
