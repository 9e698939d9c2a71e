"""Shared pytest setup: progress bars off, the `gpu` marker skips without CUDA."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("PERTA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A good synthetic theta0, full and fgt (3 shards each, bfloat16) shared by a module's tests."""
    from reliability_fixtures import synthetic_triplet

    return synthetic_triplet(tmp_path_factory.mktemp("good"))


@pytest.fixture
def triplet(good, tmp_path) -> tuple[Path, Path, Path]:
    """A private copy of the good triplet that a test may break."""
    import shutil

    return tuple(Path(shutil.copytree(path, tmp_path / path.name)) for path in good)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
