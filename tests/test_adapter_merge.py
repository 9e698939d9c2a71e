"""`merge` with a PEFT LoRA adapter as θ_fgt equals PerTA on PEFT's own dense θ_fgt.

The adapters are made by peft on tiny models (≥3 shards; a tied bfloat16 Llama, an untied float32
one, a GPT-2 with Conv1D layers for fan_in_fan_out), with every factor non-zero. The reference is
θ_fgt = peft's `merge_and_unload` of θ_0 + adapter in float64, then PerTA in float64 with the
weights W of the statistics (numpy, merge_fixtures.reference_weights). Tolerance, per element:
the float32 rounding of what is summed — r products for s·B@A (rank r), a row's squares for
DoRA's norm, a handful of operations after — relative to the magnitudes summed (s·|B|@|A|, |θ_0|,
|θ_fgt|), plus one bfloat16 rounding for bfloat16 outputs. Tensors the adapter leaves alone are
θ_full's bytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from adapter_fixtures import ALL_LINEAR, make_adapter, peft_dense_fgt, peft_logits  # noqa: E402
from merge_fixtures import load_checkpoint, reference_weights, save_tiny_llama, shard_names, write_stats  # noqa: E402
from perta_stream.cli import main  # noqa: E402
from perta_stream.config.merge import MergeConfig  # noqa: E402
from perta_stream.pipelines.merge import run_merge  # noqa: E402

EPS32 = 2.0**-24
CHUNK_BYTES = 4096  # smaller than most tensors: chunks start and end inside rows
ALPHAS = (0.5, 2.0)
ADAPTERS = {
    "all-linear-rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=ALL_LINEAR),
    "regex-patterns": dict(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|v_proj|down_proj)", rank_pattern={"q_proj": 8}, alpha_pattern={"down_proj": 32}),
    "layers-to-transform": dict(r=4, lora_alpha=8, target_modules=["k_proj", "up_proj"], layers_to_transform=[1], alpha_pattern={"model.layers.1.up_proj": 2}),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True),
    "trainable-tokens": dict(r=4, lora_alpha=8, target_modules=["o_proj"], trainable_token_indices=[3, 5, 90]),
    "modules-to-save": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["norm"]),
}
UNTIED_ONLY = {
    "embedding-lora": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "gate_proj"]),
    "lm-head-saved": dict(r=4, lora_alpha=8, target_modules=["up_proj"], modules_to_save=["lm_head"]),
}


@pytest.fixture(scope="module", params=[(True, torch.bfloat16), (False, torch.float32)], ids=["tied-bf16", "untied-fp32"])
def models(request, tmp_path_factory):
    tied, dtype = request.param
    root = tmp_path_factory.mktemp("adapter-models")
    base = save_tiny_llama(root / "theta0", tied=tied, dtype=dtype, seed=0)
    save_tiny_llama(root / "full", tied=tied, dtype=dtype, seed=1, base=base)
    stats = write_stats(root / "stats", root / "theta0")
    assert len(shard_names(root / "full")) >= 3
    return root, tied, dtype, stats


def _merge(root: Path, adapter: Path, out: Path, method: str, stats: Path, **extra) -> object:
    return run_merge(
        MergeConfig(
            theta0=str(root / "theta0"), full=str(root / "full"), fgt=str(adapter), out=str(out), method=method, alphas=ALPHAS,
            stats=str(stats) if method != "tv" else None, chunk_bytes=CHUNK_BYTES, max_memory_bytes=8 * 2**30, **extra,
        )
    )


def _assert_equals_peft(root: Path, adapter: Path, out: Path, method: str, stats: Path) -> None:
    fgt, low_rank = peft_dense_fgt(root / "theta0", adapter)
    theta0, full = load_checkpoint(root / "theta0"), load_checkpoint(root / "full")
    kind = method if method != "tv" else None
    changed = [name for name in theta0 if not torch.equal(fgt[name], theta0[name].double())]
    assert changed, "the adapter changes nothing: the test would prove nothing"
    for alpha in ALPHAS:
        result = load_checkpoint(out / f"alpha_{alpha:g}")
        assert set(result) == set(full)
        for name, got in result.items():
            if name not in changed:
                assert got.dtype == full[name].dtype and torch.equal(got.view(-1).view(torch.uint8), full[name].view(-1).view(torch.uint8)), name
                continue
            weights = torch.ones(got.shape, dtype=torch.float64)
            if kind:
                forget, retain = (load_checkpoint(stats / f"{d}.{kind}")[name] for d in ("forget", "retain"))
                weights = torch.from_numpy(reference_weights(forget.float().numpy(), retain.float().numpy(), kind=kind, tau=1.0 if kind == "grad" else 2.0, fallback_weight=0.5)).double()
            base, full64 = theta0[name].double(), full[name].double()
            expected = full64 - alpha * weights * (fgt[name] - base)
            # What float32 sums and rounds: r products per LoRA element, a row of squares for DoRA's norm.
            product, rank = low_rank.get(name, (torch.zeros_like(base), 0))
            row_terms = base.shape[-1] if "dora" in str(adapter) else 0
            bound = EPS32 * (2 * expected.abs() + alpha * ((rank + 4) * product + (row_terms + 6) * (fgt[name].abs() + base.abs())))
            if got.dtype == torch.bfloat16:
                bound = bound + 2.0 ** (torch.floor(torch.log2(expected.abs().clamp_min(1e-30))) - 7)
            error = (got.double() - expected).abs()
            assert bool((error <= bound).all()), f"{name} α={alpha}: worst {float((error - bound).max()):.3e} beyond the bound"
            if got.dtype == torch.float32:
                assert float(error.norm() / expected.norm()) <= 1e-6, name


@pytest.mark.parametrize("method", ["tv", "grad", "fisher"])
@pytest.mark.parametrize("adapter_name", list(ADAPTERS) + list(UNTIED_ONLY))
def test_adapter_merge_equals_peft_merge_and_unload(models, adapter_name, method, tmp_path):
    root, tied, dtype, stats = models
    options = {**ADAPTERS, **UNTIED_ONLY}[adapter_name]
    if tied and adapter_name in UNTIED_ONLY:
        pytest.skip("a tied model refuses an adapter on one half of its embedding (test_refusals)")
    adapter = make_adapter(root / "theta0", tmp_path / f"adapter-{adapter_name}", dtype=dtype, **options)
    result = _merge(root, adapter, tmp_path / "out", method, stats)
    _assert_equals_peft(root, adapter, tmp_path / "out", method, stats)
    # Neither θ_0 nor θ_fgt is streamed: only θ_full, the factors and the statistics (θ_0's rows for DoRA and tokens).
    full_bytes = sum(p.stat().st_size for p in (root / "full").glob("*.safetensors"))
    stats_bytes = sum(p.stat().st_size for p in stats.glob(f"*.{method}/*.safetensors")) if method != "tv" else 0
    theta0_bytes = sum(p.stat().st_size for p in (root / "theta0").glob("*.safetensors"))
    assert result.bytes_read <= full_bytes + stats_bytes + (adapter / "adapter_model.safetensors").stat().st_size + theta0_bytes * (adapter_name in ("dora", "modules-to-save", "trainable-tokens", "embedding-lora", "lm-head-saved"))


def test_fan_in_fan_out_conv1d(tmp_path):
    """GPT-2's Conv1D layers store (in, out): the change is (B@A)ᵀ."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)).save_pretrained(tmp_path / "theta0", max_shard_size="24KB")
    shutil.copytree(tmp_path / "theta0", tmp_path / "full")
    stats = write_stats(tmp_path / "stats", tmp_path / "theta0")
    adapter = make_adapter(tmp_path / "theta0", tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    _merge(tmp_path, adapter, tmp_path / "out", "fisher", stats)
    _assert_equals_peft(tmp_path, adapter, tmp_path / "out", "fisher", stats)


def test_adapter_with_and_without_the_peft_prefix_give_the_same_bytes(models, tmp_path):
    from safetensors.torch import load_file, save_file

    root, _, dtype, stats = models
    adapter = make_adapter(root / "theta0", tmp_path / "adapter", dtype=dtype, **ADAPTERS["all-linear-rslora"])
    bare = tmp_path / "bare"
    shutil.copytree(adapter, bare)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k.removeprefix("base_model.model."): v for k, v in tensors.items()}, str(bare / "adapter_model.safetensors"))
    for folder in (adapter, bare):
        _merge(root, folder, tmp_path / f"out-{folder.name}", "grad", stats)
    for alpha in ALPHAS:
        for name in ("model.safetensors.index.json", *shard_names(root / "full")):
            a, b = (tmp_path / f"out-{f}" / f"alpha_{alpha:g}" / name for f in ("adapter", "bare"))
            assert a.read_bytes() == b.read_bytes()


def test_tied_embedding_lora_changes_the_shared_weight_once(tmp_path):
    """With ensure_weight_tying both halves carry one LoRA; the adapted model's function is θ_0 + d
    in the one tied tensor (peft's merge_and_unload adds d twice to the shared weight, so the
    reference here is the adapted model's logits)."""
    root = tmp_path
    save_tiny_llama(root / "theta0", tied=True, dtype=torch.float32, seed=0)
    shutil.copytree(root / "theta0", root / "full")
    adapter = make_adapter(root / "theta0", root / "adapter", r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], ensure_weight_tying=True)
    run_merge(MergeConfig(theta0=str(root / "theta0"), full=str(root / "full"), fgt=str(adapter), out=str(root / "out"), max_memory_bytes=8 * 2**30))
    theta0, out = load_checkpoint(root / "theta0"), load_checkpoint(root / "out")
    # out = θ_0 − TV with α = 1: θ_0 + TV is θ_fgt; its logits must be the adapted model's.
    fgt = {name: 2 * theta0[name].double() - out[name].double() for name in theta0}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "theta0", dtype=torch.float64)
    model.load_state_dict(fgt, strict=False)
    ids = torch.arange(1, 40).reshape(1, -1)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    adapted = peft_logits(root / "theta0", adapter, ids)
    assert float((ours - adapted).abs().max()) <= 1e-4 * float(adapted.abs().max())


def _cli_refuses(args: list[str], phrase: str, out: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["merge", *args, "--out", str(out), "-q"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and phrase in err, err
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_refusals_say_one_line_and_write_nothing(tmp_path, capsys):
    from peft import LoHaConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path
    save_tiny_llama(root / "theta0", tied=True, dtype=torch.float32, seed=0)
    models = ["--theta0", str(root / "theta0"), "--full", str(root / "theta0")]
    plain = make_adapter(root / "theta0", root / "plain", r=4, lora_alpha=8, target_modules=["q_proj"])
    cases: dict[str, tuple[Path, str]] = {}
    loha = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "theta0"), LoHaConfig(r=4, target_modules=["q_proj"]))
    loha.save_pretrained(root / "loha")
    cases["loha"] = (root / "loha", "is a LOHA adapter")
    pissa = root / "pissa"
    shutil.copytree(plain, pissa)
    config = json.loads((pissa / "adapter_config.json").read_text())
    (pissa / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa"}))
    cases["pissa"] = (pissa, "changed the base model's weights")
    cases["tied-half"] = (make_adapter(root / "theta0", root / "tied-half", r=4, lora_alpha=8, target_modules=["embed_tokens"]), "ensure_weight_tying=True")
    renamed = root / "renamed"
    shutil.copytree(plain, renamed)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(plain / "adapter_model.safetensors"))
    save_file({k.replace("model.layers", "model.decoder.layers"): v for k, v in tensors.items()}, str(renamed / "adapter_model.safetensors"))
    cases["module-names"] = (renamed, "does not hold")
    wide = root / "wide"
    save_tiny_llama(wide, tied=True, dtype=torch.float32, seed=0)
    cfg = json.loads((wide / "config.json").read_text())
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**{**cfg, "intermediate_size": 128})).save_pretrained(root / "wide2")
    cases["shapes"] = (make_adapter(root / "wide2", root / "wide-adapter", r=4, lora_alpha=8, target_modules=["up_proj"]), "another model")
    pickled = root / "pickled"
    shutil.copytree(plain, pickled)
    (pickled / "adapter_model.safetensors").unlink()
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    cases["bin"] = (pickled, "pickle")
    for name, (adapter, phrase) in cases.items():
        _cli_refuses([*models, "--fgt", str(adapter)], phrase, root / f"out-{name}", capsys)


def count_reads(monkeypatch) -> dict[str, int]:
    """Bytes read through LocalByteSource, per checkpoint folder."""
    from perta_stream.sources import byte_source

    counts: dict[str, int] = {}
    original = byte_source.LocalByteSource.read_into

    def counting(self, file_name, offset, buffer):  # noqa: ANN001
        counts[self._root.name] = counts.get(self._root.name, 0) + len(buffer.cast("B") if buffer.format != "B" else buffer)
        return original(self, file_name, offset, buffer)

    monkeypatch.setattr(byte_source.LocalByteSource, "read_into", counting)
    return counts


def test_stats_identity_without_streaming_theta0(models, tmp_path, capsys, monkeypatch):
    """The statistics' identity is checked by θ_0's files when θ_0's bytes are not streamed (no θ_0
    byte read); else θ_0 is hashed whole first; statistics of another θ_0 are refused before anything is written."""
    from perta_stream.sources.checkpoint import open_local_checkpoint

    root, _, dtype, stats = models
    adapter = make_adapter(root / "theta0", tmp_path / "adapter", dtype=dtype, **ADAPTERS["all-linear-rslora"])
    recorded = tmp_path / "stats-files"
    shutil.copytree(stats, recorded)
    record = json.loads((recorded / "perta_stats.json").read_text())
    theta0 = open_local_checkpoint(root / "theta0", "theta0")
    record["model"].update(header_sha256=theta0.header_sha256, files=theta0.file_identity())
    (recorded / "perta_stats.json").write_text(json.dumps(record))
    counts = count_reads(monkeypatch)
    by_files = _merge(root, adapter, tmp_path / "by-files", "fisher", recorded)
    assert counts.get("theta0", 0) == 0
    hashed = _merge(root, adapter, tmp_path / "hashed", "fisher", stats)
    theta0 = open_local_checkpoint(root / "theta0", "theta0")
    assert counts["theta0"] == theta0.total_bytes  # the hash pass: θ_0 read once, whole
    assert by_files.bytes_read == hashed.bytes_read  # the plan's reads; the hash pass is on top of them
    merged_record = json.loads((tmp_path / "by-files" / "alpha_2" / "perta_merge.json").read_text())
    assert merged_record["stats_content_sha256"] == record["model"]["content_sha256"]
    # Statistics of another θ_0 (the record says so by content): refused, nothing committed.
    other = tmp_path / "stats-other"
    shutil.copytree(stats, other)
    record = json.loads((other / "perta_stats.json").read_text())
    record["model"]["content_sha256"] = "0" * 64
    (other / "perta_stats.json").write_text(json.dumps(record))
    args = ["--theta0", str(root / "theta0"), "--full", str(root / "full"), "--fgt", str(adapter), "--method", "fisher", "--stats", str(other), "--max-memory", "8GiB"]
    _cli_refuses(args, "whose tensors differ", tmp_path / "refused", capsys)


def test_merge_with_an_adapter_fits_the_default_budget_without_importing_peft(models, tmp_path):
    """The CLI in a fresh process (peft not imported): peft reads the config in a child process, so
    the merge keeps --max-memory's default 512 MiB and gives the bytes of the in-process reading."""
    import os
    import subprocess
    import sys

    root, _, dtype, stats = models
    adapter = make_adapter(root / "theta0", tmp_path / "adapter", dtype=dtype, **ADAPTERS["regex-patterns"])
    _merge(root, adapter, tmp_path / "in-process", "tv", stats)
    env = {k: v for k, v in os.environ.items() if k != "PERTA_MAX_MEMORY"}
    command = [sys.executable, "-m", "perta_stream", "merge", "--theta0", str(root / "theta0"), "--full", str(root / "full"), "--fgt", str(adapter),
               "--alpha", "0.5,2", "--chunk-size", str(CHUNK_BYTES), "--out", str(tmp_path / "child"), "-q"]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert completed.returncode == 0, completed.stderr[-2000:]
    for alpha in ALPHAS:
        for name in shard_names(root / "full"):
            assert (tmp_path / "child" / f"alpha_{alpha:g}" / name).read_bytes() == (tmp_path / "in-process" / f"alpha_{alpha:g}" / name).read_bytes()
