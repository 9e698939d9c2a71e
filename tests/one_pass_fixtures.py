"""Inputs and the two-pass reference for the one-pass unlearn tests.

θ_0 is a tiny model of stats_fixtures (tied Llama, or untied Qwen2 with biases), saved in ≥3
shards with its tokenizer; θ_full and θ_fgt are θ_0 with seeded noise added to every floating
tensor, written back into the same shard files with the safetensors library (same layout, index
and side files). The reference is the two-pass way run through the real CLI: `stats`, then one
`merge` per method, into folders the one pass's outputs are compared with byte for byte.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from perta_stream.cli import main
from reliability_fixtures import TIMING_FIELDS
from stats_fixtures import save_tiny_model, write_data


def perturbed_copy(source: Path, target: Path, *, seed: int, noise: float = 0.05) -> Path:
    """`source` with noise added to every floating tensor, in the same shard files."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    generator = torch.Generator().manual_seed(seed)
    for shard in sorted(target.glob("*.safetensors")):
        tensors = load_file(shard)
        changed = {
            name: (tensor.float() + noise * torch.randn(tensor.shape, generator=generator)).to(tensor.dtype) if tensor.is_floating_point() else tensor
            for name, tensor in tensors.items()
        }
        save_file(changed, shard, metadata={"format": "pt"})
    return target


def make_workspace(root: Path, kinds=("llama", "qwen2"), *, dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    forget, retain = write_data(root / "data")
    found: dict[str, Path] = {"root": root, "forget": forget, "retain": retain}
    for kind in kinds:
        theta0 = save_tiny_model(root / "theta0", kind, dtype=dtype)
        found[f"{kind}.theta0"] = theta0
        found[f"{kind}.full"] = perturbed_copy(theta0, root / "full" / kind, seed=1)
        found[f"{kind}.fgt"] = perturbed_copy(theta0, root / "fgt" / kind, seed=2)
    return found


def model_args(ws: dict[str, Path], kind: str) -> list[str]:
    return ["--theta0", str(ws[f"{kind}.theta0"]), "--full", str(ws[f"{kind}.full"]), "--fgt", str(ws[f"{kind}.fgt"])]


def data_args(ws: dict[str, Path]) -> list[str]:
    return ["--forget", str(ws["forget"]), "--retain", str(ws["retain"]), "--batch-size", "2", "--device", "cpu"]


def two_pass(
    ws: dict[str, Path], kind: str, out: Path, methods: list[str], alphas: list[str], *extra_stats: str, tau: str | None = None, stats_model: str = "theta0"
) -> dict[str, Path]:
    """`stats` (at θ_0, or at `stats_model`) then one `merge` per method; returns method -> that merge's --out."""
    stats = out / "stats"
    assert main(["stats", "--model", str(ws[f"{kind}.{stats_model}"]), *data_args(ws), "--out", str(stats), "-q", *extra_stats]) == 0
    outs = {}
    for method in methods:
        outs[method] = out / method
        tau_args = ["--tau", tau] if tau else []
        assert main(["merge", *model_args(ws, kind), "--method", method, "--stats", str(stats), "--alpha", ",".join(alphas), "--out", str(outs[method]), "--max-memory", "4GiB", "--stats-at", stats_model, "-q", *tau_args]) == 0
    return outs


def alpha_dirs(out: Path, alphas: list[str]) -> dict[str, Path]:
    """The folder of each α under a merge's --out (one α: --out itself)."""
    if len(alphas) == 1:
        return {alphas[0]: out}
    return {alpha: out / f"alpha_{alpha}" for alpha in alphas}


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_output(actual: Path, expected: Path) -> None:
    """Every file equal byte for byte, except perta_merge.json, equal apart from timings and
    the one-pass fields (and where the statistics came from)."""
    got, want = files_of(actual), files_of(expected)
    assert sorted(got) == sorted(want)
    for name in want:
        if name == "perta_merge.json":
            continue
        assert got[name] == want[name], f"{name} differs"
    records = [json.loads(files[name]) for files, name in ((got, "perta_merge.json"), (want, "perta_merge.json"))]
    for record in records:
        for key in (*TIMING_FIELDS, "one_pass", "stats", "bytes_read", "chunk_elements", "alphas_in_pass", "max_memory_bytes"):
            record.pop(key, None)
        # The two-pass merge also names the statistics files it read.
        record["inputs"] = {role: entry for role, entry in record["inputs"].items() if role in ("theta0", "full", "fgt")}
    assert records[0] == records[1]
