"""Google Cloud Storage (``gs://``, ``gcs://``): gcsfs awaited on the engine's loop; each shard streams through a
resumable upload, one request per staged chunk, straight from the staging buffer; one retry policy.

gcsfs retries every request itself (6 attempts, sleeps up to 32 s, not configurable); the storage turns that down to
one attempt so that `RetryPolicy` (``storage_options["retry"]``) is the only loop.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import socket
import types
from typing import Any, Awaitable, Callable, Mapping

import torch

from ..concurrency import IoRunner
from ..errors import InvalidArgumentError, StorageError
from ..format.checksum import digest
from ..format.parts import PartRules
from ..memory.buffers import as_memoryview
from ..options import RetryPolicy
from .fsspec import FsspecStorage, filesystem_options
from .retry import causes, retrying

MULTIPLE = 256 << 10  # every chunk of a resumable upload but the last is a whole multiple of 256 KiB
CONTENT_TYPE = "application/octet-stream"
HINTS = {
    401: "the credentials were refused; check token= (or the application default credentials)",
    403: "the credentials are not allowed to do this on this bucket/object",
    404: "the bucket does not exist (asyncckpt never creates buckets); create it or fix the URL",
}


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: what gcsfs's own retry loop retries (408, 429, 5xx, dropped connections, expired tokens),
    and timeouts."""
    from gcsfs.retry import is_retriable

    for current in causes(exc):
        if isinstance(current, (FileNotFoundError, PermissionError)):
            return False
        if is_retriable(current) or isinstance(current, (ConnectionError, TimeoutError, asyncio.TimeoutError,
                                                          socket.timeout)):
            return True
    return False


def failure(exc: BaseException, op: str, where: str, attempts: int, seconds: float, transient: bool) -> StorageError:
    """The StorageError that reports ``exc``: gcsfs's own words, and what to do about it."""
    code = str(getattr(exc, "code", ""))  # an HttpError's status, an int or a str
    detail = str(exc).strip() or type(exc).__name__
    # gcsfs raises a bare OSError("Forbidden: ...") for a 403
    status = int(code) if code.isdigit() else 403 if detail.startswith("Forbidden") else None
    what = f"HTTP {status}" if status is not None else type(exc).__name__
    if transient:
        msg = (f"GCS {op} on {where} kept failing ({what}: {detail}) after {attempts} attempts over {seconds:.1f}s; "
               "the store is throttling or unreachable — retry later or raise RetryPolicy.attempts")
    else:
        hint = HINTS.get(status, "") if status is not None else ""
        msg = f"GCS {op} on {where} failed: {what}: {detail}" + (f" — {hint}" if hint else "") + " (not retried)"
    return StorageError(msg, operation=op, code=None if status is None else str(status), attempts=attempts)


class GCSStorage(FsspecStorage):
    """gcsfs awaited on the engine loop, with resumable shard uploads and one retry policy."""

    part_rules = PartRules(multiple=MULTIPLE)

    def __init__(self, fs: Any, io: IoRunner, retry: RetryPolicy | None = None) -> None:
        super().__init__(fs, io)
        self.retry = retry or RetryPolicy()
        self._buckets_checked: set[str] = set()

    @classmethod
    def create(cls, protocol: str, storage_options: Mapping[str, Any] | None, io: IoRunner) -> "GCSStorage":
        """An async ``GCSFileSystem`` from ``storage_options`` (plus ``retry``), bound to the running loop."""
        import gcsfs

        retry = RetryPolicy.coerce((storage_options or {}).get("retry"))
        options = filesystem_options(storage_options)
        options.update(asynchronous=True, skip_instance_cache=True)
        fs = gcsfs.GCSFileSystem(**options)
        # one attempt per request: gcsfs's retry decorator wraps _request (see the module docstring)
        fs._request = types.MethodType(inspect.unwrap(type(fs)._request), fs)
        return cls(fs, io, retry)

    def where(self, path: Any) -> str:
        return f"gs://{path}" if isinstance(path, str) else "gs://?"

    def bucket_and_key(self, path: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(path)
        return bucket, key

    async def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return await self.request(name, args[0] if args else None,
                                  lambda: FsspecStorage.call(self, name, *args, **kwargs))

    async def request(self, op: str, path: Any, fn: Callable[[], Awaitable[Any]],
                      policy: RetryPolicy | None = None) -> Any:
        """``await fn()`` (one GCS request), retried per the policy; ``op`` and ``path`` name it in errors."""
        where = self.where(path)
        return await retrying(f"{op} on {where}", fn, policy or self.retry, transient=is_transient,
                              passes=lambda exc: isinstance(exc, FileNotFoundError),
                              fail=lambda exc, n, s, t: failure(exc, op, where, n, s, t))

    def default_shard_bytes(self, chunk_bytes: int) -> int:
        """One chunk per shard: shards upload and load concurrently as separate objects."""
        return chunk_bytes

    async def open_sink(self, path: str, nbytes: int, fsync: bool, chunk_bytes: int) -> "GCSSink":
        return GCSSink(self, path, nbytes, chunk_bytes)

    async def makedirs(self, path: str, fsync: bool) -> bool:
        """Prefixes need no creating; check once that the bucket exists (gcsfs would silently create it)."""
        bucket, _ = self.bucket_and_key(path)
        if bucket not in self._buckets_checked:
            try:
                await self.request("get_bucket", bucket,
                                   lambda: self.fs._call("GET", "b/{}", bucket, json_out=True))
            except FileNotFoundError:
                raise StorageError(f"GCS get_bucket on gs://{bucket} failed: HTTP 404 — {HINTS[404]}",
                                   operation="get_bucket", code="404") from None
            except StorageError as exc:
                if exc.code != "403":  # writers may lack storage.buckets.get
                    raise
            self._buckets_checked.add(bucket)
        return False

    async def close(self) -> None:
        """Close the HTTP session created on this engine's loop (it would otherwise die with the loop, noisily)."""
        session = getattr(self.fs, "_session", None)
        if session is not None and not session.closed:
            await session.close()


class GCSSink:
    """One shard written as a resumable upload: each chunk is sent, in order, from its staging buffer (no copy);
    the last one completes the object. Nothing is visible under the name before that."""

    ordered = True

    def __init__(self, storage: GCSStorage, path: str, nbytes: int, chunk_bytes: int) -> None:
        if nbytes > chunk_bytes and chunk_bytes % MULTIPLE:
            raise InvalidArgumentError(f"gs://{path}: chunks of {chunk_bytes} bytes are not whole multiples of "
                                       f"{MULTIPLE} bytes, which GCS resumable uploads need; change chunk_bytes")
        self.storage, self.path, self.nbytes = storage, path, nbytes
        self.location: Any = None  # the resumable upload's session URI
        self.stored: int | None = None  # the object's size, from the reply that completed it
        self.completed = False

    async def write(self, offset: int, data: torch.Tensor, nbytes: int) -> str:
        from gcsfs.core import initiate_upload, upload_chunk

        view = as_memoryview(data)[:nbytes]  # staging buffers are rounded up to whole pages
        sig = await self.storage.io.cpu(digest, view)
        if not nbytes:
            return sig
        fs, (bucket, key) = self.storage.fs, self.storage.bucket_and_key(self.path)
        if self.location is None:
            # shielded: a cancelled initiate would leave a session nobody knows the URI of (bounded by io_timeout)
            with self.storage.io.shielded() as scope:
                location = await self.storage.request("initiate_upload", self.path,
                                                      lambda: self._limited(initiate_upload(fs, bucket, key)))
            if scope.cancelled_caught:
                raise TimeoutError("initiate_upload")
            self.location = location
        reply = await self.storage.request(
            "upload_chunk", self.path,
            lambda: self._limited(upload_chunk(fs, self.location, view, offset, self.nbytes, CONTENT_TYPE)))
        if offset + nbytes == self.nbytes:
            self.stored = int(reply["size"]) if isinstance(reply, dict) and "size" in reply else None
            self.completed = True
        return sig

    async def _limited(self, request: Awaitable[Any]) -> Any:
        async with self.storage.io.limiter:
            return await request

    async def commit(self) -> None:
        if self.nbytes == 0:
            await self.storage.call("pipe_file", self.path, b"")
            self.completed = True
        elif not self.completed:
            raise OSError(errno.EIO, "the resumable upload was not completed before the commit", self.path)
        elif self.stored != self.nbytes:
            raise OSError(errno.EIO, f"the store holds {self.stored} bytes of {self.nbytes} written", self.path)
        self.storage.fs.invalidate_cache(self.path)

    async def abort(self) -> None:
        """Cancel the upload (its bytes are dropped) or delete the completed object; never raises."""
        quick = self.storage.retry.for_cleanup()
        with self.storage.io.shielded():  # ends after io_timeout on a hung store
            try:
                if self.completed:
                    await self.storage.request("delete", self.path,
                                               lambda: FsspecStorage.call(self.storage, "rm_file", self.path), quick)
                elif self.location is not None:
                    location = self.location
                    await self.storage.request("cancel_upload", self.path,
                                               lambda: self.storage.fs._call("DELETE", location), quick)
            except Exception:  # gone already, or unreachable: an unfinished upload expires after a week
                pass
            self.location, self.completed = None, False
            self.storage.fs.invalidate_cache(self.path)
