"""An event loop of the engine's own on a background thread, with worker threads for blocking calls.

Background writes, commits and retries run here, so they progress whatever the caller does: an asyncio loop that
never yields, a thread in a long training step, or a trio program. Callers reach the loop through an anyio
blocking portal (threads: `Runtime.call`; any async loop: `Runtime.call_async`, which cancels the
runtime's task when the caller is cancelled). Blocking I/O runs in a thread pool the runtime owns, so closing the
runtime joins every thread it started.

A forked child inherits the object but not its threads: every call from another process raises
`CheckpointError`, and the exit hook does nothing there.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import os
import threading
import weakref
from typing import Any, Awaitable, Callable, TypeVar

import anyio
import sniffio
from anyio.from_thread import BlockingPortal

from ..errors import CheckpointError

T = TypeVar("T")

_live: "weakref.WeakSet[Runtime]" = weakref.WeakSet()
_hook_lock = threading.Lock()
_hook_installed = False


def _at_interpreter_exit() -> None:
    """Run each live runtime's exit callbacks, then close it, while the interpreter is still whole."""
    for runtime in sorted(_live, key=lambda r: r.serial):
        if not runtime.forked:
            runtime.exit_now()


def _install_exit_hook() -> None:
    global _hook_installed
    with _hook_lock:
        if not _hook_installed:
            # threading's hook runs before non-daemon threads are joined and before atexit, while every module and
            # thread still works; concurrent.futures flushes its pools the same way.
            threading._register_atexit(_at_interpreter_exit)  # type: ignore[attr-defined]
            _hook_installed = True


class Runtime:
    """A running event loop on a daemon thread plus ``workers`` threads for blocking calls."""

    _serial = 0

    def __init__(self, workers: int, name: str = "asyncckpt") -> None:
        Runtime._serial += 1
        self.serial = Runtime._serial
        self.pid = os.getpid()
        self.name = name
        self.closed = False
        self._exit_callbacks: list[Callable[[], Any]] = []
        self._later: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        self._workers = workers
        self._executor = self._new_executor()
        self._replaced: list[concurrent.futures.ThreadPoolExecutor] = []  # pools that lost workers to hung calls
        self._lost = 0  # workers of the current pool stuck in calls given up on
        self._pool_lock = threading.Lock()
        self.abandoned: set[concurrent.futures.Future[Any]] = set()  # hung calls given up on, still running
        self._ready = threading.Event()
        self.portal: BlockingPortal | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, name=f"{name}-loop", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self.portal is None:
            raise CheckpointError("the engine's event loop thread could not start")
        _install_exit_hook()
        _live.add(self)

    def _main(self) -> None:
        async def serve() -> None:
            async with anyio.create_task_group() as tasks, BlockingPortal() as portal:
                self.portal, self.loop, self._tasks = portal, asyncio.get_running_loop(), tasks
                self._context = contextvars.copy_context()  # anyio finds its backend through this context
                self._ready.set()
                await portal.sleep_until_stopped()

        try:
            anyio.run(serve, backend="asyncio")
        finally:
            self._ready.set()

    # ------------------------------------------------------------ reaching the loop

    @property
    def forked(self) -> bool:
        """Whether this is a forked child's copy of the runtime (its threads stayed in the parent)."""
        return os.getpid() != self.pid

    def check(self) -> None:
        """Raise the error that explains why this runtime cannot be used from here, if it cannot."""
        if self.forked:
            raise CheckpointError(
                f"this engine was created in process {self.pid}; a forked child cannot use it (its threads stayed "
                "in the parent): create a new engine in the child")
        if self.closed:
            raise CheckpointError("the engine is closed; create a new one")

    @property
    def in_loop(self) -> bool:
        """Whether the calling thread is the runtime's own loop thread."""
        return threading.get_ident() == self._thread.ident

    def call(self, fn: Callable[..., Awaitable[T]] | Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the loop (awaited if it is a coroutine function) and block until it returns.

        If the wait itself is interrupted (Ctrl-C), ``fn`` is cancelled before the interrupt propagates."""
        future = self.spawn(fn, *args)
        try:
            return future.result()
        except BaseException:
            if not future.done():
                future.cancel()
            raise

    def start(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start the background task ``fn(*args)`` on the loop without waiting (closing waits for it to finish);
        ``fn`` must handle its own errors."""
        self.call_soon(self._tasks.start_soon, fn, *args)

    def spawn(self, fn: Callable[..., Any], *args: Any) -> "concurrent.futures.Future[Any]":
        """Start ``fn(*args)`` on the loop without waiting; the future tells its outcome."""
        self.check()
        assert self.portal is not None
        return self.portal.start_task_soon(fn, *args)

    def submit(self, fn: Callable[..., T], *args: Any) -> "concurrent.futures.Future[T]":
        """Run the blocking ``fn(*args)`` in a worker thread, from any thread; the future tells its outcome."""
        self.check()
        try:
            return self._submit(fn, *args)[1]
        except RuntimeError:  # closed since the check: its pools take no more work
            self.check()
            raise

    def _submit(self, fn: Callable[..., T], *args: Any
                ) -> tuple[concurrent.futures.ThreadPoolExecutor, "concurrent.futures.Future[T]"]:
        """``fn(*args)`` submitted to the current pool, and that pool (it may be replaced: see `_abandon`)."""
        with self._pool_lock:
            return self._executor, self._executor.submit(fn, *args)

    def _new_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        return concurrent.futures.ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix=f"{self.name}-io")

    def _abandon(self, future: "concurrent.futures.Future[Any]",
                 pool: concurrent.futures.ThreadPoolExecutor) -> None:
        """Give up on a hung call from ``pool``. Its thread stays stuck in it: once half of the current pool's
        workers are, later calls go to a fresh pool (the old one ends as its calls return), so a hung mount does not
        starve saves to other paths. Past four pools' worth of stuck threads no more are made."""
        self.abandoned.add(future)
        future.add_done_callback(self.abandoned.discard)
        with self._pool_lock:
            if pool is not self._executor or self.closed:
                return
            self._lost += 1
            replace = 2 * self._lost >= self._workers and len(self.abandoned) <= 4 * self._workers
            if replace:
                self._executor, self._lost = self._new_executor(), 0
                self._replaced.append(pool)
        if replace:
            pool.shutdown(wait=False)  # its healthy workers finish what is queued there, then exit
        else:
            future.add_done_callback(lambda _: self._returned(pool))  # outside the lock: it may run at once

    def _returned(self, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        """A call given up on returned: its worker serves ``pool`` again."""
        with self._pool_lock:
            if pool is self._executor:
                self._lost -= 1

    async def call_async(self, fn: Callable[..., Awaitable[T]] | Callable[..., T], *args: Any) -> T:
        """``call`` for code running on any other event loop (asyncio or trio): cancelling the caller cancels
        ``fn`` and waits until it has unwound."""
        self.check()
        assert self.portal is not None
        return await self.portal.call_async(fn, *args)  # type: ignore[arg-type]

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule the plain function ``fn(*args)`` on the loop, from any thread; calls run in order."""
        self.check()
        assert self.loop is not None
        if self.in_loop:
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(self._context.copy().run, fn, *args)

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule the plain function ``fn(*args)`` on the loop about ``delay`` seconds from now, from any thread;
        these calls run in the order they were made (``call_soon`` calls made after them may run first).

        A thread that wakes the loop releases the GIL while it does; the loop thread then usually takes it and
        runs what it was woken for while the waking thread waits. A thread about to return to its caller (a
        snapshot handing its last chunks over) delays the work so that it runs beside the caller instead: the
        loop wakes only to arm a timer.
        """
        self.call_soon(self._schedule_later, delay, fn, args)

    def _schedule_later(self, delay: float, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._later.append((fn, args))
        if len(self._later) == 1:  # one timer runs every call queued until it fires, in order
            assert self.loop is not None
            self.loop.call_later(delay, self._run_later)

    def _run_later(self) -> None:
        """The timer fired: queue every waiting call, in order, as a callback of its own (one that raises is
        reported by the loop and stops neither the others nor the next timer)."""
        assert self.loop is not None
        calls, self._later = self._later, collections.deque()
        for fn, args in calls:
            self.loop.call_soon(self._context.copy().run, fn, *args)

    def build(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the calling thread, with anyio primitives it creates belonging to the runtime's loop
        (asyncio) rather than to the caller's, which may be trio: sniffio's documented per-thread override."""
        saved = sniffio.thread_local.name
        sniffio.thread_local.name = "asyncio"
        try:
            return fn(*args)
        finally:
            sniffio.thread_local.name = saved

    async def run_sync(self, fn: Callable[..., T], *args: Any, patience: float | None = None) -> T:
        """Run the blocking ``fn(*args)`` in a worker thread (from the loop). Cancellation waits for a call that has
        started, since it may still use buffers the caller is about to release, but with a ``patience`` only until
        the call has run that long or the deadline of the operation it belongs to (the enclosing scopes') has
        passed, whichever comes first: a call still running then is hung, and is abandoned (a buffer it may still
        write is the caller's to keep from reuse)."""
        assert self.loop is not None
        done = anyio.Event()
        loop = self.loop
        started: list[float] = []
        bound = anyio.current_effective_deadline()  # io_timeout's, when the call is part of a bounded operation

        def call() -> T:
            started.append(loop.time())
            return fn(*args)

        def finished(_: Any) -> None:
            try:
                loop.call_soon_threadsafe(done.set)
            except RuntimeError:  # a call given up on that returned after the runtime closed: nobody waits
                pass

        pool, future = self._submit(call)
        future.add_done_callback(finished)
        try:
            await done.wait()
        except anyio.get_cancelled_exc_class():
            if not future.cancel():
                deadline = float("inf") if patience is None else min(
                    bound, (started or [loop.time()])[0] + patience)
                with anyio.CancelScope(shield=True, deadline=deadline):
                    await done.wait()
                if not done.is_set():
                    self._abandon(future, pool)
            raise
        return future.result()

    # ------------------------------------------------------------ shutting down

    def at_exit(self, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` at interpreter exit, in this process only, before the runtime closes."""
        self._exit_callbacks.append(callback)

    def exit_now(self) -> None:
        callbacks, self._exit_callbacks = self._exit_callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # one engine's failure at exit must not keep the others from flushing
                pass
        self.close()

    def close(self) -> None:
        """Stop the loop after the tasks on it finish, and join every thread the runtime started."""
        if self.closed or self.forked:
            return
        self.closed = True
        _live.discard(self)
        portal = self.portal
        if portal is not None and not self.in_loop:
            try:
                portal.call(portal.stop)
            except RuntimeError:  # the loop already ended
                pass
            self._thread.join()
        # calls given up on as hung may never return: closing does not wait for them
        for executor in (*self._replaced, self._executor):
            executor.shutdown(wait=not self.abandoned, cancel_futures=bool(self.abandoned))


class IoRunner:
    """Blocking calls in the runtime's worker threads, at most ``limit`` at once: the engine's I/O concurrency.

    Async stores use `limiter` directly to bound their requests in flight. ``timeout`` is the engine's
    ``io_timeout``: a call cut short (by the timeout, or by a cancelled save or load) is waited for until it has run
    that long, then abandoned as hung.
    """

    def __init__(self, runtime: Runtime, limit: int, timeout: float | None = None) -> None:
        self.runtime = runtime
        self.limit = limit
        self.timeout = timeout
        self.limiter = anyio.CapacityLimiter(limit)

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        async with self.limiter:
            return await self.runtime.run_sync(fn, *args, patience=self.timeout)

    async def cpu(self, fn: Callable[..., T], *args: Any) -> T:
        """A CPU-bound call (hashing, copying) off the loop, not counted against the I/O concurrency."""
        return await self.runtime.run_sync(fn, *args)

    def shielded(self) -> anyio.CancelScope:
        """A scope for clean-up that must not be cancelled, yet ends after ``timeout`` on a hung store."""
        if self.timeout is None:
            return anyio.CancelScope(shield=True)
        return anyio.CancelScope(shield=True, deadline=anyio.current_time() + self.timeout)
