"""Reading a checkpoint's chunks concurrently, each checked against its checksum."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

import anyio
import torch

from ..errors import CorruptCheckpointError
from ..format.manifest import AnyManifest, ObjectRecord, ShardRecord, StorageRecord, TensorRecord
from ..io.contract import Reader, Storage
from ..memory.buffers import alias, mapped_buffer

Record = TensorRecord | StorageRecord | ObjectRecord
Span = Callable[[Record], torch.Tensor]  # manifest record -> its bytes (uint8, host)


def shard_path(storage: Storage, path: str, shard: ShardRecord) -> str:
    """Where a shard of the checkpoint at ``path`` lives: its own directory, or the sibling it references."""
    if shard.base is None:
        return storage.join(path, shard.file)
    return storage.join(storage.split(path)[0], shard.base, shard.file)


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first meaningful error inside (possibly nested) exception groups."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def check_sizes(storage: Storage, path: str, display: str, shards: tuple[ShardRecord, ...]) -> None:
    """Refuse a missing shard, or one whose size is not the manifest's, before anything is read. The lookups run
    concurrently (on object stores each is a request); the first problem in the manifest's order is raised."""
    sizes: list[int | None | Exception] = [None] * len(shards)
    limit = anyio.CapacityLimiter(SIZE_LOOKUPS)

    async def look_up(i: int) -> None:
        async with limit:
            try:
                sizes[i] = await storage.size(shard_path(storage, path, shards[i]))
            except Exception as exc:  # raised below, in the manifest's order
                sizes[i] = exc

    async with anyio.create_task_group() as tg:
        for i in range(len(shards)):
            tg.start_soon(look_up, i)
    for s, size in zip(shards, sizes):
        if isinstance(size, Exception):
            raise size
        where = "" if s.base is None else f" (in {s.base}, the base checkpoint it builds on)"
        if size is None:
            raise CorruptCheckpointError(f"{display}: shard {s.file}{where} is missing")
        if size != s.nbytes:
            raise CorruptCheckpointError(
                f"{display}: shard {s.file}{where} has {size} bytes, the manifest says {s.nbytes} (truncated or "
                "overwritten)")


ReadChunk = Callable[[Reader, int, int, int], Awaitable[str]]
SIZE_LOOKUPS = 16  # shard size lookups in flight at once before a load
OPEN_SHARDS = 64  # shards open at once in one load (up to two descriptors each): far below a 1024-file ulimit
SHARD_READS = 32  # chunk reads in flight per open shard: tasks stay bounded however small a manifest's chunks are


async def read_chunks(storage: Storage, path: str, display: str, shards: tuple[ShardRecord, ...], verify: bool,
                      read_chunk: ReadChunk, damaged: str = "", wanted: Sequence[Collection[int]] | None = None,
                      shared: Collection[int] = ()) -> None:
    """Read every chunk of every shard (or, with ``wanted``, the chunk indices it lists per shard) concurrently
    through ``read_chunk(reader, shard, offset, nbytes)``, which returns the chunk's digest; a digest that differs
    from the manifest's is a CorruptCheckpointError. Shards in ``shared`` are read by other processes too (see
    `Storage.open_reader`)."""
    open_shards = anyio.CapacityLimiter(OPEN_SHARDS)  # a 600-shard checkpoint must not need 1200 descriptors

    async def read_shard(i: int) -> None:
        s = shards[i]
        chunks = [c for c in s.chunks() if wanted is None or c[0] in wanted[i]]
        if not chunks:
            return
        async with open_shards:
            reader = await storage.open_reader(shard_path(storage, path, s), i in shared)
            todo = iter(chunks)

            async def worker() -> None:
                for k, offset, nbytes in todo:
                    await one_chunk(reader, i, k, offset, nbytes)

            try:
                async with anyio.create_task_group() as tg:
                    for _ in range(min(len(chunks), SHARD_READS)):
                        tg.start_soon(worker)
            finally:
                await reader.close()

    async def one_chunk(reader: Reader, i: int, k: int, offset: int, nbytes: int) -> None:
        s = shards[i]
        try:
            sig = await read_chunk(reader, i, offset, nbytes)
        except EOFError as exc:
            raise CorruptCheckpointError(f"{display}: shard {s.file} is truncated ({exc}){damaged}") from exc
        if verify and sig != s.xxh3_64[k]:
            raise CorruptCheckpointError(
                f"{display}: checksum mismatch in shard {s.file} at bytes {offset}..{offset + nbytes}; the checkpoint "
                "is damaged — load another one (asyncckpt.latest) or pass verify=False to inspect it" + damaged)

    try:
        async with anyio.create_task_group() as tg:
            for i in range(len(shards)):
                tg.start_soon(read_shard, i)
    except BaseExceptionGroup as group:
        raise first_error(group) from None


async def read_shards(storage: Storage, path: str, display: str, manifest: AnyManifest, verify: bool
                      ) -> list[torch.Tensor]:
    """Every shard's bytes in host memory, chunks read concurrently and checked against the manifest."""
    shards = manifest.shards
    await check_sizes(storage, path, display, shards)
    buffers = [mapped_buffer(s.nbytes, resident=False) for s in shards]  # page-aligned: chunks go O_DIRECT

    async def read_chunk(reader: Any, i: int, offset: int, nbytes: int) -> str:
        return await reader.read_into(offset, buffers[i][offset:offset + nbytes])

    await read_chunks(storage, path, display, shards, verify, read_chunk)
    return buffers


def shard_span(buffers: list[torch.Tensor]) -> Span:
    """Records' bytes as views of whole-shard buffers, each with a storage of its own (see ``alias``)."""
    def span(r: Record) -> torch.Tensor:
        assert r.span is not None
        return alias(buffers[r.span.shard][r.span.offset:r.span.end])
    return span
