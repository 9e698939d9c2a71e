"""inspect's peak RSS stays under its budget on inputs much larger than it (measured in a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

# --max-memory is what inspect adds to the process: the peak may reach the baseline of a fresh
# interpreter that imported what the command imports (here also matplotlib, which draws the plots
# in the same process) plus the budget, which holds inspect's buffers and rank sample.
BUDGET_MIB = 150
SHARD_ELEMENTS = 100 * 2**20  # 200 MiB of bf16 per shard
SHARDS = 3  # 600 MiB per input: each of the four is larger than the whole budget
_IMPORTS_PEAK = (
    "import perta_stream.cli, perta_stream.pipelines.inspect, torch\n"
    "from perta_stream.sinks.plot import pyplot; pyplot()\n"
    "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')))"
)


def _write_big_checkpoint(path: Path, seed: int, *, non_negative: bool = False) -> None:
    path.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for number in range(1, SHARDS + 1):
        file_name = f"model-{number:05d}-of-{SHARDS:05d}.safetensors"
        tensor_name = f"model.layers.{number}.mlp.up_proj.weight"
        # A 1 Mi-element period: fresh randoms for 300 M elements would dominate the test, and
        # memory use does not depend on the values.
        period = torch.randn(2**20, generator=generator)
        period = (period.abs() if non_negative else period).to(torch.bfloat16)
        save_file({tensor_name: period.repeat(SHARD_ELEMENTS // 2**20).view(-1, 1024)}, str(path / file_name), metadata={"format": "pt"})
        weight_map[tensor_name] = file_name
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


def _run_under_budget(command: list[str], budget_mib: int) -> int:
    """Run the command; return its peak RSS, read from its own VmHWM while it runs. (wait4's
    ru_maxrss would include this test process's RSS, which Linux carries into a child across exec.)"""
    process = subprocess.Popen([*command, "--max-memory", f"{budget_mib}MiB"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak_rss_bytes = 0
    while process.poll() is None:
        peak_rss_bytes = max(peak_rss_bytes, _vm_hwm_bytes(process.pid))
        time.sleep(0.05)
    stderr = process.stderr.read().decode()
    assert process.returncode == 0, stderr
    return peak_rss_bytes


def _write_stats(folder: Path, seed: int) -> Path:
    for offset, name in enumerate(("forget.fisher", "retain.fisher")):
        _write_big_checkpoint(folder / name, seed + offset, non_negative=True)
    (folder / "perta_stats.json").write_text(json.dumps({"format": "perta_stats", "format_version": 1, "kinds": ["fisher"], "model": {}}))
    return folder


@pytest.mark.slow
def test_inspect_peak_rss_stays_under_budget_on_inputs_larger_than_it(tmp_path):
    completed = subprocess.run([sys.executable, "-c", _IMPORTS_PEAK], capture_output=True, text=True, check=True)
    baseline_mib = int(completed.stdout.strip()) // 1024
    assert SHARDS * SHARD_ELEMENTS * 2 > (baseline_mib + BUDGET_MIB) * 2**20  # each input alone is larger than the peak allowed
    stats, other = _write_stats(tmp_path / "stats", 0), _write_stats(tmp_path / "other", 2)
    for seed, name in enumerate(("theta0", "fgt"), start=4):
        _write_big_checkpoint(tmp_path / name, seed)
    task_vector = ["--theta0", str(tmp_path / "theta0"), "--fgt", str(tmp_path / "fgt")]
    cli = [sys.executable, "-m", "perta_stream.cli", "inspect", "-q"]
    # One statistics run, and two compared (eight sampled quantities per element instead of two).
    for extra, out in (([], "out"), (["--compare", str(other)], "compared")):
        peak_rss_bytes = _run_under_budget([*cli, str(stats), *extra, *task_vector, "--out", str(tmp_path / out)], BUDGET_MIB)
        record = json.loads((tmp_path / out / "inspect.json").read_text())
        allowed = record["baseline_rss_bytes"] + BUDGET_MIB * 2**20
        assert peak_rss_bytes <= allowed, f"{out}: peak RSS {peak_rss_bytes / 2**20:.0f} MiB, {record['baseline_rss_bytes'] / 2**20:.0f} MiB baseline + {BUDGET_MIB} MiB budget"
        assert record["max_memory_bytes"] == BUDGET_MIB * 2**20 and 0 < record["peak_rss_bytes"] <= allowed
        assert 0 < record["added_peak_rss_bytes"] <= BUDGET_MIB * 2**20
        assert record["chunk_elements"] < SHARD_ELEMENTS  # every tensor was read in slices
    assert record["model"]["w"]["b"]["fisher τ=2"]["elements"] == SHARDS * SHARD_ELEMENTS
    assert record["model"]["comparison"]["fisher τ=2"]["w_rank_correlation"] is not None
