"""`run_doctor`: what this installation can do, one line per check, before a long run finds out.

Checks, in order: the torch build and its devices; the memory a fresh `perta-stream merge` holds
after its imports against what the default merge adds (--max-memory) and what the machine has;
the optional extras (peft: LoRA adapters; gguf: `models fetch`; triton: the GPU statistics
kernels); the Hub's reachability and whether a token is configured (never shown); the free disk
where outputs go, against what an unlearn of `--model` would write. Each check is `ok`, `warn`
(works, with a limit worth knowing), `fail` (a run would fail) or `info`.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from perta_stream.config.doctor import DoctorConfig
from perta_stream.config.merge import default_max_memory_bytes
from perta_stream.memory import format_bytes

STATUSES = ("ok", "info", "warn", "fail")
# (distribution, what needs it)
EXTRAS = (
    ("peft", "LoRA adapters as inputs"),
    ("gguf", "`perta-stream models fetch` (GGUF conversion)"),
    ("triton", "the GPU statistics kernels (CUDA only; the torch path is used without it)"),
)
HUB_TIMEOUT_S = 5.0
_IMPORTS = "import torch, perta_stream.cli, perta_stream.pipelines.merge\nprint(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmRSS:')))"


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    text: str

    def line(self) -> str:
        return f"[{self.status:<4}] {self.name}: {self.text}"


@dataclass(frozen=True)
class DoctorResult:
    checks: tuple[Check, ...]

    @property
    def failed(self) -> bool:
        return any(check.status == "fail" for check in self.checks)

    def report(self) -> str:
        return "\n".join(check.line() for check in self.checks)


def run_doctor(config: DoctorConfig) -> DoctorResult:
    """Every check (none raises: a failed probe is a `fail` or `warn` line that says why)."""
    checks = [_torch(), _memory(), *(_extra(name, purpose) for name, purpose in EXTRAS), _hub(), _token(), _disk(config)]
    return DoctorResult(tuple(checks))


def _torch() -> Check:
    import torch

    if torch.version.cuda:
        build = f"CUDA {torch.version.cuda} build"
    elif getattr(torch.version, "hip", None):
        build = f"ROCm {torch.version.hip} build"
    else:
        build = "CPU build"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        memory = format_bytes(torch.cuda.get_device_properties(0).total_memory)
        return Check("torch", "ok", f"{torch.__version__} ({build}); device cuda: {len(names)} x {names[0]} ({memory} each)")
    cores = os.cpu_count() or 1
    if torch.version.cuda:
        return Check("torch", "warn", f"{torch.__version__} ({build}) but no CUDA device is visible; device cpu ({cores} cores)")
    return Check("torch", "ok", f"{torch.__version__} ({build}); device cpu ({cores} cores, {torch.get_num_threads()} threads)")


def _memory() -> Check:
    """The RSS of a fresh interpreter after the merge's imports, against the default budget."""
    import psutil

    try:
        completed = subprocess.run([sys.executable, "-c", _IMPORTS], capture_output=True, text=True, timeout=120, check=True)
        import_bytes = int(completed.stdout.strip().splitlines()[-1]) * 1024
    except (subprocess.SubprocessError, ValueError, IndexError, OSError) as exc:
        return Check("memory", "warn", f"could not measure the imports' RSS ({exc})")
    budget = default_max_memory_bytes()
    available = psutil.virtual_memory().available
    peak = import_bytes + budget
    text = (
        f"importing torch and the merge holds {format_bytes(import_bytes)}; a default merge adds at most {format_bytes(budget)} "
        f"(--max-memory, or $PERTA_MAX_MEMORY) on top: a peak of {format_bytes(peak)}, of {format_bytes(available)} available"
    )
    return Check("memory", "ok" if peak <= available else "fail", text)


def _extra(name: str, purpose: str) -> Check:
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return Check(name, "info", f"not installed; needed for {purpose} (pip install {name})")
    return Check(name, "ok", f"{version}, for {purpose}")


def _hub() -> Check:
    from huggingface_hub import constants

    from perta_stream.sources.hub_http import hub_endpoint, hub_http_library

    endpoint = hub_endpoint()
    if constants.HF_HUB_OFFLINE:
        return Check("hub", "info", f"offline mode (HF_HUB_OFFLINE): {endpoint} is not contacted; local folders only")
    library = hub_http_library()
    started = time.perf_counter()
    try:
        response = library.get(f"{endpoint}/api/models/perta-stream-doctor/reachability", timeout=HUB_TIMEOUT_S, follow_redirects=False)
    except Exception as exc:  # any transport failure means "not reachable"; the line says which
        return Check("hub", "warn", f"{endpoint} not reachable ({type(exc).__name__}: {' '.join(str(exc).split())[:120]}); local folders still work")
    elapsed_ms = (time.perf_counter() - started) * 1000
    # Any HTTP answer (a 404 for this made-up repo included) means the Hub answered.
    status = "ok" if response.status_code < 500 else "warn"
    return Check("hub", status, f"{endpoint} answered (HTTP {response.status_code}) in {elapsed_ms:.0f} ms")


def _token() -> Check:
    """Whether a token is configured, and where from; the token itself is never printed."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        return Check("hub token", "info", "none: public repos can be read; pushing (--out hf://...) and private repos need one (hf auth login, or HF_TOKEN)")
    source = "HF_TOKEN" if os.environ.get("HF_TOKEN") else "huggingface_hub's token file"
    return Check("hub token", "ok", f"found ({source}; not shown)")


def _disk(config: DoctorConfig) -> Check:
    folder = Path(config.out).absolute()
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if config.model is None:
        return Check("disk", "ok", f"{format_bytes(free)} free at {folder} (give --model to check an unlearn's needs)")
    try:
        needed, parts = unlearn_disk_bytes(config.model, len(config.alphas))
    except Exception as exc:  # a doctor reports; an unreadable model is a line, not a crash
        return Check("disk", "warn", f"{format_bytes(free)} free at {folder}; cannot read {config.model} ({' '.join(str(exc).split())[:160]})")
    status = "ok" if needed <= free else "fail"
    return Check("disk", status, f"{format_bytes(free)} free at {folder}; an unlearn of {config.model} writes about {format_bytes(needed)} ({parts})")


def unlearn_disk_bytes(model: str, alphas: int) -> tuple[int, str]:
    """What `unlearn --model` writes: θ_fgt (the model's size), grad and fisher statistics of
    both sets in float32 (4 × 4 bytes per parameter), and one output per α (the model's size)."""
    from perta_stream.sources.resolve import open_checkpoint
    from perta_stream.sources.input_location import normalize_location

    checkpoint, source = open_checkpoint(normalize_location(model), "model")
    source.close()
    parameters = sum(info.numel for info in checkpoint.tensors.values())
    model_bytes = checkpoint.total_bytes
    stats_bytes = 2 * 2 * 4 * parameters
    parts = f"theta_fgt {format_bytes(model_bytes)}, statistics {format_bytes(stats_bytes)}, {alphas} output(s) {format_bytes(alphas * model_bytes)}"
    return model_bytes + stats_bytes + alphas * model_bytes, parts
