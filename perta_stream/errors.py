"""One exception hierarchy for everything perta_stream reports to a user.

Every class also inherits the built-in exception a caller would naturally catch
(`ValueError`, `FileNotFoundError`, `OSError`, ...), so library users can catch broadly
(`except PertaStreamError`) or narrowly (`except FileNotFoundError`). Messages say what is
wrong, where (file, tensor), and how to fix it; the CLI prints them as one line.
"""

from __future__ import annotations

from collections.abc import Sequence


class PertaStreamError(Exception):
    """Root of every error perta_stream raises on purpose."""


class UsageError(PertaStreamError, ValueError):
    """Arguments or options that make no sense together (caught before any work starts)."""


class CheckpointError(PertaStreamError, ValueError):
    """A checkpoint directory or Hub repo that cannot be used as given."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint, shard or index that does not exist."""


class InputChangedError(CheckpointError):
    """An input file rewritten while the run read it; the run commits nothing."""


class PickleCheckpointError(CheckpointError):
    """A checkpoint stored only in a pickle format (.bin/.pt), refused unless the user opts in."""


class HeaderError(CheckpointError):
    """A safetensors header that is malformed, inconsistent or does not fit its file."""


class IncompatibleCheckpointsError(CheckpointError):
    """Checkpoints that cannot be merged: missing tensors, shape or tying mismatches."""


class NonFiniteError(PertaStreamError, ValueError):
    """NaN or infinite values in a model or statistics input (refused unless explicitly allowed)."""


class StatisticsError(PertaStreamError, ValueError):
    """A statistics directory that does not match the model or lacks what the method needs."""


class DatasetError(PertaStreamError, ValueError):
    """A data file that is empty, malformed, or has samples that cannot be used."""


class ModelNotSupportedError(PertaStreamError, ValueError):
    """A model architecture the layer-streamed statistics engine does not handle."""


class MemoryBudgetError(PertaStreamError, MemoryError):
    """The plan needs more memory than the budget allows, or the budget was exceeded."""


class OutputExistsError(PertaStreamError, FileExistsError):
    """An output that already exists (pass --overwrite) or that would overwrite an input."""


class WriteError(PertaStreamError, OSError):
    """Writing the output failed (disk full, permissions); the partial output is left resumable."""


class ResumeError(PertaStreamError, ValueError):
    """A partial output that cannot be resumed with the given inputs and options."""


class VerificationError(PertaStreamError, ValueError):
    """A finished output that does not match its run record."""


class HubError(PertaStreamError, OSError):
    """A Hugging Face Hub repo, revision or token problem, or a persistent transfer failure."""


class EvaluationError(PertaStreamError, ValueError):
    """Evaluation inputs that do not fit together (model and tokenizer, split, retain logs)."""


class ModelFetchError(PertaStreamError, OSError):
    """A model recipe that cannot be fetched or converted (package index unreachable, a hash
    mismatch, a missing converter package, a damaged cached copy)."""


class ModelDownloadError(ModelFetchError):
    """The package that carries a model's weights could not be downloaded (no package index)."""


class DistributedError(PertaStreamError, RuntimeError):
    """A multi-process run (torchrun, accelerate launch) whose launcher settings are inconsistent,
    or in which another rank failed."""


class PlanError(PertaStreamError, ValueError):
    """Several problems found while planning, reported all at once.

    Attributes:
        problems: one human-readable line per problem, in the order they were found.
    """

    def __init__(self, summary: str, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__(summary)

    def __str__(self) -> str:
        head = super().__str__()
        if len(self.problems) == 1:
            return f"{head}: {self.problems[0]}"
        listed = "; ".join(f"({i}) {p}" for i, p in enumerate(self.problems, start=1))
        return f"{head}: {len(self.problems)} problems: {listed}"
