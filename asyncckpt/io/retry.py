"""The one retry loop every object-store request runs under; each store says which of its failures are transient
and how a final failure reads (`.s3.retry`, `.gcs`, `.azure`)."""

from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, Callable, Iterator

import anyio

from ..errors import CheckpointError
from ..options import RetryPolicy

log = logging.getLogger("asyncckpt.io")


def causes(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and what it was raised from or during, innermost last (at most 8: clients re-raise their
    transport's errors as their own, and a store's answer may sit a few levels down)."""
    for _ in range(8):
        if exc is None:
            return
        yield exc
        exc = exc.__cause__ or exc.__context__


async def retrying(where: str, fn: Callable[[], Awaitable[Any]], policy: RetryPolicy, *,
                   transient: Callable[[BaseException], bool], passes: Callable[[BaseException], bool],
                   fail: Callable[[BaseException, int, float, bool], CheckpointError]) -> Any:
    """``await fn()``, retried per ``policy`` while it fails ``transient``-ly (capped exponential backoff, full
    jitter). Failures that ``passes`` (a missing object: control flow) and asyncckpt's own errors propagate
    unchanged; any other is replaced by ``fail(exc, attempts, seconds, transient)``. ``where`` names the request
    in the log ("put_object on s3://bucket/key")."""
    t0 = time.monotonic()
    for attempt in range(1, policy.attempts + 1):
        try:
            return await fn()
        except Exception as exc:
            if passes(exc) or isinstance(exc, (CheckpointError, ValueError, TypeError)):
                raise
            is_transient = transient(exc)
            if is_transient and attempt < policy.attempts:
                pause = policy.delay(attempt - 1)
                log.warning("retrying %s in %.2fs (attempt %d of %d): %r", where, pause, attempt, policy.attempts,
                            exc)
                await anyio.sleep(pause)
                continue
            raise fail(exc, attempt, time.monotonic() - t0, is_transient) from exc
    raise AssertionError("unreachable")
