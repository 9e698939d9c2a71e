"""The matched α of a method: the α at which ‖α·W⊙TV‖ = ‖TV‖ over the model (config/alpha_unit.py).

tv's is 1 (W = 1). uniform's is 1/c: W⊙TV is c·TV rounded to float32, within 2⁻²⁴ of c·TV per
element, so ‖(1/c)·W⊙TV‖ is ‖TV‖ to better than 1e-7. grad's and fisher's are measured: one
pass over the statistics and the task vector (the inspect pass, pipelines/inspect.py, computing
only ‖W⊙TV‖ and ‖TV‖), with W and the task vector computed exactly as the merge computes them
(θ_fgt a model, or a LoRA adapter whose task vector comes from its factors). The statistics'
model is not checked here: the merge that follows checks it before it commits anything.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from perta_stream.config.merge import DEFAULT_TAU
from perta_stream.errors import PlanError, StatisticsError, UsageError

logger = logging.getLogger(__name__)


def matched_alphas(
    methods: Sequence[str],
    *,
    stats: str | None,
    theta0: str,
    fgt: str,
    tau: float | None,
    uniform_weight: float,
    fallback_weight: float,
    max_memory_bytes: int,
) -> dict[str, float]:
    """Method -> its matched α.

    Args:
        methods: tv, uniform, grad, fisher.
        stats: the statistics directory (grad and fisher).
        theta0, fgt: the task vector's models (fgt may be a PEFT LoRA adapter of theta0).
        tau: W's exponent for grad and fisher (None: each method's default).
        max_memory_bytes: what the pass may add to the memory the process holds when it starts.

    Raises:
        UsageError: uniform with c = 0 (it never moves the model).
        StatisticsError: the task vector is 0, or W is 0 wherever it is not.
        PlanError: the inputs do not fit together (as `inspect` reports them).
    """
    from perta_stream.compute.weight_figures import WeightFigures
    from perta_stream.memory import current_rss_bytes
    from perta_stream.pipelines.inspect import measure_inputs, open_inputs
    from perta_stream.plan.inspect_plan import plan_inspect

    matched: dict[str, float] = {}
    for method in methods:
        if method == "tv":
            matched[method] = 1.0
        elif method == "uniform":
            if uniform_weight <= 0:
                raise UsageError("--alpha-unit matched with --uniform-weight 0: uniform then never moves the model, no α matches")
            matched[method] = 1.0 / uniform_weight
    measured = tuple(method for method in methods if method in ("grad", "fisher"))
    if not measured:
        return matched
    problems: list[str] = []
    opened = open_inputs(
        {"a": str(stats)}, methods=measured, taus_of=lambda method: (tau if tau is not None else DEFAULT_TAU[method],),
        uniform_weight=uniform_weight, fallback_weight=fallback_weight, theta0=theta0, fgt=fgt, problems=problems,
    )
    try:
        plan, problems = plan_inspect(
            opened.inputs, sides=("a",), kinds=opened.kinds, configs=opened.configs, sampled_quantities=0, rank_sample_elements=2,
            max_memory_bytes=max_memory_bytes, chunk_bytes=None, baseline_rss_bytes=current_rss_bytes(), problems=problems,
        )
        if problems or plan is None:
            raise PlanError("cannot measure the matched alpha", list(dict.fromkeys(problems)))
        tensors, _, _ = measure_inputs(plan, opened.sources, scale_only=True)
    finally:
        opened.close()
    for config in plan.configs:
        model = WeightFigures()
        for figures in tensors:
            model.add(figures.weights[("a", config.label)])
        if model.weighted_tv_square_sum <= 0:
            why = "the task vector θ_fgt − θ_0 is 0" if model.tv_square_sum <= 0 else "W is 0 wherever the task vector is not"
            raise StatisticsError(f"--alpha-unit matched: no α matches for {config.label}: {why}")
        matched[config.method] = math.sqrt(model.tv_square_sum) / math.sqrt(model.weighted_tv_square_sum)
        logger.info("matched alpha of %s: %.6g (effective scale %.6g)", config.label, matched[config.method], model.effective_scale)
    return matched


def scale_alphas(multiples: Sequence[float], matched_alpha: float) -> tuple[float, ...]:
    """The α values of multiples of the matched α (float64 products)."""
    return tuple(multiple * matched_alpha for multiple in multiples)
