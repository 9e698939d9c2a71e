"""The head's projection onto the vocabulary, with its input gradient summed in vocabulary blocks.

The gradient at the head's input is δ W: at each scored position, a dot product over the whole
vocabulary (49k to 256k terms), whose terms largely cancel (δ is about softmax minus one-hot,
which sums to zero, and the rows of W share a direction). How accurately a float32 matmul sums
that many terms depends on the kernel the BLAS picks for the shapes. MKL's sgemm (the BLAS of
torch's CPU wheels), for most row counts below 12 (what a short sample alone in its batch
scores), sums as if in one running sum: its error grows with the vocabulary, and continuing the
same sum block after block (addmm_) leaves it unchanged. Measured with SmolLM2-135M's 49152 x 576
embedding against float64: 2.2e-7 to 4.1e-5 relative for 1-11 rows, 2.2-2.6e-7 for 12-64. On
the model's shortest retain90 sample (10 scored positions) the head's input gradient was 1.0e-4
off, and its statistics up to 7.6e-4 (grad) and 1.8e-3 (fisher). Summing blocks of
VOCAB_BLOCK_ROWS rows, each product into a fresh partial, bounds the error whatever the kernel:
1.9-2.6e-7 for 1-64 rows.
"""

from __future__ import annotations

import torch

VOCAB_BLOCK_ROWS = 256
"""Vocabulary rows per partial product. Measured as above, the worst of 1-64 rows: 2.6e-7 with
256, 5.7e-7 with 1024, 2.4e-6 with 4096 (a block's own product can be one running sum)."""


class _VocabularyBlockedLinear(torch.autograd.Function):
    """y = x Wᵀ (+ b); the input gradient δ W is summed over vocabulary blocks. W and b are
    frozen (the engine reads the weight's per-sample gradients from hooks, not from autograd)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        return vocabulary_blocked_matmul(grad, weight), None, None


def vocabulary_blocked_matmul(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad [..., vocab] @ weight [vocab, hidden], summed over blocks of VOCAB_BLOCK_ROWS rows.

    Only in float32: a bfloat16 or float16 matmul accumulates in float32 inside the kernel and
    rounds once, and that rounding, not the order of the sum, is its error.
    """
    vocab = weight.shape[0]
    if grad.dtype != torch.float32 or vocab <= VOCAB_BLOCK_ROWS:
        return grad.matmul(weight)
    rows = grad.reshape(-1, vocab)
    total = rows[:, :VOCAB_BLOCK_ROWS].mm(weight[:VOCAB_BLOCK_ROWS])
    for start in range(VOCAB_BLOCK_ROWS, vocab, VOCAB_BLOCK_ROWS):
        stop = min(start + VOCAB_BLOCK_ROWS, vocab)
        total += rows[:, start:stop].mm(weight[start:stop])
    return total.view(*grad.shape[:-1], weight.shape[1])


class VocabularyBlockedBackward:
    """Within the context, the head's projection (an nn.Linear) backpropagates with
    `vocabulary_blocked_matmul`. Its forward value is unchanged, and its hooks still run, so its
    per-sample statistics see the same input and output gradient."""

    def __init__(self, projection: torch.nn.Linear):
        self._projection = projection

    def __enter__(self) -> "VocabularyBlockedBackward":
        projection = self._projection
        projection.forward = lambda x: _VocabularyBlockedLinear.apply(x, projection.weight, projection.bias)
        return self

    def __exit__(self, *exc_info: object) -> None:
        del self._projection.forward
