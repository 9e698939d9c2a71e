"""The safetensors dtype names, their element sizes, and the matching torch dtypes.

Planning must know element sizes without importing torch (so `--dry-run` and `--help` stay
fast), hence the plain tables; `torch_dtype()` imports torch only when tensors are touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from perta_stream.errors import UsageError

if TYPE_CHECKING:
    import torch

# Bytes per element of every dtype the safetensors format defines that torch can hold.
DTYPE_BYTES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}

FLOATING_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})

# Dtypes a merge may write; a float8 output would need a scale, which the method does not define.
OUTPUT_DTYPES = ("F32", "F16", "BF16")

_USER_NAMES = {
    "float32": "F32",
    "fp32": "F32",
    "f32": "F32",
    "float16": "F16",
    "fp16": "F16",
    "f16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
}

_TORCH_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def parse_user_dtype(text: str, *, allowed: tuple[str, ...] = OUTPUT_DTYPES) -> str:
    """Turn a user's dtype spelling (`bfloat16`, `bf16`, `BF16`, ...) into a safetensors dtype name.

    Raises:
        UsageError: the spelling is unknown or the dtype is not in `allowed`.
    """
    name = _USER_NAMES.get(text.strip().lower(), text.strip().upper())
    if name not in allowed:
        choices = ", ".join(sorted(k for k, v in _USER_NAMES.items() if v in allowed and "float" in k))
        raise UsageError(f"dtype {text!r} is not supported here; choose one of: {choices}")
    return name


def torch_dtype(safetensors_dtype: str) -> "torch.dtype":
    """The torch dtype that holds elements of a safetensors dtype."""
    import torch

    return getattr(torch, _TORCH_NAMES[safetensors_dtype])


def safetensors_dtype(dtype: "torch.dtype") -> str:
    """The safetensors dtype name of a torch dtype."""
    text = str(dtype).removeprefix("torch.")
    for name, torch_name in _TORCH_NAMES.items():
        if torch_name == text:
            return name
    raise UsageError(f"torch dtype {dtype} has no safetensors equivalent")
