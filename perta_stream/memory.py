"""Measuring and enforcing the process's resident memory.

A merge's budget (`--max-memory`) is what it may add to the RSS the process holds when it starts
(`MemoryBaseline`): torch's import alone is 0.2 GiB for the CPU build and 0.5 GiB for the CUDA
build, and a notebook holds its own tensors, none of which the merge controls. `RssWatchdog`
samples RSS on a background thread so an overrun stops the run with a clear error instead of
swapping the machine; the peak is the kernel's own high-water mark, so short spikes between
samples count.
"""

from __future__ import annotations

import resource
import sys
import threading

import psutil

from perta_stream.errors import MemoryBudgetError


def current_rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """The process's peak RSS as the kernel records it.

    On Linux this is VmHWM of /proc/self/status, the high-water mark of this process's own
    address space. getrusage's ru_maxrss is not used there: it also carries the RSS the process
    had before exec, i.e. a copy of its parent's, which can dwarf a small tool started by a big one.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return peak if sys.platform == "darwin" else peak * 1024


class MemoryBaseline:
    """The RSS a run starts from, and what it added at its peak.

    The added peak is exact when the run set a new high-water mark (VmHWM rose past the one it
    started with): that mark minus the baseline. When the process had peaked higher before the
    run (a notebook that freed a large tensor), the kernel's mark says nothing about the run, and
    the highest RSS the watchdog sampled (or the RSS now, when a short run was never sampled)
    stands in for it.
    """

    def __init__(self) -> None:
        self.baseline_rss_bytes = current_rss_bytes()
        self._high_water_at_start = peak_rss_bytes()

    def record(self, sampled_peak_bytes: int = 0) -> dict[str, int]:
        """A run record's memory fields besides the whole process's peak: where the run started,
        and what it added (the quantity --max-memory bounds)."""
        return {"baseline_rss_bytes": self.baseline_rss_bytes, "added_peak_rss_bytes": self.added_peak_bytes(sampled_peak_bytes)}

    def added_peak_bytes(self, sampled_peak_bytes: int = 0) -> int:
        high_water = peak_rss_bytes()
        peak = high_water if high_water > self._high_water_at_start else max(sampled_peak_bytes, current_rss_bytes())
        return max(0, peak - self.baseline_rss_bytes)


class RssWatchdog:
    """Samples RSS every `interval_s` and records when it exceeds `baseline_bytes + budget_bytes`.

    Use as a context manager; call `check()` at safe points to raise MemoryBudgetError. A budget
    of None switches it off.
    """

    def __init__(self, budget_bytes: int | None, *, baseline_bytes: int = 0, interval_s: float = 0.02):
        self.budget_bytes = budget_bytes
        self.baseline_bytes = baseline_bytes
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.exceeded_bytes: int | None = None
        self.sampled_peak_bytes = 0

    def __enter__(self) -> "RssWatchdog":
        if self.budget_bytes is not None:
            self._thread = threading.Thread(target=self._run, name="perta-rss-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        process = psutil.Process()
        limit = self.baseline_bytes + (self.budget_bytes or 0)
        while not self._stop.wait(self._interval_s):
            rss = process.memory_info().rss
            self.sampled_peak_bytes = max(self.sampled_peak_bytes, rss)
            if rss > limit:
                self.exceeded_bytes = rss
                return

    def check(self) -> None:
        if self.exceeded_bytes is not None:
            raise MemoryBudgetError(
                f"resident memory reached {format_bytes(self.exceeded_bytes)}: "
                f"{format_bytes(self.exceeded_bytes - self.baseline_bytes)} above the {format_bytes(self.baseline_bytes)} "
                f"the process held at the start, over the --max-memory budget of {format_bytes(self.budget_bytes or 0)}; "
                "raise --max-memory or lower --chunk-size"
            )


def training_memory_bytes(device: str) -> tuple[int, str]:
    """(bytes, what they are) a training run on `device` (resolved: `cpu` or `cuda`) can hold:
    the current GPU's total memory, or the RAM available now (other processes hold the rest)."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory, "the GPU's memory"
    return psutil.virtual_memory().available, "this machine's available RAM"


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def release_free_heap() -> None:
    """Return freed heap memory to the OS (glibc's malloc_trim; a no-op where it does not exist).

    glibc keeps freed medium-sized blocks (below its adaptive mmap threshold, up to 32 MiB) in the
    heap, so a loop that allocates such temporaries layer after layer sees its RSS creep up even
    though nothing leaks; trimming after each layer keeps the peak flat in the layer count.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None
