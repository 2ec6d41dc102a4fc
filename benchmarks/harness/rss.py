"""Process memory: resident set size sampled in a thread, the kernel's high-water marks, and the glibc heap.

Two kinds of peak, because they answer different questions: `PeakRSS` samples RSS while a block
runs (works anywhere psutil does, but can miss a spike shorter than its interval); the kernel's
VmHWM (`reset_peak_rss` then `vm_hwm_bytes`, Linux only) misses nothing. `ru_maxrss_bytes` is the
process-lifetime peak. `release_memory` and `tune_malloc` set the heap up so RSS and timings
reflect live tensors rather than the allocator's bookkeeping.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import sys
import threading
from pathlib import Path

MiB = 2**20


def mib(nbytes: float) -> float:
    return round(nbytes / MiB, 1)


@functools.lru_cache(maxsize=1)
def _process(pid: int):
    import psutil

    return psutil.Process(pid)


def rss_bytes() -> int:
    # one psutil handle per process (keyed by pid, so a fork gets its own): sampling stays cheap
    return _process(os.getpid()).memory_info().rss


class PeakRSS:
    """Samples this process's RSS in a background thread; `.peak` is the highest value seen in the block."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process; Linux only (True if it worked)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def vm_hwm_bytes() -> int | None:
    """The kernel's RSS high-water mark since the last reset_peak_rss() (or process start)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def ru_maxrss_bytes() -> int:
    """Peak RSS over the whole life of this process."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_malloc(mmap_threshold: int = 32 * MiB, trim_threshold: int = 1 << 30) -> bool:
    """Keep freed heap for reuse instead of returning it to the OS (glibc only; True if applied).

    With glibc's defaults every decode step's growing KV-cache buffers (about 0.1-1 MiB) come
    from fresh pages, and the page faults add run-to-run noise that hit whichever model's heap
    happens to be trimmed. This is what jemalloc/tcmalloc, recommended by PyTorch's CPU tuning
    guide, do by design. It applies to every model in the process alike.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):
        return False


def release_memory() -> None:
    """gc, then hand freed heap back to the OS (glibc), so RSS reflects live tensors."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
