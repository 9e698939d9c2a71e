"""Writes on one background thread, so the disk works while the caller computes.

A statistics run produces one group of float32 statistics per layer and dataset (gigabytes for a
large model); writing and hashing it on the computing thread stalls the sweep for as long as the
disk takes. Here the next group is computed while the previous one is written. At most one job
runs at a time, and `submit` first waits for the previous one, so no more than one group waits in
memory besides the one being computed, and a failed write surfaces at the next call.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class BackgroundWriter:
    """One write job at a time on a background thread; errors are re-raised to the caller.

    Use as a context manager: leaving it normally waits for the last job (raising its error);
    leaving it on an exception waits for the running job to end (a shard in progress is then
    complete or cleanly aborted) and lets the first exception through.
    """

    def __init__(self, name: str = "perta-writer"):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: Future[None] | None = None

    def submit(self, job: Callable[[], None]) -> None:
        """Run `job` in the background once the previous job has finished.

        Raises:
            Exception: whatever the previous job raised.
        """
        self.flush()
        self._pending = self._executor.submit(job)

    def flush(self) -> None:
        """Wait for the running job, if any.

        Raises:
            Exception: whatever that job raised.
        """
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        try:
            if exc_type is None:
                self.flush()
            elif self._pending is not None:
                self._pending.exception()  # wait; the caller's exception is the one reported
        finally:
            self._executor.shutdown(wait=True)
