"""The order of checkpoints: a sequence that never goes backwards in a process, whatever the wall clock does.

Checkpoints used to be ordered by their wall-clock ``created_ns`` alone, so an NTP step back made ``latest()``
return an older checkpoint. Each save now takes a sequence number: the wall clock in nanoseconds, unless that is
not past the last number this process gave or saw in a listing (then one more). Manifests written before it
existed order by their ``created_ns``, which is the same scale.
"""

from __future__ import annotations

import threading
import time


class SequenceClock:
    """Hands out increasing sequence numbers; listings raise it past every checkpoint they saw."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def next(self) -> int:
        with self._lock:
            self._last = max(time.time_ns(), self._last + 1)
            return self._last

    def observe(self, sequence: int) -> None:
        """A committed checkpoint was seen: later saves of this process order after it."""
        with self._lock:
            self._last = max(self._last, sequence)


#: the process's clock (one for every engine: saves of any engine into one directory stay ordered)
CLOCK = SequenceClock()
