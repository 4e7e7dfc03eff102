"""The threaded face: the same engine for code that does not run an event loop (training threads, Lightning).

The snapshot still runs on the *caller's* thread — device-to-host copies happen where the training loop runs
(required for CUDA stream order and for XLA collectives) — while buffer waits and writes run on the engine's
runtime. Ctrl-C during a save aborts that save cleanly and leaves the engine usable.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Mapping, TypeVar


from .concurrency.interrupts import DeferredInterrupt
from .engine import EngineBase
from .errors import InvalidArgumentError
from .load.rebuild import check_map_location
from .pipeline.feed import drive, feed
from .pipeline.handles import SaveHandle
from .pipeline.jobs import CallJob, Job, SaveJob, Target
from .snapshot.plan import Plan

T = TypeVar("T")

#: the thread face's handle is the same object: ``handle.result()`` blocks, ``await handle`` works too.
SyncHandle = SaveHandle


class SyncEngine(EngineBase):
    """Blocking checkpoint engine (see :class:`EngineBase` for the options). Use it as a context manager or call
    :meth:`close`; an engine never closed is flushed when the interpreter exits."""

    def _ready(self) -> None:
        if self.process_group is not None:
            raise InvalidArgumentError(
                "SyncEngine saves one process's state; on many ranks call dcp.save(state, "
                "storage_writer=asyncckpt.dcp.StorageWriter(path)), or use CheckpointEngine(process_group=pg)")
        self._lock = threading.Lock()  # one snapshot at a time
        self._start()

    def __enter__(self) -> "SyncEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Finish pending saves, stop the engine's threads, raise the first failure nobody has seen. Ctrl-C while
        waiting aborts the saves still pending (the previous checkpoints stay) and propagates. Idempotent."""
        core = self._core
        if core is None:
            return
        core.close()
        if not core.runtime.forked:  # a forked child: nothing here is ours
            core.raise_unobserved()

    # ------------------------------------------------------------ saves

    def _save(self, plan: Callable[[Target], Plan], path: Any, storage_options: Mapping[str, Any] | None,
              job_type: type[Job], deferred: bool, **extra: Any) -> Job:
        core = self.core
        core.raise_unobserved()
        with self._lock, DeferredInterrupt() as interrupts:
            previous = core.last_deferred
            if previous is not None:  # its plan may be the one this save reuses
                previous.wait_snapshotted()
            t0 = time.perf_counter()
            target = core.target(path, storage_options)
            job = core.begin(job_type, target, plan(target), **extra)
            if deferred:
                core.defer(job, t0)
            else:
                poll = 0.05 if interrupts.active else None
                drive(feed(job, t0, interrupts.check),
                      lambda n: core.wait_for_buffer(job, n, interrupts.check, poll))
        return job

    def save(self, state: Any, path: Any, *, storage_options: Mapping[str, Any] | None = None, base: Any = None,
             metadata: Mapping[str, Any] | None = None, digests: bool = False, trust_versions: bool = False,
             snapshot: str | None = None) -> SaveHandle:
        """Snapshot ``state`` on this thread and write it to ``path`` in the background; returns after the
        snapshot. ``handle.result()`` waits for the commit. The options are :meth:`CheckpointEngine.save`'s."""
        info = self._metadata(metadata)

        def plan(target: Target) -> Plan:
            found = None if base is None else self.core.runtime.call(self.core.open_base, target, base)
            return self._plan(state, target, found, digests, trust_versions)

        return self._save(plan, path, storage_options, SaveJob, self._deferred(snapshot), fsync=self.options.fsync,
                          metadata=info).handle

    def prepare(self, state: Any, path: Any = None, *, storage_options: Mapping[str, Any] | None = None) -> None:
        """Plan ``state`` and allocate its staging buffers ahead of the first save (see
        :meth:`CheckpointEngine.prepare`)."""
        with self._lock:
            self._warm(state, None if path is None else self.core.target(path, storage_options))

    def submit(self, plan: Plan, path: Any, job_type: type[Job], *, storage_options: Mapping[str, Any] | None = None,
               **extra: Any) -> Job:
        """Copy a prepared ``plan`` into staging on this thread, chunk by chunk under the budget, for a job of
        ``job_type`` on ``path`` (``extra`` goes to the job); returns the job (``job.handle`` waits for it). The
        building block of :meth:`save`, for integrations that lay out their own shards (``asyncckpt.dcp`` writes
        one rank's shards with a ``ShardJob``)."""
        return self._save(lambda target: plan, path, storage_options, job_type, False, **extra)

    def save_with(self, state: Any, fn: Callable[[Any], Any], path: Any) -> SaveHandle:
        """Snapshot ``state`` on this thread, then run ``fn(copy)`` in the pipeline, ordered as a save of ``path``
        (see :meth:`CheckpointEngine.save_with`)."""
        return self._save(lambda target: self._plan_copy(state), path, None, CallJob, self._deferred(None),
                          fn=fn).handle

    # ------------------------------------------------------------ everything else

    def load(self, path: Any, *, state: Any = None, map_location: Any = None, strict: bool = True,
             weights_only: bool | None = None, verify: bool | None = None,
             storage_options: Mapping[str, Any] | None = None) -> Any:
        """Load the committed checkpoint at ``path``; see :meth:`CheckpointEngine.load`."""
        check_map_location(map_location)
        core = self.core
        target = core.target(path, storage_options)
        manifest, span = core.runtime.call(core.read, target, state, verify)
        return core.build(manifest, span, target, state, map_location, strict, weights_only)

    def remove(self, path: Any, *, storage_options: Mapping[str, Any] | None = None) -> None:
        """Delete the checkpoint at ``path`` after its pending saves; see :meth:`CheckpointEngine.remove`."""
        core = self.core
        core.runtime.call(core.remove, core.target(path, storage_options))

    def wait(self) -> None:
        """Block until every pending save is done; raise the first failure nobody has seen."""
        core = self.core
        core.runtime.call(core.wait_all)
        core.raise_unobserved()

    def wait_for(self, path: Any, *, storage_options: Mapping[str, Any] | None = None) -> None:
        """Block until no save of ``path`` is pending (see :meth:`CheckpointEngine.wait_for`)."""
        core = self.core
        core.runtime.call(core.after_pending, core.target(path, storage_options))

    def committed(self, directory: Any, *, storage_options: Mapping[str, Any] | None = None) -> list[str]:
        """Paths of the committed checkpoints directly under ``directory``, oldest snapshot first."""
        core = self.core
        return [p for p, _ in core.runtime.call(core.committed, core.target(directory, storage_options))]

    def latest(self, directory: Any, *, storage_options: Mapping[str, Any] | None = None) -> str | None:
        """The newest committed checkpoint directly under ``directory``, or None."""
        found = self.committed(directory, storage_options=storage_options)
        return found[-1] if found else None

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a coroutine function (or plain function) on the engine's runtime and return its result."""
        return self.core.runtime.call(fn, *args)


__all__ = ["SyncEngine", "SyncHandle"]
