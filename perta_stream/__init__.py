"""perta_stream: per-parameter task arithmetic (PerTA) unlearning for large language models.

Streamed gradient statistics, memory-bounded merges and TOFU evaluation.

    import perta_stream as ps
    ps.merge(theta0=..., full=..., fgt=..., out=..., method="fisher", stats=..., alpha=[0.5, 1])

`ps.merge`, `ps.stats`, `ps.unlearn`, `ps.evaluate`, `ps.sweep`, `ps.finetune` and `ps.inspect` take
the flags of their command as keywords (perta_stream/api.py); the `run_*` pipelines and their frozen
`*Config` dataclasses lie underneath; `perta-stream` (or `python -m perta_stream`) is the command line.
"""

from typing import Any

__version__ = "0.2.0"
_API = ("evaluate", "finetune", "inspect", "merge", "stats", "sweep", "unlearn")
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    # Imported on first use, so `import perta_stream` (and `perta-stream --help`) stays fast.
    if name in _API:
        from perta_stream import api

        return getattr(api, name)
    raise AttributeError(f"module 'perta_stream' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The lazily imported API names are attributes too (tab completion, `dir(perta_stream)`).
    return sorted(set(globals()) | set(__all__))
