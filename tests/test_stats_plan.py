"""The dry-run plan: header-only estimates, the 70B config-only path, groups and batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from perta_stream.cli import main
from perta_stream.errors import ModelNotSupportedError
from perta_stream.plan.stats_plan import ModelShape, group_tensor_names, plan_batches, plan_stats
from stats_fixtures import save_tiny_model, write_data

ROOT = Path(__file__).resolve().parents[1]


def _llama70b_parameter_count() -> tuple[int, int, int]:
    hidden, inter, layers, vocab, kv = 8192, 28672, 80, 128256, 8 * 128
    per_layer = 2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * inter + 2 * hidden
    embed = vocab * hidden
    return per_layer, embed, layers * per_layer + 2 * embed + hidden


def test_llama70b_config_only_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    forget, retain = write_data(tmp_path)
    config = ROOT / "configs" / "llama-70b-config.json"
    argv = ["stats", "--model", str(config), "--forget", str(forget), "--retain", str(retain), "--dry-run", "--config-only"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "80 layers, 70.554 B parameters" in text and "spilled to disk" in text and "TFLOP" in text
    shape = ModelShape.from_config(json.loads(config.read_text()))
    per_layer, embed, total = _llama70b_parameter_count()
    plan = plan_stats(shape, shape.tensor_shapes(), lengths={"forget": [100] * 8, "retain": [50] * 8}, batch_size=4, kinds=("grad", "fisher"),
                      stats_dtype_bytes=4, compute_dtype_bytes=2, boundary_budget_bytes=2**30, device="cuda")
    assert plan.num_parameters == total == 70_553_706_496
    # bf16 weights; each decoder layer read twice, embeddings, final norm and lm_head once
    assert plan.bytes_read == 2 * (2 * 80 * per_layer + 2 * embed + 8192)
    assert plan.bytes_written == 2 * 2 * total * 4
    assert plan.boundary_bytes == 81 * (800 + 400) * 8192 * 2
    assert plan.boundary_spill_bytes == plan.boundary_bytes - 2**30
    assert plan.flops > 8 * 68e9 * 1200


def test_compute_dtype_sets_the_planned_boundaries(tmp_path: Path) -> None:
    from perta_stream.config.stats import StatsConfig
    from perta_stream.pipelines.stats import run_stats

    forget, retain = write_data(tmp_path)
    config = str(ROOT / "configs" / "llama-70b-config.json")
    plans = {}
    for device, compute_dtype in (("cpu", "auto"), ("cuda", "auto"), ("cuda", "float32"), ("cpu", "bfloat16")):
        options = StatsConfig(model=config, forget=str(forget), retain=str(retain), device=device, compute_dtype=compute_dtype, dry_run=True, config_only=True)
        plans[device, compute_dtype] = run_stats(options).plan
        assert options.compute_dtype_on(device) == {"auto": "float32" if device == "cpu" else "bfloat16"}.get(compute_dtype, compute_dtype)
    # Boundary hidden states are stored in the compute dtype: float32 holds twice the bytes.
    assert plans["cpu", "auto"].boundary_bytes == plans["cuda", "float32"].boundary_bytes == 2 * plans["cuda", "auto"].boundary_bytes
    assert plans["cpu", "bfloat16"].boundary_bytes == plans["cuda", "auto"].boundary_bytes


def test_config_shapes_match_saved_checkpoints(tmp_path: Path) -> None:
    for kind in ("llama", "qwen2", "mistral"):
        model_dir = save_tiny_model(tmp_path, kind)
        stored: dict[str, tuple[int, ...]] = {}
        for shard in model_dir.glob("*.safetensors"):
            with safe_open(str(shard), framework="pt") as handle:
                stored.update({n: tuple(handle.get_slice(n).get_shape()) for n in handle.keys()})
        derived = ModelShape.from_config(json.loads((model_dir / "config.json").read_text())).tensor_shapes()
        assert derived == stored, kind


def test_dry_run_on_a_checkpoint_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    forget, retain = write_data(tmp_path / "data")
    model_dir = save_tiny_model(tmp_path, "qwen2")
    out = tmp_path / "never"
    argv = ["stats", "--model", str(model_dir), "--forget", str(forget), "--retain", str(retain), "--out", str(out), "--dry-run"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "qwen2, 2 layers" in text and "forget 5 samples" in text and "retain 7 samples" in text
    assert not out.exists() and not Path(str(out) + ".partial").exists()


def test_groups_and_batches() -> None:
    names = ["lm_head.weight", "model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "model.norm.weight", "model.layers.10.x"]
    groups = group_tensor_names(names, 11)
    assert list(groups)[:3] == ["embed", "layer.0", "layer.1"] and list(groups)[-1] == "head"
    assert groups["head"] == ["lm_head.weight", "model.norm.weight"] and groups["layer.10"] == ["model.layers.10.x"] and groups["layer.5"] == []
    batches = plan_batches([3, 9, 1, 9, 4], 2)
    assert batches == [[1, 3], [4, 0], [2]]


def test_unsupported_config_is_refused() -> None:
    with pytest.raises(ModelNotSupportedError, match="supported: llama, mistral, qwen2"):
        ModelShape.from_config({"model_type": "gpt_neox", "hidden_size": 8})
    with pytest.raises(ModelNotSupportedError, match="lacks integer field"):
        ModelShape.from_config({"model_type": "llama", "hidden_size": 8})
