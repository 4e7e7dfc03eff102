"""The write plan: a walked state laid out into shards (or staging bins) cut into chunks, and the copy of a chunk.

``prepare`` plans a native save (safetensors shards cut into ``chunk_bytes`` chunks); ``prepare_copy`` plans an
in-memory point-in-time copy handed to another serializer. ``Plan.fill`` copies one chunk's bytes into a staging
buffer on the caller's thread; the engine drives it chunk by chunk.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CheckpointError, InvalidArgumentError
from ..format.dtypes import SAFETENSORS_DTYPES, dtype_name
from ..format.manifest import (MAX_MANIFEST_BYTES, ObjectRecord, ShardRecord, Span, StorageRecord, TensorRecord,
                               View, finish_tensor, structure_problem, view_tensor)
from ..format.parts import NO_RULES, PartRules, headroom, shard_chunk
from ..format.safetensors import HEADER_ALIGN, HeaderEntry, build_header
from ..format.tree import decode
from ..memory.buffers import alias
from . import devices, xla
from .incremental import Base, Submit, VersionMemo, digest_tensors
from .strided import copy_range
from .walk import Walker, walk_state


@dataclass
class Entry:
    """One run of bytes written into a shard: a tensor, a shared storage blob, a pickled object or a header."""

    name: str
    nbytes: int
    itemsize: int
    src: torch.Tensor  # uint8 view of the bytes, or the tensor itself when it is not contiguous
    typed: torch.Tensor | None = None  # the typed tensor, for non-contiguous copies
    st_dtype: str = "U8"
    st_shape: tuple[int, ...] = ()
    shard: int = 0
    offset: int = 0  # file offset (shard layout) or buffer offset (bin layout)
    source: torch.Tensor | None = None  # the caller's tensor, whose version counter a deferred copy checks
    version: int = 0  # its ``_version`` when the save was called
    transient: bool = False  # bytes captured at call time (a pickle): dropped once copied into staging

    @property
    def span(self) -> Span:
        return Span(self.shard, self.offset, self.nbytes)

    def changed(self) -> bool:
        """Whether the caller's tensor was modified in place since `Plan.stamp`."""
        return self.source is not None and self.source._version != self.version

    def copied(self, end: int) -> None:
        """Note that bytes up to ``end`` are in staging: a pickle's bytes are let go after their last piece, so a
        save holds each pickled value only until it is staged, not until the save ends (or the plan is reused)."""
        if self.transient and end == self.nbytes:
            self.src = torch.empty(0, dtype=torch.uint8)

    def copy_into(self, dest: torch.Tensor, start: int, end: int, non_blocking: bool) -> None:
        """Copy bytes ``[start, end)`` of this entry's contiguous image into ``dest`` (a uint8 view)."""
        if self.typed is None:
            dest.copy_(self.src[start:end], non_blocking=non_blocking)
        else:  # read in place: a contiguous copy would hold the whole tensor again, outside the budget
            copy_range(dest, self.typed, start, end, non_blocking)


@dataclass
class Chunk:
    """A contiguous byte range of one output (shard file or staging bin), filled from pieces of entries."""

    shard: int
    offset: int
    nbytes: int
    pieces: list[tuple[Entry, int, int, int]] = field(default_factory=list)  # entry, start, end, offset in chunk


@dataclass
class TensorInfo:
    """What the manifest will say of one tensor, before its bytes have a place."""

    dtype: str
    shape: tuple[int, ...]
    device: str
    requires_grad: bool
    parameter: bool
    entry: Entry | None = None  # its own bytes
    view: tuple[int, int, tuple[int, ...]] | None = None  # (storage index, storage offset, stride)
    digest: str | None = None
    reused: Span | None = None  # its bytes stay in a base checkpoint: the span, shard index into Plan.external

    def record(self, own_shards: int) -> TensorRecord:
        if self.view is not None:
            base, offset, stride = self.view
            return TensorRecord(self.dtype, self.shape, self.device, view=View(base, offset, stride),
                                requires_grad=self.requires_grad, parameter=self.parameter)
        if self.reused is not None:
            span = Span(own_shards + self.reused.shard, self.reused.offset, self.reused.nbytes)
        else:
            assert self.entry is not None
            span = self.entry.span
        return TensorRecord(self.dtype, self.shape, self.device, span=span, requires_grad=self.requires_grad,
                            parameter=self.parameter, digest=self.digest)


@dataclass
class Plan:
    tree: Any
    tensors: list[TensorInfo]
    storages: list[Entry]
    objects: list[tuple[str, str, Entry]]  # type name, key path, bytes
    entries: list[Entry]
    shard_sizes: list[int] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    chunk_bytes: int = 0
    shard_chunks: list[int] = field(default_factory=list)  # each shard's chunk size (chunk_bytes, or a bit more)
    values: list[Any] = field(default_factory=list)  # copied non-tensor leaves (copy plans only)
    stream: Any = None  # CUDA side stream, when any source lives on CUDA
    external: list[ShardRecord] = field(default_factory=list)  # base shards that reused tensors live in
    chain: int = 0  # incremental saves since the last full one

    @property
    def total_bytes(self) -> int:
        return sum(self.shard_sizes)

    def records(self) -> tuple[tuple[TensorRecord, ...], tuple[StorageRecord, ...], tuple[ObjectRecord, ...]]:
        """The manifest records of the laid-out plan."""
        own = len(self.shard_sizes)
        return (tuple(t.record(own) for t in self.tensors), tuple(StorageRecord(e.span) for e in self.storages),
                tuple(ObjectRecord(type_name, key, e.span) for type_name, key, e in self.objects))

    def fill(self, chunk: Chunk, buf: torch.Tensor) -> Any:
        """Copy ``chunk``'s bytes into ``buf``; runs on the caller's thread. Returns the CUDA event the bytes are
        ready after (copies from a device are queued on a side stream), or None when they are there already."""
        if self.stream is None:
            _fill_host(chunk, buf)
            return None
        with torch.cuda.stream(self.stream):
            for entry, start, end, at in chunk.pieces:
                if entry.src.is_cuda:  # keep the caching allocator from reusing the source before we copied it
                    entry.src.record_stream(self.stream)
                entry.copy_into(buf[at:at + end - start], start, end, True)
                entry.copied(end)
            return devices.record(self.stream)

    def stamp(self) -> bool:
        """Record every source tensor's version counter: a deferred copy proves against it that what it copied is
        what the state held when ``save`` was called. False if a source keeps no counter (an inference tensor):
        such a copy cannot be proven, and is taken at once instead."""
        try:
            for entry in self.entries:
                if entry.source is not None:
                    entry.version = entry.source._version
        except RuntimeError:  # "Inference tensors do not track version counter"
            return False
        return True

    def check_unchanged(self, *chunks: Chunk) -> None:
        """Raise if a tensor whose bytes ``chunks`` hold was modified since `stamp`. An in-place update bumps the
        counter when its kernel returns, not when it starts: checked after each chunk's copy, and once more for
        all chunks when the copy ends, an update that overlapped the copy is caught unless it is still running
        then (the fence, not this check, is what excludes that)."""
        for chunk in chunks:
            for entry, _, _, _ in chunk.pieces:
                if entry.changed():
                    raise CheckpointError(
                        f"the tensor at {entry.name} was modified while the deferred snapshot was copying it; nothing "
                        "of this save was committed. Let an optimizer step do the update (it waits for the copy), or "
                        "await handle.snapshotted() before changing tensors outside one")

    def finish(self) -> None:
        """Order the caller's later CUDA work after our copies, so in-place updates cannot race them."""
        if self.stream is not None:
            devices.fence(self.stream)

    def rebuild(self, buffers: list[torch.Tensor], made: list[tuple[torch.Tensor, int]] | None = None) -> Any:
        """The copied state, its tensors aliasing ``buffers`` (one per bin of a copy plan).

        Each tensor (or each group of overlapping views, which share in the original too) gets a storage of its own
        over its bytes (`alias`), so serializers see exactly the sharing the original state had. ``made``
        receives each tensor built with the index of the buffer holding its bytes.
        """
        def own(e: Entry) -> torch.Tensor:
            return alias(buffers[e.shard][e.offset:e.offset + e.nbytes])

        bases = [own(e) for e in self.storages]
        built: dict[int, torch.Tensor] = {}

        def tensor(i: int) -> torch.Tensor:
            if i not in built:
                info = self.tensors[i]
                r = info.record(len(self.shard_sizes))
                view = view_tensor(r, None if info.entry is None else own(info.entry),
                                   None if info.view is None else bases[info.view[0]])
                built[i] = finish_tensor(r, view)
                if made is not None:
                    entry = info.entry if info.view is None else self.storages[info.view[0]]
                    if entry is not None:
                        made.append((built[i], entry.shard))
            return built[i]

        return decode(self.tree, tensor, self.values.__getitem__)


def _fill_host(chunk: Chunk, buf: torch.Tensor) -> None:
    """`Plan.fill` from host memory. Back-to-back pieces of contiguous host bytes (most of a chunk) go in one
    ``torch.cat``: one call into torch for hundreds of small tensors, not one Python-level copy each."""
    batch: list[torch.Tensor] = []
    first = stop = 0  # the part of ``buf`` that ``batch`` fills
    for entry, start, end, at in chunk.pieces:
        src = entry.src
        if entry.typed is not None or not src.is_cpu:
            entry.copy_into(buf[at:at + end - start], start, end, False)
            continue
        if at != stop:
            if batch:
                torch.cat(batch, out=buf[first:stop])
            batch, first = [], at
        batch.append(src if start == 0 and end == src.numel() else src[start:end])
        stop = at + end - start
    if batch:
        torch.cat(batch, out=buf[first:stop])
    for entry, _, end, _ in chunk.pieces:
        entry.copied(end)


# ---------------------------------------------------------------- leaves to entries

def _byte_view(t: torch.Tensor) -> torch.Tensor:
    """uint8 view of a contiguous tensor's bytes (as_strided: ``reshape`` keeps odd strides of size-1 dims)."""
    return t.as_strided((t.numel(),), (1,)).view(torch.uint8)


def _own_bytes(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An entry's ``src`` and ``typed`` for ``t``'s values (a lazy conjugate or negative resolved into new bytes)."""
    t = t.detach()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    return (_byte_view(t), None) if t.is_contiguous() else (t, t)


def _source(t: torch.Tensor) -> torch.Tensor | None:
    """The tensor a deferred copy checks for changes: none for a lazy conjugate or negative, whose bytes
    `_own_bytes` resolved into new memory at plan time (later updates cannot reach them)."""
    return None if t.is_conj() or t.is_neg() else t


def _storage_blob(t: torch.Tensor) -> torch.Tensor:
    """uint8 tensor over all of ``t``'s storage (several overlapping views stored once)."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def _overlapping(ts: list[torch.Tensor]) -> bool:
    spans = []
    for t in ts:
        lo = t.storage_offset() * t.element_size()
        hi = lo + (sum((d - 1) * s for d, s in zip(t.shape, t.stride())) + 1) * t.element_size()
        spans.append((lo, hi))
    spans.sort()
    return any(b[0] < a[1] for a, b in zip(spans, spans[1:]))


def _tensor_entries(walker: Walker, share_overlaps: bool = True
                    ) -> tuple[list[TensorInfo], list[Entry], list[Entry], bool]:
    """Tensor descriptions and byte entries for the unique views; overlapping views of one storage share a blob
    (with ``share_overlaps``; otherwise every view gets bytes of its own, as DCP items need)."""
    views = walker.views
    # XLA: materialise pending work and bring every XLA tensor to host in one batched transfer.
    xla_at = [i for i, (t, _) in enumerate(views) if xla.is_xla(t)]
    host: dict[int, torch.Tensor] = {}
    if xla_at:
        host = dict(zip(xla_at, xla.to_cpu([views[i][0] for i in xla_at])))
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (t, _) in enumerate(views):
        if t.numel() and i not in host and not (t.is_conj() or t.is_neg()):  # lazy conj/neg: own resolved bytes
            groups.setdefault((str(t.device), t.untyped_storage().data_ptr()), []).append(i)
    shared: dict[int, int] = {}  # view index -> storage index
    storages: list[Entry] = []
    entries: list[Entry] = []
    for members in groups.values() if share_overlaps else ():
        if len(members) > 1 and _overlapping([views[i][0] for i in members]):
            base = views[members[0]][0]
            blob = _storage_blob(base)
            storages.append(Entry(f"__storage__.{len(storages)}", blob.numel(), 1, blob, st_shape=(blob.numel(),),
                                  source=base))
            entries.append(storages[-1])
            for i in members:
                shared[i] = len(storages) - 1
    cuda = False
    infos: list[TensorInfo] = []
    for i, (t, path) in enumerate(views):
        original = t
        t = host.get(i, t)
        info = TensorInfo(dtype_name(t.dtype), tuple(t.shape), str(original.device), original.requires_grad,
                          isinstance(original, torch.nn.Parameter))
        infos.append(info)
        cuda = cuda or t.is_cuda
        if i in shared:
            info.view = (shared[i], t.storage_offset(), tuple(t.stride()))
            continue
        src, typed = _own_bytes(t)
        nbytes = t.numel() * t.element_size()
        st_dtype = SAFETENSORS_DTYPES.get(t.dtype, "U8")
        info.entry = Entry(path or "<root>", nbytes, t.element_size(), src, typed=typed, st_dtype=st_dtype,
                           st_shape=tuple(t.shape) if st_dtype != "U8" or t.dtype == torch.uint8 else (nbytes,),
                           source=None if i in host else _source(original))
        entries.append(info.entry)
    return infos, storages, entries, cuda


def _object_entries(walker: Walker) -> list[tuple[str, str, Entry]]:
    out = []
    for obj, path, type_name in walker.objects:
        data = torch.frombuffer(obj, dtype=torch.uint8) if len(obj) else torch.empty(0, dtype=torch.uint8)
        out.append((type_name, path, Entry(f"__object__.{path or '<root>'}", len(obj), 1, data, st_shape=(len(obj),),
                                           transient=True)))
    return out


# ---------------------------------------------------------------- layouts

SHARD_METADATA = {"format": "pt", "producer": "asyncckpt"}
HEADER_BASE = 8 + 64 + 2 * HEADER_ALIGN  # length prefix, metadata, braces and padding


def _reuse(walker: Walker, tensors: list[TensorInfo], entries: list[Entry], base: Base | None,
           memo: VersionMemo | None, hashing: Hashing | None) -> tuple[list[Entry], list[ShardRecord]]:
    """Record every own-bytes tensor's digest; drop the entries whose bytes ``base`` already holds. Returns the
    entries still to write and the base shards the others now live in."""
    external: dict[tuple[str | None, str], int] = {}
    shards: list[ShardRecord] = []
    dropped: set[int] = set()
    owned = [(t, path, info) for (t, path), info in zip(walker.views, tensors) if info.entry is not None]
    known = [memo.known(t) if memo is not None else None for t, _, _ in owned]
    todo = [i for i, value in enumerate(known) if value is None]
    computed = digest_tensors([(owned[i][2].entry.src, owned[i][2].entry.typed) for i in todo],  # type: ignore[union-attr]
                       *(hashing or ()))
    for i, value in zip(todo, computed):
        known[i] = value
        if memo is not None:
            memo.remember(owned[i][0], value)
    for (t, path, info), value in zip(owned, known):
        entry = info.entry
        assert entry is not None and value is not None
        info.digest = value
        # an empty tensor is never referenced: it would tie this checkpoint to the base for no bytes at all
        found = base.match(path, info.dtype, info.shape, value) if base is not None and entry.nbytes else None
        if found is None:
            continue
        shard, span = found
        index = external.setdefault((shard.base, shard.file), len(shards))
        if index == len(shards):
            shards.append(shard)
        info.reused, info.entry = Span(index, span.offset, span.nbytes), None
        dropped.add(id(entry))
    return [e for e in entries if id(e) not in dropped], shards


#: worker threads that may share the hashing of an incremental save: (their ``submit``, how many)
Hashing = tuple[Submit, int]


def prepare(state: Any, shard_bytes: int, chunk_bytes: int, *, digests: bool = False, base: Base | None = None,
            memo: VersionMemo | None = None, rules: PartRules = NO_RULES, chunk_limit: int | None = None,
            hashing: Hashing | None = None) -> Plan:
    """Plan a native save: safetensors shards cut into ``chunk_bytes`` chunks. With ``digests`` every tensor's
    digest is recorded (a later save may build on this one), shared with ``hashing``'s threads; with a ``base``,
    tensors whose bytes it already holds are referenced instead of written (see `.incremental`). ``rules``
    are the target store's part limits and ``chunk_limit`` the largest chunk staging can hold (see
    `asyncckpt.format.parts`)."""
    tree, walker = walk_state(state, pickle_objects=True)
    return layout(tree, walker, shard_bytes, chunk_bytes, digests=digests, base=base, memo=memo, rules=rules,
                  chunk_limit=chunk_limit, hashing=hashing)


def _check_structure(tree: Any, walker: Walker) -> None:
    """Refuse a structure whose plain values would take the manifest past what a load reads (serialised only when
    the walk's bound says it might)."""
    problem = structure_problem(tree) if walker.json_bound > MAX_MANIFEST_BYTES else None
    if problem is not None:
        raise CheckpointError(f"cannot save this state: {problem}")


def _header_cost(e: Entry) -> int:
    """About the bytes ``e`` adds to its shard's header: its JSON description (escaped names take more)."""
    return 88 + (len(e.name) if e.name.isascii() else 6 * len(e.name)) + 21 * len(e.st_shape)


def layout(tree: Any, walker: Walker, shard_bytes: int, chunk_bytes: int, *, digests: bool = False,
           base: Base | None = None, memo: VersionMemo | None = None, rules: PartRules = NO_RULES,
           chunk_limit: int | None = None, hashing: Hashing | None = None) -> Plan:
    """The plan of a walked state (see `prepare`)."""
    _check_structure(tree, walker)
    if rules.max_part is not None and chunk_bytes > rules.max_part:
        raise InvalidArgumentError(f"chunk_bytes={chunk_bytes} is more than the {rules.max_part} bytes this store "
                                   "takes in one part; lower chunk_bytes")
    if chunk_bytes % rules.multiple:
        raise InvalidArgumentError(f"chunk_bytes={chunk_bytes} is not a whole multiple of the {rules.multiple} bytes "
                                   f"this store takes parts in; use a multiple (such as "
                                   f"{max(1, chunk_bytes // rules.multiple) * rules.multiple})")
    limit = chunk_limit if rules.max_part is None else min(rules.max_part, chunk_limit or rules.max_part)
    room = headroom(chunk_bytes, limit, rules.multiple)
    max_file = rules.max_file(chunk_bytes)
    cap = shard_bytes if max_file is None else min(shard_bytes, max_file)
    tensors, storages, entries, cuda = _tensor_entries(walker)
    external: list[ShardRecord] = []
    if digests or base is not None:
        entries, external = _reuse(walker, tensors, entries, base, memo, hashing)
    objects = _object_entries(walker)
    plan = Plan(tree, tensors, storages, objects, entries + [e for _, _, e in objects], chunk_bytes=chunk_bytes,
                external=external, chain=0 if base is None or not any(s.base for s in external) else
                base.manifest.chain + 1)
    _lay_out(plan, cap, chunk_bytes, cuda, rules=rules, room=room)
    return plan


def prepare_items(tensors: list[tuple[str, torch.Tensor]], objects: list[tuple[str, bytes]], shard_bytes: int,
                  chunk_bytes: int, groups: list[tuple[list[int], int]] | None = None) -> tuple[Plan, list[int]]:
    """Plan shards for named tensors and pickled objects (the items one rank writes for DCP).

    Every tensor gets bytes of its own, row-major, except that one tensor named twice is stored once. ``groups``
    (positions in ``tensors``, and a shard size for them) keeps sets of tensors in shards of their own, after the
    rest; objects always go with the rest. Returns the plan and, for each of ``tensors``, the index of its
    `TensorInfo` in ``plan.tensors``; objects are ``plan.objects`` in order.
    """
    walker = Walker(pickle_objects=True)
    index = [walker.add_tensor(t, name) for name, t in tensors]
    walker.objects = [(bytearray(data), name, "") for name, data in objects]
    infos, _, entries, cuda = _tensor_entries(walker, share_overlaps=False)
    blobs = _object_entries(walker)
    plan = Plan(None, infos, [], blobs, entries + [e for _, _, e in blobs], chunk_bytes=chunk_bytes)
    placed: set[int] = set()
    sets: list[tuple[list[Entry], int]] = []
    for members, size in groups or []:
        own = [infos[index[i]].entry for i in members if index[i] not in placed]
        placed.update(index[i] for i in members)
        sets.append(([e for e in own if e is not None], size))
    rest = [info.entry for j, info in enumerate(infos) if j not in placed and info.entry is not None]
    sets.insert(0, (rest + [e for _, _, e in blobs], shard_bytes))
    _lay_out(plan, [(group, size) for group, size in sets if group or len(sets) == 1], chunk_bytes, cuda)
    return plan, index


def _lay_out(plan: Plan, groups: list[tuple[list[Entry], int]] | int, chunk_bytes: int, cuda: bool, *,
             rules: PartRules | None = None, room: int = 0) -> None:
    """Place the plan's entries (or each group of them, in shards of its own size) into shards, cut into chunks.
    With a store's ``rules`` a shard's header counts against its size (a shard of whole chunks stays whole) and
    chunks may grow by ``room`` to take a header's spill (see `asyncckpt.format.parts`)."""
    headers = rules is not None
    rules = rules or NO_RULES
    if isinstance(groups, int):
        groups = [(plan.entries, groups)]
    shards: list[list[Entry]] = []
    for entries, shard_bytes in groups:
        # Largest item size first keeps every tensor aligned inside the 64-byte aligned data section.
        entries = sorted(entries, key=lambda e: -e.itemsize)
        shards.append([])
        base = HEADER_BASE if headers else 0
        size = base
        for e in entries:
            cost = e.nbytes + (_header_cost(e) if headers else 0)
            if shards[-1] and size + cost > shard_bytes:
                shards.append([])
                size = base
            shards[-1].append(e)
            size += cost
    for index, members in enumerate(shards):
        header = build_header([HeaderEntry(e.name, e.st_dtype, e.st_shape, e.nbytes) for e in members],
                              SHARD_METADATA)
        pos = len(header)
        for e in members:
            e.shard, e.offset = index, pos
            pos += e.nbytes
        plan.shard_sizes.append(pos)
        chunk = shard_chunk(pos, chunk_bytes, room, rules.multiple)
        if rules.max_parts is not None and rules.parts(pos, chunk) > rules.max_parts:
            big = max(members, key=lambda e: e.nbytes)
            raise CheckpointError(
                f"{big.name} ({big.nbytes} bytes) needs a shard of more than {rules.max_parts} parts of "
                f"{rules.part_bytes(chunk)} bytes, this store's limit; raise chunk_bytes")
        plan.shard_chunks.append(chunk)
        hdr = Entry("__header__", len(header), 1, torch.frombuffer(bytearray(header), dtype=torch.uint8))
        _cut(plan, index, [hdr, *members], pos, chunk)
    if cuda:
        plan.stream = devices.side_stream()


def _structure(walker: Walker, cut: tuple[Any, ...]) -> Any:
    """What a plan's layout depends on: every tensor's dtype, shape, strides, memory and the path naming it (its
    entry's name), the pickled values' sizes, paths and types. Plain values (a step, an epoch, hyper-parameters)
    only go into the manifest's structure, so a save whose plain values changed reuses the layout. None when the
    plan cannot be reused (XLA tensors move through fresh host copies every time)."""
    extra = []
    for t, path in walker.views:
        if t.is_xla:
            return None
        extra.append((path, type(t), t.requires_grad))
    return (cut, walker.keys, extra, [(len(obj), path, kind) for obj, path, kind in walker.objects])


def _canonical(keys: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """View keys with each storage (or object) named by its order of appearance instead of its address: equal for
    two states whose tensors differ only in where their memory lies."""
    names: dict[Any, int] = {}
    return [(k[0], names.setdefault((k[0], k[1]), len(names)), *k[2:]) for k in keys]


def _rebind(plan: Plan, index: int, t: torch.Tensor) -> None:
    """Point the plan's bytes for view ``index`` at ``t`` (as `_tensor_entries` does): a tensor in new memory, or a
    lazily conjugated or negated one, whose resolved bytes are new at every save."""
    info = plan.tensors[index]
    if info.view is not None:  # one of several views that share a stored storage
        entry = plan.storages[info.view[0]]
        entry.src, entry.source = _storage_blob(t), t
    elif info.entry is not None:
        (info.entry.src, info.entry.typed), info.entry.source = _own_bytes(t), _source(t)


class PlanCache:
    """The last native plan, reused while the state keeps its structure.

    A training loop saves the same structure every N steps: the same dicts, the same tensors updated in place, plain
    values such as the step that change. Then the layout, shard headers and manifest records of the last save are
    still right; only the structure (with those plain values) and the pickled values are new. The check compares
    everything the layout depends on (see ``_structure``). Tensors that moved to other memory with the same layout
    (Lightning's new score tensors at every save, a module rebuilt alike) keep the plan, its bytes pointed at them;
    holding the plan keeps the tensors' storages alive until the next save or close.
    """

    def __init__(self) -> None:
        self._plan: Plan | None = None
        self._key: Any = None
        self._resolved: list[int] = []  # views whose bytes are resolved at plan time (lazy conjugate / negative)
        self._canon: list[tuple[Any, ...]] | None = None  # the last key's views, addresses left out (_canonical)
        self.reused = 0  # how many saves reused the plan (tests and benchmarks read it)

    def prepare(self, state: Any, shard_bytes: int, chunk_bytes: int, *, rules: PartRules = NO_RULES,
                chunk_limit: int | None = None) -> Plan:
        tree, walker = walk_state(state, pickle_objects=True)
        key = _structure(walker, (shard_bytes, chunk_bytes, rules, chunk_limit))
        plan = self._plan
        same = plan is not None and key is not None and key == self._key
        if plan is not None and key is not None and (same or self._same_layout(key)):
            _check_structure(tree, walker)
            moved = self._resolved  # usually empty: a steady save rebinds nothing
            if not same:
                moved = sorted({*moved, *(i for i, (k, old) in enumerate(zip(key[1], self._key[1])) if k != old)})
                self._key = key
            for i in moved:
                _rebind(plan, i, walker.views[i][0])
            for (obj, _, _), (_, _, entry) in zip(walker.objects, plan.objects):
                entry.src = torch.frombuffer(obj, dtype=torch.uint8) if len(obj) else entry.src
            if plan.stream is not None:
                plan.stream.wait_stream(torch.cuda.current_stream())
            self.reused += 1
            return dataclasses.replace(plan, tree=tree)  # a save still writing the last one keeps its structure
        plan = layout(tree, walker, shard_bytes, chunk_bytes, rules=rules, chunk_limit=chunk_limit)
        self._plan, self._key = (plan, key) if key is not None else (None, None)
        self._resolved = [i for i, k in enumerate(walker.keys) if k[0] is not None and (k[7] or k[8])]
        self._canon = None
        return plan

    def _same_layout(self, key: Any) -> bool:
        """Whether ``key`` gives the last plan's layout: equal to its key but for where tensors' memory lies."""
        old = self._key
        if not (key[0] == old[0] and key[2] == old[2] and key[3] == old[3] and len(key[1]) == len(old[1])):
            return False
        if self._canon is None:
            self._canon = _canonical(old[1])
        return _canonical(key[1]) == self._canon

    def clear(self) -> None:
        self._plan = self._key = None


def _cut(plan: Plan, shard: int, ordered: list[Entry], size: int, chunk_bytes: int) -> None:
    """Split one output of ``size`` bytes, holding ``ordered`` entries back to back, into chunks."""
    chunks = [Chunk(shard, off, min(chunk_bytes, size - off)) for off in range(0, size, chunk_bytes)]
    chunks = chunks or [Chunk(shard, 0, 0)]
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


def prepare_copy(state: Any, chunk_bytes: int) -> Plan:
    """Plan an in-memory point-in-time copy: tensors packed into staging bins of about ``chunk_bytes``.

    Used when another serializer (a Lightning base CheckpointIO) writes the state: it receives the copy built by
    `Plan.rebuild`, whose tensors are views of the staging buffers.
    """
    tree, walker = walk_state(state, pickle_objects=False)
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
        e.shard, e.offset = bins[-1].shard, pos
        bins[-1].pieces.append((e, 0, e.nbytes, pos))
        pos += e.nbytes
        bins[-1].nbytes = pos
    plan.chunks = bins
    plan.shard_sizes = [b.nbytes for b in bins]
    if cuda:
        plan.stream = devices.side_stream()
    return plan
