"""What a caller holds for a save: the handle to wait on, and the result it reports."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Generator

import anyio

from ..concurrency import Runtime
from ..errors import CheckpointError

log = logging.getLogger("asyncckpt")


@dataclass(frozen=True)
class SaveResult:
    """What a finished save reports.

    Attributes:
        path: the checkpoint's path or URL, as given to ``save``.
        bytes_written: bytes of shard files and manifest.
        snapshot_seconds: seconds ``save`` blocked its caller (the copy into staging memory).
        write_seconds: seconds from the end of the snapshot to the commit.
        shards: shard files written (0 for a save handed to another serializer).
        tensors: distinct tensors in the checkpoint.
    """

    path: str
    bytes_written: int
    snapshot_seconds: float
    write_seconds: float
    shards: int
    tensors: int

    @property
    def throughput(self) -> float:
        """Bytes per second from the start of the snapshot to the commit."""
        return self.bytes_written / max(self.snapshot_seconds + self.write_seconds, 1e-9)


class SaveHandle:
    """The outcome of one save, for any caller: ``await handle`` on an asyncio or trio loop, ``handle.result()``
    on a thread. Both return the `SaveResult` once the checkpoint is durable and committed, or raise the
    save's error (a `CheckpointError` naming the path, the storage error as its cause).

    Waiting is optional: a failure nobody waited for is raised by the engine's next call instead (see the docs).
    Cancelling a wait does not cancel the save.

    The engines make handles; user code only waits on them.

    Args:
        path: the checkpoint's path or URL, for messages.
        runtime: the engine's runtime, whose loop settles the handle.

    Example:
        ```python
        handle = await engine.save(state, "ckpts/step-100")  # or engine.save(...) on a SyncEngine
        result = await handle  # or handle.result() on a thread
        print(result.bytes_written, result.snapshot_seconds, result.write_seconds)
        ```
    """

    def __init__(self, path: str, runtime: Runtime) -> None:
        self.path = path
        self._runtime = runtime
        self._settled = threading.Event()
        self._settled_on_loop = anyio.Event()
        self._copied = threading.Event()
        self._copied_on_loop = anyio.Event()
        self._result: SaveResult | None = None
        self._error: BaseException | None = None
        self.observed = False  # the error reached a caller (through this handle, wait(), save() or close)
        self._callbacks: list[Callable[["SaveHandle"], Any]] | None = []
        self._callbacks_lock = threading.Lock()

    def done(self) -> bool:
        """Whether the save has finished, committed or failed (never blocks).

        Returns:
            True once it has finished.
        """
        return self._settled.is_set()

    @property
    def error(self) -> BaseException | None:
        """The save's failure once it has finished, or None."""
        return self._error

    def _outcome(self) -> SaveResult:
        if self._error is not None:
            self.observed = True
            raise self._error
        assert self._result is not None
        return self._result

    async def wait(self) -> SaveResult:
        """Wait (from any event loop, asyncio or trio) until the save has finished; ``await handle`` does the same.
        Cancelling the wait does not cancel the save.

        Returns:
            The result, once the checkpoint is durable and committed.

        Raises:
            CheckpointError: the save failed (the error names the path; a subclass such as
                `S3Error`, `StorageTimeoutError` or
                `BudgetExceededError` where it fits; the storage error is its cause).
        """
        if not self.done():
            await self._runtime.call_async(self._settled_on_loop.wait)
        return self._outcome()

    def __await__(self) -> Generator[Any, None, SaveResult]:
        return self.wait().__await__()

    def result(self, timeout: float | None = None) -> SaveResult:
        """Block the calling thread until the save has finished.

        Args:
            timeout: seconds to wait at most; None: as long as it takes. The save goes on after a timeout.

        Returns:
            The result, once the checkpoint is durable and committed.

        Raises:
            TimeoutError: the save is still running after ``timeout`` seconds.
            CheckpointError: the save failed (as for `wait`), or this is the engine's own loop thread, where
                blocking would deadlock (await the handle there).
        """
        if not self.done():
            if self._runtime.in_loop:
                raise CheckpointError("SaveHandle.result() would block the engine's own loop; await the handle")
            if not self._settled.wait(timeout):
                raise TimeoutError(f"the save to {self.path} is still running after {timeout} s")
        return self._outcome()

    async def settled(self) -> None:
        """Wait until the save has finished, whatever its outcome, raising nothing. Only on the engine's own loop
        (for work ordered after this save); other callers use `wait` or `result`."""
        await self._settled_on_loop.wait()

    def add_done_callback(self, fn: Callable[["SaveHandle"], Any]) -> None:
        """Call ``fn(handle)`` once the save has finished, committed or failed (at once if it has): for bookkeeping
        that must follow every outcome, such as telling other processes that a path has landed. It runs on the
        engine's loop thread, so it must be short and never block; what it raises is logged, not propagated, and it
        does not count as observing the save's error.

        Args:
            fn: called with this handle; read ``handle.error`` to tell a failure from a commit.
        """
        with self._callbacks_lock:
            if self._callbacks is not None:
                self._callbacks.append(fn)
                return
        self._call(fn)

    def _call(self, fn: Callable[["SaveHandle"], Any]) -> None:
        try:
            fn(self)
        except Exception:
            log.exception("a done callback of the save to %s failed", self.path)

    def snapshot_done(self) -> bool:
        """Whether the snapshot is over: the state's bytes are copied (or the save failed), so the caller may change
        any tensor. Always true once an eager ``save`` has returned.

        Returns:
            True once the snapshot is over.
        """
        return self._copied.is_set()

    async def snapshotted(self) -> None:
        """Wait (from any event loop) until the snapshot is over: the fence before changing tensors outside an
        optimizer step when the save is deferred (an optimizer step waits for it by itself)."""
        if not self._copied.is_set():
            await self._runtime.call_async(self._copied_on_loop.wait)

    def wait_snapshotted(self, timeout: float | None = None) -> None:
        """Block the calling thread until the snapshot is over: `snapshotted` for threads.

        Args:
            timeout: seconds to wait at most; None: as long as it takes.

        Raises:
            TimeoutError: the snapshot is still copying after ``timeout`` seconds.
        """
        if not self._copied.wait(timeout):
            raise TimeoutError(f"the snapshot of {self.path} is still copying after {timeout} s")

    def mark_copied(self) -> None:
        """The snapshot is over, said by the thread that copied, before the loop hears of it (`mark_snapshotted`):
        code that waited on that thread (an optimizer step after a deferred copy) then sees `snapshot_done`."""
        self._copied.set()

    def mark_snapshotted(self) -> None:
        """The snapshot is over (on the engine's loop)."""
        self._copied.set()
        self._copied_on_loop.set()

    def settle(self, result: SaveResult | None = None, error: BaseException | None = None) -> None:
        """Record the outcome (on the engine's loop, exactly once) and wake every waiter; engines call this.

        Args:
            result: what the committed save reports; None when it failed.
            error: why it failed; None when it committed.
        """
        self._result, self._error = result, error
        self.mark_snapshotted()
        with self._callbacks_lock:
            self._settled.set()
            callbacks, self._callbacks = self._callbacks or [], None
        self._settled_on_loop.set()
        for fn in callbacks:
            self._call(fn)
