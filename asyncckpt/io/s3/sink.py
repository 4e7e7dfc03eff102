"""One shard written as a multipart upload of its staged chunks, concurrently and in any order."""

from __future__ import annotations

import base64
import io
import logging
import math
import zlib
from typing import TYPE_CHECKING

import anyio
import torch

from ...errors import S3Error
from ...format.checksum import digest
from ...memory.buffers import as_memoryview

if TYPE_CHECKING:
    from .storage import S3Storage

log = logging.getLogger("asyncckpt.s3")

MiB = 1 << 20
MIN_PART = 5 * MiB  # S3 rejects smaller parts, except the last one of an upload
MAX_PART = 5 << 30
MAX_PARTS = 10_000


class S3Sink:
    """One shard written as a multipart upload of its chunks, concurrently and in any order.

    Every chunk but the shard's last has exactly ``chunk_bytes``.  Chunks below S3's 5 MiB part minimum are gathered
    into parts of ``ceil(5 MiB / chunk_bytes)`` chunks.  A shard of one part is a single PUT.
    """

    ordered = False

    def __init__(self, storage: S3Storage, path: str, nbytes: int, chunk_bytes: int) -> None:
        self.storage, self.path, self.nbytes = storage, path, nbytes
        self.bucket, self.key = storage.bucket_and_key(path)
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
            sig, checksum = await self.storage.io.cpu(_digests, view, crc)
            await self._put(_Body(view), checksum)
            return sig
        index = offset // self.chunk
        if self.per_part == 1:
            sig, checksum = await self.storage.io.cpu(_digests, view, crc)
            await self._upload(index + 1, _Body(view), checksum)
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
        sig = await self.storage.io.cpu(_digest_into, view, buf, offset - start)
        filled[0] += len(view)
        if filled[0] == size:
            del self._gather[part]
            body = _Body(memoryview(buf))
            checksum = await self.storage.io.cpu(_crc32, buf) if crc else {}
            if self.parts_expected == 1:  # the whole shard in one part: a plain PUT
                await self._put(body, checksum)
            else:
                await self._upload(part + 1, body, checksum)
        return sig

    async def _put(self, body: io.BytesIO, checksum: dict[str, str]) -> None:
        self.put = True
        await self.storage.request("put_object", Bucket=self.bucket, Key=self.key, Body=body, **checksum)
        self.completed = True

    async def _ensure_upload(self) -> str:
        async with self._create_lock:
            if self.upload_id is None:
                # shielded: a cancelled create would leave an upload nobody knows the id of (bounded by io_timeout)
                with self.storage.io.shielded() as scope:
                    resp = await self.storage.request("create_multipart_upload", Bucket=self.bucket, Key=self.key)
                if scope.cancelled_caught:
                    raise TimeoutError("create_multipart_upload")
                self.upload_id = resp["UploadId"]
                self.storage.active_uploads.add(self.upload_id)
            return self.upload_id

    async def _upload(self, number: int, body: io.BytesIO, checksum: dict[str, str]) -> None:
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
        quick = self.storage.retry.for_cleanup()
        with self.storage.io.shielded():  # ends after io_timeout on a hung store
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


class _Body(io.BytesIO):
    """A request body read straight from bytes the sink holds (a staging chunk, a gathered part): no copy of them.

    aiobotocore hands a ``BytesIO`` to aiohttp, which sends it in slices it reads one after another; these slices
    are views of the bytes, so the kernel's copy into the socket is the only one (a copy into a fresh buffer cost
    more CPU than the request's checksums). The bytes stay as they are while the request runs: the sink awaits it.
    """

    def __init__(self, data: memoryview) -> None:
        super().__init__()
        self._data, self._pos = data, 0

    def read(self, size: int | None = -1) -> memoryview:  # type: ignore[override]
        end = len(self._data) if size is None or size < 0 else min(len(self._data), self._pos + size)
        piece, self._pos = self._data[self._pos:end], max(self._pos, end)
        return piece

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._data)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def getbuffer(self) -> memoryview:
        return self._data[:]  # a view of its own: callers release what they get

    def getvalue(self) -> bytes:
        return bytes(self._data)


def _digests(view: memoryview, crc: bool) -> tuple[str, dict[str, str]]:
    """Our digest and the request's S3 checksum: all the CPU work of one upload, off the loop."""
    return digest(view), _crc32(view) if crc else {}


def _digest_into(view: memoryview, buf: bytearray, at: int) -> str:
    buf[at:at + len(view)] = view
    return digest(view)
