"""Ranged reads: only the checksummed chunks that cover the byte ranges a caller wants, each read once into a
staging buffer, checked, and copied straight into the destinations it covers.

Both in-place loads (every entry of a checkpoint into a target's tensors) and multi-rank loads (a rank's share
of the chunks) read this way; `ReadStats` says how many bytes were read for how many wanted.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from typing import Any, Collection, Sequence

import anyio
import torch

from ..errors import StorageTimeoutError
from ..format.manifest import ShardRecord
from ..io.contract import Storage
from ..memory.buffers import mapped_buffer
from ..memory.pool import StagingPool
from .reads import check_sizes, read_chunks

@dataclass(frozen=True)
class Rows:
    """A column band of rows stored back to back: ``out`` (a uint8 host tensor of ``rows × take`` bytes, each row
    contiguous, rows any distance apart) takes bytes ``[skip, skip + take)`` of each of ``rows`` rows of
    ``row_bytes`` bytes, the first of which starts at ``offset`` in the shard file. A reshard reads one this way:
    the band lands straight in the destination's rows, with no copy of whole rows in between."""

    offset: int
    row_bytes: int
    skip: int
    out: torch.Tensor

    @property
    def start(self) -> int:
        return self.offset + self.skip

    @property
    def end(self) -> int:
        rows, take = self.out.shape
        return self.start + (rows - 1) * self.row_bytes + take if rows and take else self.start

    @property
    def wanted(self) -> int:
        return self.out.numel()

    def scatter(self, chunk: torch.Tensor, start: int) -> None:
        """Copy the band's bytes that lie in ``chunk`` (the file's bytes from ``start``) to their rows."""
        rows, take = self.out.shape
        rb, first, end = self.row_bytes, self.start, start + chunk.numel()
        lo = max(0, (start - first - take) // rb + 1)  # rows whose band ends past ``start`` ...
        hi = min(rows, (end - first - 1) // rb + 1)  # ... and begins before ``end``
        whole_lo = max(lo, -(-(start - first) // rb))  # rows whose band lies wholly in the chunk
        whole_hi = max(whole_lo, min(hi, (end - first - take) // rb + 1))
        if whole_hi > whole_lo:
            src = chunk[first + whole_lo * rb - start:].as_strided((whole_hi - whole_lo, take), (rb, 1))
            self.out[whole_lo:whole_hi].copy_(src)
        for k in (*range(lo, whole_lo), *range(whole_hi, hi)):  # at most one row at each end of the chunk
            a, b = max(first + k * rb, start), min(first + k * rb + take, end)
            if a < b:
                self.out[k, a - first - k * rb:b - first - k * rb].copy_(chunk[a - start:b - start])


#: a wanted byte range — its offset in the shard file and the uint8 host tensor its bytes land in — or a band
Region = tuple[int, torch.Tensor] | Rows


def _span(region: Region) -> tuple[int, int]:
    """The file bytes a region lies in, from its first to past its last."""
    if isinstance(region, Rows):
        return region.start, region.end
    offset, out = region
    return offset, offset + out.numel()


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
    for region in regions:
        if isinstance(region, Rows):
            region.scatter(chunk, start)
            continue
        offset, out = region
        a, b = max(offset, start), min(offset + out.numel(), end)
        out[a - offset:b - offset].copy_(chunk[a - start:b - start])


async def read_regions(storage: Storage, path: str, display: str, shards: Sequence[ShardRecord], verify: bool,
                       pool: StagingPool, regions: list[list[Region]], damaged: str = "",
                       shared: Collection[int] = ()) -> ReadStats:
    """Fill every region (``regions[i]`` lie in ``shards[i]``) from the checkpoint at ``path``.

    Only chunks that overlap a region are read, and only shards with a region are opened (and their sizes
    checked); those in ``shared`` are read by other processes at the same time. A chunk whose checksum differs
    reaches no destination and raises CorruptCheckpointError (``damaged`` is appended to its message: what the
    caller's destinations may hold by then).
    """
    stats = ReadStats()
    wanted: list[set[int]] = [set() for _ in shards]
    starts: list[list[int]] = []
    reach: list[list[int]] = []  # per shard: the furthest region end up to each region (bisectable)
    for i, rs in enumerate(regions):
        rs.sort(key=lambda r: _span(r)[0])
        cb = shards[i].chunk_bytes
        for region in rs:
            lo, hi = _span(region)
            if hi > lo:
                stats.wanted += region.wanted if isinstance(region, Rows) else hi - lo
                wanted[i].update(range(lo // cb, (hi - 1) // cb + 1))
        starts.append([_span(r)[0] for r in rs])
        reach.append(list(itertools.accumulate((_span(r)[1] for r in rs), max)))
    await check_sizes(storage, path, display, tuple(s for s, w in zip(shards, wanted) if w))

    async def read_chunk(reader: Any, i: int, offset: int, nbytes: int) -> str:
        size = nbytes  # not chunk_bytes: a manifest may claim chunks far larger than the file
        pooled = size <= pool.budget
        buf = await pool.acquire(size) if pooled else mapped_buffer(size, resident=False)
        hung = False
        try:
            try:
                sig = await reader.read_into(offset, buf[:nbytes])
            except (StorageTimeoutError, anyio.get_cancelled_exc_class()):
                hung = True  # a read given up on may still land in the buffer later: it never serves again
                raise
            stats.read += nbytes
            stats.chunks += 1
            if verify and sig != shards[i].xxh3_64[shards[i].chunk_of(offset)]:
                return sig  # reported by the caller; nothing of this chunk reaches a destination
            lo, hi = bisect.bisect_right(reach[i], offset), bisect.bisect_left(starts[i], offset + nbytes)
            covered = [r for r in regions[i][lo:hi] if _span(r)[1] > offset]
            if covered:
                await storage.io(_scatter, buf[:nbytes], offset, covered)
            return sig
        finally:
            if pooled:
                pool.retire(buf) if hung else pool.release(buf)

    await read_chunks(storage, path, display, tuple(shards), verify, read_chunk, damaged, wanted, shared)
    return stats
