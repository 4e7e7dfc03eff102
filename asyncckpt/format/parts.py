"""How a shard is cut into chunks, and the limits a store puts on the parts it uploads.

A chunk is the unit of staging, writing and checksumming, and on object stores the part of an upload. Two rules
keep the cut right for every store by construction:

* a shard never needs a chunk for a few spilled bytes: a shard of whole chunks plus its header gets chunks that
  larger by a few pages (`shard_chunk`), so its header does not make a tiny extra part (a 32 MiB tensor
  with its header is one chunk of 32 MiB + 4 KiB: one PUT);
* a store's part limits (`PartRules`: S3 takes parts of 5 MiB to 5 GiB, at most 10,000 of them; GCS takes
  resumable-upload chunks in whole 256 KiB) bound the shard and chunk sizes the plan makes, so a layout the store
  would refuse is never made.
"""

from __future__ import annotations

from dataclasses import dataclass

PAGE = 4096
GROWTH = 64  # a chunk may grow by 1/GROWTH of itself to absorb a header


@dataclass(frozen=True)
class PartRules:
    """Limits a store puts on the parts of one uploaded file (None: no limit).

    Args:
        min_part: bytes every part but a file's last must have; smaller chunks are gathered into whole multiples.
        max_part: bytes a part may have at most.
        max_parts: parts one file may have.
        multiple: every part but a file's last is a whole multiple of this many bytes (GCS: 256 KiB), so a chunk
            grows by whole multiples of it, and ``chunk_bytes`` must be one.
    """

    min_part: int = 0
    max_part: int | None = None
    max_parts: int | None = None
    multiple: int = PAGE

    def part_bytes(self, chunk_bytes: int) -> int:
        """The size of a full part when chunks have ``chunk_bytes``: whole chunks, at least ``min_part``."""
        return chunk_bytes * max(1, -(-self.min_part // chunk_bytes))

    def max_file(self, chunk_bytes: int) -> int | None:
        """The largest file that stays within ``max_parts`` parts of ``chunk_bytes`` chunks."""
        return None if self.max_parts is None else self.max_parts * self.part_bytes(chunk_bytes)

    def parts(self, nbytes: int, chunk_bytes: int) -> int:
        """How many parts a file of ``nbytes`` cut into ``chunk_bytes`` chunks is uploaded in."""
        return max(1, -(-nbytes // self.part_bytes(chunk_bytes)))


NO_RULES = PartRules()


def headroom(chunk_bytes: int, limit: int | None, multiple: int = PAGE) -> int:
    """Bytes a shard's chunks may grow by: 1/64 of a chunk in whole ``multiple``s (pages: none below 256 KiB
    chunks, where a page is too much), never past ``limit`` bytes a chunk."""
    room = chunk_bytes // GROWTH // multiple * multiple
    if limit is not None:
        room = min(room, limit - chunk_bytes)
    return max(0, room)


def shard_chunk(size: int, chunk_bytes: int, room: int, multiple: int = PAGE) -> int:
    """The chunk size of a shard of ``size`` bytes: ``chunk_bytes``, or, when the shard spills a few bytes (its
    header, typically) past whole chunks, chunks grown by the fewest whole ``multiple``s (pages; at most ``room``)
    that take the spill, so the shard keeps its count of whole chunks and no last part of a few bytes."""
    whole, spill = divmod(size, chunk_bytes)
    if not whole or not spill:
        return chunk_bytes
    grow = -(-(-(-spill // whole)) // multiple) * multiple
    return chunk_bytes + grow if grow <= room else chunk_bytes
