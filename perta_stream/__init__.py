"""perta_stream: per-parameter task arithmetic (PerTA) unlearning for large language models.

Streamed gradient statistics, memory-bounded merges and TOFU evaluation. The public API is the
`run_*` pipelines and their frozen `*Config` dataclasses; `perta-stream` is the command line.
"""

__version__ = "0.2.0"
