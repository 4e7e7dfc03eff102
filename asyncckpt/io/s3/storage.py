"""The S3 backend: s3fs awaited on the engine's loop, with multipart shard uploads and one retry policy."""

from __future__ import annotations

from typing import Any, Mapping

from ...concurrency import IoRunner
from ...errors import S3Error
from ...format.parts import PartRules
from ...options import RetryPolicy
from ..fsspec import FsspecStorage, filesystem_options
from .reader import S3Reader
from .retry import HINTS, retrying
from .sink import MAX_PART, MAX_PARTS, MIN_PART, S3Sink


class S3Storage(FsspecStorage):
    """s3fs awaited on the engine loop, with multipart shard uploads and one retry policy."""

    part_rules = PartRules(min_part=MIN_PART, max_part=MAX_PART, max_parts=MAX_PARTS)

    def __init__(self, fs: Any, io: IoRunner, retry: RetryPolicy | None = None) -> None:
        super().__init__(fs, io)
        self.retry = retry or RetryPolicy()
        self._buckets_checked: set[str] = set()
        self.active_uploads: set[str] = set()  # multipart uploads this storage's sinks are writing now
        self._crc: bool | None = None
        self._client: Any = None

    @classmethod
    def create(cls, protocol: str, storage_options: Mapping[str, Any] | None, io: IoRunner) -> "S3Storage":
        """An async ``S3FileSystem`` from ``storage_options`` (plus ``retry``), bound to the running loop."""
        import s3fs

        retry = RetryPolicy.coerce((storage_options or {}).get("retry"))
        options = filesystem_options(storage_options)
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", {"mode": "standard", "total_max_attempts": 1})  # we retry (see .retry)
        # one pooled connection per concurrent request, or requests queue inside aiohttp
        config.setdefault("max_pool_connections", max(10, io.limit + 2))
        # every chunk a load reads is checked against the manifest's xxh3-64: botocore checking a CRC32 of the
        # same bytes again (its default since 1.36) only costs CPU. Uploads keep their CRC32 (see wants_crc32).
        config.setdefault("response_checksum_validation", "when_required")
        options["config_kwargs"] = config
        options.update(asynchronous=True, skip_instance_cache=True)
        fs = s3fs.S3FileSystem(**options)
        fs.retries = 1  # s3fs's own loop around each call (see .retry)
        return cls(fs, io, retry)

    def bucket_and_key(self, path: Any) -> tuple[str, str]:
        if not isinstance(path, str):
            return "?", "?"
        bucket, key, _ = self.fs.split_path(path)
        return bucket, key

    # -------------------------------------------------------- requests with retries

    async def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        bucket, key = self.bucket_and_key(args[0] if args else None)
        return await retrying(name, bucket, key, lambda: FsspecStorage.call(self, name, *args, **kwargs), self.retry)

    async def request(self, op: str, *, policy: RetryPolicy | None = None, **params: Any) -> Any:
        """One S3 API call through s3fs's client (its credentials and session), retried per the policy."""
        bucket, key = params.get("Bucket", "?"), params.get("Key", "")

        body = params.get("Body")

        async def once() -> Any:
            if hasattr(body, "seek"):  # a file-like body is sent from where it stands: every attempt from its start
                body.seek(0)
            async with self.io.limiter:
                return await self.fs._call_s3(op, **params)

        return await retrying(op, bucket, key, once, policy or self.retry)

    async def client(self) -> Any:
        """s3fs's aiobotocore client, created on first use."""
        if self._client is None:
            self._client = await self.fs.set_session()
        return self._client

    async def wants_crc32(self) -> bool:
        """Whether the client would add a CRC32 checksum to uploads (botocore's default, "when_supported").

        The sink then computes it in a worker thread next to its own digest and passes it as a parameter, which
        makes botocore skip computing it on the event loop; the request carries the same headers either way.
        """
        if self._crc is None:
            client = await self.client()
            self._crc = getattr(client.meta.config, "request_checksum_calculation", None) == "when_supported"
        return self._crc

    # -------------------------------------------------------- Storage interface

    def default_shard_bytes(self, chunk_bytes: int) -> int:
        """One part per shard: each shard is a single PUT (no multipart round trips), and shards upload and load
        concurrently as separate objects."""
        return self.part_rules.part_bytes(chunk_bytes)

    async def open_sink(self, path: str, nbytes: int, fsync: bool, chunk_bytes: int) -> S3Sink:
        return S3Sink(self, path, nbytes, chunk_bytes)

    async def open_reader(self, path: str, shared: bool = False) -> S3Reader:
        return S3Reader(self, path)

    async def makedirs(self, path: str, fsync: bool) -> bool:
        """Prefixes need no creating; check once that the bucket exists (s3fs would silently create it)."""
        bucket, _ = self.bucket_and_key(path)
        if bucket in self._buckets_checked:
            return False
        try:
            await self.request("head_bucket", Bucket=bucket)
        except FileNotFoundError as exc:  # HEAD has no body: a missing bucket is a bare 404
            raise S3Error(f"S3 head_bucket on s3://{bucket} failed: NoSuchBucket — {HINTS['NoSuchBucket']}",
                          bucket=bucket, operation="head_bucket", code="NoSuchBucket") from exc
        except S3Error as exc:
            if exc.code not in ("403", "AccessDenied"):  # writers without s3:ListBucket may still put objects
                raise
        self._buckets_checked.add(bucket)
        return False

    async def remove_dir(self, path: str) -> None:
        """Abort multipart uploads left under the prefix by killed saves; the prefix vanishes with its objects.

        Never deletes objects (the engine removes the checkpoint's own ones before this; s3fs's recursive ``rm``
        would take foreign objects, or the bucket itself for a bucket-root path), and never touches the uploads
        this storage is writing right now (a concurrent save of the same path).
        """
        bucket, key = self.bucket_and_key(path)
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
        bucket, key = self.bucket_and_key(path)
        await self.request("put_object", Bucket=bucket, Key=key, Body=data)
        self.fs.invalidate_cache(path)

    async def close(self) -> None:
        """Close the HTTP session created on this engine's loop (it would otherwise die with the loop, noisily)."""
        client = self._client or getattr(self.fs, "_s3", None)  # s3fs keeps the client it made for a request there
        self._client = None
        if client is not None:
            try:
                await client.close()
            except Exception:  # best effort: the session goes with the loop anyway
                pass
