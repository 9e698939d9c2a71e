"""Notices: one-line facts a user must see before work starts, such as the Hub commit an input is
read at.

The library logs them at INFO on the `perta_stream.notice` logger and configures no logging; the
CLI prints that logger's records on stderr as plain lines, each once, unless `-q` (cli.py). A
Python caller sees them by configuring logging, and the results' summaries name the commits too.
"""

from __future__ import annotations

import logging
import sys

NOTICE_LOGGER_NAME = "perta_stream.notice"


def notice(text: str) -> None:
    """Announce `text` (one line) to whoever shows the run's notices."""
    logging.getLogger(NOTICE_LOGGER_NAME).info(text)


class NoticeLines(logging.Handler):
    """What the CLI attaches for the length of one command: the notices on stderr as plain lines,
    each once (the stages of `unlearn` open one input more than once). The library itself never
    attaches it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self._printed: set[str] = set()
        self._logger = logging.getLogger(NOTICE_LOGGER_NAME)

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        if line not in self._printed:
            self._printed.add(line)
            print(line, file=sys.stderr, flush=True)

    def attach(self) -> None:
        self._logger.addHandler(self)
        self._logger.setLevel(logging.INFO)
        self._logger.propagate = False  # not a second time through -v's root handler

    def detach(self) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(logging.NOTSET)
        self._logger.propagate = True
