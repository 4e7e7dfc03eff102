"""The one feed loop: copy a plan's chunks into staging buffers on the caller's thread and hand them to the job.

It is a generator so that both faces drive the same code: it yields the size of a buffer it must wait for, and the
driver — blocking (`drive`) or awaiting (`drive_async`) — sends the buffer back (None: the job failed,
stop). Every way out (done, an error in the copy, the caller cancelled or interrupted) closes the job's input, so
the job always concludes and returns every buffer it was given.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import torch

from ..errors import CheckpointError
from ..snapshot.plan import Chunk
from .jobs import Job

Steps = Generator[int, "torch.Tensor | None", None]


def snapshot_error(exc: BaseException) -> Exception:
    """What a job records when its snapshot did not complete."""
    if isinstance(exc, Exception):
        return exc
    return CheckpointError("the save was interrupted during its snapshot; nothing of it was committed")


#: how long the loop waits before starting a job's work handed over by a copying thread (`Runtime.call_later`):
#: longer than the thread takes to get back to copying or to return to its caller, well under a write's time
HAND_OVER_DELAY = 0.0005


def feed(job: Job, t0: float, check: Callable[[], None] = lambda: None, deferred: bool = False) -> Steps:
    """Fill and submit each chunk of ``job``'s plan; ``check()`` runs between chunks (raising aborts the save).
    A ``deferred`` feed runs while the caller computes: after each chunk it proves that no tensor it copied was
    modified since ``save`` (``Plan.check_unchanged``)."""
    runtime, plan = job.runtime, job.plan
    held: list[tuple[Chunk, torch.Tensor, Any]] = []  # filled, not yet handed over (see ``Job.holds_writes``)
    delivered = False  # the job may still wait for its first delivery to start (``Job.launch_on_delivery``)
    error: Exception | None = None
    try:
        job.pool.reserve([chunk.nbytes for chunk in plan.chunks])
        last = plan.chunks[-1] if plan.chunks else None
        for chunk in plan.chunks:
            check()
            if job.error is not None:
                break
            buf = job.try_acquire(chunk.nbytes)
            if buf is None:
                if held or not delivered:  # out of budget: only writes free buffers now
                    runtime.call_soon(job.deliver, held)
                    held, delivered = [], True
                buf = yield chunk.nbytes
                if buf is None:
                    break
            if chunk is last and held and not delivered:
                # start the job while the last chunk copies: the copy releases the GIL, so the loop's start runs
                # beside it rather than before it; the job's storage and writes still wait for the copy
                runtime.call_later(HAND_OVER_DELAY, job.deliver, held)
                held, delivered = [], True
            ready = plan.fill(chunk, buf)  # a buffer not submitted stays the job's: it returns it when it concludes
            if deferred:
                if ready is not None:  # a device copy: prove what was copied, not what was queued
                    ready.synchronize()
                plan.check_unchanged(chunk)
            if job.holds_writes:
                held.append((chunk, buf, ready))
            else:
                runtime.call_soon(job.submit, chunk, buf, ready)
        if job.error is None:
            check()  # a Ctrl-C held back during the last chunk's copy aborts this save, as during any other
            if deferred:  # an update still running when its chunk was checked has ended by now, or is still due
                plan.check_unchanged(*plan.chunks)
        plan.finish()
    except BaseException as exc:
        error = snapshot_error(exc)
        job.handle.observed = True  # the caller sees this exception right now
        raise
    finally:  # one more wake-up of the loop: the job's start (if not yet), the held chunks, the end of the input
        job.handle.mark_copied()
        runtime.call_later(HAND_OVER_DELAY, job.deliver, held, time.perf_counter() - t0, error)


def _advance(steps: Steps, buf: torch.Tensor | None = None, error: BaseException | None = None) -> int | None:
    """Resume the feed with a buffer (or an error to raise in it); the next size it waits for, None when done."""
    try:
        return steps.throw(error) if error is not None else steps.send(buf)
    except StopIteration:
        return None


def drive(steps: Steps, wait: Callable[[int], torch.Tensor | None]) -> None:
    """Run the feed on a thread, blocking in ``wait(nbytes)`` for buffers."""
    need = _advance(steps)
    while need is not None:
        try:
            buf = wait(need)
        except BaseException as exc:
            _advance(steps, error=exc)
            raise
        need = _advance(steps, buf)


async def drive_async(steps: Steps, wait: Callable[[int], Awaitable[torch.Tensor | None]]) -> None:
    """Run the feed on an event loop, awaiting ``wait(nbytes)`` for buffers."""
    need = _advance(steps)
    while need is not None:
        try:
            buf = await wait(need)
        except BaseException as exc:
            _advance(steps, error=exc)
            raise
        need = _advance(steps, buf)
