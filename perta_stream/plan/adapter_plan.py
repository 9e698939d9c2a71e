"""An adapter checked against the model it changes, from headers only.

Every tensor an adapter names must be a tensor of θ_0 with the shape its factors imply. A model
that ties lm_head to its input embedding stores one tensor for both: an adapter must change both
halves the same way (peft's `ensure_weight_tying=True`, or trainable tokens, which peft ties),
since a merged checkpoint cannot hold two. The lm_head entries of such an adapter are then the
embedding's own change (peft saves them twice) and are taken once.

Note: peft's own `merge_and_unload` adds a tied embedding's LoRA twice (once through each half,
to the one shared weight); the adapted model's function changes it once, which is what is taken here.
"""

from __future__ import annotations

from collections.abc import Iterable

from perta_stream.sources.adapter import Adapter, AdapterDelta
from perta_stream.sources.checkpoint import INPUT_EMBEDDING_SUFFIX, OUTPUT_EMBEDDING_NAMES, Checkpoint
from perta_stream.sources.safetensors_header import TensorInfo

# Per element of a chunk buffer set, besides the inputs' bytes: the float32 task vector made from
# the factors, and θ_0's rows as float32 (DoRA, trainable tokens).
TASK_VECTOR_BYTES_PER_ELEMENT = 8


def adapter_deltas(adapter: Adapter, theta0: Checkpoint, problems: list[str]) -> dict[str, AdapterDelta]:
    """tensor_name of θ_0 -> the adapter's change of it; every mismatch is appended to `problems`."""
    where = f"{adapter.role} adapter {adapter.location}"
    embedding = next((name for name in theta0.tensors if name.endswith(INPUT_EMBEDDING_SUFFIX)), None)
    found: dict[str, AdapterDelta] = {}
    unknown: list[str] = []
    tied_halves: dict[str, AdapterDelta] = {}
    for tensor_name, delta in adapter.deltas.items():
        if theta0.ties_embeddings and tensor_name in OUTPUT_EMBEDDING_NAMES:
            tied_halves[tensor_name] = delta
            continue
        info = theta0.tensors.get(tensor_name)
        if info is None:
            unknown.append(tensor_name)
            continue
        problem = shape_problem(delta, info.shape)
        if problem:
            problems.append(f"{where}: tensor {tensor_name!r} {problem}; the adapter was trained on another model")
            continue
        if delta.replacement is not None and delta.needs_theta0_rows:
            problems.append(f"{where}: tensor {tensor_name!r} has saved values and DoRA or trainable tokens together, which is not supported")
            continue
        found[tensor_name] = delta
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        problems.append(
            f"{where} changes {unknown[0]!r}{more}, which θ_0 ({theta0.location}) does not hold; the module names do not match the model "
            "(was it trained on another architecture, or saved with another naming?)"
        )
    if theta0.ties_embeddings and embedding is not None:
        _check_tied(adapter, embedding, found, tied_halves, problems, where)
    return found


def _check_tied(adapter: Adapter, embedding: str, found: dict[str, AdapterDelta], tied_halves: dict[str, AdapterDelta], problems: list[str], where: str) -> None:
    changes_input = embedding in found and (found[embedding].low_rank is not None or found[embedding].replacement is not None)
    tied_by_peft = bool(adapter.config.get("ensure_weight_tying"))
    if tied_by_peft and (changes_input or tied_halves):
        if not changes_input:
            problems.append(f"{where} changes lm_head but not {embedding}, which the model ties to it; train it with the embedding in target_modules")
        return
    if changes_input or tied_halves:
        half = embedding if changes_input else next(iter(tied_halves))
        other = next(iter(tied_halves), "lm_head.weight") if changes_input else embedding
        problems.append(
            f"{where} changes {half} but not {other}, which the model ties to it (one stored tensor): the merged model cannot "
            "hold that; retrain with peft's ensure_weight_tying=True (both halves change together), or untie the "
            "embeddings (tie_word_embeddings=false, lm_head saved) in θ_0 and every model"
        )


def delta_read_bytes(delta: AdapterDelta | None, theta0_rows: TensorInfo | None, shape: tuple[int, ...]) -> int:
    """Adapter and θ_0 bytes the task vector of one tensor reads besides its chunks: its factors,
    and θ_0's rows (all of them for DoRA, the replaced ones for trainable tokens)."""
    if delta is None:
        return 0
    extra = sum(info.nbytes for info in delta.infos if info is not delta.replacement)
    if theta0_rows is not None:
        row_bytes = theta0_rows.nbytes // max(1, shape[0])
        dora = delta.low_rank is not None and delta.low_rank.magnitude is not None
        extra += theta0_rows.nbytes if dora else len(delta.token_rows) * row_bytes
    return extra


def delta_inputs(delta: AdapterDelta | None, theta0: TensorInfo) -> tuple[dict[str, TensorInfo], TensorInfo | None]:
    """What a tensor's task vector reads besides the factors: the chunked inputs (θ_0's and the
    adapter's saved values where it replaced the tensor, else none) and θ_0's tensor when the change
    needs its rows (DoRA, trainable tokens), else None."""
    if delta is None:
        return {}, None
    chunked = {"theta0": theta0, "fgt": delta.replacement} if delta.replacement is not None else {}
    return chunked, theta0 if delta.needs_theta0_rows else None


def factor_bytes(deltas: Iterable[AdapterDelta]) -> int:
    """Memory of the float32 factors held while a tensor's chunks are computed (two tensors' in flight)."""
    return 2 * max((sum(info.numel for info in delta.infos) * 4 for delta in deltas), default=0)


def shape_problem(delta: AdapterDelta, shape: tuple[int, ...]) -> str | None:
    """Why `delta` cannot change a tensor of `shape`, or None."""
    if delta.replacement is not None and delta.replacement.shape != shape:
        return f"has saved values of shape {list(delta.replacement.shape)}, the model {list(shape)}"
    low_rank = delta.low_rank
    if low_rank is not None:
        if len(shape) != 2:
            return f"is {len(shape)}-D; a LoRA changes matrices"
        rows = low_rank.left.shape[1] if low_rank.transposed else low_rank.left.shape[0]
        cols = low_rank.right.shape[0] if low_rank.transposed else low_rank.right.shape[1]
        if (rows, cols) != tuple(shape):
            return f"gets a LoRA of shape {[rows, cols]}, the model has {list(shape)}"
        if low_rank.magnitude is not None and low_rank.magnitude.shape != (rows,):
            return f"gets a DoRA magnitude of shape {list(low_rank.magnitude.shape)}, not [{rows}]"
    if delta.token_values is not None:
        if len(shape) != 2 or delta.token_values.shape[1:] != shape[1:]:
            return f"gets token rows of shape {list(delta.token_values.shape)}, the model {list(shape)}"
        if any(not 0 <= row < shape[0] for row in delta.token_rows):
            return f"gets trainable token indices beyond its {shape[0]} rows"
    return None

