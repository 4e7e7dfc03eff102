"""Ranged reads of one S3 object, streamed into the caller's buffer.

A chunk's ranged GET is read piece by piece straight into the destination and checksummed as the pieces arrive:
no whole-chunk ``bytes`` object is assembled and copied again, and the bytes are hashed while they are still in
the cache. A failed request is retried from the chunk's start under the storage's retry policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ...format.checksum import hasher
from ...memory.buffers import as_memoryview
from .retry import retrying

if TYPE_CHECKING:
    from .storage import S3Storage

PIECE = 1 << 20  # the most one read from the response stream takes at a time


class S3Reader:
    def __init__(self, storage: "S3Storage", path: str) -> None:
        self.storage = storage
        self.bucket, self.key = storage.bucket_and_key(path)

    async def read_into(self, offset: int, out: torch.Tensor) -> str:
        n = out.numel()
        view = as_memoryview(out)
        if not n:
            return hasher().hexdigest()

        async def once() -> tuple[int, str]:
            h, at = hasher(), 0
            async with self.storage.io.limiter:
                resp = await self.storage.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key,
                                                      Range=f"bytes={offset}-{offset + n - 1}")
                body: Any = resp["Body"]
                try:
                    while at < n:
                        got = await body.readinto(view[at:at + min(n - at, PIECE)])
                        if not got:
                            break
                        h.update(view[at:at + got])
                        at += got
                finally:
                    body.close()
            return at, h.hexdigest()

        got, sig = await retrying("get_object", self.bucket, self.key, once, self.storage.retry)
        if got < n:  # the object is shorter: a truncated shard, not a failed request
            raise EOFError(f"file ends {n - got} bytes early")
        return sig

    async def close(self) -> None:
        return None
