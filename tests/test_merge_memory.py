"""The peak-RSS budget holds on checkpoints much larger than the budget (measured in a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

# The budget covers the whole process, and what the imports alone take differs between builds
# of torch (220-280 MiB for the CPU build here; a CUDA build loads far larger libraries). So the
# budget is that baseline, measured in a fresh interpreter, plus an allowance for the merge.
ALLOWANCE_MIB = 150
SHARD_ELEMENTS = 100 * 2**20  # 200 MiB of bf16 per shard
SHARDS = 4  # 800 MiB per checkpoint: each input alone is 5 times the allowance, all three 16 times
_IMPORTS_PEAK = (
    "import perta_stream.cli, perta_stream.pipelines.merge, torch\n"
    "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')))"
)


def _write_big_checkpoint(path: Path, seed: int) -> None:
    path.mkdir()
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for number in range(1, SHARDS + 1):
        file_name = f"model-{number:05d}-of-{SHARDS:05d}.safetensors"
        # One tensor per shard, far larger than any chunk, so it is sliced.
        tensor_name = f"model.layers.{number}.mlp.weight"
        # Values repeat with a 1 Mi-element period: generating 600 MiB of fresh randoms would
        # dominate the test, and the merge's memory use does not depend on the values.
        period = torch.randn(2**20, generator=generator).to(torch.bfloat16)
        values = period.repeat(SHARD_ELEMENTS // 2**20).view(SHARD_ELEMENTS // 1024, 1024)
        save_file({tensor_name: values}, str(path / file_name), metadata={"format": "pt"})
        weight_map[tensor_name] = file_name
        del values
    index = {"metadata": {"total_size": SHARDS * SHARD_ELEMENTS * 2}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def _vm_hwm_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _imports_peak_rss_bytes() -> int:
    """VmHWM of a fresh interpreter that imported what the merge command imports (VmHWM starts
    afresh at exec, unlike ru_maxrss)."""
    completed = subprocess.run([sys.executable, "-c", _IMPORTS_PEAK], capture_output=True, text=True, check=True)
    return int(completed.stdout.strip()) * 1024


@pytest.mark.slow
def test_peak_rss_stays_under_budget_on_inputs_larger_than_it(tmp_path):
    budget_mib = _imports_peak_rss_bytes() // 2**20 + ALLOWANCE_MIB
    for seed, name in enumerate(("theta0", "full", "fgt")):
        _write_big_checkpoint(tmp_path / name, seed)
    command = [
        sys.executable, "-m", "perta_stream.cli", "merge", "-q",
        "--theta0", str(tmp_path / "theta0"), "--full", str(tmp_path / "full"), "--fgt", str(tmp_path / "fgt"),
        "--out", str(tmp_path / "out"), "--max-memory", f"{budget_mib}MiB",
    ]
    # The child's own high-water mark, read from outside while it runs. (wait4's ru_maxrss would
    # include this test process's RSS, which Linux carries into a child across exec.)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak_rss_bytes = 0
    while process.poll() is None:
        peak_rss_bytes = max(peak_rss_bytes, _vm_hwm_bytes(process.pid))
        time.sleep(0.05)
    stderr = process.stderr.read().decode()
    assert process.returncode == 0, stderr
    input_bytes = 3 * SHARDS * SHARD_ELEMENTS * 2
    assert input_bytes >= 16 * ALLOWANCE_MIB * 2**20
    assert peak_rss_bytes <= budget_mib * 2**20, f"peak RSS {peak_rss_bytes / 2**20:.0f} MiB, budget {budget_mib} MiB"
    record = json.loads((tmp_path / "out" / "perta_merge.json").read_text())
    assert record["max_memory_bytes"] == budget_mib * 2**20
    assert 0 < record["peak_rss_bytes"] <= budget_mib * 2**20


def test_budget_too_small_for_buffers_is_refused_before_writing(tmp_path):
    from merge_fixtures import make_triplet

    from perta_stream.config.merge import MergeConfig
    from perta_stream.errors import PlanError
    from perta_stream.pipelines.merge import run_merge

    theta0, full, fgt = make_triplet(tmp_path / "m", tied=True)
    with pytest.raises(PlanError, match="--max-memory"):
        run_merge(MergeConfig(theta0=str(theta0), full=str(full), fgt=str(fgt), out=str(tmp_path / "out"), max_memory_bytes=100 * 2**20))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
