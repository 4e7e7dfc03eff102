"""Checking a checkpoint without loading it: sizes, every chunk's checksum, and that each shard's safetensors header
places the entries where the manifest does (a lie checksums alone would miss)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import anyio
import torch

from ..format.manifest import AnyManifest, GlobalManifest, ShardRecord
from ..format.safetensors import HeaderError, header_length, parse_header
from ..io.contract import Reader, Storage
from ..memory.buffers import as_memoryview
from .reads import first_error, shard_path


async def _header_problem(reader: Reader, manifest: AnyManifest, i: int, display: str) -> str | None:
    s = manifest.shards[i]
    try:
        prefix = torch.empty(8, dtype=torch.uint8)
        await reader.read_into(0, prefix)
        n = header_length(as_memoryview(prefix).tobytes())
        if 8 + n > s.nbytes:
            raise HeaderError("the header is longer than the shard")
        raw = torch.empty(n, dtype=torch.uint8)
        await reader.read_into(8, raw)
        found = [(8 + n + start, length) for start, length in parse_header(as_memoryview(raw).tobytes())]
    except (EOFError, HeaderError) as exc:
        return f"{display}: shard {s.file} does not start with a valid safetensors header ({exc})"
    if isinstance(manifest, GlobalManifest):  # items written twice share bytes; empty ones may lie anywhere
        agree = {(r.offset, r.nbytes) for r in manifest.byte_spans() if r.shard == i and r.nbytes} <= set(found)
    else:
        expected = sorted((r.span.offset, r.span.nbytes) for r in manifest.byte_records()
                          if r.span is not None and r.span.shard == i)
        if s.base is not None:  # another checkpoint's shard: this one uses some of its entries
            if not set(expected) <= set(found):
                return (f"{display}: shard {s.file} of {s.base}: its safetensors header does not hold the entries "
                        "this checkpoint references there")
            return None
        agree = found == expected
    if not agree or max((o + n for o, n in found), default=s.nbytes) != s.nbytes:
        return f"{display}: shard {s.file}: its safetensors header and the manifest place the entries differently"
    return None


async def verify_shards(storage: Storage, path: str, display: str, manifest: AnyManifest,
                        on_chunk: Callable[[int], Any] | None = None) -> list[str]:
    """Every problem with the shards of a parsed manifest, one line each: a missing or resized shard, a chunk whose
    xxh3-64 differs, a header that disagrees with the manifest.

    As many workers as the engine's I/O concurrency read chunks into one reused buffer each, so memory stays
    bounded whatever the checkpoint's size; ``on_chunk(nbytes)`` reports progress.
    """
    shards: tuple[ShardRecord, ...] = manifest.shards
    problems: list[str] = []
    sizes: dict[int, int | None] = {}
    report = on_chunk or (lambda n: None)

    async def size_of(i: int) -> None:
        sizes[i] = await storage.size(shard_path(storage, path, shards[i]))

    async def worker(work: Iterator[tuple[int, int, int, int]], nbytes: int) -> None:
        buf, reader, current = torch.empty(nbytes, dtype=torch.uint8), None, -1
        try:
            for i, k, offset, n in work:
                s = shards[i]
                if i != current:
                    if reader is not None:
                        await reader.close()
                    reader = None
                    reader, current = await storage.open_reader(shard_path(storage, path, s)), i
                try:
                    sig = await reader.read_into(offset, buf[:n])
                except EOFError as exc:
                    problems.append(f"{display}: shard {s.file} is truncated ({exc})")
                else:
                    if sig != s.xxh3_64[k]:
                        problems.append(f"{display}: checksum mismatch in shard {s.file} at bytes "
                                        f"{offset}..{offset + n}")
                    elif k == 0:
                        problem = await _header_problem(reader, manifest, i, display)
                        if problem is not None:
                            problems.append(problem)
                report(n)
        finally:
            if reader is not None:
                await reader.close()

    try:
        async with anyio.create_task_group() as tg:
            for i in range(len(shards)):
                tg.start_soon(size_of, i)
        intact = []
        for i, s in enumerate(shards):
            if sizes[i] == s.nbytes:
                intact.append(i)
                continue
            problems.append(f"{display}: shard {s.file} is missing" if sizes[i] is None else
                            f"{display}: shard {s.file} has {sizes[i]} bytes, the manifest says {s.nbytes} "
                            "(truncated or overwritten)")
            report(s.nbytes)
        work = iter([(i, k, offset, n) for i in intact for k, offset, n in shards[i].chunks()])
        nbytes = max((min(shards[i].chunk_bytes, shards[i].nbytes) for i in intact), default=0)
        async with anyio.create_task_group() as tg:
            for _ in range(min(storage.io.limit, len(intact))):
                tg.start_soon(worker, work, nbytes)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    return problems
