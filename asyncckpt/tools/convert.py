"""Conversions between native checkpoints, ``torch.save`` files and safetensors, for the CLI and Python.

Synchronous and safe from any thread. Every file goes through the engine's storage backends (so S3 gets its retry
policy and local files are replaced atomically and durably), and native checkpoints are read by the engine's
loader, so every chunk is checked against its checksum and a damaged checkpoint is never converted silently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import pickle
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Any, Mapping

import torch

from ..core import EngineCore
from ..errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from ..format.dtypes import SAFETENSORS_DTYPES
from ..format.manifest import MANIFEST_NAME, GlobalManifest, Manifest, Span, TensorRecord, view_tensor
from ..format.safetensors import unique_names
from ..format.tree import Ref, leaves, structure, tensor_path
from ..load.assemble import assemble
from ..load.manifest import read_manifest
from ..load.reads import read_shards, shard_span
from ..load.rebuild import build_state, torch_load_reason
from ..memory.buffers import alias
from ..pipeline.jobs import Target
from ..sync_engine import SyncEngine
from .progress import Counting, Progress, progress_bar

Job = Callable[[EngineCore], Awaitable[Any]]


def run(storage_options: Mapping[str, Any] | None, job: Job, concurrency: int = 8) -> Any:
    """``await job(core)`` on a short-lived engine's runtime, which finishes its saves and closes its sessions."""
    with SyncEngine(storage_options=storage_options, write_concurrency=concurrency) as engine:
        core = engine.core
        return engine.run(job, core)


async def kind_of(core: EngineCore, target: Target) -> str | None:
    """What is at ``target``: ``"native"`` (a committed checkpoint), ``"dir"``, ``"file"`` or None (nothing)."""
    storage = target.storage
    kind = await storage.kind(target.path)
    if kind != "dir":
        return kind
    return "native" if await storage.size(storage.join(target.path, MANIFEST_NAME)) is not None else "dir"


def path_kind(url: Any, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """What is at ``url``: ``"native"`` (a committed checkpoint), ``"dir"``, ``"file"`` or None (nothing)."""
    async def job(core: EngineCore) -> str | None:
        return await kind_of(core, await core.open_target(url, None))

    return run(storage_options, job)


def tensor_shard(manifest: Manifest, i: int) -> int:
    """The shard holding tensor ``i``'s bytes."""
    r = manifest.tensors[i]
    span = manifest.storages[r.view.base].span if r.view is not None else r.span
    assert span is not None
    return span.shard


# ---------------------------------------------------------------- reading

async def read_native(core: EngineCore, target: Target, progress: Progress | None, weights_only: bool = True,
                      tensors_only: bool = False) -> tuple[Manifest, Any]:
    """The manifest and CPU state of a native checkpoint; tensors own their storage, ready for any serializer.

    ``tensors_only`` returns the tensor entries by index and unpickles nothing: exporting weights needs no trust.
    """
    found = await read_manifest(target.storage, target.path, target.display)
    with contextlib.closing(progress_bar(progress, "read", found.total_bytes)) as bar:
        buffers = await read_shards(target.storage, target.path, target.display, found, True)
        bar.update(found.total_bytes)
    if isinstance(found, GlobalManifest):  # written by many ranks: each tensor assembled whole, the state nested
        manifest, buffers = await core.io.cpu(assemble, found, buffers)
    else:
        manifest = found
    if tensors_only:
        flat = dataclasses.replace(manifest, tree={"list": [{"tensor": i} for i in range(len(manifest.tensors))]})
        return manifest, await core.io.cpu(build_state, flat, shard_span(buffers), target.display, "cpu", True)
    untangled = _untangle(manifest, buffers, target.display)
    return manifest, await core.io.cpu(build_state, untangled, shard_span(buffers), target.display, "cpu",
                                       weights_only)


def _untangle(manifest: Manifest, buffers: list[torch.Tensor], display: str) -> Manifest:
    """``torch.save`` cannot store one storage viewed as two dtypes, which the native format can: such views get
    their own copy, appended to ``buffers``."""
    dtypes: dict[int, set[str]] = {}
    for r in manifest.tensors:
        if r.view is not None:
            dtypes.setdefault(r.view.base, set()).add(r.dtype)
    _check_dense(manifest, [j for j, r in enumerate(manifest.tensors)
                           if r.view is not None and len(dtypes[r.view.base]) > 1], display)
    tensors = list(manifest.tensors)
    for j, r in enumerate(tensors):
        if r.view is not None and len(dtypes[r.view.base]) > 1:
            st = manifest.storages[r.view.base].span
            view = view_tensor(r, None, alias(buffers[st.shard][st.offset:st.end]))
            buffers.append(view.clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8))
            tensors[j] = TensorRecord(r.dtype, r.shape, r.device, span=Span(len(buffers) - 1, 0, buffers[-1].numel()),
                                      requires_grad=r.requires_grad, parameter=r.parameter)
    return dataclasses.replace(manifest, tensors=tuple(tensors))


#: views are written dense where a format cannot keep them (safetensors; ``torch.save`` for one storage viewed as
#: two dtypes). A broadcast tensor is rightly many times its stored bytes, so a small checkpoint may expand to this
#: much, a larger one to twice its size: never more, so that a hostile view of a tiny file cannot allocate gigabytes.
DENSE_FLOOR = 64 << 20


def _check_dense(manifest: Manifest, indices: Iterable[int], display: str) -> None:
    """Refuse writing the tensors ``indices`` dense when their views would take more than the checkpoint justifies."""
    views = [i for i in indices if manifest.tensors[i].view is not None]
    dense, limit = sum(manifest.tensors[i].logical_bytes for i in views), max(2 * manifest.total_bytes, DENSE_FLOOR)
    if dense > limit:
        big = max(views, key=lambda i: manifest.tensors[i].logical_bytes)
        r = manifest.tensors[big]
        assert r.view is not None
        raise CheckpointError(
            f"{display}: its views of shared storages would take {dense} bytes written dense, more than the {limit} "
            f"a checkpoint of {manifest.total_bytes} bytes allows (the largest, {tensor_path(manifest.tree, big)}, is "
            f"{r.dtype} {list(r.shape)[:8]} over {manifest.storages[r.view.base].span.nbytes} stored bytes); load it "
            "with asyncckpt.load, which keeps views as views")


@functools.cache
def _torch_saves(dtype: torch.dtype) -> bool:
    """Whether ``torch.save`` stores tensors of ``dtype`` (torch 2.13 refuses the sub-byte ones, ``uint1`` …)."""
    try:
        torch.save(torch.empty(0, dtype=dtype), io.BytesIO())
    except (KeyError, RuntimeError, TypeError):
        return False
    return True


def _check_torch_dtypes(manifest: Manifest, display: str) -> None:
    """Refuse, naming it, a tensor whose dtype ``torch.save`` cannot store (it raises a bare ``KeyError``)."""
    tree = structure(manifest.tree, len(manifest.tensors), len(manifest.objects))
    for path, leaf in leaves(tree):
        r = manifest.tensors[leaf.index] if isinstance(leaf, Ref) and leaf.kind == "tensor" else None
        if r is not None and not _torch_saves(r.torch_dtype):
            raise CheckpointError(f"{display}: torch.save cannot store the {r.dtype} tensor at {path or '<root>'}; "
                                  "load the checkpoint with asyncckpt.load instead")


# ---------------------------------------------------------------- writing

async def _write(target: Target, body: Callable[[IO[bytes]], Any], bar: Any) -> int:
    """Write one whole file through ``body(f)``: atomically and durably where the storage can."""
    await target.storage.put_file(target.path, lambda f: body(Counting(f, bar)), True)
    return await target.storage.size(target.path) or 0


async def _clearer(core: EngineCore, src: Target, dst: Target, to: str, overwrite: bool
                   ) -> Callable[[], Awaitable[None]]:
    """Refuse an existing ``dst`` unless ``overwrite``; return what clears it, run once the source has been read.

    Only a file, a native checkpoint, an empty directory or (``to="safetensors-dir"``) an earlier export is
    replaced: a directory holding anything else may be someone's data.
    """
    async def nothing() -> None:
        return None

    if type(src.storage) is type(dst.storage) and src.key == dst.key:
        raise CheckpointError(f"source and destination are the same path: {dst.display}")
    kind = await kind_of(core, dst)
    if kind is None:
        return nothing
    if not overwrite:
        raise CheckpointError(f"{dst.display} already exists; pass --force to replace it")
    storage = dst.storage
    to_dir = to in ("native", "safetensors-dir")

    async def remove_file() -> None:
        await storage.remove(dst.path)

    async def remove_native() -> None:
        await core.remove(dst)

    if kind == "file":  # a file output replaces it atomically
        return remove_file if to_dir else nothing
    if kind == "native":  # a native save replaces it when it commits
        return nothing if to == "native" else remove_native
    names = await storage.list(dst.path)

    async def remove_export() -> None:
        for name in names:
            await storage.remove(storage.join(dst.path, name))

    async def remove_dir() -> None:
        await storage.remove_dir(dst.path)

    if to == "safetensors-dir" and all(n == INDEX or (n.startswith("model") and n.endswith(".safetensors"))
                                       for n in names):
        return remove_export
    if not names:
        return nothing if to_dir else remove_dir
    raise CheckpointError(f"refusing to replace {dst.display}: it is a directory that is not an asyncckpt "
                          "checkpoint")


# ---------------------------------------------------------------- conversions

@dataclass
class Conversion:
    """What a conversion wrote.

    Attributes:
        src: the source, as a path or URL.
        dst: the destination, as a path or URL.
        to: the format written: ``"torch"``, ``"native"`` or ``"safetensors"``.
        files: every file written (for a native checkpoint, its directory).
        bytes_written: bytes of all of them.
        tensors: tensors written (a tensor shared by several keys counts once).
        notes: what was left out or renamed, one line each (safetensors holds tensors only).
    """

    src: str
    dst: str
    to: str  # "torch", "native" or "safetensors"
    files: list[str] = field(default_factory=list)
    bytes_written: int = 0
    tensors: int = 0
    notes: list[str] = field(default_factory=list)  # things left out or renamed, one line each


def to_torch_file(src: Any, dst: Any, *, weights_only: bool | None = True, overwrite: bool = False,
                  storage_options: Mapping[str, Any] | None = None, concurrency: int = 8,
                  progress: Progress | None = None) -> Conversion:
    """Write the native checkpoint ``src`` as one ``torch.save`` file (``torch.load``, Lightning's
    ``load_from_checkpoint``); shared tensors stay shared, pickled values load weights-only unless told otherwise.

    The file is replaced atomically (on a local disk) and durably; every tensor ends up on the CPU.

    Args:
        src: the native checkpoint's directory or URL (one written by many ranks is assembled whole).
        dst: the file to write, a path or URL.
        weights_only: unpickle ``src``'s non-tensor values with torch's weights-only rules (True and None);
            ``False`` allows any pickle, which can run code: only for checkpoints you trust.
        overwrite: replace ``dst`` if it exists (a file, a native checkpoint, an empty directory); a
            directory holding anything else is never replaced.
        storage_options: fsspec options for URL paths (credentials, endpoint, ``retry``).
        concurrency: storage operations in flight at once while reading.
        progress: ``progress(description, total_bytes)`` returns a bar with ``update(n_bytes)`` and ``close()``
            (a ``tqdm`` fits), or None for none. None: no progress shown.

    Returns:
        What was written (``to="torch"``, one file).

    Raises:
        CheckpointError: ``dst`` exists and ``overwrite`` is not set, is a directory that is not a checkpoint, or
            is ``src`` itself; ``src`` is not a checkpoint; a store error.
        IncompleteCheckpointError: ``src`` holds shards but no manifest (its save never finished).
        CorruptCheckpointError: ``src`` is damaged (every chunk is checked against its checksum).
        NewerFormatError: a newer asyncckpt wrote ``src``.
        UnsafeCheckpointError: ``src`` holds pickled values that weights-only loading refuses.

    Example:
        ```python
        asyncckpt.to_torch_file("ckpts/step-100", "step-100.pt")
        state = torch.load("step-100.pt")
        ```
    """
    async def job(core: EngineCore) -> Conversion:
        source, dest = await core.open_target(src, None), await core.open_target(dst, None)
        clear = await _clearer(core, source, dest, "torch", overwrite)
        manifest, state = await read_native(core, source, progress, weights_only is not False)
        _check_torch_dtypes(manifest, source.display)
        await clear()
        with contextlib.closing(progress_bar(progress, "write", manifest.total_bytes)) as bar:
            size = await _write(dest, lambda f: torch.save(state, f), bar)
        return Conversion(source.display, dest.display, "torch", [dest.display], size, len(manifest.tensors))

    return run(storage_options, job, concurrency)


def from_torch_file(src: Any, dst: Any, *, weights_only: bool | None = True, overwrite: bool = False,
                    storage_options: Mapping[str, Any] | None = None, progress: Progress | None = None,
                    **engine_options: Any) -> Conversion:
    """Save the ``torch.save`` file ``src`` as a native checkpoint; ``engine_options`` go to the SyncEngine.

    ``weights_only=False`` is for files you trust only: full unpickling can run code.

    Args:
        src: the ``torch.save`` file, a path or URL; it is loaded onto the CPU.
        dst: the checkpoint directory to write, a path or URL; an existing checkpoint there is replaced only
            when it commits.
        weights_only: load ``src`` with torch's weights-only rules (True and None); ``False`` allows any pickle.
        overwrite: replace ``dst`` if it exists (a file, a native checkpoint, an empty directory); a
            directory holding anything else is never replaced.
        storage_options: fsspec options for URL paths (credentials, endpoint, ``retry``).
        progress: ``progress(description, total_bytes)`` returns a bar with ``update(n_bytes)`` and ``close()``
            (a ``tqdm`` fits), or None for none. None: no progress shown.
        **engine_options: options of the `SyncEngine` that writes it (``shard_bytes``,
            ``chunk_bytes``, ``fsync``…).

    Returns:
        What was written (``to="native"``; ``files`` names the checkpoint directory).

    Raises:
        InvalidArgumentError: an engine option is out of range or unknown.
        CheckpointError: ``src`` is missing or is a directory; ``dst`` exists and ``overwrite`` is not set, or is
            a directory that is not a checkpoint; the save failed (a store error, such as
            `S3Error`).
        UnsafeCheckpointError: ``src`` holds pickled objects that weights-only loading refuses.
        CorruptCheckpointError: ``src`` is not a readable ``torch.save`` file.
    """
    with SyncEngine(storage_options=storage_options, **engine_options) as engine:
        core = engine.core

        async def prepare(core: EngineCore) -> tuple[Target, Any]:
            source, dest = await core.open_target(src, None), await core.open_target(dst, None)
            kind = await kind_of(core, source)
            if kind != "file":
                raise CheckpointError(f"no such file: {source.display}" if kind is None else
                                      f"{source.display} is a directory, not a torch.save file")
            clear = await _clearer(core, source, dest, "native", overwrite)
            state = await _torch_load(source, weights_only is not False, progress)
            await clear()
            return dest, state

        dest, state = engine.run(prepare, core)
        result = engine.save(state, dest.display).result()
    return Conversion(str(src), dest.display, "native", [dest.display], result.bytes_written, result.tensors)


async def _torch_load(source: Target, weights_only: bool, progress: Progress | None) -> Any:
    """``torch.load`` onto the CPU; the many ways torch reports a foreign or damaged file become one error."""
    size = await source.storage.size(source.path) or 0

    def load(f: IO[bytes]) -> Any:
        with contextlib.closing(progress_bar(progress, "read", size)) as bar:
            return torch.load(Counting(f, bar), map_location="cpu", weights_only=weights_only)

    try:
        return await source.storage.get_file(source.path, load)
    except pickle.UnpicklingError as exc:
        if weights_only:
            raise UnsafeCheckpointError(
                f"{source.display} holds pickled objects that weights-only loading refuses, because unpickling them "
                f"could run code ({torch_load_reason(exc)}); if you trust the file, load it with weights_only=False "
                "(--unsafe)") from None
        raise CorruptCheckpointError(f"{source.display} cannot be unpickled: {torch_load_reason(exc)}") from exc
    except (OSError, CheckpointError):
        raise
    except Exception as exc:
        raise CorruptCheckpointError(f"{source.display} is not a readable torch.save file ({type(exc).__name__}: "
                                     f"{torch_load_reason(exc)})") from exc


INDEX = "model.safetensors.index.json"


def to_safetensors(src: Any, dst: Any, *, key: str | None = None, overwrite: bool = False,
                   storage_options: Mapping[str, Any] | None = None, concurrency: int = 8,
                   progress: Progress | None = None) -> Conversion:
    """Export the tensors of the native checkpoint ``src`` as safetensors, named by key path (relative to ``key``).

    ``dst`` ending in ``.safetensors`` is one file; otherwise a directory with a file per shard and an index, the
    layout Hugging Face tools read. Other entries cannot be stored there; `Conversion.notes` lists them.
    Nothing is unpickled, so no trust in ``src`` is needed.

    Args:
        src: the native checkpoint's directory or URL.
        dst: a ``.safetensors`` file, or a directory for ``model.safetensors`` (or ``model-0000k-of-0000n``
            files, one per shard of ``src``, and ``model.safetensors.index.json``).
        key: export only the entries under this key path (such as ``"model"`` or ``"model.encoder"``), named
            relative to it; None: every tensor, named by its full key path (``model.layer.weight``).
        overwrite: replace ``dst`` if it exists (a file, a native checkpoint, an empty directory, or an earlier
            export); a directory holding anything else is never replaced.
        storage_options: fsspec options for URL paths (credentials, endpoint, ``retry``).
        concurrency: storage operations in flight at once while reading.
        progress: ``progress(description, total_bytes)`` returns a bar with ``update(n_bytes)`` and ``close()``
            (a ``tqdm`` fits), or None for none. None: no progress shown.

    Returns:
        What was written (``to="safetensors"``), with ``notes`` on what was left out or renamed.

    Raises:
        CheckpointError: ``dst`` exists and ``overwrite`` is not set, is a directory holding other data, or is
            ``src`` itself; ``src`` is not a checkpoint, has no entry ``key`` or no tensor safetensors can store;
            a store error.
        IncompleteCheckpointError: ``src`` holds shards but no manifest (its save never finished).
        CorruptCheckpointError: ``src`` is damaged (every chunk is checked against its checksum).
        NewerFormatError: a newer asyncckpt wrote ``src``.
        ImportError: the ``safetensors`` package is not installed.

    Example:
        ```python
        conversion = asyncckpt.to_safetensors("ckpts/step-100", "export/", key="model")
        print(conversion.files, conversion.notes)
        ```
    """
    try:
        from safetensors.torch import save
    except ImportError as exc:
        raise ImportError("exporting to safetensors needs the safetensors package: pip install "
                          "'asyncckpt[safetensors]' (or safetensors)") from exc

    dst_url = str(dst)
    single = dst_url.endswith(".safetensors")

    async def job(core: EngineCore) -> Conversion:
        source, dest = await core.open_target(src, None), await core.open_target(dst, None)
        clear = await _clearer(core, source, dest, "safetensors-" + ("file" if single else "dir"), overwrite)
        manifest, tensors = await read_native(core, source, progress, tensors_only=True)
        notes: list[str] = []
        groups: dict[int, dict[str, torch.Tensor]] = {}
        chosen = _export_names(manifest, source.display, key, tensors, notes)
        _check_dense(manifest, chosen.values(), source.display)
        for name, i in chosen.items():
            t = tensors[i].detach()
            if manifest.tensors[i].view is not None:  # views of one storage: safetensors wants each on its own
                t = t.clone(memory_format=torch.contiguous_format)
            groups.setdefault(0 if single else tensor_shard(manifest, i), {})[name] = t
        n, ordered = len(groups), [groups[k] for k in sorted(groups)]
        names = ["" if single else "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
                 for k in range(n)]
        files = [dest] if single else [await core.open_target(_child(dst_url, name), None) for name in names]
        metadata = {"format": "pt", "producer": "asyncckpt convert", "asyncckpt_save_id": manifest.save_id}
        total = sum(t.nbytes for g in ordered for t in g.values())
        await clear()
        size = 0
        with contextlib.closing(progress_bar(progress, "write", total)) as bar:
            for file, g in zip(files, ordered):
                size += await _write(file, lambda f, g=g: f.write(save(g, metadata)), bar)
        shown = [f.display for f in files]
        if n > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": dict(sorted((name, base) for base, g in zip(names, ordered) for name in g))}
            index_target = await core.open_target(_child(dst_url, INDEX), None)
            size += await _write(index_target, lambda f: f.write(json.dumps(index, indent=2).encode() + b"\n"),
                                 progress_bar(None, "", 0))
            shown.append(index_target.display)
        return Conversion(source.display, dest.display, "safetensors", shown, size, sum(map(len, ordered)), notes)

    return run(storage_options, job, concurrency)


def _child(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def _export_names(manifest: Manifest, src: str, key: str | None, tensors: list[torch.Tensor], notes: list[str]
                  ) -> dict[str, int]:
    """Safetensors name → tensor index; ``notes`` say what was left out or renamed."""
    chosen: list[tuple[str, str, int]] = []  # key path, name, tensor index
    first: dict[Any, tuple[str, int]] = {}  # by where the bytes lie (records on one span are one tensor): name, index
    skipped: list[str] = []
    found = key is None
    tree = structure(manifest.tree, len(manifest.tensors), len(manifest.objects))
    for path, leaf in leaves(tree):
        if key is not None:
            if path != key and not path.startswith(key + "."):
                continue
            found = True
            path = path[len(key) + 1:] if path != key else path.rsplit(".", 1)[-1]
        if not (isinstance(leaf, Ref) and leaf.kind == "tensor"):
            skipped.append(path or "<root>")
            continue
        r = manifest.tensors[leaf.index]
        stored = r.span if r.span is not None and r.span.nbytes else leaf.index
        if stored in first:  # safetensors refuses two names over the same memory
            kept, j = first[stored]
            same = (r.dtype, r.shape) == (manifest.tensors[j].dtype, manifest.tensors[j].shape)
            notes.append(f"{path} is the same tensor as {kept}; stored once, as {kept}" if same else
                         f"skipped {path}: it is {kept}'s bytes as {r.dtype} {list(r.shape)[:8]}, and safetensors "
                         "stores bytes once")
        elif tensors[leaf.index].dtype not in SAFETENSORS_DTYPES:
            notes.append(f"skipped {path}: safetensors has no {r.dtype} dtype")
        else:
            first[stored] = (path or "tensor", leaf.index)
            chosen.append((path, path or "tensor", leaf.index))
    if not found:
        raise CheckpointError(f"the checkpoint has no entry {key!r}")
    names: dict[str, int] = {}
    for (path, wanted, index), name in zip(chosen, unique_names(w for _, w, _ in chosen)):
        if name != wanted:
            notes.append(f"{path or '<root>'} is named {name}: another entry has the name {wanted}")
        names[name] = index
    if skipped:  # siblings folded into parent.*: "optimizer.param_groups.0.*, step, epoch"
        parents = Counter(p.rsplit(".", 1)[0] if "." in p else p for p in skipped)
        shown = [f"{g}.*" if k > 1 or g not in skipped else g for g, k in parents.items()]
        notes.insert(0, f"skipped {len(skipped)} non-tensor entr{'y' if len(skipped) == 1 else 'ies'} (safetensors "
                        f"holds tensors only): {', '.join(shown[:12])}"
                        + (f" and {len(shown) - 12} more" if len(shown) > 12 else ""))
    if not names:
        raise CheckpointError(f"{src} holds no tensors that safetensors can store" + (f" under {key!r}" if key else ""))
    return names
