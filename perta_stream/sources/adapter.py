"""A PEFT LoRA adapter as a model input: its config, and what it changes in each tensor, from headers.

An adapter folder (local or `hf://`) holds `adapter_config.json` and `adapter_model.safetensors`.
The config is read with peft's own config class (`PeftConfig.from_peft_type`), the tensors are
located from the safetensors header; nothing is loaded through `PeftModel`, and no byte of the
base model is needed to know what the adapter does:

- a LoRA on `M` (Linear, or Embedding) changes tensor `M.weight` by s·(B@A) (transposed for an
  embedding and with fan_in_fan_out), s = lora_alpha/r, or lora_alpha/√r with rsLoRA, r and alpha
  per module from rank_pattern/alpha_pattern, matched by peft's `get_pattern_key`;
- DoRA adds a magnitude vector: the changed weight is m ⊙ (W + s·BA)/‖W + s·BA‖ per row;
- `modules_to_save` tensors (and the base layers peft saves next to an embedding LoRA) are full
  values that replace θ_0's;
- trainable tokens replace the rows at `trainable_token_indices`.

`AdapterDelta` says this per tensor of the model, in the model's tensor names. What an adapter
does that the merge cannot reproduce exactly is refused here, each with one line (`problems`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from perta_stream.errors import CheckpointError, CheckpointNotFoundError, HeaderError, PickleCheckpointError, PlanError, UsageError
from perta_stream.sources.byte_source import ByteSource, LocalByteSource
from perta_stream.sources.pinned_folder import FileIdentity, PinnedFolder
from perta_stream.sources.safetensors_header import SafetensorsHeader, TensorInfo, parse_header

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_PICKLE_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
# Initialisations that change the base weights when the adapter is created (the residual model
# is saved apart from the adapter): θ_0 + s·BA is not the fine-tuned model.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "kasa")
# LoraConfig options whose adapters are not a weight change W + s·BA on the model's own modules.
UNSUPPORTED_OPTIONS = {
    "alora_invocation_tokens": "Activated LoRA applies the adapter only after its invocation tokens, so it is no weight change",
    "use_qalora": "QALoRA pools the input of quantized layers",
    "layer_replication": "layer replication builds new layers the checkpoint does not hold",
    "target_parameters": "LoRA on bare parameters (fused experts) is not supported yet",
    "use_bdlora": "block-diagonal LoRA factors are not supported",
    "velora_config": None,
    "arrow_config": "Arrow routes between several adapters per token",
    "kasa_config": "KaSA truncates the base weights' singular values",
    "megatron_config": "Megatron-parallel layers are not supported",
    "monteclora_config": "MonteCLoRA samples its factors",
}
_LORA_SUFFIXES = {
    "lora_A.weight": ("linear", "A"),
    "lora_B.weight": ("linear", "B"),
    "lora_embedding_A": ("embedding", "A"),
    "lora_embedding_B": ("embedding", "B"),
    "lora_magnitude_vector": (None, "magnitude"),
}
TOKEN_SUFFIX = "token_adapter.trainable_tokens_delta"
BASE_LAYER_INFIX = ".base_layer."


@dataclass(frozen=True)
class LowRankDelta:
    """s · left @ right, as a change of a stored tensor of shape (rows, cols).

    Attributes:
        left: a (rows, r) factor in the adapter (B; lora_embedding_A read transposed when `transposed`).
        right: an (r, cols) factor (A; lora_embedding_B read transposed when `transposed`).
        transposed: the stored tensor is (B@A)ᵀ (an embedding, or fan_in_fan_out): rows of the
            stored tensor are then columns of A (left = Aᵀ, right = Bᵀ).
        scale: lora_alpha / r, or lora_alpha / √r with rsLoRA.
        magnitude: DoRA's magnitude vector (one value per row of the stored tensor), or None.
    """

    left: TensorInfo
    right: TensorInfo
    transposed: bool
    scale: float
    magnitude: TensorInfo | None = None

    @property
    def rank(self) -> int:
        return self.left.shape[0] if self.transposed else self.left.shape[1]

    @property
    def infos(self) -> tuple[TensorInfo, ...]:
        return (self.left, self.right) + ((self.magnitude,) if self.magnitude is not None else ())


@dataclass(frozen=True)
class AdapterDelta:
    """What an adapter does to one tensor of the model (θ_adapted − θ_0 of that tensor).

    Attributes:
        tensor_name: the model's state-dict key.
        low_rank: the LoRA (DoRA) change, or None.
        replacement: full values replacing θ_0's (modules_to_save, a saved base layer), or None.
        token_rows: row indices whose values `token_values` replace (trainable tokens).
        token_values: (len(token_rows), cols) values, or None.
    """

    tensor_name: str
    low_rank: LowRankDelta | None = None
    replacement: TensorInfo | None = None
    token_rows: tuple[int, ...] = ()
    token_values: TensorInfo | None = None

    @property
    def needs_theta0_rows(self) -> bool:
        """DoRA normalises W + s·BA row by row, and trainable tokens replace rows: both need θ_0's rows."""
        return bool(self.token_rows) or (self.low_rank is not None and self.low_rank.magnitude is not None)

    @property
    def infos(self) -> tuple[TensorInfo, ...]:
        """The adapter tensors this change reads."""
        found = list(self.low_rank.infos) if self.low_rank is not None else []
        return tuple(found + [info for info in (self.replacement, self.token_values) if info is not None])


@dataclass(frozen=True)
class Adapter:
    """The header-level view of a LoRA adapter.

    Attributes:
        location, role: where it is and what it is for in this run (messages).
        config: the adapter_config.json, as peft's LoraConfig read it (a dict of its fields).
        header: the safetensors header of adapter_model.safetensors.
        deltas: the model's tensor_name -> what the adapter changes in it (names as the adapter
            gives them; `plan/adapter_plan.py` checks them against the model).
        base_model: `base_model_name_or_path` of the config (where the adapter says it was trained).
        header_sha256: digest of the config and the weights' header.
    """

    location: str
    role: str
    config: dict
    header: SafetensorsHeader
    deltas: dict[str, AdapterDelta]
    base_model: str | None
    header_sha256: str

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.header.tensors.values())

    @property
    def uses_dora(self) -> bool:
        return any(d.low_rank is not None and d.low_rank.magnitude is not None for d in self.deltas.values())

    def file_identity(self) -> list:
        """The adapter's files as they are now (see Checkpoint.file_identity)."""
        if self.location.startswith("hf://"):
            return [self.location]
        root = Path(self.location).resolve()
        return [str(root), [FileIdentity.of(name, (root / name).stat()).to_json() for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)]]


def is_local_adapter(location: str | os.PathLike) -> bool:
    """A local folder holding adapter_config.json and no model weights of its own."""
    root = Path(location)
    return (root / ADAPTER_CONFIG_NAME).is_file() and not (root / "model.safetensors").exists() and not (root / "model.safetensors.index.json").exists()


def open_adapter(location: str, role: str) -> tuple[Adapter, ByteSource]:
    """Read an adapter's config and weights header (local folder or `hf://`), with its byte source.

    Raises:
        PickleCheckpointError: only adapter_model.bin (a pickle: never loaded).
        CheckpointError: no adapter files, or an unreadable config.
        PlanError: every refused feature of the adapter, one line each.
    """
    if str(location).startswith("hf://"):
        return _open_hub_adapter(str(location), role)
    root = Path(location)
    # Opened once and read through its descriptors to the end, as checkpoints are (pinned_folder.py).
    folder = PinnedFolder(root) if root.is_dir() else None
    _check_files(set(folder.listing()) if folder is not None else set(), str(location), role)
    path = root / ADAPTER_WEIGHTS_NAME
    if path.is_symlink() and not path.resolve().is_relative_to(root.resolve()):
        raise CheckpointError(f"{role} adapter {location}: {ADAPTER_WEIGHTS_NAME} links outside the folder; replace the link by the file")
    raw_config = folder.read_file(ADAPTER_CONFIG_NAME)
    try:
        header = parse_header(
            lambda offset, length: folder.read_at(ADAPTER_WEIGHTS_NAME, offset, length), folder.identity(ADAPTER_WEIGHTS_NAME).size_bytes, ADAPTER_WEIGHTS_NAME
        )
    except HeaderError as exc:
        raise CheckpointError(f"{role} adapter {location}: {exc}") from None
    return build_adapter(str(location), role, raw_config, header), LocalByteSource(folder)


def _check_files(names: set[str], location: str, role: str) -> None:
    if ADAPTER_CONFIG_NAME not in names:
        raise CheckpointNotFoundError(f"{role} adapter {location} has no {ADAPTER_CONFIG_NAME}; pass a folder saved by PeftModel.save_pretrained")
    if ADAPTER_WEIGHTS_NAME not in names:
        if ADAPTER_PICKLE_NAME in names:
            raise PickleCheckpointError(
                f"{role} adapter {location} has only {ADAPTER_PICKLE_NAME}, a pickle, which can run code when loaded and is refused; "
                "if you trust it, load it with peft and save it again (save_pretrained writes adapter_model.safetensors)"
            )
        raise CheckpointNotFoundError(f"{role} adapter {location} has no {ADAPTER_WEIGHTS_NAME}; save it with PeftModel.save_pretrained")


def _open_hub_adapter(location: str, role: str) -> tuple[Adapter, ByteSource]:
    from perta_stream.sources.hub import HubByteSource, folder_sha256, folder_sizes
    from perta_stream.sources.hub_http import RangeReader, make_api, parse_hub_location, with_retries

    hub_location = parse_hub_location(location)
    api = make_api()
    info = with_retries(
        lambda: api.model_info(hub_location.repo_id, revision=hub_location.revision, files_metadata=True), action=f"opening {role} adapter", location=location
    )
    sizes = folder_sizes(info.siblings or [], hub_location.path_in_repo)
    pinned = hub_location.pinned(info.sha)
    _check_files(set(sizes), pinned, role)
    reader = RangeReader(hub_location, info.sha)
    source = HubByteSource(reader, sizes, folder_sha256(info.siblings or [], hub_location.path_in_repo))
    raw_config = reader.read_bytes(ADAPTER_CONFIG_NAME, 0, sizes[ADAPTER_CONFIG_NAME])
    size = sizes[ADAPTER_WEIGHTS_NAME]
    try:
        header = parse_header(lambda offset, length: source.read_bytes(ADAPTER_WEIGHTS_NAME, offset, max(0, min(length, size - offset))), size, ADAPTER_WEIGHTS_NAME)
    except HeaderError as exc:
        raise CheckpointError(f"{role} adapter {pinned}: {exc}") from None
    return build_adapter(pinned, role, raw_config, header), source


def peft_answer(request: dict) -> dict:
    """Read `request["document"]` with peft's LoraConfig and match each of `request["modules"]`
    against rank_pattern/alpha_pattern with peft's get_pattern_key: {"config": fields, "scales":
    {module: [r, alpha]}}, or {"error": ...}. JSON in, JSON out: it runs in a child process."""
    try:
        from peft import LoraConfig, PeftConfig
        from peft.utils.other import get_pattern_key
    except ImportError:
        return {"error": "import"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = PeftConfig.from_peft_type(**request["document"])
    except (TypeError, ValueError, KeyError) as exc:
        return {"error": "config", "message": str(exc)}
    if not isinstance(config, LoraConfig):
        return {"error": "type", "message": type(config).__name__}
    fields = {name: getattr(config, name) for name in config.__dataclass_fields__}
    ranks, alphas = config.rank_pattern or {}, config.alpha_pattern or {}
    scales = {m: [ranks.get(get_pattern_key(list(ranks), m), config.r), alphas.get(get_pattern_key(list(alphas), m), config.lora_alpha)] for m in request["modules"]}
    return json.loads(json.dumps({"config": fields, "scales": scales}, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))


# Importing peft loads transformers (about 300 MB of RSS measured here), which would count against
# a merge's --max-memory for the whole run, so peft reads the config in a child process, unless
# this process has imported peft already (finetune, tests).
_CHILD = "import json, sys\nfrom perta_stream.sources.adapter import peft_answer\nprint(json.dumps(peft_answer(json.load(sys.stdin))))"


def read_lora_config(raw: bytes, where: str, modules: list[str]) -> tuple[dict, dict[str, tuple[int, float]]]:
    """adapter_config.json through peft's config classes (in a child process, see _CHILD):
    the LoraConfig's fields as a dict, and each module's (r, lora_alpha) after rank_pattern/alpha_pattern.

    Raises:
        CheckpointError: not JSON, or not a config peft can read.
        PlanError: not a LoRA adapter.
        UsageError: peft is not installed.
    """
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{where}: {ADAPTER_CONFIG_NAME} is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise CheckpointError(f"{where}: {ADAPTER_CONFIG_NAME} is not a JSON object")
    peft_type = str(document.get("peft_type", ""))
    if peft_type != "LORA":
        raise PlanError(
            f"cannot use {where}",
            [f"{where} is a {peft_type or 'untyped'} adapter; only LoRA adapters (LoRA, rsLoRA, DoRA) are task vectors perta-stream can read"],
        )
    document.pop("runtime_config", None)
    request = {"document": document, "modules": modules}
    if "peft" in sys.modules:
        answer = peft_answer(request)
    else:
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        completed = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(request), capture_output=True, text=True, timeout=600, env=env)
        try:
            answer = json.loads(completed.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise CheckpointError(f"{where}: peft could not read {ADAPTER_CONFIG_NAME}: {completed.stderr.strip()[-300:]}") from None
    if answer.get("error") == "import":
        raise UsageError("reading a LoRA adapter needs peft: pip install 'perta_stream[adapters]'")
    if answer.get("error") == "config":
        raise CheckpointError(f"{where}: peft cannot read {ADAPTER_CONFIG_NAME} ({answer['message']})")
    if answer.get("error") == "type":
        raise PlanError(f"cannot use {where}", [f"{where} is not a LoRA adapter ({answer['message']})"])
    return answer["config"], {module: (int(r), float(alpha)) for module, (r, alpha) in answer["scales"].items()}


def config_problems(config: dict, where: str) -> list[str]:
    """Every LoRA feature of `config` whose change of the weights is not θ_0 + s·BA (one line each)."""
    found = []
    init = str(config.get("init_lora_weights", True)).lower()
    for prefix in BASE_CHANGING_INITS:
        if init.startswith(prefix):
            found.append(
                f"{where}: init_lora_weights={config['init_lora_weights']!r} changed the base model's weights when the adapter was made, "
                "so θ_0 + s·BA is not the fine-tuned model; convert it to a plain LoRA first (peft: save_pretrained with "
                "path_initial_model_for_weight_conversion), or merge it and pass the merged model"
            )
    for option, why in UNSUPPORTED_OPTIONS.items():
        value = config.get(option)
        if value not in (None, False, [], {}, ""):
            found.append(f"{where}: {option} is set: {why or 'not supported'}; merge the adapter with peft and pass the merged model")
    if config.get("lora_bias"):
        found.append(f"{where}: lora_bias=True trains a bias the merge does not apply yet; merge the adapter with peft and pass the merged model")
    if config.get("bias", "none") != "none":
        found.append(f"{where}: bias={config['bias']!r} trains the base model's biases, which this version does not read; merge the adapter with peft")
    if config.get("use_dora") and config.get("fan_in_fan_out"):
        found.append(f"{where}: DoRA with fan_in_fan_out normalises columns over the whole tensor, which is not supported; merge the adapter with peft")
    return found


def build_adapter(location: str, role: str, raw_config: bytes, header: SafetensorsHeader) -> Adapter:
    """The Adapter of a config and a weights header.

    Raises:
        PlanError: every refused feature and unknown tensor, at once.
    """
    where = f"{role} adapter {location}"
    names = [key.removeprefix(PEFT_PREFIX) for key in header.tensors]
    candidates = sorted({name[: -len(suffix) - 1] for name in names for suffix in _LORA_SUFFIXES if name.endswith("." + suffix)})
    config, scales = read_lora_config(raw_config, where, candidates)
    problems = config_problems(config, where)
    modules: dict[str, dict[str, TensorInfo]] = {}
    kinds: dict[str, str] = {}
    deltas: dict[str, AdapterDelta] = {}
    for key, info in header.tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        for suffix, (kind, part) in _LORA_SUFFIXES.items():
            if name.endswith("." + suffix):
                module = name[: -len(suffix) - 1]
                modules.setdefault(module, {})[part] = info
                if kind is not None:
                    kinds[module] = kind
                break
        else:
            if name.endswith("." + TOKEN_SUFFIX):
                module = name[: -len(TOKEN_SUFFIX) - 1]
                rows = _token_rows(config.get("trainable_token_indices"), module)
                if rows is None or len(rows) != info.shape[0]:
                    problems.append(f"{where}: {key} holds {info.shape[0]} rows, but trainable_token_indices lists {rows} for {module}")
                    continue
                _merge_delta(deltas, AdapterDelta(f"{module}.weight", token_rows=tuple(rows), token_values=info), problems, where)
            elif re.search(r"\.(lora_[A-Za-z_]+|modules_to_save|token_adapter)\b", name):
                problems.append(f"{where}: tensor {key} is not one perta-stream knows how to apply (an unsupported PEFT feature); merge it with peft")
            else:
                # modules_to_save values, and the base layers peft saves with an embedding LoRA: full values.
                _merge_delta(deltas, AdapterDelta(name.replace(BASE_LAYER_INFIX, "."), replacement=info), problems, where)
    for module, parts in modules.items():
        if "A" not in parts or "B" not in parts:
            problems.append(f"{where}: module {module} has {', '.join(sorted(parts))} but not both LoRA factors A and B")
            continue
        kind = kinds[module]
        a, b = parts["A"], parts["B"]
        rank = a.shape[0]
        expected_rank, alpha = scales[module]
        if len(a.shape) != 2 or len(b.shape) != 2 or b.shape[1] != rank or expected_rank != rank:
            problems.append(f"{where}: module {module} has factors {list(a.shape)} and {list(b.shape)}, not of rank {expected_rank} as its config says")
            continue
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        transposed = kind == "embedding" or bool(config.get("fan_in_fan_out"))
        magnitude = parts.get("magnitude")
        if magnitude is not None and kind == "embedding":
            problems.append(
                f"{where}: DoRA on the embedding {module} normalises its columns over the whole vocabulary, which is not supported; "
                "merge the adapter with peft, or train DoRA on the linear layers only"
            )
            continue
        left, right = (a, b) if transposed else (b, a)
        low_rank = LowRankDelta(left=left, right=right, transposed=transposed, scale=float(scale), magnitude=magnitude)
        _merge_delta(deltas, AdapterDelta(f"{module}.weight", low_rank=low_rank), problems, where)
    if problems:
        raise PlanError(f"cannot use {where}", problems)
    digest = hashlib.sha256(raw_config)
    digest.update(header.sha256.encode())
    return Adapter(location, role, config, header, deltas, config.get("base_model_name_or_path"), digest.hexdigest())


def _token_rows(indices, module: str) -> list[int] | None:
    if isinstance(indices, dict):
        for key, rows in indices.items():
            if module == key or module.endswith("." + key):
                return list(rows)
        return None
    return list(indices) if indices is not None else None


def _merge_delta(deltas: dict[str, AdapterDelta], new: AdapterDelta, problems: list[str], where: str) -> None:
    """Combine what several adapter tensors do to one model tensor (an embedding LoRA and its saved base layer)."""
    old = deltas.get(new.tensor_name)
    if old is None:
        deltas[new.tensor_name] = new
        return
    fields = {}
    for field_name in ("low_rank", "replacement", "token_values"):
        mine, theirs = getattr(old, field_name), getattr(new, field_name)
        if mine is not None and theirs is not None:
            problems.append(f"{where}: two {field_name.replace('_', ' ')} entries for tensor {new.tensor_name}")
        fields[field_name] = mine if mine is not None else theirs
    deltas[new.tensor_name] = AdapterDelta(new.tensor_name, token_rows=old.token_rows or new.token_rows, **fields)
