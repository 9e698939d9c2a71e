"""The documentation's examples run: every fenced block marked `<!-- runnable -->` is executed.

Pages run in the order of mkdocs.yml's nav (then any other page with a marked block), all in one
empty folder, so a guide may use what the Quickstart made (its tiny θ_0, θ_full, θ_fgt, data files
and outputs). A bash block runs under `bash -euo pipefail` with `perta-stream` on PATH (this
checkout's code), a Python block under this interpreter; `configs/` and the bundled TOFU folder are
reachable as in a clone. Blocks that need a GPU, the Hub or real checkpoints are not marked; their
pages say so.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MARKER = "<!-- runnable -->"
FENCE = re.compile(r"^```(\w+)\s*$")
BLOCK_TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    language: str
    code: str

    def where(self) -> str:
        return f"docs/{self.page}:{self.line}"


def nav_pages() -> list[str]:
    """The pages of mkdocs.yml's nav, in order."""
    found: list[str] = []

    def walk(entry: object) -> None:
        if isinstance(entry, str):
            found.append(entry)
        elif isinstance(entry, dict):
            for value in entry.values():
                walk(value)
        elif isinstance(entry, list):
            for item in entry:
                walk(item)

    # mkdocs.yml may hold !!python tags in other projects; this one is plain YAML.
    walk(yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"])
    return found


def runnable_blocks(page: str) -> list[Block]:
    """The marked blocks of one page. A marker not followed by a fenced block is an error."""
    lines = (DOCS / page).read_text(encoding="utf-8").splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        if lines[index].strip() != MARKER:
            index += 1
            continue
        fence_at = index + 1
        while fence_at < len(lines) and not lines[fence_at].strip():
            fence_at += 1
        opening = FENCE.match(lines[fence_at]) if fence_at < len(lines) else None
        if opening is None or opening.group(1) not in ("bash", "python"):
            raise AssertionError(f"docs/{page}:{index + 1}: {MARKER} must be followed by a ```bash or ```python block")
        end = fence_at + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        blocks.append(Block(page, fence_at + 1, opening.group(1), "\n".join(lines[fence_at + 1 : end]) + "\n"))
        index = end + 1
    return blocks


def all_blocks() -> list[Block]:
    order = nav_pages()
    others = sorted(str(path.relative_to(DOCS)) for path in DOCS.rglob("*.md") if str(path.relative_to(DOCS)) not in order)
    return [block for page in order + others for block in runnable_blocks(page)]


def _workspace(root: Path) -> dict[str, str]:
    """An empty folder where `configs/` and `perta_stream/data/` resolve as in a clone, and the
    environment the blocks run in."""
    (root / "perta_stream").mkdir()
    (root / "perta_stream" / "data").symlink_to(ROOT / "perta_stream" / "data")
    (root / "configs").symlink_to(ROOT / "configs")
    bin_dir = root.parent / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "perta-stream"
    # -P: the folder the command runs in is not put on sys.path (its perta_stream/ holds only data).
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -P -m perta_stream "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PERTA_DISABLE_PROGRESS_BARS"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> tuple[Path, list[tuple[Block, subprocess.CompletedProcess]]]:
    base = tmp_path_factory.mktemp("docs_examples")
    workspace = base / "work"
    workspace.mkdir()
    env = _workspace(workspace)
    results = []
    for block in all_blocks():
        command = ["bash", "-euo", "pipefail", "-c", block.code] if block.language == "bash" else [sys.executable, "-P", "-c", block.code]
        completed = subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
        results.append((block, completed))
        if completed.returncode != 0:
            break  # the blocks after it build on its output
    return workspace, results


def test_the_docs_have_runnable_blocks_in_the_quickstart_and_guides():
    pages = {block.page for block in all_blocks()}
    assert "quickstart.md" in pages and any(page.startswith("guides/") for page in pages)


def test_every_runnable_block_runs(ran):
    _, results = ran
    for block, completed in results:
        assert completed.returncode == 0, (
            f"{block.where()} ({block.language}) exited {completed.returncode}\n{block.code}\n"
            f"stdout:\n{completed.stdout[-3000:]}\nstderr:\n{completed.stderr[-3000:]}"
        )
    assert [block for block, _ in results] == all_blocks()


def test_the_records_the_examples_wrote_hold_only_documented_fields(ran):
    workspace, results = ran
    assert all(completed.returncode == 0 for _, completed in results)
    page = (DOCS / "reference" / "file-formats.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`([a-z_0-9]+)`", page))
    records = [workspace / "stats" / "perta_stats.json", workspace / "clean" / "alpha_1" / "perta_merge.json", workspace / "one_pass" / "fisher" / "alpha_1" / "perta_merge.json"]
    for record in records:
        fields = set(json.loads(record.read_text(encoding="utf-8")))
        assert fields - documented == set(), f"{record.relative_to(workspace)} holds fields docs/reference/file-formats.md does not list"
