"""`unlearn --model MINE --lora R`: θ_fgt made as a LoRA adapter in the work folder, read by the
merge and the one pass as `--fgt`; its own work-folder key; reused; the memory advice of a dry run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from merge_fixtures import tree_digest
from stats_fixtures import save_tiny_model, write_data

from perta_stream.cli import main, parse_arguments
from perta_stream.config.unlearn import UnlearnConfig
from perta_stream.errors import PertaStreamError
from perta_stream.pipelines.unlearn import run_unlearn

pytest.importorskip("peft")

TRAINING = ["--epochs", "2", "--lr", "1e-2", "--device", "cpu"]
LORA = ["--lora", "4", "--lora-alpha", "12"]  # alpha not the default 2 x rank


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("unlearn_lora")
    forget, retain = write_data(root / "data")
    return {"root": root, "mine": save_tiny_model(root / "models", "llama"), "forget": forget, "retain": retain}


def _args(ws: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["unlearn", "--model", str(ws["mine"]), "--forget", str(ws["forget"]), "--retain", str(ws["retain"]), "--out", str(out), *TRAINING, "--no-eval", *extra]


def _run(args: list[str], lines: list[str] | None = None):
    return run_unlearn(UnlearnConfig.from_cli(parse_arguments(args)), on_stage=None if lines is None else lines.append)


def _shards(folder: Path) -> dict[str, str]:
    return {name: digest for name, digest in tree_digest(folder).items() if name.endswith(".safetensors")}


@pytest.fixture(scope="module")
def lora_run(workspace):
    out = workspace["root"] / "runs" / "clean"
    lines: list[str] = []
    return out, _run(_args(workspace, out, *LORA, "--alpha", "0.5,1"), lines), lines


def test_lora_theta_fgt_is_finetune_lora_then_merge_byte_for_byte(workspace, lora_run, tmp_path):
    out, result, lines = lora_run
    fgt = Path(result.fgt_dir)
    assert fgt.parent == out / "perta_work" and fgt.name.startswith("fgt-lora-") and not result.fgt_reused
    assert (fgt / "adapter_config.json").is_file() and not list(fgt.glob("model*.safetensors"))
    assert any(line.startswith("[unlearn] theta_fgt: fine-tuning a rank-4 LoRA adapter of ") for line in lines)
    # By hand: finetune --lora, the statistics at the model, merge with the adapter as --fgt.
    mine, forget, retain = (str(workspace[name]) for name in ("mine", "forget", "retain"))
    adapter, stats, reference = tmp_path / "adapter", tmp_path / "stats", tmp_path / "reference"
    assert main(["finetune", "--model", mine, "--data", forget, "--out", str(adapter), *LORA, *TRAINING, "-q"]) == 0
    assert main(["stats", "--model", mine, "--forget", forget, "--retain", retain, "--out", str(stats), "--kinds", "fisher", "--device", "cpu", "-q"]) == 0
    merge = ["merge", "--theta0", mine, "--full", mine, "--fgt", str(adapter), "--method", "fisher", "--stats", str(stats)]
    assert main([*merge, "--alpha", "0.5,1", "--out", str(reference), "-q"]) == 0
    assert _shards(adapter) == _shards(fgt) and _shards(adapter)
    for alpha in ("alpha_0.5", "alpha_1"):
        assert _shards(out / alpha) == _shards(reference / alpha) and _shards(reference / alpha)
    # The one pass reads the same adapter (reused from the work folder) and writes the same bytes.
    one_pass = _run(_args(workspace, tmp_path / "one_pass", *LORA, "--alpha", "0.5,1", "--one-pass", "--work-dir", str(fgt.parent)))
    assert one_pass.fgt_dir == str(fgt) and one_pass.fgt_reused and one_pass.one_pass
    for alpha in ("alpha_0.5", "alpha_1"):
        assert _shards(tmp_path / "one_pass" / alpha) == _shards(reference / alpha)


def test_a_second_run_reuses_the_adapter(workspace, lora_run, capsys):
    out, result, _ = lora_run
    made = {path: path.stat().st_mtime_ns for path in Path(result.fgt_dir).rglob("*")}
    assert main(_args(workspace, out, *LORA, "--alpha", "0.5,1", "--overwrite")) == 0
    assert f"reusing {result.fgt_dir}" in capsys.readouterr().err
    assert {path: path.stat().st_mtime_ns for path in Path(result.fgt_dir).rglob("*")} == made
    # The dry run plans with the adapter itself: the one pass reads the model for the forward and the backward only.
    plan = _run(_args(workspace, out, *LORA, "--alpha", "0.5,1", "--overwrite", "--one-pass", "--dry-run")).plan_text
    assert f"theta_fgt: reuse {result.fgt_dir}" in plan and f"input fgt            {result.fgt_dir}  (LoRA adapter, rank 4" in plan
    assert "the one pass reads it once for the forward and once for the backward, whose loaded weights the merge takes" in plan
    assert "this rank-4 adapter θ_fgt, θ_full = θ_0" in plan


def test_full_and_lora_theta_fgt_never_share_a_folder(workspace, lora_run, tmp_path):
    from perta_stream.pipelines.forget_model import forget_model_config
    from perta_stream.sinks.work_folder import WorkFolder

    out, result, _ = lora_run
    work, digest = WorkFolder(tmp_path / "work"), "ab" * 32

    def folder(*extra: str) -> str:
        return forget_model_config(UnlearnConfig.from_cli(parse_arguments(_args(workspace, out, *extra))), work, digest).out

    full, lora, rank8, alpha16 = folder(), folder(*LORA), folder("--lora", "8", "--lora-alpha", "12"), folder("--lora", "4", "--lora-alpha", "16")
    assert len({full, lora, rank8, alpha16}) == 4
    # A LoRA θ_fgt trains at LoRA's default learning rate unless --lr says otherwise.
    def default_lr(*extra: str) -> float:
        args = _args(workspace, out, *extra)
        del args[args.index("--lr") : args.index("--lr") + 2]
        return UnlearnConfig.from_cli(parse_arguments(args)).lr

    assert (default_lr(*LORA), default_lr()) == (1e-4, 1e-5)
    assert Path(full).name.startswith("fgt-abababab-") and Path(lora).name.startswith("fgt-lora-abababab-")
    # In the folder the LoRA run made its adapter in, a full θ_fgt is still to be made.
    plan = _run(_args(workspace, out, "--alpha", "0.5,1", "--overwrite", "--dry-run")).plan_text
    first = plan.splitlines()[0]
    assert first.startswith(f"theta_fgt: fine-tune {workspace['mine']} on ") and result.fgt_dir not in plan


def test_a_dry_run_says_to_use_lora_when_a_full_finetune_does_not_fit(workspace, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import perta_stream.memory

    out = tmp_path / "dry" / "clean"
    parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(workspace["mine"]).parameters())  # tied: once
    for memory_bytes, advised in ((16 * parameters - 1, True), (16 * parameters, False)):
        monkeypatch.setattr(perta_stream.memory, "training_memory_bytes", lambda device, size=memory_bytes: (size, "the GPU's memory"))
        plan = _run(_args(workspace, out, "--dry-run")).plan_text
        advice = [line for line in plan.splitlines() if "add --lora" in line or "(--lora 16)" in line]
        assert len(advice) == (1 if advised else 0), plan
        if advised:
            assert advice[0].startswith(f"theta_fgt: a full fine-tune needs about {16 * parameters / 1024:.2f} KiB ({parameters:,} parameters x 16 bytes")
        # With --lora nothing is advised, whatever the memory.
        assert "a full fine-tune needs" not in _run(_args(workspace, out, *LORA, "--dry-run")).plan_text
    assert not (tmp_path / "dry").exists()


def test_lora_advice_figures():
    from perta_stream.plan.finetune_memory import finetune_bytes, lora_advice, lora_parameter_count

    shapes = {"model.embed_tokens.weight": (1000, 256), "model.layers.0.mlp.up_proj.weight": (1024, 256), "model.layers.0.input_layernorm.weight": (256,)}
    parameters = 1000 * 256 + 1024 * 256 + 256
    assert lora_parameter_count(shapes, 16) == 16 * (1024 + 256)
    assert finetune_bytes(shapes, None) == 16 * parameters
    assert finetune_bytes(shapes, 16) == 4 * parameters + 16 * 16 * (1024 + 256)
    assert lora_advice(shapes, 16 * parameters, "the GPU's memory") is None
    fits = lora_advice(shapes, 16 * parameters - 1, "the GPU's memory")
    assert fits is not None and fits.endswith("add --lora 16 (a rank-16 LoRA adapter needs about 2.29 MiB, the frozen weights in float32)")
    too_small = lora_advice(shapes, 1000, "this machine's available RAM")
    assert too_small is not None and "more than this machine's available RAM (1000 B)" in too_small and "give --theta0, --full and --fgt" in too_small


def test_lora_options_are_checked_and_reach_every_entry(workspace, tmp_path):
    out = str(tmp_path / "x")
    common = ["--forget", str(workspace["forget"]), "--retain", str(workspace["retain"]), "--out", out]
    mine = str(workspace["mine"])
    with pytest.raises(PertaStreamError) as caught:
        UnlearnConfig.from_cli(parse_arguments(["unlearn", "--theta0", mine, "--full", mine, "--fgt", mine, *common, "--lora", "4"]))
    assert "--lora makes theta_fgt from --model as an adapter" in str(caught.value)
    with pytest.raises(PertaStreamError) as caught:
        UnlearnConfig.from_cli(parse_arguments(["unlearn", "--model", mine, *common, "--lora", "0", "--max-steps", "0"]))
    assert "--lora must be a rank of at least 1, got 0" in str(caught.value) and "--max-steps" in str(caught.value)
    with pytest.raises(PertaStreamError, match="--lora-alpha applies to a LoRA theta_fgt; add --lora R"):
        UnlearnConfig.from_cli(parse_arguments(["unlearn", "--model", mine, *common, "--lora-alpha", "8"]))
    # The YAML file and the Python API's keywords are the flags' words.
    yaml = tmp_path / "run.yaml"
    yaml.write_text(f"model: {mine}\nforget: {workspace['forget']}\nretain: {workspace['retain']}\nout: {out}\nlora: 8\nlora-alpha: 4\n", encoding="utf-8")
    from_yaml = UnlearnConfig.from_cli(parse_arguments(["unlearn", "--config", str(yaml)]))
    from_api = UnlearnConfig.from_options({"model": mine, "forget": workspace["forget"], "retain": workspace["retain"], "out": out, "lora": 8, "lora_alpha": 4})
    assert (from_yaml.lora_rank, from_yaml.lora_alpha) == (from_api.lora_rank, from_api.lora_alpha) == (8, 4.0)
    assert not Path(out).exists()


def test_the_finetune_record_of_the_adapter_names_its_lora_options(lora_run):
    _, result, _ = lora_run
    record = json.loads((Path(result.fgt_dir) / "perta_finetune.json").read_text())
    assert (record["config"]["lora_rank"], record["config"]["lora_alpha"], record["steps"]) == (4, 12.0, 4)
