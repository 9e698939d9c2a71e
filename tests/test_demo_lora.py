"""`demo --lora R`: the demo's θ_fgt trained as a LoRA adapter and given to the sweep as its θ_fgt.

The whole demo takes minutes, so its stages are replaced by recorders here: what is checked is what
each stage is asked to make, and which folders the LoRA and the default demo share.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from perta_stream.cli import parse_arguments
from perta_stream.config.demo import DemoConfig
from perta_stream.errors import UsageError


class _SweepReached(Exception):
    pass


@pytest.fixture
def recorded(monkeypatch):
    from perta_stream.pipelines import demo, finetune, stats, sweep

    calls: dict[str, list] = {"finetune": [], "sweep": []}

    def make(out: str) -> SimpleNamespace:
        Path(out).mkdir(parents=True)
        return SimpleNamespace(summary=lambda: "")

    def fake_sweep(config):
        calls["sweep"].append(config)
        raise _SweepReached

    def make_base(recipe, tofu_dir: Path, data_dir: Path, init_dir: Path) -> None:
        from perta_stream.demo.data import write_demo_data

        write_demo_data(tofu_dir, recipe.split, recipe.retain_count, data_dir)  # the real files: the configs check them
        init_dir.mkdir()

    monkeypatch.setattr(demo, "_make_base", make_base)
    monkeypatch.setattr(finetune, "run_finetune", lambda config: calls["finetune"].append(config) or make(config.out))
    monkeypatch.setattr(stats, "run_stats", lambda config: make(config.out))
    monkeypatch.setattr(sweep, "run_sweep", fake_sweep)
    return calls


def _demo(cache: Path, *extra: str) -> None:
    from perta_stream.pipelines.demo import run_demo

    with pytest.raises(_SweepReached):
        run_demo(DemoConfig.from_cli(parse_arguments(["demo", "--cache-dir", str(cache), *extra])))


def test_demo_lora_trains_theta_fgt_as_an_adapter_and_sweeps_with_it(recorded, tmp_path):
    _demo(tmp_path, "--lora", "4")
    made = {Path(config.out).name: config.lora_rank for config in recorded["finetune"]}
    assert made == {"theta0": None, "full": None, "fgt-lora4": 4, "ret": None}
    lora_sweep = recorded["sweep"][-1]
    build = Path(lora_sweep.theta0).parent
    assert lora_sweep.fgt == str(build / "fgt-lora4") and "rank-4 LoRA" in lora_sweep.title
    # The default demo in the same cache: the same models (θ_fgt apart) and statistics, its own θ_fgt and sweep.
    recorded["finetune"].clear()
    _demo(tmp_path)
    assert [(Path(config.out).name, config.lora_rank) for config in recorded["finetune"]] == [("fgt", None)]
    default_sweep = recorded["sweep"][-1]
    assert default_sweep.fgt == str(build / "fgt") and default_sweep.stats == lora_sweep.stats
    assert default_sweep.out != lora_sweep.out and Path(default_sweep.out).parent == build


def test_demo_lora_rank_is_checked():
    with pytest.raises(UsageError, match="--lora must be a rank of at least 1, got 0"):
        DemoConfig.from_cli(parse_arguments(["demo", "--lora", "0"]))
