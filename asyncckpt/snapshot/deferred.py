"""Deferred snapshots: ``save`` returns after planning and the copy runs while the caller computes.

Forward and backward passes read parameters and optimizer state but do not change them; the optimizer step does.
While a deferred copy is running, every optimizer step in the process first waits for it (a global optimizer step
pre-hook, registered only while copies are pending). Updates outside an optimizer (an EMA, manual edits) need the
explicit fence, ``handle.snapshotted()``. The copy proves itself against each tensor's version counter
(``Plan.check_unchanged``): a tensor updated in place before its bytes were copied fails the save, naming the key,
instead of committing a torn checkpoint.
"""

from __future__ import annotations

import threading
from typing import Any

from torch.optim.optimizer import register_optimizer_step_pre_hook

_lock = threading.Lock()
_pending: set[threading.Event] = set()
_hook: Any = None


def _before_optimizer_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    with _lock:
        waiting = list(_pending)
    for done in waiting:
        done.wait()


def copying(done: threading.Event) -> None:
    """A deferred copy has started: optimizer steps wait until ``done`` is set (see `copied`)."""
    global _hook
    with _lock:
        _pending.add(done)
        if _hook is None:
            _hook = register_optimizer_step_pre_hook(_before_optimizer_step)


def copied(done: threading.Event) -> None:
    """The copy behind ``done`` has ended (finished or failed): release the optimizer steps waiting for it."""
    global _hook
    with _lock:
        _pending.discard(done)
        done.set()
        if not _pending and _hook is not None:
            _hook.remove()
            _hook = None
