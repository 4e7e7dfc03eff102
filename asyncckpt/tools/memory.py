"""Resident-set-size measurement for the current process.

Two sources, the larger wins:

* the kernel's high-water mark ``VmHWM`` from ``/proc/self/status``, reset at the start of an
  operation by writing ``5`` to ``/proc/self/clear_refs`` (exact, Linux >= 4.0);
* a sampling thread reading ``/proc/self/statm`` every few milliseconds (fallback where the reset
  is not permitted; with ``psutil`` when /proc is unavailable).
"""

from __future__ import annotations

import os
import threading
import time

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        import psutil  # type: ignore[import-not-found]

        return int(psutil.Process().memory_info().rss)


def _hwm() -> int | None:
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Context manager: ``peak`` = highest RSS seen inside the block, ``start`` = RSS on entry."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start = 0
        self.peak = 0
        self.method = "sampled"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hwm_ok = False

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = current_rss()
            if rss > self.peak:
                self.peak = rss

    def __enter__(self) -> "PeakRSS":
        self._hwm_ok = _reset_hwm()
        self.start = current_rss()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, current_rss())
        if self._hwm_ok:
            hwm = _hwm()
            if hwm is not None:
                self.method = "VmHWM+sampled"
                self.peak = max(self.peak, hwm)

    @property
    def growth(self) -> int:
        return self.peak - self.start


def settle() -> int:
    """Collect garbage, let background threads finish freeing, return the RSS."""
    import gc

    gc.collect()
    time.sleep(0.05)
    gc.collect()
    return current_rss()
