"""The chunk checksum: xxh3-64, as 16 hex digits."""

from __future__ import annotations

import xxhash


def digest(data: memoryview | bytes) -> str:
    return xxhash.xxh3_64_hexdigest(data)
