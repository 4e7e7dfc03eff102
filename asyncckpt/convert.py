"""Conversions between native checkpoints, ``torch.save`` files and safetensors, for the CLI and Python.

Synchronous and safe from any thread.  Native checkpoints are read and written by a :class:`SyncEngine`, so every
chunk read is checked against its checksum and a damaged checkpoint is never converted silently.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import posixpath
import types
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

import fsspec
import torch

from .errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from .loader import build_state, read_manifest, read_shards, shard_span, torch_load_reason
from .manifest import MANIFEST_NAME, SAFETENSORS_DTYPES, decode, view_tensor
from .storage import alias
from .sync import SyncEngine

#: ``progress(description, total_bytes)`` returns a bar with ``update(n)`` and ``close()``, or None for none.
Progress = Callable[[str, int], Any]
_NO_BAR = types.SimpleNamespace(update=lambda n: None, close=lambda: None)


def progress_bar(progress: Progress | None, desc: str, total: int) -> Any:
    made = progress(desc, total) if progress else None
    return _NO_BAR if made is None else made


class _Counting:
    """A file that counts the bytes passing through it on a progress bar."""

    def __init__(self, f: Any, bar: Any) -> None:
        self.f, self.bar = f, bar

    def write(self, data: Any) -> int:
        self.bar.update(memoryview(data).nbytes)
        return self.f.write(data)

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.bar.update(len(data))
        return data

    def readinto(self, b: Any) -> int:
        n = self.f.readinto(b)
        self.bar.update(n or 0)
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


# ---------------------------------------------------------------- paths and files

def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith(("file://", "local://"))


def _fs(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """fsspec filesystem and path; storage options apply to remote URLs only."""
    if _is_local(url):
        return fsspec.filesystem("file"), os.path.abspath(url.removeprefix("file://").removeprefix("local://"))
    options = {k: v for k, v in (storage_options or {}).items() if k != "retry"}  # asyncckpt's own S3 option
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        raise CheckpointError(f"{url}: the fsspec backend for it is not installed ({exc})") from exc


def path_kind(url: Any, storage_options: dict[str, Any] | None = None) -> str | None:
    """What is at ``url``: ``"native"`` (a committed checkpoint), ``"dir"``, ``"file"`` or None (nothing)."""
    fs, path = _fs(os.fspath(url), storage_options)
    try:
        info = fs.info(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if info.get("type") != "directory":
        return "file"
    return "native" if fs.exists(posixpath.join(path, MANIFEST_NAME)) else "dir"


def _write(dst: str, storage_options: dict[str, Any] | None, body: Callable[[Any], Any], bar: Any,
           by_path: bool = False) -> int:
    """Write one file through ``body(f)``, or through ``body(path)`` for a local file with ``by_path`` (serializers
    that stream to a path need no copy in memory); a local file appears only once complete and durable."""
    fs, path = _fs(dst, storage_options)
    local = _is_local(dst)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}" if local else path
    try:
        if local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        if local and by_path:
            body(tmp)
            bar.update(os.path.getsize(tmp))
        else:
            with fs.open(tmp, "wb") as f:
                body(_Counting(f, bar))
        if local:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm_file(tmp)
        raise
    return fs.size(path)


def _check_destination(src: str, dst: str, to: str, overwrite: bool, storage_options: dict[str, Any] | None
                       ) -> Callable[[], None]:
    """Refuse an existing ``dst`` unless ``overwrite``; return what clears it, run once the source has been read.

    Only a file, a native checkpoint, an empty directory or (``to="safetensors-dir"``) an earlier export is
    replaced: a directory holding anything else may be someone's data.
    """
    fs, path = _fs(dst, storage_options)
    fs_src, path_src = _fs(src, storage_options)
    if type(fs) is type(fs_src) and path.rstrip("/") == path_src.rstrip("/"):
        raise CheckpointError(f"source and destination are the same path: {dst}")
    kind = path_kind(dst, storage_options)
    if kind is None:
        return lambda: None
    if not overwrite:
        raise CheckpointError(f"{dst} already exists; pass --force to replace it")
    to_dir = to in ("native", "safetensors-dir")
    if kind == "file":  # a file output replaces it atomically
        return (lambda: fs.rm_file(path)) if to_dir else (lambda: None)
    if kind == "native":  # a native save replaces it when it commits
        return (lambda: None) if to == "native" else (lambda: _run(storage_options, lambda e: e.remove(dst)))
    names = [posixpath.basename(str(n).rstrip("/")) for n in fs.ls(path, detail=False)]
    if to == "safetensors-dir" and all(n == _INDEX or (n.startswith("model") and n.endswith(".safetensors"))
                                       for n in names):
        return lambda: [fs.rm_file(posixpath.join(path, n)) for n in names]
    if not names:
        return (lambda: None) if to_dir else (lambda: fs.rmdir(path))
    raise CheckpointError(f"refusing to replace {dst}: it is a directory that is not an asyncckpt checkpoint")


# ---------------------------------------------------------------- native checkpoints

def _run(storage_options: dict[str, Any] | None, fn: Callable[[SyncEngine], Any], **options: Any) -> Any:
    """``fn(engine)`` with a SyncEngine that finishes its saves and closes its sessions afterwards."""
    with SyncEngine(storage_options=storage_options, **options) as engine:
        return fn(engine)


def with_manifest(engine: SyncEngine, url: str, then: Callable[..., Any] | None = None) -> Any:
    """The validated manifest at ``url``, or ``await then(storage, path, manifest)`` on the engine's loop: one
    manifest read serves the whole job."""
    async def main() -> Any:
        storage, path, _ = engine.engine._resolve(url, None)
        doc = await read_manifest(storage, path, url)
        return doc if then is None else await then(storage, path, doc)

    return engine.run(main)


def _read_native(src: str, storage_options: dict[str, Any] | None, concurrency: int, progress: Progress | None,
                 weights_only: bool = True, tensors_only: bool = False) -> tuple[dict[str, Any], Any]:
    """The manifest and CPU state of a native checkpoint; tensors own their storage, ready for any serializer.

    ``tensors_only`` returns the tensor entries by index and unpickles nothing: exporting weights needs no trust.
    """
    async def read(storage: Any, path: str, doc: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        total = sum(s["nbytes"] for s in doc["shards"])
        with contextlib.closing(progress_bar(progress, "read", total)) as bar:
            buffers = await read_shards(storage, path, src, doc, True)
            bar.update(total)
        if tensors_only:
            return doc, build_state({**doc, "tree": {"list": [{"tensor": i} for i in range(len(doc["tensors"]))]}},
                                    shard_span(buffers), src, "cpu", True)
        return doc, build_state(_untangle(doc, buffers), shard_span(buffers), src, "cpu", weights_only)

    return _run(storage_options, lambda e: with_manifest(e, src, read), write_concurrency=concurrency)


def _untangle(doc: dict[str, Any], buffers: list[torch.Tensor]) -> dict[str, Any]:
    """``torch.save`` cannot store one storage viewed as two dtypes, which the native format can: such views get
    their own copy, appended to ``buffers``."""
    dtypes: dict[int, set[str]] = {}
    for r in doc["tensors"]:
        if "base" in r:
            dtypes.setdefault(r["base"], set()).add(r["dtype"])
    tensors = list(doc["tensors"])
    for j, r in enumerate(tensors):
        if "base" in r and len(dtypes[r["base"]]) > 1:
            st = doc["storages"][r["base"]]
            view = view_tensor(r, None, alias(buffers[st["shard"]][st["offset"]:st["offset"] + st["nbytes"]]))
            buffers.append(view.clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8))
            tensors[j] = {k: v for k, v in r.items() if k not in ("base", "stride", "storage_offset")}
            tensors[j].update(shard=len(buffers) - 1, offset=0, nbytes=buffers[-1].numel())
    return {**doc, "tensors": tensors}


@dataclass(frozen=True)
class Ref:
    """A tensor or pickled-object entry of a manifest's structure, by index into its table."""

    kind: str  # "tensor" or "object"
    index: int

    def __repr__(self) -> str:
        return f"<{self.kind} {self.index}>"


def structure(doc: dict[str, Any], display: str) -> Any:
    """The saved structure with a :class:`Ref` for each tensor and pickled object, read from the manifest alone."""
    def ref(kind: str) -> Callable[[int], Ref]:
        def make(i: int) -> Ref:
            if not 0 <= i < len(doc[kind + "s"]):
                raise CorruptCheckpointError(f"{display}: the structure refers to {kind} {i}, which the manifest "
                                             "does not list")
            return Ref(kind, i)
        return make

    return decode(doc["tree"], ref("tensor"), ref("object"))


def key_path(path: str, key: Any) -> str:
    """The dotted name of ``key`` under ``path``: the names the engine uses in shard headers and errors."""
    part = key if isinstance(key, str) else repr(key)
    return f"{path}.{part}" if path else part


def leaves(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(key path, leaf)`` for every leaf of a structure, in saved order; empty containers count as leaves."""
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from leaves(v, key_path(path, k))
    elif isinstance(node, (list, tuple)) and node:
        for i, v in enumerate(node):
            yield from leaves(v, key_path(path, str(i)))
    else:
        yield path, node


def tensor_shard(doc: dict[str, Any], i: int) -> int:
    r = doc["tensors"][i]
    return doc["storages"][r["base"]]["shard"] if "base" in r else r["shard"]


# ---------------------------------------------------------------- conversions

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


def to_torch_file(src: Any, dst: Any, *, weights_only: bool | None = True, overwrite: bool = False,
                  storage_options: dict[str, Any] | None = None, concurrency: int = 8,
                  progress: Progress | None = None) -> Conversion:
    """Write the native checkpoint ``src`` as one ``torch.save`` file (``torch.load``, Lightning's
    ``load_from_checkpoint``); shared tensors stay shared, pickled values load weights-only unless told otherwise."""
    src, dst = os.fspath(src), os.fspath(dst)
    clear = _check_destination(src, dst, "torch", overwrite, storage_options)
    doc, state = _read_native(src, storage_options, concurrency, progress, weights_only is not False)
    clear()
    with contextlib.closing(progress_bar(progress, "write", sum(s["nbytes"] for s in doc["shards"]))) as bar:
        size = _write(dst, storage_options, lambda f: torch.save(state, f), bar)
    return Conversion(src, dst, "torch", [dst], size, len(doc["tensors"]))


def from_torch_file(src: Any, dst: Any, *, weights_only: bool | None = True, overwrite: bool = False,
                    storage_options: dict[str, Any] | None = None, progress: Progress | None = None,
                    **engine_options: Any) -> Conversion:
    """Save the ``torch.save`` file ``src`` as a native checkpoint; ``engine_options`` go to the SyncEngine.

    ``weights_only=False`` is for files you trust only: full unpickling can run code.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    kind = path_kind(src, storage_options)
    if kind != "file":
        raise CheckpointError(f"no such file: {src}" if kind is None else f"{src} is a directory, not a torch.save file")
    clear = _check_destination(src, dst, "native", overwrite, storage_options)
    state = _torch_load(src, weights_only is not False, storage_options, progress)
    clear()
    result = _run(storage_options, lambda e: e.save(state, dst).result(), **engine_options)
    return Conversion(src, dst, "native", [dst], result.bytes_written, result.tensors)


def _torch_load(src: str, weights_only: bool, storage_options: dict[str, Any] | None, progress: Progress | None
                ) -> Any:
    """``torch.load`` onto the CPU; the many ways torch reports a foreign or damaged file become one error."""
    fs, path = _fs(src, storage_options)
    try:
        with contextlib.closing(progress_bar(progress, "read", fs.size(path) or 0)) as bar, fs.open(path, "rb") as f:
            return torch.load(_Counting(f, bar), map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        if weights_only:
            raise UnsafeCheckpointError(
                f"{src} holds pickled objects that weights-only loading refuses, because unpickling them could run "
                f"code ({torch_load_reason(exc)}); if you trust the file, load it with weights_only=False (--unsafe)"
            ) from None
        raise CorruptCheckpointError(f"{src} cannot be unpickled: {torch_load_reason(exc)}") from exc
    except OSError:
        raise
    except Exception as exc:
        raise CorruptCheckpointError(
            f"{src} is not a readable torch.save file ({type(exc).__name__}: {torch_load_reason(exc)})") from exc


_INDEX = "model.safetensors.index.json"


def to_safetensors(src: Any, dst: Any, *, key: str | None = None, overwrite: bool = False,
                   storage_options: dict[str, Any] | None = None, concurrency: int = 8,
                   progress: Progress | None = None) -> Conversion:
    """Export the tensors of the native checkpoint ``src`` as safetensors, named by key path (relative to ``key``).

    ``dst`` ending in ``.safetensors`` is one file; otherwise a directory with a file per shard and an index, the
    layout Hugging Face tools read.  Other entries cannot be stored there; :attr:`Conversion.notes` lists them.
    """
    from safetensors.torch import save, save_file

    src, dst = os.fspath(src), os.fspath(dst)
    single = dst.endswith(".safetensors")
    clear = _check_destination(src, dst, "safetensors-" + ("file" if single else "dir"), overwrite, storage_options)
    doc, tensors = _read_native(src, storage_options, concurrency, progress, tensors_only=True)
    notes: list[str] = []
    groups: dict[int, dict[str, torch.Tensor]] = {}
    for name, i in _export_names(doc, src, key, tensors, notes).items():
        t = tensors[i].detach()
        if "base" in doc["tensors"][i]:  # views of one saved storage: safetensors wants each tensor on its own
            t = t.clone(memory_format=torch.contiguous_format)
        groups.setdefault(0 if single else tensor_shard(doc, i), {})[name] = t
    n, groups = len(groups), [groups[k] for k in sorted(groups)]
    files = [dst] if single else [dst.rstrip("/") + "/" + ("model.safetensors" if n == 1 else
                                  f"model-{k + 1:05d}-of-{n:05d}.safetensors") for k in range(n)]
    metadata = {"format": "pt", "producer": "asyncckpt convert", "asyncckpt_save_id": str(doc.get("save_id", ""))}
    total = sum(t.nbytes for g in groups for t in g.values())
    clear()
    with contextlib.closing(progress_bar(progress, "write", total)) as bar:
        size = sum(_write(file, storage_options, lambda f, g=g: save_file(g, f, metadata) if isinstance(f, str)
                          else f.write(save(g, metadata)), bar, by_path=True) for file, g in zip(files, groups))
    if n > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": dict(sorted((name, posixpath.basename(file)) for file, g in zip(files, groups)
                                           for name in g))}
        files.append(dst.rstrip("/") + "/" + _INDEX)
        size += _write(files[-1], storage_options, lambda f: f.write(json.dumps(index, indent=2).encode() + b"\n"),
                       _NO_BAR)
    return Conversion(src, dst, "safetensors", files, size, sum(map(len, groups)), notes)


def _export_names(doc: dict[str, Any], src: str, key: str | None, tensors: list[torch.Tensor], notes: list[str]
                  ) -> dict[str, int]:
    """Safetensors name → tensor index; ``notes`` say what was left out or renamed."""
    names: dict[str, int] = {}
    first: dict[int, str] = {}
    seen: Counter[str] = Counter()
    skipped: list[str] = []
    found = key is None
    for path, leaf in leaves(structure(doc, src)):
        if key is not None:
            if path != key and not path.startswith(key + "."):
                continue
            found = True
            path = path[len(key) + 1:] if path != key else path.rsplit(".", 1)[-1]
        if not (isinstance(leaf, Ref) and leaf.kind == "tensor"):
            skipped.append(path or "<root>")
        elif leaf.index in first:
            notes.append(f"{path} is the same tensor as {first[leaf.index]}; stored once, as {first[leaf.index]}")
        elif tensors[leaf.index].dtype not in SAFETENSORS_DTYPES:
            notes.append(f"skipped {path}: safetensors has no {doc['tensors'][leaf.index]['dtype']} dtype")
        else:
            name = path or "tensor"
            seen[name] += 1
            if seen[name] > 1:
                notes.append(f"{path} is named {name}#{seen[name] - 1}: another entry has the key path {name}")
                name = f"{name}#{seen[name] - 1}"
            names[name], first[leaf.index] = leaf.index, name
    if not found:
        raise CheckpointError(f"the checkpoint has no entry {key!r}")
    if skipped:  # siblings folded into parent.*: "optimizer.param_groups.0.*, step, epoch"
        parents = Counter(p.rsplit(".", 1)[0] if "." in p else p for p in skipped)
        shown = [f"{g}.*" if k > 1 or g not in skipped else g for g, k in parents.items()]
        notes.insert(0, f"skipped {len(skipped)} non-tensor entr{'y' if len(skipped) == 1 else 'ies'} (safetensors "
                        f"holds tensors only): {', '.join(shown[:12])}"
                        + (f" and {len(shown) - 12} more" if len(shown) > 12 else ""))
    if not names:
        raise CheckpointError(f"{src} holds no tensors that safetensors can store" + (f" under {key!r}" if key else ""))
    return names
