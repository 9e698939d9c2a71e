"""Every supported family beyond Llama/Qwen2/Mistral: exact statistics, the dry-run plan, and the refusals.

Each tiny model (tests/stats_fixtures.FAMILY_OPTIONS) forces what its family does differently:
(1 + w) norms, q/k norms, post-norms, soft-capping with eager attention, per-layer-type windows
and rotary tables, multipliers, fused projections, routers and fused experts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from perta_stream.cli import main
from perta_stream.config.stats import StatsConfig
from perta_stream.errors import ModelNotSupportedError
from perta_stream.pipelines.stats import run_stats
from perta_stream.plan.model_families import SUPPORTED_MODEL_TYPES
from perta_stream.plan.stats_plan import ModelShape
from stats_fixtures import FAMILIES, FAMILY_OPTIONS, assert_equal_to_dense_reference, save_tiny_model, write_data

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    forget, retain = write_data(tmp_path_factory.mktemp("family-data"))
    return {"forget": forget, "retain": retain}


def _stored_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            shapes.update({n: tuple(handle.get_slice(n).get_shape()) for n in handle.keys()})
    return shapes


@pytest.mark.parametrize("kind", list(FAMILY_OPTIONS))
def test_streamed_statistics_equal_dense_reference(tmp_path: Path, data: dict[str, Path], kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if kind == "qwen3_moe":
        # The generic rule one sample at a time (real experts are too large to vmap), here for
        # every module it covers; Mixtral's tiny experts take the vmap path.
        from perta_stream.compute.stats import per_sample

        monkeypatch.setattr(per_sample, "VMAP_MAX_ELEMENTS", 0)
    model_dir = save_tiny_model(tmp_path, kind)
    config = StatsConfig(model=str(model_dir), forget=str(data["forget"]), retain=str(data["retain"]), out=str(tmp_path / "out"), batch_size=3, device="cpu")
    result = run_stats(config)
    # reference_stats names the statistics by transformers' own conversion to the checkpoint
    # layout, so a mixture-of-experts model's experts are compared one stored matrix at a time.
    # The forget set only: that the datasets' sums stay apart is family-independent and checked
    # in test_stats_exactness.
    loaded = assert_equal_to_dense_reference(result.out, model_dir, {"forget": data["forget"]}, tolerance=TOLERANCE)
    stored = _stored_shapes(model_dir)
    assert len(loaded) == 2
    for streamed in loaded.values():
        assert {n: tuple(t.shape) for n, t in streamed.items()} == stored
    if FAMILY_OPTIONS[kind]["tie_word_embeddings"]:
        assert "lm_head.weight" not in stored
    if kind in ("mixtral", "qwen3_moe"):
        experts = [n for n in stored if ".experts." in n]
        assert len(experts) == 4 * 3 * (2 if kind == "mixtral" else 1)
        # Every expert saw some token of the forget set: its statistics are not all zero.
        fisher = loaded["forget.fisher"]
        assert all(fisher[n].abs().sum() > 0 for n in experts)


def test_tying_the_other_way(tmp_path: Path, data: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # Gemma with an untied lm_head, OLMo 2 with a tied one: the soft-capped and scaled heads both ways.
    import stats_fixtures

    for kind in ("gemma2", "olmo2"):
        options = dict(FAMILY_OPTIONS[kind], tie_word_embeddings=not FAMILY_OPTIONS[kind]["tie_word_embeddings"])
        monkeypatch.setitem(stats_fixtures.FAMILY_OPTIONS, kind, options)
        model_dir = save_tiny_model(tmp_path, kind)
        assert ("lm_head.weight" in _stored_shapes(model_dir)) != options["tie_word_embeddings"]
        config = StatsConfig(model=str(model_dir), forget=str(data["forget"]), retain=str(data["retain"]), out=str(tmp_path / f"out-{kind}"), batch_size=4, device="cpu")
        assert_equal_to_dense_reference(run_stats(config).out, model_dir, {"forget": data["forget"]}, tolerance=TOLERANCE)


@pytest.mark.parametrize("kind", FAMILIES)
def test_config_only_dry_run_plans_every_stored_tensor(tmp_path: Path, data: dict[str, Path], kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = save_tiny_model(tmp_path, kind)
    stored = _stored_shapes(model_dir)
    config_path = model_dir / "config.json"
    argv = ["stats", "--model", str(config_path), "--forget", str(data["forget"]), "--retain", str(data["retain"]), "--dry-run", "--config-only"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    model_type = json.loads(config_path.read_text())["model_type"]
    assert f"{model_type}, 2 layers" in text
    plan = run_stats(StatsConfig(model=str(config_path), forget=str(data["forget"]), retain=str(data["retain"]), dry_run=True, config_only=True, kinds=("grad", "fisher"), stats_dtype="F32")).plan
    elements = sum(torch.Size(s).numel() for s in stored.values())
    assert plan.num_parameters == elements
    # Statistics of every stored tensor (expert matrices included), two datasets x two kinds in float32.
    assert plan.bytes_written == 2 * 2 * 4 * elements
    if kind in ("mixtral", "qwen3_moe"):
        shape = ModelShape.from_config(json.loads(config_path.read_text()))
        assert (shape.num_experts, shape.experts_per_token) == (4, 2)


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"model_type": "t5", "is_encoder_decoder": True, "hidden_size": 8}, "encoder-decoder"),
        ({"model_type": "gemma3", "text_config": {}, "vision_config": {}}, "vision towers; for Gemma 3 pass a text-only checkpoint"),
        ({"model_type": "llava", "vision_config": {}, "text_config": {}}, "vision towers"),
        ({"model_type": "gpt_neox", "hidden_size": 8}, "is not supported"),
        ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, "bidirectional attention"),
    ],
)
def test_unsupported_models_are_refused_from_config_json(
    tmp_path: Path, data: dict[str, Path], config: dict, reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The refusal comes from config.json: no weight byte is read.
    from perta_stream.sources.byte_source import LocalByteSource

    def no_weights(*args: object) -> None:
        raise AssertionError("a weight was read")

    monkeypatch.setattr(LocalByteSource, "read_into", no_weights)
    model_dir = save_tiny_model(tmp_path, "llama")
    (model_dir / "config.json").write_text(json.dumps(config))
    for options in ({"dry_run": True}, {"dry_run": True, "config_only": True}, {"out": str(tmp_path / "out")}):
        with pytest.raises(ModelNotSupportedError, match=reason) as caught:
            run_stats(StatsConfig(model=str(model_dir), forget=str(data["forget"]), retain=str(data["retain"]), **options))
        assert "supported: " + ", ".join(SUPPORTED_MODEL_TYPES) in str(caught.value)


class _GainedLayerNorm(torch.nn.Module):
    """A norm no family has: layer norm with a bias and a learned scalar gain, (1 + gain) * (norm(x) * w + b)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size))
        self.gain = torch.nn.Parameter(torch.zeros(1))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], eps=self.eps)
        return ((1.0 + self.gain) * (normed * self.weight + self.bias)).to(x.dtype)


def test_an_unknown_parameterized_module_gets_the_generic_rule(tmp_path: Path, data: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # Every norm of a Llama (in the layers and the final one) replaced by a module the engine has
    # never seen, with three parameters: no code knows it, the generic rule covers it.
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    from stats_fixtures import build_tokenizer, tiny_config

    monkeypatch.setattr(modeling_llama, "LlamaRMSNorm", _GainedLayerNorm)
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer), tokenizer.pad_token_id))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_((name.endswith("weight") * 1.0) + 0.3 * torch.randn_like(parameter))
    norm_tensors = [n for n, _ in model.named_parameters() if "norm" in n]
    assert len(norm_tensors) == 3 * 5 and "model.norm.bias" in norm_tensors and "model.layers.1.input_layernorm.gain" in norm_tensors
    model_dir = tmp_path / "gained"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = StatsConfig(model=str(model_dir), forget=str(data["forget"]), retain=str(data["retain"]), out=str(tmp_path / "out"), batch_size=3, device="cpu")
    loaded = assert_equal_to_dense_reference(run_stats(config).out, model_dir, {"forget": data["forget"]}, tolerance=TOLERANCE)
    assert all(loaded["forget.fisher"][n].abs().sum() > 0 for n in norm_tensors)


def test_mixture_of_experts_plan_counts_the_routed_experts_only(tmp_path: Path, data: dict[str, Path]) -> None:
    # The plan from the checkpoint (per-expert matrices) and from config.json agree; compute counts
    # 2 of the 4 experts per token, memory the generic rule's float32 copies of a layer's experts.
    from dataclasses import replace

    from perta_stream.plan.stats_plan import plan_stats

    model_dir = save_tiny_model(tmp_path, "mixtral")
    stored = _stored_shapes(model_dir)
    options = dict(forget=str(data["forget"]), retain=str(data["retain"]), dry_run=True)
    from_checkpoint = run_stats(StatsConfig(model=str(model_dir), **options)).plan
    from_config = run_stats(StatsConfig(model=str(model_dir / "config.json"), config_only=True, **options)).plan
    assert (from_checkpoint.num_parameters, from_checkpoint.bytes_written) == (from_config.num_parameters, from_config.bytes_written)
    shape = ModelShape.from_config(json.loads((model_dir / "config.json").read_text()))
    settings = dict(lengths={"forget": [20] * 4}, batch_size=2, kinds=("grad", "fisher"), stats_dtype_bytes=4, compute_dtype_bytes=4, boundary_budget_bytes=2**30, device="cpu")
    routed, dense = plan_stats(shape, stored, **settings), plan_stats(replace(shape, num_experts=0), stored, **settings)
    expert_elements = sum(torch.Size(s).numel() for n, s in stored.items() if ".experts." in n)
    padded = 4 * 20
    assert dense.flops - routed.flops == pytest.approx(8.0 * padded * expert_elements / 2)
    assert routed.peak_device_bytes >= 3 * 4 * expert_elements // 2  # a layer's experts: half of them
