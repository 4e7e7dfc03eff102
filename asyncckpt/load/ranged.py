"""Ranged reads: only the checksummed chunks that cover the byte ranges a caller wants, each read once into a
staging buffer, checked, and copied straight into the destinations it covers.

Both in-place loads (every entry of a checkpoint into a target's tensors) and multi-rank loads (a rank's share
of the chunks) read this way; `ReadStats` says how many bytes were read for how many wanted.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import StorageTimeoutError
from ..format.manifest import ShardRecord
from ..io.contract import Storage
from ..memory.buffers import mapped_buffer
from ..memory.pool import StagingPool
from .reads import check_sizes, read_chunks

#: a wanted byte range: its offset in the shard file and the uint8 host tensor its bytes land in
Region = tuple[int, torch.Tensor]


@dataclass
class ReadStats:
    """What a ranged read cost: bytes the destinations needed, bytes read from storage (whole chunks), chunks."""

    wanted: int = 0
    read: int = 0
    chunks: int = 0

    @property
    def amplification(self) -> float:
        """Bytes read per byte wanted (1.0 when nothing was wanted)."""
        return self.read / self.wanted if self.wanted else 1.0

    def add(self, other: "ReadStats") -> None:
        self.wanted += other.wanted
        self.read += other.read
        self.chunks += other.chunks


def _scatter(chunk: torch.Tensor, start: int, regions: list[Region]) -> None:
    end = start + chunk.numel()
    for offset, out in regions:
        a, b = max(offset, start), min(offset + out.numel(), end)
        out[a - offset:b - offset].copy_(chunk[a - start:b - start])


async def read_regions(storage: Storage, path: str, display: str, shards: Sequence[ShardRecord], verify: bool,
                       pool: StagingPool, regions: list[list[Region]], damaged: str = "") -> ReadStats:
    """Fill every region (``regions[i]`` lie in ``shards[i]``) from the checkpoint at ``path``.

    Only chunks that overlap a region are read, and only shards with a region are opened (and their sizes
    checked). A chunk whose checksum differs reaches no destination and raises CorruptCheckpointError (``damaged``
    is appended to its message: what the caller's destinations may hold by then).
    """
    stats = ReadStats()
    wanted: list[set[int]] = [set() for _ in shards]
    starts: list[list[int]] = []
    reach: list[list[int]] = []  # per shard: the furthest region end up to each region (bisectable)
    for i, rs in enumerate(regions):
        rs.sort(key=lambda x: x[0])
        cb = shards[i].chunk_bytes
        for offset, out in rs:
            if out.numel():
                stats.wanted += out.numel()
                wanted[i].update(range(offset // cb, (offset + out.numel() - 1) // cb + 1))
        starts.append([offset for offset, _ in rs])
        reach.append(list(itertools.accumulate((offset + out.numel() for offset, out in rs), max)))
    await check_sizes(storage, path, display, tuple(s for s, w in zip(shards, wanted) if w))

    async def read_chunk(reader: Any, i: int, offset: int, nbytes: int) -> str:
        size = nbytes  # not chunk_bytes: a manifest may claim chunks far larger than the file
        pooled = size <= pool.budget
        buf = await pool.acquire(size) if pooled else mapped_buffer(size, resident=False)
        hung = False
        try:
            try:
                sig = await reader.read_into(offset, buf[:nbytes])
            except StorageTimeoutError:
                hung = True  # the read may still land in the buffer later: it never serves again
                raise
            stats.read += nbytes
            stats.chunks += 1
            if verify and sig != shards[i].xxh3_64[shards[i].chunk_of(offset)]:
                return sig  # reported by the caller; nothing of this chunk reaches a destination
            lo, hi = bisect.bisect_right(reach[i], offset), bisect.bisect_left(starts[i], offset + nbytes)
            covered = [(o, out) for o, out in regions[i][lo:hi] if o + out.numel() > offset]
            if covered:
                await storage.io(_scatter, buf[:nbytes], offset, covered)
            return sig
        finally:
            if pooled:
                pool.retire(buf) if hung else pool.release(buf)

    await read_chunks(storage, path, display, tuple(shards), verify, read_chunk, damaged, wanted)
    return stats
