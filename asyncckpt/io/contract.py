"""The storage contract: what the pipeline and the loader may ask of a backend, and nothing more.

Paths are the filesystem's own (no protocol prefix; `Storage.strip` makes them). Every method runs on the
engine's event loop; blocking work goes through `Storage.io` (worker threads, bounded by the engine's I/O
concurrency). Missing things are answered, not raised: ``kind``/``size`` return None, ``list`` returns ``[]``,
``remove``/``remove_dir`` of something absent do nothing. Failures raise ``OSError`` (or a
`CheckpointError` that says more, such as `S3Error`).
"""

from __future__ import annotations

import abc
import io
import posixpath
from typing import IO, Any, Callable, Literal, Mapping, Protocol, TypeVar

import torch

from ..concurrency import IoRunner
from ..format.parts import NO_RULES, PartRules

Kind = Literal["dir", "file"]
T = TypeVar("T")


class Sink(Protocol):
    """One file being written, never visible under its name before `commit` (object stores) or complete
    only after it (local disk). ``ordered`` sinks take writes strictly in offset order, one at a time."""

    ordered: bool

    async def write(self, offset: int, data: torch.Tensor, nbytes: int) -> str:
        """Write the first ``nbytes`` of ``data`` at ``offset``; return their xxh3-64 hex digest.

        ``data`` is a staging buffer: page-aligned, its length rounded up to whole pages. Every chunk of a shard
        but the last has the same size, the ``chunk_bytes`` the sink was opened with."""

    async def commit(self) -> None:
        """Make the file complete and durable; raise if the store does not hold every byte written."""

    async def abort(self) -> None:
        """Forget the file: delete what was written (best effort, never raises, safe to call twice)."""


class Reader(Protocol):
    """Ranged reads of one regular file."""

    async def read_into(self, offset: int, out: torch.Tensor) -> str:
        """Fill the uint8 host tensor ``out`` from ``offset``; return the bytes' xxh3-64 hex digest; raise
        ``EOFError`` when the file ends first."""

    async def close(self) -> None:
        """Release the file (safe to call twice)."""


class Storage(abc.ABC):
    """Operations on one filesystem, created once per protocol and options by each engine.

    A backend subclasses it, implements the abstract methods, and is registered for its URL protocols
    (`asyncckpt.io.register`, or an ``asyncckpt.storage`` entry point); ``tests/io`` is the conformance
    suite it must pass. Failures raise ``OSError`` (or a `CheckpointError` that says more).

    Args:
        io: the engine's runner for blocking calls (worker threads, bounded by its I/O concurrency).
    """

    protocol: str = ""
    #: the limits this store puts on the parts of an uploaded file; plans for it never break them
    part_rules: PartRules = NO_RULES

    def __init__(self, io: IoRunner) -> None:
        self.io = io

    def default_shard_bytes(self, chunk_bytes: int) -> int:
        """The shard size for saves that leave ``shard_bytes`` unset: large files on filesystems; object stores
        that take a one-chunk file in one request answer ``chunk_bytes``, so each shard is a single upload.

        Args:
            chunk_bytes: the engine's chunk size, in bytes.

        Returns:
            The target size of one shard file, in bytes (512 MiB here).
        """
        return 512 << 20

    @classmethod
    @abc.abstractmethod
    def create(cls, protocol: str, storage_options: Mapping[str, Any] | None, io: IoRunner) -> "Storage":
        """Build the backend for ``protocol`` from the user's ``storage_options``; runs on the engine's loop (async
        clients bind to the loop they are created on).

        Args:
            protocol: the URL protocol it serves here (``"s3"``, ``"file"``…).
            storage_options: the user's options (credentials, endpoint…); None for local paths.
            io: the engine's runner for blocking calls.

        Returns:
            The backend.
        """

    # ------------------------------------------------------------ names

    @abc.abstractmethod
    def strip(self, url: str) -> str:
        """The filesystem path of a user path or URL.

        Args:
            url: a local path or a URL of this backend's protocol.

        Returns:
            The path without its protocol prefix (``bucket/run/step-100`` for ``s3://bucket/run/step-100``).
        """

    def key(self, path: str) -> str:
        """The identity of the location ``path`` names: saves to one key commit in order. Two paths that reach the
        same place (a symlink alias) must give the same key.

        Args:
            path: a filesystem path (see `strip`).

        Returns:
            The key (by default ``protocol://path`` without a trailing slash).
        """
        return f"{self.protocol}://{path.rstrip('/')}"

    def join(self, *parts: str) -> str:
        """Join path components with this filesystem's separator.

        Args:
            *parts: path components, the first a filesystem path.

        Returns:
            The joined path (by default with ``/``).
        """
        return posixpath.join(*parts)

    def split(self, path: str) -> tuple[str, str]:
        """``(parent, name)`` of ``path``: the directory holding it and its last component.

        Args:
            path: a filesystem path (a trailing slash is ignored).

        Returns:
            The parent directory's path and the last component.
        """
        return posixpath.split(path.rstrip("/"))

    # ------------------------------------------------------------ bulk bytes

    @abc.abstractmethod
    async def open_sink(self, path: str, nbytes: int, fsync: bool, chunk_bytes: int) -> Sink:
        """Start writing a new file of exactly ``nbytes`` bytes, written in chunks of ``chunk_bytes``.

        Args:
            path: the file to write; its directory exists.
            nbytes: the file's final size, in bytes.
            fsync: make the file durable on `Sink.commit` (local disk).
            chunk_bytes: the size of every write but the last, in bytes.

        Returns:
            The sink the chunks go to; nothing shows under ``path`` as complete before its ``commit``.
        """

    @abc.abstractmethod
    async def open_reader(self, path: str, shared: bool = False) -> Reader:
        """Open a regular file for ranged reads; anything that is not a regular file, such as a FIFO or a device,
        is refused without blocking.

        Args:
            path: the file.
            shared: other processes read the same bytes at the same time (ranks of a multi-rank load): a store
                that can serve them one read (the local page cache) should read so, rather than bypass it.

        Returns:
            A reader; close it when done.

        Raises:
            FileNotFoundError: nothing is at ``path``.
            OSError: ``path`` is not a regular file, or the store failed.
        """

    # ------------------------------------------------------------ small files

    @abc.abstractmethod
    async def put_atomic(self, path: str, data: bytes, fsync: bool) -> None:
        """Replace ``path`` (whose directory exists) with ``data`` at once: readers see the old bytes or the new
        ones. Once it returns (with ``fsync`` on local disk) the new bytes survive a crash. This is the commit.

        Args:
            path: the file to replace or create.
            data: its new bytes.
            fsync: make the file and its directory entry durable before returning (local disk).
        """

    @abc.abstractmethod
    async def read_bytes(self, path: str, limit: int) -> bytes:
        """The whole regular file at ``path``, refusing a large or special file without reading it.

        Args:
            path: the file.
            limit: the largest size accepted, in bytes.

        Returns:
            The file's bytes.

        Raises:
            FileNotFoundError: nothing is at ``path``.
            CheckpointError: the file is larger than ``limit`` bytes or is not a regular file.
        """

    async def put_file(self, path: str, write: Callable[[IO[bytes]], Any], fsync: bool) -> None:
        """Create or replace ``path`` atomically with what ``write(f)`` writes into the binary file ``f`` (called
        in a worker thread), creating missing parent directories: for whole files made by other serializers. This
        default gathers the bytes in memory and makes one `put_atomic`; backends that can stream do.

        Args:
            path: the file to create or replace.
            write: writes the file's bytes into the binary file object it is given.
            fsync: make the file durable before returning (local disk).
        """
        buf = io.BytesIO()
        await self.io.cpu(write, buf)
        await self.put_atomic(path, buf.getbuffer().tobytes(), fsync)

    async def get_file(self, path: str, read: Callable[[IO[bytes]], T]) -> T:
        """``read(f)`` (in a worker thread) over the whole regular file at ``path`` opened for binary reading. This
        default reads the bytes into memory first; backends with real file objects stream.

        Args:
            path: the file.
            read: reads what it needs from the binary file object it is given.

        Returns:
            What ``read`` returned.

        Raises:
            FileNotFoundError: nothing is at ``path``.
        """
        size = await self.size(path)
        data = await self.read_bytes(path, size if size is not None else 0)
        return await self.io.cpu(read, io.BytesIO(data))

    # ------------------------------------------------------------ the namespace

    @abc.abstractmethod
    async def kind(self, path: str) -> Kind | None:
        """What is at ``path``. Object stores say ``"dir"`` for a non-empty prefix.

        Args:
            path: a filesystem path.

        Returns:
            ``"dir"``, ``"file"``, or None when nothing is there.
        """

    @abc.abstractmethod
    async def size(self, path: str) -> int | None:
        """The size of the file at ``path``.

        Args:
            path: a filesystem path.

        Returns:
            Its size in bytes, or None if there is no file there.
        """

    @abc.abstractmethod
    async def list(self, path: str) -> list[str]:
        """Names directly under the directory ``path``, from a fresh listing (never a cached one).

        Args:
            path: a directory's path.

        Returns:
            The names (not paths), or ``[]`` if there is no such directory.
        """

    @abc.abstractmethod
    async def makedirs(self, path: str, fsync: bool) -> bool:
        """Create ``path`` and missing parents (with ``fsync``, durably); object stores check the bucket.

        Args:
            path: the directory.
            fsync: make every new directory entry durable (local disk).

        Returns:
            Whether ``path`` itself was created (so a failed first save can remove it again).
        """

    @abc.abstractmethod
    async def remove(self, path: str) -> None:
        """Delete one file (nothing if absent).

        Args:
            path: the file.
        """

    @abc.abstractmethod
    async def remove_dir(self, path: str) -> None:
        """Remove ``path`` if it is an empty directory and clean up what interrupted writes left there (open
        multipart uploads); never deletes files.

        Args:
            path: the directory.
        """

    async def remove_link(self, path: str) -> bool:
        """Delete ``path`` if it is a symbolic link (never what it points to); stores without links have none.

        Args:
            path: a filesystem path.

        Returns:
            Whether ``path`` was a link (and is now gone).
        """
        return False

    async def sync_dir(self, path: str) -> None:
        """Make the directory entry changes under ``path`` durable (local disk; elsewhere nothing to do).

        Args:
            path: the directory.
        """

    async def close(self) -> None:
        """Release network sessions; called once when the engine closes."""
