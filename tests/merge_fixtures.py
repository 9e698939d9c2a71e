"""Tiny checkpoints that force the hard cases of a merge, and a dense numpy reference.

The reference deliberately avoids torch arithmetic: it loads every tensor whole with the
safetensors library, computes in numpy float32 one operation at a time, and rounds to bfloat16
with explicit bit manipulation, so it shares no code path with the streamed engine.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from perta_stream.dtypes import safetensors_dtype

TINY_LLAMA = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def save_tiny_llama(
    path: Path,
    *,
    tied: bool,
    dtype: torch.dtype,
    seed: int,
    base: dict[str, torch.Tensor] | None = None,
    noise: float = 0.02,
    max_shard_size: str = "24KB",
) -> dict[str, torch.Tensor]:
    """Save a random tiny Llama (≥3 shards at the default size); perturb `base` when given."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**TINY_LLAMA, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    if base is not None:
        state = {name: (tensor.float() + noise * torch.randn(tensor.shape)).to(dtype) for name, tensor in base.items()}
        model.load_state_dict(state, strict=False)
    model = model.to(dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128, "seed": seed}))
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def make_triplet(root: Path, *, tied: bool, dtype: torch.dtype = torch.bfloat16) -> tuple[Path, Path, Path]:
    """theta0, full and fgt directories of the same tiny architecture."""
    theta0, full, fgt = root / "theta0", root / "full", root / "fgt"
    base = save_tiny_llama(theta0, tied=tied, dtype=dtype, seed=0)
    save_tiny_llama(full, tied=tied, dtype=dtype, seed=1, base=base)
    save_tiny_llama(fgt, tied=tied, dtype=dtype, seed=2, base=base)
    return theta0, full, fgt


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], *, shards: int) -> None:
    """A safetensors checkpoint split round-robin-free into `shards` contiguous groups."""
    path.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        file_name = f"model-{number:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in group}, str(path / file_name), metadata={"format": "pt"})
        weight_map.update({n: file_name for n in group})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def write_stats(root: Path, model_dir: Path, *, kinds: tuple[str, ...] = ("grad", "fisher"), dtype: torch.dtype = torch.float32, seed: int = 3) -> Path:
    """A statistics directory for the model in `model_dir`, with exact zeros in places.

    Zeros in both the forget and retain statistics at the same positions exercise the fallback weight.
    """
    generator = torch.Generator().manual_seed(seed)
    tensors = load_checkpoint(model_dir)
    for dataset in ("forget", "retain"):
        for kind in kinds:
            stats = {}
            for name, tensor in tensors.items():
                values = torch.randn(tensor.shape, generator=generator) * 1e-3
                if kind == "fisher":
                    values = values.square()
                flat = values.view(-1)
                flat[::7] = 0.0  # the same positions in forget and retain: denominator exactly 0
                if dataset == "forget":
                    flat[3::11] = 0.0  # forget alone zero: W exactly 0
                stats[name] = values.to(dtype)
            write_checkpoint(root / f"{dataset}.{kind}", stats, shards=2)
    record = {
        "format": "perta_stats",
        "format_version": 1,
        "kinds": list(kinds),
        "stats_dtype": str(dtype).removeprefix("torch."),
        "model": {"location": str(model_dir), "content_sha256": content_digest(model_dir)},
    }
    (root / "perta_stats.json").write_text(json.dumps(record))
    return root


def content_digest(model_dir: Path) -> str:
    """The model's content identity, from tensors loaded whole by safetensors (the tool hashes
    them chunk by chunk as it streams): sha256 over "name NUL sha256(bytes) LF" in name order."""
    tensors = load_checkpoint(model_dir)
    lines = "".join(
        f"{name}\0{hashlib.sha256(tensors[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()}\n"
        for name in sorted(tensors)
    )
    return hashlib.sha256(lines.encode()).hexdigest()


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def _to_numpy_f32(tensor: torch.Tensor) -> np.ndarray:
    return tensor.to(torch.float32).numpy().astype(np.float32, copy=True)


def _round_f32(values: np.ndarray, dtype: str) -> np.ndarray:
    """Round float32 values to `dtype` (RNE) and return the raw bit patterns."""
    if dtype == "F32":
        return values.view(np.uint32)
    if dtype == "F16":
        return values.astype(np.float16).view(np.uint16)
    bits = values.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)


def reference_weights(forget: np.ndarray, retain: np.ndarray, *, kind: str, tau: float, fallback_weight: float) -> np.ndarray:
    """W in float32 by numpy, in the stable form METHOD.md's contract fixes (compute/weights.py):
    q = (min/max of s_f, s_r)^e (as min^e/max^e for e < 1), W = 1/(1+q) where s_f >= s_r, else
    q/(1+q); both 0 -> fallback."""
    s_f, s_r = (np.abs(forget), np.abs(retain)) if kind == "grad" else (forget, retain)
    exponent = tau if kind == "grad" else tau / 2
    with np.errstate(divide="ignore", invalid="ignore", under="ignore"):
        low, high = np.minimum(s_f, s_r), np.maximum(s_f, s_r)
        if exponent < 1.0:
            ratio = low ** np.float32(exponent) / high ** np.float32(exponent)
        else:
            ratio = low / high
            if exponent != 1.0:
                ratio = ratio ** np.float32(exponent)
        weights = np.where(s_f >= s_r, np.float32(1.0), ratio) / (ratio + np.float32(1.0))
    both_zero = (s_f == 0) & (s_r == 0)
    return np.where(both_zero, np.float32(fallback_weight), weights).astype(np.float32)


def reference_merge(
    theta0: Path,
    full: Path,
    fgt: Path,
    *,
    method: str,
    alpha: float,
    stats: Path | None = None,
    tau: float | None = None,
    uniform_weight: float = 0.5,
    fallback_weight: float = 0.5,
    out_dtype: str | None = None,
) -> dict[str, np.ndarray]:
    """Expected output bit patterns per tensor (numpy uint arrays), computed densely."""
    t0, tf, tg = load_checkpoint(theta0), load_checkpoint(full), load_checkpoint(fgt)
    kind = {"grad": "grad", "fisher": "fisher"}.get(method)
    if kind:
        forget, retain = load_checkpoint(stats / f"forget.{kind}"), load_checkpoint(stats / f"retain.{kind}")
        tau = tau if tau is not None else (1.0 if kind == "grad" else 2.0)
    expected = {}
    for name, full_tensor in tf.items():
        dtype = out_dtype or safetensors_dtype(full_tensor.dtype)
        if name not in t0:
            expected[name] = full_tensor.contiguous().view(-1).view(torch.uint8).numpy().copy()
            continue
        delta = _to_numpy_f32(tg[name]) - _to_numpy_f32(t0[name])
        if method == "uniform":
            delta = delta * np.float32(uniform_weight)
        elif kind:
            delta = delta * reference_weights(
                _to_numpy_f32(forget[name]), _to_numpy_f32(retain[name]), kind=kind, tau=tau, fallback_weight=fallback_weight
            )
        result = _to_numpy_f32(full_tensor) - np.float32(alpha) * delta
        expected[name] = _round_f32(result.astype(np.float32).reshape(-1), dtype)
    return expected


def output_bits(out_dir: Path) -> dict[str, np.ndarray]:
    """Output tensors as raw bit patterns comparable with `reference_merge` (copied ones as bytes)."""
    bits = {}
    for name, tensor in load_checkpoint(out_dir).items():
        flat = tensor.contiguous().view(-1)
        if tensor.dtype == torch.float32:
            bits[name] = flat.view(torch.int32).numpy().view(np.uint32)
        elif tensor.dtype in (torch.bfloat16, torch.float16):
            bits[name] = flat.view(torch.int16).numpy().view(np.uint16)
        else:
            bits[name] = flat.view(torch.uint8).numpy()
    return bits


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (to prove inputs are untouched)."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(path).rglob("*"))
        if p.is_file()
    }


def shard_names(path: Path) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
