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


# ---------------------------------------------------------------- credentials and endpoints fail fast


@pytest.fixture(scope="module")
def checking_moto(_isolated_aws_env):
    """A second moto server that checks credentials (the suite's own accepts any): unknown keys are refused."""
    from asyncckpt.testing import MotoServer

    server = MotoServer(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    yield server
    server.stop()


def test_unknown_credentials_fail_fast_with_the_stores_message(checking_moto):
    opts = dict(checking_moto.options(), retry={"attempts": 8, "base_delay": 0.5, "max_delay": 2.0})

    async def main():
        async with engine(opts) as eng:
            with pytest.raises(S3Error, match=r"InvalidAccessKeyId.*check key/secret and endpoint_url.*not retried"
                               ) as saving:
                await (await eng.save(state(1), "s3://some-bucket/ckpt"))
            # a load starts with a HEAD, whose 403 has no body to name the code: the status and the hint are given
            with pytest.raises(S3Error, match="403.*credentials are not allowed.*not retried") as loading:
                await eng.load("s3://some-bucket/ckpt")
            return saving.value, loading.value

    t0 = time.monotonic()
    saving, loading = run(main())
    assert time.monotonic() - t0 < 20  # eight attempts with back-off would take longer
    assert saving.code == "InvalidAccessKeyId" and saving.attempts == 1 and loading.attempts == 1


def test_an_unreachable_endpoint_fails_with_the_endpoint_named(bucket):
    from asyncckpt.testing import free_port
    from asyncckpt.testing.emulators import KEY, REGION, SECRET

    opts = {"key": KEY, "secret": SECRET, "endpoint_url": f"http://127.0.0.1:{free_port()}",
            "client_kwargs": {"region_name": REGION}, "retry": {"attempts": 2, "base_delay": 0.05}}

    async def main():
        async with engine(opts) as eng:
            with pytest.raises(S3Error, match=rf"s3://{bucket}.*after 2 attempts.*unreachable") as info:
                await (await eng.save(state(1), f"s3://{bucket}/ckpt"))
            return info.value

    t0 = time.monotonic()
    run(main())
    assert time.monotonic() - t0 < 20
