"""Incremental saves: which tensors are unchanged since a base checkpoint, by the digest of their bytes.

A save with a base hashes every tensor that owns its bytes (xxh3-64, on the caller's thread) and compares it with the
base's record under the same key path: same dtype, shape and digest means the new checkpoint references the base's
bytes instead of copying and writing them again. Correctness never depends on version counters unless the caller
opts in: with ``trust_versions``, a tensor whose storage, layout and ``_version`` are those recorded when this engine
last hashed it takes that digest without being read (writes through ``.data`` or foreign kernels do not bump
``_version``, so only frozen tensors should be trusted this way).
"""

from __future__ import annotations

import concurrent.futures
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..format.checksum import digest_pieces
from ..format.manifest import Manifest, ShardRecord, Span, TensorRecord
from ..format.tree import Ref, leaves, structure
from ..memory.buffers import as_memoryview
from .strided import pieces


@dataclass
class Base:
    """A checkpoint a save may reference, seen from a sibling: its directory name and manifest."""

    name: str
    manifest: Manifest
    into: str  # the directory name of the checkpoint that builds on this one
    by_key: dict[str, TensorRecord] = field(default_factory=dict)

    @classmethod
    def of(cls, name: str, manifest: Manifest, into: str) -> "Base":
        tree = structure(manifest.tree, len(manifest.tensors), len(manifest.objects))
        by_key = {}
        for path, leaf in leaves(tree):
            if isinstance(leaf, Ref) and leaf.kind == "tensor":
                record = manifest.tensors[leaf.index]
                if record.span is not None and record.digest is not None:
                    by_key.setdefault(path, record)
        return cls(name, manifest, into, by_key)

    def shard(self, index: int) -> ShardRecord:
        """The base's shard as the new checkpoint names it: in the directory that physically holds it — none when
        that is the new checkpoint's own (a path saved again on top of a child of its earlier save), which then
        keeps the file as its own instead of marking itself as its own referrer."""
        s = self.manifest.shards[index]
        home = self.name if s.base is None else s.base
        return ShardRecord(s.file, s.nbytes, s.chunk_bytes, s.xxh3_64, None if home == self.into else home)

    def match(self, path: str, dtype: str, shape: tuple[int, ...], want: str) -> tuple[ShardRecord, Span] | None:
        """The base's shard and span holding exactly these bytes under ``path``, if it has them."""
        record = self.by_key.get(path)
        if record is None or record.digest != want or record.dtype != dtype or record.shape != shape:
            return None
        assert record.span is not None
        return self.shard(record.span.shard), record.span


def _identity(t: torch.Tensor) -> tuple[Any, ...] | None:
    if t.device.type == "xla" or not t.numel():
        return None
    return (str(t.device), t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


@dataclass
class VersionMemo:
    """Digests this engine computed, keyed by where a tensor's bytes live, with the storage that held them and
    the ``_version`` they had. The storage is held weakly and compared by identity: a new tensor allocated at a
    freed one's address starts at the same ``_version`` (0), and must not take its digest."""

    seen: dict[tuple[Any, ...], tuple[weakref.ref[torch.UntypedStorage], int, str]] = field(default_factory=dict)

    def known(self, t: torch.Tensor) -> str | None:
        key = _identity(t)
        entry = self.seen.get(key) if key is not None else None
        if entry is None:
            return None
        storage, version, value = entry
        return value if version == t._version and storage() is t.untyped_storage() else None

    def remember(self, t: torch.Tensor, value: str) -> None:
        key = _identity(t)
        if key is not None:
            self.seen[key] = (weakref.ref(t.untyped_storage()), t._version, value)


def bytes_digest(src: torch.Tensor, typed: torch.Tensor | None) -> str:
    """xxh3-64 of a tensor's row-major bytes: ``src`` (its uint8 view) or ``typed`` when it is not contiguous; a
    non-contiguous or device tensor is read in bounded pieces (never a whole second copy)."""
    return digest_pieces(as_memoryview(p) for p in pieces(src if typed is None else typed))


#: below this many bytes in all, hashing stays on the caller's thread (handing work over costs more)
PARALLEL_BYTES = 16 << 20

#: a way to run a call on a worker thread: ``submit(fn, *args)`` returns its future
Submit = Callable[..., "concurrent.futures.Future[Any]"]


def _digest_each(items: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list[str]:
    return [bytes_digest(src, typed) for src, typed in items]


def digest_tensors(items: list[tuple[torch.Tensor, torch.Tensor | None]], submit: Submit | None = None,
            workers: int = 1) -> list[str]:
    """`bytes_digest` of each ``(src, typed)``; with ``submit``, the largest go to ``workers`` worker threads
    while the caller hashes the rest (xxhash lets go of the GIL, so the cores share the work).

    A worker's share that has not started by the time the caller is done with its own is taken back and hashed by
    the caller: busy or hung workers never hold a save up.
    """
    sizes = [src.numel() if typed is None else typed.numel() * typed.element_size() for src, typed in items]
    if submit is None or workers < 1 or sum(sizes) < PARALLEL_BYTES:
        return _digest_each(items)
    bins: list[list[int]] = [[] for _ in range(workers + 1)]  # the last one is the caller's
    load = [0] * len(bins)
    for i in sorted(range(len(items)), key=lambda i: -sizes[i]):
        k = min(range(len(bins)), key=lambda k: load[k])
        bins[k].append(i)
        load[k] += sizes[i]
    futures = [submit(_digest_each, [items[i] for i in b]) for b in bins[:-1]]
    out: list[str] = [""] * len(items)
    for i, value in zip(bins[-1], _digest_each([items[i] for i in bins[-1]])):
        out[i] = value
    for b, future in zip(bins, futures):
        values = _digest_each([items[i] for i in b]) if future.cancel() else future.result()
        for i, value in zip(b, values):
            out[i] = value
    return out
