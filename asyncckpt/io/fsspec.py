"""Any fsspec filesystem: async implementations (s3fs, gcsfs, adlfs, …) are awaited natively on the engine's loop,
sync ones run in worker threads."""

from __future__ import annotations

import ctypes
import errno
import posixpath
from typing import IO, Any, Callable, Mapping, TypeVar

import fsspec
import torch

from ..concurrency import IoRunner
from ..errors import CheckpointError
from ..format.checksum import digest
from ..memory.buffers import as_memoryview
from .contract import Kind, Reader, Sink, Storage
from .registry import INSTALL_HINTS

T = TypeVar("T")
ASYNCCKPT_OPTIONS = ("retry",)  # storage options that configure asyncckpt, not the filesystem


def filesystem_options(storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The user's storage options without asyncckpt's own."""
    return {k: v for k, v in (storage_options or {}).items() if k not in ASYNCCKPT_OPTIONS}


class FsspecStorage(Storage):
    """Any fsspec filesystem."""

    def __init__(self, fs: fsspec.AbstractFileSystem, io: IoRunner) -> None:
        super().__init__(io)
        self.fs = fs
        self.protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]

    @classmethod
    def create(cls, protocol: str, storage_options: Mapping[str, Any] | None, io: IoRunner) -> "FsspecStorage":
        options = filesystem_options(storage_options)
        try:
            fs_class = fsspec.get_filesystem_class(protocol)
        except ValueError as exc:
            raise CheckpointError(f"{protocol}:// is not a protocol fsspec knows ({exc})") from None
        except ImportError as exc:
            hint = INSTALL_HINTS.get(protocol)
            raise CheckpointError(f"{protocol}:// paths need a package that is not installed ({exc})"
                                  + (f": pip install {hint}" if hint else "")) from exc
        if getattr(fs_class, "async_impl", False):
            options.update(asynchronous=True, skip_instance_cache=True)
        return cls(fs_class(**options), io)

    def strip(self, url: str) -> str:
        return self.fs._strip_protocol(url)

    async def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """``fs.<name>(...)``: awaited natively on async filesystems, in a worker thread otherwise."""
        if self.fs.async_impl:
            async with self.io.limiter:
                return await getattr(self.fs, "_" + name)(*args, **kwargs)
        return await self.io(lambda: getattr(self.fs, name)(*args, **kwargs))

    async def open_sink(self, path: str, nbytes: int, fsync: bool, chunk_bytes: int) -> Sink:
        return FsspecSink(self, path)

    async def open_reader(self, path: str, shared: bool = False) -> Reader:
        return FsspecReader(self, path)

    async def put_atomic(self, path: str, data: bytes, fsync: bool) -> None:
        # A single PUT is atomic on object stores; elsewhere fsspec offers nothing stronger.
        await self.call("pipe_file", path, data)
        self.fs.invalidate_cache(path)

    async def put_file(self, path: str, write: Callable[[IO[bytes]], Any], fsync: bool) -> None:
        if self.fs.async_impl:  # no sync file objects on an async instance: gathered in memory, one PUT
            return await super().put_file(path, write, fsync)

        def stream() -> None:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            with self.fs.open(path, "wb") as f:
                write(f)

        await self.io(stream)
        self.fs.invalidate_cache(path)

    async def get_file(self, path: str, read: Callable[[IO[bytes]], T]) -> T:
        if self.fs.async_impl:
            return await super().get_file(path, read)

        def stream() -> T:
            with self.fs.open(path, "rb") as f:
                return read(f)

        return await self.io(stream)

    async def read_bytes(self, path: str, limit: int) -> bytes:
        info = await self.call("info", path)
        if info.get("type") != "file":
            raise FileNotFoundError(errno.ENOENT, "not a file", path)
        size = info.get("size")
        if isinstance(size, int) and size > limit:
            raise CheckpointError(f"{path} has {size} bytes, more than the {limit} allowed for it")
        data = await self.call("cat_file", path)
        if len(data) > limit:
            raise CheckpointError(f"{path} has more than the {limit} bytes allowed for it")
        return data

    async def kind(self, path: str) -> Kind | None:
        try:
            info = await self.call("info", path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return "dir" if info.get("type") == "directory" else "file"

    async def size(self, path: str) -> int | None:
        try:
            info = await self.call("info", path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return info.get("size")

    async def list(self, path: str) -> list[str]:
        self.fs.invalidate_cache(path)  # fsspec caches listings: a cached one would hide new files
        try:
            entries = await self.call("ls", path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        finally:
            self.fs.invalidate_cache(path)
        return [posixpath.basename(str(e).rstrip("/")) for e in entries]

    async def makedirs(self, path: str, fsync: bool) -> bool:
        created = self.fs.async_impl is False and await self.kind(path) is None
        await self.call("makedirs", path, exist_ok=True)
        return created

    async def remove(self, path: str) -> None:
        try:
            await self.call("rm_file", path)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(path)

    async def remove_dir(self, path: str) -> None:
        """Remove ``path`` if it is an empty directory; object stores have no directories to remove."""
        if not self.fs.async_impl:
            try:
                await self.call("rmdir", path)
            except OSError:  # not empty (files that are not ours), gone, or not a directory here
                pass
        self.fs.invalidate_cache(path)


class FsspecSink:
    """Sequential writes into one file; object stores get a single PUT per shard."""

    ordered = True

    def __init__(self, storage: FsspecStorage, path: str) -> None:
        self.storage, self.path = storage, path
        self.parts: list[bytes] = []
        self.file: Any = None
        self.written = 0

    async def write(self, offset: int, data: torch.Tensor, nbytes: int) -> str:
        view = as_memoryview(data)[:nbytes]
        sig = await self.storage.io.cpu(digest, view)
        if self.storage.fs.async_impl:
            self.parts.append(bytes(view))
        else:
            if self.file is None:
                self.file = await self.storage.io(self.storage.fs.open, self.path, "wb")
            n = await self.storage.io(self.file.write, bytes(view))
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
            await self.storage.io(self.file.close)
        self.storage.fs.invalidate_cache(self.path)
        size = await self.storage.size(self.path)  # one HEAD: the store holds every byte we handed it
        if size != self.written:
            raise OSError(errno.EIO, f"the store holds {size} bytes of {self.written} written", self.path)

    async def abort(self) -> None:
        with self.storage.io.shielded():  # ends after io_timeout on a hung store
            self.parts = []
            try:
                if self.file is not None:  # in a worker: closing may reach a hung store
                    await self.storage.io(getattr(self.file, "discard", self.file.close))
                await self.storage.remove(self.path)
            except Exception:
                pass


class FsspecReader:
    def __init__(self, storage: FsspecStorage, path: str) -> None:
        self.storage, self.path = storage, path

    async def read_into(self, offset: int, out: torch.Tensor) -> str:
        n = out.numel()
        data = await self.storage.call("cat_file", self.path, start=offset, end=offset + n) if n else b""
        if len(data) != n:
            raise EOFError(f"file ends {n - len(data)} bytes early")
        return await self.storage.io.cpu(_fill, out, data)

    async def close(self) -> None:
        return None


def _fill(out: torch.Tensor, data: bytes) -> str:
    """Copy a read's bytes into ``out`` and checksum them, off the loop; ctypes lets go of the GIL for the copy, so
    neither the loop nor the caller's thread waits on it."""
    view = as_memoryview(out)
    if type(data) is bytes:
        ctypes.memmove(out.data_ptr(), data, len(data))
    else:
        view[:] = data
    return digest(view)
