"""The synchronous face: a :class:`CheckpointEngine` on a background event loop, for threaded callers.

The snapshot still runs on the *caller's* thread — device-to-host copies happen where the training loop runs
(required for CUDA stream order and for XLA collectives) — while buffer waits and writes run on the engine's loop,
reached through an anyio blocking portal.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from typing import Any, Callable

from anyio.from_thread import start_blocking_portal

from . import snapshot
from .engine import CheckpointEngine, _snapshot_error
from .pipeline import CallJob, Job, SaveHandle, SaveJob


class SyncHandle:
    """Thread-side view of a :class:`SaveHandle`."""

    def __init__(self, portal: Any, handle: SaveHandle) -> None:
        self._portal, self.handle = portal, handle

    @property
    def path(self) -> str:
        return self.handle.path

    def done(self) -> bool:
        return self.handle.done()

    def result(self) -> Any:
        """Block until the save is committed; return its SaveResult or raise its error."""
        return self._portal.call(self.handle.wait)


class SyncEngine:
    """Blocking API over :class:`CheckpointEngine`; takes the same options. Use as a context manager or close()."""

    def __init__(self, **options: Any) -> None:
        self._stack = contextlib.ExitStack()
        self._portal = self._stack.enter_context(start_blocking_portal())
        try:
            self.engine: CheckpointEngine = self._stack.enter_context(
                self._portal.wrap_async_context_manager(CheckpointEngine(**options)))
        except BaseException:
            self._stack.close()
            raise
        self._lock = threading.Lock()
        self._closed = False
        # The loop runs on a non-daemon thread: an engine never closed would keep the interpreter from exiting and
        # its pending saves from committing. Flush and close it when the main thread finishes.
        ref = weakref.ref(self)
        threading._register_atexit(lambda: (engine := ref()) is not None and engine.close())  # type: ignore[attr-defined]

    def __enter__(self) -> "SyncEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Finish pending saves, stop the loop, raise the first failure nobody has seen."""
        if not self._closed:
            self._closed = True
            self._stack.close()

    def save(self, state: Any, path: Any, *, storage_options: dict[str, Any] | None = None) -> SyncHandle:
        """Native save: returns after the snapshot (taken on this thread)."""
        engine = self.engine
        return self._drive(lambda: snapshot.prepare(state, engine.shard_bytes, engine.chunk_bytes),
                           SaveJob, path, storage_options, fsync=engine.fsync)

    def save_with(self, state: Any, fn: Callable[[Any], Any], path: Any) -> SyncHandle:
        """Snapshot ``state`` on this thread, then run ``fn(copy)`` in the pipeline, ordered as a save of ``path``."""
        def prepare() -> snapshot.Plan:
            plan = snapshot.prepare_copy(state, self.engine.chunk_bytes)
            self.engine.check_fits(plan)
            return plan

        return self._drive(prepare, CallJob, path, None, fn=fn)

    def _drive(self, prepare: Callable[[], snapshot.Plan], job_type: type[Job], path: Any,
               storage_options: dict[str, Any] | None, **extra: Any) -> SyncHandle:
        call, engine = self._portal.call, self.engine
        with self._lock:
            call(engine._raise_unobserved)
            t0 = time.perf_counter()
            plan = prepare()
            job = call(lambda: engine._begin(job_type, plan, path, storage_options, **extra))
            call(engine.pool.reserve, [chunk.nbytes for chunk in plan.chunks])
            try:
                for chunk in plan.chunks:
                    if job.error is not None:
                        break
                    buf = call(engine.pool.acquire, chunk.nbytes)
                    try:
                        plan.fill(chunk, buf)
                    except BaseException:
                        call(engine.pool.release, buf)
                        raise
                    call(job.submit, chunk, buf)
                plan.finish()
            except BaseException as exc:
                call(job.fail, _snapshot_error(exc))
                job.handle.observed = True  # the caller sees this exception right now
                raise
            finally:
                call(job.close_input, time.perf_counter() - t0)
        return SyncHandle(self._portal, job.handle)

    def load(self, path: Any, **kwargs: Any) -> Any:
        return self._portal.call(lambda: self.engine.load(path, **kwargs))

    def remove(self, path: Any, **kwargs: Any) -> None:
        self._portal.call(lambda: self.engine.remove(path, **kwargs))

    def wait(self) -> None:
        """Block until every pending save is done; raise the first failure nobody has seen."""
        self._portal.call(self.engine.wait)

    def wait_for(self, path: Any, **kwargs: Any) -> None:
        """Block until no save of ``path`` is pending (see :meth:`CheckpointEngine.wait_for`)."""
        self._portal.call(lambda: self.engine.wait_for(path, **kwargs))

    def check(self) -> None:
        """Raise the first failure of a finished save that nobody has seen yet (without waiting)."""
        self._portal.call(self.engine.check)

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a coroutine function (or plain function) on the engine's loop and return its result."""
        return self._portal.call(fn, *args)
