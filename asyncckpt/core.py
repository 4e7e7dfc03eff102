"""What both faces share: options, the runtime, the staging pool, per-path ordering, and every operation's body.

`CheckpointEngine` (asyncio/trio) and `SyncEngine` (threads) are thin: each
takes the snapshot on its caller's thread through the one feed loop, and reaches the runtime in its own way
(awaiting or blocking). Background work — writes, commits, retries — runs on the runtime whatever the caller does.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import os
import threading
import warnings
from typing import Any, Callable, Mapping

import anyio
import torch

from .concurrency import IoRunner, Runtime
from .errors import BudgetExceededError, CheckpointError, CheckpointReplacedError, InvalidArgumentError
from .format.manifest import (MANIFEST_NAME, MAX_MANIFEST_BYTES, REF_PREFIX, SHARD_RE, AnyManifest, GlobalManifest,
                              Manifest, is_temporary, parse)
from .io.contract import Storage
from .io.paths import is_local, protocol_of, to_url
from .io.registry import resolve
from .io.timed import TimedStorage
from .load import catalog
from .load.assemble import assemble
from .load.apply import apply_in_place
from .load.in_place import read_into_state
from .load.manifest import read_manifest
from .load.reads import Span, read_shards, shard_span
from .load.rebuild import MapLocation, build_state
from .memory.pool import StagingPool
from .options import EngineOptions
from .pipeline.committer import references
from .pipeline.feed import drive, feed, snapshot_error
from .pipeline.handles import SaveHandle
from .pipeline.jobs import Job, Target, describe, running_callback
from .snapshot import deferred
from .snapshot.incremental import Base, VersionMemo
from .snapshot.plan import Plan, PlanCache

log = logging.getLogger("asyncckpt")

#: how many times a load starts over when another process replaced the checkpoint while it was being read
REPLACED_RETRIES = 3


class EngineCore:
    """One engine's shared state. Methods marked *(loop)* run on the runtime; the others on any thread."""

    def __init__(self, options: EngineOptions) -> None:
        self.options = options
        self.runtime = Runtime(workers=options.write_concurrency + 4)
        try:
            self.io: IoRunner = self.runtime.call(IoRunner, self.runtime, options.write_concurrency,
                                                  options.io_timeout)
        except BaseException:
            self.runtime.close()
            raise
        self.pool = StagingPool(options.budget)
        self._lock = threading.Lock()
        self._pending: dict[str, list[Job]] = {}
        self._jobs: list[Job] = []
        self._storages: dict[str, Storage] = {}
        self._closed = False
        self.memo = VersionMemo()  # digests by tensor location and version, for trust_versions
        self.plans = PlanCache()  # the last plan, while the state keeps its structure
        self._copier: concurrent.futures.ThreadPoolExecutor | None = None  # runs deferred snapshots
        self.last_deferred: SaveHandle | None = None
        self._warned_unproven = False  # told once that a state's deferred saves are copied eagerly
        self.runtime.at_exit(self.close)

    # ------------------------------------------------------------ state

    def check(self) -> None:
        """Raise the CheckpointError that says why this engine cannot be used (closed, or from a forked child)."""
        self.runtime.check()
        if self._closed:
            raise CheckpointError("the engine is closed; create a new one")

    def pending_paths(self) -> list[str]:
        with self._lock:
            return [job.display for job in self._jobs if not job.handle.done()]

    # ------------------------------------------------------------ targets

    def _cache_key(self, url: str, storage_options: Mapping[str, Any] | None) -> tuple[str, Mapping[str, Any] | None]:
        if is_local(url):
            return "file", None
        options = self.options.storage_options if storage_options is None else storage_options
        return f"{protocol_of(url)}:{json.dumps(options, sort_keys=True, default=str)}", options

    def cached_target(self, path: Any, storage_options: Mapping[str, Any] | None) -> Target | None:
        """The target of ``path`` if its storage exists already (no loop round trip), else None."""
        url = to_url(path)
        key, _ = self._cache_key(url, storage_options)
        storage = self._storages.get(key)
        if storage is None:
            return None
        fs_path = storage.strip(url)
        return Target(storage, fs_path, url, storage.key(fs_path))

    async def open_target(self, path: Any, storage_options: Mapping[str, Any] | None) -> Target:
        """*(loop)* The target of ``path``, creating its storage (bound to this loop) on first use."""
        url = to_url(path)
        key, options = self._cache_key(url, storage_options)
        storage = self._storages.get(key)
        if storage is None:
            storage, _ = resolve(url, options, self.io)
            if self.options.io_timeout is not None:
                storage = TimedStorage(storage, self.options.io_timeout)
            self._storages[key] = storage
        fs_path = storage.strip(url)
        return Target(storage, fs_path, url, storage.key(fs_path))

    def target(self, path: Any, storage_options: Mapping[str, Any] | None) -> Target:
        """The target of ``path``, from a thread (blocks for the first use of its storage)."""
        return self.cached_target(path, storage_options) or self.runtime.call(self.open_target, path,
                                                                              storage_options)

    async def target_async(self, path: Any, storage_options: Mapping[str, Any] | None) -> Target:
        """The target of ``path``, from any event loop."""
        return self.cached_target(path, storage_options) or await self.runtime.call_async(
            self.open_target, path, storage_options)

    async def open_base(self, target: Target, base: Any) -> Base:
        """*(loop)* The checkpoint an incremental save of ``target`` builds on: a committed sibling of it."""
        found = await self.open_target(base, None)
        storage = target.storage
        if found.storage is not storage or storage.split(found.path)[0] != storage.split(target.path)[0]:
            raise InvalidArgumentError(f"the base of an incremental save must be a checkpoint next to it (the same "
                                       f"parent directory): {found.display} is not next to {target.display}")
        if found.key == target.key:
            raise InvalidArgumentError(f"{target.display} cannot be its own base; save to a new path")
        await self.after_pending(found)  # a save of the base still running replaces its shards when it commits
        manifest = await read_manifest(storage, found.path, found.display)
        if isinstance(manifest, GlobalManifest):
            raise InvalidArgumentError(f"{found.display} was written by many ranks (asyncckpt.dcp): it cannot be the "
                                       "base of an incremental save; save in full")
        if not any(t.digest for t in manifest.tensors):
            log.warning("%s records no tensor digests (it was not saved for incremental use): %s is written whole",
                        found.display, target.display)
        return Base.of(storage.split(found.path)[1], manifest, storage.split(target.path)[1])

    # ------------------------------------------------------------ saves

    def begin(self, job_type: type[Job], target: Target, plan: Plan, **extra: Any) -> Job:
        """Register a save of ``target`` after those already pending for it, and start its background task (a job
        that holds its writes starts at its first delivery instead: `Job.launch_on_delivery`)."""
        with self._lock:
            self.check()  # under the lock ``close`` takes, so no job is registered after close has listed them
            queue = self._pending.setdefault(target.key, [])
            job = self.runtime.build(lambda: job_type(self.runtime, self.pool, target, plan,
                                                      queue[-1] if queue else None,
                                                      lambda: self._in_flight(target.key),
                                                      not self.options.overlap_writes, **extra))
            queue.append(job)
            self._jobs.append(job)
        launch = functools.partial(self.runtime.start, self._run, job)
        if job.holds_writes:
            job.launch_on_delivery(launch)
        else:
            launch()
        return job

    def wait_for_buffer(self, job: Job, nbytes: int, check: Callable[[], None] = lambda: None,
                        poll: float | None = None) -> torch.Tensor | None:
        """A staging buffer for ``job`` from a thread, waiting for budget; ``check()`` runs every ``poll`` seconds
        while it waits (it may raise, to give up). A buffer the wait still gets afterwards goes back to the pool."""
        future = self.runtime.spawn(job.acquire, nbytes)
        try:
            while True:
                try:
                    return future.result(timeout=poll)
                except concurrent.futures.TimeoutError:
                    check()
        except BaseException:
            future.cancel()
            raise

    @staticmethod
    def refuse_own_callback(what: str, target: Target | None = None) -> None:
        """Raise if this thread runs the ``save_with`` serializer of a save of ``target`` (of any save, with None):
        ``what`` would wait for that save, which waits for the serializer — a deadlock. (The message is built only
        then: a save calls this on its snapshot path.)"""
        key = running_callback()
        if key is not None and (target is None or target.key == key):
            what = what if target is None else f"{what} {target.display}"
            raise CheckpointError(f"cannot {what} from inside a save_with serializer: it would wait for the save "
                                  "that is running it; do it after the serializer returns")

    def abandon(self, job: Job, exc: BaseException) -> None:
        """``job``'s snapshot never started (``exc`` stopped it): fail it, so it concludes and frees its path."""
        self.runtime.call_soon(job.deliver, [], 0.0, snapshot_error(exc))
        job.handle.observed = True  # the caller sees ``exc`` itself

    def defer(self, job: Job, t0: float) -> bool:
        """Run ``job``'s snapshot on the engine's copy thread while the caller goes on (see snapshot/deferred.py).
        False, with nothing started, when the copy could not be proven (`Plan.stamp`): the caller copies at once."""
        done = threading.Event()
        try:
            if not job.plan.stamp():
                if not self._warned_unproven:
                    self._warned_unproven = True
                    log.warning("the state holds inference tensors, which keep no version counter: its deferred "
                                "saves are copied before save returns (as eager ones); clone them outside "
                                "torch.inference_mode() to defer")
                return False
            deferred.copying(done)
        except BaseException as exc:
            deferred.copied(done)
            self.abandon(job, exc)
            raise

        def copy() -> None:
            try:
                drive(feed(job, t0, deferred=True), lambda n: self.wait_for_buffer(job, n))
            except BaseException:  # the feed recorded it on the job: the handle reports it
                pass
            finally:
                deferred.copied(done)

        if self._copier is None:
            self._copier = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="asyncckpt-snapshot")
        try:
            self._copier.submit(copy)
        except BaseException as exc:
            deferred.copied(done)
            self.abandon(job, exc)
            raise
        self.last_deferred = job.handle
        return True

    def check_fits(self, plan: Plan) -> None:
        if plan.total_bytes > self.pool.budget:
            raise BudgetExceededError(
                f"the state needs {plan.total_bytes} bytes of staging memory at once to be handed to another "
                f"serializer, more than host_memory_budget ({self.pool.budget}); raise the budget or use the native "
                "format, which streams through any budget", needed=plan.total_bytes, budget=self.pool.budget)

    def _in_flight(self, key: str) -> set[str]:
        with self._lock:
            return {job.save_id for job in self._pending.get(key, [])}

    async def _run(self, job: Job) -> None:
        try:
            await job.run()
        finally:
            with self._lock:
                queue = self._pending.get(job.target.key, [])
                if job in queue:
                    queue.remove(job)
                if not queue:
                    self._pending.pop(job.target.key, None)
            if job.handle.error is not None:
                log.debug("save to %s failed: %s", job.display, job.handle.error)
            elif log.isEnabledFor(logging.INFO):
                r = job.handle.result()
                log.info("saved %s: %d bytes in %d shards, blocked %.3f s, durable after %.3f s", r.path,
                         r.bytes_written, r.shards, r.snapshot_seconds, r.snapshot_seconds + r.write_seconds)

    async def after_pending(self, target: Target) -> None:
        """*(loop)* Wait until no save of ``target`` is pending (whatever their outcome)."""
        with self._lock:
            queue = list(self._pending.get(target.key, []))
        for job in queue:
            await job.handle.settled()

    def raise_unobserved(self) -> None:
        """Raise the first failure of a finished save that no caller has seen yet (once)."""
        error = None
        with self._lock:
            for job in self._jobs:
                handle = job.handle
                if handle.done() and handle.error is not None and not handle.observed:
                    handle.observed = True
                    error = handle.error
                    break
            self._jobs = [j for j in self._jobs if not j.handle.done() or j.handle.error is not None
                          and not j.handle.observed]
        if error is not None:
            raise error

    async def wait_all(self) -> None:
        """*(loop)* Wait for every save pending now."""
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:
            await job.handle.settled()

    # ------------------------------------------------------------ loads and removal

    async def read(self, target: Target, state: Any, verify: bool | None, weights_only: bool = True
                   ) -> tuple[Manifest, Span]:
        """*(loop)* After pending saves of ``target``: its manifest and the records' bytes (streamed into
        ``state``'s own tensors where they fit, once its pickled values pass ``weights_only``)."""
        await self.after_pending(target)
        verify = self.options.verify if verify is None else verify
        storage, path, display = target.storage, target.path, target.display
        try:
            found = await read_manifest(storage, path, display)
        except OSError as exc:
            raise CheckpointError(f"cannot load {display}: {describe(exc)}") from exc
        replaced = 0
        while True:
            try:
                return await self._read_records(storage, path, display, found, state, verify, weights_only)
            except (OSError, CheckpointError) as exc:
                # Another process may have committed a newer save and swept the shards this one was reading: then
                # nothing here is damaged, and reading again gets the newer checkpoint.
                try:
                    now = await read_manifest(storage, path, display)
                except (CheckpointError, OSError):
                    now = found
                if now.save_id == found.save_id:
                    if isinstance(exc, OSError):
                        raise CheckpointError(f"cannot load {display}: {describe(exc)}") from exc
                    raise
                replaced += 1
                if replaced > REPLACED_RETRIES:
                    raise CheckpointReplacedError(
                        f"{display} was replaced by newer saves {replaced} times while it was being read (another "
                        "process keeps overwriting it); load again, or load after its writer is done") from None
                found = now

    async def _read_records(self, storage: Storage, path: str, display: str, found: AnyManifest, state: Any,
                            verify: bool, weights_only: bool) -> tuple[Manifest, Span]:
        if isinstance(found, GlobalManifest):  # written by many ranks: every tensor assembled whole
            manifest, buffers = assemble(found, await read_shards(storage, path, display, found, verify))
            return manifest, shard_span(buffers)
        if state is not None and all(s.chunk_bytes <= self.pool.budget for s in found.shards):
            return found, await read_into_state(storage, path, display, found, verify, self.pool, state,
                                                weights_only)
        return found, shard_span(await read_shards(storage, path, display, found, verify))

    @staticmethod
    def build(manifest: Manifest, span: Span, target: Target, state: Any, map_location: MapLocation, strict: bool,
              weights_only: bool | None) -> Any:
        """The loaded structure, or with ``state`` what could not be restored in place (on the caller's thread)."""
        loaded = build_state(manifest, span, target.display, map_location, weights_only is not False)
        if state is None:
            return loaded
        return apply_in_place(state, loaded, strict, target.display)

    async def remove(self, target: Target) -> None:
        """*(loop)* Delete the checkpoint at ``target`` after its pending saves: manifest first, so it never
        half-loads; files that are not ours (and the directory holding them) stay. A symbolic link is removed
        itself, never what it points to (a dangling one too)."""
        await self.after_pending(target)
        storage, path, display = target.storage, target.path, target.display
        if await storage.remove_link(path):
            await storage.sync_dir(storage.split(path)[0])
            return
        kind = await storage.kind(path)
        if kind is None:  # no object or file; an object store may still hold uploads a killed save left open
            await storage.remove_dir(path)
            return
        names = await storage.list(path) if kind == "dir" else []
        children = await references(storage, path, names)
        if children:
            raise CheckpointError(
                f"refusing to remove {display}: {', '.join(sorted(children))} hold references to its shards "
                "(incremental saves built on it); remove those first (a CheckpointManager does this for you)")
        ours = [n for n in names if SHARD_RE.match(n) or is_temporary(n) or n.startswith(REF_PREFIX)]
        bases: set[str] = set()
        if MANIFEST_NAME in names and not ours:  # a lone manifest.json: delete it only if it is an asyncckpt one
            try:
                parse(await storage.read_bytes(storage.join(path, MANIFEST_NAME), MAX_MANIFEST_BYTES), display)
            except CheckpointError:
                raise CheckpointError(
                    f"refusing to remove {display}: its {MANIFEST_NAME} is not an asyncckpt manifest") from None
        if kind == "file" or (names and not ours and MANIFEST_NAME not in names):
            raise CheckpointError(f"refusing to remove {display}: it is not an asyncckpt checkpoint")
        if MANIFEST_NAME in names:
            try:
                raw = await storage.read_bytes(storage.join(path, MANIFEST_NAME), MAX_MANIFEST_BYTES)
                bases = parse(raw, display).bases
            except CheckpointError:
                bases = set()
            await storage.remove(storage.join(path, MANIFEST_NAME))
            await storage.sync_dir(path)
        for name in ours:
            await storage.remove(storage.join(path, name))
        await storage.remove_dir(path)
        parent, me = storage.split(path)
        for base in bases:  # the checkpoints it built on no longer need to keep shards for it
            await storage.remove(storage.join(parent, base, REF_PREFIX + me))

    async def committed(self, target: Target, known: Mapping[str, AnyManifest] | None = None
                        ) -> list[tuple[str, AnyManifest]]:
        """*(loop)* ``(path, manifest)`` of the committed checkpoints directly under ``target``, oldest first
        (``known``: manifests by name that need no second read)."""
        found = await catalog.committed(target.storage, target.path, known)
        base = target.display
        if is_local(base):
            return [(os.path.join(base, name), manifest) for name, manifest in found]
        return [(f"{base.rstrip('/')}/{name}", manifest) for name, manifest in found]

    # ------------------------------------------------------------ closing

    async def shutdown(self, abort: bool) -> None:
        """*(loop)* Finish (or with ``abort``, abort) every pending save, then release memory and sessions."""
        if abort:
            with self._lock:
                jobs = list(self._jobs)
            for job in jobs:
                job.fail(CheckpointError("the engine was closed before the save was committed"))
        with anyio.CancelScope(shield=abort):
            await self.wait_all()
        self.pool.clear()
        self.plans.clear()
        for storage in self._storages.values():
            with anyio.CancelScope(shield=True):
                await storage.close()
        self._storages.clear()

    def close(self, abort: bool = False) -> None:
        """Finish (or abort) pending saves and stop the runtime, from any thread but the runtime's own. A Ctrl-C
        while waiting aborts what is still pending (nothing torn is committed) and then propagates."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.runtime.forked:
            return  # a forked child: the runtime is the parent's
        if self._copier is not None:  # deferred copies end before the saves they feed can finish
            self._copier.shutdown(wait=True)
        try:
            try:
                self.runtime.call(self.shutdown, abort)
            except BaseException:
                if not abort:
                    self.runtime.call(self.shutdown, True)
                raise
        finally:
            self.runtime.close()

    def dropped(self, face: str) -> None:
        """The face was garbage-collected without being closed: say so, and let pending saves finish. In a forked
        child nothing here is ours (its locks may be held by threads that stayed in the parent)."""
        if self._closed or self.runtime.forked:
            return
        paths = self.pending_paths()
        if paths:
            message = (f"{face} was garbage-collected with {len(paths)} pending save(s) ({', '.join(paths[:5])}); "
                       "they finish in the background — close the engine (or use it as a context manager) to wait "
                       "for them and see their errors")
            warnings.warn(message, ResourceWarning, stacklevel=2)
            log.error(message)
        threading.Thread(target=self.close, name="asyncckpt-close", daemon=False).start()
