"""A multi-rank checkpoint seen as a single-writer one: every tensor whole, the state nested again.

``engine.load``, ``asyncckpt convert`` and ``inspect`` read checkpoints that ranks wrote through
``asyncckpt.dcp`` without torch.distributed: the chunks of each tensor are copied into one buffer, and DCP's
flattened names are nested back the way its planner flattened them (``planner_data``: name → key path, where a
string key is a dict key and an integer one a list index). The result is an ordinary `Manifest` over the
shard buffers plus the assembled ones, so everything that loads a native checkpoint works unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import CorruptCheckpointError
from ..format.manifest import ChunkedTensor, GlobalManifest, Manifest, ObjectRecord, Span, TensorRecord
from ..format.tree import decode
from ..memory.buffers import mapped_buffer

GROUP_BYTES = 1 << 30  # assembled tensors share buffers of about this size (so an export groups them into files)
ALIGN = 64


def _as_bytes(t: torch.Tensor, shape: tuple[int, ...], itemsize: int) -> torch.Tensor:
    """A uint8 view of row-major bytes as ``shape`` with the last dimension counted in bytes (any dtype copies)."""
    if not shape:
        return t.view(1, itemsize)
    return t.view(*shape[:-1], shape[-1] * itemsize)


def _fill(out: torch.Tensor, record: ChunkedTensor, buffers: list[torch.Tensor]) -> None:
    """Copy every chunk of ``record`` into ``out`` (its bytes, row-major)."""
    itemsize = record.torch_dtype.itemsize
    whole = _as_bytes(out, record.shape, itemsize)
    for c in record.chunks:
        if not math.prod(c.sizes):
            continue
        data = _as_bytes(buffers[c.span.shard][c.span.offset:c.span.end], c.sizes, itemsize)
        box = whole
        for d, (o, n) in enumerate(zip(c.offsets, c.sizes)):
            scale = itemsize if d == len(c.sizes) - 1 else 1
            box = box.narrow(d, o * scale, n * scale)
        box.copy_(data)


def _paths(manifest: GlobalManifest) -> dict[str, tuple[Any, ...]]:
    """Each item's key path in the nested state: from the planner's mapping where it gives one, else the name."""
    mapping: Any = {}
    if manifest.planner_data is not None:
        def refuse(i: int) -> Any:
            raise CorruptCheckpointError("planner_data refers to a tensor or an object")
        mapping = decode(manifest.planner_data, refuse, refuse)
    out = {}
    for name in [t.fqn for t in manifest.tensors] + [o.key for o in manifest.objects]:
        path = mapping.get(name) if isinstance(mapping, dict) else None
        if (isinstance(path, (list, tuple)) and path and isinstance(path[0], str)
                and all(isinstance(k, str) or (type(k) is int and 0 <= k < 1 << 20) for k in path)):
            out[name] = tuple(path)
        else:
            out[name] = (name,)
    return out


class _Leaf:
    __slots__ = ("node",)

    def __init__(self, node: dict[str, int]) -> None:
        self.node = node


def _place(root: dict[Any, Any], path: tuple[Any, ...], leaf: _Leaf, name: str) -> None:
    """Put ``leaf`` at ``path`` under ``root`` the way DCP's ``set_element`` does (lists grow with None)."""
    container: Any = root
    for here, key in zip(path, path[1:] + (None,)):
        last = key is None
        if isinstance(container, dict):
            if last:
                if here in container:
                    raise CorruptCheckpointError(f"item {name!r} lands where another item is")
                container[here] = leaf
                return
            container = container.setdefault(here, {} if isinstance(key, str) else [])
        elif isinstance(container, list) and type(here) is int:
            container.extend([None] * (here + 1 - len(container)))
            if last:
                if container[here] is not None:
                    raise CorruptCheckpointError(f"item {name!r} lands where another item is")
                container[here] = leaf
                return
            if container[here] is None:
                container[here] = {} if isinstance(key, str) else []
            container = container[here]
        else:
            raise CorruptCheckpointError(f"the key path of item {name!r} does not fit the others")
        if isinstance(container, _Leaf):
            raise CorruptCheckpointError(f"the key path of item {name!r} runs through another item")


def _encode(value: Any) -> Any:
    if isinstance(value, _Leaf):
        return value.node
    if isinstance(value, dict):
        return {"dict": [[k, _encode(v)] for k, v in value.items()]}
    if isinstance(value, list):
        return {"list": [_encode(v) for v in value]}
    return value  # None: a list slot nothing filled


def assemble(manifest: GlobalManifest, buffers: list[torch.Tensor], group_bytes: int = GROUP_BYTES
             ) -> tuple[Manifest, list[torch.Tensor]]:
    """The single-writer view of ``manifest`` whose shard bytes are ``buffers`` (one per shard, in order).

    A tensor saved as one chunk stays a view of its shard's bytes; the others are copied together into new
    buffers (appended to the returned list). Objects keep their bytes where they are.
    """
    buffers = list(buffers)
    tensors: list[TensorRecord] = []
    pending: list[tuple[int, int, ChunkedTensor]] = []  # (record index, offset in the group, tensor)
    group, used = -1, group_bytes

    def flush() -> None:
        if pending:
            out = mapped_buffer(used, resident=False)
            buffers.append(out)
            for j, at, t in pending:
                _fill(out[at:at + t.logical_bytes], t, buffers)
            pending.clear()

    copies: dict[Any, Span] = {}  # one tensor under two names is assembled once
    for t in manifest.tensors:
        same = (t.dtype, t.shape, t.chunks)
        if t.whole:
            span = t.chunks[0].span
        elif same in copies:
            span = copies[same]
        else:
            nbytes = t.logical_bytes
            if used + nbytes > group_bytes and used:
                flush()
                group, used = len(buffers), 0
            span = Span(group, used, nbytes)
            pending.append((len(tensors), used, t))
            used += -(-nbytes // ALIGN) * ALIGN
            copies[same] = span
        tensors.append(TensorRecord(t.dtype, t.shape, "cpu", span=span, requires_grad=t.requires_grad))
    flush()
    objects = tuple(ObjectRecord("", o.key, o.span) for o in manifest.objects)
    single = Manifest(manifest.save_id, manifest.created_ns, manifest.shards, tuple(tensors), (), objects,
                      nested(manifest), manifest.producer, manifest.torch_version)
    return single, buffers


def nested(manifest: GlobalManifest) -> Any:
    """The structure (``tree``) of the state the items were flattened from: tensor ``i`` and object ``j`` of the
    manifest at their key paths. Raises CorruptCheckpointError if the paths contradict each other."""
    root: dict[Any, Any] = {}
    paths = _paths(manifest)
    for i, t in enumerate(manifest.tensors):
        _place(root, paths[t.fqn], _Leaf({"tensor": i}), t.fqn)
    for j, o in enumerate(manifest.objects):
        _place(root, paths[o.key], _Leaf({"object": j}), o.key)
    return _encode(root)
