"""Ctrl-C during a blocking save: held back while bookkeeping must not be torn, raised where the save aborts cleanly.

Python raises ``KeyboardInterrupt`` between any two bytecodes of the main thread. Inside a save that could land
between taking a staging buffer and recording who owns it, leaking the buffer or leaving a job that never
finishes. While a `DeferredInterrupt` is active on the main thread, SIGINT only sets a flag; the save calls
`DeferredInterrupt.check` at safe points (between chunks, while waiting for memory), which raises it there.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


class DeferredInterrupt:
    """Context manager; a no-op off the main thread or when someone else handles SIGINT."""

    def __init__(self) -> None:
        self.active = False
        self.pending = False
        self._previous: Any = None

    def __enter__(self) -> "DeferredInterrupt":
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._hold)
            self.active = True
        return self

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        self.pending = True

    def check(self) -> None:
        """Raise the held-back ``KeyboardInterrupt``, if one arrived."""
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self._previous)
            self.active = False
        if exc_type is None:
            self.check()
