"""asyncckpt on S3 against a real moto server: multipart saves, ranged loads, removal, latest(), retries, aborts."""

from __future__ import annotations

import json
import math
import time

import anyio
import pytest
import torch

import asyncckpt
from asyncckpt import RetryPolicy, S3Error
from asyncckpt.io.s3 import S3Storage
from asyncckpt.io.timed import TimedStorage

from asyncckpt.testing.emulators import KEY, REGION, SECRET

from ..helpers import assert_same
from .util import keys, run, uploads

MiB = 1 << 20
FAST = {"attempts": 12, "base_delay": 0.02, "max_delay": 0.2}  # retry policy for tests: many quick retries


def big_state(seed: int = 0) -> dict:
    """~24 MiB: four 6 MiB tensors (two per 12 MiB shard), small tensors, a view, and plain Python values."""
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(6 * MiB // 4, generator=g) for _ in range(4)]
    return {"w": w, "view": w[0][:1000], "bias": torch.arange(1000, dtype=torch.int64) + seed,
            "half": torch.randn(333, generator=g).half(), "step": 100 + seed, "name": f"run-{seed}"}


def engine(options: dict, **kw) -> asyncckpt.CheckpointEngine:
    kw.setdefault("chunk_bytes", 5 * MiB)
    kw.setdefault("shard_bytes", 12 * MiB + 64 * 1024)
    kw.setdefault("host_memory_budget", 64 * MiB)
    return asyncckpt.CheckpointEngine(storage_options=options, **kw)


def manifest(s3, bucket: str, prefix: str) -> dict:
    return json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/manifest.json")["Body"].read())


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("chunk_mib", [5, 1], ids=["part-per-chunk", "chunks-gathered-into-parts"])
def test_roundtrip_multipart(s3, bucket, options, chunk_mib):
    """Shards above one part are multipart uploads with one 5 MiB part per chunk (or per 5 gathered 1 MiB chunks)."""
    state = big_state()

    async def main():
        async with engine(options, chunk_bytes=chunk_mib * MiB) as eng:
            result = await (await eng.save(state, f"s3://{bucket}/ckpt"))
            assert result.shards >= 2 and result.bytes_written > 24 * MiB
            return await eng.load(f"s3://{bucket}/ckpt")

    assert_same(run(main()), state)
    doc = manifest(s3, bucket, "ckpt")
    assert sorted(keys(s3, bucket)) == sorted(["ckpt/manifest.json"] + [f"ckpt/{s['file']}" for s in doc["shards"]])
    for s in doc["shards"]:
        head = s3.head_object(Bucket=bucket, Key=f"ckpt/{s['file']}")
        assert head["ContentLength"] == s["nbytes"]
        parts = math.ceil(s["nbytes"] / (5 * MiB))
        assert parts >= 3 and head["ETag"].strip('"').endswith(f"-{parts}"), (s, head["ETag"])
    assert uploads(s3, bucket) == []


def test_single_chunk_shard_is_one_put(s3, bucket, options):
    state = {"a": torch.arange(10_000), "b": "x"}

    async def main():
        async with engine(options) as eng:
            await (await eng.save(state, f"s3://{bucket}/small"))
            return await eng.load(f"s3://{bucket}/small")

    out = run(main())
    assert torch.equal(out["a"], state["a"]) and out["b"] == "x"
    (shard,) = [k for k in keys(s3, bucket) if "shard-" in k]
    assert "-" not in s3.head_object(Bucket=bucket, Key=shard)["ETag"].strip('"')  # a plain PUT, not multipart
    assert uploads(s3, bucket) == []


def test_defaults_make_each_shard_one_put(s3, bucket, options):
    """Left unset, shard_bytes is one part on S3, and a tensor of whole chunks plus its shard header is one chunk:
    every shard is a single PUT (no multipart round trips)."""
    g = torch.Generator().manual_seed(3)
    state = {f"t{i}": torch.randn(2 * MiB, generator=g) for i in range(4)}  # 8 MiB each: one chunk
    state["step"] = 7

    async def main():
        async with asyncckpt.CheckpointEngine(storage_options=options, chunk_bytes=8 * MiB,
                                              host_memory_budget=128 * MiB) as eng:
            result = await (await eng.save(state, f"s3://{bucket}/ckpt"))
            return result, await eng.load(f"s3://{bucket}/ckpt")

    result, out = run(main())
    assert_same(out, state)
    doc = manifest(s3, bucket, "ckpt")
    assert result.shards == len(doc["shards"]) == 4
    for s in doc["shards"]:
        assert 8 * MiB < s["nbytes"] <= s["chunk_bytes"] < 8 * MiB + 64 * 1024, s  # grown by a page or so
        assert "-" not in s3.head_object(Bucket=bucket, Key=f"ckpt/{s['file']}")["ETag"].strip('"'), s
    assert uploads(s3, bucket) == []


def test_concurrent_saves_to_different_prefixes(s3, bucket, options):
    states = [big_state(i) for i in range(3)]

    async def main():
        async with engine(options, host_memory_budget=48 * MiB) as eng:
            handles = [await eng.save(st, f"s3://{bucket}/run/c{i}") for i, st in enumerate(states)]
            results = [await h for h in handles]
            loaded = []
            async with anyio.create_task_group() as tg:
                async def load(i):
                    loaded.append((i, await eng.load(f"s3://{bucket}/run/c{i}")))
                for i in range(3):
                    tg.start_soon(load, i)
            return results, dict(loaded)

    results, loaded = run(main())
    assert [r.path for r in results] == [f"s3://{bucket}/run/c{i}" for i in range(3)]
    for i, st in enumerate(states):
        assert_same(loaded[i], st)
    assert uploads(s3, bucket) == []


def test_load_uses_concurrent_ranged_reads(s3, bucket, proxy, proxy_options):
    """Each chunk is one ranged GET, several in flight at once; uploads also overlap."""
    state = big_state()

    async def main():
        async with engine(proxy_options) as eng:
            await (await eng.save(state, f"s3://{bucket}/ckpt"))
        gets_before = proxy.ranged_gets
        async with engine(proxy_options) as eng:
            out = await eng.load(f"s3://{bucket}/ckpt")
        return out, proxy.ranged_gets - gets_before

    out, ranged = run(main())
    assert_same(out, state)
    chunks = sum(math.ceil(s["nbytes"] / s["chunk_bytes"]) for s in manifest(s3, bucket, "ckpt")["shards"])
    assert ranged == chunks
    # the manifest's xxh3-64 checks every chunk read: no CRC32 of the same bytes is asked for and checked again
    assert proxy.checksum_mode_gets == 0
    assert proxy.max_inflight["GET"] >= 2 and proxy.max_inflight["PUT"] >= 2, proxy.max_inflight
    # parts carry the CRC32 botocore would add by default (computed off the loop by the sink), which S3 checks
    assert proxy.part_puts >= 6 and proxy.crc32_part_puts == proxy.part_puts


def test_checksums_follow_the_client_config(s3, bucket, proxy, proxy_options):
    """With request_checksum_calculation="when_required" (for stores that reject checksum headers) none is sent."""
    opts = dict(proxy_options, config_kwargs={"request_checksum_calculation": "when_required"})

    async def main():
        async with engine(opts) as eng:
            await (await eng.save({"x": torch.randn(3 * MiB)}, f"s3://{bucket}/ckpt"))
            return await eng.load(f"s3://{bucket}/ckpt")

    run(main())
    assert proxy.part_puts >= 2 and proxy.crc32_part_puts == 0


def test_sync_engine_on_s3(s3, bucket, options):
    state = {"x": torch.randn(3 * MiB), "k": 1}
    with asyncckpt.SyncEngine(storage_options=options, chunk_bytes=5 * MiB, host_memory_budget=64 * MiB) as eng:
        eng.save(state, f"s3://{bucket}/sync").result()
        out = eng.load(f"s3://{bucket}/sync")
    assert torch.equal(out["x"], state["x"]) and out["k"] == 1


# ---------------------------------------------------------------- options


def test_storage_options_reach_s3fs(s3, bucket, moto):
    """endpoint in client_kwargs, key/secret, anon, and the retry policy all reach the filesystem."""
    opts = {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": moto.url, "region_name": REGION},
            "retry": {"attempts": 3, "base_delay": 0.5, "max_delay": 1.0}}

    async def main():
        state = {"x": torch.arange(100)}
        async with engine(opts) as eng:
            await (await eng.save(state, f"s3://{bucket}/opts"))
            out = await eng.load(f"s3://{bucket}/opts")
            timed = eng.core.cached_target(f"s3://{bucket}/opts", None).storage
            assert isinstance(timed, TimedStorage) and timed.timeout == 600  # the default io_timeout
            storage = timed.inner
            assert isinstance(storage, S3Storage)
            assert (storage.fs.key, storage.fs.secret) == (KEY, SECRET)
            assert storage.retry == RetryPolicy(attempts=3, base_delay=0.5, max_delay=1.0)
            assert storage.fs.config_kwargs["retries"]["total_max_attempts"] == 1 and storage.fs.retries == 1
        # anon=True sends unsigned requests, which moto refuses on a private bucket: a clear, unretried error
        async with engine({"anon": True, "endpoint_url": moto.url, "retry": {"attempts": 5}}) as eng:
            with pytest.raises(S3Error, match=f"s3://{bucket}/opts.*HTTP 403.*not allowed.*not retried"):
                await eng.load(f"s3://{bucket}/opts")
        return out

    assert torch.equal(run(main())["x"], torch.arange(100))


# ---------------------------------------------------------------- removal and latest()


def test_remove_deletes_the_prefix_and_stray_uploads(s3, bucket, options):
    state = big_state()
    stray = s3.create_multipart_upload(Bucket=bucket, Key="a/shard-dead0000dead0000-00000.safetensors")

    async def main():
        async with engine(options) as eng:
            await (await eng.save(state, f"s3://{bucket}/a"))
            await (await eng.save({"keep": torch.ones(3)}, f"s3://{bucket}/b"))
            assert uploads(s3, bucket, "a/") == ["a/shard-dead0000dead0000-00000.safetensors"]
            await eng.remove(f"s3://{bucket}/a")
            assert keys(s3, bucket, "a/") == [] and uploads(s3, bucket, "a/") == []
            with pytest.raises(asyncckpt.CheckpointError, match="does not exist"):
                await eng.load(f"s3://{bucket}/a")
            await eng.remove(f"s3://{bucket}/a")  # removing twice is fine
            return await eng.load(f"s3://{bucket}/b")

    assert torch.equal(run(main())["keep"], torch.ones(3))
    assert stray["UploadId"]
    assert keys(s3, bucket, "b/")  # the neighbour is untouched


def test_latest_ignores_uncommitted_prefix(s3, bucket, options):
    async def save(step):
        async with engine(options) as eng:
            await (await eng.save({"step": step, "t": torch.full((10,), step)}, f"s3://{bucket}/run/step-{step}"))

    run(save(1))
    # a save that died halfway: shard objects and an open upload, no manifest (and it is newer)
    s3.put_object(Bucket=bucket, Key="run/step-2/shard-0123456789abcdef-00000.safetensors", Body=b"x" * 100)
    s3.create_multipart_upload(Bucket=bucket, Key="run/step-2/shard-0123456789abcdef-00001.safetensors")
    assert asyncckpt.latest(f"s3://{bucket}/run", storage_options=options) == f"s3://{bucket}/run/step-1"
    # the same storage_options as the engine's, retry policy included, work for latest()
    assert asyncckpt.latest(f"s3://{bucket}/run", storage_options=dict(options, retry=FAST)).endswith("step-1")

    async def load_uncommitted():
        async with engine(options) as eng:
            with pytest.raises(asyncckpt.IncompleteCheckpointError, match="never committed"):
                await eng.load(f"s3://{bucket}/run/step-2")

    run(load_uncommitted())
    run(save(3))
    assert asyncckpt.latest(f"s3://{bucket}/run", storage_options=options) == f"s3://{bucket}/run/step-3"


def test_latest_raises_when_the_store_fails_to_return_the_newest_manifest(s3, bucket, options, proxy,
                                                                           proxy_options):
    # a throttled read of step-2's manifest used to be skipped with a warning: latest() answered step-1, and a
    # resume went back one checkpoint without an error
    async def save(step):
        async with engine(options) as eng:
            await (await eng.save({"step": step}, f"s3://{bucket}/run/step-{step}"))

    run(save(1)), run(save(2))
    proxy.configure(1.0, ("503",), match=lambda m, t: m == "GET" and "step-2/manifest.json" in t)
    with pytest.raises(S3Error, match="SlowDown"):
        asyncckpt.latest(f"s3://{bucket}/run", storage_options=dict(proxy_options, retry=FAST))
    proxy.configure(0.0)
    assert asyncckpt.latest(f"s3://{bucket}/run", storage_options=proxy_options) == f"s3://{bucket}/run/step-2"


def test_remove_aborts_uploads_under_a_path_that_holds_no_object(s3, bucket, options):
    s3.create_multipart_upload(Bucket=bucket, Key="c/shard-dead0000dead0000-00000.safetensors")  # killed save

    async def main():
        async with engine(options) as eng:
            await eng.remove(f"s3://{bucket}/c")

    run(main())
    assert uploads(s3, bucket, "c/") == []  # it used to return at once: nothing listed under the prefix


# ---------------------------------------------------------------- faults


def test_transient_faults_are_retried(s3, bucket, proxy, proxy_options, caplog):
    """Throttling, 500s, resets and cut-off replies on a quarter of all requests: saves and loads still succeed;
    each retry is a WARNING of the ``asyncckpt`` logger, the committed save an INFO."""
    caplog.set_level("INFO", logger="asyncckpt")
    state = big_state()
    opts = dict(proxy_options, retry=FAST)

    async def main():
        async with engine(opts) as eng:
            proxy.configure(0.25, ("503", "500", "reset"))
            await (await eng.save(state, f"s3://{bucket}/ckpt"))
            out = await eng.load(f"s3://{bucket}/ckpt")
            proxy.configure(0.3, ("truncate", "reset", "503"), match=lambda m, t: m == "GET")
            again = await eng.load(f"s3://{bucket}/ckpt")
            proxy.configure(0.0)
            return out, again

    out, again = run(main())
    assert_same(out, state)
    assert_same(again, state)
    assert sum(proxy.injected.values()) >= 5 and proxy.injected["truncate"] >= 1, proxy.injected
    assert uploads(s3, bucket) == []
    retries = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "retrying" in r.getMessage()]
    assert retries and all(f"s3://{bucket}/" in m and " of 12)" in m for m in retries), retries
    assert any(r.levelname == "INFO" and r.getMessage().startswith(f"saved s3://{bucket}/ckpt: ")
               for r in caplog.records), [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("shard_bytes", [12 * MiB + 64 * 1024, None], ids=["multipart", "one-put-per-shard"])
def test_a_request_sent_again_sends_its_whole_body(s3, bucket, proxy, proxy_options, shard_bytes):
    """An upload that reached the store but whose answer was lost is sent again from its first byte (its body is
    a file object, which a retry must rewind): the checkpoint holds every byte."""
    state = big_state(3)

    async def main():
        async with engine(dict(proxy_options, retry=FAST), shard_bytes=shard_bytes) as eng:
            proxy.configure(0.5, ("truncate",), match=lambda m, t: m == "PUT" and "manifest" not in t)
            await (await eng.save(state, f"s3://{bucket}/ckpt"))
            proxy.configure(0.0)
            return await eng.load(f"s3://{bucket}/ckpt")

    assert_same(run(main()), state)
    assert proxy.injected["truncate"] >= 2, proxy.injected


def test_failures_that_never_stop_commit_nothing(s3, bucket, proxy, proxy_options):
    """Every part upload is throttled forever: the save fails naming the key, and leaves no object or upload."""
    state = big_state()
    opts = dict(proxy_options, retry={"attempts": 3, "base_delay": 0.01, "max_delay": 0.05})
    proxy.configure(1.0, ("503",), match=lambda m, t: m == "PUT" and "partNumber=" in t)

    async def main():
        async with engine(opts) as eng:
            handle = await eng.save(state, f"s3://{bucket}/ckpt")
            t0 = time.monotonic()
            with pytest.raises(asyncckpt.CheckpointError) as info:
                await handle
            return info.value, time.monotonic() - t0

    error, seconds = run(main())
    assert isinstance(error, S3Error)
    message = str(error)
    assert f"save to s3://{bucket}/ckpt failed" in message and "kept failing" in message and "SlowDown" in message
    assert f"s3://{bucket}/ckpt/shard-" in message and "after 3 attempts" in message
    assert seconds < 10
    assert keys(s3, bucket) == []  # no manifest, no shard objects
    assert uploads(s3, bucket) == []  # every multipart upload aborted


def test_permanent_error_fails_fast(s3, bucket, proxy, proxy_options):
    """AccessDenied is not retried: one request, then a clear error."""
    opts = dict(proxy_options, retry={"attempts": 8, "base_delay": 0.5, "max_delay": 1.0})
    proxy.configure(1.0, ("403",), match=lambda m, t: m == "PUT" and "partNumber=" in t)

    async def main():
        async with engine(opts, write_concurrency=1) as eng:
            handle = await eng.save({"x": torch.randn(3 * MiB)}, f"s3://{bucket}/ckpt")  # 12 MiB: 3 parts
            with pytest.raises(S3Error, match="AccessDenied") as info:
                await handle
            return info.value

    t0 = time.monotonic()
    error = run(main())
    assert time.monotonic() - t0 < 5
    assert proxy.injected["403"] == 1
    assert "not retried" in str(error) and f"s3://{bucket}/ckpt/shard-" in str(error)
    assert f"save to s3://{bucket}/ckpt failed" in str(error)
    # the S3 details survive the trip from the background task to the handle
    assert (error.code, error.bucket, error.operation, error.attempts) == ("AccessDenied", bucket, "upload_part", 1)
    assert error.key.startswith("ckpt/shard-") and isinstance(error.__cause__, S3Error)
    assert keys(s3, bucket) == [] and uploads(s3, bucket) == []


def test_cancelled_save_leaves_all_or_nothing(s3, bucket, options):
    """Closing the engine by cancellation mid-upload aborts the multipart uploads: a committed checkpoint or none."""
    state = big_state()

    async def main():
        with anyio.CancelScope() as scope:
            async with engine(options) as eng:
                await eng.save(state, f"s3://{bucket}/ckpt")
                while not await anyio.to_thread.run_sync(uploads, s3, bucket):  # parts are on their way
                    await anyio.sleep(0.01)
                scope.cancel()
                await anyio.sleep(30)
        assert scope.cancelled_caught

    run(main())
    if "ckpt/manifest.json" in keys(s3, bucket):  # the commit won the race: it must be whole
        async def load():
            async with engine(options) as eng:
                return await eng.load(f"s3://{bucket}/ckpt")
        assert_same(run(load()), state)
    else:
        assert keys(s3, bucket) == []
    assert uploads(s3, bucket) == []


def test_missing_bucket_is_a_clear_error_and_is_not_created(s3, options):
    async def main():
        async with engine(options) as eng:
            with pytest.raises(S3Error, match="no-such-bucket-4ckpt.*NoSuchBucket"):
                await (await eng.save({"x": torch.ones(4)}, "s3://no-such-bucket-4ckpt/ckpt"))
            with pytest.raises(S3Error, match="no-such-bucket-4ckpt.*NoSuchBucket"):
                await eng.load("s3://no-such-bucket-4ckpt/ckpt")

    run(main())
    assert "no-such-bucket-4ckpt" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]
