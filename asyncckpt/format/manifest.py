"""The manifest: the JSON document whose presence commits a checkpoint, as typed records.

It maps the state's structure onto entries that live in shard files and records every chunk's checksum.
Everything read from a manifest is untrusted: `parse` validates it fully, against itself, before a loader
allocates or opens anything. docs/format.md is the specification.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import xxhash

from ..errors import CorruptCheckpointError, NewerFormatError
from ..version import __version__
from .dtypes import DTYPES
from .tree import decode, has_int_nodes, key_path, tensor_path

FORMAT = "asyncckpt"
VERSION = 1  # written unless a feature of a later version is used
REFERENCES_VERSION = 2  # shards held by another checkpoint (incremental saves)
GLOBAL_VERSION = 3  # many ranks: DCP's items, each tensor in chunks written by any rank (docs/format.md)
INT_NODES_VERSION = 4  # one writer, and the structure holds integers too long for JSON numbers ({"int": hex})
READABLE_VERSIONS = (1, 2, 3, 4)
MANIFEST_NAME = "manifest.json"
TEMP_INFIX = ".tmp-"  # a manifest being written is ``manifest.json.tmp-<random>``
#: shard files: ``shard-<save id>-<index>.safetensors`` (one writer) or ``shard-<save id>-r<rank>-<index>`` (ranks)
SHARD_RE = re.compile(r"^shard-[0-9a-f]{16}(?:-r[0-9]{5,9})?-[0-9]{5}\.safetensors$")
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._=+-]{0,254}$")  # a sibling checkpoint a shard may live in
MAX_MANIFEST_BYTES = 1 << 30  # far beyond any real manifest (a million tensors): a larger file is not ours
REF_PREFIX = ".ref-"  # ``.ref-<child>`` in a checkpoint: ``<child>`` holds references to its shards
MAX_RANKS = 10 ** 9
MAX_DIMS = 64
MAX_INDEX = 1 << 62  # sizes, strides and offsets beyond this overflow torch's int64 arithmetic
_PRIME = (1 << 61) - 1  # the field in which `_tiles` checks a tensor's chunks
DIGEST = "manifest_xxh3_64"  # last member: xxh3-64 of the compact JSON of all the others, in their order


def shard_name(save_id: str, index: int, rank: int | None = None) -> str:
    """The file name of shard ``index`` of save ``save_id`` (16 hex digits), written by ``rank`` if given."""
    if rank is None:
        return f"shard-{save_id}-{index:05d}.safetensors"
    return f"shard-{save_id}-r{rank:05d}-{index:05d}.safetensors"


def rank_of(name: str) -> int | None:
    """The rank in a shard file name, or None for a one-writer shard (or a name that is not ours)."""
    if not SHARD_RE.match(name):
        return None
    parts = name.split("-")
    return int(parts[2][1:]) if len(parts) == 4 else None


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a manifest still being written (or left by a killed commit)."""
    return name.startswith(MANIFEST_NAME + TEMP_INFIX)


# ---------------------------------------------------------------- records

@dataclass(frozen=True, slots=True)
class Span:
    """A run of bytes in one shard file."""

    shard: int
    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes

    def to_json(self) -> dict[str, int]:
        return {"shard": self.shard, "offset": self.offset, "nbytes": self.nbytes}


@dataclass(frozen=True, slots=True)
class ShardRecord:
    """One shard file: its size and one xxh3-64 digest per ``chunk_bytes`` run (the last one shorter)."""

    file: str
    nbytes: int
    chunk_bytes: int
    xxh3_64: tuple[str, ...]
    base: str | None = None  # the sibling checkpoint directory holding the file (incremental saves); None: this one

    def chunk_of(self, offset: int) -> int:
        """The index of the checksummed chunk holding byte ``offset``."""
        return offset // self.chunk_bytes

    def chunks(self) -> Iterator[tuple[int, int, int]]:
        """``(index, offset, nbytes)`` of every checksummed chunk."""
        for k, offset in enumerate(range(0, self.nbytes, self.chunk_bytes)):
            yield k, offset, min(self.chunk_bytes, self.nbytes - offset)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file, "nbytes": self.nbytes, "chunk_bytes": self.chunk_bytes,
                               "xxh3_64": list(self.xxh3_64)}
        if self.base is not None:
            out["in"] = self.base
        rank = rank_of(self.file)
        if rank is not None:
            out["rank"] = rank
        return out


@dataclass(frozen=True, slots=True)
class View:
    """Where a tensor lies inside a shared storage blob (``storages[base]``), in elements of its dtype."""

    base: int
    storage_offset: int
    stride: tuple[int, ...]


class _Typed:
    """What a tensor record and a chunked tensor derive from their ``dtype`` name and ``shape``."""

    __slots__ = ()
    dtype: str
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def logical_bytes(self) -> int:
        return math.prod(self.shape) * self.torch_dtype.itemsize


@dataclass(frozen=True, slots=True)
class TensorRecord(_Typed):
    """A tensor: its own bytes (``span``) or a view of a shared storage (``view``)."""

    dtype: str
    shape: tuple[int, ...]
    device: str
    span: Span | None = None
    view: View | None = None
    requires_grad: bool = False
    parameter: bool = False
    digest: str | None = None  # xxh3-64 of the tensor's own bytes, where recorded (saves others may build on)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dtype": self.dtype, "shape": list(self.shape), "device": self.device}
        if self.requires_grad:
            out["requires_grad"] = True
        if self.parameter:
            out["parameter"] = True
        if self.digest is not None:
            out["xxh3_64"] = self.digest
        if self.view is not None:
            out.update(base=self.view.base, storage_offset=self.view.storage_offset, stride=list(self.view.stride))
        else:
            assert self.span is not None
            out.update(self.span.to_json())
        return out


@dataclass(frozen=True, slots=True)
class StorageRecord:
    """Raw bytes of a storage shared by several overlapping views."""

    span: Span

    def to_json(self) -> dict[str, Any]:
        return self.span.to_json()


@dataclass(frozen=True, slots=True)
class ObjectRecord:
    """``torch.save`` bytes of a value JSON cannot hold; ``key`` is its key path, ``type`` its class."""

    type: str
    key: str
    span: Span

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "key": self.key, **self.span.to_json()}


@dataclass(frozen=True)
class Manifest:
    """A validated manifest of a checkpoint written by one process: what `asyncckpt.committed` lists and
    ``asyncckpt inspect`` shows.

    Attributes:
        save_id: the save's random id; its shard files carry it in their names.
        created_ns: when the snapshot was taken, in nanoseconds since the Unix epoch.
        shards: one record per shard file: its name, size in bytes, ``chunk_bytes`` and one xxh3-64 digest per
            chunk, and (``base``) the sibling checkpoint holding it for an incremental save.
        tensors: one record per distinct tensor: dtype, shape, saved device, and where its bytes lie (a span of a
            shard, or a view of a shared storage).
        storages: raw bytes of storages that several overlapping tensors view.
        objects: values JSON cannot hold, as ``torch.save`` bytes, with their key path and class name.
        tree: the state's structure as JSON, plain values inline, tensors and objects by index.
        producer: what wrote it (``"asyncckpt <version>"``).
        torch_version: the torch version that wrote it.
        metadata: the JSON object given to ``save(..., metadata=)`` (a manager's step and metrics); None without.
        chain: incremental saves since the last full one (0: this checkpoint holds all its bytes).
        sequence: orders the checkpoints of one directory (newer saves are higher); 0 for checkpoints written
            before sequences existed, which sort by ``created_ns``.
    """

    save_id: str
    created_ns: int
    shards: tuple[ShardRecord, ...]
    tensors: tuple[TensorRecord, ...]
    storages: tuple[StorageRecord, ...]
    objects: tuple[ObjectRecord, ...]
    tree: Any
    producer: str = f"asyncckpt {__version__}"
    torch_version: str = field(default_factory=lambda: torch.__version__)
    metadata: dict[str, Any] | None = None  # the caller's JSON data (the manager's step and metrics)
    chain: int = 0  # incremental saves since the last full one (0: this one holds all its bytes)
    sequence: int = 0  # orders checkpoints of a directory (asyncckpt.concurrency.clock); 0: written before it existed

    @property
    def version(self) -> int:
        """The lowest format version that has every feature this manifest uses."""
        if has_int_nodes(self.tree):
            return INT_NODES_VERSION
        return REFERENCES_VERSION if self.bases else VERSION

    @property
    def order(self) -> int:
        """What listings sort by: the sequence, or the wall clock for manifests older than sequences."""
        return self.sequence or self.created_ns

    @property
    def bases(self) -> set[str]:
        """The sibling checkpoints this one holds references into."""
        return {s.base for s in self.shards if s.base is not None}

    @property
    def total_bytes(self) -> int:
        """Bytes of all shard files, those held in base checkpoints included (manifest excluded)."""
        return sum(s.nbytes for s in self.shards)

    def byte_records(self) -> Iterator[TensorRecord | StorageRecord | ObjectRecord]:
        """Every record that owns bytes in a shard (tensors with a span, storages, objects).

        Yields:
            Tensor records with a span, then storage records, then object records.
        """
        yield from (t for t in self.tensors if t.span is not None)
        yield from self.storages
        yield from self.objects

    def seal(self) -> bytes:
        """The manifest's bytes, as committed to ``manifest.json`` (see `seal`).

        Returns:
            Compact JSON ending in an xxh3-64 digest of the rest, which readers check.
        """
        doc: dict[str, Any] = {
            "format": FORMAT, "version": self.version, "producer": self.producer, "torch": self.torch_version, "save_id": self.save_id, "created_ns": self.created_ns,
            "shards": [s.to_json() for s in self.shards], "tensors": [t.to_json() for t in self.tensors],
            "storages": [s.to_json() for s in self.storages], "objects": [o.to_json() for o in self.objects],
            "tree": self.tree,
        }
        if self.metadata is not None:
            doc["metadata"] = self.metadata
        if self.chain:
            doc["chain"] = self.chain
        if self.sequence:
            doc["sequence"] = self.sequence
        return seal(doc)


# ---------------------------------------------------------------- the global manifest of a multi-rank checkpoint

@dataclass(frozen=True, slots=True)
class TensorChunk:
    """One piece of a tensor as some rank wrote it: the box ``offsets`` + ``sizes`` of the global tensor, its bytes
    row-major and contiguous at ``span``."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    span: Span

    def to_json(self) -> dict[str, Any]:
        return {"offsets": list(self.offsets), "sizes": list(self.sizes), **self.span.to_json()}


@dataclass(frozen=True, slots=True)
class ChunkedTensor(_Typed):
    """A tensor of the global state (a DCP item): its global dtype and shape, and the chunks that tile it."""

    fqn: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[TensorChunk, ...]
    requires_grad: bool = False

    @property
    def whole(self) -> bool:
        """Whether one chunk holds the whole tensor: a one-process load views its bytes in the shard, copying none."""
        return len(self.chunks) == 1 and self.chunks[0].sizes == self.shape

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"fqn": self.fqn, "dtype": self.dtype, "shape": list(self.shape),
                               "chunks": [c.to_json() for c in self.chunks]}
        if self.requires_grad:
            out["requires_grad"] = True
        return out


@dataclass(frozen=True)
class GlobalManifest:
    """A validated manifest of a checkpoint written by many ranks through ``asyncckpt.dcp`` (format version 3).

    It holds what torch's DCP keeps in its pickled ``.metadata`` — every item's global shape, dtype and chunks,
    the planner's data, the storage meta — as JSON, plus where each chunk's bytes lie and every shard's checksums.
    ``planner_data`` is kept in the structure encoding (`asyncckpt.format.tree`); objects are ``torch.save``
    bytes keyed by their DCP name (``key``).

    Attributes:
        save_id: the save's random id; every rank's shard files carry it in their names.
        created_ns: when the coordinator planned the save, in nanoseconds since the Unix epoch.
        world_size: how many ranks wrote it.
        shards: one record per shard file of every rank (the rank is in its name): size in bytes, ``chunk_bytes``
            and one xxh3-64 digest per chunk.
        tensors: one record per DCP tensor item: its name (``fqn``), global dtype and shape, and the chunks that
            tile it, each with where its bytes lie.
        objects: non-tensor items, as ``torch.save`` bytes keyed by their DCP name.
        planner_data: DCP's planner data (the key path of each item), in the structure encoding.
        storage_meta: DCP's storage meta (``checkpoint_id``, ``save_id``, ``modules``), or None.
        dcp_version: the version of DCP's metadata format, or None.
        producer: what wrote it (``"asyncckpt <version>"``).
        torch_version: the torch version that wrote it.
        sequence: orders the checkpoints of one directory, as in `Manifest`.
    """

    save_id: str
    created_ns: int
    world_size: int
    shards: tuple[ShardRecord, ...]
    tensors: tuple[ChunkedTensor, ...]
    objects: tuple[ObjectRecord, ...]
    planner_data: Any = None
    storage_meta: dict[str, Any] | None = None
    dcp_version: str | None = None
    producer: str = f"asyncckpt {__version__}"
    torch_version: str = field(default_factory=lambda: torch.__version__)
    sequence: int = 0  # as in `Manifest`

    #: what a one-writer `Manifest` has and a multi-rank checkpoint never does (no caller metadata, no
    #: incremental chain), so code that lists checkpoints reads both kinds alike
    metadata = None
    chain = 0

    @property
    def bases(self) -> set[str]:
        """Always empty: a multi-rank checkpoint holds all its bytes."""
        return set()

    @property
    def total_bytes(self) -> int:
        """Bytes of all ranks' shard files (manifest excluded)."""
        return sum(s.nbytes for s in self.shards)

    @property
    def order(self) -> int:
        """What listings sort by: the sequence, or the wall clock for manifests older than sequences."""
        return self.sequence or self.created_ns

    def byte_spans(self) -> set[Span]:
        """Every run of shard bytes the manifest refers to (chunks of one tensor saved twice share one).

        Returns:
            The spans of every tensor chunk and object.
        """
        return {c.span for t in self.tensors for c in t.chunks} | {o.span for o in self.objects}

    def seal(self) -> bytes:
        """The manifest's bytes, as committed to ``manifest.json`` (see `seal`).

        Returns:
            Compact JSON ending in an xxh3-64 digest of the rest, which readers check.
        """
        return seal({
            "format": FORMAT, "version": GLOBAL_VERSION, "layout": "dcp", "producer": self.producer,
            "torch": self.torch_version, "save_id": self.save_id, "created_ns": self.created_ns,
            "world_size": self.world_size, "shards": [s.to_json() for s in self.shards],
            "tensors": [t.to_json() for t in self.tensors],
            "objects": [{"fqn": o.key, **o.span.to_json()} for o in self.objects],
            "planner_data": self.planner_data, "storage_meta": self.storage_meta, "dcp_version": self.dcp_version,
            **({"sequence": self.sequence} if self.sequence else {}),
        })


AnyManifest = Manifest | GlobalManifest


# ---------------------------------------------------------------- building tensors from records

def view_tensor(record: TensorRecord, data: torch.Tensor | None, base: torch.Tensor | None) -> torch.Tensor:
    """The tensor a record describes, as a view of ``data`` (its own bytes) or of ``base`` (a shared storage blob).

    Both are uint8 host tensors; no bytes are copied unless a shared blob is misaligned for the dtype.
    """
    dtype = record.torch_dtype
    if record.view is not None:
        assert base is not None
        if base.storage_offset() % dtype.itemsize:
            base = base.clone()
        return torch.empty(0, dtype=dtype).set_(
            base.untyped_storage(), base.storage_offset() // dtype.itemsize + record.view.storage_offset,
            record.shape, record.view.stride)
    assert data is not None
    return data.view(dtype).view(record.shape)


def finish_tensor(record: TensorRecord, t: torch.Tensor) -> torch.Tensor:
    """Restore what the record says besides bytes: Parameter type and requires_grad."""
    if record.parameter:
        return torch.nn.Parameter(t, requires_grad=record.requires_grad)
    if record.requires_grad:
        t.requires_grad_(True)
    return t


# ---------------------------------------------------------------- parsing and validation

def _body(doc: dict[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False)


def structure_problem(tree: Any) -> str | None:
    """Why the encoded structure ``tree`` cannot go into a manifest a load would read (its plain values are written
    into the manifest, which a load reads only up to `MAX_MANIFEST_BYTES`), naming the value that takes the
    most of it; None if it fits. ``save`` checks it before writing anything."""
    size = len(_body(tree))
    if size <= MAX_MANIFEST_BYTES:
        return None
    path, node, node_size = "", tree, size
    while True:  # down into the child that holds most of the bytes while one does
        children = _children(node, path)
        if not children:
            break
        child_size, child_path, child = max(((len(_body(c)), p, c) for p, c in children), key=lambda x: x[0])
        if 2 * child_size < node_size:
            break
        path, node, node_size = child_path, child, child_size
    return (f"its plain values take {size} bytes in the manifest, more than the {MAX_MANIFEST_BYTES} a load reads "
            f"({node_size} of them at {path or '<root>'}); store large text or lists of numbers as tensors")


def _children(node: Any, path: str) -> list[tuple[str, Any]]:
    """``(key path, encoded child)`` of an encoded container node (see `.tree`); [] for a leaf."""
    if not isinstance(node, dict):
        return []
    for kind in ("dict", "odict"):
        if kind in node:
            return [(key_path(path, k if isinstance(k, (str, int)) else _body(k)[:40]), v) for k, v in node[kind]]
    for kind in ("list", "tuple"):
        if kind in node:
            return [(key_path(path, str(i)), v) for i, v in enumerate(node[kind])]
    return []


def seal(doc: dict[str, Any]) -> bytes:
    """The bytes of the JSON manifest ``doc``: compact JSON whose last member is the checksum of all the others."""
    body = _body({k: v for k, v in doc.items() if k != DIGEST})
    return f'{body[:-1]},"{DIGEST}":"{xxhash.xxh3_64_hexdigest(body.encode())}"}}'.encode()


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise CorruptCheckpointError(f"manifest is invalid: {what}")


def _is_int(x: Any, lo: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= lo


@functools.lru_cache(maxsize=256)
def _is_device(name: str) -> bool:
    try:
        torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


def _sealed(doc: dict[str, Any], raw: bytes) -> bool:
    """Whether ``raw`` is exactly the sealed form of the ``doc`` parsed from it. Shard bytes carry checksums; this
    covers the manifest itself (offsets, keys, dtypes, numbers) and its form: a member repeated anywhere (JSON
    readers disagree on which copy wins), a changed byte or a re-formatted file all fail it."""
    try:
        return seal(doc) == bytes(raw)
    except (ValueError, TypeError, RecursionError):  # NaN, or nesting beyond what can be re-serialised
        return False


def looks_sealed(raw: bytes) -> bool:
    """Whether ``raw`` carries our format tag and an intact checksum, without parsing it: a cheap "this manifest is
    ours and undamaged" for callers that only need to know whose file it is (parsing a large one takes tens of ms)."""
    tail = f',"{DIGEST}":"'.encode()
    at = raw.rfind(tail)
    if not raw.startswith(f'{{"format":"{FORMAT}",'.encode()) or at < 0 or len(raw) != at + len(tail) + 18:
        return False
    return raw[at + len(tail):-2] == xxhash.xxh3_64_hexdigest(raw[:at] + b"}").encode() and raw.endswith(b'"}')


def parse(raw: bytes, where: str) -> AnyManifest:
    """Parse and validate manifest bytes read from ``where``; raise CorruptCheckpointError on any lie."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{where}: manifest is not valid JSON ({exc})") from exc
    if isinstance(doc, dict) and doc.get("format") == FORMAT and _is_int(doc.get("version")) \
            and doc["version"] > max(READABLE_VERSIONS):
        raise NewerFormatError(
            f"{where} was written by a newer asyncckpt ({doc.get('producer') or 'unknown producer'}, format version "
            f"{doc['version']}); this release ({__version__}) reads format versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}: upgrade asyncckpt (pip install -U asyncckpt) to load it")
    try:
        _expect(isinstance(doc, dict), "not an asyncckpt manifest")
        _expect(_sealed(doc, raw), "its checksum does not match: the manifest is damaged")
        doc.pop(DIGEST, None)
        return _validate(doc)
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(f"{where}: {exc}") from None


def _table(doc: dict[str, Any], name: str) -> list[dict[str, Any]]:
    table = doc.get(name)
    _expect(isinstance(table, list) and all(isinstance(x, dict) for x in table), f"{name} is not a list of entries")
    return table


def _span(entry: dict[str, Any], shards: list[ShardRecord], what: str) -> Span:
    _expect(_is_int(entry.get("shard")) and entry["shard"] < len(shards), f"{what} names no shard")
    _expect(_is_int(entry.get("offset")) and _is_int(entry.get("nbytes")), f"{what} has a bad offset/nbytes")
    span = Span(entry["shard"], entry["offset"], entry["nbytes"])
    _expect(span.end <= shards[span.shard].nbytes, f"{what} lies past its shard's end")
    return span


def _shard(s: Any) -> ShardRecord:
    _expect(isinstance(s, dict) and isinstance(s.get("file"), str) and SHARD_RE.match(s["file"]) is not None,
            f"shard file name {str(s.get('file') if isinstance(s, dict) else s)[:80]!r} is not allowed")
    _expect(_is_int(s.get("nbytes")) and _is_int(s.get("chunk_bytes"), 1), f"shard {s['file']} has bad sizes")
    sums = s.get("xxh3_64")
    _expect(isinstance(sums, list) and len(sums) == -(-s["nbytes"] // s["chunk_bytes"])
            and all(isinstance(h, str) and len(h) == 16 for h in sums), f"shard {s['file']} has bad checksums")
    base = s.get("in")
    _expect(base is None or (isinstance(base, str) and NAME_RE.match(base) is not None and ".." not in base),
            f"shard {s['file']} names a checkpoint outside the parent directory: {str(base)[:80]!r}")
    return ShardRecord(s["file"], s["nbytes"], s["chunk_bytes"], tuple(sums), base)


def shape_problem(shape: Any, itemsize: int) -> str | None:
    """Why a tensor of ``shape`` cannot be stored (the same rule for saving and loading), or None."""
    if not isinstance(shape, (list, tuple)) or not all(_is_int(d) for d in shape):
        return "its shape is not a list of non-negative integers"
    if len(shape) > MAX_DIMS:
        return f"it has {len(shape)} dimensions (the format stores at most {MAX_DIMS})"
    if max(shape, default=0) >= MAX_INDEX or math.prod(shape) * itemsize >= MAX_INDEX:
        return f"its size overflows 64-bit offsets (shape {list(shape)[:8]})"
    return None


def _tensor(t: dict[str, Any], i: int, shards: list[ShardRecord], storages: list[StorageRecord],
            tree: Any) -> TensorRecord:
    what = f"tensor {i}"
    _expect(isinstance(t.get("dtype"), str) and t["dtype"] in DTYPES,
            f"{what} has unknown dtype {str(t.get('dtype'))[:40]!r}")
    dtype = DTYPES[t["dtype"]]
    itemsize = dtype.itemsize
    shape = t.get("shape")
    _expect(shape_problem(shape, itemsize) is None and isinstance(shape, list), f"{what} has a bad shape")
    _expect(isinstance(t.get("device"), str) and len(t["device"]) < 64 and _is_device(t["device"]),
            f"{what} has a bad device")
    if t["device"].partition(":")[0] == "meta":  # no saved tensor is there (save refuses one): it would load data-less
        _expect(False, f"{what} (at {tensor_path(tree, i) or 'no key'}) is on the meta device, which holds no data")
    requires_grad, parameter = t.get("requires_grad", False), t.get("parameter", False)
    digest = t.get("xxh3_64")
    _expect(digest is None or (isinstance(digest, str) and len(digest) == 16), f"{what} has a bad digest")
    _expect(isinstance(requires_grad, bool) and isinstance(parameter, bool), f"{what} has bad flags")
    _expect(not (requires_grad or parameter) or dtype.is_floating_point or dtype.is_complex,
            f"{what} of dtype {t['dtype']} cannot require gradients")
    numel = math.prod(shape)
    if "base" in t:  # a view into a shared storage blob
        _expect(_is_int(t["base"]) and t["base"] < len(storages), f"{what} names no storage")
        stride = t.get("stride")
        _expect(isinstance(stride, list) and len(stride) == len(shape)
                and all(_is_int(x) and x < MAX_INDEX for x in stride)
                and _is_int(t.get("storage_offset")) and t["storage_offset"] < MAX_INDEX, f"{what} has a bad view")
        if numel:
            last = t["storage_offset"] + sum((d - 1) * s for d, s in zip(shape, stride))
            _expect((last + 1) * itemsize <= storages[t["base"]].span.nbytes, f"{what} views past its storage")
        else:  # torch asserts on an empty view that starts past its storage's end
            _expect(t["storage_offset"] * itemsize <= storages[t["base"]].span.nbytes, f"{what} starts past its storage")
        view = View(t["base"], t["storage_offset"], tuple(stride))
        return TensorRecord(t["dtype"], tuple(shape), t["device"], view=view, requires_grad=requires_grad,
                            parameter=parameter, digest=digest)
    span = _span(t, shards, what)
    _expect(numel * itemsize == span.nbytes, f"{what} shape/dtype disagree with its size")
    _expect(span.offset % itemsize == 0, f"{what} is misaligned for {t['dtype']}")
    return TensorRecord(t["dtype"], tuple(shape), t["device"], span=span, requires_grad=requires_grad,
                        parameter=parameter, digest=digest)


def _header(doc: dict[str, Any]) -> tuple[str, list[ShardRecord]]:
    """The members every version shares: save id, timestamp, shards."""
    _expect(_is_int(doc.get("created_ns")) and doc["created_ns"] < MAX_INDEX,
            "created_ns is not a timestamp (nanoseconds since 1970, before 2**62: the year 2116)")
    _expect(_is_int(doc.get("sequence", 0)) and doc.get("sequence", 0) < MAX_INDEX, "sequence is not a count")
    save_id = doc.get("save_id", "")
    _expect(isinstance(save_id, str) and len(save_id) <= 64, "save_id is not a string")
    _expect(isinstance(doc.get("shards"), list), "shards is not a list")
    shards = [_shard(s) for s in doc["shards"]]
    _expect(len({(s.base, s.file) for s in shards}) == len(shards), "a shard is listed twice")
    return save_id, shards


def _validate(doc: dict[str, Any]) -> AnyManifest:
    _expect(doc.get("format") == FORMAT, "not an asyncckpt manifest")
    version = doc.get("version")
    _expect(version in READABLE_VERSIONS,
            f"unsupported version {str(version)[:20]!r} (this reader knows "
            f"{', '.join(map(str, READABLE_VERSIONS))})")
    if version == GLOBAL_VERSION:
        return _validate_global(doc)
    _expect(doc.get("layout") is None, "a layout member needs version 3")
    save_id, shards = _header(doc)
    _expect(version >= REFERENCES_VERSION or not any(s.base for s in shards), "references need version 2")
    storages = [StorageRecord(_span(st, shards, f"storage {i}")) for i, st in enumerate(_table(doc, "storages"))]
    tensors = [_tensor(t, i, shards, storages, doc.get("tree")) for i, t in enumerate(_table(doc, "tensors"))]
    objects = []
    for i, o in enumerate(_table(doc, "objects")):
        span = _span(o, shards, f"object {i}")
        _expect(isinstance(o.get("type"), str), f"object {i} has no type")
        key = o.get("key", "")
        _expect(isinstance(key, str), f"object {i} has a bad key")
        objects.append(ObjectRecord(o["type"], key, span))
    _expect(_claims_disjoint([(t.span, True) for t in tensors if t.span is not None]
                             + [(r.span, False) for r in (*storages, *objects)]), "two records claim the same bytes")
    _expect("tree" in doc, "no structure")
    producer, torch_version = doc.get("producer", ""), doc.get("torch", "")
    metadata, chain = doc.get("metadata"), doc.get("chain", 0)
    _expect(metadata is None or isinstance(metadata, dict), "metadata is not an object")
    _expect(_is_int(chain), "chain is not a count")
    return Manifest(save_id, doc["created_ns"], tuple(shards), tuple(tensors), tuple(storages), tuple(objects),
                    doc["tree"], producer if isinstance(producer, str) else "",
                    torch_version if isinstance(torch_version, str) else "", metadata, chain, doc.get("sequence", 0))


def _claims_disjoint(claims: list[tuple[Span, bool]]) -> bool:
    """Whether no two records claim overlapping bytes, except identical spans that both may share (one tensor
    under two names). A load then holds each stored byte at most once however the records are arranged, so a
    small hostile checkpoint cannot make it allocate many times its size."""
    order = sorted((c for c in claims if c[0].nbytes), key=lambda c: (c[0].shard, c[0].offset, -c[0].nbytes))
    last: tuple[Span, bool] | None = None
    for span, shareable in order:
        if last is not None and last[0].shard == span.shard and span.offset < last[0].end:
            if not (span == last[0] and shareable and last[1]):
                return False
        if last is None or last[0].shard != span.shard or span.end > last[0].end:
            last = (span, shareable)
    return True


def _ints(x: Any, n: int) -> bool:
    return isinstance(x, list) and len(x) == n and all(_is_int(v) and v < MAX_INDEX for v in x)


def _tiles(shape: list[int], chunks: list[TensorChunk]) -> bool:
    """Whether the boxes cover every element of ``shape`` exactly once, in O(chunks × dims) for any layout (a sweep
    comparing active boxes pairwise was quadratic on a staircase). A box is the signed sum of the orthants at its
    corners, which are linearly independent, so the boxes tile ``shape`` iff sum_box prod_d (x[d, o_d] - x[d, o_d +
    s_d]) equals prod_d (x[d, 0] - x[d, shape_d]) as polynomials; at fresh random points modulo a 61-bit prime, a
    tiling always passes and anything else with probability at most dims / 2**61 (Schwartz-Zippel)."""
    rng = random.Random(secrets.randbits(128))
    point: dict[tuple[int, int], int] = {}

    def x(d: int, c: int) -> int:
        v = point.get((d, c))
        if v is None:
            v = point[d, c] = rng.randrange(_PRIME)
        return v

    def corners(offsets: Any, sizes: Any) -> int:
        out = 1
        for d, (o, n) in enumerate(zip(offsets, sizes)):
            out = out * (x(d, o) - x(d, o + n)) % _PRIME
        return out

    total = sum(corners(c.offsets, c.sizes) for c in chunks)
    return (total - corners([0] * len(shape), shape)) % _PRIME == 0


def _chunked(t: Any, i: int, shards: list[ShardRecord]) -> ChunkedTensor:
    what = f"tensor {i}"
    _expect(isinstance(t, dict) and isinstance(t.get("fqn"), str), f"{what} has no name")
    what = f"tensor {t['fqn'][:80]!r}"
    _expect(isinstance(t.get("dtype"), str) and t["dtype"] in DTYPES,
            f"{what} has unknown dtype {str(t.get('dtype'))[:40]!r}")
    itemsize = DTYPES[t["dtype"]].itemsize
    shape = t.get("shape")
    problem = shape_problem(shape, itemsize)
    _expect(problem is None and isinstance(shape, list), f"{what}: {problem or 'bad shape'}")
    requires_grad = t.get("requires_grad", False)
    _expect(isinstance(requires_grad, bool), f"{what} has bad flags")
    raw = t.get("chunks")
    _expect(isinstance(raw, list) and raw and all(isinstance(c, dict) for c in raw), f"{what} has no chunks")
    chunks = []
    for k, c in enumerate(raw):
        where = f"{what} chunk {k}"
        _expect(_ints(c.get("offsets"), len(shape)) and _ints(c.get("sizes"), len(shape)),
                f"{where} has bad offsets/sizes for shape {shape[:8]}")
        _expect(all(o + n <= d for o, n, d in zip(c["offsets"], c["sizes"], shape)),
                f"{where} lies outside the tensor's shape {shape[:8]}")
        span = _span(c, shards, where)
        _expect(math.prod(c["sizes"]) * itemsize == span.nbytes, f"{where}: its sizes and dtype disagree with nbytes")
        _expect(span.offset % itemsize == 0, f"{where} is misaligned for {t['dtype']}")
        chunks.append(TensorChunk(tuple(c["offsets"]), tuple(c["sizes"]), span))
    # the chunks must tile the tensor exactly: no gap (a load would leave stale values), no overlap
    filled = [c for c in chunks if math.prod(c.sizes)]
    _expect(sum(math.prod(c.sizes) for c in filled) == math.prod(shape), f"{what}: its chunks do not cover it")
    _expect(_tiles(shape, filled), f"{what}: two of its chunks overlap")
    return ChunkedTensor(t["fqn"], t["dtype"], tuple(shape), tuple(chunks), requires_grad)


def _shared_copy(tensors: list[ChunkedTensor]) -> str | None:
    """Which span backs two chunks that a one-process load copies (chunks of tensors saved in pieces), or None. Only
    the same chunk of one tensor saved under several names (identical dtype, shape and chunks: tied weights, which a
    rank writes once and a load assembles once) may share one. Spans are disjoint or identical, so a load then
    copies each stored byte at most once: N chunks at one span would otherwise make it allocate N times the shard."""
    names: dict[tuple[Any, ...], int] = {}  # one number per distinct tensor, so chunk lists are compared once each
    owner: dict[Span, tuple[int, int, str]] = {}
    for t in tensors:
        if t.whole:
            continue
        same = names.setdefault((t.dtype, t.shape, t.chunks), len(names))
        for k, c in enumerate(t.chunks):
            if not c.span.nbytes:
                continue
            first = owner.setdefault(c.span, (same, k, t.fqn))
            if first[:2] != (same, k):
                return (f"chunk {k} of tensor {t.fqn[:80]!r} has the bytes of chunk {first[1]} of tensor "
                        f"{first[2][:80]!r} (only one tensor saved under several names may share chunks)")
    return None


def _planner_data(node: Any) -> Any:
    """Planner data must be a plain structure (no tensors, no objects): it is checked by decoding it."""
    def refuse(i: int) -> Any:
        raise CorruptCheckpointError("planner_data refers to a tensor or an object")

    try:
        decode(node, refuse, refuse)
    except CorruptCheckpointError as exc:
        _expect(False, f"planner_data is not a plain structure ({exc})")
    return node


def _storage_meta(meta: Any) -> dict[str, Any] | None:
    if meta is None:
        return None
    _expect(isinstance(meta, dict) and set(meta) <= {"checkpoint_id", "save_id", "modules"}
            and all(meta.get(k) is None or isinstance(meta[k], str) for k in ("checkpoint_id", "save_id"))
            and isinstance(meta.get("modules", []), list) and all(isinstance(m, str) for m in meta.get("modules", [])),
            "storage_meta is malformed")
    return meta


def _validate_global(doc: dict[str, Any]) -> GlobalManifest:
    _expect(doc.get("layout") == "dcp", f"unknown layout {str(doc.get('layout'))[:40]!r}")
    save_id, shards = _header(doc)
    world = doc.get("world_size")
    _expect(_is_int(world, 1) and world <= MAX_RANKS, "world_size is not a positive integer")
    for s in doc["shards"]:
        _expect(s.get("rank", rank_of(s["file"])) == rank_of(s["file"]), f"shard {s['file']} names two ranks")
    _expect(not any(s.base for s in shards), "a multi-rank checkpoint cannot reference another one's shards")
    tensors = [_chunked(t, i, shards) for i, t in enumerate(_table(doc, "tensors"))]
    objects = []
    for i, o in enumerate(_table(doc, "objects")):
        _expect(isinstance(o.get("fqn"), str), f"object {i} has no name")
        objects.append(ObjectRecord("", o["fqn"], _span(o, shards, f"object {o['fqn'][:80]!r}")))
    names = [t.fqn for t in tensors] + [o.key for o in objects]
    _expect(len(set(names)) == len(names), "an item is listed twice")
    _expect(_claims_disjoint([(c.span, True) for t in tensors for c in t.chunks] + [(o.span, False) for o in objects]),
            "two items claim the same bytes")
    shared = _shared_copy(tensors)
    _expect(shared is None, str(shared))
    version, producer, torch_version = doc.get("dcp_version"), doc.get("producer", ""), doc.get("torch", "")
    _expect(version is None or isinstance(version, str), "dcp_version is not a string")
    return GlobalManifest(save_id, doc["created_ns"], world, tuple(shards), tuple(tensors), tuple(objects),
                          _planner_data(doc.get("planner_data")), _storage_meta(doc.get("storage_meta")), version,
                          producer if isinstance(producer, str) else "",
                          torch_version if isinstance(torch_version, str) else "", doc.get("sequence", 0))
