"""In-place load, streamed through staging buffers.

Restoring into existing tensors needs no shard-sized buffers: each chunk is read into a (reused, already resident)
staging buffer, checked, and its bytes copied straight into the target tensors it covers. Only entries with no such
destination (optimizer state, which torch rebuilds; pickled values; tensors whose target differs in shape, dtype,
device or layout) get memory of their own. Peak extra memory is the staging budget plus those entries.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import CorruptCheckpointError
from ..format.manifest import Manifest, ObjectRecord, ShardRecord, TensorRecord
from ..format.tree import Ref, structure
from ..io.contract import Storage
from ..memory.pool import StagingPool
from .ranged import Region, read_regions
from .reads import Record, Span, check_sizes
from .rebuild import unpickle


def _module_destinations(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` entries that ``load_state_dict`` copies verbatim into the tensor under the same key.

    Modules with state-dict hooks or their own (de)serialisation may rename or transform entries, so their keys are
    left to ``load_state_dict`` itself.
    """
    base = torch.nn.Module
    if type(module).load_state_dict is not base.load_state_dict:
        return {}
    whole_trees, own_keys = [], set()
    for name, m in module.named_modules(remove_duplicate=False):
        prefix = name + "." if name else ""
        if (getattr(m, "_load_state_dict_pre_hooks", None) or getattr(m, "_state_dict_hooks", None)
                or getattr(m, "_state_dict_pre_hooks", None) or type(m).state_dict is not base.state_dict):
            whole_trees.append(prefix)
        elif (type(m)._load_from_state_dict is not base._load_from_state_dict
              or type(m)._save_to_state_dict is not base._save_to_state_dict):
            own_keys.add(prefix)
    out = {}
    for key, t in module.state_dict(keep_vars=True).items():
        owner = key.rpartition(".")[0]
        if (isinstance(t, torch.Tensor) and not any(key.startswith(p) for p in whole_trees)
                and (owner + "." if owner else "") not in own_keys):
            out[key] = t
    return out


def _offer(target: Any, value: Any, offers: dict[int, list[torch.Tensor]], top: bool = False) -> None:
    """Pair each tensor `Ref` in ``value`` with the target tensor ``apply_in_place`` would copy it into (same
    walk)."""
    if isinstance(value, Ref):
        if value.kind == "tensor" and isinstance(target, torch.Tensor):
            offers.setdefault(value.index, []).append(target)
    elif isinstance(target, torch.nn.Module):
        if isinstance(value, Mapping):
            dests = _module_destinations(target)
            for key, v in value.items():
                if isinstance(v, Ref) and v.kind == "tensor" and key in dests:
                    offers.setdefault(v.index, []).append(dests[key])
    elif isinstance(target, torch.optim.Optimizer):
        return  # load_state_dict rebuilds optimizer state from the values it is given
    elif isinstance(target, (list, tuple)) and isinstance(value, (list, tuple)) and len(target) == len(value):
        for t, v in zip(target, value):
            _offer(t, v, offers)
    elif isinstance(target, Mapping) and isinstance(value, Mapping) and (top or hasattr(target, "__setitem__")):
        for key, v in value.items():
            if key in target:
                _offer(target[key], v, offers)


def _writable_bytes(t: torch.Tensor, r: TensorRecord) -> torch.Tensor | None:
    """``t`` as flat bytes if the record's bytes can land in it unchanged (same dtype and shape, dense CPU)."""
    if (type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type != "cpu" or t.layout != torch.strided
            or t.is_quantized or t.is_conj() or t.is_neg() or not t.is_contiguous() or r.span is None
            or r.torch_dtype != t.dtype or tuple(t.shape) != r.shape or t.numel() == 0):
        return None
    return t.detach().reshape(-1).view(torch.uint8)


def destinations(manifest: Manifest, target: Any) -> dict[int, torch.Tensor]:
    """Tensor index -> the target's own bytes to read it into; ambiguous or overlapping destinations are dropped.

    The structure is decoded with its references checked (CorruptCheckpointError), as ``build_state`` would only
    after the bytes reached the target.
    """
    tree = structure(manifest.tree, len(manifest.tensors), len(manifest.objects))
    offers: dict[int, list[torch.Tensor]] = {}
    _offer(target, tree, offers, top=True)
    dests = {}
    for i, ts in offers.items():
        if len(ts) == 1:
            b = _writable_bytes(ts[0], manifest.tensors[i])
            if b is not None:
                dests[i] = b
    spans = sorted((b.data_ptr(), b.data_ptr() + b.numel(), i) for i, b in dests.items())
    clash: set[int] = set()
    reach, holder = -1, -1
    for start, end, i in spans:  # two destinations sharing memory would race: both load the usual way
        if start < reach:
            clash.update((i, holder))
        if end > reach:
            reach, holder = end, i
    return {i: b for i, b in dests.items() if i not in clash}


def _regions(shards: tuple[ShardRecord, ...], records: list[Record], by_record: dict[int, torch.Tensor]
             ) -> list[list[Region]]:
    """Where each record's bytes land, per shard; a buffer several records share (one span) is read once."""
    regions: list[list[Region]] = [[] for _ in shards]
    filled: set[int] = set()
    for rec in records:
        assert rec.span is not None
        out = by_record[id(rec)]
        if rec.span.nbytes and id(out) not in filled:
            filled.add(id(out))
            regions[rec.span.shard].append((rec.span.offset, out))
    return regions


def _check_objects(objects: tuple[ObjectRecord, ...], by_record: dict[int, torch.Tensor], display: str) -> None:
    """Raise what ``build_state`` would for a pickled value the weights-only rules refuse (unpickled onto the meta
    device: no tensor bytes)."""
    for o in objects:
        unpickle(by_record[id(o)], o, display, "meta", True)


async def read_into_state(storage: Storage, path: str, display: str, manifest: Manifest, verify: bool,
                          pool: StagingPool, target: Any, weights_only: bool = True) -> Span:
    """Stream the checkpoint's bytes into ``target``'s tensors where they fit; return the records' bytes for
    ``build_state`` (for those tensors: the target's own memory, which ``apply_in_place`` then leaves as it is).

    What ``build_state`` would refuse after the bytes landed is refused first, so the target is untouched: a
    structure naming a record the manifest lacks, and (with ``weights_only``) a pickled value those rules refuse —
    the pickled values are read and tried before anything streams into the target.
    """
    shards = manifest.shards
    await check_sizes(storage, path, display, shards)  # every shard, even one no destination needs
    try:
        dests = destinations(manifest, target)
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(f"{display}: {exc}") from None
    by_record: dict[int, torch.Tensor] = {
        id(rec): torch.empty(rec.span.nbytes, dtype=torch.uint8) for rec in (*manifest.storages, *manifest.objects)}
    pending: list[Record] = [*manifest.storages, *manifest.objects]
    if dests and manifest.objects and weights_only:  # objects first: the target stays untouched if one is refused
        await read_regions(storage, path, display, shards, verify, pool,
                           _regions(shards, list(manifest.objects), by_record))
        pending = list(manifest.storages)
        await storage.io.cpu(_check_objects, manifest.objects, by_record, display)
    own: dict[Any, torch.Tensor] = {}  # records with no destination: one buffer per span (a tensor named twice)
    for j, r in enumerate(manifest.tensors):
        if r.span is not None:
            by_record[id(r)] = dests[j] if j in dests else own.setdefault(
                r.span, torch.empty(r.span.nbytes, dtype=torch.uint8))
            pending.append(r)
    damaged = " (the target may already hold part of this checkpoint)" if dests else ""
    await read_regions(storage, path, display, shards, verify, pool, _regions(shards, pending, by_record), damaged)

    def span(r: Record) -> torch.Tensor:
        return by_record[id(r)]
    return span
