"""The merge arithmetic of METHOD.md section 5, one chunk at a time, with no allocation.

Per element, in float32: out = full - alpha * (w * (fgt - theta0)), then one rounding
(round-to-nearest-even) to the output dtype. Each operation is a separate elementwise torch op
on float32 values, so every intermediate is rounded to float32 exactly as the formula reads
(no fused multiply-add), and the task-vector product w·(fgt - theta0) is computed once and
shared by every alpha. A chunk is processed in blocks of BLOCK_ELEMENTS so that the handful of
float32 scratch vectors stay in the CPU cache: the arithmetic is memory-bound, and a chunk-sized
pass per operation would stream every intermediate through DRAM, while small blocks pay torch's
per-op overhead (measured on a 2-core EPYC with 1 MiB of L2 per core and 32 MiB of L3, one
thread, fisher / tv: 280 / 628 M elements/s with 64 Ki-element blocks, 389 / 967 with 256 Ki,
378 / 1013 with 512 Ki, 190 / 492 with 4 Mi; with both cores 316 / 685, 555 / 1091, 589 / 1515,
247 / 669). Larger blocks win in isolation, but `merge` is not bound by the kernel (it waits on
reading, hashing and writing: benchmarks/bench_merge.py ran as fast with 256 Ki), so the 64 Ki
blocks and their 1.25 MiB of scratch stay; beside a sweep the blocks are smaller still
(SERIAL_BLOCK_ELEMENTS). The scratch buffers are allocated once and reused, so memory stays flat
however large the model is. Inputs are converted to float32 with `copy_` before any arithmetic:
a mixed-dtype op (float32 - bfloat16) would make torch allocate a float32 copy of its operand on
every call.

On a GPU the same ops run on device buffers, one block per chunk (a kernel launch per op, so
larger blocks). Every op is a correctly rounded IEEE operation there too (torch's CUDA kernels
are one op each, built without fast-math, so nothing is contracted into a fused multiply-add),
and the result is bitwise the CPU's, except for a power with an exponent other than 0.5 or 2:
see `weights.exponent_is_portable`.

Non-finite values are refused unless allowed: a NaN or infinity in theta0, theta_full or theta_fgt
always reaches the float32 result (inf - inf, 0 * inf and NaN are all non-finite), so one sum per
block of each result and each statistic detects them (a sum is non-finite exactly when an element
is, or when it overflows, which the exact check then tells apart).
"""

from __future__ import annotations

import torch

from perta_stream.compute.weights import compute_weights
from perta_stream.errors import NonFiniteError

BLOCK_ELEMENTS = 1 << 16
# Blocks no larger than torch's grain size (32 Ki elements), below which an elementwise op runs
# on the calling thread alone. Beside a sweep whose intra-op threads are busy with the model
# (the one-pass merge), splitting each small op over them costs more in synchronisation than it
# gains: on the 2-core EPYC, benchmarks/bench_one_pass.py's 324 M elements (fisher) merged in
# 8.2 s with 64 Ki blocks and in 2.4 s with 32 Ki; on a helper thread, 34 against 174 M elements/s.
# (`merge` runs its kernel with one intra-op thread, so BLOCK_ELEMENTS is right there.)
SERIAL_BLOCK_ELEMENTS = 1 << 15


class NonFiniteValues(ArithmeticError):
    """A block held NaN or infinite values; `roles` names the inputs that hold them."""

    def __init__(self, roles: list[str]):
        self.roles = roles
        super().__init__(", ".join(roles) or "the merged result")


def nonfinite_error(tensor_name: str, exc: NonFiniteValues) -> NonFiniteError:
    """The user-facing error for a block `merge_chunk` refused, naming the tensor and the inputs."""
    where = ", ".join(exc.roles) if exc.roles else "none of the inputs, but the merged float32 value overflows"
    return NonFiniteError(
        f"tensor {tensor_name!r}: NaN or infinite values in {where}; a model with them would be written with "
        "exit 0, so the merge stops: check the inputs (`perta-stream verify --finite` checks an output), or pass "
        "--allow-nonfinite to merge them through"
    )


def _has_nonfinite(values: torch.Tensor) -> bool:
    if bool(torch.isfinite(values.sum(dtype=torch.float32))):
        return False
    return not bool(torch.isfinite(values).all())


class MergeKernel:
    """Merges chunks for one method and one or more alphas.

    Args:
        method: tv, uniform, grad or fisher.
        alphas: task-vector scales; `merge_chunk` writes one output per alpha.
        tau, uniform_weight, fallback_weight: as in MergeConfig.
        stat_roles: the names of the (forget, retain) statistics inputs for grad/fisher.
        allow_nonfinite: merge NaN and infinite values through instead of raising NonFiniteValues.
        device: where the arithmetic runs; `merge_chunk`'s inputs and outputs must be there.
        block_elements: elements per block (the scratch buffers' length); None: BLOCK_ELEMENTS.
    """

    def __init__(
        self,
        *,
        method: str,
        alphas: tuple[float, ...],
        tau: float,
        uniform_weight: float,
        fallback_weight: float,
        stat_roles: tuple[str, ...] = (),
        allow_nonfinite: bool = False,
        device: torch.device | str = "cpu",
        block_elements: int | None = None,
    ):
        self.method = method
        self.alphas = alphas
        self.tau = tau
        self.uniform_weight = uniform_weight
        self.fallback_weight = fallback_weight
        self.stat_roles = stat_roles
        self.allow_nonfinite = allow_nonfinite
        self._block_elements = block = block_elements or BLOCK_ELEMENTS
        scratch = {"dtype": torch.float32, "device": device}
        self._task_vector = torch.empty(block, **scratch)
        self._weights = torch.empty(block, **scratch)
        self._result = torch.empty(block, **scratch)
        self._operand = torch.empty(block, **scratch)
        self._spare = torch.empty(block, **scratch)

    def merge_chunk(self, inputs: dict[str, torch.Tensor], outputs: list[torch.Tensor]) -> None:
        """Compute one chunk.

        Args:
            inputs: role -> 1-D typed view of the chunk ("theta0", "full", "fgt" and the stat roles);
                "tv": a float32 task vector made elsewhere (an adapter's, compute/task_vector.py),
                used instead of fgt - theta0, or added to it when both are given.
            outputs: one 1-D typed view per alpha, same length, in the output dtype; overwritten.

        Raises:
            NonFiniteValues: an input holds NaN or infinity (unless allow_nonfinite).
        """
        total = inputs["full"].numel()
        for start in range(0, total, self._block_elements):
            stop = min(total, start + self._block_elements)
            self._merge_block(
                {role: view[start:stop] for role, view in inputs.items()}, [output[start:stop] for output in outputs]
            )

    def _merge_block(self, inputs: dict[str, torch.Tensor], outputs: list[torch.Tensor]) -> None:
        count = inputs["full"].numel()
        task_vector = self._task_vector[:count]
        operand = self._operand[:count]
        if "fgt" in inputs:
            task_vector.copy_(inputs["fgt"])
            operand.copy_(inputs["theta0"])
            task_vector.sub_(operand)
            if "tv" in inputs:
                task_vector.add_(inputs["tv"])
        else:
            task_vector.copy_(inputs["tv"])
        if self.method == "uniform":
            task_vector.mul_(self.uniform_weight)
        elif self.method in ("grad", "fisher"):
            forget_role, retain_role = self.stat_roles
            if not self.allow_nonfinite:
                self._check_finite(inputs, (forget_role, retain_role))
            weights = compute_weights(
                inputs[forget_role],
                inputs[retain_role],
                method=self.method,
                tau=self.tau,
                fallback_weight=self.fallback_weight,
                out=self._weights[:count],
                scratch=self._result[:count],
                spare=self._spare[:count],
                other=operand,  # θ_0 is spent (in the task vector) until θ_full is copied in
            )
            task_vector.mul_(weights)
        result = self._result[:count]
        scaled = self._weights[:count]
        operand.copy_(inputs["full"])
        for alpha, output in zip(self.alphas, outputs):
            # 1.0 * x == x exactly in IEEE arithmetic, so the multiply is skipped, not approximated.
            torch.sub(operand, task_vector if alpha == 1.0 else torch.mul(task_vector, alpha, out=scaled), out=result)
            if not self.allow_nonfinite and _has_nonfinite(result):
                self._check_finite(inputs, tuple(role for role in ("theta0", "full", "fgt", "tv") if role in inputs))
                raise NonFiniteValues([])  # finite inputs, but the result overflows float32
            output.copy_(result)
            if output.dtype == torch.float16 and not self.allow_nonfinite and _has_nonfinite(output):
                raise NonFiniteValues(["the float16 output (a merged value beyond ±65504)"])

    @staticmethod
    def _check_finite(inputs: dict[str, torch.Tensor], roles: tuple[str, ...]) -> None:
        bad = [role for role in roles if _has_nonfinite(inputs[role])]
        if bad:
            raise NonFiniteValues(bad)
