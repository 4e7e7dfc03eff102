"""Storage plugins: where shard bytes go and come from.

Two kinds cover every target: :class:`LocalStorage` for the local disk (``os.pwrite``/``os.preadv`` in worker
threads, fsync of files and directories, atomic ``os.replace``), and :class:`FsspecStorage` for any other fsspec
protocol — async filesystems (s3fs, gcsfs, …) are awaited natively on the engine's loop, sync ones run in worker
threads.  The pipeline only sees :class:`Sink` (write one file) and :class:`Reader` (read ranges of one file).

Bulk bytes on local disk use ``os.pwrite`` in worker threads rather than aiofiles: aiofiles also hops to a thread
for every call but has no positional write, so chunks of one shard could not be written concurrently, and the
benchmark (docs/benchmarks.md) shows concurrent positional writes are what reach the disk's limit.
"""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import uuid
from typing import Any, Protocol

import anyio
import fsspec
import torch
import xxhash
from anyio import to_thread

from .errors import CheckpointError
from .staging import ALIGN, aligned_size


def as_memoryview(t: torch.Tensor) -> memoryview:
    """Writable memoryview over a contiguous uint8 host tensor; the view keeps the tensor alive."""
    n = t.numel()
    if n == 0:
        return memoryview(bytearray())
    array = (ctypes.c_ubyte * n).from_address(t.data_ptr())
    array.owner = t  # type: ignore[attr-defined]
    return memoryview(array).cast("B")


def alias(region: torch.Tensor) -> torch.Tensor:
    """A uint8 tensor over ``region``'s bytes with a storage of its own (no copy).

    Tensors cut from one big buffer otherwise share its storage, which serializers take for real sharing:
    ``torch.save`` writes the whole buffer and refuses differently-typed views of it, safetensors refuses it.
    """
    if not region.numel():
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(as_memoryview(region), dtype=torch.uint8)


def digest(data: memoryview | bytes) -> str:
    return xxhash.xxh3_64_hexdigest(data)


class Sink(Protocol):
    """One file being written.  ``ordered`` sinks take writes strictly in offset order, one at a time."""

    ordered: bool

    async def write(self, offset: int, data: torch.Tensor, nbytes: int) -> str:
        """Write the first ``nbytes`` of ``data`` at ``offset``; return their xxh3-64 hex digest.

        ``data`` is a staging buffer: page-aligned, its length rounded up to whole pages."""

    async def commit(self) -> None:
        """Make the file complete and durable."""

    async def abort(self) -> None:
        """Forget the file (best effort, never raises)."""


class Reader(Protocol):
    async def read_into(self, offset: int, out: torch.Tensor) -> str:
        """Fill ``out`` from ``offset``; return the xxh3-64 hex digest; raise EOFError when the file is short."""

    async def close(self) -> None: ...


class Storage:
    """Operations on one filesystem; paths are the filesystem's own (no protocol prefix)."""

    def __init__(self, limiter: anyio.CapacityLimiter) -> None:
        self.limiter = limiter

    def join(self, *parts: str) -> str:
        return posixpath.join(*parts)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await to_thread.run_sync(fn, *args, limiter=self.limiter)


# ---------------------------------------------------------------- local disk

class LocalStorage(Storage):
    protocol = "file"

    def join(self, *parts: str) -> str:
        return os.path.join(*parts)

    def key(self, path: str) -> str:
        return os.path.abspath(path)

    def strip(self, url: str) -> str:
        return os.path.abspath(url.removeprefix("file://").removeprefix("local://"))

    async def open_sink(self, path: str, nbytes: int, fsync: bool, chunk_bytes: int) -> Sink:
        fd, direct_fd = await self._run(_create, path, nbytes)
        return _LocalSink(self, path, fd, direct_fd, nbytes, fsync)

    async def open_reader(self, path: str) -> Reader:
        return _LocalReader(self, *await self._run(_open_for_reading, path))

    async def put_atomic(self, path: str, data: bytes, fsync: bool) -> None:
        await self._run(_put_atomic, path, data, fsync)

    async def read_bytes(self, path: str) -> bytes:
        return await self._run(_read_file, path)

    async def kind(self, path: str) -> str | None:
        return "dir" if os.path.isdir(path) else "file" if os.path.exists(path) else None

    async def size(self, path: str) -> int | None:
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            return None

    async def list(self, path: str) -> list[str]:
        try:
            return await self._run(os.listdir, path)
        except (FileNotFoundError, NotADirectoryError):
            return []

    async def makedirs(self, path: str, fsync: bool) -> None:
        await self._run(_makedirs, path, fsync)

    async def remove(self, path: str) -> None:
        try:
            await self._run(os.unlink, path)
        except FileNotFoundError:
            pass

    async def remove_dir(self, path: str) -> None:
        try:
            await self._run(os.rmdir, path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # files that are not ours stay, and so does their directory
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise

    async def sync_dir(self, path: str) -> None:
        await self._run(_fsync_dir, path)


def _create(path: str, nbytes: int) -> tuple[int, int]:
    """A new file and, where the filesystem allows it, a second O_DIRECT descriptor for bulk writes.

    Page-aligned chunks go through O_DIRECT: on the disks we measured, parallel direct writes reach the device's
    bandwidth while buffered writes stall in page-cache writeback (docs/benchmarks.md).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    direct_fd = -1
    try:
        if nbytes:
            try:  # reserve the space up front: a full disk fails here, before any staging work is spent
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
        if hasattr(os, "O_DIRECT"):
            try:
                direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError:  # tmpfs and some network filesystems refuse O_DIRECT
                direct_fd = -1
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    return fd, direct_fd


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        if n == 0:
            raise OSError(errno.EIO, "write made no progress")
        view, offset = view[n:], offset + n


def _open_for_reading(path: str) -> tuple[int, int]:
    """A descriptor for reading and, where the filesystem allows it, an O_DIRECT one for whole aligned chunks."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    direct_fd = -1
    if hasattr(os, "O_DIRECT"):
        try:
            direct_fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            pass
    return fd, direct_fd


def _pread_all(fd: int, out: torch.Tensor, offset: int) -> str:
    view = full = as_memoryview(out)
    while view:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise EOFError(f"file ends {len(view)} bytes early")
        view, offset = view[n:], offset + n
    return digest(full)


def _put_atomic(path: str, data: bytes, fsync: bool) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if fsync:
        _fsync_dir(os.path.dirname(path) or ".")


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _makedirs(path: str, fsync: bool) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    existed = os.path.isdir(path)
    os.makedirs(path, exist_ok=True)
    if fsync and not existed:
        _fsync_dir(parent)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _LocalSink:
    ordered = False

    def __init__(self, storage: LocalStorage, path: str, fd: int, direct_fd: int, size: int, fsync: bool) -> None:
        self.storage, self.path, self.fd, self.direct_fd, self.size, self.fsync = (
            storage, path, fd, direct_fd, size, fsync)
        self.padded = False  # a direct write ran past the end (whole pages): truncate on commit

    def _write(self, offset: int, data: torch.Tensor, nbytes: int) -> str:
        view = as_memoryview(data)
        sig = digest(view[:nbytes])
        if self.direct_fd >= 0 and offset % ALIGN == 0 and data.data_ptr() % ALIGN == 0:
            length = aligned_size(nbytes)
            _pwrite_all(self.direct_fd, view[:length], offset)
            self.padded = self.padded or length > nbytes
        else:
            _pwrite_all(self.fd, view[:nbytes], offset)
        return sig

    async def write(self, offset: int, data: torch.Tensor, nbytes: int) -> str:
        return await self.storage._run(self._write, offset, data, nbytes)

    def _commit(self) -> None:
        if self.padded:
            os.ftruncate(self.fd, self.size)
        if self.fsync:
            os.fsync(self.fd)
        self._close()

    async def commit(self) -> None:
        await self.storage._run(self._commit)

    def _close(self) -> None:
        for fd in (self.fd, self.direct_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.direct_fd = -1

    async def abort(self) -> None:
        with anyio.CancelScope(shield=True):
            self._close()
            try:
                os.unlink(self.path)
            except OSError:
                pass


class _LocalReader:
    def __init__(self, storage: LocalStorage, fd: int, direct_fd: int) -> None:
        self.storage, self.fd, self.direct_fd = storage, fd, direct_fd
        self.direct = direct_fd >= 0

    async def read_into(self, offset: int, out: torch.Tensor) -> str:
        # Page-aligned whole pages (staging buffers) bypass the page cache, as writes do: no copy through the
        # cache, and one large request per chunk instead of readahead-sized pieces.
        if self.direct and not (offset | out.numel() | out.data_ptr()) % ALIGN:
            try:
                return await self.storage._run(_pread_all, self.direct_fd, out, offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # a filesystem that opens O_DIRECT but refuses to read that way
                    raise
                self.direct = False
        return await self.storage._run(_pread_all, self.fd, out, offset)

    async def close(self) -> None:
        os.close(self.fd)
        if self.direct_fd >= 0:
            os.close(self.direct_fd)


# ---------------------------------------------------------------- any fsspec filesystem

class FsspecStorage(Storage):
    """Any fsspec filesystem; async implementations are awaited on the loop, sync ones run in threads."""

    def __init__(self, fs: fsspec.AbstractFileSystem, limiter: anyio.CapacityLimiter) -> None:
        super().__init__(limiter)
        self.fs = fs
        self.protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]

    def key(self, path: str) -> str:
        return f"{self.protocol}://{path.rstrip('/')}"

    def strip(self, url: str) -> str:
        return self.fs._strip_protocol(url)

    async def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """``fs.<name>(...)``: awaited natively on async filesystems, in a worker thread otherwise."""
        if self.fs.async_impl:
            async with self.limiter:
                return await getattr(self.fs, "_" + name)(*args, **kwargs)
        return await to_thread.run_sync(lambda: getattr(self.fs, name)(*args, **kwargs), limiter=self.limiter)

    async def open_sink(self, path: str, nbytes: int, fsync: bool, chunk_bytes: int) -> Sink:
        return _FsspecSink(self, path)

    async def open_reader(self, path: str) -> Reader:
        return _FsspecReader(self, path)

    async def put_atomic(self, path: str, data: bytes, fsync: bool) -> None:
        # A single PUT is atomic on object stores; elsewhere fsspec offers nothing stronger.
        await self.call("pipe_file", path, data)

    async def read_bytes(self, path: str) -> bytes:
        return await self.call("cat_file", path)

    async def kind(self, path: str) -> str | None:
        try:
            info = await self.call("info", path)
        except FileNotFoundError:
            return None
        return "dir" if info.get("type") == "directory" else "file"

    async def size(self, path: str) -> int | None:
        try:
            info = await self.call("info", path)
        except FileNotFoundError:
            return None
        return info.get("size")

    async def list(self, path: str) -> list[str]:
        try:
            entries = await self.call("ls", path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        self.fs.invalidate_cache(path)
        return [posixpath.basename(str(e).rstrip("/")) for e in entries]

    async def makedirs(self, path: str, fsync: bool) -> None:
        await self.call("makedirs", path, exist_ok=True)

    async def remove(self, path: str) -> None:
        try:
            await self.call("rm_file", path)
        except FileNotFoundError:
            pass

    async def remove_dir(self, path: str) -> None:
        """Remove ``path`` if it is an empty directory; object stores have no directories to remove."""
        if not self.fs.async_impl:
            try:
                await self.call("rmdir", path)
            except OSError:  # not empty (files that are not ours), gone, or not a directory here
                pass
        self.fs.invalidate_cache(path)

    async def sync_dir(self, path: str) -> None:
        return None


class _FsspecSink:
    """Sequential writes into one file; object stores get a single PUT per shard (multipart when streamed)."""

    ordered = True

    def __init__(self, storage: FsspecStorage, path: str) -> None:
        self.storage, self.path = storage, path
        self.parts: list[bytes] = []
        self.file: Any = None
        self.written = 0

    async def write(self, offset: int, data: torch.Tensor, nbytes: int) -> str:
        view = as_memoryview(data)[:nbytes]
        sig = await to_thread.run_sync(digest, view)
        if self.storage.fs.async_impl:
            self.parts.append(bytes(view))
        else:
            if self.file is None:
                self.file = await self.storage._run(self.storage.fs.open, self.path, "wb")
            n = await self.storage._run(self.file.write, bytes(view))
            if n is not None and n != nbytes:
                raise OSError(errno.EIO, f"short write: {n} of {nbytes} bytes taken", self.path)
        self.written += nbytes
        return sig

    async def commit(self) -> None:
        if self.storage.fs.async_impl:
            data, self.parts = b"".join(self.parts), []
            await self.storage.call("pipe_file", self.path, data)
        elif self.file is None:
            await self.storage.call("pipe_file", self.path, b"")
        else:
            await self.storage._run(self.file.close)
        size = await self.storage.size(self.path)  # one HEAD: the store holds every byte we handed it
        if size != self.written:
            raise OSError(errno.EIO, f"the store holds {size} bytes of {self.written} written", self.path)

    async def abort(self) -> None:
        with anyio.CancelScope(shield=True):
            self.parts = []
            try:
                if self.file is not None:
                    self.file.discard() if hasattr(self.file, "discard") else self.file.close()
                await self.storage.remove(self.path)
            except Exception:
                pass


class _FsspecReader:
    def __init__(self, storage: FsspecStorage, path: str) -> None:
        self.storage, self.path = storage, path

    async def read_into(self, offset: int, out: torch.Tensor) -> str:
        n = out.numel()
        data = await self.storage.call("cat_file", self.path, start=offset, end=offset + n) if n else b""
        if len(data) != n:
            raise EOFError(f"file ends {n - len(data)} bytes early")
        view = as_memoryview(out)
        view[:] = data
        return await to_thread.run_sync(digest, view)

    async def close(self) -> None:
        return None


def resolve(url: str, storage_options: dict[str, Any] | None, limiter: anyio.CapacityLimiter
            ) -> tuple[Storage, str]:
    """The storage plugin and filesystem path for a user path or fsspec URL.

    Must run on the engine's loop: async filesystems are bound to the loop they are created on.
    """
    url = os.fspath(url)
    if "://" not in url or url.startswith(("file://", "local://")):
        local = LocalStorage(limiter)
        return local, local.strip(url)
    protocol = url.split("://", 1)[0]
    if protocol in ("s3", "s3a"):  # multipart shard uploads, one retry policy (asyncckpt/s3.py)
        from .s3 import S3Storage

        s3 = S3Storage.create(storage_options, limiter)
        return s3, s3.strip(url)
    cls = fsspec.get_filesystem_class(protocol)
    options = dict(storage_options or {})
    if getattr(cls, "async_impl", False):
        options.update(asynchronous=True, skip_instance_cache=True)
    try:
        fs = fsspec.filesystem(protocol, **options)
    except ImportError as exc:
        raise CheckpointError(f"{url}: the fsspec backend for {protocol}:// is not installed ({exc})") from exc
    return FsspecStorage(fs, limiter), fs._strip_protocol(url)
