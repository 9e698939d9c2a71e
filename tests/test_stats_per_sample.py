"""The per-sample rules and the boundary store, against explicit per-sample autograd."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from perta_stream.compute.stats import per_sample
from perta_stream.compute.stats.boundaries import BoundaryStore
from perta_stream.compute.stats.per_sample import (
    BufferPool,
    ModuleCall,
    PerSampleHooks,
    StatsAccumulator,
    canonical_device,
    embedding_stats,
    generic_stats,
    linear_stats,
    valid_extents,
)


def _explicit(module: torch.nn.Module, x: torch.Tensor, valid: torch.Tensor) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Σ g and Σ g² of each parameter for the per-sample loss ℓ_n = Σ_t w_t · out_{n,t} (padding excluded)."""
    torch.manual_seed(1)
    weights = torch.randn(module(x[:1]).shape[1:])
    sums = {n: torch.zeros_like(p) for n, p in module.named_parameters()}
    squares = {n: torch.zeros_like(p) for n, p in module.named_parameters()}
    for n in range(x.shape[0]):
        keep = valid[n]
        loss = (module(x[n : n + 1])[0][keep] * weights[keep]).sum()
        for (name, _), grad in zip(module.named_parameters(), torch.autograd.grad(loss, list(module.parameters()))):
            sums[name] += grad
            squares[name] += grad**2
    return {n: (sums[n], squares[n]) for n in sums}, weights


@pytest.mark.parametrize("sum_by_one_matmul", [False, True], ids=["cpu-sums", "gpu-sums"])
@pytest.mark.parametrize("block_rows", [None, 5])
@pytest.mark.parametrize("skip_padding", [False, True])
def test_linear_rule_matches_autograd(skip_padding: bool, block_rows: int | None, sum_by_one_matmul: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # The GPU's way of summing (one matmul beside the per-sample squares), run on the CPU.
    monkeypatch.setattr(per_sample, "_sum_by_one_matmul_beside_squares", lambda device: sum_by_one_matmul)
    if block_rows is not None:
        # Blocks of 5 of the 12 output rows: two full blocks and a partial one.
        monkeypatch.setattr(per_sample, "CPU_BLOCK_ELEMENTS", block_rows * 6)
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 12, bias=True)
    x = torch.randn(5, 7, 6)
    valid = torch.rand(5, 7) > 0.3
    expected, weights = _explicit(layer, x, valid)
    acc = StatsAccumulator({"w": (12, 6), "b": (12,)}, ("grad", "fisher"), torch.device("cpu"))
    delta = weights.expand(5, 7, 12) * valid[..., None]
    extents = valid_extents(valid) if skip_padding else None
    if skip_padding:
        # Past its extent a sample's δ is never read, whatever it holds.
        delta = torch.where((torch.arange(7) < torch.tensor(extents)[:, None])[..., None], delta, torch.nan)
    linear_stats(acc, "w", "b", x, delta, extents=extents)
    for name, key in (("w", "weight"), ("b", "bias")):
        torch.testing.assert_close(acc.sums[name], expected[key][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(acc.squares[name], expected[key][1], rtol=1e-5, atol=1e-6)
    grad_only = StatsAccumulator({"w": (12, 6), "b": (12,)}, ("grad",), torch.device("cpu"))
    rows = [torch.tensor([0, 5]), torch.tensor([11]), torch.tensor([2, 3, 4]), torch.tensor([1]), torch.tensor([7])]
    kept = linear_stats(grad_only, "w", "b", x, delta, extents=extents, keep_rows=rows)
    torch.testing.assert_close(grad_only.sums["w"], expected["weight"][0], rtol=1e-5, atol=1e-6)
    for n, r in enumerate(rows):
        span = extents[n] if skip_padding else 7
        torch.testing.assert_close(kept[n], (delta[n, :span].T @ x[n, :span])[r], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("right_padded", [True, False])
def test_hooks_on_a_linear_layer_drop_padding(right_padded: bool) -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 12, bias=True)
    x = torch.randn(5, 7, 6)
    lengths = torch.tensor([7, 5, 5, 2, 1])
    valid = torch.arange(7) < lengths[:, None] if right_padded else torch.rand(5, 7) > 0.3
    expected, weights = _explicit(layer, x, valid)
    acc = StatsAccumulator({"w": (12, 6), "b": (12,)}, ("grad", "fisher"), torch.device("cpu"))
    for parameter in layer.parameters():
        parameter.requires_grad_(False)
    # Autograd delivers the gradient of Σ_t w_t·out_t at every position, padding included.
    with PerSampleHooks(torch.nn.ModuleDict({"proj": layer}), {"proj": {"weight": "w", "bias": "b"}}, acc, valid):
        (layer(x.clone().requires_grad_(True)) * weights).sum().backward()
    for name, key in (("w", "weight"), ("b", "bias")):
        torch.testing.assert_close(acc.sums[name], expected[key][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(acc.squares[name], expected[key][1], rtol=1e-5, atol=1e-6)


def test_valid_extents_end_after_the_last_valid_position() -> None:
    valid = torch.tensor([[True, True, False, False], [True, False, True, False], [False] * 4, [True] * 4])
    assert valid_extents(valid) == [2, 3, 0, 4]


def test_generic_rule_on_rmsnorm_and_hooks_zero_padding() -> None:
    torch.manual_seed(0)
    norm = torch.nn.RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.add_(torch.randn(8) * 0.1)
    x = torch.randn(4, 5, 8)
    valid = torch.rand(4, 5) > 0.4
    expected, weights = _explicit(norm, x, valid)
    acc = StatsAccumulator({"norm.weight": (8,)}, ("grad", "fisher"), torch.device("cpu"))
    generic_stats(acc, norm, {"weight": "norm.weight"}, ModuleCall((x,), {}, 4, where="norm"), [weights.expand(4, 5, 8) * valid[..., None]])
    torch.testing.assert_close(acc.squares["norm.weight"], expected["weight"][1], rtol=1e-5, atol=1e-6)
    # Through the hooks, with autograd delivering an unmasked gradient: padding must be dropped.
    hooked = StatsAccumulator({"norm.weight": (8,)}, ("grad", "fisher"), torch.device("cpu"))
    root = torch.nn.ModuleDict({"norm": norm})
    for parameter in norm.parameters():
        parameter.requires_grad_(False)
    h = x.clone().requires_grad_(True)
    with PerSampleHooks(root, {"norm": {"weight": "norm.weight"}}, hooked, valid):
        (norm(h) * weights).sum().backward()
    torch.testing.assert_close(hooked.sums["norm.weight"], expected["weight"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hooked.squares["norm.weight"], expected["weight"][1], rtol=1e-5, atol=1e-6)


def test_embedding_rule_sums_repeated_tokens_before_squaring() -> None:
    ids = torch.tensor([[3, 1, 3, 0], [2, 2, 2, 4]])
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    delta = torch.randn(2, 4, 5)
    acc = StatsAccumulator({"e": (6, 5)}, ("grad", "fisher"), torch.device("cpu"))
    embedding_stats(acc, "e", ids, delta, valid)
    sums, squares = torch.zeros(6, 5), torch.zeros(6, 5)
    for n in range(2):
        g = torch.zeros(6, 5)
        for t in range(4):
            if valid[n, t]:
                g[ids[n, t]] += delta[n, t]
        sums += g
        squares += g**2
    torch.testing.assert_close(acc.sums["e"], sums)
    torch.testing.assert_close(acc.squares["e"], squares)


def test_buffer_pool_hands_back_zeroed_buffers_of_the_same_shape() -> None:
    pool = BufferPool()
    first = pool.zeros((3, 4), "cpu").fill_(7.0)
    pool.give_back([first])
    again = pool.zeros((3, 4), torch.device("cpu"))
    assert again.data_ptr() == first.data_ptr() and not again.any()
    assert pool.zeros((3, 4), "cpu").data_ptr() != first.data_ptr()  # that one is taken
    assert pool.zeros((4, 3), "cpu").data_ptr() != first.data_ptr()


def test_canonical_device_names_the_current_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # A bare "cuda" must key the pool as the tensors it allocates report themselves: "cuda:<index>".
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert canonical_device("cuda") == torch.device("cuda", 3)
    assert canonical_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert canonical_device("cpu") == torch.device("cpu")


def test_boundary_store_spills_past_budget_and_cleans_up(tmp_path: Path) -> None:
    tensors = {k: torch.randn(3, 4, 5).to(dtype) for k, dtype in ((0, torch.float32), (1, torch.bfloat16), (2, torch.float32))}
    with BoundaryStore(3 * 4 * 5 * 4 + 10, spill_parent=tmp_path) as store:
        for key, tensor in tensors.items():
            store.put(key, tensor.clone())
        assert store.spilled_count == 2 and store.ram_bytes == 240 and store.disk_bytes == 120 + 240
        assert torch.equal(store.get(1), tensors[1]) and store.get(1).dtype == torch.bfloat16
        assert torch.equal(store.pop(2), tensors[2]) and 2 not in store
        spill_dirs = list(tmp_path.iterdir())
        assert len(spill_dirs) == 1 and len(list(spill_dirs[0].iterdir())) == 1
    assert list(tmp_path.iterdir()) == []


def test_scored_positions_give_the_per_sample_loss_from_fewer_logits() -> None:
    from perta_stream.compute.prompts import IGNORE_INDEX, mean_target_nll, per_sample_loss, scored_positions

    torch.manual_seed(0)
    labels = torch.randint(0, 11, (4, 9))
    labels[0, :4] = IGNORE_INDEX  # a prompt, then the answer
    labels[1, :] = IGNORE_INDEX  # nothing scored
    labels[2, 1:] = IGNORE_INDEX  # only position 0 is labelled: no position predicts it
    labels[3, 2:6] = IGNORE_INDEX  # labelled tokens on both sides of a gap
    logits = torch.randn(4, 9, 11)
    positions, targets = scored_positions(labels)
    assert positions.shape == (4, 5) and positions[0, :5].tolist() == [3, 4, 5, 6, 7]
    assert (targets != IGNORE_INDEX).sum(dim=1).tolist() == [5, 0, 0, 4]
    scored_logits = logits[torch.arange(4)[:, None], positions]
    assert torch.allclose(mean_target_nll(scored_logits, targets), per_sample_loss(logits, labels), rtol=1e-6, atol=0)
    nothing = torch.full((2, 5), IGNORE_INDEX)
    assert scored_positions(nothing)[0].shape == (2, 0) and valid_extents(torch.zeros(2, 0, dtype=torch.bool)) == [0, 0]


def test_head_projection_backpropagates_the_matmul_in_vocabulary_blocks() -> None:
    # A vocabulary that ends in a partial block, [samples, positions, ...] gradients, hooks intact.
    from perta_stream.compute.stats.head_projection import VOCAB_BLOCK_ROWS, VocabularyBlockedBackward

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 3 * VOCAB_BLOCK_ROWS + 5, bias=False).requires_grad_(False)
    x = torch.randn(2, 3, 8, requires_grad=True)
    seen = []
    head.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    with VocabularyBlockedBackward(head):
        logits = head(x)
        logits.square().sum().backward()
    assert torch.equal(logits, x @ head.weight.T) and seen == [logits.shape]
    expected = (2 * logits.detach().double()) @ head.weight.double()
    assert float((x.grad.double() - expected).norm() / expected.norm()) < 1e-6
    assert "forward" not in vars(head)  # the module's own forward is back
