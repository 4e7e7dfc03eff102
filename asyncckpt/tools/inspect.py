"""What a checkpoint holds (from its manifest alone) and whether it is intact (every byte read and checked)."""

from __future__ import annotations

import datetime
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..core import EngineCore
from ..errors import CheckpointError
from ..format.manifest import MANIFEST_NAME, SHARD_RE, GlobalManifest, Manifest, is_temporary, rank_of
from ..format.tree import JSON_INT_BITS, Ref, leaves, structure
from ..load.assemble import nested as assemble_structure
from ..load.manifest import read_manifest
from ..load.verify import verify_shards
from .convert import run, tensor_shard
from .progress import Progress, progress_bar


def describe(manifest: Manifest, display: str, manifest_bytes: int | None = None) -> dict[str, Any]:
    """A JSON-able summary of a validated manifest: entries by key path, shards and totals."""
    shard_of = [tensor_shard(manifest, i) for i in range(len(manifest.tensors))]
    tensors, objects, values, first = [], [], [], {}
    tree = structure(manifest.tree, len(manifest.tensors), len(manifest.objects))
    for key, leaf in leaves(tree):
        key = key or "<root>"
        if isinstance(leaf, Ref) and leaf.kind == "tensor":
            r = manifest.tensors[leaf.index]
            entry: dict[str, Any] = {"key": key, "dtype": r.dtype, "shape": list(r.shape), "nbytes": r.logical_bytes,
                                     "shard": shard_of[leaf.index], "device": r.device}
            if r.view is not None:
                entry["view_of_storage"] = r.view.base
            if r.parameter:
                entry["parameter"] = True
            if r.requires_grad:
                entry["requires_grad"] = True
            if first.setdefault(leaf.index, key) != key:
                entry["alias_of"] = first[leaf.index]
            tensors.append(entry)
        elif isinstance(leaf, Ref):
            o = manifest.objects[leaf.index]
            objects.append({"key": key, "type": o.type, "nbytes": o.span.nbytes, "shard": o.span.shard})
        elif isinstance(leaf, float) and not math.isfinite(leaf):
            values.append({"key": key, "type": "float", "value": repr(leaf)})  # JSON has no nan or inf
        elif type(leaf) is int and leaf.bit_length() > JSON_INT_BITS:  # as the manifest holds it: too long for str()
            values.append({"key": key, "type": "int", "value": hex(leaf)})
        else:
            kind = "None" if leaf is None else "odict" if isinstance(leaf, OrderedDict) else type(leaf).__name__
            values.append({"key": key, "type": kind, "value": leaf})
    shards = [{"index": i, "file": s.file, "nbytes": s.nbytes, "tensors": shard_of.count(i),
               "objects": sum(1 for o in manifest.objects if o.span.shard == i), "in": s.base}
              for i, s in enumerate(manifest.shards)]
    created = manifest.created_ns
    return {
        "path": display, "format": "asyncckpt", "version": manifest.version,
        "chain": manifest.chain, "metadata": manifest.metadata, "producer": manifest.producer or None,
        "torch": manifest.torch_version or None, "save_id": manifest.save_id or None, "created_ns": created,
        "created": datetime.datetime.fromtimestamp(created / 1e9, datetime.timezone.utc).isoformat(timespec="seconds"),
        "tensors": tensors, "objects": objects, "values": values, "shards": shards,
        "totals": {"tensors": len(manifest.tensors),
                   "tensor_bytes": sum(r.span.nbytes for r in (*manifest.tensors, *manifest.storages)
                                       if r.span is not None),
                   "objects": len(manifest.objects), "object_bytes": sum(o.span.nbytes for o in manifest.objects),
                   "values": len(values), "shards": len(shards), "shard_bytes": manifest.total_bytes,
                   "manifest_bytes": manifest_bytes},
    }


def describe_global(manifest: GlobalManifest, display: str, manifest_bytes: int | None = None) -> dict[str, Any]:
    """`describe` of a multi-rank checkpoint: its items by DCP name, each tensor's chunks and the ranks
    that wrote them, every rank's shards."""
    ranks = [rank_of(s.file) for s in manifest.shards]
    tensors = []
    for t in manifest.tensors:
        by = sorted({ranks[c.span.shard] for c in t.chunks if c.span.nbytes} - {None})
        entry: dict[str, Any] = {"key": t.fqn, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.logical_bytes,
                                 "chunks": len(t.chunks), "ranks": by}
        if t.requires_grad:
            entry["requires_grad"] = True
        tensors.append(entry)
    objects = [{"key": o.key, "type": "pickled", "nbytes": o.span.nbytes, "shard": o.span.shard,
                "rank": ranks[o.span.shard]} for o in manifest.objects]
    shards = [{"index": i, "file": s.file, "rank": ranks[i], "nbytes": s.nbytes, "in": None,
               "tensors": sum(1 for t in manifest.tensors for c in t.chunks if c.span.shard == i),
               "objects": sum(1 for o in manifest.objects if o.span.shard == i)}
              for i, s in enumerate(manifest.shards)]
    created = manifest.created_ns
    return {
        "path": display, "format": "asyncckpt", "version": 3, "layout": "dcp", "world_size": manifest.world_size,
        "chain": 0, "metadata": None,
        "producer": manifest.producer or None, "torch": manifest.torch_version or None,
        "save_id": manifest.save_id or None, "created_ns": created,
        "created": datetime.datetime.fromtimestamp(created / 1e9, datetime.timezone.utc).isoformat(timespec="seconds"),
        "tensors": tensors, "objects": objects, "values": [], "shards": shards,
        "totals": {"tensors": len(tensors), "tensor_bytes": sum(t.logical_bytes for t in manifest.tensors),
                   "objects": len(objects), "object_bytes": sum(o["nbytes"] for o in objects), "values": 0,
                   "shards": len(shards), "shard_bytes": manifest.total_bytes, "manifest_bytes": manifest_bytes,
                   "bytes_per_rank": {str(r): sum(s["nbytes"] for s in shards if s["rank"] == r)
                                      for r in sorted({s["rank"] for s in shards if s["rank"] is not None})}},
    }


def inspect(path: Any, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`describe` of the committed checkpoint at ``path`` (reads its manifest only)."""
    async def job(core: EngineCore) -> dict[str, Any]:
        target = await core.open_target(path, None)
        manifest = await read_manifest(target.storage, target.path, target.display)
        size = await target.storage.size(target.storage.join(target.path, MANIFEST_NAME))
        if isinstance(manifest, GlobalManifest):
            return describe_global(manifest, target.display, size)
        return describe(manifest, target.display, size)

    return run(storage_options, job)


@dataclass
class Verification:
    """What `verify` found: ``problems`` (the checkpoint is damaged) and ``warnings`` (harmless debris).

    Attributes:
        path: the checkpoint, as a path or URL.
        shards: shard files the manifest lists.
        nbytes: bytes of those shard files.
        checksums: chunk checksums checked.
        problems: what is damaged, one line each (empty: the checkpoint is intact).
        warnings: stray files left by interrupted saves or commits, one line each; they do not affect loading.
        seconds: how long the verification took, in seconds.
    """

    path: str
    shards: int = 0
    nbytes: int = 0
    checksums: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no problem was found (warnings do not count)."""
        return not self.problems


def verify(path: Any, storage_options: Mapping[str, Any] | None = None, concurrency: int = 8,
           progress: Progress | None = None) -> Verification:
    """Read every shard of the checkpoint at ``path``, check each chunk's checksum and that the manifest, the
    shards' safetensors headers and the files agree. A checkpoint that cannot be read at all raises.

    Damage found in the shards is reported in `Verification.problems`, not raised, so one call lists all of
    it. Nothing is unpickled.

    Args:
        path: the checkpoint's directory or URL.
        storage_options: fsspec options for a URL target (credentials, endpoint, ``retry``).
        concurrency: storage operations in flight at once.
        progress: ``progress(description, total_bytes)`` returns a bar with ``update(n_bytes)`` and ``close()``
            (a ``tqdm`` fits), or None for none. None: no progress shown.

    Returns:
        What was checked and found.

    Raises:
        IncompleteCheckpointError: ``path`` holds shards but no manifest (its save never finished).
        CorruptCheckpointError: the manifest itself is damaged or contradicts itself.
        NewerFormatError: a newer asyncckpt wrote it.
        CheckpointError: no checkpoint at ``path``, or an object store failed (such as
            `S3Error`).
        OSError: a filesystem failed to read a shard.

    Example:
        ```python
        report = asyncckpt.verify("ckpts/step-100")
        for problem in report.problems:  # empty when report.ok
            print(problem)
        ```
    """
    t0 = time.perf_counter()

    async def job(core: EngineCore) -> Verification:
        target = await core.open_target(path, None)
        manifest = await read_manifest(target.storage, target.path, target.display)
        found = Verification(target.display, len(manifest.shards), manifest.total_bytes,
                             sum(len(s.xxh3_64) for s in manifest.shards))
        try:
            if isinstance(manifest, GlobalManifest):
                assemble_structure(manifest)
            else:
                structure(manifest.tree, len(manifest.tensors), len(manifest.objects))
        except CheckpointError as exc:
            found.problems.append(f"{target.display}: {exc}")
        bar = progress_bar(progress, "verify", manifest.total_bytes)
        try:
            found.problems += await verify_shards(target.storage, target.path, target.display, manifest, bar.update)
        finally:
            bar.close()
        listed = {s.file for s in manifest.shards}
        for name in sorted(await target.storage.list(target.path)):
            if SHARD_RE.match(name) and name not in listed:
                found.warnings.append(f"stray shard file {name} (left by an interrupted save; the next save to this "
                                      "path removes it)")
            elif is_temporary(name):
                found.warnings.append(f"stray temporary file {name} (left by an interrupted commit)")
        return found

    result: Verification = run(storage_options, job, concurrency)
    result.seconds = time.perf_counter() - t0
    return result
