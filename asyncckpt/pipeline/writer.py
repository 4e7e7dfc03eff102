"""Shard writer: writes one writer's shard files chunk by chunk, durably, and reports what it wrote.

It publishes nothing: its files are invisible to loaders until a committer writes a manifest naming them. With
many ranks each rank runs a writer and one coordinator commits every rank's results.
"""

from __future__ import annotations

import anyio
import torch

from ..format.manifest import ShardRecord
from ..io.contract import Sink, Storage


class ShardWriter:
    """Writes the shard files ``files`` (of ``sizes`` bytes, each cut in chunks of its ``chunk_sizes`` entry) under
    ``directory``."""

    def __init__(self, storage: Storage, directory: str, files: list[str], sizes: list[int], chunk_sizes: list[int],
                 fsync: bool) -> None:
        self.storage, self.directory, self.files, self.sizes = storage, directory, files, sizes
        self.chunk_sizes, self.fsync = chunk_sizes, fsync
        counts = [max(1, -(-n // c)) for n, c in zip(sizes, chunk_sizes)]
        self.sinks: dict[int, Sink] = {}
        self._open_locks = [anyio.Lock() for _ in files]
        self._remaining = list(counts)
        self._digests: list[list[str]] = [[""] * k for k in counts]
        self._turns = [[anyio.Event() for _ in range(k)] for k in counts]  # ordered sinks: one chunk after another
        for turns in self._turns:
            turns[0].set()
        self.created_directory = False

    async def prepare(self) -> None:
        """Create the directory (durably with fsync) before the first shard opens."""
        self.created_directory = await self.storage.makedirs(self.directory, self.fsync)

    async def _sink(self, shard: int) -> Sink:
        async with self._open_locks[shard]:
            if shard not in self.sinks:
                # shielded: when the save fails (and cancels this task) while the file is being created in a worker
                # thread, the file exists once the call returns, and abort() must know its sink to delete it. A
                # hung open still ends: the engine's io_timeout bounds it inside this scope
                with anyio.CancelScope(shield=True):
                    self.sinks[shard] = await self.storage.open_sink(
                        self.storage.join(self.directory, self.files[shard]), self.sizes[shard], self.fsync,
                        self.chunk_sizes[shard])
            return self.sinks[shard]

    async def write(self, shard: int, offset: int, buf: torch.Tensor, nbytes: int) -> None:
        """Write one chunk; the shard's last chunk makes the file complete and durable."""
        sink = await self._sink(shard)
        index = offset // self.chunk_sizes[shard]
        turns = self._turns[shard]
        if sink.ordered:
            await turns[index].wait()
        self._digests[shard][index] = await sink.write(offset, buf, nbytes)
        if index + 1 < len(turns):
            turns[index + 1].set()
        self._remaining[shard] -= 1
        if self._remaining[shard] == 0:
            await sink.commit()

    @property
    def complete(self) -> bool:
        return not any(self._remaining)

    def results(self) -> list[ShardRecord]:
        """What was written, one record per shard (every shard must be complete)."""
        assert self.complete, "results() before every shard was written"
        return [ShardRecord(f, n, c, tuple(d))
                for f, n, c, d in zip(self.files, self.sizes, self.chunk_sizes, self._digests)]

    async def abort(self, remove_directory: bool) -> None:
        """Delete every file this writer opened and, with ``remove_directory``, the directory if this writer created
        it and it is empty (the caller knows whether another save of the path still needs it)."""
        with anyio.CancelScope(shield=True):
            for sink in self.sinks.values():
                await sink.abort()
            if self.created_directory and remove_directory:
                try:  # a first save that failed leaves no empty directory behind
                    if not await self.storage.list(self.directory):
                        await self.storage.remove_dir(self.directory)
                except Exception:  # best effort (an unreachable object store raises CheckpointError, not OSError)
                    pass
