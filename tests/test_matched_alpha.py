"""`--alpha-unit matched`: the matched α, applied, gives ‖α·W⊙TV‖ = ‖TV‖ (checked densely), in unlearn and sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from inspect_reference import dense_weights, task_vector
from merge_fixtures import make_triplet, reference_merge, write_stats
from test_unlearn import _config, tiny_models  # noqa: F401  (the module's fixture, reused)

from perta_stream.errors import PlanError, UsageError
from perta_stream.pipelines.matched_alpha import matched_alphas
from perta_stream.pipelines.unlearn import run_unlearn

# The bound; the measured α is exact up to float64 summation order (about 1e-15).
MATCH_REL = 1e-6


def _norm(arrays) -> float:
    return math.sqrt(sum(float(np.square(np.asarray(array, dtype=np.float64)).sum()) for array in arrays))


def test_the_matched_alpha_applied_gives_the_task_vectors_norm(tmp_path):
    theta0, _, fgt = make_triplet(tmp_path / "m", tied=True)
    stats = write_stats(tmp_path / "stats", theta0)
    matched = matched_alphas(
        ("tv", "uniform", "grad", "fisher"), stats=str(stats), theta0=str(theta0), fgt=str(fgt), tau=None,
        uniform_weight=0.25, fallback_weight=0.5, max_memory_bytes=16 * 2**30,
    )  # fmt: skip
    tv = task_vector(theta0, fgt)
    tv_norm = _norm(tv.values())
    assert matched["tv"] == 1.0
    for method, tau in (("grad", 1.0), ("fisher", 2.0)):
        weights = dense_weights(stats, kind=method, tau=tau)
        scaled = _norm(matched[method] * (weights[name] * tv[name]).astype(np.float64) for name in tv)
        assert scaled == pytest.approx(tv_norm, rel=MATCH_REL)
        assert matched[method] > 1.0  # W < 1 shortens the task vector
    uniform = _norm(matched["uniform"] * (np.float32(0.25) * tv[name]).astype(np.float64) for name in tv)
    assert uniform == pytest.approx(tv_norm, rel=MATCH_REL)
    with pytest.raises(UsageError, match="uniform-weight 0"):
        matched_alphas(("uniform",), stats=None, theta0=str(theta0), fgt=str(fgt), tau=None, uniform_weight=0.0, fallback_weight=0.5, max_memory_bytes=2**34)


def test_unlearn_merges_at_multiples_of_the_matched_alpha(tiny_models):  # noqa: F811
    root = tiny_models
    result = run_unlearn(_config(root, "matched/{alpha}", method="fisher", alphas=(1.0, 2.0), alpha_unit="matched", out_dtype="F32"))
    stats = Path(result.stats_dir)
    tv = task_vector(root / "theta0", root / "fgt")
    weights = dense_weights(stats, kind="fisher", tau=2.0)
    for multiple, out in zip((1.0, 2.0), result.outputs):
        record = json.loads((Path(out) / "perta_merge.json").read_text())
        assert record["alpha_unit"] == "matched" and record["alpha_multiples"] == [1.0, 2.0]
        assert record["alpha"] == multiple * record["matched_alpha"]
        # The α applied moves the model as far as task arithmetic at α = multiple ...
        applied = _norm(record["alpha"] * (weights[name] * tv[name]).astype(np.float64) for name in tv)
        assert applied == pytest.approx(multiple * _norm(tv.values()), rel=MATCH_REL)
        # ... and it is the α the merge used: the output is the dense merge at that α, bit for bit.
        expected = reference_merge(root / "theta0", root / "full", root / "fgt", method="fisher", alpha=record["alpha"], stats=stats, out_dtype="F32")
        from merge_fixtures import load_checkpoint

        merged = load_checkpoint(Path(out))
        for name, bits in expected.items():
            assert np.array_equal(merged[name].contiguous().view(-1).numpy().view(np.uint32), bits), name


def test_matched_alpha_needs_the_whole_w_before_merging(tiny_models):  # noqa: F811
    with pytest.raises(PlanError, match="drop --one-pass"):
        _config(tiny_models, "never", alpha_unit="matched", one_pass=True, stats_dir=None)
    with pytest.raises(PlanError, match="--alpha-unit 'relative' is not one of absolute, matched"):
        _config(tiny_models, "never", alpha_unit="relative")
