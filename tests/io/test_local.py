"""Local-disk specifics the contract does not cover: which reads bypass the page cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from asyncckpt.concurrency import IoRunner, Runtime
from asyncckpt.io.local import LocalStorage, OsOps
from asyncckpt.memory.buffers import mapped_buffer
from asyncckpt.tools.fsutil import evict

MiB = 1 << 20


@pytest.mark.skipif(not OsOps.O_DIRECT or not hasattr(os, "posix_fadvise"), reason="needs O_DIRECT and fadvise")
def test_a_file_in_the_page_cache_is_read_buffered_and_a_cold_one_directly(tmp_path: Path) -> None:
    data = torch.randint(0, 256, (8 * MiB,), dtype=torch.uint8)
    path = tmp_path / "shard"
    path.write_bytes(data.numpy().tobytes())
    runtime = Runtime(workers=2)
    try:
        storage = LocalStorage(runtime.call(IoRunner, runtime, 2))

        async def read(shared: bool = False) -> tuple[int, torch.Tensor]:
            reader = await storage.open_reader(str(path), shared)
            try:
                out = mapped_buffer(data.numel())
                await reader.read_into(0, out)
                return reader.direct_fd, out
            finally:
                await reader.close()

        evict(tmp_path)
        direct_fd, cold = runtime.call(read)
        if direct_fd < 0:
            pytest.skip("this filesystem refuses O_DIRECT")
        assert torch.equal(cold, data)
        evict(tmp_path)
        direct_fd, shared = runtime.call(read, True)  # other processes read it too: through the page cache
        assert direct_fd == -1 and torch.equal(shared, data)
        path.read_bytes()  # now cached: a read is a memory copy, not a trip to the device
        direct_fd, warm = runtime.call(read)
        assert direct_fd == -1
        assert torch.equal(warm, data)
    finally:
        runtime.close()
