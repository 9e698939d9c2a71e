"""LoRA adapters made by peft itself on the tiny merge models, and PEFT's own dense θ_fgt.

`make_adapter` builds a PeftModel on θ_0 with a LoraConfig, gives every adapter parameter seeded
non-zero values (peft starts B at zero, which would make the task vector zero), and saves it
with `save_pretrained`. `peft_dense_fgt` is the reference: θ_0 loaded in float64, the adapter
loaded onto it with `PeftModel.from_pretrained`, merged with peft's `merge_and_unload`, in
float64: θ_fgt = θ_0 + s·B@A as PEFT computes it, none of perta-stream's code involved.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_dir: Path, out: Path, *, seed: int = 7, dtype: torch.dtype = torch.float32, scale: float = 0.05, **lora_options) -> Path:
    """A LoRA adapter of `base_dir` saved by peft into `out`, with random non-zero parameters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        peft_model = get_peft_model(model, LoraConfig(**lora_options))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if parameter.requires_grad:
                    noise = torch.randn(parameter.shape, generator=generator)
                    if "magnitude" in name or "modules_to_save" in name or "trainable_tokens" in name:
                        parameter.mul_(1 + scale * noise)
                    else:
                        parameter.copy_(scale * 4 * noise)
        peft_model.to(dtype)
        peft_model.save_pretrained(out)
    return out


def peft_dense_fgt(base_dir: Path, adapter_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, int]]]:
    """θ_0 + the adapter, merged by peft (`merge_and_unload`) in float64: tensor_name -> tensor;
    and, per LoRA-changed tensor, (s·|B|@|A| laid out as the tensor, rank): what float32 matmul
    rounding is relative to (peft's own scaling and factors)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import transpose
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
        peft_model = PeftModel.from_pretrained(model, adapter_dir).to(torch.float64)
        magnitudes = {}
        for name, module in peft_model.base_model.model.named_modules():
            if isinstance(module, LoraLayer) and "default" in module.scaling:
                if "default" in getattr(module, "lora_A", {}):
                    a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                    product = transpose(b.abs() @ a.abs(), module.fan_in_fan_out)
                else:
                    a, b = module.lora_embedding_A["default"], module.lora_embedding_B["default"]
                    product = (b.abs() @ a.abs()).T
                magnitudes[f"{name}.weight"] = (module.scaling["default"] * product.detach(), a.shape[0])
        merged = peft_model.merge_and_unload()
    return {name: tensor.detach().clone() for name, tensor in merged.state_dict().items()}, magnitudes


def peft_logits(base_dir: Path, adapter_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """The adapted model's logits (float64), through PeftModel's forward, nothing merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
        peft_model = PeftModel.from_pretrained(model, adapter_dir).to(torch.float64).eval()
        with torch.no_grad():
            return peft_model(input_ids=input_ids).logits

