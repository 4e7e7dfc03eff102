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
    """Blocking checkpoint engine (see `EngineBase` for the options). Use it as a context manager or call
    `close`; an engine never closed is flushed when the interpreter exits.

    It starts its threads when built. It takes no ``process_group``: on many ranks use
    `asyncckpt.dcp.StorageWriter` with ``torch.distributed.checkpoint``, or
    ``CheckpointEngine(process_group=pg)``.

    Example:
        ```python
        with asyncckpt.SyncEngine() as engine:
            handle = engine.save({"model": model.state_dict(), "step": 100}, "ckpts/step-100")
            ...  # training goes on while the checkpoint is written
            result = handle.result()  # blocks until it is durable and committed
            state = engine.load("ckpts/step-100")
        ```

    Raises:
        InvalidArgumentError: an option is out of range or of the wrong type, or a ``process_group`` is given.
        CheckpointError: the engine's threads could not start.
    """

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
        waiting aborts the saves still pending (the previous checkpoints stay) and propagates. Idempotent.

        Raises:
            CheckpointError: the first save failure nobody has seen (raised once; the engine is closed anyway).
        """
        core = self._core
        if core is None:
            return
        core.refuse_own_callback("close the engine")
        core.close()
        if not core.runtime.forked:  # a forked child: nothing here is ours
            core.raise_unobserved()

    # ------------------------------------------------------------ saves

    def _save(self, plan: Callable[[Target], Plan], path: Any, storage_options: Mapping[str, Any] | None,
              job_type: type[Job], deferred: bool, **extra: Any) -> Job:
        core = self.core
        core.raise_unobserved()
        with self._lock, DeferredInterrupt() as interrupts:
            self._after_previous_copy()
            t0 = time.perf_counter()
            target = core.target(path, storage_options)
            core.refuse_own_callback("save", target)
            job = core.begin(job_type, target, plan(target), **extra)
            if not (deferred and core.defer(job, t0)):
                poll = 0.05 if interrupts.active else None
                drive(feed(job, t0, interrupts.check),
                      lambda n: core.wait_for_buffer(job, n, interrupts.check, poll))
        return job

    def save(self, state: Any, path: Any, *, storage_options: Mapping[str, Any] | None = None, base: Any = None,
             metadata: Mapping[str, Any] | None = None, digests: bool = False, trust_versions: bool = False,
             snapshot: str | None = None) -> SaveHandle:
        """Snapshot ``state`` on this thread and write it to ``path`` in the background; returns after the
        snapshot (the caller may then change any tensor). Ctrl-C during the snapshot aborts this save only.

        Args:
            state: what to save: tensors, modules' and optimizers' state dicts, and dicts, lists, tuples and plain
                values nesting them (anything else is pickled). Tensors may be on any device.
            path: the checkpoint directory: a local path or an fsspec URL (``s3://bucket/run/step-100``). An earlier
                checkpoint there is replaced when this one commits, never before.
            storage_options: fsspec options for this URL target (default: the engine's).
            base: an incremental save: a committed checkpoint next to ``path`` (same parent directory) whose bytes
                are referenced, not written again, for every tensor whose bytes it already holds under the same key.
            metadata: a JSON object (at most 1 MiB) stored in the manifest (``Manifest.metadata``).
            digests: record each tensor's xxh3-64 so later saves can use this one as their ``base`` (implied by
                ``base``).
            trust_versions: skip hashing (and copying) a tensor whose storage and ``_version`` are those this engine
                saw when it last hashed it; writes through ``.data`` are invisible to this, so trust frozen tensors
                only.
            snapshot: ``"eager"`` or ``"deferred"`` for this save (default: the engine's option). A deferred save
                returns after planning; ``handle.wait_snapshotted()`` is the fence for changes outside an
                optimizer step.

        Returns:
            The save's handle: ``handle.result()`` blocks until the checkpoint is committed and returns its
                `SaveResult`, or raises the save's error (a `CheckpointError`
                naming the path, such as `S3Error` or `StorageTimeoutError`).

        Raises:
            InvalidArgumentError: a bad argument: ``path`` not a str or path, ``metadata`` not JSON or over 1 MiB,
                an unknown ``snapshot`` mode, a ``base`` that is not a committed sibling of ``path``.
            CheckpointError: the state cannot be saved (an unpicklable value, a meta tensor, a cycle), the engine
                is closed, or an earlier save failed and nobody has seen its error yet (that error is raised).
            KeyboardInterrupt: Ctrl-C during the snapshot; this save is aborted, the engine stays usable.
        """
        info = self._metadata(metadata)

        def plan(target: Target) -> Plan:
            found = None if base is None else self.core.runtime.call(self.core.open_base, target, base)
            return self._plan(state, target, found, digests, trust_versions)

        return self._save(plan, path, storage_options, SaveJob, self._deferred(snapshot), fsync=self.options.fsync,
                          metadata=info).handle

    def prepare(self, state: Any, path: Any = None, *, storage_options: Mapping[str, Any] | None = None) -> None:
        """Plan ``state`` and allocate its staging buffers ahead of the first save (at set-up), so that save costs
        what a steady one does; a state of the same structure saved later reuses both.

        Args:
            state: the state later saves will take (only its structure, dtypes and sizes matter here).
            path: a checkpoint path on the store saves will go to; the layout depends on the store, so pass it
                when that is not local disk. None: local disk.
            storage_options: fsspec options for ``path`` (default: the engine's).

        Raises:
            InvalidArgumentError: ``path`` is not a usable path.
            CheckpointError: the engine is closed, or the state cannot be saved (see `save`).
        """
        with self._lock:
            self._after_previous_copy()
            self._warm(state, None if path is None else self.core.target(path, storage_options))

    def _after_previous_copy(self) -> None:
        """Wait until the last deferred copy has ended: it reads the cached plan, which the next plan may repoint."""
        previous = self.core.last_deferred
        if previous is not None:
            previous.wait_snapshotted()

    def submit(self, plan: Plan, path: Any, job_type: type[Job], *, storage_options: Mapping[str, Any] | None = None,
               **extra: Any) -> Job:
        """Copy a prepared ``plan`` into staging on this thread, chunk by chunk under the budget, and write it in the
        background. The building block of `save`, for integrations that lay out their own shards
        (``asyncckpt.dcp`` writes one rank's shards with a ``ShardJob``).

        Args:
            plan: what to copy and where each chunk goes (``asyncckpt.snapshot.plan.Plan``).
            path: the checkpoint path the job writes; jobs on one path run in order.
            job_type: the job class that writes and commits the copied chunks.
            storage_options: fsspec options for this URL target (default: the engine's).
            **extra: keyword arguments for ``job_type``.

        Returns:
            The job, after the copy; ``job.handle`` waits for its writes.

        Raises:
            InvalidArgumentError: ``path`` is not a usable path.
            CheckpointError: the engine is closed, or an earlier save failed and nobody has seen its error yet.
            KeyboardInterrupt: Ctrl-C during the copy; this job is aborted, the engine stays usable.
        """
        return self._save(lambda target: plan, path, storage_options, job_type, False, **extra)

    def save_with(self, state: Any, fn: Callable[[Any], Any], path: Any) -> SaveHandle:
        """Snapshot ``state`` on this thread, then call ``fn(copy)`` in a worker thread, ordered as a save of ``path``.

        ``copy`` has the state's structure with tensors on the host (views of staging memory). This is how a foreign
        serializer, such as a Lightning ``CheckpointIO``, runs in the pipeline. If ``fn`` keeps tensors of ``copy``
        after it returns, their buffers become its own and are not reused, so it keeps the values it was handed.

        Args:
            state: what to copy, as for `save`.
            fn: called once with the copy, in a worker thread; it writes ``path`` itself (its return value is
                ignored; what it raises, ``SystemExit`` included, fails the save). From inside it, closing the
                engine, `wait`, and a load, save, removal or wait of ``path`` raise `CheckpointError`: each would
                wait for this save, which waits for ``fn``.
            path: the path ``fn`` writes: saves and waits on the same path run in order.

        Returns:
            The save's handle; it settles when ``fn`` has returned (its `SaveResult` has
                ``shards=0``).

        Raises:
            BudgetExceededError: the copy needs more than ``host_memory_budget`` bytes at once (it cannot stream:
                ``fn`` gets the whole state).
            InvalidArgumentError: ``path`` is not a usable path.
            CheckpointError: the state cannot be copied, the engine is closed, or an earlier save failed and
                nobody has seen its error yet.
            KeyboardInterrupt: Ctrl-C during the copy; this save is aborted, the engine stays usable.
        """
        return self._save(lambda target: self._plan_copy(state), path, None, CallJob, self._deferred(None),
                          fn=fn).handle

    # ------------------------------------------------------------ everything else

    def load(self, path: Any, *, state: Any = None, map_location: Any = None, strict: bool = True,
             weights_only: bool | None = None, verify: bool | None = None,
             storage_options: Mapping[str, Any] | None = None) -> Any:
        """Load the committed checkpoint at ``path`` (after any pending save of it), on this thread.

        Without ``state`` returns the saved structure (tensors on their saved device, or per ``map_location``).
        With ``state`` restores into its tensors / modules / optimizers in place and returns the top-level entries
        it could not apply. Pickled values load with torch's weights-only rules unless ``weights_only=False``.

        Args:
            path: the checkpoint directory or URL.
            state: restore into this structure in place (its tensors, modules, optimizers and dicts of them)
                instead of building new tensors; bytes stream straight into its CPU tensors where they fit.
            map_location: where tensors go, as for ``torch.load``: a device or device name, a dict from saved to
                new device names, or a callable ``(storage, location) -> storage or None``. None: their saved
                devices.
            strict: with ``state``, refuse (raise) when keys are missing on either side; ``False`` restores what
                matches and logs the keys it skipped. A shape or dtype mismatch is refused either way.
            weights_only: unpickle non-tensor values with torch's weights-only rules (None and True). ``False``
                allows any pickle, which can run code: only for checkpoints you trust.
            verify: check every chunk's checksum (None: the engine's ``verify`` option).
            storage_options: fsspec options for this URL target (default: the engine's).

        Returns:
            Without ``state``, the saved structure. With ``state``, for a dict state, the dict of top-level entries
                of the checkpoint it did not apply (such as plain values, or keys the state lacks); otherwise None,
                or the loaded value when it could not be applied at all.

        Raises:
            InvalidArgumentError: an unusable ``map_location`` or ``path``.
            IncompleteCheckpointError: ``path`` holds shards but no manifest (its save never finished).
            CorruptCheckpointError: the checkpoint is damaged (a checksum mismatch, a truncated or missing shard, a
                manifest that contradicts itself).
            NewerFormatError: a newer asyncckpt wrote it; upgrade to load it.
            CheckpointReplacedError: another process kept overwriting ``path`` while it was being read.
            UnsafeCheckpointError: a pickled value needs ``weights_only=False``.
            StorageTimeoutError: a storage operation took longer than ``io_timeout`` seconds.
            CheckpointError: anything else: no checkpoint there, a store error (`S3Error` for
                S3), a ``state`` that does not match (see ``strict``), the engine is closed.
        """
        check_map_location(map_location)
        core = self.core
        target = core.target(path, storage_options)
        core.refuse_own_callback("load", target)
        manifest, span = core.runtime.call(core.read, target, state, verify, weights_only is not False)
        return core.build(manifest, span, target, state, map_location, strict, weights_only)

    def remove(self, path: Any, *, storage_options: Mapping[str, Any] | None = None) -> None:
        """Delete the checkpoint at ``path`` (after any pending save of it): manifest first, so it never
        half-loads. If ``path`` is a symbolic link, only the link goes. Nothing there: nothing happens.

        Args:
            path: the checkpoint directory or URL.
            storage_options: fsspec options for this URL target (default: the engine's).

        Raises:
            InvalidArgumentError: ``path`` is not a usable path.
            CheckpointError: ``path`` is not an asyncckpt checkpoint (a file, a directory holding anything else),
                incremental checkpoints still reference its shards (remove them first), a store error, or the
                engine is closed.
        """
        core = self.core
        target = core.target(path, storage_options)
        core.refuse_own_callback("remove", target)
        core.runtime.call(core.remove, target)

    def wait(self) -> None:
        """Block until every pending save is done; raise the first failure nobody has seen.

        Raises:
            CheckpointError: the first unseen save failure (raised once), or the engine is closed.
        """
        core = self.core
        core.refuse_own_callback("wait for every save")
        core.runtime.call(core.wait_all)
        core.raise_unobserved()

    def wait_for(self, path: Any, *, storage_options: Mapping[str, Any] | None = None) -> None:
        """Block until no save of ``path`` is pending (whatever their outcome): for work that a foreign serializer
        does on the same path, such as deleting it.

        Args:
            path: the checkpoint path, as given to `save` or `save_with`.
            storage_options: fsspec options for ``path`` (default: the engine's).

        Raises:
            InvalidArgumentError: ``path`` is not a usable path.
            CheckpointError: the engine is closed.
        """
        core = self.core
        target = core.target(path, storage_options)
        core.refuse_own_callback("wait for", target)
        core.runtime.call(core.after_pending, target)

    def committed(self, directory: Any, *, storage_options: Mapping[str, Any] | None = None) -> list[str]:
        """Paths of the committed checkpoints directly under ``directory``, oldest snapshot first.

        Entries without a valid manifest (saves that crashed or still run, foreign data) are left out.

        Args:
            directory: the directory or URL prefix holding checkpoints.
            storage_options: fsspec options for this URL target (default: the engine's).

        Returns:
            Their paths (URLs for URL targets), ordered by when each save was called, not when it finished.

        Raises:
            InvalidArgumentError: ``directory`` is not a usable path.
            CheckpointError: the listing failed on an object store (such as `S3Error`), or the
                engine is closed.
            OSError: a filesystem refused the listing (such as permission denied); a missing directory lists as
                empty.
        """
        core = self.core
        return [p for p, _ in core.runtime.call(core.committed, core.target(directory, storage_options))]

    def latest(self, directory: Any, *, storage_options: Mapping[str, Any] | None = None) -> str | None:
        """The newest committed checkpoint directly under ``directory``: the last of `committed`.

        Args:
            directory: the directory or URL prefix holding checkpoints.
            storage_options: fsspec options for this URL target (default: the engine's).

        Returns:
            Its path, or None when there is none.

        Raises:
            InvalidArgumentError: ``directory`` is not a usable path.
            CheckpointError: the listing failed on an object store (such as `S3Error`), or the
                engine is closed.
            OSError: a filesystem refused the listing (such as permission denied); a missing directory lists as
                empty.
        """
        found = self.committed(directory, storage_options=storage_options)
        return found[-1] if found else None

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the engine's event loop thread and block until it returns: how code with the
        engine's internals (``engine.core``) runs work that must happen on that loop.

        Args:
            fn: a coroutine function (awaited there) or a plain function (called there; it must not block).
            *args: positional arguments for ``fn``.

        Returns:
            What ``fn`` returned.

        Raises:
            CheckpointError: the engine is closed (or belongs to the parent of this forked process).
            Exception: whatever ``fn`` raises, as itself.
        """
        return self.core.runtime.call(fn, *args)


__all__ = ["SyncEngine", "SyncHandle"]
