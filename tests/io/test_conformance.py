"""The storage contract (asyncckpt/io/contract.py), checked the same way on every backend: local disk, fsspec's
``memory://`` (the generic fsspec backend, ordered sinks), S3 on the moto server (multipart sinks), GCS on
gcp-storage-emulator (resumable uploads, ordered) and Azure Blob Storage on Azurite (block lists).

A new backend joins by adding a case to ``BACKENDS``; every test here then runs against it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import xxhash

from asyncckpt import CheckpointError
from asyncckpt.concurrency import IoRunner, Runtime
from asyncckpt.io import resolve
from asyncckpt.io.contract import Storage
from asyncckpt.memory.buffers import mapped_buffer

MiB = 1 << 20
CHUNK = 5 * MiB  # S3's smallest part: every backend is driven with chunks a real store accepts


@dataclass
class Backend:
    runtime: Runtime
    storage: Storage
    root: str  # a fresh directory/prefix, the storage's own path

    def run(self, fn: Any, *args: Any) -> Any:
        return self.runtime.call(fn, *args)

    def path(self, *names: str) -> str:
        return self.storage.join(self.root, *names)


BACKENDS = ["local", "memory", "s3", "gcs", "azure"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Backend]:
    if request.param == "local":
        url, options = str(tmp_path / "root"), None
    elif request.param == "memory":
        url, options = f"memory://conformance-{uuid.uuid4().hex}", None
    elif request.param == "s3":
        bucket = request.getfixturevalue("bucket")
        url, options = f"s3://{bucket}/root", request.getfixturevalue("options")
    elif request.param == "gcs":
        url, options = f"gs://{request.getfixturevalue('gcs_bucket')}/root", request.getfixturevalue("gcs_options")
    else:
        url, options = f"az://{request.getfixturevalue('az_container')}/root", request.getfixturevalue("az_options")
    runtime = Runtime(workers=8)
    io = runtime.call(IoRunner, runtime, 4)

    async def make() -> tuple[Storage, str]:
        return resolve(url, options, io)

    storage, root = runtime.call(make)
    b = Backend(runtime, storage, root)
    b.run(storage.makedirs, root, True)
    try:
        yield b
    finally:
        runtime.call(storage.close)
        runtime.close()


def payload(nbytes: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)


def staged(data: torch.Tensor, offset: int, nbytes: int) -> torch.Tensor:
    """A staging buffer as the pipeline hands it over: page-aligned, rounded up to whole pages."""
    buf = mapped_buffer(-(-nbytes // 4096) * 4096)
    buf[:nbytes].copy_(data[offset:offset + nbytes])
    return buf


async def write_file(storage: Storage, path: str, data: torch.Tensor, order: list[int] | None = None) -> list[str]:
    """Write ``data`` through a sink in chunks (in ``order`` where the sink allows any order); commit."""
    n = data.numel()
    chunks = [(off, min(CHUNK, n - off)) for off in range(0, n, CHUNK)] or [(0, 0)]
    sink = await storage.open_sink(path, n, True, CHUNK)
    indices = order if order is not None and not sink.ordered else list(range(len(chunks)))
    digests = [""] * len(chunks)
    for i in indices:
        off, size = chunks[i]
        digests[i] = await sink.write(off, staged(data, off, size), size)
    await sink.commit()
    return digests


async def read_file(storage: Storage, path: str, nbytes: int, offset: int = 0, shared: bool = False
                    ) -> tuple[torch.Tensor, str]:
    reader = await storage.open_reader(path, shared)
    try:
        out = torch.empty(nbytes, dtype=torch.uint8)
        return out, await reader.read_into(offset, out)
    finally:
        await reader.close()


def test_sink_writes_a_whole_file_and_reports_each_chunk_digest(backend: Backend) -> None:
    data = payload(CHUNK * 2 + 12345)
    path = backend.path("shard-a")
    digests = backend.run(write_file, backend.storage, path, data, [2, 0, 1])
    assert digests == [xxhash.xxh3_64_hexdigest(data[o:o + CHUNK].numpy().tobytes())
                       for o in range(0, data.numel(), CHUNK)]
    assert backend.run(backend.storage.size, path) == data.numel()
    assert backend.run(backend.storage.kind, path) == "file"
    out, sig = backend.run(read_file, backend.storage, path, data.numel())
    assert torch.equal(out, data) and sig == xxhash.xxh3_64_hexdigest(data.numpy().tobytes())


def test_ranged_reads_and_reads_past_the_end(backend: Backend) -> None:
    data = payload(CHUNK + 100, seed=1)
    path = backend.path("shard-b")
    backend.run(write_file, backend.storage, path, data)
    out, _ = backend.run(read_file, backend.storage, path, 600, CHUNK - 500)
    assert torch.equal(out, data[CHUNK - 500:CHUNK + 100])
    out, _ = backend.run(read_file, backend.storage, path, 600, CHUNK - 500, True)  # read by other ranks too
    assert torch.equal(out, data[CHUNK - 500:CHUNK + 100])
    with pytest.raises(EOFError):
        backend.run(read_file, backend.storage, path, 1000, CHUNK)
    with pytest.raises(FileNotFoundError):
        backend.run(read_file, backend.storage, backend.path("absent"), 10)


def test_empty_file(backend: Backend) -> None:
    path = backend.path("empty")
    backend.run(write_file, backend.storage, path, torch.empty(0, dtype=torch.uint8))
    assert backend.run(backend.storage.size, path) == 0


def test_abort_leaves_nothing_and_may_repeat(backend: Backend) -> None:
    data = payload(CHUNK * 2, seed=2)
    path = backend.path("aborted")

    async def main() -> None:
        sink = await backend.storage.open_sink(path, data.numel(), True, CHUNK)
        await sink.write(0, staged(data, 0, CHUNK), CHUNK)
        await sink.abort()
        await sink.abort()

    backend.run(main)
    assert backend.run(backend.storage.size, path) is None
    assert "aborted" not in backend.run(backend.storage.list, backend.root)
    backend.run(backend.storage.remove_dir, backend.root)  # cleans up what interrupted writes left (uploads)


def test_atomic_put_replaces_and_reads_are_bounded(backend: Backend) -> None:
    path = backend.path("manifest.json")
    backend.run(backend.storage.put_atomic, path, b"old" * 10, True)
    backend.run(backend.storage.put_atomic, path, b"new", True)
    assert backend.run(backend.storage.read_bytes, path, 100) == b"new"
    with pytest.raises(CheckpointError, match="more than"):
        backend.run(backend.storage.read_bytes, path, 2)
    with pytest.raises(FileNotFoundError):
        backend.run(backend.storage.read_bytes, backend.path("none.json"), 100)


def test_whole_files_through_put_file_and_get_file(backend: Backend) -> None:
    path = backend.path("sub", "dir", "model.pt")
    backend.run(backend.storage.put_file, path, lambda f: (f.write(b"ab"), f.write(b"cd")), True)
    assert backend.run(backend.storage.get_file, path, lambda f: f.read()) == b"abcd"
    assert backend.run(backend.storage.size, path) == 4


def test_listing_kinds_and_removal(backend: Backend) -> None:
    s = backend.storage
    backend.run(s.makedirs, backend.path("ck"), True)
    for name in ("a", "b"):
        backend.run(s.put_atomic, backend.path("ck", name), name.encode(), True)
    assert sorted(backend.run(s.list, backend.path("ck"))) == ["a", "b"]
    assert sorted(backend.run(s.list, backend.root)) == ["ck"]
    assert backend.run(s.kind, backend.path("ck")) == "dir"
    assert backend.run(s.list, backend.path("nothing")) == []
    assert backend.run(s.kind, backend.path("nothing")) is None and backend.run(s.size, backend.path("x")) is None
    backend.run(s.remove, backend.path("ck", "a"))
    backend.run(s.remove, backend.path("ck", "a"))  # absent: nothing to do
    assert backend.run(s.list, backend.path("ck")) == ["b"]
    backend.run(s.remove_dir, backend.path("ck"))  # not empty: stays, files untouched
    assert backend.run(s.read_bytes, backend.path("ck", "b"), 10) == b"b"
    backend.run(s.remove, backend.path("ck", "b"))
    backend.run(s.remove_dir, backend.path("ck"))
    assert backend.run(s.kind, backend.path("ck")) is None


def test_paths_and_keys(backend: Backend) -> None:
    s = backend.storage
    assert s.key(backend.path("a")) == s.key(backend.path("a") + "/")
    assert s.key(backend.path("a")) != s.key(backend.path("b"))
