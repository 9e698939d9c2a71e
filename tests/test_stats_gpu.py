"""The CUDA path: exact in float32, and as accurate as dense bfloat16 autograd in its bfloat16 default."""

from __future__ import annotations

from pathlib import Path

import pytest

from perta_stream.config.stats import StatsConfig
from perta_stream.pipelines.stats import run_stats
from stats_fixtures import assert_at_bfloat16_floor, assert_equal_to_dense_reference, save_tiny_model, write_data

TOLERANCE = 1e-5


def _run_cuda(tmp_path: Path, kind: str, **options) -> tuple[object, Path, dict[str, Path]]:
    forget, retain = write_data(tmp_path / "data")
    model_dir = save_tiny_model(tmp_path, kind)
    config = StatsConfig(model=str(model_dir), forget=str(forget), retain=str(retain), out=str(tmp_path / "out"), device="cuda", batch_size=3, **options)
    return run_stats(config), model_dir, {"forget": forget, "retain": retain}


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_cuda_float32_equals_dense_reference(tmp_path: Path, kind: str) -> None:
    result, model_dir, data = _run_cuda(tmp_path, kind, compute_dtype="float32")
    assert result.record.device == "cuda" and result.record.compute_dtype == "float32"
    assert_equal_to_dense_reference(result.out, model_dir, data, tolerance=TOLERANCE)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_cuda_bfloat16_is_as_accurate_as_dense_bfloat16_autograd(tmp_path: Path, kind: str) -> None:
    result, model_dir, data = _run_cuda(tmp_path, kind)
    assert result.record.device == "cuda" and result.record.compute_dtype == "bfloat16"
    assert_at_bfloat16_floor(result.out, model_dir, data, device="cuda")


@pytest.mark.gpu
def test_buffer_pool_reuses_cuda_buffers_given_back() -> None:
    # The accumulators of successive layers share memory; a missed reuse keeps every layer's on the GPU.
    import torch

    from perta_stream.compute.stats.per_sample import BufferPool

    pool = BufferPool()
    first = pool.zeros((64, 32), "cuda")
    pool.give_back([first])
    assert pool.zeros((64, 32), "cuda").data_ptr() == first.data_ptr()
    pool.give_back([first])
    assert pool.zeros((64, 32), torch.device("cuda", torch.cuda.current_device())).data_ptr() == first.data_ptr()
