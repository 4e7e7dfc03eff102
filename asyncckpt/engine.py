"""The asyncio face: ``async with CheckpointEngine() as engine`` then ``save`` / ``load`` / ``remove``.

The engine owns one anyio task group for all background writes, a staging pool bounded by the host-memory budget
and a limiter bounding concurrent I/O.  ``save`` takes the snapshot on the calling task — copying every byte into
staging buffers, waiting for buffers when the budget is in use — and returns a handle while the writes go on.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import anyio
from anyio.lowlevel import checkpoint

from . import snapshot
from .errors import CheckpointError
from .loader import apply_in_place, build_state, read_into_state, read_manifest, read_shards, shard_span
from .manifest import MANIFEST_NAME, SHARD_RE, parse
from .pipeline import CallJob, Job, SaveHandle, SaveJob, describe
from .staging import StagingPool
from .storage import Storage, resolve

MiB = 1 << 20


def default_budget() -> int:
    """A quarter of physical memory, capped at 16 GiB: room for a few in-flight copies of a large state."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    return min(total // 4, 16 << 30)


class CheckpointEngine:
    """Asynchronous checkpoint engine.

    Args:
        write_concurrency: I/O operations in flight at once (threads for blocking I/O, requests for async stores).
        host_memory_budget: bytes of host staging memory; saves beyond it wait (backpressure), and a state larger
            than it streams through. Default: a quarter of RAM, at most 16 GiB.
        shard_bytes: target size of one shard file.
        chunk_bytes: unit of staging, writing and checksumming (and of multipart uploads on object stores).
        fsync: make files and directories durable before a save counts as committed.
        verify: check checksums when loading.
        storage_options: passed to fsspec for URL targets (``s3://…``).
    """

    def __init__(self, *, write_concurrency: int = 8, host_memory_budget: int | None = None,
                 shard_bytes: int = 512 * MiB, chunk_bytes: int = 32 * MiB, fsync: bool = True,
                 verify: bool = True, storage_options: dict[str, Any] | None = None) -> None:
        budget = default_budget() if host_memory_budget is None else int(host_memory_budget)
        if chunk_bytes < 4096 or chunk_bytes % 4096:
            raise ValueError("chunk_bytes must be a positive multiple of 4096")
        if budget < chunk_bytes:
            raise ValueError(f"host_memory_budget ({budget}) must hold at least one chunk ({chunk_bytes} bytes)")
        if write_concurrency < 1 or shard_bytes < 1:
            raise ValueError("write_concurrency and shard_bytes must be positive")
        self.write_concurrency = write_concurrency
        self.budget = budget
        self.shard_bytes = shard_bytes
        self.chunk_bytes = chunk_bytes
        self.fsync = fsync
        self.verify = verify
        self.storage_options = storage_options
        self._tg: Any = None
        self._pending: dict[str, list[Job]] = {}
        self._jobs: list[Job] = []
        self._storages: dict[str, Storage] = {}

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> "CheckpointEngine":
        self._limiter = anyio.CapacityLimiter(self.write_concurrency)
        self.pool = StagingPool(self.budget)
        self._snapshot_lock = anyio.Lock()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool | None:
        """Finish pending saves (or, when cancelled, abort them) and report the first unobserved failure."""
        tg, self._tg = self._tg, None
        cancelled = exc_type is not None and issubclass(exc_type, anyio.get_cancelled_exc_class())
        if cancelled:
            tg.cancel_scope.cancel()
        try:
            if cancelled:
                await tg.__aexit__(exc_type, exc, tb)
            else:  # pending saves finish even when the body raised (the task group would cancel them)
                await tg.__aexit__(None, None, None)
        except BaseExceptionGroup as group:
            if exc is not None and len(group.exceptions) == 1 and group.exceptions[0] is exc:
                return None  # the body's own error propagates unwrapped
            raise
        finally:
            self.pool.clear()
            for storage in self._storages.values():
                await _close(storage)
        if exc_type is None:
            self._raise_unobserved()
        return None

    def _check_open(self) -> None:
        if self._tg is None:
            raise CheckpointError("the engine is not running; use `async with CheckpointEngine() as engine:`")

    def _raise_unobserved(self) -> None:
        for job in self._jobs:
            if job.handle.done() and job.handle._error is not None and not job.handle.observed:
                job.handle.observed = True
                raise job.handle._error
        self._jobs = [j for j in self._jobs if not j.handle.done()]

    # ------------------------------------------------------------ paths

    def _resolve(self, path: Any, storage_options: dict[str, Any] | None) -> tuple[Storage, str, str]:
        """Storage plugin, filesystem path and display name; one plugin per protocol and options, per engine."""
        url = os.fspath(path)
        options = self.storage_options if storage_options is None else storage_options
        local = "://" not in url or url.startswith(("file://", "local://"))
        cache_key = "file" if local else f"{url.split('://', 1)[0]}:{json.dumps(options, sort_keys=True, default=str)}"
        storage = self._storages.get(cache_key)
        if storage is None:
            storage, fs_path = resolve(url, None if local else options, self._limiter)
            self._storages[cache_key] = storage
        else:
            fs_path = storage.strip(url)
        return storage, fs_path, url

    def _register(self, job_type: type[Job], storage: Storage, fs_path: str, display: str, plan: snapshot.Plan,
                  **extra: Any) -> Job:
        key = storage.key(fs_path)
        queue = self._pending.setdefault(key, [])
        job = job_type(self.pool, storage, fs_path, display, plan, queue[-1] if queue else None,
                       in_flight=lambda: {getattr(j, "save_id", "") for j in self._pending.get(key, [])}, **extra)
        queue.append(job)
        self._jobs.append(job)
        return job

    async def _run(self, job: Job, key: str, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await job.run(task_status=task_status)
        finally:
            queue = self._pending.get(key, [])
            if job in queue:
                queue.remove(job)
            if not queue:
                self._pending.pop(key, None)

    async def _after_pending(self, storage: Storage, fs_path: str) -> None:
        for job in list(self._pending.get(storage.key(fs_path), [])):
            await job.handle._done.wait()

    # ------------------------------------------------------------ save

    async def save(self, state: Any, path: Any, *, storage_options: dict[str, Any] | None = None) -> SaveHandle:
        """Snapshot ``state`` now and write it to ``path`` in the background.

        Returns once every byte is copied into staging memory: the caller may then change any tensor.  Await the
        returned handle for the :class:`SaveResult` (the checkpoint is then durable and committed).
        """
        self._check_open()
        self._raise_unobserved()
        async with self._snapshot_lock:
            t0 = time.perf_counter()
            plan = snapshot.prepare(state, self.shard_bytes, self.chunk_bytes)
            job = await self._begin(SaveJob, plan, path, storage_options, fsync=self.fsync)
            await self._feed(job, plan, t0)
        return job.handle

    async def _begin(self, job_type: type[Job], plan: snapshot.Plan, path: Any,
                     storage_options: dict[str, Any] | None, **extra: Any) -> Job:
        """Resolve the target and start the job's background task (which then waits for chunks)."""
        storage, fs_path, display = self._resolve(path, storage_options)
        job = self._register(job_type, storage, fs_path, display, plan, **extra)
        await self._tg.start(self._run, job, storage.key(fs_path))
        return job

    async def _feed(self, job: Job, plan: snapshot.Plan, t0: float) -> None:
        """Copy each chunk into a staging buffer (waiting for budget) and hand it to the job."""
        self.pool.reserve([chunk.nbytes for chunk in plan.chunks])
        try:
            for chunk in plan.chunks:
                if job.error is not None:
                    break
                buf = await self.pool.acquire(chunk.nbytes)
                try:
                    plan.fill(chunk, buf)
                except BaseException:
                    self.pool.release(buf)
                    raise
                job.submit(chunk, buf)
                await checkpoint()  # let the chunk's write start while the next one is copied
            plan.finish()
        except BaseException as exc:
            job.fail(_snapshot_error(exc))
            job.handle.observed = True  # the caller sees this exception right now
            raise
        finally:
            job.close_input(time.perf_counter() - t0)

    async def save_with(self, state: Any, fn: Callable[[Any], Any], path: Any) -> SaveHandle:
        """Snapshot ``state`` now, then call ``fn(copy)`` in a worker thread, ordered as a save of ``path``.

        ``copy`` has the state's structure with tensors on the host (views of staging memory, valid until ``fn``
        returns).  This is how a foreign serializer, such as a Lightning ``CheckpointIO``, runs in the pipeline.
        """
        self._check_open()
        self._raise_unobserved()
        async with self._snapshot_lock:
            t0 = time.perf_counter()
            plan = snapshot.prepare_copy(state, self.chunk_bytes)
            self.check_fits(plan)
            job = await self._begin(CallJob, plan, path, None, fn=fn)
            await self._feed(job, plan, t0)
        return job.handle

    def check_fits(self, plan: snapshot.Plan) -> None:
        if plan.total_bytes > self.budget:
            raise CheckpointError(
                f"the state needs {plan.total_bytes} bytes of staging memory at once to be handed to another "
                f"serializer, more than host_memory_budget ({self.budget}); raise the budget or use the native "
                "format, which streams through any budget")

    async def wait_for(self, path: Any, *, storage_options: dict[str, Any] | None = None) -> None:
        """Wait until no save of ``path`` is pending (whatever their outcome): for work that a foreign serializer
        does on the same path, such as deleting it."""
        self._check_open()
        storage, fs_path, _ = self._resolve(path, storage_options)
        await self._after_pending(storage, fs_path)

    def check(self) -> None:
        """Raise the first failure of a finished save that no caller has seen yet (without waiting)."""
        self._raise_unobserved()

    async def wait(self) -> None:
        """Wait for every pending save; raise the first failure no caller has seen yet."""
        self._check_open()
        for job in list(self._jobs):
            await job.handle._done.wait()
        self._raise_unobserved()

    # ------------------------------------------------------------ load / remove / latest

    async def load(self, path: Any, *, state: Any = None, map_location: Any = None, strict: bool = True,
                   weights_only: bool | None = None, verify: bool | None = None,
                   storage_options: dict[str, Any] | None = None) -> Any:
        """Load the committed checkpoint at ``path`` (after any pending save of it).

        Without ``state`` returns the saved structure (tensors on their saved device, or per ``map_location``).
        With ``state`` restores into its tensors / modules / optimizers in place and returns the top-level entries
        it could not apply.  Pickled values load with torch's weights-only rules unless ``weights_only=False``.
        """
        self._check_open()
        storage, fs_path, display = self._resolve(path, storage_options)
        await self._after_pending(storage, fs_path)
        try:
            doc = await read_manifest(storage, fs_path, display)
            verify = self.verify if verify is None else verify
            if state is not None and all(s["chunk_bytes"] <= self.budget for s in doc["shards"]):
                span = await read_into_state(storage, fs_path, display, doc, verify, self.pool, state)
            else:
                span = shard_span(await read_shards(storage, fs_path, display, doc, verify))
        except OSError as exc:
            raise CheckpointError(f"cannot load {display}: {describe(exc)}") from exc
        loaded = build_state(doc, span, display, map_location, weights_only is not False)
        if state is None:
            return loaded
        return apply_in_place(state, loaded, strict, display)

    async def remove(self, path: Any, *, storage_options: dict[str, Any] | None = None) -> None:
        """Delete the checkpoint at ``path`` (after any pending save of it): manifest first, so it never half-loads."""
        self._check_open()
        storage, fs_path, display = self._resolve(path, storage_options)
        await self._after_pending(storage, fs_path)
        kind = await storage.kind(fs_path)
        if kind is None:
            return
        names = await storage.list(fs_path) if kind == "dir" else []
        ours = [n for n in names if SHARD_RE.match(n) or n.startswith(MANIFEST_NAME + ".tmp-")]
        if MANIFEST_NAME in names and not ours:  # a lone manifest.json: delete it only if it is an asyncckpt one
            try:
                parse(await storage.read_bytes(storage.join(fs_path, MANIFEST_NAME)), display)
            except CheckpointError:
                raise CheckpointError(
                    f"refusing to remove {display}: its {MANIFEST_NAME} is not an asyncckpt manifest") from None
        if kind == "file" or (names and not ours and MANIFEST_NAME not in names):
            raise CheckpointError(f"refusing to remove {display}: it is not an asyncckpt checkpoint")
        if MANIFEST_NAME in names:
            await storage.remove(storage.join(fs_path, MANIFEST_NAME))
            await storage.sync_dir(fs_path)
        for name in ours:  # files that are not ours (a user's notes, subdirectories) stay, and so does the dir
            await storage.remove(storage.join(fs_path, name))
        await storage.remove_dir(fs_path)


async def _close(storage: Storage) -> None:
    """Close network sessions of async filesystems created for this engine's loop."""
    client = getattr(getattr(storage, "fs", None), "_s3", None)
    if client is not None:
        try:
            await client.close()
        except Exception:  # closing is best effort: the session dies with the loop anyway
            pass


def _snapshot_error(exc: BaseException) -> Exception:
    return exc if isinstance(exc, Exception) else CheckpointError("the save was interrupted during its snapshot")
