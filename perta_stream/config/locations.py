"""Checkpoint inputs written as transformers takes them: a bare `org/name[@rev]` means the Hub."""

from __future__ import annotations

from typing import Any


def normalize_inputs(config: Any, *field_names: str) -> list[str]:
    """Rewrite the named checkpoint-input fields of a frozen config with `normalize_location`
    (called from `__post_init__`, before validation); returns the problems to report with the others.

    A bare id whose first component is a local folder (`results/base` while `results/` exists) is
    refused without asking the Hub: the typo of a local path is likelier than a Hub repo of that
    name, and its name is not sent anywhere. `hf://` still reads the Hub.
    """
    from perta_stream.config.options import options_of
    from perta_stream.sources.input_location import mistyped_folder, normalize_location

    problems = []
    flags = options_of(type(config))
    for name in field_names:
        value = getattr(config, name)
        if not value:
            continue
        folder = mistyped_folder(value)
        if folder is not None:
            flag = flags[name].flags[0] if name in flags else name
            problems.append(
                f"{flag} {value} does not exist, but {folder}/ is a local folder: a mistyped path is likelier than the Hub repo "
                f"{value}, so it is not read from the Hub (nothing was sent there); correct the path, or write hf://{value} "
                "to read the Hub repo"
            )
            continue
        object.__setattr__(config, name, normalize_location(value))
    return problems


def with_typos(typos: list[str], problems: list[str]) -> list[str]:
    """`typos` (from `normalize_inputs`) and the other problems, less those about the same flag
    and value (a mistyped folder is not also "not a directory")."""
    named = tuple(typo.split(" does not exist", 1)[0] + " " for typo in typos)
    return typos + [problem for problem in problems if not problem.startswith(named)] if named else problems
