"""asyncckpt as the storage layer of ``torch.distributed.checkpoint`` (DCP): many ranks, one global commit.

.. code-block:: python

    import torch.distributed.checkpoint as dcp
    from asyncckpt.dcp import StorageWriter, StorageReader

    dcp.save(state_dict, storage_writer=StorageWriter("ckpts/step-100"))
    fut = dcp.async_save(state_dict, storage_writer=StorageWriter("s3://b/run/step-100"))
    dcp.load(state_dict, storage_reader=StorageReader("ckpts/step-100"))

DCP does the distributed part — flattening, deduplicating replicated items, deciding which rank writes what and
which saved chunks each rank needs on load — and asyncckpt stores it: every rank writes its own shard files
(safetensors, xxh3-64 per chunk, the rank in the name) through the engine's pipeline and makes them durable
without publishing anything; the coordinator then writes the one global manifest (DCP's metadata as JSON, no
pickle) and only after that sweeps the files of the save it replaced. A crash at any moment leaves the old
checkpoint or the new one. Loads read only the chunks that cover each rank's tensors and check every one.

DCP reports a failure on any rank as ``torch.distributed.checkpoint.api.CheckpointException``, which derives from
``BaseException`` (``except Exception`` does not catch it); `unwrap` and `unwrapped` give back the
asyncckpt error (a `CheckpointError`) that caused it.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import io
import itertools
import logging
import math
import os
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import storage as dcp_storage
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from .concurrency.clock import CLOCK
from .errors import CheckpointError, InvalidArgumentError, restate
from .format.dtypes import DTYPES, dtype_name
from .format.manifest import (
    AnyManifest,
    ChunkedTensor,
    GlobalManifest,
    Manifest,
    ObjectRecord,
    ShardRecord,
    Span,
    TensorChunk,
    parse,
    shard_name,
)
from .format.tree import decode, encode_plain
from .io.paths import to_url
from .load.manifest import read_manifest
from .load.ranged import ReadStats, Region, Rows, read_regions
from .load.rebuild import unpickle
from .memory.buffers import aligned_size
from .options import EngineOptions
from .pipeline.committer import Committer
from .pipeline.handles import SaveHandle, SaveResult
from .pipeline.jobs import BorrowedShardJob, Job, ShardJob, Target, describe
from .snapshot.plan import Chunk, Entry, Plan, prepare_items
from .snapshot.walk import sharded_kind
from .sync_engine import SyncEngine

__all__ = ["RankFace", "StorageWriter", "StorageReader", "RankPlan", "RankRead", "Stored", "unwrap", "unwrapped",
           "shared_engine"]

# ---------------------------------------------------------------- engines

log = logging.getLogger("asyncckpt")

_engines: dict[tuple[int, EngineOptions], SyncEngine] = {}
_engines_lock = threading.Lock()

#: save ids a coordinator in this process planned and has not committed yet, by checkpoint (target key): DCP may
#: run the next save of a path while one commits, and a commit's sweep must leave those files alone
_uncommitted: collections.defaultdict[str, set[str]] = collections.defaultdict(set)
#: one commit at a time in this process: reading which save a path holds and publishing over it go together
_commit_lock = threading.Lock()


def shared_engine(options: EngineOptions | None = None) -> SyncEngine:
    """The engine this process uses for writers and readers built with ``options`` (created on first use, kept
    for the process's lifetime so staging buffers are reused from one save to the next, flushed at exit).

    Args:
        options: the engine's options; None: the defaults.

    Returns:
        The running engine for this process and these options (a new one if the previous was closed).
    """
    options = options or EngineOptions()
    key = (os.getpid(), options)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is not None:
            try:
                engine.core
            except CheckpointError:  # closed by its owner: start another
                engine = None
        if engine is None:
            engine = _engines[key] = SyncEngine(**{f.name: getattr(options, f.name)
                                                   for f in dataclasses.fields(options)})
        return engine


class _Endpoint:
    """What the writer and the reader share: the checkpoint's path, its storage options, the engine."""

    def __init__(self, path: Any, storage_options: Mapping[str, Any] | None, engine: SyncEngine | None,
                 engine_options: Mapping[str, Any]) -> None:
        if engine is not None and engine_options:
            raise InvalidArgumentError("pass either engine= or engine options, not both")
        self.path = None if path is None else to_url(path)
        self.storage_options = storage_options
        self._engine = engine
        self.options = engine.options if engine is not None else EngineOptions.from_kwargs(engine_options)

    @property
    def engine(self) -> SyncEngine:
        """The engine this endpoint reads or writes with: the one given, else the process's shared engine for its
        options (`shared_engine`)."""
        return self._engine if self._engine is not None else shared_engine(self.options)

    @property
    def checkpoint_id(self) -> str | None:
        """The checkpoint's path or URL (DCP's name for it)."""
        return self.path

    def target(self) -> Target:
        """Where the checkpoint lives, on the engine's storage for its path.

        Returns:
            The path's storage target.

        Raises:
            InvalidArgumentError: no path was given, neither here nor as DCP's ``checkpoint_id``.
        """
        if self.path is None:
            raise InvalidArgumentError(f"{type(self).__name__} has no path: give one, or pass checkpoint_id= to DCP")
        return self.engine.core.target(self.path, self.storage_options)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled into DCP's checkpoint process: the engine stays here; the other side uses its own."""
        state = self.__dict__.copy()
        state["_engine"] = None
        return state

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        """Whether ``checkpoint_id`` can name a checkpoint here (DCP asks when it picks a storage by path).

        Args:
            checkpoint_id: a local path or fsspec URL.

        Returns:
            True when it is a usable path or URL.
        """
        try:
            to_url(checkpoint_id)
        except CheckpointError:
            return False
        return True


# ---------------------------------------------------------------- errors


class _Carrier(BaseException):
    """Carries an asyncckpt error through DCP code that would swallow an ``Exception`` (its metadata read)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def unwrap(exc: BaseException) -> BaseException:
    """The error to show for a failed ``dcp.save`` / ``dcp.load``.

    For DCP's ``CheckpointException`` (a ``BaseException``): the asyncckpt `CheckpointError` of
    the lowest failing rank (type and attributes kept, the rank in its message), else a ``CheckpointError`` that
    restates the lowest rank's failure. Anything else is returned as it is.

    Args:
        exc: what ``dcp.save``, ``dcp.async_save``'s future or ``dcp.load`` raised.

    Returns:
        The error to raise or show in its place.

    Example:
        ```python
        try:
            dcp.save(state, storage_writer=StorageWriter("ckpts/step-100"))
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            raise unwrap(exc) from exc
        ```
    """
    if isinstance(exc, _Carrier):
        return exc.error
    if not isinstance(exc, CheckpointException):
        return exc
    failures = sorted((rank, err[0] if isinstance(err, tuple) else err) for rank, err in exc.failures.items())
    failures = [(rank, err.error if isinstance(err, _Carrier) else err) for rank, err in failures]
    if not failures:
        return CheckpointError(str(exc))
    ours = [(rank, err) for rank, err in failures if isinstance(err, CheckpointError)]
    rank, err = (ours or failures)[0]
    text = str(err) if isinstance(err, CheckpointError) else f"{type(err).__name__}: {err}"
    return restate(err, f"rank {rank}: {text}")


@contextlib.contextmanager
def unwrapped() -> Iterator[None]:
    """``with unwrapped(): dcp.save(...)`` raises `unwrap`'s error instead of DCP's ``CheckpointException``.

    Raises:
        CheckpointError: in place of DCP's ``CheckpointException`` (the asyncckpt error of the lowest failing
            rank, its subclass kept, or a plain ``CheckpointError`` restating a foreign failure), DCP's exception
            as its cause.

    Example:
        ```python
        with unwrapped():
            dcp.load(state, storage_reader=StorageReader("ckpts/step-100"))
        ```
    """
    try:
        yield
    except (CheckpointException, _Carrier) as exc:
        raise unwrap(exc) from exc


# ---------------------------------------------------------------- what travels between ranks


@dataclass(frozen=True)
class RankPlan:
    """The ``storage_data`` the coordinator gives each rank's save plan: the save's id, the rank's number, and the
    keys of the replicated tensors cut into pieces (`assign`).

    Attributes:
        save_id: the save's random id; every rank's shard files carry it in their names.
        rank: the rank this plan is for (0 is the coordinator).
        world_size: how many ranks take part in the save.
        created_ns: when the coordinator planned the save, in nanoseconds since the Unix epoch.
        sequence: orders the checkpoints of one directory (newer saves are higher).
        pieces: DCP names of the replicated tensors that are written by rows, a piece per rank holding them.
    """

    save_id: str
    rank: int
    world_size: int
    created_ns: int
    sequence: int = 0  # orders the checkpoint among its siblings (asyncckpt.concurrency.clock)
    pieces: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Stored:
    """The ``storage_data`` of a ``WriteResult``: where the item's bytes lie. The first result naming a file
    carries that file's `ShardRecord` (size and checksums).

    Attributes:
        file: the shard file's name, in the checkpoint directory.
        offset: where the item's bytes start in that file, in bytes.
        nbytes: the item's size, in bytes.
        shard: the file's record (size in bytes, chunk checksums) on the first result naming the file; None on
            the others.
    """

    file: str
    offset: int
    nbytes: int
    shard: ShardRecord | None = None


# ---------------------------------------------------------------- staging (dcp.async_save)


_serials = itertools.count()


class _Share:
    """What a staged state says of its tensors, for the save's planning: which staged shard holds each one, and the
    plain tensors the rank staged only rows of or none of (it wrote only those in its last save of this state; the
    coordinator gives them to it again, `assign`; the staged state holds meta tensors for them)."""

    def __init__(self) -> None:
        self.by_path: dict[tuple[str | int, ...], int] = {}  # DCP key path of a staged tensor -> its shard
        # path -> (rows, the shard holding them or None, the staged rows)
        self.pieces: dict[tuple[str | int, ...], tuple[Piece, int | None, torch.Tensor]] = {}
        self.skipped: set[tuple[str | int, ...]] = set()
        self.piece_views: dict[MetadataIndex, torch.Tensor] = {}  # the pieces by DCP index (prepare_local_plan)
        self.fqn_paths: dict[str, tuple[str | int, ...]] = {}  # DCP name -> key path of each plain tensor item
        self.fingerprint: Fingerprint | None = None  # set where the next save may stage in part
        self.claimed = False  # a save's planning has taken it
        self.serial = next(_serials)


#: states staged in part that arrived in DCP's checkpoint process (process mode), for its writer's planning
_arrivals: "weakref.WeakSet[_Share]" = weakref.WeakSet()


class _Staged(_Share):
    """One ``stage()``'s copy: whole-shard buffers from the engine's pool, laid out as this rank's shard files.

    The buffers go back to the pool once the save has written them, or once nothing refers to the staged tensors
    any more (a save that failed before writing): never while a save may still read them.
    """

    def __init__(self, engine: SyncEngine, plan: Plan, buffers: list[torch.Tensor]) -> None:
        super().__init__()
        self.engine, self.plan, self.buffers = engine, plan, buffers
        self.by_pointer: dict[int, tuple[int, Entry]] = {}  # data_ptr of a staged view -> (shard, entry)
        self._lock = threading.Lock()
        self._alive = 0
        self.released = False

    def raw(self, entry: Entry, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A view of ``entry``'s staged bytes that does not keep the buffers from the pool (see `view`)."""
        if not entry.nbytes:
            return torch.empty(shape, dtype=dtype)
        return self.buffers[entry.shard][entry.offset:entry.offset + entry.nbytes].view(dtype).view(shape)

    def view(self, entry: Entry, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A view of ``entry``'s staged bytes; the buffers stay out of the pool while any such view lives."""
        view = self.raw(entry, dtype, shape)
        if not entry.nbytes:
            return view
        self.by_pointer[view.data_ptr()] = (entry.shard, entry)
        with self._lock:
            self._alive += 1
        weakref.finalize(view, self._dropped)
        return view

    def _dropped(self) -> None:
        with self._lock:
            self._alive -= 1
            last = self._alive == 0
        if last:
            self.release()

    def release(self) -> None:
        """Give the buffers back to the pool (once; from any thread)."""
        with self._lock:
            if self.released:
                return
            self.released = True
        try:
            core = self.engine.core
        except CheckpointError:  # the engine is gone, and its pool with it
            return
        for buf in self.buffers:
            core.runtime.call_soon(core.pool.release, buf)


#: a piece of a replicated tensor cut by rows: (offsets, sizes) of its chunk of the whole
Piece = tuple[tuple[int, ...], tuple[int, ...]]


#: the plain tensors of a state on many ranks, as the key paths, dtypes and shapes, and the world size
Fingerprint = tuple[int, tuple[tuple[tuple[str | int, ...], torch.dtype, tuple[int, ...]], ...]]
#: a rank's share of a state's plain tensors: key path -> None (the whole tensor) or the rows it writes
Shares = dict[tuple[str | int, ...], Piece | None]
#: the key paths of the plain tensors DCP made items of, and the rank's share of them
Written = tuple[frozenset[tuple[str | int, ...]], Shares]


class _Written:
    """What this process's rank wrote of the plain (replicated) tensors in its last ``async_save`` of a state, by
    the state's `Fingerprint`: a key path maps to None (the tensor whole) or the rows it wrote. The next `stage`
    of the same state copies only those, since the coordinator then hands every rank the same share again.

    Taken (removed) by the next stage, put back by its ``write_data``: a save that failed leaves nothing, and the
    save after it stages everything. Kept per engine, a few states each (a model and an optimizer saved apart).
    """

    KEEP = 4

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_engine: weakref.WeakKeyDictionary[SyncEngine, dict[Fingerprint, Written]] = weakref.WeakKeyDictionary()

    def take(self, engine: SyncEngine, fingerprint: Fingerprint) -> Written | None:
        with self._lock:
            return self._by_engine.get(engine, {}).pop(fingerprint, None)

    def put(self, engine: SyncEngine, fingerprint: Fingerprint, written: Written) -> None:
        with self._lock:
            known = self._by_engine.setdefault(engine, {})
            known.pop(fingerprint, None)
            known[fingerprint] = written
            while len(known) > self.KEEP:
                known.pop(next(iter(known)))


_written = _Written()


def _terminal(value: Any) -> bool:
    """Whether DCP's flattening keeps ``value`` as one item: anything but a mapping or a list, and a list that
    holds no tensor and no container that is not itself one item."""
    if isinstance(value, Mapping):
        return False
    if not isinstance(value, list):
        return True
    return not any(isinstance(v, torch.Tensor) or (isinstance(v, (Mapping, list)) and not _terminal(v))
                   for v in value)


def _tensor_leaves(value: Any, path: tuple[str | int, ...], out: list[tuple[tuple[str | int, ...], Any]]) -> None:
    """The tensors (plain and DTensor) that DCP's flattening makes items of, in order, with their key paths as
    DCP's planner records them (``planner_data``: a string per mapping key, an integer per list index)."""
    if isinstance(value, torch.Tensor):
        out.append((path, value))
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _tensor_leaves(v, path + (str(k),), out)
    elif isinstance(value, list) and not _terminal(value) and path:
        for i, v in enumerate(value):
            _tensor_leaves(v, path + (i,), out)


def _replicated(t: torch.Tensor) -> bool:
    """Whether other ranks may hold the same item (DCP then keeps one copy): plain tensors, and DTensors
    replicated along some mesh dimension. Only those can be written by another rank."""
    if sharded_kind(t) != "DTensor":
        return True
    return not all(p.is_shard() for p in t.placements)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class LocalStaging:
    """The ``storage_data`` of a rank's local plan: the bytes of each whole plain tensor it holds (other ranks may
    hold the same ones: DDP's replicated state) and, under ``dcp.async_save``, which staged shard holds each item
    and each shard's size, so the coordinator can give whole shards to one rank each (written without a copy).
    A plain tensor the rank staged only rows of (``pieces``) or none of is not among its ``tensors``."""

    shard_of: dict[MetadataIndex, int]
    nbytes: dict[int, int]
    tensors: dict[MetadataIndex, int] = dataclasses.field(default_factory=dict)
    pieces: dict[MetadataIndex, Piece] = dataclasses.field(default_factory=dict)  # rows staged of a whole item
    skipped: frozenset[MetadataIndex] = frozenset()  # plain tensors it staged none of


def _cut(item: WriteItem, holders: int) -> list[Piece]:
    """``item``'s tensor cut by rows into ``holders`` pieces of (nearly) equal size."""
    assert item.tensor_data is not None
    size = tuple(item.tensor_data.size)
    n = min(holders, size[0])
    bounds = [size[0] * i // n for i in range(n + 1)]
    return [((lo,) + (0,) * (len(size) - 1), (hi - lo,) + size[1:]) for lo, hi in zip(bounds, bounds[1:])]


def _piece_item(item: WriteItem, piece: Piece) -> WriteItem:
    assert item.tensor_data is not None
    offsets, sizes = piece
    chunk = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
    return WriteItem(index=MetadataIndex(item.index.fqn, offsets), type=WriteItemType.SHARD,
                     tensor_data=dataclasses.replace(item.tensor_data, chunk=chunk))


def assign(plans: list[SavePlan], split_bytes: int | None) -> tuple[list[SavePlan], dict[str, list[Piece]]]:
    """Decide which rank writes what, so that every rank writes about as many bytes.

    Items move only between ranks that hold them. Under ``dcp.async_save``, each staged shard is first given
    whole to one of the ranks that staged it (written straight from staging, no copy). Then the whole plain tensors
    several ranks hold go, largest first, to the holder with the fewest bytes so far, and one of at least
    ``split_bytes`` bytes (None: never) is cut by rows into a piece per holder (DCP alone writes each replicated
    tensor whole on one rank). A tensor that ranks staged only rows of (they wrote those rows in the last save) goes
    to them in those pieces. Returns the plans and, by key, the pieces of the tensors that were cut. What no rank
    reported holding (a custom planner's items, objects) stays where DCP put it.

    Raises:
        CheckpointError: no rank staged all of a plain tensor (the ranks' states changed unlike each other since
            the last save; the next save stages everything).
    """
    stagings = [p.storage_data for p in plans]
    if not all(isinstance(s, LocalStaging) for s in stagings):
        return plans, {}
    holders: dict[MetadataIndex, list[int]] = {}
    for r, staging in enumerate(stagings):
        for index in staging.tensors:
            holders.setdefault(index, []).append(r)
    items: dict[MetadataIndex, tuple[int, WriteItem]] = {}
    for r, p in enumerate(plans):
        for it in p.items:
            items[it.index] = (r, it)
    pieces: dict[str, list[Piece]] = {}
    staged_rows: dict[MetadataIndex, dict[Piece, int]] = {}
    for r, staging in reversed(list(enumerate(stagings))):  # a piece two ranks staged goes to the lower one
        for index, piece in staging.pieces.items():
            staged_rows.setdefault(index, {})[piece] = r
    for index, rows in staged_rows.items():
        if index in holders or index not in items:  # some rank staged it whole
            continue
        whole = items.pop(index)[1]
        assert whole.tensor_data is not None
        cut_ = sorted(rows, key=lambda piece: piece[0][0])
        size = tuple(whole.tensor_data.size)
        ends = [0] + [offsets[0] + sizes[0] for offsets, sizes in cut_]
        if ends[-1] != size[0] or any(offsets[0] != end or tuple(sizes[1:]) != size[1:]
                                      for (offsets, sizes), end in zip(cut_, ends)):
            raise CheckpointError(f"no rank staged all of {index.fqn}: the ranks' states changed unlike each other "
                                  "since the last save (this save is not committed; the next one copies everything)")
        pieces[index.fqn] = cut_
        for piece in cut_:
            it = _piece_item(whole, piece)
            items[it.index] = (rows[piece], it)
    skipped = frozenset().union(*(staging.skipped for staging in stagings))
    missing = [index.fqn for index in items if index in skipped and index not in holders]
    if missing:
        raise CheckpointError(f"no rank staged {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}: the ranks' "
                              "states changed unlike each other since the last save (this save is not committed; "
                              "the next one copies everything)")

    def cut(index: MetadataIndex) -> bool:
        it = items[index][1]
        size = it.tensor_data.size if it.tensor_data is not None else ()
        return (split_bytes is not None and len(holders.get(index, ())) > 1 and len(size) > 0 and size[0] > 1
                and (it.tensor_storage_size() or 0) >= split_bytes)

    load = [0] * len(plans)
    chosen: dict[MetadataIndex, int] = {}
    signatures: dict[frozenset[MetadataIndex], list[tuple[int, int]]] = {}
    for r, staging in enumerate(stagings):
        members: dict[int, set[MetadataIndex]] = {}
        for index, k in staging.shard_of.items():
            members.setdefault(k, set()).add(index)
        for k, indices in members.items():
            signatures.setdefault(frozenset(indices), []).append((r, staging.nbytes[k]))
    for signature, owners in sorted(signatures.items(), key=lambda kv: (len(kv[1]) > 1, -kv[1][0][1])):
        if any(i in chosen or i not in items for i in signature) or (len(signature) == 1 and cut(*signature)):
            continue
        rank, nbytes = min(owners, key=lambda h: (load[h[0]], h[0]))
        load[rank] += nbytes
        for i in signature:
            chosen[i] = rank
    out: list[list[WriteItem]] = [[] for _ in plans]
    movable: list[WriteItem] = []
    for index, (r, it) in items.items():
        if index in chosen:
            out[chosen[index]].append(it)
        elif it.type == WriteItemType.TENSOR and index in holders and (len(holders[index]) > 1
                                                                        or r not in holders[index]):
            movable.append(it)  # several ranks hold it, or DCP left it with one that staged none of it
        else:
            out[r].append(it)
            load[r] += it.tensor_storage_size() or 0
    for it in sorted(movable, key=lambda it: -(it.tensor_storage_size() or 0)):
        held = sorted(holders[it.index], key=lambda r: (load[r], r))
        if cut(it.index):
            pieces[it.index.fqn] = _cut(it, len(held))
            for r, piece in zip(held, pieces[it.index.fqn]):
                out[r].append(_piece_item(it, piece))
                load[r] += math.prod(piece[1]) * it.tensor_data.properties.dtype.itemsize  # type: ignore[union-attr]
        else:
            out[held[0]].append(it)
            load[held[0]] += it.tensor_storage_size() or 0
    return [dataclasses.replace(p, items=m) for p, m in zip(plans, out)], pieces


def _local(t: torch.Tensor, path: str) -> torch.Tensor:
    kind = sharded_kind(t)
    if kind == "DTensor":
        return t.to_local().detach()  # type: ignore[attr-defined]
    if kind is not None:
        raise CheckpointError(f"the {kind} at {path} cannot be staged by dcp.async_save through asyncckpt (plain "
                              "tensors and DTensors can); save it with dcp.save, or convert it to a DTensor")
    return t.detach()


def _rebuild(value: Any, copies: dict[int, torch.Tensor]) -> Any:
    """The staged state: the input's structure, tensors replaced by their staged copies, other items deep-copied
    (DCP pickles them later, so they too must hold the values of the moment)."""
    if isinstance(value, torch.Tensor):
        local = copies[id(value)]
        if sharded_kind(value) == "DTensor":
            from torch.distributed.tensor import DTensor

            staged = DTensor.from_local(local, value.device_mesh, value.placements, run_check=False,  # type: ignore
                                        shape=value.shape, stride=value.stride())
            staged._asyncckpt_local = local  # type: ignore[attr-defined]  # keeps the staging alive with it
            return staged
        return local
    if isinstance(value, Mapping):
        out = {k: _rebuild(v, copies) for k, v in value.items()}
        return OrderedDict(out) if isinstance(value, OrderedDict) else out
    if isinstance(value, list) and not _terminal(value):
        return [_rebuild(v, copies) for v in value]
    return copy.deepcopy(value)


class StagedState(dict):
    """What `StorageWriter.stage` returns: the state, its tensors views of this process's staging buffers.

    Pickled — DCP's process mode sends it to its checkpoint process — it travels as a copy in shared memory,
    made then (on DCP's sending thread, not the caller's): the staging buffers are private mappings, which torch
    cannot hand to another process.
    """

    __slots__ = ("staged", "held")
    staged: _Share  # what planning needs to know of the staging (a `_Staged` in the process that staged it)
    held: list[torch.Tensor]  # staged rows kept alive with the state, out of DCP's sight

    def __reduce__(self) -> Any:
        assert isinstance(self.staged, _Staged)
        moved = _in_shared_memory(self, self.staged)
        if not (self.staged.skipped or self.staged.pieces):
            return dict, (), None, None, iter(moved.items())
        pieces = {path: (piece, None, torch.empty_like(rows).share_memory_().copy_(rows))
                  for path, (piece, _, rows) in self.staged.pieces.items()}
        return _arrive, (moved, frozenset(self.staged.skipped), pieces)


def _arrive(state: dict[str, Any], skipped: frozenset[tuple[str | int, ...]],
            pieces: dict[tuple[str | int, ...], tuple[Piece, int | None, torch.Tensor]]) -> StagedState:
    """A state staged in part, unpickled in DCP's checkpoint process: its writer plans with what it says."""
    share = _Share()
    share.skipped, share.pieces = set(skipped), pieces
    out = StagedState(state)
    out.staged, out.held = share, []
    _arrivals.add(share)
    return out


def _in_shared_memory(state: dict[str, Any], staged: _Staged) -> dict[str, Any]:
    """``state`` with every staged tensor replaced by a copy in shared memory."""
    def move(t: torch.Tensor) -> torch.Tensor:
        if not t.numel() or t.data_ptr() not in staged.by_pointer:
            return t
        return torch.empty_like(t).share_memory_().copy_(t)

    def walk(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if sharded_kind(value) == "DTensor":
                from torch.distributed.tensor import DTensor

                return DTensor.from_local(move(value.to_local()), value.device_mesh,  # type: ignore[attr-defined]
                                          value.placements, run_check=False,  # type: ignore[attr-defined]
                                          shape=value.shape, stride=value.stride())
            return move(value)
        if isinstance(value, Mapping):
            out = {k: walk(v) for k, v in value.items()}
            return OrderedDict(out) if isinstance(value, OrderedDict) else out
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return {k: walk(v) for k, v in state.items()}


def _sub_plan(plan: Plan, shards: list[int]) -> Plan:
    """The chunks of some of ``plan``'s shards, renumbered in the order given."""
    renumber = {k: i for i, k in enumerate(shards)}
    chunks = [Chunk(renumber[c.shard], c.offset, c.nbytes) for c in plan.chunks if c.shard in renumber]
    return Plan(None, [], [], [], [], shard_sizes=[plan.shard_sizes[k] for k in shards], chunks=chunks,
                chunk_bytes=plan.chunk_bytes, shard_chunks=[plan.shard_chunks[k] for k in shards])


# ---------------------------------------------------------------- the global manifest


def global_manifest(info: RankPlan, metadata: Metadata, results: list[list[WriteResult]]) -> GlobalManifest:
    """The manifest of one save: DCP's metadata (every item's global shape, dtype and chunks) joined with where
    each rank put each chunk's bytes and the checksums of every rank's files."""
    where: dict[MetadataIndex, Stored] = {}
    records: dict[str, ShardRecord] = {}
    for rank in results:
        for r in rank:
            s = r.storage_data
            if not isinstance(s, Stored):
                raise CheckpointError(f"a rank reported item {r.index.fqn!r} without asyncckpt storage data")
            where[r.index] = s
            if s.shard is not None:
                records[s.file] = s.shard
    shards = sorted(records.values(), key=lambda rec: rec.file)  # one save id: rank-major, then index
    number = {rec.file: i for i, rec in enumerate(shards)}

    def span(fqn: str, s: Stored | None) -> Span:
        if s is None or s.file not in number:
            raise CheckpointError(f"no rank reported where the bytes of item {fqn!r} were written")
        return Span(number[s.file], s.offset, s.nbytes)

    tensors, objects = [], []
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            dtype = dtype_name(md.properties.dtype)
            if dtype not in DTYPES or md.properties.layout != torch.strided:
                raise CheckpointError(f"item {fqn!r} is a {md.properties.layout} tensor of dtype {dtype}, which "
                                      "the format cannot store as raw bytes")
            chunks = tuple(TensorChunk(tuple(c.offsets), tuple(c.sizes),
                                       span(fqn, where.get(MetadataIndex(fqn, c.offsets)))) for c in md.chunks)
            tensors.append(ChunkedTensor(fqn, dtype, tuple(md.size), chunks, bool(md.properties.requires_grad)))
        else:
            objects.append(ObjectRecord("", fqn, span(fqn, where.get(MetadataIndex(fqn)))))
    try:
        planner_data = encode_plain(metadata.planner_data)
    except TypeError as exc:
        raise CheckpointError(f"the save planner's data cannot be stored as JSON ({exc}); asyncckpt.dcp keeps DCP "
                              "metadata free of pickle, so a custom planner's planner_data must be plain values")
    meta = metadata.storage_meta
    storage_meta = None if meta is None else {
        "checkpoint_id": None if meta.checkpoint_id is None else str(meta.checkpoint_id),
        "save_id": meta.save_id, "modules": [str(m) for m in meta.modules]}
    return GlobalManifest(info.save_id, info.created_ns, len(results), tuple(shards), tuple(tensors),
                          tuple(objects), planner_data, storage_meta, metadata.version, sequence=info.sequence)


def to_metadata(manifest: GlobalManifest) -> Metadata:
    """DCP's ``Metadata`` of a global manifest; ``storage_data`` maps each item (and chunk) to its record."""
    items: dict[str, Any] = {}
    storage_data: dict[MetadataIndex, Any] = {}
    for t in manifest.tensors:
        chunks = [ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in t.chunks]
        items[t.fqn] = TensorStorageMetadata(TensorProperties(dtype=t.torch_dtype, requires_grad=t.requires_grad),
                                             torch.Size(t.shape), chunks)
        for c in t.chunks:
            storage_data[MetadataIndex(t.fqn, c.offsets)] = (t, c)
    for o in manifest.objects:
        items[o.key] = BytesStorageMetadata()
        storage_data[MetadataIndex(o.key)] = o

    def refuse(i: int) -> Any:
        raise CheckpointError("planner_data refers to a tensor")

    planner_data = None if manifest.planner_data is None else decode(manifest.planner_data, refuse, refuse)
    meta = manifest.storage_meta or {}
    storage_meta = StorageMeta(checkpoint_id=meta.get("checkpoint_id"), save_id=meta.get("save_id"),
                               modules=list(meta.get("modules", [])))
    return Metadata(items, planner_data, _Layout(manifest, storage_data), storage_meta, manifest.dcp_version)


@dataclass
class _Layout:
    """A loaded manifest and where each of DCP's storage indices is in it (``Metadata.storage_data``)."""

    manifest: GlobalManifest
    index: dict[MetadataIndex, Any]

    def shard_of(self, index: MetadataIndex) -> int | None:
        """The shard file holding the item or chunk at ``index`` (None: no such item)."""
        found = self.index.get(index)
        if found is None:
            return None
        return found.span.shard if isinstance(found, ObjectRecord) else found[1].span.shard


@dataclass(frozen=True)
class RankRead:
    """The ``storage_data`` of a rank's load plan: the save whose manifest it read and, from the coordinator, the
    shard files other ranks read too.

    Attributes:
        save_id: the id of the save whose manifest the rank read.
        shared: indices (into the manifest's shards) of the files more than one rank reads.
    """

    save_id: str
    shared: frozenset[int] = frozenset()


# ---------------------------------------------------------------- the writer


class StorageWriter(_Endpoint, dcp_storage.StorageWriter, AsyncStager):
    """DCP's ``StorageWriter`` (and ``AsyncStager``) on asyncckpt.

    Args:
        path: the checkpoint directory: a local path or any fsspec URL (``s3://bucket/run/step-100``). DCP's
            ``checkpoint_id=`` replaces it.
        storage_options: for URL targets (credentials, endpoint), as fsspec takes them.
        engine: a `SyncEngine` to use; by default the process shares one engine per set of
            engine options (`shared_engine`), so staging buffers are reused by every save.
        split_bytes: a plain tensor that several ranks hold (DDP's replicated state) and that has at least this
            many bytes is cut by rows into one piece per rank holding it, so each rank writes about its share
            (DCP alone writes it whole on one rank); ``None`` never cuts. Smaller ones go whole to the rank with
            the fewest bytes so far.
        **engine_options: `EngineOptions` (``host_memory_budget``, ``chunk_bytes``,
            ``shard_bytes``, ``fsync``, ``write_concurrency``…).

    ``dcp.save`` streams each rank's items through the budgeted staging buffers into its shard files.
    ``dcp.async_save`` calls `stage`, which copies the rank's tensors once into staging buffers laid out as
    its shard files and returns; the background save then writes those very buffers. As with any DCP storage,
    wait for one ``async_save`` to finish before starting the next on the same process group.

    Raises:
        InvalidArgumentError: both ``engine`` and engine options are given, or an engine option is unknown or out
            of range.
        InvalidArgumentError: ``split_bytes`` is neither None nor a positive number of bytes.

    Example:
        ```python
        dcp.save(state, storage_writer=StorageWriter("s3://bucket/run/step-100", host_memory_budget=4 << 30))
        ```
    """

    _synchronize_after_execute = False  # stage() has finished its copy when it returns

    def __init__(self, path: Any = None, *, storage_options: Mapping[str, Any] | None = None,
                 engine: SyncEngine | None = None, split_bytes: int | None = 16 << 20, **engine_options: Any) -> None:
        super().__init__(path, storage_options, engine, engine_options)
        if split_bytes is not None and (not isinstance(split_bytes, int) or split_bytes < 1):
            raise InvalidArgumentError(f"split_bytes must be a positive number of bytes or None, not {split_bytes!r}")
        self.rank = 0
        self.is_coordinator = True
        self._staged: "weakref.WeakSet[_Staged]" = weakref.WeakSet()
        self._claimed: dict[int, weakref.ref[_Share]] = {}  # the staging each planning thread took
        self.split_bytes = split_bytes
        self._saves: dict[int, tuple[RankPlan, dict[str, list[Piece]]]] = {}  # coordinator: saves being planned,
        # by the thread running each
        self.bytes_written = 0  # this rank's shard bytes in its last save (per-rank reports)
        self.files_written = 0  # this rank's shard files in its last save
        self.tensors_written = 0  # tensor items this rank wrote in its last save
        self.bytes_from_staging = 0  # of those, the bytes written straight from stage()'s buffers (no second copy)
        self.bytes_staged = 0  # the bytes its last stage() copied

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_staged")
        state["_saves"], state["_claimed"] = {}, {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._staged = weakref.WeakSet()

    # ------------------------------------------------------------ DCP's protocol

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        """Start a new save (DCP calls it first).

        Args:
            checkpoint_id: DCP's ``checkpoint_id=``, which replaces the path; None keeps it.

        Raises:
            InvalidArgumentError: ``checkpoint_id`` is not a usable path.
        """
        if checkpoint_id:
            self.path = to_url(checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Learn this rank's role in the save.

        Args:
            is_coordinator: whether this rank commits the global manifest.
            *args: DCP's further arguments, unused.
            **kwargs: DCP's further arguments: ``rank`` (this rank's number) and ``use_collectives``.

        Raises:
            CheckpointError: ``use_collectives=False``: one global manifest needs DCP's collectives.
        """
        if kwargs.get("use_collectives", True) is False:
            raise CheckpointError("asyncckpt.dcp writes one global manifest, which needs DCP's collectives; "
                                  "call dcp.save without use_collectives=False")
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank") or 0

    def storage_meta(self) -> StorageMeta | None:
        """What DCP records of the storage in its metadata.

        Returns:
            The storage meta, naming the checkpoint's path as its ``checkpoint_id``.
        """
        return StorageMeta(checkpoint_id=self.path)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        """Say which whole plain tensors this rank holds and, under ``async_save``, which staged shard holds each
        item (by DCP's key paths) and which plain tensors it staged only rows of or none of, for `assign`.

        Args:
            plan: this rank's save plan.

        Returns:
            The plan, its ``storage_data`` a ``LocalStaging`` with those facts (sizes in bytes).

        Raises:
            CheckpointError: this rank staged only its share of the plain tensors, and the planner records no key
                paths (DCP's ``planner_data``) to match them by.
        """
        staged = next((s for s in sorted([*self._staged, *_arrivals], key=lambda s: s.serial) if not s.claimed),
                      None)
        mapping = plan.planner_data
        if staged is not None and not isinstance(mapping, Mapping):
            if staged.skipped or staged.pieces:
                raise CheckpointError("the save planner records no key paths (DCP's planner_data), and this rank "
                                      "staged only its share of the plain tensors; use DefaultSavePlanner or a "
                                      "subclass of it (this save is not committed; the next one copies everything)")
            staged = None
        tensors: dict[MetadataIndex, int] = {}
        shard_of: dict[MetadataIndex, int] = {}
        pieces: dict[MetadataIndex, Piece] = {}
        skipped: set[MetadataIndex] = set()
        if staged is not None:
            staged.claimed = True
            self._claimed[threading.get_ident()] = weakref.ref(staged)
        for item in plan.items:
            path = mapping.get(item.index.fqn) if staged is not None else None
            path = tuple(path) if isinstance(path, (tuple, list)) else None
            if item.type == WriteItemType.TENSOR:
                if staged is not None and path is not None:
                    staged.fqn_paths[item.index.fqn] = path
                    if path in staged.skipped:
                        skipped.add(item.index)
                        continue
                    if path in staged.pieces:
                        piece, shard, rows = staged.pieces[path]
                        index = MetadataIndex(item.index.fqn, torch.Size(piece[0]))
                        pieces[item.index] = piece
                        staged.piece_views[index] = rows
                        if shard is not None:
                            shard_of[index] = shard
                        continue
                tensors[item.index] = item.tensor_storage_size() or 0
            k = staged.by_path.get(path) if staged is not None and path is not None else None
            if k is not None and item.type != WriteItemType.BYTE_IO:
                shard_of[item.index] = k
        nbytes = {k: staged.plan.shard_sizes[k] for k in set(shard_of.values())} if isinstance(staged, _Staged) else {}
        return dataclasses.replace(plan, storage_data=LocalStaging(shard_of, nbytes, tensors, pieces,
                                                                   frozenset(skipped)))

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """The coordinator names the save (one id for every rank's files, and each rank's number) and evens out the
        bytes each rank writes (`assign`).

        Args:
            plans: every rank's plan, from `prepare_local_plan`.

        Returns:
            Every rank's plan, items moved between ranks that hold them, each with its `RankPlan` as
                ``storage_data``.

        Raises:
            CheckpointError: no rank staged all of a plain tensor (see `assign`).
        """
        plans, pieces = assign(plans, self.split_bytes)
        info = RankPlan(uuid.uuid4().hex[:16], 0, len(plans), time.time_ns(), CLOCK.next(), frozenset(pieces))
        _uncommitted[self.target().key].add(info.save_id)  # not under _commit_lock: planning never waits for a commit
        self._saves[threading.get_ident()] = (info, pieces)
        return [dataclasses.replace(p, storage_data=dataclasses.replace(info, rank=i)) for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Write this rank's items durably (publishing nothing) and say where each one's bytes lie.

        Args:
            plan: this rank's plan from the coordinator (its ``storage_data`` a `RankPlan`).
            planner: DCP's planner, which gives each item's data.

        Returns:
            A future that is already done, holding one ``WriteResult`` per item (``storage_data``: `Stored`).

        Raises:
            CheckpointError: the plan was not made by an asyncckpt ``StorageWriter``, gives this rank a tensor it
                did not stage, or a write failed (a store error, such as `S3Error` or `StorageTimeoutError`).
        """
        info = plan.storage_data
        if not isinstance(info, RankPlan):
            raise CheckpointError("the save plan carries no asyncckpt storage data: its global planning did not go "
                                  "through this StorageWriter")
        claimed = self._claimed.pop(threading.get_ident(), None)
        staged = claimed() if claimed is not None else None
        tensors: list[tuple[WriteItem, torch.Tensor]] = []
        objects: list[tuple[WriteItem, bytes]] = []
        for item in plan.items:
            data: Any = staged.piece_views.get(item.index) if staged is not None else None  # rows it staged alone
            if data is None and item.index.fqn in info.pieces and item.tensor_data is not None:  # rows of a
                # replicated tensor that this rank staged whole
                whole = MetadataIndex(item.index.fqn, torch.Size([0] * len(item.tensor_data.size)))
                chunk = item.tensor_data.chunk
                data = planner.resolve_data(dataclasses.replace(item, index=whole, type=WriteItemType.TENSOR))
                data = data.narrow(0, chunk.offsets[0], chunk.sizes[0])
            elif data is None:
                data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                objects.append((item, data.getvalue() if isinstance(data, io.BytesIO) else bytes(data)))
            elif data.device.type == "meta":  # assign() gives a rank only what it staged: a broken invariant
                raise CheckpointError(f"rank {info.rank} was given {item.index.fqn} to write, which it did not stage "
                                      "(this save is not committed; please report it)")
            else:
                tensors.append((item, data.detach()))
        future: Future[list[WriteResult]] = Future()
        future.set_result(self._write(info, tensors, objects))
        if staged is not None and staged.fingerprint is not None:  # the next stage of this state copies this share
            mine: Shares = {}
            for item in plan.items:
                path = staged.fqn_paths.get(item.index.fqn)
                if path is not None and item.tensor_data is not None:
                    chunk = item.tensor_data.chunk
                    mine[path] = ((tuple(chunk.offsets), tuple(chunk.sizes)) if item.index.fqn in info.pieces
                                  else None)
            assert isinstance(staged, _Staged)
            _written.put(staged.engine, staged.fingerprint, (frozenset(staged.fqn_paths.values()), mine))
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """The coordinator commits: one global manifest naming every rank's files, written atomically once all of
        them are durable (DCP gathers results after every rank's ``write_data`` returned), then older files of
        this path are swept.

        Args:
            metadata: DCP's metadata of the save (every item's global shape, dtype and chunks).
            results: every rank's write results, from `write_data`.

        Raises:
            CheckpointError: this writer did not plan the save, a rank did not say where an item's bytes are, an
                item the format cannot store (a sparse tensor, an unknown dtype, planner data that is not plain
                JSON values), or the commit failed (a store error).
            CorruptCheckpointError: the manifest would not pass a reader's checks (nothing is published).
        """
        planned = self._saves.pop(threading.get_ident(), None)
        if planned is None:
            raise CheckpointError("finish() before prepare_global_plan(): this StorageWriter did not plan the save")
        info, pieces = planned
        for fqn, cut in pieces.items():  # DCP's metadata names the whole tensor; the ranks wrote it in pieces
            md = metadata.state_dict_metadata[fqn]
            assert isinstance(md, TensorStorageMetadata)
            md.chunks = [ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)) for offsets, sizes in cut]
        manifest = global_manifest(info, metadata, results)
        parse(manifest.seal(), str(self.path))  # never publish what a reader would refuse
        metadata.storage_data = {r.index: r.storage_data for rank in results for r in rank}
        target = self.target()
        fsync = self.options.fsync

        committer = Committer(target.storage, target.path, fsync)
        running = lambda: set(_uncommitted[target.key])  # noqa: E731 — a copy: planners add to it meanwhile

        async def commit() -> list[str]:
            await target.storage.makedirs(target.path, fsync)
            try:
                there: AnyManifest | None = await read_manifest(target.storage, target.path, target.display)
            except CheckpointError:  # none yet (or not one we can read: the write below reports a store failure)
                there = None
            if there is not None and there.order > manifest.order:  # a later save of this path committed first
                log.info("%s: a later save committed before this one; this one is not published", target.display)
                return [s.file for s in manifest.shards]
            await committer.commit(manifest, running, sweep=False)
            try:
                return await committer.stale(manifest, running)
            except Exception:  # best effort: the next commit of this path sweeps again
                return []

        async def sweep(names: list[str]) -> None:
            try:
                await committer.remove(names)
            except Exception as exc:
                log.debug("sweeping %s after its commit: %s (the next commit sweeps again)", target.display, exc)

        try:
            with _commit_lock:
                try:
                    stale = self.engine.run(commit)
                finally:
                    _uncommitted[target.key].discard(info.save_id)
        except OSError as exc:
            raise CheckpointError(f"cannot commit {target.display}: {describe(exc)}") from exc
        if stale:  # the checkpoint is durable: the files of the save it replaced go in the background
            try:
                self.engine.core.runtime.start(sweep, stale)
            except CheckpointError as exc:  # the engine closed meanwhile: the commit stands, the next one sweeps
                log.debug("not sweeping %s after its commit: %s", target.display, exc)

    # ------------------------------------------------------------ staging

    def stage(self, state_dict: dict[str, Any]) -> StagedState:
        """Copy this rank's tensors once into staging buffers laid out as its shard files; return the state with
        those copies in place of the tensors (other values deep-copied). Training may change the originals as
        soon as this returns. Waits for memory while earlier saves still hold the budget.

        On many ranks, a state saved before through this process's engine (same plain tensors: key paths, dtypes,
        shapes) has only this rank's share of its plain tensors copied — those, or the rows of those, that the
        rank wrote in that save — and the coordinator gives each rank the same share again; the others stand in
        the staged state as meta tensors. With DDP, each rank copies about 1/world of the replicated state.

        Args:
            state_dict: this rank's state dict as ``dcp.async_save`` passes it.

        Returns:
            The staged state: the same structure, tensors replaced by views of staging memory.

        Raises:
            CheckpointError: this rank's tensors need more than ``host_memory_budget`` bytes at once (use
                ``dcp.save``, which streams), or a sharded tensor other than a DTensor.
        """
        engine = self.engine
        core = engine.core
        leaves: list[tuple[tuple[str | int, ...], Any]] = []
        _tensor_leaves(state_dict, (), leaves)
        locals_ = [(".".join(map(str, path)), _local(t, ".".join(map(str, path)))) for path, t in leaves]
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        # The plain tensors (replicated: DDP) this rank wrote last time it saved this very state are all it copies
        # now: the coordinator hands every rank the same share again (assign). The others become meta tensors.
        plain = [i for i, (_, t) in enumerate(leaves) if sharded_kind(t) is None]
        fingerprint: Fingerprint | None = None
        last: Written | None = None
        if world > 1 and plain:
            fingerprint = (world, tuple((leaves[i][0], leaves[i][1].dtype, tuple(leaves[i][1].shape)) for i in plain))
            last = _written.take(engine, fingerprint)
        rows: dict[int, Piece | None] = {}  # leaf -> the rows to stage (None: all of it); leaves not in it: none
        if last is None:
            rows = dict.fromkeys(range(len(leaves)))
        else:
            known, mine = last
            named = collections.Counter(id(t) for _, t in leaves)
            for i, (path, t) in enumerate(leaves):
                if sharded_kind(t) is not None or named[id(t)] > 1 or path not in known or mine.get(path, 0) is None:
                    rows[i] = None  # tied tensors (one object, two keys) stay whole
                elif path in mine:
                    rows[i] = mine[path]
        chosen = list(rows)
        staging = [(locals_[i][0], locals_[i][1] if rows[i] is None else locals_[i][1].narrow(
            0, rows[i][0][0], rows[i][1][0])) for i in chosen]  # type: ignore[index]
        # Items other ranks also hold get shards of their own, a few per rank, laid out alike on every holder:
        # the coordinator can then give each such shard whole to one of them (assign), and no rank copies twice.
        shared = [j for j, i in enumerate(chosen) if _replicated(leaves[i][1])]
        total = sum(locals_[i][1].nbytes for i, (_, t) in enumerate(leaves) if _replicated(t))
        size = min(self.options.file_shard_bytes, max(self.options.chunk_bytes, -(-total // (4 * world))))
        plan, index = prepare_items(staging, [], self.options.file_shard_bytes, self.options.chunk_bytes,
                                    [(shared, size)] if shared else None)
        if plan.total_bytes > core.pool.budget:
            raise CheckpointError(
                f"dcp.async_save copies this rank's {plan.total_bytes} bytes at once, more than host_memory_budget "
                f"({core.pool.budget}); raise the budget or use dcp.save, which streams through any budget")
        buffers: list[torch.Tensor] = []
        try:
            for size in plan.shard_sizes:
                buffers.append(core.runtime.call(core.pool.acquire, size))
            pending = []
            for chunk in plan.chunks:
                ready = plan.fill(chunk, buffers[chunk.shard][chunk.offset:chunk.offset + chunk.nbytes])
                if ready is not None:
                    pending.append(ready)
            for ready in pending:  # device copies: the staged bytes are complete when stage returns
                ready.synchronize()
            plan.finish()
        except BaseException:
            for buf in buffers:
                core.runtime.call_soon(core.pool.release, buf)
            raise
        staged = _Staged(engine, plan, buffers)
        staged.fingerprint = fingerprint
        self.bytes_staged = plan.total_bytes
        copies: dict[int, torch.Tensor] = {}
        held: list[torch.Tensor] = []  # the staged rows: kept with the staged state, out of DCP's sight
        for i, (path, t) in enumerate(leaves):
            if rows.get(i, ()) is not None:  # staged in part or not at all: DCP plans with a meta tensor
                if i not in rows:
                    staged.skipped.add(path)
                copies[id(t)] = torch.empty(locals_[i][1].shape, dtype=locals_[i][1].dtype, device="meta")
        for j, i in enumerate(chosen):
            (path, t), local = leaves[i], staging[j][1]
            e = plan.tensors[index[j]].entry
            assert e is not None
            view = staged.view(e, local.dtype, tuple(local.shape))
            if rows[i] is not None:
                staged.pieces[path] = (rows[i], e.shard if e.nbytes else None,  # type: ignore[assignment]
                                       staged.raw(e, local.dtype, tuple(local.shape)))
                held.append(view)
                continue
            copies[id(t)] = view
            if e.nbytes:
                staged.by_path[path] = e.shard
        result = StagedState(_rebuild(state_dict, copies))
        result.staged, result.held = staged, held
        del copies
        if staged.by_pointer or staged.skipped or staged.pieces:
            self._staged.add(staged)
        else:
            staged.release()  # nothing staged but empty tensors
        return result

    def synchronize_staging(self) -> None:
        """Nothing to wait for: `stage` returns once its copy is complete."""

    def close(self) -> None:
        """Nothing to release: the shared engine lives as long as the process."""

    # ------------------------------------------------------------ writing

    def _zero_copy(self, tensors: list[tuple[WriteItem, torch.Tensor]]
                   ) -> tuple[_Staged | None, list[int], dict[int, tuple[int, Entry]]]:
        """The staged copy these tensors are views of, its shards that hold only items of this plan (written as
        they are), and each such item's (shard, entry)."""
        hits: dict[int, tuple[_Staged, int, Entry]] = {}
        for item, t in tensors:
            if t.device.type != "cpu" or not t.is_contiguous() or not t.numel():
                continue
            for staged in list(self._staged):
                hit = staged.by_pointer.get(t.data_ptr())
                if hit is not None and hit[1].nbytes == t.nbytes and not staged.released:
                    hits[id(item)] = (staged, *hit)
                    break
        if not hits:
            return None, [], {}
        counts: dict[int, int] = {}
        for staged, _, _ in hits.values():
            counts[id(staged)] = counts.get(id(staged), 0) + 1
        chosen = next(s for s, _, _ in hits.values() if counts[id(s)] == max(counts.values()))
        plan = chosen.plan
        covered: dict[int, set[int]] = {}
        for staged, shard, entry in hits.values():
            if staged is chosen:
                covered.setdefault(shard, set()).add(id(entry))
        needed: dict[int, set[int]] = {}
        for info in plan.tensors:
            if info.entry is not None and info.entry.nbytes:
                needed.setdefault(info.entry.shard, set()).add(id(info.entry))
        whole = sorted(k for k, ids in needed.items() if covered.get(k) == ids)
        located = {key: (shard, entry) for key, (staged, shard, entry) in hits.items()
                   if staged is chosen and shard in whole}
        return chosen, whole, located

    def _write(self, info: RankPlan, tensors: list[tuple[WriteItem, torch.Tensor]],
               objects: list[tuple[WriteItem, bytes]]) -> list[WriteResult]:
        engine = self.engine
        core = engine.core
        target = self.target()
        fsync = self.options.fsync
        staged, whole, located = self._zero_copy(tensors)
        files: list[str] = []
        jobs: list[Job] = []
        results: list[WriteResult] = []
        error: BaseException | None = None
        try:
            if staged is not None and whole:
                borrowed = _sub_plan(staged.plan, whole)
                names = [shard_name(info.save_id, k, info.rank) for k in range(len(whole))]
                files += names
                pieces = []
                for chunk in borrowed.chunks:  # the staged buffers themselves, chunk by chunk: no second copy
                    buf = staged.buffers[whole[chunk.shard]]
                    pieces.append((chunk, buf[chunk.offset:min(buf.numel(), chunk.offset + aligned_size(chunk.nbytes))],
                                   None))
                job = core.begin(BorrowedShardJob, target, borrowed, fsync=fsync, files=names, save_id=info.save_id)
                jobs.append(job)
                core.runtime.call_soon(job.deliver, pieces, 0.0)  # begun and delivered at once: it always concludes
                renumber = {k: i for i, k in enumerate(whole)}
                for item, _ in tensors:
                    if id(item) in located:
                        shard, e = located[id(item)]
                        results.append(WriteResult(item.index, e.nbytes, Stored(names[renumber[shard]], e.offset,
                                                                                 e.nbytes)))
            rest = [(item, t) for item, t in tensors if id(item) not in located]
            if rest or objects:
                # whole tensors (DDP's replicated ones) go in shards apart from the pieces of sharded ones, so a
                # rank that loads its own pieces back does not read other ranks' items with them
                whole_items = [i for i, (item, _) in enumerate(rest) if item.type == WriteItemType.TENSOR]
                plan, index = prepare_items([(item.index.fqn, t) for item, t in rest],
                                            [(item.index.fqn, data) for item, data in objects],
                                            self.options.file_shard_bytes, self.options.chunk_bytes,
                                            [(whole_items, self.options.file_shard_bytes)] if whole_items else None)
                names = [shard_name(info.save_id, len(files) + k, info.rank) for k in range(len(plan.shard_sizes))]
                files += names
                jobs.append(engine.submit(plan, target.display, ShardJob, storage_options=self.storage_options,
                                          fsync=fsync, files=names, save_id=info.save_id))
                for (item, _), i in zip(rest, index):
                    e = plan.tensors[i].entry
                    assert e is not None
                    results.append(WriteResult(item.index, e.nbytes, Stored(names[e.shard], e.offset, e.nbytes)))
                for (item, _), (_, _, e) in zip(objects, plan.objects):
                    results.append(WriteResult(item.index, e.nbytes, Stored(names[e.shard], e.offset, e.nbytes)))
        except BaseException as exc:  # noqa: B036 — raised below, once every job has settled
            error = exc
        for job in jobs:  # wait for every job, whatever happened: they may still read the staged memory
            try:
                job.handle.result()
            except BaseException as exc:  # noqa: B036
                error = error or exc
        if staged is not None:
            staged.release()
        if error is not None:
            raise error
        records = {rec.file: rec for job in jobs for rec in job.records}  # type: ignore[attr-defined]
        self.bytes_written = sum(rec.nbytes for rec in records.values())
        self.files_written, self.tensors_written = len(records), len(tensors)
        self.bytes_from_staging = sum(staged.plan.shard_sizes[k] for k in whole) if staged is not None else 0
        out, seen = [], set()
        for r in results:
            s = r.storage_data
            if s.file not in seen:  # the first result naming a file carries the file's record
                seen.add(s.file)
                s = dataclasses.replace(s, shard=records[s.file])
            out.append(WriteResult(r.index, r.size_in_bytes, s))
        return out


# ---------------------------------------------------------------- the reader


def _byte_range(chunk: TensorChunk, offsets: tuple[int, ...], lengths: tuple[int, ...], itemsize: int
                ) -> tuple[int, int]:
    """The bytes of a saved chunk (relative to its start) that hold the box ``offsets`` + ``lengths`` of it:
    whole rows of its first dimension, which are contiguous."""
    if not chunk.sizes:
        return 0, itemsize
    row = math.prod(chunk.sizes[1:]) * itemsize
    return offsets[0] * row, (offsets[0] + lengths[0]) * row


def _direct(target: torch.Tensor, chunk: TensorChunk, lengths: tuple[int, ...], dtype: torch.dtype
            ) -> torch.Tensor | None:
    """``target`` as flat bytes if the saved rows can land in it unchanged (whole rows, same dtype, dense CPU)."""
    if (type(target) is not torch.Tensor or target.device.type != "cpu" or target.dtype != dtype
            or not target.is_contiguous() or target.is_conj() or target.is_neg() or not target.numel()
            or tuple(lengths[1:]) != tuple(chunk.sizes[1:])):
        return None
    return target.reshape(-1).view(torch.uint8)


def _band(target: torch.Tensor, chunk: TensorChunk, offsets: tuple[int, ...], lengths: tuple[int, ...],
          dtype: torch.dtype) -> Rows | None:
    """``target`` as the column band (dimension 1) of the saved rows it takes, if the bytes can land in it
    unchanged: same dtype, dense CPU rows, whole inner dimensions. Its ``offset`` is relative to the rows read."""
    if (type(target) is not torch.Tensor or target.device.type != "cpu" or target.dtype != dtype
            or target.dim() < 2 or target.is_conj() or target.is_neg() or not target.numel()
            or tuple(lengths[2:]) != tuple(chunk.sizes[2:]) or target.stride(-1) != 1
            or not target[0].is_contiguous()):
        return None
    inner = math.prod(chunk.sizes[2:]) * dtype.itemsize
    raw = target.view(torch.uint8)
    out = raw.as_strided((lengths[0], lengths[1] * inner), (target.stride(0) * dtype.itemsize, 1),
                         raw.storage_offset())
    return Rows(0, chunk.sizes[1] * inner, offsets[1] * inner, out)


class StorageReader(_Endpoint, dcp_storage.StorageReader):
    """DCP's ``StorageReader`` on asyncckpt: reads the checkpoints `StorageWriter` commits.

    Args:
        path: the checkpoint directory or URL (DCP's ``checkpoint_id=`` replaces it).
        storage_options: for URL targets.
        engine: a `SyncEngine` to use (default: the process's shared one).
        weights_only: load non-tensor values with torch's weights-only rules (the default); ``False`` allows any
            pickle — only for checkpoints you trust.
        verify: check each chunk's checksum (default: the engine's ``verify`` option, on).
        **engine_options: `EngineOptions`.

    Each rank reads only the chunks of the shard files that cover its tensors, into staging buffers, checks them
    and copies their bytes straight into its tensors. `stats` says how much was read for how much needed.

    Raises:
        InvalidArgumentError: both ``engine`` and engine options are given, or an engine option is unknown or out
            of range.

    Example:
        ```python
        dcp.load(state, storage_reader=StorageReader("s3://bucket/run/step-100"))
        ```
    """

    def __init__(self, path: Any = None, *, storage_options: Mapping[str, Any] | None = None,
                 engine: SyncEngine | None = None, weights_only: bool = True, verify: bool | None = None,
                 **engine_options: Any) -> None:
        super().__init__(path, storage_options, engine, engine_options)
        self.weights_only = weights_only
        self.verify = self.options.verify if verify is None else verify
        self.stats = ReadStats()  # the last load on this rank: bytes wanted, bytes read, chunks read
        self._layout: _Layout | None = None

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        """Start a new load (DCP calls it first): forget the manifest read before.

        Args:
            checkpoint_id: DCP's ``checkpoint_id=``, which replaces the path; None keeps it.

        Raises:
            InvalidArgumentError: ``checkpoint_id`` is not a usable path.
        """
        if checkpoint_id:
            self.path = to_url(checkpoint_id)
        self._layout = None

    def read_metadata(self) -> Metadata:
        """The checkpoint's metadata, from its global manifest (validated before anything is allocated).

        Returns:
            DCP's ``Metadata``: every item's global shape, dtype and chunks, the planner's data, and (as
                ``storage_data``) where each chunk's bytes lie.

        Raises:
            CheckpointError: no checkpoint at the path, a checkpoint saved by one process (load it with an engine),
                a damaged or newer-format manifest (its subclass kept), or a store error. It travels inside a
                ``BaseException`` so that DCP cannot swallow it; `unwrap` gives it back.
        """
        try:
            target = self.target()
            try:
                found = self.engine.run(read_manifest, target.storage, target.path, target.display)
            except OSError as exc:
                raise CheckpointError(f"cannot load {target.display}: {describe(exc)}") from exc
            if isinstance(found, Manifest):
                raise CheckpointError(
                    f"{target.display} was saved by one process (engine.save), not through torch.distributed."
                    "checkpoint; load it with asyncckpt's engine.load (or asyncckpt.SyncEngine().load)")
            return to_metadata(found)
        except CheckpointError as exc:  # DCP would swallow an Exception here and report "metadata is None"
            raise _Carrier(exc) from exc

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Take the layout of the checkpoint from ``metadata``.

        Args:
            metadata: what `read_metadata` returned (DCP hands it to every rank).
            is_coordinator: whether this rank coordinates the load (no difference here).
            *args: DCP's further arguments, unused.
            **kwargs: DCP's further arguments, unused.

        Raises:
            CheckpointError: ``metadata`` was not read by an asyncckpt ``StorageReader``.
        """
        if not isinstance(metadata.storage_data, _Layout):
            raise CheckpointError("the metadata was not read by an asyncckpt StorageReader")
        self._layout = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """Tag this rank's plan with the save it read, for `prepare_global_plan` to compare.

        Args:
            plan: this rank's load plan.

        Returns:
            The plan, its ``storage_data`` a `RankRead` naming the save whose manifest this rank read.
        """
        assert self._layout is not None
        return dataclasses.replace(plan, storage_data=RankRead(self._layout.manifest.save_id))

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """Every rank must have read the same manifest: a save that committed between their reads would mix. Each
        rank then learns which shard files other ranks read too (replicated state, a reshard), which it reads
        through the page cache, so that the device serves those bytes once.

        Args:
            plans: every rank's plan, from `prepare_local_plan`.

        Returns:
            The plans, each ``storage_data`` a `RankRead` with the shards read by more than one rank.

        Raises:
            CheckpointError: the ranks read different saves (the path was overwritten meanwhile); load again.
        """
        ids = {p.storage_data.save_id if isinstance(p.storage_data, RankRead) else p.storage_data for p in plans}
        if len(ids) > 1:
            raise CheckpointError(f"{self.path} was overwritten while the ranks read its manifest (they found saves "
                                  f"{', '.join(sorted(map(str, ids)))}); load again")
        assert self._layout is not None
        readers: dict[int, int] = {}
        for p in plans:
            for shard in {self._layout.shard_of(req.storage_index) for req in p.items}:
                if shard is not None:
                    readers[shard] = readers.get(shard, 0) + 1
        read = RankRead(self._layout.manifest.save_id, frozenset(k for k, n in readers.items() if n > 1))
        return [dataclasses.replace(p, storage_data=read) for p in plans]

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read the chunks covering this rank's items, check them, and copy them into its tensors.

        Args:
            plan: this rank's items to load.
            planner: DCP's planner, which says where each tensor goes and takes non-tensor values.

        Returns:
            A future that is already done: the reads are complete when this returns.

        Raises:
            CheckpointError: called before `set_up_storage_reader`, an item the checkpoint does not hold, a
                damaged chunk (`CorruptCheckpointError`), a pickled value that weights-only
                loading refuses (`UnsafeCheckpointError`), or a store error.
        """
        layout = self._layout
        if layout is None:
            raise CheckpointError("read_data() before set_up_storage_reader()")
        manifest = layout.manifest
        target = self.target()
        regions: list[list[Region]] = [[] for _ in manifest.shards]
        later: list[tuple[ReadItem, torch.Tensor, Any]] = []  # (request, destination, how to finish it)
        for req in plan.items:
            found = layout.index.get(req.storage_index)
            if found is None:
                raise CheckpointError(f"{target.display} has no item {req.storage_index.fqn!r} at offsets "
                                      f"{list(req.storage_index.offset or ())}")
            if req.type == LoadItemType.BYTE_IO:
                buf = torch.empty(found.span.nbytes, dtype=torch.uint8)
                regions[found.span.shard].append((found.span.offset, buf))
                later.append((req, buf, found))
                continue
            record, chunk = found
            dest = planner.resolve_tensor(req).detach()
            lengths, offsets = tuple(req.lengths), tuple(req.storage_offsets)
            lo, hi = _byte_range(chunk, offsets, lengths, record.torch_dtype.itemsize)
            if hi > lo:
                direct = _direct(dest, chunk, lengths, record.torch_dtype)
                band = None if direct is not None else _band(dest, chunk, offsets, lengths, record.torch_dtype)
                if band is not None:  # a column band (a reshard): straight into the destination's rows
                    regions[chunk.span.shard].append(dataclasses.replace(band, offset=chunk.span.offset + lo))
                    later.append((req, dest, None))
                    continue
                out = direct if direct is not None else torch.empty(hi - lo, dtype=torch.uint8)
                regions[chunk.span.shard].append((chunk.span.offset + lo, out))
                later.append((req, dest, None if direct is not None else (record, chunk, out)))
            else:
                later.append((req, dest, None))

        async def read() -> ReadStats:
            core = self.engine.core
            shared = plan.storage_data.shared if isinstance(plan.storage_data, RankRead) else frozenset()
            try:
                return await read_regions(target.storage, target.path, target.display, manifest.shards, self.verify,
                                          core.pool, regions, " (this rank's tensors may already hold part of it)",
                                          shared)
            except OSError as exc:
                raise CheckpointError(f"cannot load {target.display}: {describe(exc)}") from exc

        self.stats = self.engine.run(read)
        for req, dest, how in later:
            if req.type == LoadItemType.BYTE_IO:
                if self.weights_only:  # refused here, before the planner unpickles it without restrictions
                    unpickle(dest, how, target.display, "cpu", True)
                planner.load_bytes(req, io.BytesIO(dest.numpy().tobytes()))
                continue
            if how is not None:
                record, chunk, out = how
                rows = (req.lengths[0],) + tuple(chunk.sizes[1:]) if chunk.sizes else ()
                saved = out.view(record.torch_dtype).view(rows)
                for d in range(1, len(rows)):
                    saved = saved.narrow(d, req.storage_offsets[d], req.lengths[d])
                dest.copy_(saved)
            planner.commit_tensor(req, dest)
        future: Future[None] = Future()
        future.set_result(None)
        return future


# ---------------------------------------------------------------- the asyncio face on many ranks


class RankFace:
    """What ``CheckpointEngine(process_group=pg)`` saves and loads through: DCP on ``pg`` with this module's
    writer and reader (the engine's options, the process's shared engine for them).

    ``save`` runs ``dcp.async_save`` on the caller's task: it returns once this rank's tensors are copied into
    staging (one copy), and DCP's planning, the writes and the global commit go on in DCP's checkpoint thread, one
    save after another. The handle settles after the commit, with our error, never DCP's ``CheckpointException``.
    Give the engine a process group of its own (``dist.new_group(backend="gloo")``): DCP's collectives then never
    interleave with the training's.

    Args:
        options: the engine's options, for the writers and readers.
        group: the ``torch.distributed`` process group every rank of the checkpoint belongs to.
    """

    def __init__(self, options: EngineOptions, group: Any) -> None:
        self.options, self.group = options, group
        self._pending: list[tuple[SaveHandle, Any]] = []

    def _engine(self) -> SyncEngine:
        return shared_engine(self.options)

    def save(self, state: Any, path: Any, storage_options: Mapping[str, Any] | None, runtime: Any) -> SaveHandle:
        """Stage this rank's part of ``state`` and start ``dcp.async_save`` of it to ``path``.

        Args:
            state: this rank's state dict (tensors, DTensors, and values DCP pickles).
            path: the checkpoint directory or URL, the same on every rank.
            storage_options: fsspec options for a URL target.
            runtime: the calling engine's runtime, whose loop settles the handle.

        Returns:
            A handle that settles once the coordinator has committed the global manifest, with asyncckpt's error
                (never DCP's ``CheckpointException``) if any rank failed.

        Raises:
            InvalidArgumentError: ``state`` is not a Mapping.
            CheckpointError: staging failed on this rank (such as more bytes than ``host_memory_budget``), or
                DCP's planning failed on some rank.
        """
        import torch.distributed.checkpoint as dcp

        if not isinstance(state, Mapping):
            raise InvalidArgumentError(f"a multi-rank save takes a state dict (a Mapping), not a "
                                       f"{type(state).__name__}: DCP addresses values by key")
        writer = StorageWriter(path, storage_options=storage_options, engine=self._engine())
        t0 = time.perf_counter()
        with unwrapped():
            future = dcp.async_save(dict(state), storage_writer=writer, process_group=self.group)
        snapshot = time.perf_counter() - t0
        handle = SaveHandle(str(writer.path), runtime)
        handle.mark_snapshotted()
        self._pending = [(h, f) for h, f in self._pending  # settled ones stay only while their error is unseen
                         if not h.done() or (h.error is not None and not h.observed)] + [(handle, future)]

        def settle(done: Any) -> None:
            try:
                with unwrapped():
                    done.result()
                result = SaveResult(str(writer.path), writer.bytes_written, snapshot,
                                    time.perf_counter() - t0 - snapshot, writer.files_written, writer.tensors_written)
                runtime.call_soon(handle.settle, result, None)
            except BaseException as exc:  # noqa: B036 — the handle reports it
                runtime.call_soon(handle.settle, None, exc)

        future.add_done_callback(settle)
        return handle

    async def wait(self) -> None:
        """Wait for every save this face started; raise the first failure nobody has seen yet.

        Raises:
            CheckpointError: the first failure of those saves that nobody has seen.
        """
        error: BaseException | None = None
        for handle, _ in list(self._pending):
            seen = handle.observed
            try:
                await handle
            except Exception as exc:  # the first one is raised once all settled
                if not seen:
                    error = error or exc
        self._pending = []
        if error is not None:
            raise error

    async def load(self, path: Any, state: Any, storage_options: Mapping[str, Any] | None, verify: bool | None,
                   weights_only: bool | None) -> dict[str, Any]:
        """Load the checkpoint at ``path`` into ``state`` in place with ``dcp.load`` (resharded to this rank's
        tensors), after every save this face started.

        Args:
            path: the checkpoint directory or URL, the same on every rank.
            state: this rank's state dict; its tensors (DTensors included) are filled in place.
            storage_options: fsspec options for a URL target.
            verify: check every chunk's checksum (None: the engine's ``verify`` option).
            weights_only: unpickle non-tensor values with torch's weights-only rules (True and None); ``False``
                allows any pickle.

        Returns:
            An empty dict: everything is restored in place.

        Raises:
            InvalidArgumentError: ``state`` is not a Mapping.
            CheckpointError: the load failed on some rank (asyncckpt's error, its subclass kept).
        """
        import anyio
        import torch.distributed.checkpoint as dcp

        if not isinstance(state, Mapping):
            raise InvalidArgumentError("a multi-rank load restores into state=: pass this rank's state dict (its "
                                       "tensors, DTensors included, are filled in place, resharded)")
        for handle, _ in list(self._pending):  # after pending saves (of any path: DCP runs them in order anyway)
            with contextlib.suppress(BaseException):
                await handle.wait()
        reader = StorageReader(path, storage_options=storage_options, engine=self._engine(),
                               weights_only=weights_only is not False, verify=verify)

        def run() -> None:
            with unwrapped():
                dcp.load(state, storage_reader=reader, process_group=self.group)

        await anyio.to_thread.run_sync(run)
        return {}
