"""S3 (and S3-compatible) storage: concurrent multipart uploads, ranged reads, one retry policy.

:class:`S3Storage` is the :class:`~asyncckpt.storage.FsspecStorage` for ``s3://`` / ``s3a://`` URLs.  Everything
still goes through s3fs — its client, credentials chain, endpoint and session handling — but

* a shard is written by :class:`S3Sink` as a multipart upload whose parts are the engine's staged chunks, uploaded
  as they arrive and concurrently (part number ``offset // chunk_bytes + 1``); the upload is completed only after
  every part is confirmed, and aborted when the save fails.  A shard of one chunk is a single PUT.
* every request (s3fs operations and the multipart calls) runs under one :class:`RetryPolicy`: transient failures
  (throttling, 5xx, connection resets, timeouts) are retried with capped exponential backoff and full jitter;
  permanent ones fail at once with an :class:`S3Error` that names the bucket, key and S3 error code.

Retrying happens once, here.  Left alone, botocore retries each request (5 attempts) and s3fs retries again around
it (5 more on throttling), so attempts multiply to 25 and the back-off is not configurable; :meth:`S3Storage.create`
turns both inner layers down to a single attempt unless ``config_kwargs["retries"]`` is given explicitly.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import random
import socket
import time
import zlib
from dataclasses import dataclass
from typing import Any

import anyio
import torch
from anyio import to_thread

from .errors import CheckpointError
from .storage import FsspecStorage, as_memoryview, digest

log = logging.getLogger(__name__)

MiB = 1 << 20
MIN_PART = 5 * MiB  # S3 rejects smaller parts, except the last one of an upload
MAX_PART = 5 << 30
MAX_PARTS = 10_000


# ---------------------------------------------------------------- retry policy

@dataclass(frozen=True)
class RetryPolicy:
    """How S3 requests are retried.

    Args:
        attempts: tries per request, the first included (1 disables retrying).
        base_delay: seconds; the sleep before retry ``i`` (from 0) is uniform in ``[0, min(max_delay,
            base_delay * 2**i)]`` ("full jitter", so many clients throttled together spread out).
        max_delay: cap of one sleep, in seconds.

    The defaults (10 attempts, 0.2 s, 20 s) ride out about a minute of throttling or an endpoint restart; the
    worst case sleeps ``sum(min(max_delay, base_delay * 2**i) for i in range(attempts - 1))`` seconds (~72 s), half
    that on average.  Pass one as ``storage_options={"retry": RetryPolicy(...)}`` (a dict of the same fields works).
    """

    attempts: int = 10
    base_delay: float = 0.2
    max_delay: float = 20.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("RetryPolicy needs attempts >= 1 and non-negative delays")

    def delay(self, retry: int) -> float:
        return random.uniform(0.0, min(self.max_delay, self.base_delay * (2 ** retry)))

    @classmethod
    def coerce(cls, value: Any) -> "RetryPolicy":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(**value)
        raise TypeError(f"storage_options['retry'] must be a RetryPolicy or a dict of its fields, not {value!r}")


class S3Error(CheckpointError):
    """An S3 request failed for good: a permanent error (credentials, permissions, missing bucket…) or a transient
    one that outlasted the retry policy.  ``bucket``, ``key``, ``operation``, ``code`` and ``attempts`` say which."""

    def __init__(self, message: str, *, bucket: str | None = None, key: str | None = None,
                 operation: str | None = None, code: str | None = None, attempts: int | None = None) -> None:
        super().__init__(message)
        self.bucket, self.key, self.operation, self.code, self.attempts = bucket, key, operation, code, attempts


# Error codes and exception types botocore's "standard" retry mode treats as transient (botocore.retries.standard).
def _botocore_transient() -> tuple[set[str], set[int], tuple[type[BaseException], ...]]:
    codes = {"RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "SlowDown", "Throttling",
             "ThrottlingException", "RequestThrottled", "TooManyRequestsException", "InternalError",
             "ServiceUnavailable", "BandwidthLimitExceeded", "RequestLimitExceeded"}
    statuses = {500, 502, 503, 504}
    types: tuple[type[BaseException], ...] = ()
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError
        from botocore.retries import standard

        codes |= set(standard.TransientRetryableChecker._TRANSIENT_ERROR_CODES)
        codes |= set(standard.ThrottledRetryableChecker._THROTTLED_ERROR_CODES)
        statuses |= set(standard.TransientRetryableChecker._TRANSIENT_STATUS_CODES)
        types += (BotoConnectionError, HTTPClientError)
    except (ImportError, AttributeError):  # private names moved: the literal sets above still cover S3
        pass
    try:
        from s3fs.core import S3_RETRYABLE_ERRORS  # timeouts, broken reads, garbled throttling responses

        types += tuple(S3_RETRYABLE_ERRORS)
    except ImportError:
        pass
    try:
        import aiohttp

        types += (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientConnectionError)
    except (ImportError, AttributeError):
        pass
    return codes, statuses, types


_TRANSIENT_CODES, _TRANSIENT_STATUSES, _TRANSIENT_TYPES = _botocore_transient()
_TRANSIENT_TYPES += (ConnectionError, TimeoutError, asyncio.TimeoutError, socket.timeout)

_HINTS = {
    "NoSuchBucket": "the bucket does not exist (asyncckpt never creates buckets); create it or fix the URL",
    "AccessDenied": "the credentials are not allowed to do this on this bucket/key",
    "403": "the credentials are not allowed to do this on this bucket/key",
    "AllAccessDisabled": "all access to this bucket is disabled",
    "InvalidAccessKeyId": "the access key is unknown to this endpoint; check key/secret and endpoint_url",
    "SignatureDoesNotMatch": "the secret key does not match the access key",
    "ExpiredToken": "the session token expired; refresh the credentials",
    "InvalidToken": "the session token is malformed or invalid",
    "PermanentRedirect": "the bucket lives in another region; set client_kwargs={'region_name': ...}",
    "AuthorizationHeaderMalformed": "the region in client_kwargs does not match the bucket's region",
    "InvalidBucketName": "the bucket name is not valid",
    "NoSuchUpload": "the multipart upload was aborted (by another process or a lifecycle rule)",
    "EntityTooSmall": "a multipart part is below the store's minimum size; raise chunk_bytes",
}


def _client_error(exc: BaseException) -> Any:
    """The botocore ClientError behind ``exc`` (s3fs re-raises them as OSError subclasses), or None."""
    seen = 0
    while exc is not None and seen < 8:
        if hasattr(exc, "response") and isinstance(getattr(exc, "response"), dict):
            return exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return None


def error_code(exc: BaseException) -> tuple[str | None, int | None]:
    """S3 error code and HTTP status of a failed request, when the server answered."""
    err = _client_error(exc)
    if err is None:
        return None, None
    code = err.response.get("Error", {}).get("Code")
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if status is None and isinstance(code, str) and code.isdigit():
        status = int(code)
    return code, status


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: throttling, server errors, dropped connections, timeouts."""
    code, status = error_code(exc)
    if code is not None or status is not None:
        return code in _TRANSIENT_CODES or status in _TRANSIENT_STATUSES
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, _TRANSIENT_TYPES) and not isinstance(exc, (FileNotFoundError, PermissionError)):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return False


def _is_missing_key(exc: BaseException) -> bool:
    """A missing object (normal control flow for callers), as opposed to a missing bucket."""
    if not isinstance(exc, FileNotFoundError):
        return False
    code, _ = error_code(exc)
    return code != "NoSuchBucket"


# ---------------------------------------------------------------- storage

class S3Storage(FsspecStorage):
    """s3fs awaited on the engine loop, with multipart shard uploads and one retry policy."""

    def __init__(self, fs: Any, limiter: anyio.CapacityLimiter, retry: RetryPolicy | None = None) -> None:
        super().__init__(fs, limiter)
        self.retry = retry or RetryPolicy()
        self._buckets_checked: set[str] = set()
        self.active_uploads: set[str] = set()  # multipart uploads this storage's sinks are writing now
        self._crc: bool | None = None

    @classmethod
    def create(cls, storage_options: dict[str, Any] | None, limiter: anyio.CapacityLimiter) -> "S3Storage":
        """An async ``S3FileSystem`` from ``storage_options`` (plus ``retry``), bound to the running loop."""
        import s3fs

        options = dict(storage_options or {})
        retry = RetryPolicy.coerce(options.pop("retry", None))
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", {"mode": "standard", "total_max_attempts": 1})  # we retry, see module doc
        # one pooled connection per concurrent request, or requests queue inside aiohttp
        config.setdefault("max_pool_connections", max(10, int(limiter.total_tokens) + 2))
        options["config_kwargs"] = config
        options.update(asynchronous=True, skip_instance_cache=True)
        fs = s3fs.S3FileSystem(**options)
        fs.retries = 1  # s3fs's own loop around each call (see module doc)
        return cls(fs, limiter, retry)

    # -------------------------------------------------------- requests with retries

    def _where(self, path: Any) -> tuple[str, str]:
        if not isinstance(path, str):
            return "?", "?"
        bucket, key, _ = self.fs.split_path(path)
        return bucket, key

    async def _retrying(self, op: str, bucket: str, key: str, fn: Any, policy: RetryPolicy | None = None) -> Any:
        policy = policy or self.retry
        t0 = time.monotonic()
        for attempt in range(1, policy.attempts + 1):
            try:
                return await fn()
            except Exception as exc:
                if _is_missing_key(exc) or isinstance(exc, (CheckpointError, ValueError, TypeError)):
                    raise
                transient = is_transient(exc)
                if transient and attempt < policy.attempts:
                    pause = policy.delay(attempt - 1)
                    log.debug("retrying %s s3://%s/%s in %.2fs (attempt %d): %r", op, bucket, key, pause, attempt,
                              exc)
                    await anyio.sleep(pause)
                    continue
                raise self._error(exc, op, bucket, key, attempt, time.monotonic() - t0, transient) from exc
        raise AssertionError("unreachable")

    @staticmethod
    def _error(exc: BaseException, op: str, bucket: str, key: str, attempts: int, seconds: float,
               transient: bool) -> S3Error:
        code, status = error_code(exc)
        if code and not code.isdigit():
            what = code
        else:
            what = type(exc).__name__ if status is None else f"HTTP {status}"
        detail = str(exc).strip() or type(exc).__name__
        where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
        if transient:
            msg = (f"S3 {op} on {where} kept failing ({what}: {detail}) after {attempts} attempts over "
                   f"{seconds:.1f}s; the store is throttling or unreachable — retry later or raise "
                   "RetryPolicy.attempts")
        else:
            hint = _HINTS.get(code or "", "")
            msg = f"S3 {op} on {where} failed: {what}: {detail}" + (f" — {hint}" if hint else "") + " (not retried)"
        return S3Error(msg, bucket=bucket, key=key, operation=op, code=code, attempts=attempts)

    async def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        bucket, key = self._where(args[0] if args else None)
        return await self._retrying(name, bucket, key, lambda: FsspecStorage.call(self, name, *args, **kwargs))

    async def request(self, op: str, *, policy: RetryPolicy | None = None, **params: Any) -> Any:
        """One S3 API call through s3fs's client (its credentials and session), retried per the policy."""
        bucket, key = params.get("Bucket", "?"), params.get("Key", "")

        async def once() -> Any:
            async with self.limiter:
                return await self.fs._call_s3(op, **params)

        return await self._retrying(op, bucket, key, once, policy)

    async def wants_crc32(self) -> bool:
        """Whether the client would add a CRC32 checksum to uploads (botocore's default, "when_supported").

        The sink then computes it in a worker thread next to its own digest and passes it as a parameter, which
        makes botocore skip computing it on the event loop; the request carries the same headers either way.
        """
        if self._crc is None:
            client = await self.fs.set_session()
            self._crc = getattr(client.meta.config, "request_checksum_calculation", None) == "when_supported"
        return self._crc

    # -------------------------------------------------------- Storage interface

    async def open_sink(self, path: str, nbytes: int, fsync: bool, chunk_bytes: int) -> "S3Sink":
        return S3Sink(self, path, nbytes, chunk_bytes)

    async def makedirs(self, path: str, fsync: bool) -> None:
        """Prefixes need no creating; check once that the bucket exists (s3fs would silently create it)."""
        bucket, _ = self._where(path)
        if bucket in self._buckets_checked:
            return
        try:
            await self.request("head_bucket", Bucket=bucket)
        except FileNotFoundError as exc:  # HEAD has no body: a missing bucket is a bare 404
            raise S3Error(f"S3 head_bucket on s3://{bucket} failed: NoSuchBucket — {_HINTS['NoSuchBucket']}",
                          bucket=bucket, operation="head_bucket", code="NoSuchBucket") from exc
        except S3Error as exc:
            if exc.code not in ("403", "AccessDenied"):  # writers without s3:ListBucket may still put objects
                raise
        self._buckets_checked.add(bucket)

    async def remove_dir(self, path: str) -> None:
        """Abort multipart uploads left under the prefix by killed saves; the prefix vanishes with its objects.

        Never deletes objects (the engine removes the checkpoint's own ones before this; s3fs's recursive ``rm``
        would take foreign objects, or the bucket itself for a bucket-root path), and never touches the uploads
        this storage is writing right now (a concurrent save of the same path).
        """
        bucket, key = self._where(path)
        prefix = key.rstrip("/") + "/" if key else ""
        try:
            listing = await self.request("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
            for upload in listing.get("Uploads", []):
                if upload["UploadId"] not in self.active_uploads and "/" not in upload["Key"][len(prefix):]:
                    await self.request("abort_multipart_upload", Bucket=bucket, Key=upload["Key"],
                                       UploadId=upload["UploadId"])
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(path)

    async def put_atomic(self, path: str, data: bytes, fsync: bool) -> None:
        bucket, key = self._where(path)
        await self.request("put_object", Bucket=bucket, Key=key, Body=data)
        self.fs.invalidate_cache(path)


# ---------------------------------------------------------------- multipart sink

class S3Sink:
    """One shard written as a multipart upload of its chunks, concurrently and in any order.

    Every chunk but the shard's last has exactly ``chunk_bytes``.  Chunks below S3's 5 MiB part minimum are gathered
    into parts of ``ceil(5 MiB / chunk_bytes)`` chunks.
    """

    ordered = False

    def __init__(self, storage: S3Storage, path: str, nbytes: int, chunk_bytes: int) -> None:
        self.storage, self.path, self.nbytes = storage, path, nbytes
        self.bucket, self.key = storage._where(path)
        if chunk_bytes > MAX_PART:
            raise S3Error(f"chunk_bytes={chunk_bytes} exceeds S3's 5 GiB part limit; lower chunk_bytes",
                          bucket=self.bucket, key=self.key)
        self.chunk = chunk_bytes
        self.per_part = max(1, math.ceil(MIN_PART / chunk_bytes))
        if self.parts_expected > MAX_PARTS:
            raise S3Error(f"a shard of {nbytes} bytes would need {self.parts_expected} multipart parts (S3 allows "
                          f"{MAX_PARTS}); raise chunk_bytes or lower shard_bytes", bucket=self.bucket, key=self.key)
        self.upload_id: str | None = None
        self._create_lock = anyio.Lock()
        self.etags: dict[int, str] = {}
        self._gather: dict[int, tuple[bytearray, list[int]]] = {}
        self.put = False  # a single PUT was sent (the object may exist)
        self.completed = False

    @property
    def parts_expected(self) -> int:
        return math.ceil(math.ceil(self.nbytes / self.chunk) / self.per_part)

    async def write(self, offset: int, data: torch.Tensor, nbytes: int) -> str:
        view = as_memoryview(data)[:nbytes]  # staging buffers are rounded up to whole pages
        crc = await self.storage.wants_crc32()
        if offset == 0 and nbytes == self.nbytes:  # the whole shard is one chunk: a plain PUT
            sig, body, checksum = await to_thread.run_sync(_digest_and_copy, view, crc)
            self.put = True
            await self.storage.request("put_object", Bucket=self.bucket, Key=self.key, Body=body, **checksum)
            self.completed = True
            return sig
        index = offset // self.chunk
        if self.per_part == 1:
            sig, body, checksum = await to_thread.run_sync(_digest_and_copy, view, crc)
            await self._upload(index + 1, body, checksum)
            return sig
        return await self._gather_chunk(index, offset, view, crc)

    async def _gather_chunk(self, index: int, offset: int, view: memoryview, crc: bool) -> str:
        """Small chunks: copy into the part's buffer; the chunk completing the part uploads it."""
        part = index // self.per_part
        start = part * self.per_part * self.chunk
        size = min(self.per_part * self.chunk, self.nbytes - start)
        if part not in self._gather:
            self._gather[part] = (bytearray(size), [0])
        buf, filled = self._gather[part]
        sig = await to_thread.run_sync(_digest_into, view, buf, offset - start)
        filled[0] += len(view)
        if filled[0] == size:
            del self._gather[part]
            body = bytes(buf)
            await self._upload(part + 1, body, await to_thread.run_sync(_crc32, body) if crc else {})
        return sig

    async def _ensure_upload(self) -> str:
        async with self._create_lock:
            if self.upload_id is None:
                # shielded: a cancelled create would leave an upload nobody knows the id of
                with anyio.CancelScope(shield=True):
                    resp = await self.storage.request("create_multipart_upload", Bucket=self.bucket, Key=self.key)
                self.upload_id = resp["UploadId"]
                self.storage.active_uploads.add(self.upload_id)
            return self.upload_id

    async def _upload(self, number: int, body: bytes, checksum: dict[str, str]) -> None:
        upload_id = await self._ensure_upload()
        resp = await self.storage.request("upload_part", Bucket=self.bucket, Key=self.key, UploadId=upload_id,
                                          PartNumber=number, Body=body, **checksum)
        self.etags[number] = resp["ETag"]

    async def commit(self) -> None:
        if self.completed:
            return
        if self.nbytes == 0 or self.upload_id is None:  # empty shard, or nothing written (cannot happen)
            await self.storage.request("put_object", Bucket=self.bucket, Key=self.key, Body=b"")
            self.put = self.completed = True
            return
        if len(self.etags) != self.parts_expected:
            raise S3Error(f"s3://{self.bucket}/{self.key}: {len(self.etags)} of {self.parts_expected} parts were "
                          "uploaded before the commit", bucket=self.bucket, key=self.key)
        parts = [{"PartNumber": k, "ETag": v} for k, v in sorted(self.etags.items())]
        try:
            await self.storage.request("complete_multipart_upload", Bucket=self.bucket, Key=self.key,
                                       UploadId=self.upload_id, MultipartUpload={"Parts": parts})
        except S3Error as exc:
            # a retried complete whose first attempt succeeded (its reply was lost) finds the upload gone
            if exc.code != "NoSuchUpload" or not await self._exists_with_size():
                raise
        self.completed = True
        self.storage.active_uploads.discard(self.upload_id)
        self.storage.fs.invalidate_cache(self.path)

    async def _exists_with_size(self) -> bool:
        try:
            head = await self.storage.request("head_object", Bucket=self.bucket, Key=self.key)
        except (FileNotFoundError, S3Error):
            return False
        return head.get("ContentLength") == self.nbytes

    async def abort(self) -> None:
        """Abort the upload (its parts are dropped) and delete the object if it was completed; never raises."""
        quick = RetryPolicy(attempts=min(self.storage.retry.attempts, 4), base_delay=self.storage.retry.base_delay,
                            max_delay=min(self.storage.retry.max_delay, 2.0))
        with anyio.CancelScope(shield=True):
            if self.upload_id is not None and not self.completed:
                try:
                    await self.storage.request("abort_multipart_upload", Bucket=self.bucket, Key=self.key,
                                               UploadId=self.upload_id, policy=quick)
                except FileNotFoundError:
                    pass
                except Exception as exc:
                    log.warning("could not abort the multipart upload of s3://%s/%s: %s", self.bucket, self.key, exc)
            if self.put or self.completed:
                try:
                    await self.storage.request("delete_object", Bucket=self.bucket, Key=self.key, policy=quick)
                except Exception as exc:
                    log.warning("could not delete s3://%s/%s: %s", self.bucket, self.key, exc)
            self._gather.clear()
            if self.upload_id is not None:
                self.storage.active_uploads.discard(self.upload_id)
            self.storage.fs.invalidate_cache(self.path)


def _crc32(data: bytes | memoryview) -> dict[str, str]:
    """Upload parameters carrying the CRC32 checksum botocore would otherwise compute on the event loop."""
    value = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    return {"ChecksumAlgorithm": "CRC32", "ChecksumCRC32": value}


def _digest_and_copy(view: memoryview, crc: bool) -> tuple[str, bytes, dict[str, str]]:
    """Our digest, the request body, and its S3 checksum: all the CPU work of one upload, off the loop."""
    return digest(view), bytes(view), _crc32(view) if crc else {}


def _digest_into(view: memoryview, buf: bytearray, at: int) -> str:
    buf[at:at + len(view)] = view
    return digest(view)
