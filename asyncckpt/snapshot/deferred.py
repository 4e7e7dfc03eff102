"""Deferred snapshots: ``save`` returns after planning and the copy runs while the caller computes.

Backward passes read parameters and optimizer state but do not change them; optimizer steps do, and so do forward
passes of normalisation layers that track running statistics in training mode (BatchNorm's running mean and
variance are updated inside its kernel, which never bumps their version counters). While a deferred copy is
running, every optimizer step and every such forward in the process first waits for it (global hooks, registered
only while copies are pending). Other updates (an EMA, manual edits) need the explicit fence,
``handle.snapshotted()``. The copy checks itself against each tensor's version counter (``Plan.check_unchanged``):
a tensor updated in place before its bytes were copied fails the save, naming the key, instead of committing a
torn checkpoint.
"""

from __future__ import annotations

import threading
from typing import Any

from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_pre_hook

_lock = threading.Lock()
_pending: set[threading.Event] = set()
_hooks: list[Any] = []


def _wait() -> None:
    with _lock:
        waiting = list(_pending)
    for done in waiting:
        done.wait()


def _before_optimizer_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    _wait()


def _before_forward(module: Any, args: Any) -> None:
    if module.training and getattr(module, "track_running_stats", False):  # BatchNorm, InstanceNorm, SyncBatchNorm
        _wait()


def copying(done: threading.Event) -> None:
    """A deferred copy has started: optimizer steps and forwards that update running statistics wait until
    ``done`` is set (see `copied`)."""
    with _lock:
        _pending.add(done)
        if not _hooks:
            _hooks.extend((register_optimizer_step_pre_hook(_before_optimizer_step),
                           register_module_forward_pre_hook(_before_forward)))


def copied(done: threading.Event) -> None:
    """The copy behind ``done`` has ended (finished or failed): release the steps and forwards waiting for it."""
    with _lock:
        _pending.discard(done)
        done.set()
        if not _pending:
            for hook in _hooks:
                hook.remove()
            _hooks.clear()
