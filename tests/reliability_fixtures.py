"""Helpers for the reliability tests: synthetic checkpoints without transformers, CLI runners, digests.

The checkpoints are written with the safetensors library (not by the code under test), in the
Hugging Face layout (shards + index + config.json + a side file), so the merge sees real inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from merge_fixtures import write_checkpoint

# Fields of perta_merge.json that measure the run rather than describe the output.
TIMING_FIELDS = ("elapsed_s", "read_gb_per_s", "peak_rss_bytes", "baseline_rss_bytes", "added_peak_rss_bytes")
REPO_ROOT = Path(__file__).resolve().parent.parent


def synthetic_shapes(*, layers: int, hidden: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """A Llama-like set of tensor names and shapes (untied: lm_head stored)."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        shapes[f"{prefix}.self_attn.q_proj.weight"] = (hidden, hidden)
        shapes[f"{prefix}.mlp.up_proj.weight"] = (2 * hidden, hidden)
        shapes[f"{prefix}.input_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def synthetic_tensors(shapes: dict[str, tuple[int, ...]], *, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator).to(dtype) for name, shape in shapes.items()}


def write_model(path: Path, tensors: dict[str, torch.Tensor], *, shards: int, side_file_bytes: int = 0) -> Path:
    """A checkpoint directory: shards (+ index), config.json, and a tokenizer side file."""
    write_checkpoint(path, tensors, shards=shards)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False}))
    side = b"{}" if not side_file_bytes else os.urandom(side_file_bytes)
    (path / "tokenizer.json").write_bytes(side)
    return path


def synthetic_triplet(
    root: Path,
    *,
    layers: int = 2,
    hidden: int = 32,
    vocab: int = 48,
    shards: int = 3,
    dtype: torch.dtype = torch.bfloat16,
    side_file_bytes: int = 0,
) -> tuple[Path, Path, Path]:
    """theta0, full and fgt of one synthetic architecture, each sharded the same way."""
    shapes = synthetic_shapes(layers=layers, hidden=hidden, vocab=vocab)
    paths = []
    for role, seed in (("theta0", 0), ("full", 1), ("fgt", 2)):
        tensors = synthetic_tensors(shapes, seed=seed, dtype=dtype)
        paths.append(write_model(root / role, tensors, shards=shards, side_file_bytes=side_file_bytes if role == "full" else 0))
    return paths[0], paths[1], paths[2]


def merge_args(theta0: Path, full: Path, fgt: Path, out: Path, *extra: str) -> list[str]:
    return ["merge", "--theta0", str(theta0), "--full", str(full), "--fgt", str(fgt), "--out", str(out), "-q", *extra]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PERTA_DISABLE_PROGRESS_BARS"] = "1"
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def cli_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "perta_stream.cli", *args]


def run_cli(args: list[str], *, timeout_s: float = 120) -> subprocess.CompletedProcess:
    """The real command line in a child process."""
    return subprocess.run(cli_command(args), env=cli_env(), capture_output=True, text=True, timeout=timeout_s)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path`, by relative name (inputs must stay byte-identical)."""
    return {str(p.relative_to(path)): file_sha256(p) for p in sorted(Path(path).rglob("*")) if p.is_file()}


def partial_of(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def refused(capsys, args: list[str], out: Path) -> str:  # noqa: ANN001
    """Run the CLI, expect one `error:` line and an untouched partial folder; return the line."""
    from perta_stream.cli import main

    before = tree_digest(partial_of(out))
    assert main(args) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1
    assert tree_digest(partial_of(out)) == before, "the partial folder was changed"
    assert not out.exists()
    return lines[-1]


def output_digest(out: Path, record_name: str = "perta_merge.json") -> dict[str, str]:
    """Every output file's sha256, the run record (`perta_merge.json` or `perta_stats.json`) with
    its timing fields removed."""
    digest = tree_digest(out)
    record = json.loads((out / record_name).read_text())
    for name in TIMING_FIELDS:
        record.pop(name, None)
    digest[record_name] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    return digest


def killer_script(wrapping: str) -> str:
    """A child program for `python -c`: the real CLI, after `wrapping` (Python source) has wrapped
    some method so that the process SIGKILLs itself at an exact point. The child is called with
    `POINT COUNT CLI-ARGS...`; `wrapping` reads `point` and `count` and may call `die()` or
    `die_after(owner, name)` (SIGKILL once the wrapped method has returned `count` times)."""
    return _KILLER_HEAD + wrapping.strip("\n") + "\nfrom perta_stream.cli import main\nsys.exit(main(argv))\n"


_KILLER_HEAD = r"""
import os, signal, sys
point, count, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
seen = [0]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def die_after(owner, name):
    original = getattr(owner, name)
    def wrapped(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        seen[0] += 1
        if seen[0] == count:
            die()
        return result
    setattr(owner, name, wrapped)

"""
