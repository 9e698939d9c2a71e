"""`finetune --lora R` writes a PEFT adapter: PeftModel loads it, and `merge` reads the same change.

The adapted model's logits through PeftModel's forward equal those of θ_0 + TV, where TV is what
`merge` computes from the adapter (read back as θ_0 − out with θ_full = θ_0, tv, α = 1).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from adapter_fixtures import peft_logits  # noqa: E402
from merge_fixtures import load_checkpoint  # noqa: E402
from perta_stream.cli import main  # noqa: E402
from perta_stream.errors import PlanError  # noqa: E402
from stats_fixtures import save_tiny_model, write_data  # noqa: E402


def test_lora_finetune_saves_an_adapter_peft_loads_and_merge_reads(tmp_path):
    theta0 = save_tiny_model(tmp_path / "models", "llama")
    forget, _ = write_data(tmp_path / "data")
    out = tmp_path / "lora"
    args = ["finetune", "--model", str(theta0), "--data", str(forget), "--out", str(out), "--epochs", "2", "--lr", "1e-2", "--batch-size", "2"]
    assert main([*args, "--lora", "4", "--lora-alpha", "8", "--lora-targets", "q_proj,v_proj,down_proj", "--lora-rslora", "--device", "cpu", "-q"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == ("LORA", 4, 8, True)
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert (out / "adapter_model.safetensors").is_file() and (out / "perta_finetune.json").is_file()
    assert main(["merge", "--theta0", str(theta0), "--full", str(theta0), "--fgt", str(out), "--out", str(tmp_path / "merged"), "--max-memory", "4GiB", "-q"]) == 0
    base, merged = load_checkpoint(theta0), load_checkpoint(tmp_path / "merged")
    fgt = {name: 2 * base[name].double() - merged[name].double() for name in base}
    changed = [name for name in base if not torch.equal(merged[name], base[name])]
    assert changed and all(any(t in name for t in ("q_proj", "v_proj", "down_proj")) for name in changed)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(theta0, dtype=torch.float64)
    model.load_state_dict(fgt, strict=False)
    ids = torch.arange(4, 30).reshape(1, -1)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    adapted = peft_logits(theta0, out, ids)
    assert float((ours - adapted).abs().max()) <= 1e-5 * float(adapted.abs().max())


def test_lora_options_need_lora(tmp_path):
    from perta_stream.config.finetune import FinetuneConfig

    theta0 = save_tiny_model(tmp_path / "models", "llama")
    forget, _ = write_data(tmp_path / "data")
    with pytest.raises(PlanError, match="add --lora R"):
        FinetuneConfig(model=str(theta0), data=str(forget), out=str(tmp_path / "o"), lora_rslora=True)
    with pytest.raises(PlanError, match="rank of at least 1"):
        FinetuneConfig(model=str(theta0), data=str(forget), out=str(tmp_path / "o"), lora_rank=0)
    assert Path(tmp_path / "o").exists() is False


def test_a_lora_defaults_to_a_larger_learning_rate(tmp_path):
    from perta_stream.config.finetune import FinetuneConfig

    theta0 = save_tiny_model(tmp_path / "models", "llama")
    forget, _ = write_data(tmp_path / "data")
    common = {"model": str(theta0), "data": str(forget), "out": str(tmp_path / "o")}
    assert FinetuneConfig(**common).lr == 1e-5
    assert FinetuneConfig(**common, lora_rank=4).lr == 1e-4
    assert FinetuneConfig(**common, lora_rank=4, lr=3e-5).lr == 3e-5
