"""Write pipeline: staged chunks → concurrent writes → commit, all inside the engine's task group.

A job is created when ``save`` starts; the snapshot loop hands it one filled staging buffer per chunk and each chunk
becomes a task that writes (and checksums) its bytes, then returns the buffer to the pool.  When every shard is
durable the job writes the manifest — the commit — after any earlier save of the same path has finished, so saves
to one path commit in the order they were issued.  Any failure aborts the job: its shard files are deleted, no
manifest is written, and the error is kept on the handle for the caller.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import anyio
import torch
from anyio import to_thread

from . import __version__
from .errors import CheckpointError
from .manifest import FORMAT, MANIFEST_NAME, SHARD_RE, VERSION, seal
from .snapshot import Chunk, Plan
from .staging import StagingPool
from .storage import Sink, Storage


@dataclass(frozen=True)
class SaveResult:
    """What a finished save reports."""

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
    """Awaitable outcome of one save: ``await handle`` returns the :class:`SaveResult` or raises its error."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._done = anyio.Event()
        self._result: Any = None
        self._error: BaseException | None = None
        self.observed = False  # the error reached a caller (through this handle, wait(), save() or close)

    def done(self) -> bool:
        return self._done.is_set()

    async def wait(self) -> Any:
        await self._done.wait()
        if self._error is not None:
            self.observed = True
            raise self._error
        return self._result

    def __await__(self) -> Any:
        return self.wait().__await__()

    def _finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._done.set()


def describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == 28:
        return f"{exc} — free space or save elsewhere; committed checkpoints are untouched"
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, CheckpointError) else str(exc)


class Job:
    """Common part of background work on one path: buffers in, handle out, failure recorded once."""

    def __init__(self, pool: StagingPool, storage: Storage, path: str, display: str, plan: Plan,
                 previous: "Job | None", in_flight: Callable[[], set[str]]) -> None:
        self.pool, self.storage, self.path, self.display, self.plan = pool, storage, path, display, plan
        self.previous = previous
        self.in_flight = in_flight  # save ids of this path's saves still running: their shards are not stale
        self.handle = SaveHandle(display)
        self.error: BaseException | None = None
        self.snapshot_seconds = 0.0
        self._input_done = anyio.Event()
        self._ready = anyio.Event()  # start() finished: chunks may be written
        self._tg: Any = None
        self._t0 = time.perf_counter()

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
            if self._tg is not None:
                self._tg.cancel_scope.cancel()

    def close_input(self, snapshot_seconds: float) -> None:
        self.snapshot_seconds = snapshot_seconds
        self._input_done.set()

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Background body: accept chunks until input closes, then finish; never raises into the engine
        (except the engine's own cancellation, after the job has been aborted and its handle told)."""
        started = False
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started()  # the snapshot starts now; directory set-up overlaps it
                started = True
                try:
                    await self.start()
                except Exception as exc:
                    self.fail(exc)
                self._ready.set()
                await self._input_done.wait()
            await self._conclude()
        except anyio.get_cancelled_exc_class():
            if not self.handle.done():
                self.fail(CheckpointError("the engine was cancelled before the save was committed"))
                with anyio.CancelScope(shield=True):
                    await self._conclude()
            raise
        finally:
            if not started:
                task_status.started()

    async def _conclude(self) -> None:
        if self.error is None:
            try:
                result = await self.finish()
            except Exception as exc:
                self.fail(exc)
            else:
                self.handle._finish(result)
                return
        with anyio.CancelScope(shield=True):
            await self.abort()
        cls = type(self.error) if isinstance(self.error, CheckpointError) else CheckpointError
        error = cls(f"save to {self.display} failed: {describe(self.error)}")
        error.__cause__ = self.error
        self.handle._finish(error=error)

    def submit(self, chunk: Chunk, buf: torch.Tensor) -> None:
        """Take a filled buffer (ownership passes to the job, which returns it to the pool)."""
        if self.error is not None or self._tg is None:
            if not self.owns_buffers_until_finish:
                self.pool.release(buf)
            return
        self._tg.start_soon(self._guarded, chunk, buf)

    async def _guarded(self, chunk: Chunk, buf: torch.Tensor) -> None:
        try:
            await self._ready.wait()
            if chunk.ready is not None:  # CUDA copies of this chunk were queued on the side stream
                await to_thread.run_sync(chunk.ready.synchronize)
            if self.error is None:
                await self.take(chunk, buf)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            self.fail(exc)
        finally:
            if not self.owns_buffers_until_finish:
                self.pool.release(buf)

    owns_buffers_until_finish = False

    async def start(self) -> None: ...
    async def take(self, chunk: Chunk, buf: torch.Tensor) -> None: ...
    async def finish(self) -> Any: ...
    async def abort(self) -> None: ...


class SaveJob(Job):
    """Writes a native checkpoint: shards, then the manifest."""

    def __init__(self, *args: Any, fsync: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fsync = fsync
        self.publishing = False  # the manifest write has started: it may have taken effect even if it raised
        self.save_id = uuid.uuid4().hex[:16]
        self.created_ns = time.time_ns()  # when the snapshot was taken: orders checkpoints by the state they hold
        n = len(self.plan.shard_sizes)
        self.files = [f"shard-{self.save_id}-{i:05d}.safetensors" for i in range(n)]
        self.sinks: dict[int, Sink] = {}
        self._open_locks = [anyio.Lock() for _ in range(n)]
        per_shard = [0] * n
        for c in self.plan.chunks:
            per_shard[c.shard] += 1
        self.remaining = per_shard
        self.digests: list[list[str]] = [[""] * k for k in per_shard]
        self._turns = [[anyio.Event() for _ in range(k)] for k in per_shard]
        for turns in self._turns:
            if turns:
                turns[0].set()

    async def start(self) -> None:
        await self.storage.makedirs(self.path, self.fsync)

    async def _sink(self, shard: int) -> Sink:
        async with self._open_locks[shard]:
            if shard not in self.sinks:
                self.sinks[shard] = await self.storage.open_sink(
                    self.storage.join(self.path, self.files[shard]), self.plan.shard_sizes[shard], self.fsync,
                    self.plan.chunk_bytes)
            return self.sinks[shard]

    async def take(self, chunk: Chunk, buf: torch.Tensor) -> None:
        sink = await self._sink(chunk.shard)
        index = chunk.offset // self.plan.chunk_bytes
        turns = self._turns[chunk.shard]
        if sink.ordered:
            await turns[index].wait()
        self.digests[chunk.shard][index] = await sink.write(chunk.offset, buf, chunk.nbytes)
        if index + 1 < len(turns):
            turns[index + 1].set()
        self.remaining[chunk.shard] -= 1
        if self.remaining[chunk.shard] == 0:
            await sink.commit()

    def manifest(self) -> bytes:
        plan = self.plan
        doc = {
            "format": FORMAT, "version": VERSION, "producer": f"asyncckpt {__version__}",
            "torch": torch.__version__, "save_id": self.save_id, "created_ns": self.created_ns,
            "shards": [{"file": f, "nbytes": n, "chunk_bytes": plan.chunk_bytes, "xxh3_64": d}
                       for f, n, d in zip(self.files, plan.shard_sizes, self.digests)],
            "tensors": plan.tensors, "storages": plan.storages, "objects": plan.objects, "tree": plan.tree,
        }
        return seal(doc)

    async def finish(self) -> SaveResult:
        if self.previous is not None:  # commit after an earlier save of this path, never before
            await self.previous.handle._done.wait()
        data = self.manifest()
        with anyio.CancelScope(shield=True):  # once the commit starts it completes: no manifest without shards
            self.publishing = True
            await self.storage.put_atomic(self.storage.join(self.path, MANIFEST_NAME), data, self.fsync)
            write_seconds = time.perf_counter() - self._t0 - self.snapshot_seconds
            try:
                await self._sweep()
            except Exception:  # best effort: the checkpoint is committed; the next save of this path sweeps again
                pass
        return SaveResult(self.display, sum(self.plan.shard_sizes) + len(data), self.snapshot_seconds,
                          write_seconds, len(self.files), len(self.plan.tensors))

    async def _sweep(self) -> None:
        """Delete shards of earlier saves of this path (now unreferenced) and leftovers of killed saves."""
        mine, running = set(self.files), self.in_flight()
        for name in await self.storage.list(self.path):
            stale_shard = SHARD_RE.match(name) and name not in mine and name.split("-")[1] not in running
            if stale_shard or name.startswith(MANIFEST_NAME + ".tmp-"):
                await self.storage.remove(self.storage.join(self.path, name))

    async def abort(self) -> None:
        if self.publishing:  # the manifest may be out (storage errors can follow a write that took effect): keep
            return  # the shards it names; if it is not out, the next save of this path sweeps them as leftovers
        for sink in self.sinks.values():
            await sink.abort()
        try:  # a first save that failed leaves no empty directory behind
            if self.sinks and not await self.storage.list(self.path):
                await self.storage.remove_dir(self.path)
        except Exception:  # best effort (an unreachable object store raises CheckpointError, not OSError)
            pass


class CallJob(Job):
    """Hands a point-in-time copy of the state to a foreign serializer running in a worker thread."""

    owns_buffers_until_finish = True

    def __init__(self, *args: Any, fn: Callable[[Any], Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fn = fn
        self.buffers: list[torch.Tensor | None] = [None] * len(self.plan.chunks)

    def submit(self, chunk: Chunk, buf: torch.Tensor) -> None:
        self.buffers[chunk.shard] = buf
        super().submit(chunk, buf)

    async def take(self, chunk: Chunk, buf: torch.Tensor) -> None:
        return None

    async def finish(self) -> SaveResult:
        if self.previous is not None:
            await self.previous.handle._done.wait()
        try:
            copy = self.plan.rebuild(self.buffers)  # type: ignore[arg-type]
            await to_thread.run_sync(self.fn, copy)
        finally:
            self._release()
        return SaveResult(self.display, self.plan.total_bytes, self.snapshot_seconds,
                          time.perf_counter() - self._t0 - self.snapshot_seconds, 0, len(self.plan.tensors))

    async def abort(self) -> None:
        self._release()

    def _release(self) -> None:
        for i, buf in enumerate(self.buffers):
            if buf is not None:
                self.pool.release(buf)
                self.buffers[i] = None
