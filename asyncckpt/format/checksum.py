"""The chunk checksum: xxh3-64, as 16 hex digits."""

from __future__ import annotations

from collections.abc import Iterable

import xxhash


def digest(data: memoryview | bytes) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def hasher() -> "xxhash.xxh3_64":
    """An incremental checksum: ``update`` it piece by piece; its ``hexdigest()`` is `digest` of the whole."""
    return xxhash.xxh3_64()


def digest_pieces(pieces: Iterable[memoryview | bytes]) -> str:
    """The digest of the pieces' concatenation, read one piece at a time."""
    h = hasher()
    for piece in pieces:
        h.update(piece)
    return h.hexdigest()
