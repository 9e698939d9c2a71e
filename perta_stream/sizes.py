"""Parsing byte sizes written by people: `5GB`, `512MiB`, `2G`, `1.5e9`."""

from __future__ import annotations

import re

from perta_stream.errors import UsageError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    # A bare letter is binary, as in `free -h`, docker's --memory and PyTorch's memory summaries.
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str | int, *, what: str) -> int:
    """Bytes from `text` (`5GB` = 5·10^9, `5GiB` = `5G` = 5·2^30, plain numbers are bytes).

    Raises:
        UsageError: the text is not a positive size; names the option in `what`.
    """
    if isinstance(text, int):
        value = text
    else:
        match = _PATTERN.match(text)
        if not match or match.group(2).lower() not in _UNITS:
            raise UsageError(f"{what} {text!r} is not a size; write e.g. 5GB, 512MiB, 2G or 1000000")
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise UsageError(f"{what} must be positive, got {text!r}")
    return value
