"""Snapshot stage: turn a training state into a write plan and copy its bytes into staging buffers.

``prepare`` walks the state on the caller's thread, encodes its structure for the manifest, de-duplicates tensors
that share storage, pickles non-JSON leaves (so they too are captured at call time), moves XLA tensors to host in one
batched transfer, and lays every byte out into fixed-size chunks.  ``Plan.fill`` then copies one chunk's bytes into
a staging buffer; the engine drives it chunk by chunk so a state larger than the host-memory budget streams through.
"""

from __future__ import annotations

import copy
import io
import json
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import xla
from .errors import CheckpointError
from .storage import alias
from .manifest import SAFETENSORS_DTYPES, decode, dtype_name, encode_float, finish_tensor, view_tensor

HEADER_ALIGN = 64  # data section starts 64-byte aligned so every tensor in it is aligned to its item size


@dataclass
class Entry:
    """One run of bytes written into a shard: a tensor, a shared storage blob, a pickled object or a header."""

    name: str
    nbytes: int
    itemsize: int
    src: torch.Tensor  # uint8 view of the bytes, or the tensor itself when it is not contiguous
    typed: torch.Tensor | None = None  # the typed tensor, for non-contiguous copies
    record: dict[str, Any] = field(default_factory=dict)  # manifest entry; offset/shard filled by layout
    st_dtype: str = "U8"
    st_shape: list[int] = field(default_factory=list)
    offset: int = 0  # file offset (shard layout) or buffer offset (bin layout)
    _contig: torch.Tensor | None = None

    def copy_into(self, dest: torch.Tensor, start: int, end: int, non_blocking: bool) -> None:
        """Copy bytes ``[start, end)`` of this entry's contiguous image into ``dest`` (a uint8 view)."""
        if self.typed is None:
            dest.copy_(self.src[start:end], non_blocking=non_blocking)
        elif start == 0 and end == self.nbytes:
            dest.view(self.typed.dtype).view(self.typed.shape).copy_(self.typed, non_blocking=non_blocking)
        else:  # a non-contiguous tensor split across chunks: one temporary contiguous copy, kept for its pieces
            if self._contig is None:
                self._contig = self.typed.contiguous().reshape(-1).view(torch.uint8)
            dest.copy_(self._contig[start:end], non_blocking=non_blocking)


@dataclass
class Chunk:
    """A contiguous byte range of one output (shard file or staging bin), filled from pieces of entries."""

    shard: int
    offset: int
    nbytes: int
    pieces: list[tuple[Entry, int, int, int]] = field(default_factory=list)  # entry, start, end, offset in chunk
    ready: Any = None  # CUDA event recorded after the chunk's device copies


@dataclass
class Plan:
    tree: Any
    tensors: list[dict[str, Any]]
    storages: list[dict[str, Any]]
    objects: list[dict[str, Any]]
    entries: list[Entry]
    shard_sizes: list[int] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    chunk_bytes: int = 0
    values: list[Any] = field(default_factory=list)  # copied non-tensor leaves (copy plans only)
    _stream: Any = None  # CUDA side stream, when any source lives on CUDA

    @property
    def total_bytes(self) -> int:
        return sum(self.shard_sizes)

    def fill(self, chunk: Chunk, buf: torch.Tensor) -> None:
        """Copy ``chunk``'s bytes into ``buf``; runs on the caller's thread."""
        if self._stream is None:
            for entry, start, end, at in chunk.pieces:
                entry.copy_into(buf[at:at + end - start], start, end, False)
            return
        with torch.cuda.stream(self._stream):
            for entry, start, end, at in chunk.pieces:
                if entry.src.is_cuda:  # keep the caching allocator from reusing the source before we copied it
                    entry.src.record_stream(self._stream)
                entry.copy_into(buf[at:at + end - start], start, end, True)
            chunk.ready = torch.cuda.Event()
            chunk.ready.record(self._stream)

    def rebuild(self, buffers: list[torch.Tensor]) -> Any:
        """The copied state, its tensors aliasing ``buffers`` (one per chunk of a copy plan).

        Each tensor (or each group of overlapping views, which share in the original too) gets a storage of its own
        over its bytes (:func:`alias`), so serializers see exactly the sharing the original state had.
        """
        def own(r: dict[str, Any]) -> torch.Tensor:
            return alias(buffers[r["shard"]][r["offset"]:r["offset"] + r["nbytes"]])

        bases = [own(s) for s in self.storages]
        built: dict[int, torch.Tensor] = {}

        def tensor(i: int) -> torch.Tensor:
            if i not in built:
                r = self.tensors[i]
                view = view_tensor(r, None if "base" in r else own(r), bases[r["base"]] if "base" in r else None)
                built[i] = finish_tensor(r, view)
            return built[i]

        return decode(self.tree, tensor, self.values.__getitem__)

    def finish(self) -> None:
        """Order the caller's later CUDA work after our copies, so in-place updates cannot race them."""
        if self._stream is not None:
            done = torch.cuda.Event()
            done.record(self._stream)
            torch.cuda.current_stream().wait_event(done)


# ---------------------------------------------------------------- walking the state

class _Walker:
    """Encodes a state's structure and collects its leaves."""

    def __init__(self, pickle_objects: bool) -> None:
        self.pickle_objects = pickle_objects
        self.views: list[tuple[torch.Tensor, str]] = []  # unique tensor views, with the first path naming each
        self.view_index: dict[tuple, int] = {}
        self.objects: list[tuple[Any, str, str]] = []  # payload, path, type name
        self._active: set[int] = set()

    def walk(self, value: Any, path: str, depth: int = 0) -> Any:
        if value is None or isinstance(value, (bool, str)) or type(value) is int:
            return value
        if type(value) is float:
            return encode_float(value)
        if isinstance(value, torch.Tensor) and type(value) in (torch.Tensor, torch.nn.Parameter):
            if value.layout is torch.strided and not value.is_quantized and not value.is_nested:
                return {"tensor": self._tensor(value, path)}
        if isinstance(value, (torch.nn.Module, torch.optim.Optimizer)):
            value = value.state_dict()
        kind = {dict: "dict", OrderedDict: "odict", list: "list", tuple: "tuple"}.get(type(value))
        if kind is None:
            return {"object": self._object(value, path)}
        if id(value) in self._active:
            raise CheckpointError(f"the state refers to itself at {path or '<root>'}; cyclic states cannot be saved")
        self._active.add(id(value))
        try:
            if kind in ("list", "tuple"):
                return {kind: [self.walk(v, f"{path}.{i}" if path else str(i), depth + 1) for i, v in enumerate(value)]}
            node = {kind: [[self.walk(k, f"{path}.<key>", depth + 1), self.walk(v, _join(path, k), depth + 1)]
                           for k, v in value.items()]}
            metadata = getattr(value, "_metadata", None)  # state_dict() versions, read by load_state_dict
            if kind == "odict" and metadata is not None:
                node["metadata"] = self.walk(metadata, f"{path}._metadata", depth + 1)
            return node
        finally:
            self._active.discard(id(value))

    def _tensor(self, t: torch.Tensor, path: str) -> int:
        if t.device.type == "meta":
            raise CheckpointError(f"tensor at {path} is on the meta device and has no data to save; "
                                  "materialise it (e.g. module.to_empty + init) before saving")
        key: tuple = (id(t),)
        if t.numel() and not xla.is_xla(t):  # XLA storages expose no data pointer: such views stay distinct
            st = t.untyped_storage()
            key = (str(t.device), st.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype,
                   t.is_conj(), t.is_neg())  # z and z.conj() share every byte but not their values
        index = self.view_index.get(key)
        if index is None:
            index = self.view_index[key] = len(self.views)
            self.views.append((t, path))
        return index

    def _object(self, obj: Any, path: str) -> int:
        if self.pickle_objects:
            buf = io.BytesIO()
            try:
                torch.save(obj, buf)
            except Exception as exc:
                raise CheckpointError(
                    f"cannot save the {type(obj).__module__}.{type(obj).__qualname__} at {path or '<root>'}: "
                    f"it is not picklable ({exc}); convert it to plain data or a tensor first") from exc
            self.objects.append((bytearray(buf.getbuffer()), path, f"{type(obj).__module__}.{type(obj).__qualname__}"))
        else:
            self.objects.append((copy.deepcopy(obj), path, ""))
        return len(self.objects) - 1


def _join(path: str, key: Any) -> str:
    part = key if isinstance(key, str) else repr(key)
    return f"{path}.{part}" if path else part


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    """uint8 view of a contiguous tensor's bytes (as_strided: ``reshape`` keeps odd strides of size-1 dims)."""
    return t.as_strided((t.numel(),), (1,)).view(torch.uint8)


def _tensor_entries(walker: _Walker) -> tuple[list[dict], list[dict], list[Entry], bool]:
    """Manifest records and byte entries for the unique views; overlapping views of one storage share a blob."""
    views = walker.views
    # XLA: materialise pending work and bring every XLA tensor to host in one batched transfer.
    xla_at = [i for i, (t, _) in enumerate(views) if xla.is_xla(t)]
    host: dict[int, torch.Tensor] = {}
    if xla_at:
        host = dict(zip(xla_at, xla.to_cpu([views[i][0] for i in xla_at])))
    groups: dict[tuple, list[int]] = {}
    for i, (t, _) in enumerate(views):
        if t.numel() and i not in host and not (t.is_conj() or t.is_neg()):  # lazy conj/neg: own resolved bytes
            groups.setdefault((str(t.device), t.untyped_storage().data_ptr()), []).append(i)
    shared: dict[int, int] = {}  # view index -> storage index
    storages: list[dict] = []
    entries: list[Entry] = []
    for members in groups.values():
        if len(members) > 1 and _overlapping([views[i][0] for i in members]):
            base = views[members[0]][0]
            st = base.untyped_storage()
            blob = torch.empty(0, dtype=torch.uint8, device=base.device).set_(st)
            index = len(storages)
            storages.append({"nbytes": st.nbytes()})
            entries.append(Entry(f"__storage__.{index}", st.nbytes(), 1, blob, record=storages[-1], st_shape=[st.nbytes()]))
            for i in members:
                shared[i] = index
    cuda = False
    tensors: list[dict] = []
    for i, (t, path) in enumerate(views):
        t = host.get(i, t)
        original = views[i][0]
        record: dict[str, Any] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "device": str(original.device)}
        if original.requires_grad:
            record["requires_grad"] = True
        if isinstance(original, torch.nn.Parameter):
            record["parameter"] = True
        cuda = cuda or t.is_cuda
        if i in shared:
            record.update(base=shared[i], storage_offset=t.storage_offset(), stride=list(t.stride()))
            tensors.append(record)
            continue
        t = t.detach()
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
        nbytes = t.numel() * t.element_size()
        st_dtype = SAFETENSORS_DTYPES.get(t.dtype, "U8")
        entry = Entry(path or "<root>", nbytes, t.element_size(), _byte_view(t) if t.is_contiguous() else t,
                      typed=None if t.is_contiguous() else t, record=record, st_dtype=st_dtype,
                      st_shape=list(t.shape) if st_dtype != "U8" or t.dtype == torch.uint8 else [nbytes])
        record["nbytes"] = nbytes
        tensors.append(record)
        entries.append(entry)
    return tensors, storages, entries, cuda


def _overlapping(ts: list[torch.Tensor]) -> bool:
    spans = []
    for t in ts:
        lo = t.storage_offset() * t.element_size()
        hi = lo + (sum((d - 1) * s for d, s in zip(t.shape, t.stride())) + 1) * t.element_size()
        spans.append((lo, hi))
    spans.sort()
    return any(b[0] < a[1] for a, b in zip(spans, spans[1:]))


def _object_entries(walker: _Walker) -> tuple[list[dict], list[Entry]]:
    records, entries = [], []
    for obj, path, type_name in walker.objects:
        record = {"type": type_name, "key": path, "nbytes": len(obj)}
        data = torch.frombuffer(obj, dtype=torch.uint8) if len(obj) else torch.empty(0, dtype=torch.uint8)
        records.append(record)
        entries.append(Entry(f"__object__.{path or '<root>'}", len(obj), 1, data, record=record, st_shape=[len(obj)]))
    return records, entries


# ---------------------------------------------------------------- layouts

def prepare(state: Any, shard_bytes: int, chunk_bytes: int) -> Plan:
    """Plan a native save: safetensors shards cut into ``chunk_bytes`` chunks."""
    walker = _Walker(pickle_objects=True)
    tree = walker.walk(state, "")
    tensors, storages, entries, cuda = _tensor_entries(walker)
    objects, obj_entries = _object_entries(walker)
    entries += obj_entries
    # Largest item size first keeps every tensor aligned inside the 64-byte aligned data section.
    entries.sort(key=lambda e: -e.itemsize)
    plan = Plan(tree, tensors, storages, objects, entries, chunk_bytes=chunk_bytes)
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    for index, members in enumerate(shards):
        header = _header(members, index)
        pos = len(header)
        for e in members:
            e.offset = pos
            e.record.update(shard=index, offset=pos)
            pos += e.nbytes
        size = pos
        plan.shard_sizes.append(size)
        hdr = Entry("__header__", len(header), 1, torch.frombuffer(bytearray(header), dtype=torch.uint8))
        _cut(plan, index, [hdr, *members], size, chunk_bytes)
    if cuda:
        plan._stream = _side_stream()
    return plan


def _header(members: list[Entry], shard: int) -> bytes:
    """The safetensors header (length prefix included), padded so the data section is 64-byte aligned."""
    meta: dict[str, Any] = {"__metadata__": {"format": "pt", "producer": "asyncckpt"}}
    pos = 0
    seen: dict[str, int] = {}
    for e in members:
        name = e.name
        if name in seen:
            seen[name] += 1
            name = f"{name}#{seen[name]}"
        seen.setdefault(name, 0)
        meta[name] = {"dtype": e.st_dtype, "shape": e.st_shape, "data_offsets": [pos, pos + e.nbytes]}
        pos += e.nbytes
    body = json.dumps(meta, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % HEADER_ALIGN)
    return struct.pack("<Q", len(body)) + body


def _cut(plan: Plan, shard: int, ordered: list[Entry], size: int, chunk_bytes: int) -> None:
    """Split one output of ``size`` bytes, holding ``ordered`` entries back to back, into chunks."""
    chunks = [Chunk(shard, off, min(chunk_bytes, size - off)) for off in range(0, size, chunk_bytes)] or [Chunk(shard, 0, 0)]
    pos = 0
    for e in ordered:
        start = pos
        while start < pos + e.nbytes:
            c = chunks[start // chunk_bytes]
            end = min(pos + e.nbytes, c.offset + c.nbytes)
            c.pieces.append((e, start - pos, end - pos, start - c.offset))
            start = end
        pos += e.nbytes
    plan.chunks.extend(chunks)


def _side_stream() -> Any:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    return stream


def prepare_copy(state: Any, chunk_bytes: int) -> Plan:
    """Plan an in-memory point-in-time copy: tensors packed into staging bins of about ``chunk_bytes``.

    Used when another serializer (a Lightning base CheckpointIO) writes the state: it receives the copy built by
    :meth:`Plan.rebuild`, whose tensors are views of the staging buffers.
    """
    walker = _Walker(pickle_objects=False)
    tree = walker.walk(state, "")
    tensors, storages, entries, cuda = _tensor_entries(walker)
    plan = Plan(tree, tensors, storages, [], entries, chunk_bytes=chunk_bytes)
    plan.values = [obj for obj, _, _ in walker.objects]
    bins: list[Chunk] = []
    pos = chunk_bytes
    for e in sorted(entries, key=lambda e: -e.nbytes):
        pos += -pos % HEADER_ALIGN
        if pos + e.nbytes > chunk_bytes and pos:
            bins.append(Chunk(len(bins), 0, 0))
            pos = 0
        e.offset = pos
        e.record.update(shard=bins[-1].shard, offset=pos)
        bins[-1].pieces.append((e, 0, e.nbytes, pos))
        pos += e.nbytes
        bins[-1].nbytes = pos
    plan.chunks = bins
    plan.shard_sizes = [b.nbytes for b in bins]
    if cuda:
        plan._stream = _side_stream()
    return plan
