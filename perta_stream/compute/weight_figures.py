"""The figures `inspect` reports about W, as sums that add up over chunks, tensors and groups.

Each figure is kept as counts and float64 sums (never as a ratio), so the figures of a layer, of
a module kind or of the whole model are the sums of their tensors' figures, whatever the order
or the chunking: an effective scale of a group is sqrt(Σ‖W⊙TV‖²) / sqrt(Σ‖TV‖²) over its
tensors, not an average of their scales.

W is the merge's W, element by element (compute/weights.py on the same float32 values); W⊙TV is
the float32 product the merge subtracts (TV = θ_fgt − θ_0 in float32), so the effective scale
‖W⊙TV‖ / ‖TV‖ is the factor by which the merge at a given α shortens the task vector that
task arithmetic would subtract at that α.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# W's histogram: HISTOGRAM_BINS bins of width 1/HISTOGRAM_BINS over [0, 1]; bin k holds
# k/HISTOGRAM_BINS <= W < (k+1)/HISTOGRAM_BINS, the last one also W = 1. A power of two, so that
# W · HISTOGRAM_BINS is exact in float32 and an element's bin is its integer part: exact, and an
# order of magnitude faster than a search among the edges (torch.bucketize).
HISTOGRAM_BINS = 32
LOW_WEIGHT, HIGH_WEIGHT = 0.1, 0.9
# |W_a - W_b| above this counts as "moved" when two statistics runs are compared.
MOVED_THRESHOLD = 0.1


def histogram_edges() -> list[float]:
    """The HISTOGRAM_BINS + 1 bin edges (0, 1/32, ..., 1), exact in float32."""
    return [k / HISTOGRAM_BINS for k in range(HISTOGRAM_BINS + 1)]


@dataclass(frozen=True)
class WeightConfig:
    """One way of computing W: a method and its parameters.

    Attributes:
        method: grad, fisher, uniform or tv.
        tau: the weights' exponent (grad and fisher).
        uniform_weight: W of uniform.
        fallback_weight: W where both statistics are exactly 0 (grad and fisher).
    """

    method: str
    tau: float | None = None
    uniform_weight: float = 0.5
    fallback_weight: float = 0.5

    @property
    def uses_statistics(self) -> bool:
        return self.method in ("grad", "fisher")

    @property
    def constant_weight(self) -> float:
        """W of tv (1) or uniform (c); only for those methods."""
        return 1.0 if self.method == "tv" else self.uniform_weight

    @property
    def label(self) -> str:
        """How reports name it: `fisher τ=2`, `grad τ=1`, `uniform c=0.5`, `tv`."""
        if self.uses_statistics:
            return f"{self.method} τ={self.tau:g}"
        return f"uniform c={self.uniform_weight:g}" if self.method == "uniform" else "tv"


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


@dataclass
class WeightFigures:
    """W of one configuration over a set of elements.

    Attributes:
        elements: how many elements.
        histogram: HISTOGRAM_BINS counts (see HISTOGRAM_BINS).
        below_low, above_high: counts of W < 0.1 and W > 0.9 (compared in float32).
        weight_sum: ΣW (float64).
        fallback_elements: elements whose forget and retain statistics are both exactly 0, where W
            is the fallback weight (0 for tv and uniform, which read no statistics).
        weighted_tv_square_sum, tv_square_sum: ‖W⊙TV‖² and ‖TV‖² (float64 sums of the float32
            values squared); 0 without a task vector.
    """

    elements: int = 0
    histogram: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BINS)
    below_low: int = 0
    above_high: int = 0
    weight_sum: float = 0.0
    fallback_elements: int = 0
    weighted_tv_square_sum: float = 0.0
    tv_square_sum: float = 0.0

    def add(self, other: "WeightFigures") -> "WeightFigures":
        self.elements += other.elements
        self.histogram = [mine + theirs for mine, theirs in zip(self.histogram, other.histogram)]
        self.below_low += other.below_low
        self.above_high += other.above_high
        self.weight_sum += other.weight_sum
        self.fallback_elements += other.fallback_elements
        self.weighted_tv_square_sum += other.weighted_tv_square_sum
        self.tv_square_sum += other.tv_square_sum
        return self

    @property
    def mean_weight(self) -> float | None:
        return _ratio(self.weight_sum, self.elements)

    @property
    def effective_scale(self) -> float | None:
        """‖W⊙TV‖ / ‖TV‖ (None without a task vector, or where it is 0)."""
        if self.tv_square_sum <= 0:
            return None
        return math.sqrt(self.weighted_tv_square_sum) / math.sqrt(self.tv_square_sum)

    def to_json(self, *, with_histogram: bool = True) -> dict:
        record = {
            "elements": self.elements,
            "mean_w": self.mean_weight,
            "fraction_below_0_1": _ratio(self.below_low, self.elements),
            "fraction_above_0_9": _ratio(self.above_high, self.elements),
            "fallback_elements": self.fallback_elements,
            "effective_scale": self.effective_scale,
            "w_tv_norm": math.sqrt(self.weighted_tv_square_sum) if self.tv_square_sum > 0 else None,
            "tv_norm": math.sqrt(self.tv_square_sum) if self.tv_square_sum > 0 else None,
        }
        if with_histogram:
            record["histogram"] = list(self.histogram)
        return record


@dataclass
class Agreement:
    """How the forget and retain gradients agree over a set of elements.

    Attributes:
        grad_dot, forget_grad_square_sum, retain_grad_square_sum: ḡ_f·ḡ_r, ‖ḡ_f‖², ‖ḡ_r‖² (float64),
            whose quotient is the cosine of ḡ_f and ḡ_r.
    """

    grad_dot: float = 0.0
    forget_grad_square_sum: float = 0.0
    retain_grad_square_sum: float = 0.0

    def add(self, other: "Agreement") -> "Agreement":
        self.grad_dot += other.grad_dot
        self.forget_grad_square_sum += other.forget_grad_square_sum
        self.retain_grad_square_sum += other.retain_grad_square_sum
        return self

    @property
    def grad_cosine(self) -> float | None:
        denominator = math.sqrt(self.forget_grad_square_sum) * math.sqrt(self.retain_grad_square_sum)
        return self.grad_dot / denominator if denominator > 0 else None


@dataclass
class Comparison:
    """W of one configuration from two statistics runs (a and b) over a set of elements.

    Attributes:
        elements: how many elements.
        moved: elements with |W_a − W_b| > MOVED_THRESHOLD (float32).
        difference_sum: Σ|W_a − W_b| (float64).
        joint_histogram: HISTOGRAM_BINS × HISTOGRAM_BINS counts, row = W_a's bin, column = W_b's.
    """

    elements: int = 0
    moved: int = 0
    difference_sum: float = 0.0
    joint_histogram: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BINS**2)

    def add(self, other: "Comparison") -> "Comparison":
        self.elements += other.elements
        self.moved += other.moved
        self.difference_sum += other.difference_sum
        self.joint_histogram = [mine + theirs for mine, theirs in zip(self.joint_histogram, other.joint_histogram)]
        return self

    @property
    def fraction_moved(self) -> float | None:
        return _ratio(self.moved, self.elements)

    @property
    def mean_abs_difference(self) -> float | None:
        return _ratio(self.difference_sum, self.elements)

    def joint_rows(self) -> list[list[int]]:
        return [self.joint_histogram[row * HISTOGRAM_BINS : (row + 1) * HISTOGRAM_BINS] for row in range(HISTOGRAM_BINS)]
