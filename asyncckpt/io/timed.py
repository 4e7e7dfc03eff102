"""The engine's ``io_timeout``: every storage operation of any backend bounded in time.

`TimedStorage` wraps a backend; each operation that makes no progress within the timeout (a chunk written
or read, a listing, a manifest published, a file removed) raises `StorageTimeoutError` naming
the operation and the path, which fails the save or load it belongs to: nothing is committed, and the checkpoints
committed before stay. Blocking calls cut short this way are abandoned in their worker thread (see
`shielded` and ``Runtime.run_sync``); clean-up on a hung store ends after one
more timeout instead of hanging.

The whole-file streams (`Storage.put_file`, `Storage.get_file`) run a foreign serializer of unknown
duration and are not bounded.
"""

from __future__ import annotations

from typing import IO, Any, Awaitable, Callable, Mapping, TypeVar

import anyio
import torch

from ..concurrency import IoRunner
from ..errors import StorageTimeoutError
from .contract import Kind, Reader, Sink, Storage

T = TypeVar("T")


async def bounded(timeout: float, operation: str, path: str, call: Callable[[], Awaitable[T]]) -> T:
    """``await call()``, or `StorageTimeoutError` once it has taken ``timeout`` seconds."""
    try:
        with anyio.fail_after(timeout):
            return await call()
    except TimeoutError:
        raise StorageTimeoutError(
            f"{operation} of {path} made no progress within io_timeout={timeout:g}s; the storage is hung or "
            "unreachable — check it (or raise io_timeout); checkpoints committed before are untouched",
            operation=operation, path=path) from None


class TimedStorage(Storage):
    """``inner`` with each operation bounded by ``timeout`` seconds."""

    def __init__(self, inner: Storage, timeout: float) -> None:
        super().__init__(inner.io)
        self.inner, self.timeout = inner, timeout
        self.protocol, self.part_rules = inner.protocol, inner.part_rules

    def _bounded(self, operation: str, path: str, call: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        return bounded(self.timeout, operation, path, call)

    @classmethod
    def create(cls, protocol: str, storage_options: Mapping[str, Any] | None, io: IoRunner) -> "Storage":
        raise TypeError("TimedStorage wraps a backend; it is not registered for a protocol")

    def default_shard_bytes(self, chunk_bytes: int) -> int:
        return self.inner.default_shard_bytes(chunk_bytes)

    def strip(self, url: str) -> str:
        return self.inner.strip(url)

    def key(self, path: str) -> str:
        return self.inner.key(path)

    def join(self, *parts: str) -> str:
        return self.inner.join(*parts)

    def split(self, path: str) -> tuple[str, str]:
        return self.inner.split(path)

    async def open_sink(self, path: str, nbytes: int, fsync: bool, chunk_bytes: int) -> Sink:
        sink = await self._bounded("open for writing", path,
                                   lambda: self.inner.open_sink(path, nbytes, fsync, chunk_bytes))
        return TimedSink(sink, path, self.timeout)

    async def open_reader(self, path: str, shared: bool = False) -> Reader:
        reader = await self._bounded("open for reading", path, lambda: self.inner.open_reader(path, shared))
        return TimedReader(reader, path, self.timeout)

    async def put_atomic(self, path: str, data: bytes, fsync: bool) -> None:
        await self._bounded("atomic write", path, lambda: self.inner.put_atomic(path, data, fsync))

    async def read_bytes(self, path: str, limit: int) -> bytes:
        return await self._bounded("read", path, lambda: self.inner.read_bytes(path, limit))

    async def put_file(self, path: str, write: Callable[[IO[bytes]], Any], fsync: bool) -> None:
        await self.inner.put_file(path, write, fsync)

    async def get_file(self, path: str, read: Callable[[IO[bytes]], T]) -> T:
        return await self.inner.get_file(path, read)

    async def kind(self, path: str) -> Kind | None:
        return await self._bounded("lookup", path, lambda: self.inner.kind(path))

    async def size(self, path: str) -> int | None:
        return await self._bounded("size lookup", path, lambda: self.inner.size(path))

    async def list(self, path: str) -> list[str]:
        return await self._bounded("listing", path, lambda: self.inner.list(path))

    async def makedirs(self, path: str, fsync: bool) -> bool:
        return await self._bounded("makedirs", path, lambda: self.inner.makedirs(path, fsync))

    async def remove(self, path: str) -> None:
        await self._bounded("remove", path, lambda: self.inner.remove(path))

    async def remove_dir(self, path: str) -> None:
        await self._bounded("directory removal", path, lambda: self.inner.remove_dir(path))

    async def remove_link(self, path: str) -> bool:
        return await self._bounded("link removal", path, lambda: self.inner.remove_link(path))

    async def sync_dir(self, path: str) -> None:
        await self._bounded("directory sync", path, lambda: self.inner.sync_dir(path))

    async def close(self) -> None:
        with anyio.move_on_after(self.timeout):
            await self.inner.close()


class _Bounded:
    """What a timed sink and a timed reader share: the inner object, its path, the timeout."""

    def __init__(self, inner: Any, path: str, timeout: float) -> None:
        self.inner, self.path, self.timeout = inner, path, timeout

    def _bounded(self, operation: str, call: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        return bounded(self.timeout, operation, self.path, call)

    async def _give_up_after(self, call: Callable[[], Awaitable[None]]) -> None:
        """Clean-up that never raises: on a hung store it ends after one timeout."""
        with anyio.move_on_after(self.timeout):
            await call()


class TimedSink(_Bounded):
    """A sink whose writes and commit are bounded; its abort gives up after one timeout (it never raises)."""

    def __init__(self, inner: Sink, path: str, timeout: float) -> None:
        super().__init__(inner, path, timeout)
        self.ordered = inner.ordered

    async def write(self, offset: int, data: torch.Tensor, nbytes: int) -> str:
        return await self._bounded(f"write at byte {offset}", lambda: self.inner.write(offset, data, nbytes))

    async def commit(self) -> None:
        await self._bounded("commit", self.inner.commit)

    async def abort(self) -> None:
        await self._give_up_after(self.inner.abort)


class TimedReader(_Bounded):
    """A reader whose reads are bounded."""

    async def read_into(self, offset: int, out: torch.Tensor) -> str:
        return await self._bounded(f"read at byte {offset}", lambda: self.inner.read_into(offset, out))

    async def close(self) -> None:
        await self._give_up_after(self.inner.close)
