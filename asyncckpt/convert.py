"""Conversions between the native format, single ``torch.save`` files and safetensors weight files.

Everything here is synchronous and safe to call from any thread (asynchronous work runs on a private event loop),
so the CLI (``asyncckpt convert``) and the Lightning helpers share it:

* :func:`to_torch_file` — native checkpoint → one ``torch.save`` file (``torch.load``, ``load_from_checkpoint``).
* :func:`from_torch_file` — ``torch.save`` file → native checkpoint (weights-only loading unless told otherwise).
* :func:`to_safetensors` — tensors of a native checkpoint → ``.safetensors`` files named by key path.

Native checkpoints are read shard by shard with every chunk checked against the manifest's xxh3-64 checksums, so a
conversion never copies damaged bytes and needs host memory for the result plus one shard.  :func:`scan_shards`,
the streaming reader behind it, is also what ``asyncckpt verify`` runs.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import posixpath
import re
import struct
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import anyio
import fsspec
import torch
from anyio.from_thread import start_blocking_portal

from .errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from .loader import build_state, read_manifest, torch_load_reason
from .manifest import DTYPES, MANIFEST_NAME, MAX_DEPTH, SAFETENSORS_DTYPES, decode
from .storage import Storage, as_memoryview, resolve

if sys.version_info < (3, 11):  # pragma: no cover - anyio depends on the backport there
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "Conversion", "Progress", "from_torch_file", "iter_leaves", "key_path", "load_torch_file", "path_kind",
    "read_native", "scan_shards", "to_safetensors", "to_torch_file",
]


# ---------------------------------------------------------------- progress reporting

class Bar(Protocol):
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...


#: ``progress(description, total_bytes) -> Bar``: how a conversion reports progress (the CLI draws bars with it).
Progress = Callable[[str, int], Bar]


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(progress: Progress | None, desc: str, total: int) -> Bar:
    return _NoBar() if progress is None else progress(desc, total)


# ---------------------------------------------------------------- paths

def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith(("file://", "local://"))


def _local(url: str) -> str:
    return os.path.abspath(url.removeprefix("file://").removeprefix("local://"))


def _fs(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """fsspec filesystem and path; storage options apply to remote URLs only."""
    if _is_local(url):
        return fsspec.filesystem("file"), _local(url)
    options = {k: v for k, v in (storage_options or {}).items() if k != "retry"}  # asyncckpt's own S3 option
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        raise CheckpointError(f"{url}: the fsspec backend for it is not installed ({exc})") from exc


def path_kind(url: Any, storage_options: dict[str, Any] | None = None) -> str | None:
    """What is at ``url``: ``"native"`` (a committed checkpoint), ``"dir"``, ``"file"`` or None (nothing)."""
    url = os.fspath(url)
    fs, path = _fs(url, storage_options)
    try:
        info = fs.info(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if info.get("type") != "directory":
        return "file"
    return "native" if fs.exists(posixpath.join(path, MANIFEST_NAME)) else "dir"


def _run(fn: Callable[..., Any], *args: Any) -> Any:
    """Run an async function to completion on a private loop (works from any thread, even inside a loop)."""
    with start_blocking_portal() as portal:
        return portal.call(fn, *args)


def _first_error(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


class _Opened:
    """A storage plugin opened on the current loop, closed (network sessions included) on exit."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None, concurrency: int) -> None:
        self.url, self.options, self.concurrency = url, storage_options, concurrency

    async def __aenter__(self) -> tuple[Storage, str]:
        self.storage, path = resolve(self.url, None if _is_local(self.url) else self.options,
                                     anyio.CapacityLimiter(self.concurrency))
        return self.storage, path

    async def __aexit__(self, *exc: Any) -> None:
        from .engine import _close  # the engine's own clean-up of network sessions

        await _close(self.storage)


# ---------------------------------------------------------------- the manifest's structure

def key_path(path: str, key: Any) -> str:
    """The dotted name of ``key`` under ``path`` — the same names the engine uses in shard headers and errors."""
    part = key if isinstance(key, str) else repr(key)
    return f"{path}.{part}" if path else part


def _key_value(node: Any) -> Any:
    """A decoded dict key (keys are plain values; a tensor or pickled key is shown by its index)."""
    return decode(node, lambda i: f"<tensor {i}>", lambda i: f"<object {i}>")


def _container(node: Any) -> str | None:
    """The container kind of an encoded node (``dict``, ``odict``, ``list``, ``tuple``), or None for a leaf."""
    if isinstance(node, dict):
        for kind in ("dict", "odict", "list", "tuple"):
            if kind in node:
                return kind
    return None


def iter_leaves(node: Any, path: str = "", depth: int = 0) -> Iterator[tuple[str, Any]]:
    """``(key path, encoded leaf)`` for every leaf of a manifest's ``tree``, in saved order.

    Leaves are plain JSON values, ``{"float": ...}``, ``{"tensor": i}`` and ``{"object": i}``; empty containers are
    yielded as leaves too, so nothing saved goes unlisted.
    """
    if depth > MAX_DEPTH:
        raise CorruptCheckpointError(f"manifest structure nests deeper than {MAX_DEPTH} levels")
    kind = _container(node)
    if kind is None:
        yield path, node
        return
    body = node[kind]  # an odict node may also carry "metadata" (a state_dict's versions), not an entry
    if kind in ("dict", "odict") and isinstance(body, list):
        if not body:
            yield path, node
        for pair in body:
            if not isinstance(pair, list) or len(pair) != 2:
                raise CorruptCheckpointError("manifest dict entry is not a [key, value] pair")
            yield from iter_leaves(pair[1], key_path(path, _key_value(pair[0])), depth + 1)
    elif kind in ("list", "tuple") and isinstance(body, list):
        if not body:
            yield path, node
        for i, item in enumerate(body):
            yield from iter_leaves(item, key_path(path, str(i)), depth + 1)
    else:
        yield path, node


def _tensor_shard(doc: dict[str, Any], record: dict[str, Any]) -> int:
    return doc["storages"][record["base"]]["shard"] if "base" in record else record["shard"]


# ---------------------------------------------------------------- reading shards

async def scan_shards(storage: Storage, path: str, display: str, doc: dict[str, Any], shards: list[int], *,
                      keep: bool = False, concurrency: int = 8, bar: Bar | None = None,
                      problems: list[str] | None = None) -> dict[int, torch.Tensor]:
    """Read the given shards chunk by chunk and check each chunk's xxh3-64 checksum.

    With ``keep`` the shards' bytes are returned (shard index → uint8 tensor); otherwise each chunk is read into a
    scratch buffer and dropped, so memory stays at ``concurrency`` chunks.  Damage raises
    :class:`CorruptCheckpointError`, or, when ``problems`` is a list, is appended to it and the scan goes on.
    """
    bar = bar or _NoBar()
    out: dict[int, torch.Tensor] = {}
    chunks = anyio.CapacityLimiter(concurrency)
    files = anyio.CapacityLimiter(concurrency)

    def fail(message: str) -> None:
        if problems is None:
            raise CorruptCheckpointError(f"{display}: {message}")
        problems.append(message)

    async def read_shard(i: int) -> None:
        s = doc["shards"][i]
        name = storage.join(path, s["file"])
        async with files:
            size = await storage.size(name)
            if size is None or size != s["nbytes"]:
                bar.update(s["nbytes"])
                fail(f"shard {s['file']} is missing" if size is None else
                     f"shard {s['file']} has {size} bytes, the manifest says {s['nbytes']} (truncated or overwritten)")
                return
            buf = torch.empty(s["nbytes"], dtype=torch.uint8) if keep else None
            reader = await storage.open_reader(name)
            try:
                async with anyio.create_task_group() as tg:
                    for k, offset in enumerate(range(0, s["nbytes"], s["chunk_bytes"])):
                        tg.start_soon(read_chunk, reader, s, k, offset, buf)
            finally:
                await reader.close()
        if buf is not None:
            out[i] = buf

    async def read_chunk(reader: Any, s: dict[str, Any], k: int, offset: int, buf: torch.Tensor | None) -> None:
        n = min(s["chunk_bytes"], s["nbytes"] - offset)
        async with chunks:
            dest = buf[offset:offset + n] if buf is not None else torch.empty(n, dtype=torch.uint8)
            try:
                sig = await reader.read_into(offset, dest)
            except EOFError as exc:
                sig = None
                fail(f"shard {s['file']} is truncated ({exc})")
        bar.update(n)
        if sig is not None and sig != s["xxh3_64"][k]:
            fail(f"checksum mismatch in shard {s['file']} at bytes {offset}..{offset + n}")

    try:
        async with anyio.create_task_group() as tg:
            for i in shards:
                tg.start_soon(read_shard, i)
    except BaseExceptionGroup as group:
        raise _first_error(group) from None
    return out


def _view_bytes(record: dict[str, Any], blob: torch.Tensor) -> torch.Tensor:
    """The contiguous bytes of a tensor saved as a view (shape, stride, offset) into a shared storage ``blob``."""
    dtype = DTYPES[record["dtype"]]
    own = blob.clone()  # its own storage, aligned for any dtype
    view = torch.empty(0, dtype=dtype).set_(own.untyped_storage(), record["storage_offset"], record["shape"],
                                           record["stride"])
    return view.contiguous().reshape(-1).view(torch.uint8)


def _spans(doc: dict[str, Any], shard: int) -> list[tuple[str, int, dict[str, Any]]]:
    """``(table, index, record)`` of every byte run stored in ``shard``."""
    return [(table, i, r) for table in ("tensors", "storages", "objects") for i, r in enumerate(doc[table])
            if "base" not in r and r["shard"] == shard]


def _split(doc: dict[str, Any], shard: int, buf: torch.Tensor, into: dict[str, Any], buffers: list[torch.Tensor]
           ) -> None:
    """Give every entry of ``shard`` its own buffer (a compact copy), rewriting its record in ``into``.

    Tensors built from the result own their storage, so ``torch.save`` writes only their bytes; views of one saved
    storage keep sharing it, unless they view it with different dtypes, which ``torch.save`` cannot store.
    """
    for table, i, r in _spans(doc, shard):
        buffers.append(buf[r["offset"]:r["offset"] + r["nbytes"]].clone())
        into[table][i] = {**r, "shard": len(buffers) - 1, "offset": 0}
        if table != "storages":
            continue
        views = [(j, t) for j, t in enumerate(doc["tensors"]) if t.get("base") == i]
        if len({t["dtype"] for _, t in views}) > 1:
            base = buffers[-1]
            for j, t in views:
                data = _view_bytes(t, base)
                buffers.append(data)
                rec = {k: v for k, v in t.items() if k not in ("base", "stride", "storage_offset")}
                into["tensors"][j] = {**rec, "nbytes": data.numel(), "shard": len(buffers) - 1, "offset": 0}


def read_native(src: Any, *, weights_only: bool | None = True, storage_options: dict[str, Any] | None = None,
                concurrency: int = 8, progress: Progress | None = None) -> Any:
    """Load a native checkpoint onto the CPU with every tensor owning its own storage (ready for ``torch.save``).

    ``weights_only`` (default True) governs pickled non-tensor values, as in :meth:`CheckpointEngine.load`.
    """
    url = os.fspath(src)

    async def main() -> Any:
        async with _Opened(url, storage_options, concurrency) as (storage, path):
            doc = await read_manifest(storage, path, url)
            bar = _bar(progress, "read", sum(s["nbytes"] for s in doc["shards"]))
            try:
                compact = {"tensors": list(doc["tensors"]), "storages": list(doc["storages"]),
                           "objects": list(doc["objects"]), "tree": doc["tree"]}
                buffers: list[torch.Tensor] = []
                for i in range(len(doc["shards"])):
                    got = await scan_shards(storage, path, url, doc, [i], keep=True, concurrency=concurrency, bar=bar)
                    _split(doc, i, got.pop(i), compact, buffers)
            finally:
                bar.close()
            return build_state(compact, buffers, url, "cpu", weights_only is not False)

    return _run(main)


# ---------------------------------------------------------------- destinations

@dataclass
class Conversion:
    """What a conversion wrote."""

    src: str
    dst: str
    to: str  # "torch", "native" or "safetensors"
    files: list[str] = field(default_factory=list)
    bytes_written: int = 0
    tensors: int = 0
    notes: list[str] = field(default_factory=list)  # things left out or renamed, one line each


_SAFETENSORS_INDEX = "model.safetensors.index.json"


def _is_export_file(name: str) -> bool:
    return name == _SAFETENSORS_INDEX or (name.startswith("model") and name.endswith(".safetensors"))


def _check_destination(src: str, dst: str, to: str, overwrite: bool, storage_options: dict[str, Any] | None
                       ) -> Callable[[], None]:
    """Refuse a ``dst`` that exists unless ``overwrite``; return the step that clears it, to run just before writing.

    ``to`` is ``"native"``, ``"torch"``, ``"safetensors-file"`` or ``"safetensors-dir"``.  A directory is replaced
    only when it is a native checkpoint, is empty, or (for a safetensors directory) holds nothing but an earlier
    export; anything else is refused even with ``overwrite``.
    """
    fs_src, p_src = _fs(src, storage_options)
    fs, path = _fs(dst, storage_options)
    if type(fs_src) is type(fs) and p_src.rstrip("/") == path.rstrip("/"):
        raise CheckpointError(f"source and destination are the same path: {dst}")
    kind = path_kind(dst, storage_options)
    if kind is None:
        return lambda: None
    if not overwrite:
        raise CheckpointError(f"{dst} already exists; pass --force to replace it")
    if kind == "file":
        if to in ("native", "safetensors-dir"):
            return lambda: fs.rm_file(path)
        return lambda: None  # a file output replaces the old file once it is complete
    names = [posixpath.basename(str(n).rstrip("/")) for n in fs.ls(path, detail=False)]
    if kind == "native" and to == "native":
        return lambda: None  # a native save replaces the old checkpoint when it commits
    if kind == "native" and to in ("torch", "safetensors-file"):
        def remove() -> None:
            from .sync import SyncEngine

            with SyncEngine(storage_options=storage_options) as engine:
                engine.remove(dst)

        return remove
    if to == "safetensors-dir" and all(_is_export_file(n) for n in names):
        def clear_export() -> None:
            for n in names:
                fs.rm_file(posixpath.join(path, n))

        return clear_export
    if not names:
        return (lambda: None) if to == "native" else (lambda: fs.rmdir(path))
    raise CheckpointError(f"refusing to replace {dst}: it is a directory that is not an asyncckpt checkpoint")


class _Counting:
    """File wrapper that reports the bytes passing through it to a progress bar."""

    def __init__(self, f: Any, bar: Bar) -> None:
        self.f, self.bar = f, bar

    def write(self, data: Any) -> int:
        n = self.f.write(data)
        self.bar.update(memoryview(data).nbytes)
        return n

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.bar.update(len(data))
        return data

    def readinto(self, b: Any) -> int:
        n = self.f.readinto(b)
        self.bar.update(n or 0)
        return n

    def readline(self, *args: Any) -> bytes:
        data = self.f.readline(*args)
        self.bar.update(len(data))
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


def _write_file(dst: str, storage_options: dict[str, Any] | None, body: Callable[[Any], None]) -> int:
    """Write one file through ``body(f)``; local files appear atomically (temp file, fsync, rename)."""
    if _is_local(dst):
        path = _local(dst)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            with open(tmp, "wb") as f:
                body(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return os.path.getsize(path)
    fs, path = _fs(dst, storage_options)
    try:
        with fs.open(path, "wb") as f:
            body(f)
    except BaseException:
        try:
            fs.rm_file(path)
        except Exception:
            pass
        raise
    return fs.size(path)


# ---------------------------------------------------------------- native -> torch.save

def to_torch_file(src: Any, dst: Any, *, weights_only: bool | None = True, overwrite: bool = False,
                  storage_options: dict[str, Any] | None = None, concurrency: int = 8,
                  progress: Progress | None = None) -> Conversion:
    """Write the native checkpoint ``src`` as one ``torch.save`` file at ``dst``.

    The result loads with ``torch.load`` and, for Lightning checkpoints, with ``LightningModule.load_from_checkpoint``.
    Tensors are written as CPU tensors; shared and aliased tensors stay shared.  Pickled values are read under
    ``weights_only`` rules unless ``weights_only=False``.  ``dst`` must not exist unless ``overwrite``.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    clear = _check_destination(src, dst, "torch", overwrite, storage_options)
    state = read_native(src, weights_only=weights_only, storage_options=storage_options, concurrency=concurrency,
                        progress=progress)
    clear()
    tensors = _count_tensors(state)
    total = sum(t.untyped_storage().nbytes() for t in _unique_storages(state))
    bar = _bar(progress, "write", total)
    try:
        size = _write_file(dst, storage_options, lambda f: torch.save(state, _Counting(f, bar)))
    finally:
        bar.close()
    return Conversion(src, dst, "torch", [dst], size, tensors)


def _tensors(obj: Any, seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    if isinstance(obj, torch.Tensor):
        seen.add(id(obj))
        yield obj
    elif isinstance(obj, dict):
        seen.add(id(obj))
        for v in obj.values():
            yield from _tensors(v, seen)
    elif isinstance(obj, (list, tuple)):
        seen.add(id(obj))
        for v in obj:
            yield from _tensors(v, seen)


def _count_tensors(state: Any) -> int:
    return sum(1 for _ in _tensors(state))


def _unique_storages(state: Any) -> list[torch.Tensor]:
    out, ptrs = [], set()
    for t in _tensors(state):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in ptrs:
            ptrs.add(ptr)
            out.append(t)
    return out


# ---------------------------------------------------------------- torch.save -> native

def from_torch_file(src: Any, dst: Any, *, weights_only: bool | None = True, overwrite: bool = False,
                    storage_options: dict[str, Any] | None = None, progress: Progress | None = None,
                    **engine_options: Any) -> Conversion:
    """Load the ``torch.save`` file ``src`` and save it as a native checkpoint at ``dst``.

    ``weights_only`` (default True) loads with torch's weights-only unpickler, which refuses arbitrary objects;
    pass ``weights_only=False`` only for files you trust, since full unpickling can run code.  ``engine_options``
    go to the :class:`~asyncckpt.SyncEngine` that writes (``shard_bytes``, ``write_concurrency``...).
    """
    src, dst = os.fspath(src), os.fspath(dst)
    kind = path_kind(src, storage_options)
    if kind is None:
        raise CheckpointError(f"no such file: {src}")
    if kind != "file":
        raise CheckpointError(f"{src} is a directory, not a torch.save file")
    clear = _check_destination(src, dst, "native", overwrite, storage_options)
    state = load_torch_file(src, weights_only=weights_only, storage_options=storage_options, progress=progress)
    clear()
    from .sync import SyncEngine

    with SyncEngine(storage_options=storage_options, **engine_options) as engine:
        result = engine.save(state, dst).result()
    return Conversion(src, dst, "native", [dst], result.bytes_written, result.tensors)


def load_torch_file(src: str, *, weights_only: bool | None = True, storage_options: dict[str, Any] | None = None,
                    progress: Progress | None = None) -> Any:
    """``torch.load`` a file (local or fsspec URL) onto the CPU, with torch's errors turned into CheckpointErrors."""
    fs, path = _fs(src, storage_options)
    bar = _bar(progress, "read", fs.size(path) or 0)
    try:
        with fs.open(path, "rb") as f:
            return torch.load(_Counting(f, bar), map_location="cpu", weights_only=weights_only is not False)
    except pickle.UnpicklingError as exc:
        if weights_only is not False:
            raise UnsafeCheckpointError(
                f"{src} holds pickled objects that weights-only loading refuses, because unpickling them could run "
                f"code ({torch_load_reason(exc)}); if you trust the file, load it with weights_only=False (--unsafe)"
            ) from None
        raise CorruptCheckpointError(f"{src} cannot be unpickled: {torch_load_reason(exc)}") from exc
    except OSError:
        raise
    except Exception as exc:  # torch.load reports a foreign or damaged file with many exception types
        raise CorruptCheckpointError(
            f"{src} is not a readable torch.save file ({type(exc).__name__}: {torch_load_reason(exc)})") from exc
    finally:
        bar.close()


# ---------------------------------------------------------------- native -> safetensors

@dataclass
class _Export:
    name: str
    index: int  # tensor record
    record: dict[str, Any]
    shard: int
    st_dtype: str
    nbytes: int
    itemsize: int
    file: int = 0
    start: int = 0


def _plan_export(doc: dict[str, Any], key: str | None, notes: list[str]) -> list[_Export]:
    """The tensors to export, named by key path (relative to ``key``), in saved order; notes say what was left out."""
    exports: list[_Export] = []
    first: dict[int, str] = {}
    skipped: list[str] = []
    aliases = 0
    names: Counter[str] = Counter()
    found = key is None
    for path, leaf in iter_leaves(doc["tree"]):
        if key is not None:
            if path != key and not path.startswith(key + "."):
                continue
            found = True
            path = path[len(key) + 1:] if path != key else path.rsplit(".", 1)[-1]
        if not (isinstance(leaf, dict) and "tensor" in leaf):
            skipped.append(path or "<root>")
            continue
        i = leaf["tensor"]
        if not isinstance(i, int) or not 0 <= i < len(doc["tensors"]):
            raise CorruptCheckpointError(f"manifest structure refers to missing tensor {i}")
        if i in first:
            aliases += 1
            notes.append(f"{path} is the same tensor as {first[i]}; stored once, as {first[i]}")
            continue
        r = doc["tensors"][i]
        dtype = DTYPES[r["dtype"]]
        st = SAFETENSORS_DTYPES.get(dtype)
        if st is None:
            notes.append(f"skipped {path}: safetensors has no {r['dtype']} dtype")
            continue
        name = path or "tensor"
        names[name] += 1
        if names[name] > 1:
            renamed = f"{name}#{names[name] - 1}"
            notes.append(f"{path} is named {renamed}: another entry has the key path {name}")
            name = renamed
        first[i] = name
        exports.append(_Export(name, i, r, _tensor_shard(doc, r), st, math.prod(r["shape"]) * dtype.itemsize,
                               dtype.itemsize))
    if not found:
        raise CheckpointError(f"the checkpoint has no entry {key!r}")
    if skipped:
        notes.insert(0, f"skipped {len(skipped)} non-tensor entr{'y' if len(skipped) == 1 else 'ies'} "
                        f"(safetensors holds tensors only): {_summarize(skipped)}")
    return exports


def _summarize(paths: list[str], limit: int = 12) -> str:
    """Key paths, siblings folded into ``parent.*``: ``optimizer.param_groups.0.*, step, epoch``."""
    groups: dict[str, int] = {}
    for p in paths:
        parent = p.rsplit(".", 1)[0] if "." in p else p
        groups[parent] = groups.get(parent, 0) + 1
    shown = [f"{g}.*" if n > 1 or g not in paths else g for g, n in groups.items()]
    return ", ".join(shown[:limit]) + (f" and {len(shown) - limit} more" if len(shown) > limit else "")


def _tensor_bytes(doc: dict[str, Any], e: _Export, buf: torch.Tensor) -> torch.Tensor:
    """The contiguous bytes of one exported tensor, from the buffer of the shard it lives in."""
    r = e.record
    if "base" not in r:
        return buf[r["offset"]:r["offset"] + r["nbytes"]]
    st = doc["storages"][r["base"]]
    return _view_bytes(r, buf[st["offset"]:st["offset"] + st["nbytes"]])


def _safetensors_header(entries: list[_Export], metadata: dict[str, str]) -> bytes:
    meta: dict[str, Any] = {"__metadata__": metadata}
    pos = 0
    for e in entries:
        e.start = pos
        shape = e.record["shape"]
        meta[e.name] = {"dtype": e.st_dtype, "shape": shape, "data_offsets": [pos, pos + e.nbytes]}
        pos += e.nbytes
    body = json.dumps(meta, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


def _ordered(entries: list[_Export]) -> list[_Export]:
    # widest items first keeps every tensor aligned to its item size, as safetensors' own writer does
    return sorted(entries, key=lambda e: (-e.itemsize, e.shard, e.record.get("offset", 0), e.index))


def _write_safetensors(dst: str, storage_options: dict[str, Any] | None, entries: list[_Export],
                       data: Callable[[_Export], torch.Tensor], metadata: dict[str, str], bar: Bar) -> int:
    header = _safetensors_header(entries, metadata)

    def body(f: Any) -> None:
        f.write(header)
        for e in entries:
            chunk = data(e)
            if chunk.numel():
                f.write(as_memoryview(chunk))
            bar.update(e.nbytes)

    return _write_file(dst, storage_options, body)


def to_safetensors(src: Any, dst: Any, *, key: str | None = None, overwrite: bool = False,
                   storage_options: dict[str, Any] | None = None, concurrency: int = 8,
                   progress: Progress | None = None) -> Conversion:
    """Export the tensors of the native checkpoint ``src`` as safetensors, each named by its key path.

    ``dst`` ending in ``.safetensors`` receives one file (built in host memory).  Any other ``dst`` is a directory
    that receives one file per shard that holds tensors — streamed one shard at a time — named
    ``model-00001-of-0000N.safetensors`` with a ``model.safetensors.index.json`` mapping names to files (a single
    such file is named ``model.safetensors``), the layout Hugging Face tools read.  ``key`` exports only the entries
    under that key path (``"state_dict"``), named relative to it.  Non-tensor entries cannot be stored in
    safetensors and are skipped; :attr:`Conversion.notes` lists them.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    single = dst.endswith(".safetensors")
    clear = _check_destination(src, dst, "safetensors-file" if single else "safetensors-dir", overwrite,
                               storage_options)

    async def read_manifest_of() -> dict[str, Any]:
        async with _Opened(src, storage_options, concurrency) as (storage, path):
            return await read_manifest(storage, path, src)

    doc = _run(read_manifest_of)
    notes: list[str] = []
    exports = _plan_export(doc, key, notes)
    if not exports:
        raise CheckpointError(f"{src} holds no tensors that safetensors can store" + (f" under {key!r}" if key else ""))
    clear()
    metadata = {"format": "pt", "producer": "asyncckpt convert", "asyncckpt_save_id": str(doc.get("save_id", ""))}
    by_shard: dict[int, list[_Export]] = {}
    for e in exports:
        by_shard.setdefault(e.shard, []).append(e)
    shards = sorted(by_shard)
    read_bar = _bar(progress, "read", sum(doc["shards"][i]["nbytes"] for i in shards))
    written: list[str] = []
    size = 0

    async def read(i: int) -> torch.Tensor:
        async with _Opened(src, storage_options, concurrency) as (storage, path):
            got = await scan_shards(storage, path, src, doc, [i], keep=True, concurrency=concurrency, bar=read_bar)
        return got[i]

    try:
        if single:
            held: dict[int, torch.Tensor] = {}
            for i in shards:
                buf = _run(read, i)
                for e in by_shard[i]:
                    held[e.index] = _tensor_bytes(doc, e, buf).clone()
                del buf
            read_bar.close()
            bar = _bar(progress, "write", sum(e.nbytes for e in exports))
            try:
                size = _write_safetensors(dst, storage_options, _ordered(exports), lambda e: held[e.index],
                                          metadata, bar)
            finally:
                bar.close()
            written.append(dst)
        else:
            n = len(shards)
            names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
            weight_map: dict[str, str] = {}
            for k, i in enumerate(shards):
                buf = _run(read, i)
                target = _join(dst, names[k])
                size += _write_safetensors(target, storage_options, _ordered(by_shard[i]),
                                           lambda e, buf=buf: _tensor_bytes(doc, e, buf), metadata, _NoBar())
                del buf
                written.append(target)
                weight_map.update({e.name: names[k] for e in by_shard[i]})
            if n > 1:
                index = {"metadata": {"total_size": sum(e.nbytes for e in exports)},
                         "weight_map": dict(sorted(weight_map.items()))}
                target = _join(dst, _SAFETENSORS_INDEX)
                data = json.dumps(index, indent=2).encode() + b"\n"
                size += _write_file(target, storage_options, lambda f: f.write(data))
                written.append(target)
    finally:
        read_bar.close()
    return Conversion(src, dst, "safetensors", written, size, len(exports), notes)


def _join(directory: str, name: str) -> str:
    return os.path.join(_local(directory), name) if _is_local(directory) else directory.rstrip("/") + "/" + name

