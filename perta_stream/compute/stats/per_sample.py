"""Exact per-sample parameter gradients, summed and squared in float32.

The engine backpropagates the SUM of per-sample losses through one module at a time. Samples do
not interact, so for a leaf module the gradient of sample n's loss is a function of that sample's
module input x_n and output gradient δ_n alone:
  nn.Linear   weight G_n = Σ_t δ_{n,t} x_{n,t}^T, bias Σ_t δ_{n,t}
  nn.Embedding rows: Σ over the sample's positions of δ_{n,t}, added to row id_{n,t}
  anything else with parameters (every kind of norm, routers, fused experts, ...): the vjp of
              the module's own forward on one sample's inputs (`generic_stats`).
`StatsAccumulator` keeps Σ_n g_n ("grad") and Σ_n g_n² ("fisher") — the square of each sample's
own gradient, never of a batch gradient. Padding positions have δ set to zero before anything is
formed, so they contribute nothing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch

from perta_stream.errors import ModelNotSupportedError
from perta_stream.plan.stats_plan import CPU_BLOCK_ELEMENTS

GRAD, FISHER = "grad", "fisher"


def canonical_device(device: torch.device | str) -> torch.device:
    """`device` with its index. Tensors report a bare "cuda" as "cuda:<current device>", so a key
    built from "cuda" would never match the device of a tensor handed back."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class BufferPool:
    """Float32 buffers handed back and forth between the accumulators of successive layers.

    Every decoder layer has the same shapes, so its accumulators can reuse the previous layer's
    memory: zeroing reused pages runs at memory speed, while fresh pages from the OS fault one by
    one (on CPU that doubled the cost of the accumulation). Buffers may be given back from
    another thread (a background writer done with them).
    """

    def __init__(self) -> None:
        self._free: dict[tuple[tuple[int, ...], torch.device], list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def zeros(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        with self._lock:
            free = self._free.get((tuple(shape), canonical_device(device)))
            reused = free.pop() if free else None
        if reused is not None:
            return reused.zero_()
        return torch.zeros(shape, dtype=torch.float32, device=device)

    def give_back(self, tensors: Iterable[torch.Tensor]) -> None:
        with self._lock:
            for tensor in tensors:
                self._free.setdefault((tuple(tensor.shape), tensor.device), []).append(tensor)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


class StatsAccumulator:
    """Σ_n g_n and Σ_n g_n² in float32 for a fixed set of tensors (one layer, the head, ...).

    Args:
        shapes: tensor_name -> parameter shape.
        kinds: which sums to keep (`grad` -> Σ g, `fisher` -> Σ g²).
        device: where the sums live.
        pool: where the sums' memory comes from and goes back to on `release()`.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], kinds: Iterable[str], device: torch.device, *, pool: BufferPool | None = None):
        self.kinds = frozenset(kinds)
        self._device = torch.device(device)
        self._pool = pool if pool is not None else BufferPool()
        self.sums: dict[str, torch.Tensor] = {}
        self.squares: dict[str, torch.Tensor] = {}
        for tensor_name, shape in shapes.items():
            if GRAD in self.kinds:
                self.sums[tensor_name] = self._pool.zeros(shape, device)
            if FISHER in self.kinds:
                self.squares[tensor_name] = self._pool.zeros(shape, device)

    @property
    def device(self) -> torch.device:
        """Where the sums live (results() returns host copies unless this is the CPU)."""
        return self._device

    def release(self) -> None:
        """Give the sums' memory back to the pool (results taken earlier must not be used after)."""
        self._pool.give_back(list(self.sums.values()) + list(self.squares.values()))
        self.sums, self.squares = {}, {}

    @property
    def wants_squares(self) -> bool:
        return FISHER in self.kinds

    @property
    def wants_sums(self) -> bool:
        return GRAD in self.kinds

    def add_per_sample(self, tensor_name: str, per_sample: torch.Tensor) -> None:
        """Add per-sample gradients shaped [samples, *parameter shape] (any float dtype)."""
        per_sample = per_sample.float()
        if self.wants_sums:
            self.sums[tensor_name] += per_sample.sum(dim=0)
        if self.wants_squares:
            self.squares[tensor_name] += per_sample.square().sum(dim=0)

    def add_one_sample(self, tensor_name: str, gradient: torch.Tensor) -> None:
        """Add one sample's float32 gradient in place (no temporaries the size of the parameter)."""
        if self.wants_sums:
            self.sums[tensor_name].add_(gradient)
        if self.wants_squares:
            self.squares[tensor_name].addcmul_(gradient, gradient)

    def to(self, device: torch.device) -> "StatsAccumulator":
        """Move the sums (e.g. to host memory while they wait, and back)."""
        self._device = torch.device(device)
        self.sums = {k: v.to(device) for k, v in self.sums.items()}
        self.squares = {k: v.to(device) for k, v in self.squares.items()}
        return self

    def results(self, num_samples: int, tensor_names: Iterable[str] | None = None, *, to_host: bool = True) -> dict[str, dict[str, torch.Tensor]]:
        """tensor_name -> {"grad": mean gradient, "fisher": mean squared gradient}, float32, on
        the CPU (`to_host`) or else the sums' own memory on their device (valid until `release`)."""
        names = list(tensor_names) if tensor_names is not None else list(self.sums or self.squares)
        place = "cpu" if to_host else self._device
        out: dict[str, dict[str, torch.Tensor]] = {}
        for tensor_name in names:
            entry: dict[str, torch.Tensor] = {}
            # In place: an accumulator is finished once its results are taken.
            if self.wants_sums:
                entry[GRAD] = self.sums[tensor_name].div_(num_samples).to(place)
            if self.wants_squares:
                entry[FISHER] = self.squares[tensor_name].div_(num_samples).to(place)
            out[tensor_name] = entry
        return out


class Scratch:
    """Reusable flat float32 buffers, so a per-sample gradient matrix is not allocated (and
    page-faulted) for every sample and layer: on CPU, fresh memory costs as much as the matmul."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device], torch.Tensor] = {}

    def take(self, role: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        numel = 1
        for dim in shape:
            numel *= dim
        key = (role, canonical_device(device))
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=torch.float32, device=device)
            self._buffers[key] = buffer
        return buffer[:numel].view(shape)

    def clear(self) -> None:
        self._buffers.clear()


def linear_stats(
    acc: StatsAccumulator,
    weight_name: str,
    bias_name: str | None,
    x: torch.Tensor,
    delta: torch.Tensor,
    *,
    extents: list[int] | None = None,
    keep_rows: list[torch.Tensor] | None = None,
    scratch: Scratch | None = None,
) -> list[torch.Tensor] | None:
    """Accumulate the per-sample gradients of y = x Wᵀ + b.

    Args:
        x: the layer input [samples, tokens, in].
        delta: the gradient of the summed loss at the output [samples, tokens, out], zero on the
            padding before each sample's extent (what it holds after the extent is never read).
        extents: per sample, how many leading positions hold all its valid tokens (`valid_extents`);
            the positions after them are skipped. None: every position.
        keep_rows: per sample, weight rows (output indices) whose per-sample gradient is returned;
            the tied lm_head keeps the rows at the sample's token ids for the embedding step.
        scratch: reusable buffers (a fresh one when None).

    Returns:
        With keep_rows: per sample, the float32 gradient rows [len(rows), in]; else None.
    """
    samples = x.shape[0]
    products_exact_in_tf32 = x.is_cuda and x.dtype == torch.bfloat16 and delta.dtype == torch.bfloat16
    fused = acc.wants_squares and _fused_products_kernel(x.device)
    x = x.reshape(samples, -1, x.shape[-1])
    delta = delta.reshape(samples, -1, delta.shape[-1])
    if not fused:
        # The torch path works in float32 throughout. The kernel reads the given dtypes (bfloat16
        # products are exact on its tensor cores), so then only the bias and kept-row terms below
        # are upcast, a sample at a time.
        x, delta = x.float(), delta.float()
    scratch = scratch if scratch is not None else Scratch()
    spans = [x.shape[1]] * samples if extents is None else extents
    if bias_name is not None:
        acc.add_per_sample(bias_name, torch.stack([delta[n, : spans[n]].float().sum(dim=0) for n in range(samples)]))
    with _tf32_products(products_exact_in_tf32):
        kept = [delta[n, : spans[n]][:, keep_rows[n]].float().T @ x[n, : spans[n]].float() for n in range(samples)] if keep_rows is not None else None
        if fused:
            from perta_stream.compute.stats.triton_linear import add_per_sample_products

            add_per_sample_products(x, delta, spans, squares=acc.squares[weight_name], sums=acc.sums.get(weight_name))
            return kept
        # The mean needs no per-sample matrices: one matmul over every token.
        sums_by_one_matmul = acc.wants_sums and (not acc.wants_squares or _sum_by_one_matmul_beside_squares(x.device))
        if sums_by_one_matmul:
            inside = inside_extents(spans, x.shape[1], x.device)
            acc.sums[weight_name].addmm_(delta.masked_fill(~inside[..., None], 0.0).flatten(0, 1).T, x.flatten(0, 1))
        if not acc.wants_squares:
            return kept
        # One sample at a time, into one reused buffer: measured on CPU, this beats forming a chunk
        # of per-sample matrices with bmm and reducing it (1.5-2x), because every extra pass over
        # the matrices costs memory bandwidth, and it lets each product skip the sample's padding.
        # On CPU a large weight is done in blocks of rows, all samples per block, so the block's
        # sums stay in cache between samples (6-11% faster on 6144x1536 and 1536x6144 weights).
        out_features, in_features = delta.shape[-1], x.shape[-1]
        block_rows = max(1, CPU_BLOCK_ELEMENTS // in_features) if x.device.type == "cpu" else out_features
        buffer = scratch.take("per_sample", (min(block_rows, out_features), in_features), x.device)
        for start in range(0, out_features, block_rows):
            stop = min(start + block_rows, out_features)
            grad = buffer[: stop - start]
            sums = acc.sums[weight_name][start:stop] if acc.wants_sums and not sums_by_one_matmul else None
            squares = acc.squares[weight_name][start:stop]
            for n in range(samples):
                torch.mm(delta[n, : spans[n], start:stop].T, x[n, : spans[n]], out=grad)
                if sums is not None:
                    sums += grad
                squares.addcmul_(grad, grad)
    return kept


def _fused_products_kernel(device: torch.device) -> bool:
    """Whether the per-sample weight gradients are squared and summed by the Triton kernel of
    triton_linear.py (on CUDA with Triton installed) instead of being formed in memory one by one."""
    from perta_stream.compute.stats.triton_linear import fused_kernel_applies

    return fused_kernel_applies(device)


def _sum_by_one_matmul_beside_squares(device: torch.device) -> bool:
    """Whether the gradient sum is one matmul over every token even where the per-sample
    matrices are formed anyway, for the squares. On a GPU, where adding those matrices up is bound
    by memory bandwidth, it is the cheaper way (a 70B layer's backward with statistics on an H200:
    45 instead of 56 ms per batch); on CPU, adding them as they come is (measured)."""
    return device.type != "cpu"


@contextlib.contextmanager
def _tf32_products(enabled: bool) -> Iterator[None]:
    """Let float32 matmuls use TF32 tensor cores while the block runs (when `enabled`).

    Only for products of upcast bfloat16 tensors: TF32 keeps 10 mantissa bits, so it holds every
    bfloat16 value (7 bits) exactly, and cuBLAS accumulates TF32 products in float32, so the
    result is the float32 one up to the order of additions. For a Llama-70B layer's backward with
    statistics on an H200 this measured 56 instead of 78 ms per batch, differing from float32
    products by at most 3.6e-7 (relative). The previous setting is restored on the way out.
    """
    if not enabled:
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def valid_extents(valid: torch.Tensor) -> list[int]:
    """Per sample ([samples, tokens] bool), one past its last valid position (0 when none)."""
    if valid.shape[1] == 0:
        return [0] * valid.shape[0]
    positions = torch.arange(1, valid.shape[1] + 1, device=valid.device)
    return (valid * positions).amax(dim=1).tolist()


def inside_extents(extents: list[int], width: int, device: torch.device) -> torch.Tensor:
    """[samples, width] bool: True at the positions before each sample's extent."""
    return torch.arange(width, device=device) < torch.tensor(extents, device=device)[:, None]


def sample_token_rows(input_ids: torch.Tensor, valid: torch.Tensor) -> list[torch.Tensor]:
    """Per sample, the sorted distinct token ids at its valid positions (the embedding rows it touches)."""
    return [torch.unique(input_ids[n][valid[n]]) for n in range(input_ids.shape[0])]


def embedding_stats(
    acc: StatsAccumulator,
    tensor_name: str,
    input_ids: torch.Tensor,
    delta: torch.Tensor,
    valid: torch.Tensor,
    *,
    tied_rows: list[torch.Tensor] | None = None,
) -> None:
    """Accumulate the per-sample gradients of an embedding lookup (sparse: the sample's token rows).

    Args:
        input_ids: [samples, tokens]; valid: [samples, tokens] bool (real tokens, not padding_idx).
        delta: the gradient at the embedding output [samples, tokens, hidden].
        tied_rows: for a tied embedding, per sample the lm_head gradient rows at the rows
            `sample_token_rows` gives; the square is then of the SUM of both uses:
            (g_lm + g_emb)² = g_lm² (already added) + 2·g_lm·g_emb + g_emb².
    """
    for n in range(input_ids.shape[0]):
        ids = input_ids[n][valid[n]]
        rows, inverse = torch.unique(ids, return_inverse=True)
        grad_rows = torch.zeros((rows.numel(), delta.shape[-1]), dtype=torch.float32, device=delta.device)
        grad_rows.index_add_(0, inverse, delta[n][valid[n]].float())
        if acc.wants_sums:
            acc.sums[tensor_name].index_add_(0, rows, grad_rows)
        if acc.wants_squares:
            square = grad_rows.square()
            if tied_rows is not None:
                square += 2.0 * tied_rows[n].to(grad_rows.device) * grad_rows
            acc.squares[tensor_name].index_add_(0, rows, square)


class ModuleCall:
    """A module's positional and keyword inputs at forward time, and how they split into samples.

    Decoder modules see a batch either as [samples, tokens, ...] or flattened to
    [samples * tokens, ...] (a mixture-of-experts block flattens before its router and experts);
    either way sample n owns an equal, contiguous run of `rows_per_sample` leading rows. Every
    tensor input with the first input's leading size splits that way; others (rotary tables,
    masks shaped for the whole batch) go to each sample whole.
    """

    def __init__(self, args: tuple, kwargs: dict, samples: int, where: str):
        self.args, self.kwargs = args, kwargs
        self.samples = samples
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is None or first.dim() == 0 or first.shape[0] % samples:
            shape = "no tensor input" if first is None else f"an input of shape {list(first.shape)}"
            raise ModelNotSupportedError(
                f"{where} takes {shape}, which does not split into {samples} samples along its first dimension; "
                "the statistics engine needs every parameterized module of a layer to see samples (or their tokens) "
                "as leading rows"
            )
        self.rows = first.shape[0]
        self.rows_per_sample = self.rows // samples

    def _splits(self, value: object) -> bool:
        return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == self.rows

    def by_sample(self, value: torch.Tensor) -> torch.Tensor:
        """[rows, ...] -> [samples, rows_per_sample, ...], floating tensors in float32."""
        value = value.reshape(self.samples, self.rows_per_sample, *value.shape[1:])
        return value.float() if value.is_floating_point() else value

    def split(self) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], tuple[tuple, dict]]]:
        """The inputs that split, as [samples, rows_per_sample, ...] tensors, and a function that
        rebuilds (args, kwargs) of one sample from their slices."""
        positions = [("a", i) for i, a in enumerate(self.args) if self._splits(a)]
        positions += [("k", k) for k, v in self.kwargs.items() if self._splits(v)]
        tensors = [self.by_sample(self.args[i] if kind == "a" else self.kwargs[i]) for kind, i in positions]

        def rebuild(slices: list[torch.Tensor]) -> tuple[tuple, dict]:
            args, kwargs = list(self.args), dict(self.kwargs)
            for (kind, key), value in zip(positions, slices):
                if kind == "a":
                    args[key] = value
                else:
                    kwargs[key] = value
            return tuple(args), kwargs

        return tensors, rebuild


def _tensor_outputs(output: object) -> list[torch.Tensor]:
    """The tensors a module returned, in order (a tensor, or a tuple/list of tensors and other values)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [o for o in output if isinstance(o, torch.Tensor)]
    return []


_NOT_VMAPPABLE: set[type] = set()
"""Module types whose forward vmap could not run (data-dependent control flow, e.g. a loop over
the experts a batch routes to): their samples go one at a time."""
VMAP_MAX_ELEMENTS = 1 << 24
"""vmap forms every sample's gradient at once: only up to this many elements (64 MiB of float32)
in all. Larger ones (a layer's fused experts: gigabytes per sample) go one sample at a time."""


def generic_stats(
    acc: StatsAccumulator, module: torch.nn.Module, names: Mapping[str, str], call: ModuleCall, deltas: Sequence[torch.Tensor | None]
) -> None:
    """Per-sample gradients of the direct parameters of any module, by its own forward.

    Sample n's gradient is the vjp of the module's forward, run on sample n's inputs alone, with
    sample n's output gradients. torch.func.vmap does every sample at once; where the forward
    cannot be vmapped (a mixture-of-experts block loops over the experts its tokens are routed
    to), or the samples' gradients together exceed VMAP_MAX_ELEMENTS, the samples go one at a
    time through autograd, which is as exact: each expert's gradient then comes from the
    sample's tokens routed to it only. Computed in float32 (parameters and
    floating inputs upcast) so the statistics do not carry bf16 rounding.

    Args:
        names: parameter attribute (e.g. `weight`) -> tensor_name.
        call: the module's inputs.
        deltas: the gradient of the summed loss at each tensor output (None: no gradient reached it).
    """
    params = {attr: getattr(module, attr).detach().float() for attr in names}
    outputs = [i for i, d in enumerate(deltas) if d is not None]
    if not outputs:
        return
    inputs, rebuild = call.split()
    cotangents = [call.by_sample(deltas[i]) for i in outputs]

    def forward(p: dict[str, torch.Tensor], sample_inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        args, kwargs = rebuild(sample_inputs)
        produced = _tensor_outputs(torch.func.functional_call(module, p, args, kwargs))
        return tuple(produced[i].float() for i in outputs)

    per_sample_elements = call.samples * sum(p.numel() for p in params.values())
    if type(module) not in _NOT_VMAPPABLE and per_sample_elements <= VMAP_MAX_ELEMENTS:
        def one_sample(p: dict[str, torch.Tensor], sample_inputs: list[torch.Tensor], sample_cotangents: list[torch.Tensor]) -> dict[str, torch.Tensor]:
            _, vjp = torch.func.vjp(lambda q: forward(q, sample_inputs), p)
            return vjp(tuple(sample_cotangents))[0]

        try:
            per_sample = torch.func.vmap(one_sample, in_dims=(None, 0, 0))(params, inputs, cotangents)
        except RuntimeError:
            _NOT_VMAPPABLE.add(type(module))
        else:
            for attr, tensor_name in names.items():
                acc.add_per_sample(tensor_name, per_sample[attr])
            return
    for n in range(call.samples):
        leaves = {attr: value.detach().requires_grad_(True) for attr, value in params.items()}
        with torch.enable_grad():
            produced = forward(leaves, [t[n] for t in inputs])
            grads = torch.autograd.grad(produced, list(leaves.values()), [c[n] for c in cotangents], allow_unused=True)
        for (attr, tensor_name), grad in zip(names.items(), grads):
            if grad is not None:
                acc.add_one_sample(tensor_name, grad)


ModuleRule = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], None]


class PerSampleHooks:
    """Forward hooks on every module with parameters under `root` that turn (x, δ) into statistics.

    Each hooked module saves its input at forward time and puts a hook on its output tensor; when
    autograd delivers the output's gradient, the rule for the module type runs right away and the
    saved input is released. Use as a context manager around one forward+backward.

    Args:
        root: the module (a decoder layer, or the head's norm and lm_head in a ModuleDict).
        tensor_names: module path inside root -> {parameter attribute -> tensor_name}.
        acc: where statistics go.
        valid: [samples, tokens] bool; δ is zeroed where False (padding).
        lm_head_path: the module path of a tied lm_head, whose per-sample rows are kept.
        keep_rows: with lm_head_path, per sample the rows to keep (`sample_token_rows`).
        scratch: reusable buffers for the per-sample matrices.
    """

    def __init__(
        self,
        root: torch.nn.Module,
        tensor_names: Mapping[str, Mapping[str, str]],
        acc: StatsAccumulator,
        valid: torch.Tensor,
        *,
        lm_head_path: str | None = None,
        keep_rows: list[torch.Tensor] | None = None,
        scratch: Scratch | None = None,
    ):
        self._acc = acc
        self._scratch = scratch
        self._valid = valid
        self._extents = valid_extents(valid)
        # Right padding (every batch the engine builds): no padding lies inside an extent, so a
        # linear layer's δ needs no masking, which saves a pass over every output gradient.
        self._padding_only_after_extents = bool(torch.equal(inside_extents(self._extents, valid.shape[1], valid.device), valid.bool()))
        self._lm_head_path = lm_head_path
        self._keep_rows = keep_rows
        self.kept_rows: list[torch.Tensor] | None = None
        self._modules = {path: root.get_submodule(path) for path in tensor_names}
        self._names = tensor_names
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._called: set[str] = set()
        self._active = False

    def __enter__(self) -> "PerSampleHooks":
        for path, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(path), with_kwargs=True))
        self._called.clear()
        self._active = True
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        self._active = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if exc_type is None:
            self._check_every_module_ran()

    def _check_every_module_ran(self) -> None:
        """A module whose parameters the layer uses without calling it would get no statistics
        (its hook never runs): refuse rather than write zeros."""
        skipped = [path for path in self._modules if path not in self._called]
        if skipped:
            tensors = ", ".join(name for path in skipped for name in self._names[path].values())
            raise ModelNotSupportedError(
                f"the layer's forward never called the module(s) holding {tensors}, so their per-sample gradients cannot be "
                "collected; the statistics engine supports layers that call every parameterized module"
            )

    def _forward_hook(self, path: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> object:
            if not self._active:
                return None
            self._called.add(path)
            if not isinstance(output, (torch.Tensor, tuple, list)):
                raise ModelNotSupportedError(
                    f"{type(module).__name__} holding {', '.join(self._names[path].values())} returns {type(output).__name__}; "
                    "the statistics engine reads the gradients of modules that return tensors or tuples of tensors"
                )
            outputs = _tensor_outputs(output)
            if not any(o.requires_grad for o in outputs):
                return None
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            kwargs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            if isinstance(output, torch.Tensor):
                output.register_hook(lambda grad: self._on_grad(path, module, args, kwargs, [grad]))
                return None
            # Several outputs (a router's logits, weights and indices), which may feed one another
            # inside the module (weights = top-k of softmax(logits)): autograd's gradient at such
            # an output would include what flows back through the others. Each output leaves as
            # a fresh view, whose gradient is only what the rest of the layer sends back; one
            # call once autograd has computed every one it will (None where the loss does not reach).
            replaced = [o.view_as(o) if o.requires_grad else o for o in outputs]
            index = [i for i, o in enumerate(replaced) if o.requires_grad]

            def on_grads(grads: Sequence[torch.Tensor | None]) -> None:
                aligned: list[torch.Tensor | None] = [None] * len(outputs)
                for i, grad in zip(index, grads):
                    aligned[i] = grad
                self._on_grad(path, module, args, kwargs, aligned)

            torch.autograd.graph.register_multi_grad_hook([replaced[i] for i in index], on_grads)
            fresh = iter(replaced)
            items = [next(fresh) if isinstance(o, torch.Tensor) else o for o in output]
            return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)

        return hook

    def _masked(self, grad: torch.Tensor) -> torch.Tensor:
        """`grad` with nothing at the padding positions.

        Under right padding (every batch the engine builds) the gradient there is exactly zero
        already: padding follows every real token, so under causal attention no real position's
        loss reaches it. It is then returned as it is, whatever its layout (Gemma 3's q/k norms
        act on [samples, heads, tokens, ...], which a mask shaped [samples, tokens] could be
        mistaken for). Otherwise the padding is zeroed, in the layouts where it is known:
        [samples, tokens, ...] or [samples * tokens, ...].
        """
        if self._padding_only_after_extents:
            return grad.detach()
        valid = self._valid
        if tuple(grad.shape[:2]) != tuple(valid.shape):
            if grad.shape[0] != valid.numel():
                raise ModelNotSupportedError(
                    f"a gradient of shape {list(grad.shape)} has no [samples, tokens] layout to mask padding by; "
                    "pad the batch on the right (as the statistics engine does)"
                )
            valid = valid.reshape(-1)
        mask = valid.reshape(valid.shape + (1,) * (grad.dim() - valid.dim()))
        return grad.detach() * mask.to(grad.dtype)

    def _on_grad(self, path: str, module: torch.nn.Module, args: tuple, kwargs: dict, grads: list[torch.Tensor | None]) -> None:
        names = self._names[path]
        # Nested transforms (vmap/vjp) must not re-enter these hooks.
        self._active = False
        try:
            if isinstance(module, torch.nn.Linear):
                (grad,) = grads
                # Padding positions must contribute nothing (linear_stats never reads past an extent).
                delta = self._masked(grad)
                keep = self._keep_rows if path == self._lm_head_path else None
                x = args[0]
                samples = self._valid.shape[0]
                if x.shape[0] != samples:
                    # Tokens flattened into rows (inside a mixture-of-experts block): back to [samples, tokens, ...].
                    call = ModuleCall(args, kwargs, samples, where=f"{type(module).__name__} holding {names['weight']}")
                    x = x.reshape(samples, call.rows_per_sample, *x.shape[1:])
                    delta = delta.reshape(samples, call.rows_per_sample, *delta.shape[1:])
                with torch.no_grad():
                    kept = linear_stats(
                        self._acc, names["weight"], names.get("bias"), x, delta, extents=self._extents, keep_rows=keep, scratch=self._scratch
                    )
                if keep is not None:
                    self.kept_rows = kept
            else:
                deltas = [None if grad is None else self._masked(grad) for grad in grads]
                call = ModuleCall(args, kwargs, self._valid.shape[0], where=f"{type(module).__name__} holding {', '.join(names.values())}")
                generic_stats(self._acc, module, names, call, deltas)
        finally:
            self._active = True
