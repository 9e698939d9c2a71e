"""`inspect` and `--alpha-unit matched` with a PEFT LoRA adapter as θ_fgt.

The adapters are made by peft on tiny Llamas (≥3 shards, tied embeddings), every factor non-zero.
Three things are compared: inspect with the adapter, inspect with the dense θ_fgt = θ_0 + s·B@A
that peft's `merge_and_unload` gives (float64, written as a float32 checkpoint), and a dense
reference computed here in float64 from that merge and numpy's W (inspect_reference.py).

Tolerances, per element of the task vector, are the float32 rounding of what each path sums:
from the adapter, r products for s·B@A (rank r) relative to s·|B|@|A|, and where θ_0 enters
(DoRA's row norm over its cols squares, saved values and trainable tokens minus θ_0) that many
roundings of |θ_fgt| + |θ_0|; from the dense checkpoint, the rounding of θ_fgt to float32 and of
the subtraction. A norm over a set of elements is then within the norm of those bounds (triangle
inequality), W⊙TV adds one float32 rounding of the product, and a ratio of norms sums the relative
errors of both.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from adapter_fixtures import ALL_LINEAR, make_adapter, peft_dense_fgt  # noqa: E402
from inspect_reference import dense_weights  # noqa: E402
from merge_fixtures import load_checkpoint, save_tiny_llama, write_checkpoint, write_stats  # noqa: E402
from test_unlearn import _config, tiny_models  # noqa: E402, F401  (the module's fixture, reused)

from perta_stream.config.inspect import InspectConfig  # noqa: E402
from perta_stream.errors import PlanError, StatisticsError  # noqa: E402
from perta_stream.pipelines.inspect import run_inspect  # noqa: E402
from perta_stream.pipelines.matched_alpha import matched_alphas  # noqa: E402

EPS32 = 2.0**-24
# float64 sums over ~10⁵ terms of one sign, in another order than the reference's.
SUM_REL = 1e-10
ADAPTERS = {
    "all-linear-rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=ALL_LINEAR),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True),
    "trainable-tokens": dict(r=4, lora_alpha=8, target_modules=["o_proj"], trainable_token_indices=[3, 5, 90]),
    "modules-to-save": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["norm"]),
}
CONFIGS = {"grad τ=1": ("grad", 1.0), "fisher τ=2": ("fisher", 2.0), "uniform c=0.5": ("uniform", None), "tv": ("tv", None)}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect-adapter")
    save_tiny_llama(root / "theta0", tied=True, dtype=torch.bfloat16, seed=0)
    return root, write_stats(root / "stats", root / "theta0")


def _task_vector_bounds(theta0: dict, fgt: dict, low_rank: dict, *, dora: bool) -> tuple[dict, dict, dict]:
    """Tensor name -> (flattened, float64) the reference task vector, and the per-element bound of
    the adapter's and of the dense checkpoint's float32 task vector around it."""
    tv, adapter_bound, dense_bound = {}, {}, {}
    for name, stored in theta0.items():
        base64 = stored.double()
        difference = fgt[name] - base64
        product, rank = low_rank.get(name, (torch.zeros_like(base64), 0))
        # θ_0 enters the adapter's task vector through DoRA's norm (a row of squares) or as saved values − θ_0.
        theta0_terms = base64.shape[-1] + 6 if dora and name in low_rank else 0 if name in low_rank else 2
        adapter = EPS32 * ((rank + 2) * product + theta0_terms * (fgt[name].abs() + base64.abs()))
        dense = EPS32 * (fgt[name].abs() + 2 * difference.abs())
        tv[name], adapter_bound[name], dense_bound[name] = (t.reshape(-1).numpy() for t in (difference, adapter, dense))
    assert sum(bool(values.any()) for values in tv.values()) >= 2, "the adapter changes nothing: the test would prove nothing"
    return tv, adapter_bound, dense_bound


@pytest.fixture(scope="module", params=list(ADAPTERS))
def adapted(request, base):
    """(root, stats, adapter, dense θ_fgt folder, reference task vector, {"adapter": bound, "dense": bound})."""
    root, stats = base
    name = request.param
    adapter = make_adapter(root / "theta0", root / f"adapter-{name}", dtype=torch.bfloat16, **ADAPTERS[name])
    fgt, low_rank = peft_dense_fgt(root / "theta0", adapter)
    theta0 = load_checkpoint(root / "theta0")
    dense = root / f"dense-{name}"
    write_checkpoint(dense, {tensor_name: fgt[tensor_name].float() for tensor_name in theta0}, shards=3)
    tv, adapter_bound, dense_bound = _task_vector_bounds(theta0, fgt, low_rank, dora=name == "dora")
    return root, stats, adapter, dense, tv, {"adapter": adapter_bound, "dense": dense_bound}


def _inspect(out: Path, stats: Path, theta0: Path, fgt: Path, **options) -> dict:
    run_inspect(InspectConfig.from_options({"out": out, "stats": stats, "theta0": theta0, "fgt": fgt, "chunk_bytes": "4KiB", **options}))
    return json.loads((out / "inspect.json").read_text())


def _weights(stats: Path, label: str, tv: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    method, tau = CONFIGS[label]
    if method in ("grad", "fisher"):
        return {name: values.astype(np.float64) for name, values in dense_weights(stats, kind=method, tau=tau).items()}
    return {name: np.full(values.size, 0.5 if method == "uniform" else 1.0) for name, values in tv.items()}


def _reference(tv: dict, bound: dict, weights: dict, names: list[str]) -> dict | None:
    """‖TV‖, the effective scale and how far float32 arithmetic may move each, over `names`."""
    tv_sq = sum(float(np.square(tv[n]).sum()) for n in names)
    if tv_sq == 0:
        return None
    wtv_sq = sum(float(np.square(weights[n] * tv[n]).sum()) for n in names)
    bound_norm = math.sqrt(sum(float(np.square(bound[n]).sum()) for n in names))
    weighted_bound_norm = math.sqrt(sum(float(np.square(weights[n] * bound[n]).sum()) for n in names))
    tv_rel = bound_norm / math.sqrt(tv_sq) + SUM_REL
    wtv_rel = (weighted_bound_norm + EPS32 * math.sqrt(wtv_sq)) / math.sqrt(wtv_sq) + SUM_REL
    scale = math.sqrt(wtv_sq / tv_sq)
    return {"tv_norm": math.sqrt(tv_sq), "tv_rel": tv_rel, "scale": scale, "scale_rel": (tv_rel + wtv_rel) / (1 - tv_rel)}


def _assert_close(got: float, expected: float, rel: float, what: str) -> None:
    assert abs(got - expected) <= rel * abs(expected), f"{what}: {got!r} vs {expected!r} (relative {abs(got - expected) / abs(expected):.2e} > {rel:.2e})"


def test_inspect_with_an_adapter_equals_inspect_with_its_dense_model_and_a_float64_reference(adapted, tmp_path):
    root, stats, adapter, dense, tv, bounds = adapted
    records = {
        "adapter": _inspect(tmp_path / "adapter", stats, root / "theta0", adapter),
        "dense": _inspect(tmp_path / "dense", stats, root / "theta0", dense),
    }
    assert records["adapter"]["chunk_elements"] < max(values.size for values in tv.values())  # tensors read in slices
    assert "tensors are the ones the statistics were computed at" in records["adapter"]["stats_check"]
    for label in CONFIGS:
        weights = _weights(stats, label, tv)
        scale_rel = 0.0
        for kind, record in records.items():
            model = _reference(tv, bounds[kind], weights, list(tv))
            scale_rel += model["scale_rel"]
            _assert_close(record["effective_scale"][label], model["scale"], model["scale_rel"], f"{kind} {label} effective scale")
            _assert_close(record["matched_alpha"][label], 1 / model["scale"], model["scale_rel"] / (1 - model["scale_rel"]), f"{kind} {label} matched α")
            _assert_close(record["model"]["w"][label]["tv_norm"], model["tv_norm"], model["tv_rel"], f"{kind} {label} ‖TV‖")
            for entry in record["tensors"]:
                expected = _reference(tv, bounds[kind], weights, [entry["tensor_name"]])
                figures = entry["w"][label]
                if expected is None:  # a tensor the adapter leaves alone
                    assert figures["tv_norm"] is None and figures["effective_scale"] is None, entry["tensor_name"]
                    continue
                what = f"{kind} {label} {entry['tensor_name']}"
                _assert_close(figures["tv_norm"], expected["tv_norm"], expected["tv_rel"], what + " ‖TV‖")
                _assert_close(figures["effective_scale"], expected["scale"], expected["scale_rel"], what + " effective scale")
        adapter_scale, dense_scale = records["adapter"]["effective_scale"][label], records["dense"]["effective_scale"][label]
        _assert_close(adapter_scale, dense_scale, scale_rel / (1 - scale_rel), f"{label}: adapter against dense")


def test_matched_alpha_of_an_adapter_equals_that_of_its_dense_model(adapted):
    root, stats, adapter, dense, tv, bounds = adapted
    options = dict(stats=str(stats), theta0=str(root / "theta0"), tau=None, uniform_weight=0.5, fallback_weight=0.5, max_memory_bytes=2**30)
    methods = ("tv", "uniform", "grad", "fisher")
    got = {kind: matched_alphas(methods, fgt=str(fgt), **options) for kind, fgt in (("adapter", adapter), ("dense", dense))}
    for label in ("grad τ=1", "fisher τ=2"):
        method = CONFIGS[label][0]
        for kind in got:
            model = _reference(tv, bounds[kind], _weights(stats, label, tv), list(tv))
            _assert_close(got[kind][method], 1 / model["scale"], model["scale_rel"] / (1 - model["scale_rel"]), f"{kind} {method} matched α")
    assert got["adapter"]["tv"] == 1.0 and got["adapter"]["uniform"] == 2.0


def test_inspect_with_an_adapter_refuses_statistics_of_another_model(base, tmp_path):
    root, _ = base
    adapter = make_adapter(root / "theta0", tmp_path / "adapter", dtype=torch.bfloat16, **ADAPTERS["all-linear-rslora"])
    save_tiny_llama(tmp_path / "other", tied=True, dtype=torch.bfloat16, seed=5)
    other_stats = write_stats(tmp_path / "other-stats", tmp_path / "other")
    # θ_0 is hashed although the adapter's task vector does not read it: statistics of another model are refused.
    with pytest.raises(StatisticsError, match="whose tensors differ from --theta0"):
        _inspect(tmp_path / "out", other_stats, root / "theta0", adapter)
    assert not (tmp_path / "out").exists()
    with pytest.raises(PlanError, match="adapter --fgt .*pass --stats-at theta0"):
        _inspect(tmp_path / "out-fgt", root / "stats", root / "theta0", adapter, stats_at="fgt")
    with pytest.raises(PlanError, match="the adapter was trained on another model"):
        _inspect(tmp_path / "out-wide", root / "stats", root / "theta0", _adapter_of_another_shape(tmp_path))


def _adapter_of_another_shape(tmp_path: Path) -> Path:
    """A LoRA saved by peft on a Llama of another width: its factors do not fit θ_0."""
    from merge_fixtures import TINY_LLAMA
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = dict(TINY_LLAMA, intermediate_size=TINY_LLAMA["intermediate_size"] * 2)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**wide, tie_word_embeddings=True)).save_pretrained(tmp_path / "wide")
    return make_adapter(tmp_path / "wide", tmp_path / "wide-adapter", r=4, lora_alpha=8, target_modules=["up_proj"])


def test_matched_alpha_unlearn_with_an_adapter_equals_it_with_the_dense_model(tiny_models, tmp_path):  # noqa: F811
    from merge_fixtures import reference_weights

    from perta_stream.pipelines.unlearn import run_unlearn

    root = tiny_models
    adapter = make_adapter(root / "theta0", tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], scale=0.02)
    fgt, low_rank = peft_dense_fgt(root / "theta0", adapter)
    theta0, full = load_checkpoint(root / "theta0"), load_checkpoint(root / "full")
    dense = tmp_path / "dense"
    write_checkpoint(dense, {name: fgt[name].float() for name in theta0}, shards=2)
    results = {}
    for kind, location in (("adapter", adapter), ("dense", dense)):
        config = _config(root, "unused", fgt=str(location), method="fisher", alphas=(1.0, 2.0), alpha_unit="matched", out_dtype="F32")
        results[kind] = run_unlearn(dataclasses.replace(config, out=str(tmp_path / f"out-{kind}" / "{alpha}")))
    stats = Path(results["adapter"].stats_dir)
    assert Path(results["dense"].stats_dir) == stats  # the statistics are θ_0's: one folder for both
    records = {kind: [json.loads((Path(out) / "perta_merge.json").read_text()) for out in result.outputs] for kind, result in results.items()}
    matched = {kind: found[0]["matched_alpha"] for kind, found in records.items()}
    # The dense reference: W by numpy, TV from peft's float64 merge.
    forget, retain = load_checkpoint(stats / "forget.fisher"), load_checkpoint(stats / "retain.fisher")
    weights = {name: reference_weights(forget[name].float().numpy(), retain[name].float().numpy(), kind="fisher", tau=2.0, fallback_weight=0.5).astype(np.float64).reshape(-1) for name in theta0}
    tv, adapter_bound, dense_bound = _task_vector_bounds(theta0, fgt, low_rank, dora=False)
    bounds = {"adapter": adapter_bound, "dense": dense_bound}
    alpha_rel = {}
    for kind in records:
        model = _reference(tv, bounds[kind], weights, list(theta0))
        alpha_rel[kind] = model["scale_rel"] / (1 - model["scale_rel"])
        _assert_close(matched[kind], 1 / model["scale"], alpha_rel[kind], f"{kind} matched α")
    _assert_close(matched["adapter"], matched["dense"], sum(alpha_rel.values()), "matched α: adapter against dense")
    for position, multiple in enumerate((1.0, 2.0)):
        outputs, tolerances = {}, {}
        for kind, result in results.items():
            record = records[kind][position]
            assert record["alpha"] == multiple * record["matched_alpha"] and record["alpha_unit"] == "matched"
            outputs[kind] = {name: tensor.double().reshape(-1).numpy() for name, tensor in load_checkpoint(Path(result.outputs[position])).items()}
        for name in theta0:
            if not tv[name].any():
                assert np.array_equal(outputs["adapter"][name], outputs["dense"][name]), name  # θ_full's values in both
                continue
            full64, product = full[name].double().reshape(-1).numpy(), np.abs(weights[name] * tv[name])
            for kind in outputs:
                # Each output within float32 rounding of the float64 merge at its own α: W⊙TV, α·, θ_full −.
                alpha = records[kind][position]["alpha"]
                expected = full64 - alpha * weights[name] * tv[name]
                tolerances[kind] = EPS32 * 2 * np.abs(expected) + alpha * (weights[name] * bounds[kind][name] + 2 * EPS32 * product)
                assert bool((np.abs(outputs[kind][name] - expected) <= tolerances[kind]).all()), f"{name}: {kind} output beyond the bound"
            alphas = [records[kind][position]["alpha"] for kind in outputs]
            between = tolerances["adapter"] + tolerances["dense"] + abs(alphas[0] - alphas[1]) * product
            assert bool((np.abs(outputs["adapter"][name] - outputs["dense"][name]) <= between).all()), f"{name}: adapter and dense outputs differ"
    # The statistics' files are θ_0's as recorded: inspect takes their digest without hashing θ_0.
    record = _inspect(tmp_path / "inspect", stats, root / "theta0", adapter)
    assert "by its files" in record["stats_check"] and record["matched_alpha"]["fisher τ=2"] == pytest.approx(matched["adapter"], rel=SUM_REL)
