"""Google Cloud Storage (gcsfs on gcp-storage-emulator) and Azure Blob Storage (adlfs on Azurite) through the engine:
save, load in place, remove, ``latest``, retries, permanent errors, damaged objects, and host memory while a shard
larger than the budget streams out. Every store is inspected through its emulator, independently of the code under
test; faults come from a real proxy in front of the emulator."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import asyncckpt
from asyncckpt import CheckpointError, CorruptCheckpointError, StorageError
from asyncckpt.testing.emulators import AZURITE_ACCOUNT

from ..helpers import assert_same
from ..s3.faultproxy import FaultProxy

MiB = 1 << 20
FAST = {"attempts": 12, "base_delay": 0.02, "max_delay": 0.2}  # many quick retries


@dataclass
class Store:
    """One bucket (GCS) or container (Azure) of an emulator, with a view of it that bypasses asyncckpt."""

    scheme: str
    bucket: str
    server: Any
    client: Any = None

    def url(self, *names: str) -> str:
        return "/".join([f"{self.scheme}://{self.bucket}", *names])

    def options(self, proxy: FaultProxy | None = None, **extra: Any) -> dict[str, Any]:
        if proxy is None:
            endpoint = None
        else:
            endpoint = proxy.url if self.scheme == "gs" else f"{proxy.url}/{AZURITE_ACCOUNT}"
        return {**self.server.options(endpoint), **extra}

    def names(self, prefix: str = "") -> list[str]:
        if self.scheme == "gs":
            return self.server.names(self.bucket, prefix)
        return sorted(self.client.get_container_client(self.bucket).list_blob_names(name_starts_with=prefix))

    def get(self, name: str) -> bytes:
        if self.scheme == "gs":
            return self.server.get(self.bucket, name)
        return self.client.get_blob_client(self.bucket, name).download_blob().readall()

    def put(self, name: str, data: bytes) -> None:
        if self.scheme == "gs":
            self.server.put(self.bucket, name, data)
        else:
            self.client.get_blob_client(self.bucket, name).upload_blob(data, overwrite=True)


@pytest.fixture(params=["gcs", "azure"])
def store(request: pytest.FixtureRequest) -> Store:
    if request.param == "gcs":
        return Store("gs", request.getfixturevalue("gcs_bucket"), request.getfixturevalue("gcs"))
    azurite = request.getfixturevalue("azurite")
    return Store("az", request.getfixturevalue("az_container"), azurite, azurite.client())


@pytest.fixture
def proxy(store: Store) -> Iterator[FaultProxy]:
    p = FaultProxy(store.server.port).start()
    yield p
    p.stop()


def state_of(seed: int = 0) -> dict:
    """~12 MiB: two 4 MiB tensors and a 3 MiB one (several shards of several chunks), small ones, plain values."""
    g = torch.Generator().manual_seed(seed)
    return {"w": [torch.randn(MiB, generator=g), torch.randn(MiB, generator=g)],
            "v": torch.randn(3 * MiB // 4, generator=g), "bias": torch.arange(1000) + seed,
            "half": torch.randn(333, generator=g).half(), "step": seed, "name": f"run-{seed}"}


def engine(options: dict, **kw: Any) -> asyncckpt.CheckpointEngine:
    kw.setdefault("chunk_bytes", MiB)
    kw.setdefault("shard_bytes", 6 * MiB)
    kw.setdefault("host_memory_budget", 16 * MiB)
    return asyncckpt.CheckpointEngine(storage_options=options, **kw)


def shard_names(store: Store, prefix: str) -> list[str]:
    return [n for n in store.names(prefix + "/") if "/shard-" in n]


def test_save_load_in_place_and_remove(store: Store) -> None:
    state = state_of(1)
    target = {"w": [torch.zeros(MiB), torch.zeros(MiB)], "v": torch.zeros(3 * MiB // 4),
              "bias": torch.zeros(1000, dtype=torch.int64), "half": torch.zeros(333).half(), "step": -1, "name": ""}
    inside = [target["w"][0], target["v"]]

    async def main() -> Any:
        async with engine(store.options()) as eng:
            result = await (await eng.save(state, store.url("ckpt")))
            assert result.shards >= 2
            assert len(shard_names(store, "ckpt")) == result.shards
            assert store.names("ckpt/") == sorted(["ckpt/manifest.json", *shard_names(store, "ckpt")])
            loaded = await eng.load(store.url("ckpt"))
            await eng.load(store.url("ckpt"), state=target)
            await (await eng.save({"keep": torch.ones(3)}, store.url("other")))
            await eng.remove(store.url("ckpt"))
            assert store.names("ckpt/") == []
            with pytest.raises(CheckpointError, match="does not exist"):
                await eng.load(store.url("ckpt"))
            await eng.remove(store.url("ckpt"))  # removing twice is fine
            return loaded, await eng.load(store.url("other"))

    loaded, other = asyncio.run(main())
    assert_same(loaded, state)
    assert target["w"][0] is inside[0] and target["v"] is inside[1]  # restored in place
    assert torch.equal(target["w"][1], state["w"][1]) and torch.equal(target["v"], state["v"])
    assert torch.equal(target["bias"], state["bias"])
    assert torch.equal(other["keep"], torch.ones(3))  # the neighbour is untouched


def test_latest_skips_an_uncommitted_save(store: Store) -> None:
    async def save(step: int) -> None:
        async with engine(store.options()) as eng:
            await (await eng.save({"step": step, "t": torch.full((10,), step)}, store.url("run", f"step-{step}")))

    asyncio.run(save(1))
    store.put("run/step-2/shard-0123456789abcdef-00000.safetensors", b"x" * 100)  # died before its manifest
    assert asyncckpt.latest(store.url("run"), storage_options=store.options()) == store.url("run", "step-1")
    asyncio.run(save(3))
    assert asyncckpt.latest(store.url("run"), storage_options=store.options(retry=FAST)) == store.url("run", "step-3")


def test_transient_faults_are_retried(store: Store, proxy: FaultProxy) -> None:
    """503s, 500s, reset connections and replies cut off after the request was served (a chunk the store holds but
    the client never heard of, sent again) on a quarter of all requests: the save and the load still succeed."""
    state = state_of(2)

    async def main() -> Any:
        async with engine(store.options(proxy, retry=FAST)) as eng:
            proxy.configure(0.25, ("503", "500", "reset", "truncate"))
            await (await eng.save(state, store.url("ckpt")))
            out = await eng.load(store.url("ckpt"))
            proxy.configure(0.0)
            return out

    assert_same(asyncio.run(main()), state)
    assert sum(proxy.injected.values()) >= 5 and proxy.injected["truncate"] >= 1, proxy.injected
    assert store.names("ckpt/")[0] == "ckpt/manifest.json"


def test_a_permanent_error_fails_fast_and_commits_nothing(store: Store, proxy: FaultProxy) -> None:
    """403 on every upload request is not retried: one attempt, a StorageError naming the object, nothing left."""
    proxy.configure(1.0, ("403",), match=lambda method, target: method in ("PUT", "POST") and "/shard-" in target
                    or "uploadType=resumable" in target)

    async def main() -> tuple[BaseException, float]:
        async with engine(store.options(proxy, retry={"attempts": 8, "base_delay": 0.5, "max_delay": 1.0})) as eng:
            handle = await eng.save(state_of(3), store.url("ckpt"))
            t0 = time.monotonic()
            with pytest.raises(StorageError) as info:
                await handle
            return info.value, time.monotonic() - t0

    error, seconds = asyncio.run(main())
    assert "(not retried)" in str(error) and "/ckpt/shard-" in str(error) and error.attempts == 1, error
    assert seconds < 5
    assert store.names("ckpt/") == []


def test_a_missing_bucket_is_a_clear_error_and_is_not_created(store: Store) -> None:
    async def main() -> None:
        async with engine(store.options()) as eng:
            with pytest.raises(StorageError, match="does not exist") as info:
                await (await eng.save({"t": torch.ones(3)}, f"{store.scheme}://no-such-bucket-x1/ckpt"))
            assert "never creates" in str(info.value)

    asyncio.run(main())
    if store.scheme == "gs":
        assert "no-such-bucket-x1" not in [b["name"] for b in store.server._json("GET", "/storage/v1/b")["items"]]
    else:
        assert "no-such-bucket-x1" not in [c.name for c in store.client.list_containers()]


def test_a_damaged_object_fails_its_checksum(store: Store) -> None:
    state = state_of(4)

    async def save() -> None:
        async with engine(store.options()) as eng:
            await (await eng.save(state, store.url("ckpt")))

    asyncio.run(save())
    name = shard_names(store, "ckpt")[0]
    data = bytearray(store.get(name))
    data[len(data) // 2] ^= 0xFF  # one byte flipped in the tensor data, size unchanged
    store.put(name, bytes(data))

    async def load() -> None:
        async with engine(store.options()) as eng:
            with pytest.raises(CorruptCheckpointError, match="checksum"):
                await eng.load(store.url("ckpt"))

    asyncio.run(load())


def test_a_shard_larger_than_the_budget_streams_within_it(store: Store) -> None:
    """One 24 MiB shard under an 8 MiB budget: chunks go out as they are staged, from the staging buffers, so the
    memory allocated besides staging (Python objects: request bodies, copies) stays below the budget. A sink that
    gathers the shard before one upload needs three times the budget (70-120 MiB measured with the generic fsspec
    sink)."""
    budget = 8 * MiB
    state = {"big": torch.randn(6 * MiB, generator=torch.Generator().manual_seed(5))}

    async def main() -> dict:
        async with engine(store.options(), host_memory_budget=budget, shard_bytes=64 * MiB) as eng:
            await (await eng.save({"small": torch.ones(3 * MiB)}, store.url("warm")))  # the clients' lazy imports
            tracemalloc.start()
            try:
                result = await (await eng.save(state, store.url("ckpt")))
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert result.shards == 1 and result.bytes_written > 3 * budget
            assert eng.staging.allocated_bytes <= budget
            assert peak < budget, f"{peak / MiB:.1f} MiB allocated besides staging while saving"
            return await eng.load(store.url("ckpt"))

    assert torch.equal(asyncio.run(main())["big"], state["big"])
