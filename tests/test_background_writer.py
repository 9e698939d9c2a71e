"""The background writer: order, one job at a time, errors surfacing on the caller's thread."""

from __future__ import annotations

import threading
import time

import pytest

from perta_stream.sinks.background_writer import BackgroundWriter


def test_jobs_run_in_order_one_at_a_time_off_the_callers_thread() -> None:
    events: list[tuple[str, int]] = []
    running = threading.Semaphore(1)
    caller = threading.get_ident()

    def job(number: int) -> None:
        assert running.acquire(blocking=False), "two jobs ran at once"
        assert threading.get_ident() != caller
        time.sleep(0.01)
        events.append(("done", number))
        running.release()

    with BackgroundWriter() as writer:
        for number in range(5):
            writer.submit(lambda number=number: job(number))
            assert len(events) >= number  # submit waited for every earlier job
    assert events == [("done", n) for n in range(5)]


def test_a_failed_job_surfaces_at_the_next_submit_or_flush() -> None:
    def fail() -> None:
        raise OSError("disk full")

    with BackgroundWriter() as writer:
        writer.submit(fail)
        with pytest.raises(OSError, match="disk full"):
            writer.submit(lambda: None)
        writer.submit(fail)
        with pytest.raises(OSError, match="disk full"):
            writer.flush()
    with pytest.raises(OSError, match="disk full"), BackgroundWriter() as writer:
        writer.submit(fail)  # raised when the context ends normally


def test_leaving_on_an_error_waits_for_the_running_job_and_keeps_the_callers_error() -> None:
    finished = threading.Event()

    def slow() -> None:
        time.sleep(0.05)
        finished.set()
        raise OSError("secondary")

    with pytest.raises(KeyError, match="primary"), BackgroundWriter() as writer:
        writer.submit(slow)
        raise KeyError("primary")
    assert finished.is_set()
