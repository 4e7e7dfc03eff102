"""The asyncio face: ``async with CheckpointEngine() as engine`` then ``save`` / ``load`` / ``remove``.

``save`` takes the snapshot on the calling task — copying every byte into staging buffers, waiting (without
blocking the loop) for buffers when the budget is in use — and returns a handle while the writes go on in the
engine's own runtime: they progress even if the caller's loop never yields. Works under asyncio and trio.
"""

from __future__ import annotations

import json
import os
import time
import weakref
from typing import Any, Callable, Mapping

import anyio

from .core import EngineCore
from .errors import CheckpointError, InvalidArgumentError
from .load.rebuild import check_map_location
from .memory.pool import StagingPool
from .options import IO_TIMEOUT, SNAPSHOT_MODES, EngineOptions
from .pipeline.feed import drive_async, feed
from .pipeline.handles import SaveHandle
from .io.contract import Storage
from .pipeline.jobs import CallJob, Job, SaveJob, Target
from .snapshot.incremental import Base
from .snapshot.plan import Plan, prepare, prepare_copy

MiB = 1 << 20


class EngineBase:
    """Options and lifecycle shared by both faces.

    Args:
        write_concurrency: I/O operations in flight at once (threads for blocking I/O, requests for async stores).
        host_memory_budget: bytes of host staging memory; saves beyond it wait (backpressure), and a state larger
            than it streams through. Default: a quarter of RAM, at most 16 GiB.
        shard_bytes: target size of one shard file, in bytes; None: the target's choice (512 MiB on local disk, one
            chunk on object stores, so each shard is a single upload).
        chunk_bytes: unit of staging, writing and checksumming (and of multipart uploads on object stores), in
            bytes; a multiple of 4096.
        fsync: make files and directories durable before a save counts as committed.
        verify: check checksums when loading.
        storage_options: passed to fsspec for URL targets (``s3://…``).
        snapshot: ``"eager"`` (``save`` returns once the state is copied) or ``"deferred"`` (it returns after
            planning; the copy runs while the caller computes, and optimizer steps wait for it).
        overlap_writes: write a save's chunks while its snapshot still copies (durable sooner, blocks longer).
        io_timeout: seconds one storage operation (a chunk write or read, a listing, the commit) may take; past it
            the save or load fails with `StorageTimeoutError`. Default 600; None: no limit.
        process_group: (`CheckpointEngine` only) a ``torch.distributed`` group: every rank of it saves and
            loads its part of one checkpoint through ``torch.distributed.checkpoint`` (see docs/distributed.md).

    Raises:
        InvalidArgumentError: an option is out of range or of the wrong type.
    """

    def __init__(self, *, write_concurrency: int = 8, host_memory_budget: int | None = None,
                 shard_bytes: int | None = None, chunk_bytes: int = 32 * MiB, fsync: bool = True, verify: bool = True,
                 storage_options: Mapping[str, Any] | None = None, snapshot: str = "eager",
                 overlap_writes: bool = False, io_timeout: float | None = IO_TIMEOUT, process_group: Any = None
                 ) -> None:
        self.process_group = process_group
        self.options = EngineOptions(write_concurrency=write_concurrency, host_memory_budget=host_memory_budget,
                                     shard_bytes=shard_bytes, chunk_bytes=chunk_bytes, fsync=fsync, verify=verify,
                                     storage_options=storage_options, snapshot=snapshot,
                                     overlap_writes=overlap_writes, io_timeout=io_timeout)
        self._core: EngineCore | None = None
        self._ready()

    def _ready(self) -> None:
        """Runs once the options are valid: the threaded face starts its engine here, the async one on entry."""

    @property
    def core(self) -> EngineCore:
        """The running engine, for integrations that drive it directly.

        Raises:
            CheckpointError: the engine is not running (a `CheckpointEngine` outside its ``async with``),
                was closed, or belongs to the parent of this forked process.
        """
        if self._core is None:
            raise CheckpointError(self._not_running)
        self._core.check()
        return self._core

    _not_running = "the engine is not running"

    @property
    def staging(self) -> StagingPool:
        """The staging pool: ``allocated_bytes`` and ``in_use_bytes`` (bytes of host memory held, and lent to saves
        now) and ``allocations`` (buffers allocated so far). Readable after close too.

        Raises:
            CheckpointError: the engine was never started (a `CheckpointEngine` before ``async with``).
        """
        if self._core is None:
            raise CheckpointError(self._not_running)
        return self._core.pool

    def _start(self) -> EngineCore:
        core = self._core = EngineCore(self.options)
        weakref.finalize(self, core.dropped, type(self).__name__).atexit = False  # the runtime flushes at exit
        return core

    def _cut(self, storage: Storage | None) -> tuple[int, int, dict[str, Any]]:
        """``(shard_bytes, chunk_bytes, layout keywords)`` of plans for ``storage`` (None: local disk)."""
        chunk = self.options.chunk_bytes
        shard = self.options.shard_bytes
        if storage is None:
            return self.options.file_shard_bytes, chunk, {"chunk_limit": self.core.pool.budget}
        shard = shard or storage.default_shard_bytes(chunk)
        return shard, chunk, {"rules": storage.part_rules, "chunk_limit": self.core.pool.budget}

    def _plan(self, state: Any, target: Target, base: Base | None = None, digests: bool = False,
              trust_versions: bool = False) -> Plan:
        shard, chunk, cut = self._cut(target.storage)
        if not digests and base is None:
            return self.core.plans.prepare(state, shard, chunk, **cut)
        helpers = min(4, (os.cpu_count() or 1) - 1)  # cores beside the caller's that may share the hashing
        return prepare(state, shard, chunk, digests=True, base=base, memo=self.core.memo if trust_versions else None,
                       hashing=(self.core.runtime.submit, helpers), **cut)

    @staticmethod
    def _metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """The caller's manifest metadata, checked: a JSON object of at most 1 MiB."""
        if metadata is None:
            return None
        try:
            text = json.dumps(metadata, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"metadata must be JSON (dicts, lists, strings, finite numbers): {exc}") \
                from None
        if not isinstance(metadata, Mapping) or len(text) > 1 << 20:
            raise InvalidArgumentError("metadata must be a dict whose JSON takes at most 1 MiB")
        return json.loads(text)

    def _plan_copy(self, state: Any) -> Plan:
        plan = prepare_copy(state, self.options.chunk_bytes)
        self.core.check_fits(plan)
        return plan

    def check(self) -> None:
        """Raise the first failure of a finished save that nobody has seen yet, without waiting for pending ones.

        A training loop that never waits on its handles can call this each step to learn of a failed save early.

        Raises:
            CheckpointError: that save's error (a subclass such as `S3Error` or
                `StorageTimeoutError` where it fits), raised once; or the engine is not running.
        """
        self.core.raise_unobserved()

    def _warm(self, state: Any, target: Target | None) -> int:
        """Plan ``state`` for ``target`` (the plan is then reused by the next save of the same structure there) and
        allocate and touch its staging buffers; returns the bytes reserved."""
        core = self.core
        shard, chunk, cut = self._cut(None if target is None else target.storage)
        plan = core.plans.prepare(state, shard, chunk, **cut)
        core.pool.reserve([chunk.nbytes for chunk in plan.chunks])
        return core.pool.allocated_bytes

    def _deferred(self, snapshot: str | None) -> bool:
        mode = self.options.snapshot if snapshot is None else snapshot
        if mode not in SNAPSHOT_MODES:
            raise InvalidArgumentError(f"snapshot must be one of {', '.join(SNAPSHOT_MODES)}, not {mode!r}")
        return mode == "deferred"


class CheckpointEngine(EngineBase):
    """Asynchronous checkpoint engine for asyncio and trio programs (see `EngineBase` for the options).

    Use it as an async context manager: leaving the block waits for pending saves (or aborts them when the task is
    cancelled) and raises the first failure nobody has seen.

    Example:
        ```python
        async with asyncckpt.CheckpointEngine() as engine:
            handle = await engine.save({"model": model.state_dict(), "step": 100}, "ckpts/step-100")
            ...  # training goes on while the checkpoint is written
            result = await handle  # durable and committed: result.bytes_written, result.write_seconds
            state = await engine.load("ckpts/step-100")
        ```
    """

    _not_running = "the engine is not running; use `async with CheckpointEngine() as engine:`"

    #: builds the multi-rank face, ``rank_face(options, process_group)``, for an engine given a process group. It
    #: lives in an upper layer (asyncckpt.dcp, on torch.distributed.checkpoint); the package root sets this, so
    #: the engine never imports it and a single-process program never loads torch.distributed.checkpoint.
    rank_face: Callable[[EngineOptions, Any], Any] | None = None
    _ranks: Any = None

    async def __aenter__(self) -> "CheckpointEngine":
        if self._core is not None:
            raise CheckpointError("this CheckpointEngine is already running")
        if self.process_group is not None:
            if CheckpointEngine.rank_face is None:  # pragma: no cover — set whenever asyncckpt is imported
                raise CheckpointError("multi-rank engines need the asyncckpt package root imported")
            self._ranks = CheckpointEngine.rank_face(self.options, self.process_group)
        self._start()
        self._snapshot_lock = anyio.Lock()
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Finish pending saves (or, when cancelled, abort them) and report the first unobserved failure; an
        exception from the body propagates as itself. In a forked child it does nothing: the engine is the
        parent's."""
        if self._core is not None and self._core.runtime.forked:
            return
        core = self.core
        cancelled = exc_type is not None and issubclass(exc_type, anyio.get_cancelled_exc_class())
        ranks_error: BaseException | None = None
        if self._ranks is not None and not cancelled:  # the saves DCP is still writing: their commit is awaited
            try:
                await self._ranks.wait()
            except Exception as exc:
                ranks_error = exc
        try:
            if cancelled:
                with anyio.CancelScope(shield=True):
                    await core.runtime.call_async(core.shutdown, True)
            else:
                try:
                    await core.runtime.call_async(core.shutdown, False)
                except anyio.get_cancelled_exc_class():
                    with anyio.CancelScope(shield=True):
                        await core.runtime.call_async(core.shutdown, True)
                    raise
        finally:
            core.close()
        if exc_type is None:
            core.raise_unobserved()
            if ranks_error is not None:
                raise ranks_error

    async def _feed(self, job: Job, t0: float, deferred: bool) -> SaveHandle:
        if not (deferred and self.core.defer(job, t0)):
            await drive_async(feed(job, t0), lambda n: self.core.runtime.call_async(job.acquire, n))
        return job.handle

    async def _after_previous_copy(self) -> None:
        """Wait until the last deferred copy has ended: it reads the cached plan, which the next plan may repoint."""
        previous = self.core.last_deferred
        if previous is not None:
            await previous.snapshotted()

    async def save(self, state: Any, path: Any, *, storage_options: Mapping[str, Any] | None = None,
                   base: Any = None, metadata: Mapping[str, Any] | None = None, digests: bool = False,
                   trust_versions: bool = False, snapshot: str | None = None) -> SaveHandle:
        """Snapshot ``state`` now and write it to ``path`` in the background.

        Returns once every byte is copied into staging memory: the caller may then change any tensor. Await the
        returned handle for the `SaveResult` (the checkpoint is then durable and committed).

        Args:
            state: what to save: tensors, modules' and optimizers' state dicts, and dicts, lists, tuples and plain
                values nesting them (anything else is pickled). Tensors may be on any device.
            path: the checkpoint directory: a local path or an fsspec URL (``s3://bucket/run/step-100``). An earlier
                checkpoint there is replaced when this one commits, never before.
            storage_options: fsspec options for this save's URL target (default: the engine's).
            base: an incremental save: a committed checkpoint next to ``path`` (same parent directory) whose bytes
                are referenced, not written again, for every tensor whose bytes it already holds under the same key.
            metadata: a JSON object stored in the manifest (``Manifest.metadata``).
            digests: record each tensor's xxh3-64 so later saves can use this one as their ``base`` (implied by
                ``base``).
            trust_versions: skip hashing (and copying) a tensor whose storage and ``_version`` are those this engine
                saw when it last hashed it; writes through ``.data`` are invisible to this, so trust frozen tensors
                only.
            snapshot: ``"eager"`` or ``"deferred"`` for this save (default: the engine's option). A deferred save
                returns after planning; ``await handle.snapshotted()`` is the fence for changes outside an
                optimizer step.

        Returns:
            The save's handle: ``await handle`` gives the `SaveResult` once the checkpoint is committed, or
                raises the save's error (a `CheckpointError` naming the path, such as
                `S3Error` or `StorageTimeoutError`).

        Raises:
            InvalidArgumentError: a bad argument: ``path`` not a str or path, ``metadata`` not JSON or over 1 MiB,
                an unknown ``snapshot`` mode, a ``base`` that is not a committed sibling of ``path``; or, on an
                engine with a ``process_group``, any of ``base``, ``metadata``, ``digests``, ``trust_versions`` or
                a deferred snapshot.
            CheckpointError: the state cannot be saved (an unpicklable value, a meta tensor, a cycle), the engine
                is not running, or an earlier save failed and nobody has seen its error yet (that error is raised).
        """
        core = self.core
        core.raise_unobserved()
        if self._ranks is not None:
            if base is not None or metadata is not None or digests or trust_versions or snapshot == "deferred":
                raise InvalidArgumentError("a multi-rank save (process_group=) takes no base, metadata, digests, "
                                           "trust_versions or deferred snapshot; save with the defaults")
            async with self._snapshot_lock:
                return self._ranks.save(state, path, storage_options, core.runtime)  # type: ignore[no-any-return]
        info = self._metadata(metadata)
        deferred = self._deferred(snapshot)
        async with self._snapshot_lock:
            await self._after_previous_copy()
            t0 = time.perf_counter()
            target = await core.target_async(path, storage_options)
            found = None if base is None else await core.runtime.call_async(core.open_base, target, base)
            plan = self._plan(state, target, found, digests, trust_versions)
            job = core.begin(SaveJob, target, plan, fsync=self.options.fsync, metadata=info)
            return await self._feed(job, t0, deferred)

    async def prepare(self, state: Any, path: Any = None, *, storage_options: Mapping[str, Any] | None = None
                      ) -> None:
        """Plan ``state`` and allocate its staging buffers ahead of the first save (at set-up), so that save costs
        what a steady one does; a state of the same structure saved later reuses both.

        Args:
            state: the state later saves will take (only its structure, dtypes and sizes matter here).
            path: a checkpoint path on the store saves will go to; the layout depends on the store, so pass it
                when that is not local disk. None: local disk.
            storage_options: fsspec options for ``path`` (default: the engine's).

        Raises:
            InvalidArgumentError: ``path`` is not a usable path.
            CheckpointError: the engine is not running, or the state cannot be saved (see `save`).
        """
        async with self._snapshot_lock:
            await self._after_previous_copy()
            target = None if path is None else await self.core.target_async(path, storage_options)
            self._warm(state, target)

    async def save_with(self, state: Any, fn: Callable[[Any], Any], path: Any) -> SaveHandle:
        """Snapshot ``state`` now, then call ``fn(copy)`` in a worker thread, ordered as a save of ``path``.

        ``copy`` has the state's structure with tensors on the host (views of staging memory). This is how a foreign
        serializer, such as a Lightning ``CheckpointIO``, runs in the pipeline. If ``fn`` keeps tensors of ``copy``
        after it returns, their buffers become its own and are not reused, so it keeps the values it was handed.

        Args:
            state: what to copy, as for `save`.
            fn: called once with the copy, in a worker thread; it writes ``path`` itself (its return value is
                ignored; what it raises fails the save).
            path: the path ``fn`` writes: saves and waits on the same path run in order.

        Returns:
            The save's handle; it settles when ``fn`` has returned (its `SaveResult` has ``shards=0``).

        Raises:
            BudgetExceededError: the copy needs more than ``host_memory_budget`` bytes at once (it cannot stream:
                ``fn`` gets the whole state).
            InvalidArgumentError: ``path`` is not a usable path.
            CheckpointError: the state cannot be copied, the engine is not running, or an earlier save failed
                and nobody has seen its error yet.
        """
        core = self.core
        core.raise_unobserved()
        async with self._snapshot_lock:
            await self._after_previous_copy()
            t0 = time.perf_counter()
            plan = self._plan_copy(state)
            target = await core.target_async(path, None)
            return await self._feed(core.begin(CallJob, target, plan, fn=fn), t0, self._deferred(None))

    async def wait_for(self, path: Any, *, storage_options: Mapping[str, Any] | None = None) -> None:
        """Wait until no save of ``path`` is pending (whatever their outcome): for work that a foreign serializer
        does on the same path, such as deleting it.

        Args:
            path: the checkpoint path, as given to `save` or `save_with`.
            storage_options: fsspec options for ``path`` (default: the engine's).

        Raises:
            InvalidArgumentError: ``path`` is not a usable path.
            CheckpointError: the engine is not running.
        """
        core = self.core
        await core.runtime.call_async(core.after_pending, await core.target_async(path, storage_options))

    async def wait(self) -> None:
        """Wait for every pending save; raise the first failure nobody has seen yet.

        Raises:
            CheckpointError: the first unseen save failure (raised once), or the engine is not running.
        """
        core = self.core
        if self._ranks is not None:
            await self._ranks.wait()
        await core.runtime.call_async(core.wait_all)
        core.raise_unobserved()

    async def load(self, path: Any, *, state: Any = None, map_location: Any = None, strict: bool = True,
                   weights_only: bool | None = None, verify: bool | None = None,
                   storage_options: Mapping[str, Any] | None = None) -> Any:
        """Load the committed checkpoint at ``path`` (after any pending save of it).

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
            InvalidArgumentError: an unusable ``map_location`` or ``path``; or, on an engine with a
                ``process_group``, a ``map_location``, or a ``state`` that is not a dict.
            IncompleteCheckpointError: ``path`` holds shards but no manifest (its save never finished).
            CorruptCheckpointError: the checkpoint is damaged (a checksum mismatch, a truncated or missing shard, a
                manifest that contradicts itself).
            NewerFormatError: a newer asyncckpt wrote it; upgrade to load it.
            CheckpointReplacedError: another process kept overwriting ``path`` while it was being read.
            UnsafeCheckpointError: a pickled value needs ``weights_only=False``.
            StorageTimeoutError: a storage operation took longer than ``io_timeout`` seconds.
            CheckpointError: anything else: no checkpoint there, a store error (`S3Error` for
                S3), a ``state`` that does not match (see ``strict``), the engine is not running.
        """
        check_map_location(map_location)
        core = self.core
        if self._ranks is not None:
            if map_location is not None:
                raise InvalidArgumentError("a multi-rank load restores into state= in place; map_location does not "
                                           "apply")
            return await self._ranks.load(path, state, storage_options, verify, weights_only)
        target = await core.target_async(path, storage_options)
        manifest, span = await core.runtime.call_async(core.read, target, state, verify,
                                                        weights_only is not False)
        return core.build(manifest, span, target, state, map_location, strict, weights_only)

    async def remove(self, path: Any, *, storage_options: Mapping[str, Any] | None = None) -> None:
        """Delete the checkpoint at ``path`` (after any pending save of it): manifest first, so it never
        half-loads. If ``path`` is a symbolic link, only the link goes. Nothing there: nothing happens.

        Args:
            path: the checkpoint directory or URL.
            storage_options: fsspec options for this URL target (default: the engine's).

        Raises:
            InvalidArgumentError: ``path`` is not a usable path.
            CheckpointError: ``path`` is not an asyncckpt checkpoint (a file, a directory holding anything else),
                incremental checkpoints still reference its shards (remove them first), a store error, or the
                engine is not running.
        """
        core = self.core
        await core.runtime.call_async(core.remove, await core.target_async(path, storage_options))

    async def committed(self, directory: Any, *, storage_options: Mapping[str, Any] | None = None
                        ) -> list[str]:
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
                engine is not running.
            OSError: a filesystem refused the listing (such as permission denied); a missing directory lists as
                empty.
        """
        core = self.core
        found = await core.runtime.call_async(core.committed, await core.target_async(directory, storage_options))
        return [p for p, _ in found]

    async def latest(self, directory: Any, *, storage_options: Mapping[str, Any] | None = None) -> str | None:
        """The newest committed checkpoint directly under ``directory``: the last of `committed`.

        Args:
            directory: the directory or URL prefix holding checkpoints.
            storage_options: fsspec options for this URL target (default: the engine's).

        Returns:
            Its path, or None when there is none.

        Raises:
            InvalidArgumentError: ``directory`` is not a usable path.
            CheckpointError: the listing failed on an object store (such as `S3Error`), or the
                engine is not running.
            OSError: a filesystem refused the listing (such as permission denied); a missing directory lists as
                empty.
        """
        found = await self.committed(directory, storage_options=storage_options)
        return found[-1] if found else None


__all__ = ["CheckpointEngine", "EngineBase"]
