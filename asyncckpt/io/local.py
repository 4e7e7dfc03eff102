"""The local disk: positional writes and reads in worker threads, fsync of files and directories, atomic rename.

Bulk bytes use ``os.pwrite``/``os.preadv`` in worker threads rather than aiofiles: aiofiles also hops to a thread
for every call but has no positional write, so chunks of one shard could not be written concurrently, and the
benchmark (docs/benchmarks.md) shows concurrent positional writes are what reach the disk's limit. Whole
page-aligned chunks go through ``O_DIRECT`` where the filesystem allows it, falling back to buffered I/O where it
refuses.

Every operating-system call goes through an `OsOps` object, so tests inject faults (or mark phases for
crash trials) by passing their own instead of patching modules.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import io
import logging
import mmap
import os
import stat
import sys
import threading
import uuid
from typing import IO, Any, Callable, Mapping, TypeVar

import torch

from ..concurrency import IoRunner
from ..errors import CheckpointError
from ..format.manifest import TEMP_INFIX
from ..memory.buffers import ALIGN, aligned_size, as_memoryview
from .contract import Kind, Reader, Sink, Storage
from ..format.checksum import digest
from .paths import local_path

T = TypeVar("T")
log = logging.getLogger("asyncckpt")


class OsOps:
    """The operating-system calls LocalStorage makes; each one is a thin call of its ``os`` namesake."""

    O_DIRECT = getattr(os, "O_DIRECT", 0)

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        return os.open(path, flags | os.O_CLOEXEC, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def fstat(self, fd: int) -> os.stat_result:
        return os.fstat(fd)

    def stat(self, path: str) -> os.stat_result:
        return os.stat(path)

    def posix_fallocate(self, fd: int, offset: int, length: int) -> None:
        os.posix_fallocate(fd, offset, length)

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def preadv(self, fd: int, buffers: list[memoryview], offset: int) -> int:
        return os.preadv(fd, buffers, offset)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def mkdir(self, path: str) -> None:
        os.mkdir(path)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def cached(self, fd: int, size: int) -> bool:
        """Whether (nearly) all ``size`` bytes of the file sit in the page cache: ``mincore`` over a mapping that
        touches no page (a probe read would start readahead). False where the probe is unavailable."""
        libc = _libc()
        if libc is None or size <= 0:
            return False
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return False
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                return False
            resident = bytes(vec).translate(_LOW_BIT).count(1)  # bit 0: resident; the others are unspecified
            return resident * 8 >= pages * 7  # the kernel keeps a few pages of a just-read file out
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)


_LOW_BIT = bytes(b & 1 for b in range(256))


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    """The C library's mmap/mincore/munmap with their real signatures (None off Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


class LocalStorage(Storage):
    protocol = "file"

    def __init__(self, io: IoRunner, ops: OsOps | None = None) -> None:
        super().__init__(io)
        self.ops = ops or OsOps()

    @classmethod
    def create(cls, protocol: str, storage_options: Mapping[str, Any] | None, io: IoRunner) -> "LocalStorage":
        return cls(io)

    def strip(self, url: str) -> str:
        return local_path(url)

    def key(self, path: str) -> str:
        return os.path.realpath(path)

    def join(self, *parts: str) -> str:
        return os.path.join(*parts)

    def split(self, path: str) -> tuple[str, str]:
        return os.path.split(path.rstrip(os.sep) or path)

    # ------------------------------------------------------------ bulk bytes

    async def open_sink(self, path: str, nbytes: int, fsync: bool, chunk_bytes: int) -> Sink:
        fd, direct_fd = await self.io(self._create, path, nbytes)
        return LocalSink(self, path, fd, direct_fd, nbytes, fsync)

    def _create(self, path: str, nbytes: int) -> tuple[int, int]:
        """A new file and, where the filesystem allows it, a second O_DIRECT descriptor for bulk writes.

        Page-aligned chunks go through O_DIRECT: on the disks we measured, parallel direct writes reach the device's
        bandwidth while buffered writes stall in page-cache writeback (docs/benchmarks.md).
        """
        ops = self.ops
        fd = ops.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        direct_fd = -1
        try:
            if nbytes:
                try:  # reserve the space up front: a full disk fails here, before any staging work is spent
                    ops.posix_fallocate(fd, 0, nbytes)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise
            if ops.O_DIRECT:
                try:
                    direct_fd = ops.open(path, os.O_WRONLY | ops.O_DIRECT)
                except OSError:  # tmpfs and some network filesystems refuse O_DIRECT
                    direct_fd = -1
        except BaseException:
            ops.close(fd)
            ops.unlink(path)
            raise
        return fd, direct_fd

    async def open_reader(self, path: str, shared: bool = False) -> Reader:
        return LocalReader(self, *await self.io(self._open_for_reading, path, shared))

    def _open_regular(self, path: str) -> tuple[int, os.stat_result]:
        """A read descriptor of ``path``, which must be a regular file (opening a FIFO does not block: O_NONBLOCK)."""
        try:
            fd = self.ops.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CheckpointError(f"{path} is a symbolic link; asyncckpt reads only regular files inside a "
                                      "checkpoint") from None
            if exc.errno == errno.ENOTDIR:  # a path through a file: nothing there
                raise FileNotFoundError(exc.errno, exc.strerror, path) from None
            raise
        try:
            st = self.ops.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError(f"{path} is not a regular file; asyncckpt reads only regular files")
        except BaseException:
            self.ops.close(fd)
            raise
        return fd, st

    def _open_for_reading(self, path: str, shared: bool) -> tuple[int, int]:
        """A descriptor for reading and, where the filesystem allows it, an O_DIRECT one for whole aligned chunks.

        A file already in the page cache (just downloaded or copied, or read before) is read buffered: there a
        read is a memory copy, several times faster than going back to the device. So is a ``shared`` one, which
        other processes read at the same time: the page cache then fetches its bytes from the device once."""
        fd, st = self._open_regular(path)
        direct_fd = -1
        if self.ops.O_DIRECT and not shared and not self.ops.cached(fd, st.st_size):
            try:
                direct_fd = self.ops.open(path, os.O_RDONLY | self.ops.O_DIRECT | os.O_NOFOLLOW)
            except OSError:
                pass
        return fd, direct_fd

    # ------------------------------------------------------------ small files

    async def put_atomic(self, path: str, data: bytes, fsync: bool) -> None:
        await self._publish(path, lambda f: f.write(data), fsync)

    async def put_file(self, path: str, write: Callable[[IO[bytes]], Any], fsync: bool) -> None:
        await self.makedirs(os.path.dirname(path) or ".", fsync)
        await self._publish(path, write, fsync)

    async def _publish(self, path: str, write: Callable[[IO[bytes]], Any], fsync: bool) -> None:
        """`_replace` in a worker. A call given up on as hung may still run: it must not rename its file over
        ``path`` later, when another save may have published its own manifest there since."""
        given_up = threading.Event()
        try:
            await self.io(self._replace, path, write, fsync, given_up)
        except BaseException:
            given_up.set()
            raise

    def _replace(self, path: str, write: Callable[[IO[bytes]], Any], fsync: bool, given_up: threading.Event
                 ) -> None:
        """Write a temporary file next to ``path`` through ``write(f)``, fsync it, rename it over ``path`` (unless
        ``given_up`` is set by then) and fsync the directory: readers see the old file or the new one, and the new
        one survives a crash."""
        ops = self.ops
        tmp = f"{path}{TEMP_INFIX}{uuid.uuid4().hex[:12]}"
        try:
            fd = ops.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            try:
                with io.BufferedWriter(OpsWriter(ops, fd), buffer_size=1 << 20) as f:
                    write(f)
                    f.flush()
                    if fsync:
                        ops.fsync(fd)
            finally:
                ops.close(fd)
            if given_up.is_set():
                raise OSError(errno.ECANCELED, "given up on as hung before it was renamed into place", path)
            ops.replace(tmp, path)
        except BaseException:
            try:
                ops.unlink(tmp)
            except OSError:
                pass
            raise
        if fsync:
            ops.fsync_dir(os.path.dirname(path) or ".")

    async def get_file(self, path: str, read: Callable[[IO[bytes]], T]) -> T:
        return await self.io(self._get_file, path, read)

    def _get_file(self, path: str, read: Callable[[IO[bytes]], T]) -> T:
        fd, _ = self._open_regular(path)
        with os.fdopen(fd, "rb") as f:
            return read(f)

    async def read_bytes(self, path: str, limit: int) -> bytes:
        return await self.io(self._read_file, path, limit)

    def _read_file(self, path: str, limit: int) -> bytes:
        fd, st = self._open_regular(path)
        try:
            if st.st_size > limit:
                raise CheckpointError(f"{path} has {st.st_size} bytes, more than the {limit} allowed for it")
            out = torch.empty(st.st_size, dtype=torch.uint8)
            n = _pread_all(self.ops, fd, as_memoryview(out), 0, allow_short=True)
            return as_memoryview(out)[:n].tobytes()
        finally:
            self.ops.close(fd)

    # ------------------------------------------------------------ the namespace

    async def kind(self, path: str) -> Kind | None:
        try:
            st = await self.io(self.ops.stat, path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return "dir" if stat.S_ISDIR(st.st_mode) else "file"

    async def size(self, path: str) -> int | None:
        try:
            st = await self.io(self.ops.stat, path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):  # a FIFO or device: its size means nothing
            raise CheckpointError(f"{path} is not a regular file; asyncckpt reads only regular files")
        return st.st_size

    async def list(self, path: str) -> list[str]:
        try:
            return await self.io(self.ops.listdir, path)
        except (FileNotFoundError, NotADirectoryError):
            return []

    async def makedirs(self, path: str, fsync: bool) -> bool:
        return await self.io(self._makedirs, path, fsync)

    def _makedirs(self, path: str, fsync: bool) -> bool:
        """Create ``path`` and its missing parents; with ``fsync``, make every new entry durable, up to the first
        directory that already existed (a new ``runs/exp1`` must survive a power cut with ``step-100`` in it)."""
        missing = []
        here = os.path.abspath(path)
        while not os.path.isdir(here):
            missing.append(here)
            parent = os.path.dirname(here)
            if parent == here:
                break
            here = parent
        for d in reversed(missing):
            try:
                self.ops.mkdir(d)
            except FileExistsError:
                if not os.path.isdir(d):
                    raise
        if fsync:
            for d in missing:
                self.ops.fsync_dir(os.path.dirname(d))
        return bool(missing)

    async def remove(self, path: str) -> None:
        try:
            await self.io(self.ops.unlink, path)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            raise CheckpointError(f"{path} is a directory where a file was expected; it was left alone") from None

    async def remove_link(self, path: str) -> bool:
        return await self.io(self._unlink_link, path)

    def _unlink_link(self, path: str) -> bool:
        try:
            if not stat.S_ISLNK(os.lstat(path.rstrip("/") or "/").st_mode):
                return False
        except (FileNotFoundError, NotADirectoryError):
            return False
        self.ops.unlink(path.rstrip("/"))
        return True

    async def remove_dir(self, path: str) -> None:
        try:
            await self.io(self.ops.rmdir, path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # files that are not ours stay, and so does their directory
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise

    async def sync_dir(self, path: str) -> None:
        await self.io(self.ops.fsync_dir, path)


def _pwrite_all(ops: OsOps, fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = ops.pwrite(fd, view, offset)
        if n == 0:
            raise OSError(errno.EIO, "write made no progress")
        view, offset = view[n:], offset + n


def _pread_all(ops: OsOps, fd: int, view: memoryview, offset: int, allow_short: bool = False) -> int:
    """Fill ``view`` from ``offset``; a file that ends first is an EOFError unless ``allow_short``."""
    done = 0
    while done < len(view):
        n = ops.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            if allow_short:
                break
            raise EOFError(f"file ends {len(view) - done} bytes early")
        done += n
    return done


class OpsWriter(io.RawIOBase):
    """A write-only file over a descriptor; its writes go through `OsOps` (so faults reach them too)."""

    def __init__(self, ops: OsOps, fd: int) -> None:
        super().__init__()
        self.ops, self.fd, self.pos = ops, fd, 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        _pwrite_all(self.ops, self.fd, view, self.pos)
        self.pos += len(view)
        return len(view)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = offset if whence == io.SEEK_SET else self.pos + offset if whence == io.SEEK_CUR else \
            self.ops.fstat(self.fd).st_size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:  # the descriptor belongs to the caller
        super().close()


class LocalSink:
    ordered = False

    def __init__(self, storage: LocalStorage, path: str, fd: int, direct_fd: int, size: int, fsync: bool) -> None:
        self.storage, self.path, self.fd, self.direct_fd, self.size, self.fsync = (
            storage, path, fd, direct_fd, size, fsync)
        self.ops = storage.ops
        self.padded = False  # a direct write ran past the end (whole pages): truncate on commit
        self._lock = threading.Lock()
        self._busy = 0  # calls running in worker threads (one given up on as hung may still be)
        self._aborted = False

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` counted as busy: an aborted sink's descriptors stay open until its last call returns, so
        that a call given up on as hung never uses (or closes) a number since reused for another file."""
        with self._lock:
            if self._aborted:
                raise OSError(errno.ECANCELED, "the shard was aborted", self.path)
            self._busy += 1
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._busy -= 1
                close = self._aborted and not self._busy
            if close:
                self._close()

    def _write(self, offset: int, data: torch.Tensor, nbytes: int) -> str:
        return self._guarded(self._write_now, offset, data, nbytes)

    def _write_now(self, offset: int, data: torch.Tensor, nbytes: int) -> str:
        view = as_memoryview(data)
        sig = digest(view[:nbytes])
        direct = self.direct_fd
        if direct >= 0 and offset % ALIGN == 0 and data.data_ptr() % ALIGN == 0:
            length = aligned_size(nbytes)
            try:
                _pwrite_all(self.ops, direct, view[:length], offset)
                self.padded = self.padded or length > nbytes
                return sig
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # a filesystem that opens O_DIRECT but refuses to write that way
                    raise
                log.warning("%s: the filesystem refuses O_DIRECT writes (EINVAL); writing it buffered", self.path)
                self.direct_fd = -1
                self.ops.close(direct)
        _pwrite_all(self.ops, self.fd, view[:nbytes], offset)
        return sig

    async def write(self, offset: int, data: torch.Tensor, nbytes: int) -> str:
        return await self.storage.io(self._write, offset, data, nbytes)

    def _commit(self) -> None:
        if self.padded:
            self.ops.ftruncate(self.fd, self.size)
        if self.fsync:
            self.ops.fsync(self.fd)
        self._close()

    async def commit(self) -> None:
        await self.storage.io(self._guarded, self._commit)

    def _close(self) -> None:
        for fd in (self.fd, self.direct_fd):
            if fd >= 0:
                self.ops.close(fd)
        self.fd = self.direct_fd = -1

    async def abort(self) -> None:
        with self._lock:  # here, not in the worker: should that never get to run, a hung call still closes at its end
            self._aborted = True
            close = not self._busy
        await self.storage.io(self._remove, close)  # in a worker: on a hung mount these block too (io_timeout)

    def _remove(self, close: bool) -> None:
        try:
            if close:
                self._close()
        except OSError:
            pass
        try:
            self.ops.unlink(self.path)
        except OSError:
            pass


class LocalReader:
    def __init__(self, storage: LocalStorage, fd: int, direct_fd: int) -> None:
        self.storage, self.fd, self.direct_fd = storage, fd, direct_fd
        self.ops = storage.ops

    def _read(self, offset: int, out: torch.Tensor) -> str:
        view = as_memoryview(out)
        # Page-aligned whole pages (staging buffers) bypass the page cache, as writes do: no copy through the
        # cache, and one large request per chunk instead of readahead-sized pieces.
        if self.direct_fd >= 0 and not (offset | out.numel() | out.data_ptr()) % ALIGN:
            try:
                _pread_all(self.ops, self.direct_fd, view, offset)
                return digest(view)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # a filesystem that opens O_DIRECT but refuses to read that way
                    raise
                log.warning("the filesystem refuses O_DIRECT reads (EINVAL); reading buffered")
                self.direct_fd, fd = -1, self.direct_fd
                self.ops.close(fd)
        _pread_all(self.ops, self.fd, view, offset)
        return digest(view)

    async def read_into(self, offset: int, out: torch.Tensor) -> str:
        return await self.storage.io(self._read, offset, out)

    async def close(self) -> None:
        for fd in (self.fd, self.direct_fd):
            if fd >= 0:
                self.ops.close(fd)
        self.fd = self.direct_fd = -1
