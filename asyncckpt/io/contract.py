"""The storage contract: what the pipeline and the loader may ask of a backend, and nothing more.

Paths are the filesystem's own (no protocol prefix; :meth:`Storage.strip` makes them). Every method runs on the
engine's event loop; blocking work goes through :attr:`Storage.io` (worker threads, bounded by the engine's I/O
concurrency). Missing things are answered, not raised: ``kind``/``size`` return None, ``list`` returns ``[]``,
``remove``/``remove_dir`` of something absent do nothing. Failures raise ``OSError`` (or a
:class:`~asyncckpt.CheckpointError` that says more, such as :class:`~asyncckpt.S3Error`).
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
    """One file being written, never visible under its name before :meth:`commit` (object stores) or complete
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
    """Operations on one filesystem, created once per protocol and options by each engine."""

    protocol: str = ""
    #: the limits this store puts on the parts of an uploaded file; plans for it never break them
    part_rules: PartRules = NO_RULES

    def __init__(self, io: IoRunner) -> None:
        self.io = io

    def default_shard_bytes(self, chunk_bytes: int) -> int:
        """The shard size for saves that leave ``shard_bytes`` unset: large files on filesystems; object stores
        that take a one-chunk file in one request answer ``chunk_bytes``, so each shard is a single upload."""
        return 512 << 20

    @classmethod
    @abc.abstractmethod
    def create(cls, protocol: str, storage_options: Mapping[str, Any] | None, io: IoRunner) -> "Storage":
        """Build the backend for ``protocol`` from the user's ``storage_options``; runs on the engine's loop (async
        clients bind to the loop they are created on)."""

    # ------------------------------------------------------------ names

    @abc.abstractmethod
    def strip(self, url: str) -> str:
        """The filesystem path of a user path or URL."""

    def key(self, path: str) -> str:
        """The identity of the location ``path`` names: saves to one key commit in order. Two paths that reach the
        same place (a symlink alias) must give the same key."""
        return f"{self.protocol}://{path.rstrip('/')}"

    def join(self, *parts: str) -> str:
        return posixpath.join(*parts)

    def split(self, path: str) -> tuple[str, str]:
        """``(parent, name)`` of ``path``: the directory holding it and its last component."""
        return posixpath.split(path.rstrip("/"))

    # ------------------------------------------------------------ bulk bytes

    @abc.abstractmethod
    async def open_sink(self, path: str, nbytes: int, fsync: bool, chunk_bytes: int) -> Sink:
        """Start writing a new file of exactly ``nbytes`` bytes, written in chunks of ``chunk_bytes``."""

    @abc.abstractmethod
    async def open_reader(self, path: str) -> Reader:
        """Open a regular file for ranged reads (``FileNotFoundError`` if absent; anything that is not a regular
        file, such as a FIFO or a device, is refused without blocking)."""

    # ------------------------------------------------------------ small files

    @abc.abstractmethod
    async def put_atomic(self, path: str, data: bytes, fsync: bool) -> None:
        """Replace ``path`` (whose directory exists) with ``data`` at once: readers see the old bytes or the new
        ones. Once it returns (with ``fsync`` on local disk) the new bytes survive a crash. This is the commit."""

    @abc.abstractmethod
    async def read_bytes(self, path: str, limit: int) -> bytes:
        """The whole regular file at ``path`` (``FileNotFoundError`` if absent); refuse one larger than ``limit``
        bytes, or one that is not a regular file, with a ``CheckpointError``, without reading it."""

    async def put_file(self, path: str, write: Callable[[IO[bytes]], Any], fsync: bool) -> None:
        """Create or replace ``path`` atomically with what ``write(f)`` writes into the binary file ``f`` (called
        in a worker thread), creating missing parent directories: for whole files made by other serializers. This
        default gathers the bytes in memory and makes one :meth:`put_atomic`; backends that can stream do."""
        buf = io.BytesIO()
        await self.io.cpu(write, buf)
        await self.put_atomic(path, buf.getbuffer().tobytes(), fsync)

    async def get_file(self, path: str, read: Callable[[IO[bytes]], T]) -> T:
        """``read(f)`` (in a worker thread) over the whole regular file at ``path`` opened for binary reading. This
        default reads the bytes into memory first; backends with real file objects stream."""
        size = await self.size(path)
        data = await self.read_bytes(path, size if size is not None else 0)
        return await self.io.cpu(read, io.BytesIO(data))

    # ------------------------------------------------------------ the namespace

    @abc.abstractmethod
    async def kind(self, path: str) -> Kind | None:
        """``"dir"``, ``"file"`` or None (nothing there). Object stores say ``"dir"`` for a non-empty prefix."""

    @abc.abstractmethod
    async def size(self, path: str) -> int | None:
        """Size in bytes of the file at ``path``, or None if there is none."""

    @abc.abstractmethod
    async def list(self, path: str) -> list[str]:
        """Names directly under the directory ``path`` (fresh, never a cached listing); ``[]`` if there is none."""

    @abc.abstractmethod
    async def makedirs(self, path: str, fsync: bool) -> bool:
        """Create ``path`` and missing parents (with ``fsync``, durably); object stores check the bucket. Returns
        whether ``path`` itself was created (so a failed first save can remove it again)."""

    @abc.abstractmethod
    async def remove(self, path: str) -> None:
        """Delete one file (nothing if absent)."""

    @abc.abstractmethod
    async def remove_dir(self, path: str) -> None:
        """Remove ``path`` if it is an empty directory and clean up what interrupted writes left there (open
        multipart uploads); never deletes files."""

    async def remove_link(self, path: str) -> bool:
        """Delete ``path`` if it is a symbolic link (never what it points to) and say whether it was; stores
        without links have none."""
        return False

    async def sync_dir(self, path: str) -> None:
        """Make the directory entry changes under ``path`` durable (local disk)."""

    async def close(self) -> None:
        """Release network sessions; called once when the engine closes."""
