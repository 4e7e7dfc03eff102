"""Azure Blob Storage (``az://``, ``abfs://``, ``abfss://``): adlfs awaited on the engine's loop; each shard is a
block blob whose blocks are the staged chunks, staged as they arrive, concurrently and straight from the staging
buffer, then committed as one block list; one retry policy.

The Azure SDK retries every request itself (3 retries, sleeps from 15 s up); the storage rebuilds adlfs's client
with ``retry_total=0`` so that `RetryPolicy` (``storage_options["retry"]``) is the only loop.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import socket
import uuid
import weakref
from typing import Any, Awaitable, Callable, Mapping

import torch

from ..concurrency import IoRunner
from ..errors import StorageError
from ..format.checksum import digest
from ..format.parts import PartRules
from ..memory.buffers import as_memoryview
from ..options import RetryPolicy
from .fsspec import FsspecStorage, filesystem_options
from .retry import causes, retrying

MiB = 1 << 20
MAX_BLOCK = 4000 * MiB
MAX_BLOCKS = 50_000
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
HINTS = {
    "ContainerNotFound": "the container does not exist (asyncckpt never creates containers); create it or fix the URL",
    "AuthenticationFailed": "the account key, SAS token or credential was refused; check them and the account name",
    "AuthorizationFailure": "the credentials are not allowed to do this on this container/blob",
    "AuthorizationPermissionMismatch": "the credentials are not allowed to do this on this container/blob",
    "InvalidBlockList": "a staged block went missing (another writer of the same blob, or 7 days passed)",
    "RequestBodyTooLarge": "a block is over Azure's 4000 MiB limit; lower chunk_bytes",
}


def _status(exc: BaseException) -> tuple[str | None, int | None]:
    """The Azure error code and HTTP status of a failed request, when the service answered."""
    for current in causes(exc):
        status = getattr(current, "status_code", None)
        if isinstance(status, int):
            return getattr(current, "error_code", None), status
    return None, None


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: throttling, server errors, dropped connections, timeouts."""
    from azure.core.exceptions import ServiceRequestError, ServiceResponseError

    _, status = _status(exc)
    if status is not None:
        return status in TRANSIENT_STATUSES
    return any(isinstance(current, (ServiceRequestError, ServiceResponseError, ConnectionError, TimeoutError,
                                    asyncio.TimeoutError, socket.timeout)) for current in causes(exc))


def failure(exc: BaseException, op: str, where: str, attempts: int, seconds: float, transient: bool) -> StorageError:
    """The StorageError that reports ``exc``: the service's own words, and what to do about it."""
    code, status = _status(exc)
    what = code or (f"HTTP {status}" if status is not None else type(exc).__name__)
    detail = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    if transient:
        msg = (f"Azure {op} on {where} kept failing ({what}: {detail}) after {attempts} attempts over "
               f"{seconds:.1f}s; the store is throttling or unreachable — retry later or raise RetryPolicy.attempts")
    else:
        hint = HINTS.get(code or "", "")
        msg = f"Azure {op} on {where} failed: {what}: {detail}" + (f" — {hint}" if hint else "") + " (not retried)"
    return StorageError(msg, operation=op, code=code or (None if status is None else str(status)), attempts=attempts)


class AzureStorage(FsspecStorage):
    """adlfs awaited on the engine loop, with block-list shard uploads and one retry policy."""

    part_rules = PartRules(max_part=MAX_BLOCK, max_parts=MAX_BLOCKS)

    def __init__(self, fs: Any, io: IoRunner, retry: RetryPolicy | None = None) -> None:
        super().__init__(fs, io)
        self.retry = retry or RetryPolicy()
        self._containers_checked: set[str] = set()

    @classmethod
    def create(cls, protocol: str, storage_options: Mapping[str, Any] | None, io: IoRunner) -> "AzureStorage":
        """An async ``AzureBlobFileSystem`` from ``storage_options`` (plus ``retry``), bound to the running loop."""
        import adlfs
        from azure.storage.blob.aio import BlobServiceClient

        retry = RetryPolicy.coerce((storage_options or {}).get("retry"))
        options = filesystem_options(storage_options)
        options.update(asynchronous=True, skip_instance_cache=True)
        fs = adlfs.AzureBlobFileSystem(**options)
        made = fs.service_client  # no request sent yet: nothing to close
        # the same account, endpoint and credential, without the SDK's own retries (see the module docstring)
        fs.service_client = BlobServiceClient(account_url=made.url, credential=made.credential, retry_total=0)
        return cls(fs, io, retry)

    def where(self, path: Any) -> str:
        return f"az://{path}" if isinstance(path, str) else "az://?"

    def container_and_blob(self, path: str) -> tuple[str, str]:
        container, blob, _ = self.fs.split_path(path)
        return container, blob

    async def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return await self.request(name, args[0] if args else None,
                                  lambda: FsspecStorage.call(self, name, *args, **kwargs))

    async def request(self, op: str, path: Any, fn: Callable[[], Awaitable[Any]],
                      policy: RetryPolicy | None = None) -> Any:
        """``await fn()`` (one Azure request), retried per the policy; ``op`` and ``path`` name it in errors."""
        where = self.where(path)
        return await retrying(f"{op} on {where}", fn, policy or self.retry, transient=is_transient,
                              passes=lambda exc: isinstance(exc, FileNotFoundError),
                              fail=lambda exc, n, s, t: failure(exc, op, where, n, s, t))

    def default_shard_bytes(self, chunk_bytes: int) -> int:
        """One chunk per shard: shards upload and load concurrently as separate blobs."""
        return chunk_bytes

    async def open_sink(self, path: str, nbytes: int, fsync: bool, chunk_bytes: int) -> "AzureSink":
        return AzureSink(self, path, nbytes, chunk_bytes)

    async def makedirs(self, path: str, fsync: bool) -> bool:
        """Prefixes need no creating; check once that the container exists (adlfs would silently create it)."""
        container, _ = self.container_and_blob(path)
        if container not in self._containers_checked:
            client = self.fs.service_client.get_container_client(container)
            try:
                await self.request("get_container_properties", container, client.get_container_properties)
            except StorageError as exc:
                if exc.code not in ("AuthorizationFailure", "AuthorizationPermissionMismatch", "403"):
                    raise  # writers may lack the right to read the container's properties
            self._containers_checked.add(container)
        return False

    async def close(self) -> None:
        """Close the HTTP session created on this engine's loop (it would otherwise die with the loop, noisily).

        adlfs registers exit-time finalizers that close the client through fsspec's loop, which an asynchronous
        instance does not have: each would print a RuntimeError at exit and keep the filesystem alive until then.
        Python offers no public way to find a finalizer, so they are looked up in ``weakref.finalize``'s registry."""
        await self.fs.service_client.close()
        for finalizer, info in list(getattr(weakref.finalize, "_registry", {}).items()):
            if any(arg is self.fs for arg in getattr(info, "args", ())):
                finalizer.detach()


class AzureSink:
    """One shard written as a block blob: each chunk is staged as a block, in any order and concurrently, from its
    staging buffer (no copy); the commit publishes the block list. Nothing
    is visible under the name before the commit; blocks never committed are dropped by the service (7 days)."""

    ordered = False

    def __init__(self, storage: AzureStorage, path: str, nbytes: int, chunk_bytes: int) -> None:
        self.storage, self.path, self.nbytes, self.chunk = storage, path, nbytes, chunk_bytes
        container, blob = storage.container_and_blob(path)
        self.client = storage.fs.service_client.get_blob_client(container, blob)
        self.count = max(1, -(-nbytes // chunk_bytes))
        # block ids are shared by every writer of a blob name: this sink's own prefix keeps two saves apart
        self.token = uuid.uuid4().hex[:16]
        self.staged: set[int] = set()
        self.put = False  # the block list (or an empty blob) was sent: the blob may exist
        self.completed = False

    def block_id(self, index: int) -> str:
        return base64.b64encode(f"{self.token}-{index:06d}".encode()).decode()

    async def write(self, offset: int, data: torch.Tensor, nbytes: int) -> str:
        view = as_memoryview(data)[:nbytes]  # staging buffers are rounded up to whole pages
        sig = await self.storage.io.cpu(digest, view)
        if nbytes:  # (the SDK's Put Blob takes no memoryview without a copy: one-chunk shards are one block too)
            index = offset // self.chunk
            await self._send("stage_block", lambda: self.client.stage_block(self.block_id(index), view, length=nbytes))
            self.staged.add(index)
        return sig

    async def _send(self, op: str, request: Callable[[], Awaitable[Any]], policy: RetryPolicy | None = None) -> Any:
        async def once() -> Any:
            async with self.storage.io.limiter:
                return await request()

        return await self.storage.request(op, self.path, once, policy)

    async def commit(self) -> None:
        from azure.storage.blob import BlobBlock

        if not self.completed:
            self.put = True
            if self.nbytes == 0:
                await self._send("upload_blob", lambda: self.client.upload_blob(b"", overwrite=True))
            elif len(self.staged) != self.count:
                raise OSError(errno.EIO, f"{len(self.staged)} of {self.count} blocks were staged before the commit",
                              self.path)
            else:
                blocks = [BlobBlock(block_id=self.block_id(i)) for i in range(self.count)]
                await self._send("commit_block_list", lambda: self.client.commit_block_list(blocks))
            self.completed = True
        self.storage.fs.invalidate_cache(self.path)
        size = await self.storage.size(self.path)  # one HEAD: the store holds every byte we handed it
        if size != self.nbytes:
            raise OSError(errno.EIO, f"the store holds {size} bytes of {self.nbytes} written", self.path)

    async def abort(self) -> None:
        """Delete the blob if it may have been published; staged blocks expire with no commit. Never raises."""
        quick = self.storage.retry.for_cleanup()
        with self.storage.io.shielded():  # ends after io_timeout on a hung store
            if self.put:
                try:
                    await self._send("delete_blob", self.client.delete_blob, quick)
                except Exception:  # gone already (never committed), or unreachable
                    pass
            self.put = self.completed = False
            self.staged.clear()
            self.storage.fs.invalidate_cache(self.path)
