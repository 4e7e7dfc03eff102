"""``io_timeout`` against a real stalling endpoint (the fault proxy stops forwarding in front of moto), and the
fail-fast path for credential and endpoint errors."""

from __future__ import annotations

import time

import pytest
import torch

import asyncckpt
from asyncckpt import S3Error, StorageTimeoutError

from .util import keys, run

MiB = 1 << 20
LIMIT = 60.0  # seconds a failing call may take here (timeouts are 5 s: the first request also builds the
# client, seconds on a loaded machine)


def state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(2 * MiB, generator=g), "b": torch.randn(1000, generator=g), "step": seed}


def engine(options: dict, **kw) -> asyncckpt.CheckpointEngine:
    kw.setdefault("chunk_bytes", 5 * MiB)
    kw.setdefault("host_memory_budget", 64 * MiB)
    return asyncckpt.CheckpointEngine(storage_options=options, **kw)


def test_a_stalled_endpoint_fails_the_save_and_the_previous_checkpoint_stays(s3, bucket, options, proxy,
                                                                             proxy_options):
    url = f"s3://{bucket}/ckpt"

    async def main():
        async with engine(proxy_options, io_timeout=5.0) as eng:
            await (await eng.save(state(1), url))
            proxy.configure(1.0, ("stall",), match=lambda m, t: m == "PUT")
            t0 = time.monotonic()
            with pytest.raises(StorageTimeoutError, match=rf"of {bucket}/ckpt/.* made no progress within "
                                                          r"io_timeout=5s") as info:
                await (await eng.save(state(2), url))
            return time.monotonic() - t0, info.value

    took, error = run(main())
    assert took < LIMIT and proxy.injected["stall"] >= 1
    assert error.operation and error.path.startswith(f"{bucket}/ckpt/")

    async def load():
        async with engine(options) as eng:
            return await eng.load(url)

    out = run(load())
    assert out["step"] == 1 and torch.equal(out["w"], state(1)["w"])
    manifests = [k for k in keys(s3, bucket) if k.endswith("manifest.json")]
    assert manifests == ["ckpt/manifest.json"]


def test_a_stalled_endpoint_fails_the_load(s3, bucket, options, proxy, proxy_options):
    url = f"s3://{bucket}/ckpt"

    async def main():
        async with engine(options) as eng:
            await (await eng.save(state(1), url))
        proxy.configure(1.0, ("stall",), match=lambda m, t: m == "GET" and "list-type" not in t)
        async with engine(proxy_options, io_timeout=5.0) as eng:
            t0 = time.monotonic()
            with pytest.raises(StorageTimeoutError, match=rf"{bucket}/ckpt/.*io_timeout=5s"):
                await eng.load(url)
            return time.monotonic() - t0

    assert run(main()) < LIMIT


def test_a_stalled_listing_is_bounded(s3, bucket, options, proxy, proxy_options):
    url = f"s3://{bucket}/ckpt"

    async def main():
        async with engine(options) as eng:
            await (await eng.save(state(1), url))
        proxy.configure(1.0, ("stall",), match=lambda m, t: "list-type" in t)
        async with engine(proxy_options, io_timeout=5.0) as eng:
            t0 = time.monotonic()
            with pytest.raises(StorageTimeoutError, match=rf"listing of {bucket}"):
                await eng.committed(f"s3://{bucket}")
            return time.monotonic() - t0

    assert run(main()) < LIMIT
    assert "ckpt/manifest.json" in keys(s3, bucket)
