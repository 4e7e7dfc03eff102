"""Incremental saves: which tensors are unchanged since a base checkpoint, by the digest of their bytes.

A save with a base hashes every tensor that owns its bytes (xxh3-64, on the caller's thread) and compares it with the
base's record under the same key path: same dtype, shape and digest means the new checkpoint references the base's
bytes instead of copying and writing them again. Correctness never depends on version counters unless the caller
opts in: with ``trust_versions``, a tensor whose storage, layout and ``_version`` are those recorded when this engine
last hashed it takes that digest without being read (writes through ``.data`` or foreign kernels do not bump
``_version``, so only frozen tensors should be trusted this way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    by_key: dict[str, TensorRecord] = field(default_factory=dict)

    @classmethod
    def of(cls, name: str, manifest: Manifest) -> "Base":
        tree = structure(manifest.tree, len(manifest.tensors), len(manifest.objects))
        by_key = {}
        for path, leaf in leaves(tree):
            if isinstance(leaf, Ref) and leaf.kind == "tensor":
                record = manifest.tensors[leaf.index]
                if record.span is not None and record.digest is not None:
                    by_key.setdefault(path, record)
        return cls(name, manifest, by_key)

    def shard(self, index: int) -> ShardRecord:
        """The base's shard as the new checkpoint names it: in the directory that physically holds it."""
        s = self.manifest.shards[index]
        return s if s.base is not None else ShardRecord(s.file, s.nbytes, s.chunk_bytes, s.xxh3_64, self.name)

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
    """Digests this engine computed, keyed by where a tensor's bytes live, with the ``_version`` they had."""

    seen: dict[tuple[Any, ...], tuple[int, str]] = field(default_factory=dict)

    def known(self, t: torch.Tensor) -> str | None:
        key = _identity(t)
        entry = self.seen.get(key) if key is not None else None
        return entry[1] if entry is not None and entry[0] == t._version else None

    def remember(self, t: torch.Tensor, value: str) -> None:
        key = _identity(t)
        if key is not None:
            self.seen[key] = (t._version, value)


def bytes_digest(src: torch.Tensor, typed: torch.Tensor | None) -> str:
    """xxh3-64 of a tensor's row-major bytes: ``src`` (its uint8 view) or ``typed`` when it is not contiguous; a
    non-contiguous or device tensor is read in bounded pieces (never a whole second copy)."""
    return digest_pieces(as_memoryview(p) for p in pieces(src if typed is None else typed))
