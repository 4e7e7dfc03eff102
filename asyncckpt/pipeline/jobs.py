"""Jobs: the background work of one save on one path, on the engine's loop.

A job is created when ``save`` starts; the feed hands it one filled staging buffer per chunk and each chunk becomes
a task that writes (and checksums) its bytes, then returns the buffer to the pool. When every chunk is in, the job
finishes — for a native save, the committer publishes the manifest after any earlier save of the same path has
finished, so saves of one path commit in the order they were issued. Any failure aborts the job: its files are
deleted, no manifest is written, and the error is kept on the handle for the caller.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import torch

from ..concurrency import Runtime
from ..concurrency.clock import CLOCK
from ..errors import CheckpointError, NewerFormatError, restate
from ..format.manifest import (MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, ShardRecord, looks_sealed, parse,
                               shard_name)
from ..io.contract import Storage
from ..memory.pool import StagingPool
from ..snapshot.plan import Chunk, Plan
from .committer import Committer
from .handles import SaveHandle, SaveResult
from .writer import ShardWriter

log = logging.getLogger("asyncckpt")
_warned_kept: "weakref.WeakSet[StagingPool]" = weakref.WeakSet()  # engines (by pool) told once that fn keeps tensors
_callback = threading.local()  # ``key``: the target key of the save whose serializer this thread is running


def running_callback() -> str | None:
    """The target key of the ``save_with`` save whose serializer runs on this thread, None outside one: waiting
    from there for that save (or for every save, or closing) would wait for itself."""
    return getattr(_callback, "key", None)


@dataclass(frozen=True)
class Target:
    """Where a save goes: the storage, its own path, the path as the user wrote it, and the location's key."""

    storage: Storage
    path: str
    display: str
    key: str


def describe(exc: BaseException) -> str:
    """One line for an error that ends a save or load."""
    if isinstance(exc, OSError) and exc.errno == 28:
        return f"{exc} — free space or save elsewhere; committed checkpoints are untouched"
    return str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"


class Job:
    """Common part of background work on one path: buffers in, handle out, failure recorded once.

    Buffers acquired for the job but not yet handed over (``in_hand``) belong to it: whatever happens to the
    caller's thread (an error, a cancellation, Ctrl-C), the job returns them to the pool when it concludes.
    """

    owns_buffers_until_finish = False
    #: the buffers submitted are the caller's (slices of its own staging), never returned to the pool by the job
    borrows_buffers = False

    def __init__(self, runtime: Runtime, pool: StagingPool, target: Target, plan: Plan, previous: "Job | None",
                 in_flight: Callable[[], set[str]], yield_to_copy: bool = False) -> None:
        self.runtime, self.pool, self.target, self.plan = runtime, pool, target, plan
        self.storage, self.path, self.display = target.storage, target.path, target.display
        self.previous = previous
        self.in_flight = in_flight  # save ids of this path's saves still running (this one included)
        self.handle = SaveHandle(target.display, runtime)
        self.save_id = ""
        self.error: BaseException | None = None
        self.snapshot_seconds = 0.0
        self.in_hand: dict[int, torch.Tensor] = {}
        self.input_closed = False
        self._backlog: list[tuple[Chunk, torch.Tensor, Any]] = []
        self._input_done = anyio.Event()
        self._ready = anyio.Event()  # start() finished: chunks may be written
        self._may_write = anyio.Event()  # the snapshot no longer needs the machine to itself (see ``yield_to_copy``)
        self._waits: set[anyio.CancelScope] = set()
        if not yield_to_copy:
            self._may_write.set()
        self._tg: Any = None
        self._launch: Callable[[], None] | None = None
        self._snapshot_done = time.perf_counter()

    # ------------------------------------------------------------ from the feed (caller's thread)

    @property
    def holds_writes(self) -> bool:
        """Whether writes still wait for the snapshot (until it ends or waits for budget): meanwhile the feed hands
        its chunks over together — before the last chunk's copy and at the end — instead of waking the loop once
        per chunk while the caller is blocked."""
        return not self._may_write.is_set()

    def launch_on_delivery(self, launch: Callable[[], None]) -> None:
        """Start the job's background task (``launch()``) at its first `deliver`, not now: a job that holds its
        writes has nothing to do before then, and each wake-up of the loop while the caller copies costs the caller
        the GIL. Even once started, such a job sets up storage only when the copy has ended."""
        self._launch = launch

    def try_acquire(self, nbytes: int) -> torch.Tensor | None:
        buf = self.pool.try_acquire(nbytes)
        if buf is not None:
            self.in_hand[id(buf)] = buf
        return buf

    # ------------------------------------------------------------ on the loop

    async def acquire(self, nbytes: int) -> torch.Tensor | None:
        """A buffer for this job, waiting for budget; None once the job has failed (the feed then stops)."""
        self._may_write.set()  # only writes free memory now
        with anyio.CancelScope() as scope:
            self._waits.add(scope)
            try:
                buf = await self.pool.acquire(nbytes)
            finally:
                self._waits.discard(scope)
        if scope.cancelled_caught or self.error is not None:
            return None
        if self.input_closed:  # the caller gave up waiting: nobody will fill this one
            self.pool.release(buf)
            return None
        self.in_hand[id(buf)] = buf
        return buf

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
            for scope in list(self._waits):
                scope.cancel()
            if self._tg is not None:
                self._tg.cancel_scope.cancel()

    def close_input(self, snapshot_seconds: float) -> None:
        self.snapshot_seconds = snapshot_seconds
        self._snapshot_done = time.perf_counter()
        self.input_closed = True
        self._input_done.set()
        self._may_write.set()
        self.handle.mark_snapshotted()

    def submit(self, chunk: Chunk, buf: torch.Tensor, ready: Any = None) -> None:
        """Take a filled buffer (ownership passes to the job, which returns it to the pool); ``ready`` is the CUDA
        event its bytes are complete after, if they come from a device."""
        self.in_hand.pop(id(buf), None)
        if self.error is not None:
            if not self.borrows_buffers:
                self.pool.release(buf)
            return
        self.keep(chunk, buf)
        if self._tg is None:
            self._backlog.append((chunk, buf, ready))
            return
        try:
            self._tg.start_soon(self._guarded, chunk, buf, ready)
        except Exception as exc:  # never lose a chunk silently: the save fails instead
            if not (self.owns_buffers_until_finish or self.borrows_buffers):
                self.pool.release(buf)
            self.fail(exc)

    def deliver(self, items: list[tuple[Chunk, torch.Tensor, Any]], snapshot_seconds: float | None = None,
                error: BaseException | None = None) -> None:
        """What the feed hands over in one wake-up of the loop: start the job if it waited for this, record the
        snapshot's ``error``, `submit` each ``(chunk, buffer, ready)`` of ``items``, and with ``snapshot_seconds``
        close the input (the snapshot ended)."""
        if self._launch is not None:
            launch, self._launch = self._launch, None
            launch()
        if error is not None:
            self.fail(error)
        for chunk, buf, ready in items:
            self.submit(chunk, buf, ready)
        if snapshot_seconds is not None:
            self.close_input(snapshot_seconds)

    def write_seconds(self) -> float:
        """Seconds since the snapshot ended."""
        return time.perf_counter() - self._snapshot_done

    def keep(self, chunk: Chunk, buf: torch.Tensor) -> None:
        """Hold on to a buffer until the job finishes (jobs whose result aliases their buffers)."""

    async def run(self) -> None:
        """Background body: accept chunks until input closes, then conclude; never raises into the runtime."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for chunk, buf, ready in self._backlog:
                    tg.start_soon(self._guarded, chunk, buf, ready)
                self._backlog.clear()
                try:
                    await self._may_write.wait()  # started while its last chunk copies: storage waits for the copy
                    if self.error is None:  # failed before it was launched: nothing to set up, only to undo
                        await self.start()
                except Exception as exc:
                    self.fail(exc)
                self._ready.set()
                await self._input_done.wait()
            with anyio.CancelScope(shield=True):
                await self._input_done.wait()  # the feed always closes its input; its buffers are ours after
                await self._conclude()
        except anyio.get_cancelled_exc_class():
            if not self.handle.done():
                self.fail(CheckpointError("the engine was closed before the save was committed"))
                with anyio.CancelScope(shield=True):
                    await self._conclude()
            raise

    async def _conclude(self) -> None:
        try:
            for buf in self.in_hand.values():
                self.pool.release(buf)
            self.in_hand.clear()
            if self.error is None:
                try:
                    result = await self.finish()
                except Exception as exc:
                    self.fail(exc)
                else:
                    self.handle.settle(result)
                    return
            with anyio.CancelScope(shield=True):
                try:
                    await self.abort()
                except Exception:  # cleanup is best effort; the save's own error is what the caller needs
                    pass
        finally:
            if not self.handle.done():
                error = self.error or CheckpointError("the save ended without a result")
                self.handle.settle(error=restate(error, f"save to {self.display} failed: {describe(error)}"))

    async def _guarded(self, chunk: Chunk, buf: torch.Tensor, ready: Any) -> None:
        try:
            await self._ready.wait()
            await self._may_write.wait()
            if ready is not None:  # CUDA copies of this chunk were queued on the side stream
                await self.runtime.run_sync(ready.synchronize)
            if self.error is None:
                await self.take(chunk, buf)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            self.fail(exc)
        finally:
            if not (self.owns_buffers_until_finish or self.borrows_buffers):
                self.pool.release(buf)

    async def start(self) -> None:
        """Set up storage for the chunks (runs while the snapshot copies)."""

    async def take(self, chunk: Chunk, buf: torch.Tensor) -> None:
        """Write one filled chunk."""

    async def finish(self) -> SaveResult:
        """Complete the job once every chunk was taken; returns what the handle reports."""
        raise NotImplementedError

    async def abort(self) -> None:
        """Undo what the job wrote (the job failed)."""


class ShardJob(Job):
    """Writes a plan's shard files durably and publishes nothing: one rank's part of a multi-rank save.

    ``files`` names the shards (``save_id`` is the one in those names). Once every file is durable the job's
    `records` say what was written, for the coordinator that commits every rank's records together.
    """

    def __init__(self, *args: Any, fsync: bool, files: list[str] | None = None, save_id: str = "",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.save_id = save_id or uuid.uuid4().hex[:16]
        if files is None:
            files = [shard_name(self.save_id, i) for i in range(len(self.plan.shard_sizes))]
        self.writer = ShardWriter(self.storage, self.path, files, self.plan.shard_sizes, self.plan.shard_chunks,
                                  fsync)
        self.records: list[ShardRecord] = []

    async def start(self) -> None:
        await self.writer.prepare()

    async def take(self, chunk: Chunk, buf: torch.Tensor) -> None:
        await self.writer.write(chunk.shard, chunk.offset, buf, chunk.nbytes)

    async def finish(self) -> SaveResult:
        self.records = self.writer.results()
        return SaveResult(self.display, self.plan.total_bytes, self.snapshot_seconds, self.write_seconds(),
                          len(self.records), len(self.plan.tensors))

    async def abort(self) -> None:
        await self.writer.abort(remove_directory=self.in_flight() <= {self.save_id})


class BorrowedShardJob(ShardJob):
    """A `ShardJob` fed with slices of buffers its caller staged and still owns (``dcp.async_save``)."""

    borrows_buffers = True


class SaveJob(ShardJob):
    """Writes a native checkpoint: the shard writer writes the shards, then the committer publishes the manifest."""

    def __init__(self, *args: Any, fsync: bool, metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, fsync=fsync, **kwargs)
        self.metadata = metadata
        self.created_ns = time.time_ns()  # when the snapshot was taken
        self.sequence = CLOCK.next()  # orders checkpoints by the state they hold, even if the wall clock steps back
        self.committer = Committer(self.storage, self.path, fsync)

    async def start(self) -> None:
        """Refuse a directory whose ``manifest.json`` is not an asyncckpt manifest (``remove`` refuses it too):
        committing would overwrite data that is not ours."""
        manifest = self.storage.join(self.path, MANIFEST_NAME)
        try:
            there = await self.storage.size(manifest) is not None
        except Exception:  # the store's own error (no bucket, no access) comes, unchanged, from the first write
            there = False
        if there:
            raw = await self.storage.read_bytes(manifest, MAX_MANIFEST_BYTES)
            if looks_sealed(raw):  # ours and intact (the usual overwrite): no full parse on the save's path
                return await super().start()
            try:
                parse(raw, self.display)
            except NewerFormatError:
                pass  # ours, from a newer release
            except CheckpointError:
                raise CheckpointError(
                    f"refusing to save into {self.display}: its {MANIFEST_NAME} is not a readable asyncckpt "
                    "manifest (foreign or damaged data would be overwritten); save to another path, or delete it "
                    "yourself if it is not needed") from None
        await super().start()

    async def finish(self) -> SaveResult:
        await super().finish()  # every shard is durable
        if self.previous is not None:  # commit after an earlier save of this path, never before
            await self.previous.handle.settled()
        tensors, storages, objects = self.plan.records()
        manifest = Manifest(self.save_id, self.created_ns, (*self.records, *self.plan.external), tensors,
                            storages, objects, self.plan.tree, metadata=self.metadata, chain=self.plan.chain,
                            sequence=self.sequence)
        size = await self.committer.commit(manifest, self.in_flight)
        return SaveResult(self.display, self.plan.total_bytes + size, self.snapshot_seconds, self.write_seconds(),
                          len(manifest.shards), len(tensors))

    async def abort(self) -> None:
        if self.committer.publishing:  # the manifest may be out (storage errors can follow a write that took
            return  # effect): keep the shards it names; if it is not out, the next save of this path sweeps them
        await super().abort()


class CallJob(Job):
    """Hands a point-in-time copy of the state to a foreign serializer running in a worker thread.

    The copy's tensors are views of staging buffers that the next save reuses. A serializer that keeps any of them
    after it returns (an in-memory store, a queue for a later upload) would see the next save's values, so such
    buffers are given away to it instead of going back to the pool: it keeps exactly the values it was handed.
    """

    owns_buffers_until_finish = True

    def __init__(self, *args: Any, fn: Callable[[Any], Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fn = fn
        self.buffers: list[torch.Tensor | None] = [None] * len(self.plan.chunks)

    def keep(self, chunk: Chunk, buf: torch.Tensor) -> None:
        self.buffers[chunk.shard] = buf

    def _call(self) -> set[int]:
        """Run the serializer on the copy (in a worker thread); the buffers it still references afterwards."""
        made: list[tuple[torch.Tensor, int]] = []
        copy = self.plan.rebuild(self.buffers, made)  # type: ignore[arg-type]
        refs = [(weakref.ref(t), shard) for t, shard in made]
        del made
        _callback.key = self.target.key
        try:
            self.fn(copy)  # if it raises, its traceback may hold the copy: finish() then reuses none of it
        except Exception:
            raise
        except BaseException as exc:  # SystemExit, KeyboardInterrupt: must not reach the engine's loop, and end it
            raise CheckpointError(f"the serializer of {self.display} raised {type(exc).__name__}: {exc}; nothing "
                                  "was saved") from exc
        finally:
            _callback.key = None
            del copy
        kept = {shard for ref, shard in refs if ref() is not None}
        if kept:  # perhaps only garbage in a reference cycle
            gc.collect()
            kept = {shard for ref, shard in refs if ref() is not None}
        return kept

    async def finish(self) -> SaveResult:
        if self.previous is not None:
            await self.previous.handle.settled()
        kept: set[int] | None = None
        try:
            kept = await self.runtime.run_sync(self._call)
        finally:
            self._release(set(range(len(self.buffers))) if kept is None else kept, warn=kept is not None)
        return SaveResult(self.display, self.plan.total_bytes, self.snapshot_seconds, self.write_seconds(), 0,
                          len(self.plan.tensors))

    async def abort(self) -> None:
        self._release(set())

    def _release(self, kept: set[int], warn: bool = False) -> None:
        given = 0
        for i, buf in enumerate(self.buffers):
            if buf is None:
                continue
            if i in kept:
                self.pool.give_away(buf)
                given += buf.numel()
            else:
                self.pool.release(buf)
            self.buffers[i] = None
        if given and warn:
            report = log.debug if self.pool in _warned_kept else log.warning
            _warned_kept.add(self.pool)
            report("the serializer of %s kept tensors of the copy it was handed after it returned: their %d bytes "
                   "of staging memory are now its own (outside host_memory_budget) and are not reused",
                   self.display, given)
