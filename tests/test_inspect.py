"""`perta-stream inspect`: every figure against a dense in-memory reference, chunked and not, tied
embeddings and not; the rank-correlation estimator against scipy on the same elements; bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from inspect_reference import BINS, EDGES, combine, dense_weights, fallback_masks, figures_of, grad_cosine, spearman, task_vector
from merge_fixtures import TINY_LLAMA, load_checkpoint, make_triplet, write_stats

from perta_stream.cli import main
from perta_stream.config.inspect import InspectConfig
from perta_stream.errors import NonFiniteError, PlanError, UsageError
from perta_stream.pipelines.inspect import run_inspect
from perta_stream.plan.tensor_groups import tensor_group

# Sums are float64 over at most ~7e4 terms of one sign: relative error below 1e-11. Cosines sum
# terms of both signs: their error is bounded absolutely, by the same count times float64's epsilon.
SUM_REL = 1e-10
COSINE_ABS = 1e-10


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tied and untied tiny Llamas (θ_0, θ_full, θ_fgt, bf16, ≥3 shards) with F32 and BF16 statistics."""
    root = tmp_path_factory.mktemp("inspect")
    made = {}
    for tied in (True, False):
        theta0, full, fgt = make_triplet(root / f"tied_{tied}", tied=tied)
        made[tied] = {
            "theta0": theta0, "full": full, "fgt": fgt,
            "stats": write_stats(root / f"tied_{tied}" / "stats", theta0),
            "stats_bf16": write_stats(root / f"tied_{tied}" / "stats_bf16", theta0, dtype=torch.bfloat16, seed=4),
        }  # fmt: skip
    return made


def _run(out: Path, **options) -> dict:
    import dataclasses

    python_only = {name: options.pop(name) for name in ("rank_sample_elements",) if name in options}
    run_inspect(dataclasses.replace(InspectConfig.from_options({"out": out, **options}), **python_only))
    return json.loads((out / "inspect.json").read_text())


def _check(recorded: dict, expected: dict, *, histogram: bool = True, rel: float = SUM_REL) -> None:
    count = expected["elements"]
    assert recorded["elements"] == count
    if histogram and rel == SUM_REL:
        assert recorded["histogram"] == expected["histogram"]
    elif histogram:  # W within an ulp: only an element within an ulp of a bin edge may change bins
        assert sum(abs(a - b) for a, b in zip(recorded["histogram"], expected["histogram"])) <= 2
    assert recorded["fraction_below_0_1"] == expected["below"] / count
    assert recorded["fraction_above_0_9"] == expected["above"] / count
    assert recorded["fallback_elements"] == expected["fallback"]
    assert recorded["mean_w"] == pytest.approx(expected["weight_sum"] / count, rel=rel)
    if expected["tv_sq"] is None:
        assert recorded["effective_scale"] is None
    else:
        assert recorded["effective_scale"] == pytest.approx(math.sqrt(expected["wtv_sq"]) / math.sqrt(expected["tv_sq"]), rel=rel)
        assert recorded["tv_norm"] == pytest.approx(math.sqrt(expected["tv_sq"]), rel=SUM_REL)


@pytest.mark.parametrize(
    ("tied", "stats_name", "chunk", "taus", "rel"),
    [
        (True, "stats", "4KiB", None, SUM_REL),
        (False, "stats_bf16", None, (2.0,), SUM_REL),
        # fisher at τ = 1 raises F to the power 0.5, which torch's CPU kernel computes within an
        # ulp but not always to the correctly rounded value numpy gives: W is then equal to float32
        # rounding (2⁻²⁴ relative), and so is every sum of it.
        (True, "stats_bf16", "4KiB", (1.0,), 2**-23),
    ],
    ids=["tied-f32-chunked", "untied-bf16-whole-tensors-tau2", "tied-bf16-chunked-tau1"],
)
def test_every_figure_matches_a_dense_reference(models, tmp_path, tied, stats_name, chunk, taus, rel):
    inputs = models[tied]
    stats = inputs[stats_name]
    record = _run(tmp_path / "out", stats=stats, theta0=inputs["theta0"], fgt=inputs["fgt"], chunk_bytes=chunk, taus=taus)
    tv = task_vector(inputs["theta0"], inputs["fgt"])
    names = [entry["tensor_name"] for entry in record["tensors"]]
    assert sorted(names) == sorted(tv)
    assert ("lm_head.weight" in names) is (not tied) and record["tied_embeddings"] is tied
    if chunk:  # a tensor larger than a chunk is read in slices
        assert record["chunk_elements"] < max(array.size for array in tv.values())
    expected_labels = [f"{kind} τ={tau:g}" for kind in ("grad", "fisher") for tau in (taus or ((1.0,) if kind == "grad" else (2.0,)))]
    assert [method["label"] for method in record["methods"]] == expected_labels + ["uniform c=0.5", "tv"]
    references = {}
    for method in record["methods"]:
        if method["method"] in ("grad", "fisher"):
            weights = dense_weights(stats, kind=method["method"], tau=method["tau"])
            masks = fallback_masks(stats, method["method"])
        else:
            weights = {name: np.full(array.size, np.float32(1.0 if method["method"] == "tv" else 0.5)) for name, array in tv.items()}
            masks = {name: None for name in tv}
        references[method["label"]] = {name: figures_of(weights[name], tv[name], masks[name]) for name in tv}
    groups = {name: tensor_group(name) for name in tv}
    for label, per_tensor in references.items():
        for entry in record["tensors"]:
            _check(entry["w"][label], per_tensor[entry["tensor_name"]], rel=rel)
        _check(record["model"]["w"][label], combine(list(per_tensor.values())), rel=rel)
        for entry in record["layers"]:
            _check(entry["w"][label], combine([per_tensor[n] for n in tv if groups[n].layer == entry["layer"]]), rel=rel)
        for entry in record["module_kinds"]:
            _check(entry["w"][label], combine([per_tensor[n] for n in tv if groups[n].module_kind == entry["module_kind"]]), rel=rel)
        for entry in record["layer_module_cells"]:
            members = [per_tensor[n] for n in tv if (groups[n].layer, groups[n].module_kind) == (entry["layer"], entry["module_kind"])]
            _check(entry["w"][label], combine(members), histogram=False, rel=rel)
        model = combine(list(per_tensor.values()))
        assert record["effective_scale"][label] == pytest.approx(math.sqrt(model["wtv_sq"] / model["tv_sq"]), rel=rel)
        assert record["matched_alpha"][label] == pytest.approx(math.sqrt(model["tv_sq"] / model["wtv_sq"]), rel=rel)
    assert record["effective_scale"]["tv"] == 1.0 and record["model"]["w"]["tv"]["fraction_above_0_9"] == 1.0
    # Agreement: the cosine of ḡ_f and ḡ_r, and Spearman's ρ of F_f and F_r (all elements: the model is below the sample's target).
    assert record["model"]["grad_cosine"] == pytest.approx(grad_cosine(stats, list(tv)), abs=COSINE_ABS)
    for entry in record["layers"]:
        members = [n for n in tv if groups[n].layer == entry["layer"]]
        assert entry["grad_cosine"] == pytest.approx(grad_cosine(stats, members), abs=COSINE_ABS)
    forget, retain = load_checkpoint(stats / "forget.fisher"), load_checkpoint(stats / "retain.fisher")
    flat = {name: (forget[name].float().numpy().reshape(-1), retain[name].float().numpy().reshape(-1)) for name in tv}
    order = [entry["tensor_name"] for entry in record["tensors"]]
    assert record["rank_correlation"]["model_sample_elements"] == sum(array.size for array in tv.values())
    assert record["model"]["fisher_rank_correlation"] == pytest.approx(
        spearman(np.concatenate([flat[n][0] for n in order]), np.concatenate([flat[n][1] for n in order])), abs=1e-12
    )
    for entry in record["tensors"]:
        assert entry["fisher_rank_correlation"] == pytest.approx(spearman(*flat[entry["tensor_name"]]), abs=1e-12)
    markdown = (tmp_path / "out" / "inspect.md").read_text()
    assert "| STATS | fisher" in markdown and "## By layer" in markdown
    for plot in record["plots"]:
        assert (tmp_path / "out" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"w_histogram.png", "effective_scale_by_layer.png"} <= set(record["plots"])


def test_chunked_and_whole_tensor_passes_agree(models, tmp_path):
    inputs = models[True]
    options = dict(stats=inputs["stats"], theta0=inputs["theta0"], fgt=inputs["fgt"], rank_sample_elements=5000)
    whole, chunked = _run(tmp_path / "whole", **options), _run(tmp_path / "chunked", chunk_bytes="4KiB", **options)
    assert chunked["chunk_elements"] == 1024 and whole["chunk_elements"] > 10_000
    for first, second in zip(whole["tensors"], chunked["tensors"]):
        assert first["tensor_name"] == second["tensor_name"]
        # The sampled elements, hence every rank correlation, do not depend on the chunking.
        assert first["fisher_rank_correlation"] == second["fisher_rank_correlation"]
        for label, figures in first["w"].items():
            assert figures["histogram"] == second["w"][label]["histogram"]
            assert figures["mean_w"] == pytest.approx(second["w"][label]["mean_w"], rel=SUM_REL)
    assert whole["model"]["fisher_rank_correlation"] == chunked["model"]["fisher_rank_correlation"]
    assert whole["rank_correlation"]["model_sample_elements"] == chunked["rank_correlation"]["model_sample_elements"]


def test_a_sampled_rank_correlation_is_scipys_on_the_sampled_elements(models, tmp_path):
    from perta_stream.compute.rank_sample import model_sample_rate, sample_positions, tensor_sample_rate

    inputs = models[False]
    stats = inputs["stats"]
    record = _run(tmp_path / "out", stats=stats, rank_sample_elements=4000, chunk_bytes="4KiB")
    forget, retain = load_checkpoint(stats / "forget.fisher"), load_checkpoint(stats / "retain.fisher")
    total = sum(tensor.numel() for tensor in forget.values())
    rate = model_sample_rate(total, 4000)
    sampled: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for entry in record["tensors"]:
        name = entry["tensor_name"]
        tensor_rate = tensor_sample_rate(forget[name].numel(), rate)
        positions, in_model = sample_positions(name, forget[name].numel(), tensor_rate, rate / tensor_rate)
        f, r = forget[name].reshape(-1)[positions].numpy(), retain[name].reshape(-1)[positions].numpy()
        assert entry["fisher_rank_correlation"] == pytest.approx(spearman(f, r), abs=1e-12)
        sampled[name] = (f[in_model.numpy()], r[in_model.numpy()])
    model_f = np.concatenate([f for f, _ in sampled.values()])
    assert 3000 < model_f.size < 5000 == record["rank_correlation"]["model_sample_target"] + 1000
    assert record["rank_correlation"]["model_sample_elements"] == model_f.size
    assert record["model"]["fisher_rank_correlation"] == pytest.approx(spearman(model_f, np.concatenate([r for _, r in sampled.values()])), abs=1e-12)
    for entry in record["layers"]:
        members = [sampled[n] for n in sampled if tensor_group(n).layer == entry["layer"]]
        expected = spearman(np.concatenate([f for f, _ in members]), np.concatenate([r for _, r in members]))
        assert entry["fisher_rank_correlation"] == pytest.approx(expected, abs=1e-12)


def test_a_large_tensor_is_sampled_at_its_own_rate_whatever_the_chunks():
    from perta_stream.compute.figure_accumulator import FigureAccumulator
    from perta_stream.compute.rank_sample import TENSOR_SAMPLE_ELEMENTS, sample_positions, tensor_sample_rate
    from perta_stream.compute.weight_figures import WeightConfig

    generator = torch.Generator().manual_seed(0)
    numel = 20 * TENSOR_SAMPLE_ELEMENTS
    forget = (torch.randn(numel, generator=generator) * 1e-3).square()
    retain = (forget * 0.5 + (torch.randn(numel, generator=generator) * 1e-3).square()).to(torch.bfloat16)
    forget[::13] = 0.0  # ties
    results = []
    for chunks in ((numel,), (1000, 70_001, numel - 71_001)):
        accumulator = FigureAccumulator(
            configs=(WeightConfig("fisher", 2.0),), sides=("a",), kinds=("fisher",), task_vector=False, model_sample_rate=1e-3, block_elements=4096
        )
        accumulator.begin_tensor("model.layers.0.mlp.up_proj.weight", numel)
        start = 0
        for count in chunks:
            accumulator.add_chunk({"a:forget.fisher": forget[start : start + count], "a:retain.fisher": retain[start : start + count]}, start)
            start += count
        results.append(accumulator.end_tensor())
    rate = tensor_sample_rate(numel, 1e-3)
    positions, _ = sample_positions("model.layers.0.mlp.up_proj.weight", numel, rate, 1e-3 / rate)
    assert abs(positions.numel() - TENSOR_SAMPLE_ELEMENTS) < 5 * math.sqrt(TENSOR_SAMPLE_ELEMENTS)
    expected = spearman(forget[positions].numpy(), retain[positions].float().numpy())
    for figures in results:
        assert figures.sample_elements == positions.numel()
        assert figures.rank_correlations["a: F_f vs F_r"] == pytest.approx(expected, abs=1e-12)


def test_average_ranks_and_spearman_match_scipy_with_ties():
    from scipy.stats import rankdata

    from perta_stream.compute.rank_sample import average_ranks
    from perta_stream.compute.rank_sample import spearman as ours

    values = torch.tensor([3.0, 1.0, 3.0, 0.0, 0.0, 0.0, 2.5, 3.0])
    assert average_ranks(values).tolist() == rankdata(values.numpy()).tolist()
    other = torch.tensor([1.0, 2.0, 2.0, 0.0, 5.0, 0.0, 1.0, 7.0])
    assert ours(values, other) == pytest.approx(spearman(values.numpy(), other.numpy()), abs=1e-15)
    assert ours(values, torch.ones(8)) is None and ours(values[:1], other[:1]) is None


def test_compare_two_statistics_runs_against_the_dense_reference(models, tmp_path):
    inputs = models[True]
    a, b = inputs["stats"], inputs["stats_bf16"]
    record = _run(tmp_path / "out", stats=b, compare=a, theta0=inputs["theta0"], fgt=inputs["fgt"], chunk_bytes="4KiB")
    tv = task_vector(inputs["theta0"], inputs["fgt"])
    order = [entry["tensor_name"] for entry in record["tensors"]]
    assert [m["label"] for m in record["methods"]] == ["grad τ=1", "fisher τ=2"]
    for method in record["methods"]:
        label, kind, tau = method["label"], method["method"], method["tau"]
        w_a, w_b = dense_weights(a, kind=kind, tau=tau), dense_weights(b, kind=kind, tau=tau)
        first, second = np.concatenate([w_a[n] for n in order]), np.concatenate([w_b[n] for n in order])
        difference = np.abs(first - second)
        comparison = record["model"]["comparison"][label]
        assert comparison["fraction_moved"] == int((difference > np.float32(0.1)).sum()) / first.size
        assert comparison["mean_abs_difference"] == pytest.approx(difference.astype(np.float64).mean(), rel=SUM_REL)
        bins = [np.searchsorted(EDGES[1:-1], w, side="right") for w in (first, second)]
        assert np.array(comparison["joint_histogram"]).reshape(-1).tolist() == np.bincount(bins[0] * BINS + bins[1], minlength=BINS**2).tolist()
        assert comparison["w_rank_correlation"] == pytest.approx(spearman(first, second), abs=1e-12)
        for side, weights, stats in (("a", w_a, a), ("b", w_b, b)):
            masks = fallback_masks(stats, kind)
            _check(record["model"]["w"][side][label], combine([figures_of(weights[n], tv[n], masks[n]) for n in order]))
            assert record["effective_scale"][side][label] == record["model"]["w"][side][label]["effective_scale"]
        for entry in record["layers"]:
            members = [n for n in order if tensor_group(n).layer == entry["layer"]]
            moved = sum(int((np.abs(w_a[n] - w_b[n]) > np.float32(0.1)).sum()) for n in members)
            assert entry["comparison"][label]["fraction_moved"] == moved / sum(w_a[n].size for n in members)
    assert record["statistics"]["a"]["location"] == str(a) and record["statistics"]["b"]["location"] == str(b)
    assert {"w_histogram.png", "compare_grad_tau1.png", "compare_fisher_tau2.png"} <= set(record["plots"])


def test_module_kinds_layers_and_experts_from_checkpoint_names():
    expected = {
        "model.embed_tokens.weight": (None, "embedding", None),
        "lm_head.weight": (None, "head", None),
        "model.norm.weight": (None, "norm", None),
        "model.layers.3.self_attn.q_proj.weight": (3, "q", None),
        "model.layers.3.self_attn.k_proj.bias": (3, "k", None),
        "model.layers.3.self_attn.q_norm.weight": (3, "norm", None),
        "model.layers.12.self_attn.qkv_proj.weight": (12, "qkv", None),
        "model.layers.12.mlp.gate_up_proj.weight": (12, "gate_up", None),
        "model.layers.0.post_feedforward_layernorm.weight": (0, "norm", None),
        "model.layers.1.mlp.down_proj.weight": (1, "down", None),
        "model.layers.2.block_sparse_moe.gate.weight": (2, "router", None),
        "model.layers.2.block_sparse_moe.experts.7.w1.weight": (2, "expert gate", 7),
        "model.layers.2.block_sparse_moe.experts.7.w2.weight": (2, "expert down", 7),
        "model.layers.2.block_sparse_moe.experts.7.w3.weight": (2, "expert up", 7),
        "model.layers.5.mlp.gate.weight": (5, "router", None),
        "model.layers.5.mlp.experts.0.gate_proj.weight": (5, "expert gate", 0),
        "model.layers.5.mlp.experts.gate_up_proj": (5, "expert gate_up", None),
        "model.layers.5.mlp.something_new.weight": (5, "other", None),
    }
    for tensor_name, (layer, kind, expert) in expected.items():
        group = tensor_group(tensor_name)
        assert (group.layer, group.module_kind, group.expert) == (layer, kind, expert), tensor_name


def test_a_mixture_of_experts_model_is_aggregated_per_expert(tmp_path):
    from merge_fixtures import write_checkpoint

    tensors = {}
    for layer in range(2):
        tensors[f"model.layers.{layer}.block_sparse_moe.gate.weight"] = torch.randn(4, 8)
        for expert in range(4):
            for name in ("w1", "w2", "w3"):
                tensors[f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{name}.weight"] = torch.randn(8, 8)
    tensors["model.embed_tokens.weight"] = torch.randn(16, 8)
    write_checkpoint(tmp_path / "theta0", tensors, shards=3)
    stats = write_stats(tmp_path / "stats", tmp_path / "theta0")
    record = _run(tmp_path / "out", stats=stats, methods=("fisher",))
    assert [entry["expert"] for entry in record["experts"]] == [0, 1, 2, 3]
    assert all(entry["tensors"] == 6 for entry in record["experts"])
    kinds = [entry["module_kind"] for entry in record["module_kinds"]]
    assert kinds == ["embedding", "router", "expert gate", "expert up", "expert down"]
    weights = dense_weights(stats, kind="fisher", tau=2.0)
    members = [n for n in weights if ".experts.2." in n]
    assert record["experts"][2]["w"]["fisher τ=2"]["mean_w"] == pytest.approx(
        np.concatenate([weights[n] for n in members]).astype(np.float64).mean(), rel=SUM_REL
    )
    assert "## By expert" in (tmp_path / "out" / "inspect.md").read_text()


# ---------------------------------------------------------------------------- bad input
def _one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_statistics_without_the_kind_asked_for_is_one_line(models, tmp_path, capsys):
    inputs = models[True]
    grad_only = write_stats(tmp_path / "grad_only", inputs["theta0"], kinds=("grad",))
    err = _one_line_error(capsys, ["inspect", str(grad_only), "--methods", "fisher", "--out", str(tmp_path / "out")])
    assert "hold grad, not fisher" in err and "--kinds fisher" in err
    # By default inspect takes the kinds the statistics hold.
    assert [m["label"] for m in _run(tmp_path / "ok", stats=grad_only)["methods"]] == ["grad τ=1", "uniform c=0.5", "tv"]
    record = json.loads((grad_only / "perta_stats.json").read_text())
    (grad_only / "perta_stats.json").write_text(json.dumps({**record, "kinds": []}))
    err = _one_line_error(capsys, ["inspect", str(grad_only), "--out", str(tmp_path / "out")])
    assert "no statistics kind to inspect" in err and "holds no kinds" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_task_vector_of_another_architecture_is_one_line(models, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    inputs = models[True]
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "intermediate_size": 128}, tie_word_embeddings=True)).save_pretrained(tmp_path / "wider")
    err = _one_line_error(
        capsys, ["inspect", str(inputs["stats"]), "--theta0", str(tmp_path / "wider"), "--fgt", str(inputs["fgt"]), "--out", str(tmp_path / "out")]
    )
    assert f"--theta0 {tmp_path / 'wider'} does not match the statistics" in err and "has shape [64, 128], the statistics [64, 96]" in err
    assert "(and 5 more)" in err
    # Untied θ_fgt against tied statistics: it holds a head the statistics lack.
    err = _one_line_error(
        capsys, ["inspect", str(inputs["stats"]), "--theta0", str(inputs["theta0"]), "--fgt", str(models[False]["fgt"]), "--out", str(tmp_path / "out")]
    )
    assert "it holds tensor 'lm_head.weight', which the statistics lack" in err


def test_a_task_vector_of_another_model_with_the_same_shapes_is_refused(models, tmp_path, capsys):
    inputs = models[True]
    err = _one_line_error(
        capsys, ["inspect", str(inputs["stats"]), "--theta0", str(inputs["full"]), "--fgt", str(inputs["fgt"]), "--out", str(tmp_path / "out")]
    )
    assert "whose tensors differ from --theta0" in err and not (tmp_path / "out").exists()
    # Statistics taken at θ_full are checked against nothing inspect reads, and say so.
    record = _run(tmp_path / "full", stats=inputs["stats"], theta0=inputs["full"], fgt=inputs["fgt"], stats_at="full")
    assert record["stats_check"].startswith("not checked")


def test_mismatched_statistics_and_options_are_reported_together(models, tmp_path):
    inputs = models[True]
    broken = Path(shutil.copytree(inputs["stats"], tmp_path / "broken"))
    other = write_stats(tmp_path / "other", models[False]["theta0"])
    shutil.rmtree(broken / "retain.fisher")
    shutil.copytree(other / "retain.fisher", broken / "retain.fisher")
    with pytest.raises(PlanError) as caught:
        run_inspect(InspectConfig(stats=str(broken), out=str(tmp_path / "out"), methods=("fisher",)))
    assert f"statistics {broken / 'retain.fisher'} does not match the statistics {broken / 'forget.fisher'}" in str(caught.value)
    with pytest.raises(PlanError) as caught:
        InspectConfig(stats=str(broken), out=str(tmp_path / "out"), theta0=str(inputs["theta0"]), methods=("magic",), taus=(1.0, 1.0))
    text = str(caught.value)
    assert "--theta0 and --fgt go together" in text and "'magic' is unknown" in text and "same value twice" in text
    with pytest.raises(PlanError, match="computed at different models"):
        run_inspect(InspectConfig(stats=str(inputs["stats"]), compare=str(other), out=str(tmp_path / "out")))
    with pytest.raises(PlanError, match="overlaps the statistics input"):
        run_inspect(InspectConfig(stats=str(inputs["stats"]), out=str(inputs["stats"] / "inspect")))
    with pytest.raises(UsageError, match="unknown option 'alpah'"):
        InspectConfig.from_options({"stats": str(inputs["stats"]), "out": str(tmp_path / "o"), "alpah": 1})


def test_non_finite_statistics_are_refused_naming_the_tensor(models, tmp_path):
    from safetensors.torch import load_file, save_file

    inputs = models[True]
    broken = Path(shutil.copytree(inputs["stats"], tmp_path / "nan"))
    shard = sorted((broken / "forget.fisher").glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[5] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match=f"tensor '{name}': NaN or infinite values in a:forget.fisher"):
        run_inspect(InspectConfig(stats=str(broken), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_cli_dry_run_overwrite_and_api(models, tmp_path, capsys):
    import perta_stream as ps

    inputs = models[True]
    argv = ["inspect", str(inputs["stats"]), "--theta0", str(inputs["theta0"]), "--fgt", str(inputs["fgt"]), "--out", str(tmp_path / "out")]
    assert main([*argv, "--dry-run"]) == 0
    assert "inspect plan: grad τ=1, fisher τ=2, uniform c=0.5, tv" in capsys.readouterr().out and not (tmp_path / "out").exists()
    assert main(argv) == 0
    assert "effective scale grad τ=1" in capsys.readouterr().err
    _one_line_error(capsys, argv)  # exists: --overwrite replaces only an earlier inspect output
    assert main([*argv, "--overwrite", "-q"]) == 0
    result = ps.inspect(stats=inputs["stats"], out=tmp_path / "api", theta0=inputs["theta0"], fgt=inputs["fgt"], method="fisher", tau=[1, 2])
    assert list(result.effective_scales) == ["fisher τ=1", "fisher τ=2"]
    assert result.record["effective_scale"]["fisher τ=2"] == result.effective_scales["fisher τ=2"]
