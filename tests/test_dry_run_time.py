"""A dry run in hours: the wall time from this machine's measured speeds, beside bytes and FLOPs;
`--config-only` on a Hub model fetches its config.json alone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from perta_stream.cli import main
from perta_stream.machine_speed import measure_machine_speed
from perta_stream.plan.wall_time import estimate_wall_time, training_flops

ROOT = Path(__file__).resolve().parent.parent


def test_the_estimate_adds_each_part_at_its_measured_speed():
    estimate = estimate_wall_time(
        flops=4e12, matmul_share=0.25, bytes_read=3 * 10**9, bytes_written=10**9,
        matmul_flops_per_s=1e11, read_bytes_per_s=1.5e9, write_bytes_per_s=0.5e9,
    )
    assert estimate.parts == pytest.approx({"compute": 160.0, "read": 2.0, "write": 2.0})
    assert estimate.total_s == pytest.approx(164.0) and estimate.describe("x").startswith("about 2.7 min (compute 2.7 min, read 2.0 s, write 2.0 s)")
    # A speed not measured is said, not guessed.
    unknown = estimate_wall_time(flops=1e12, matmul_share=1.0, bytes_read=10, bytes_written=10, matmul_flops_per_s=1e12, read_bytes_per_s=None, write_bytes_per_s=1.0)
    assert unknown.unmeasured == ("read",) and "not counted: read (speed not measured)" in unknown.describe("x")
    assert training_flops(100, 1000, 2.0) == 6.0 * 100 * 1000 * 2


def test_the_probes_measure_and_leave_nothing(tmp_path):
    sample = tmp_path / "model.safetensors"
    sample.write_bytes(b"\0" * 2**20)
    speed = measure_machine_speed(device="cpu", dtype_name="float32", hidden_size=256, read_paths=[sample], write_dir=tmp_path)
    assert speed.matmul_flops_per_s > 1e6 and speed.read_bytes_per_s > 0 and speed.write_bytes_per_s > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert measure_machine_speed(device="cpu", dtype_name="float32", hidden_size=None, write_dir=tmp_path / "missing").write_bytes_per_s is None


def test_stats_and_merge_dry_runs_print_a_wall_time(tmp_path, capsys):
    from merge_fixtures import make_triplet
    from stats_fixtures import save_tiny_model, write_data

    model = save_tiny_model(tmp_path / "models", "llama")
    forget, retain = write_data(tmp_path / "data")
    out = tmp_path / "runs" / "stats"
    (tmp_path / "runs").mkdir()
    assert main(["stats", "--model", str(model), "--forget", str(forget), "--retain", str(retain), "--out", str(out), "--dry-run", "--device", "cpu"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "wall time:" in line)
    assert re.search(r"about [\d.]+ (s|min|h) \(compute .*, read .*, write .*\) at this machine's measured speed: cpu matmul [\d.]+ GFLOP/s, read", line)
    theta0, full, fgt = make_triplet(tmp_path / "m", tied=True)
    assert main(["merge", "--theta0", str(theta0), "--full", str(full), "--fgt", str(fgt), "--out", str(tmp_path / "runs" / "clean"), "--dry-run"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "wall time:" in line)
    assert "(read " in line and "write " in line and "matmul" not in line
    assert list((tmp_path / "runs").iterdir()) == []  # the write probe is gone, nothing else was written


def test_config_only_on_a_hub_model_fetches_config_json_alone(tmp_path, monkeypatch, capsys):
    from hub_server import HubServer
    from huggingface_hub import constants
    from stats_fixtures import write_data

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config.json").write_text((ROOT / "configs" / "llama-70b-config.json").read_text())
    (repo / "model.safetensors").write_bytes(b"\0" * 4096)  # weights the plan must not read
    server = HubServer()
    try:
        server.publish_folder("org/big", repo)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
        forget, retain = write_data(tmp_path / "data")
        server.reset_counters()
        assert main(["stats", "--model", "org/big", "--forget", str(forget), "--retain", str(retain), "--dry-run", "--config-only", "--device", "cpu"]) == 0
        served = server.stats()["file_bytes_by_path"]
    finally:
        server.stop()
    text = capsys.readouterr().out
    assert "80 layers, 70.554 B parameters" in text and "wall time: " in text
    assert [path for path in served if "model.safetensors" in path] == [] and any("config.json" in path for path in served)
