"""Rebuilding the saved structure from the records' bytes: tensors as views (no copy), placed on their devices;
pickled values unpickled under torch's weights-only rules unless the caller opts out."""

from __future__ import annotations

import io
import pickle
import re
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import CheckpointError, CorruptCheckpointError, InvalidArgumentError, UnsafeCheckpointError
from ..format.manifest import Manifest, ObjectRecord, finish_tensor, view_tensor
from ..format.tree import decode
from ..memory.buffers import as_memoryview
from .reads import Span

MapLocation = Any  # None | str | torch.device | dict[str, str] | Callable[[storage, str], storage]


def check_map_location(map_location: MapLocation) -> None:
    """Refuse a ``map_location`` that ``torch.load`` would not understand, before anything is read."""
    def device(value: Any, what: str) -> None:
        if isinstance(value, torch.device):
            return
        if isinstance(value, str):
            try:
                torch.device(value)
                return
            except (RuntimeError, ValueError) as exc:
                raise InvalidArgumentError(f"map_location {what}{value!r} is not a device ({exc})") from None
        raise InvalidArgumentError(f"map_location {what}must be a device or a device name, not {value!r}")

    if map_location is None or callable(map_location):
        return
    if isinstance(map_location, Mapping):
        for key, value in map_location.items():
            if not isinstance(key, str):
                raise InvalidArgumentError(f"map_location's keys must be device names, not {key!r}")
            device(value, f"[{key!r}] = ")
        return
    device(map_location, "")


def _target_device(map_location: MapLocation, location: str, t: torch.Tensor) -> torch.device:
    if map_location is None:
        target: Any = location
    elif isinstance(map_location, (str, torch.device)):
        target = map_location
    elif isinstance(map_location, Mapping):
        target = map_location.get(location, location)
    else:  # torch-style callable(storage, location) -> storage or None
        try:
            moved = map_location(t.untyped_storage(), location)
        except Exception as exc:
            raise CheckpointError(f"map_location raised {type(exc).__name__}: {exc}") from exc
        target = location if moved is None else getattr(moved, "device", None)
        if not isinstance(target, (str, torch.device)):
            raise InvalidArgumentError(f"map_location returned {moved!r}, not a storage or None")
    return torch.device(target)


def _place(views: list[torch.Tensor], devices: list[torch.device], display: str) -> list[torch.Tensor]:
    """Move host views to their target devices; all XLA-bound tensors of one device go up in one transfer."""
    out = list(views)
    groups: dict[torch.device, list[int]] = {}
    for i, dev in enumerate(devices):
        if dev.type != "cpu":
            groups.setdefault(dev, []).append(i)
    for dev, idx in groups.items():
        try:
            if dev.type == "xla":
                from ..snapshot import xla

                moved = xla.to_xla([views[i] for i in idx], dev)
            else:
                moved = [views[i].to(dev) for i in idx]
        except (RuntimeError, AssertionError, ImportError) as exc:
            raise CheckpointError(
                f"{display}: cannot place tensors on {dev} ({exc}); pass map_location='cpu'") from exc
        for i, m in zip(idx, moved):
            out[i] = m
    return out


def build_state(manifest: Manifest, span: Span, display: str, map_location: MapLocation, weights_only: bool) -> Any:
    """Rebuild the saved structure from the records' bytes (``span``); CPU tensors alias them (no copy)."""
    bases = [span(s) for s in manifest.storages]
    records = manifest.tensors
    try:  # the manifest was validated; this is the safety net for whatever torch still refuses
        views = [view_tensor(r, None if r.view is not None else span(r), bases[r.view.base] if r.view else None)
                 for r in records]
    except (RuntimeError, ValueError, TypeError, OverflowError) as exc:
        raise CorruptCheckpointError(f"{display}: the manifest describes a tensor torch cannot build ({exc})") from exc
    placed = _place(views, [_target_device(map_location, r.device, v) for r, v in zip(records, views)], display)
    try:
        tensors = [finish_tensor(r, t) for r, t in zip(records, placed)]
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CorruptCheckpointError(f"{display}: the manifest describes a tensor torch cannot build ({exc})") from exc
    objects: dict[int, Any] = {}

    def tensor(i: int) -> torch.Tensor:
        if not 0 <= i < len(tensors):
            raise CorruptCheckpointError(f"{display}: structure refers to missing tensor {i}")
        return tensors[i]

    def obj(i: int) -> Any:
        if i not in objects:
            if not 0 <= i < len(manifest.objects):
                raise CorruptCheckpointError(f"{display}: structure refers to missing object {i}")
            r = manifest.objects[i]
            objects[i] = unpickle(span(r), r, display, map_location, weights_only)
        return objects[i]

    try:
        return decode(manifest.tree, tensor, obj)
    except CorruptCheckpointError as exc:
        if str(exc).startswith(display):
            raise
        raise CorruptCheckpointError(f"{display}: {exc}") from None


def torch_load_reason(exc: BaseException) -> str:
    """The informative line of a torch.load error (its weights-only errors span paragraphs of advice)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    for line in lines:
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip()
    return next((line for line in lines if line), type(exc).__name__)


def unpickle(data: torch.Tensor, record: ObjectRecord, display: str, map_location: MapLocation,
             weights_only: bool) -> Any:
    """``torch.load`` of one object entry's bytes (read in place: no per-element conversion, no extra copy)."""
    where = record.key or "<root>"
    try:
        return torch.load(io.BytesIO(as_memoryview(data.contiguous())), map_location=map_location,
                          weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        if weights_only:
            raise UnsafeCheckpointError(
                f"{display}: the value at {where} is a pickled {record.type}, which weights-only loading refuses "
                f"because unpickling it could run code; if you trust this checkpoint pass weights_only=False, or "
                f"allow the type with torch.serialization.add_safe_globals ({torch_load_reason(exc)})") from None
        raise CorruptCheckpointError(f"{display}: the value at {where} cannot be unpickled ({exc})") from exc
    except Exception as exc:
        raise CorruptCheckpointError(
            f"{display}: the value at {where} ({record.type}) cannot be unpickled: {type(exc).__name__}: "
            f"{torch_load_reason(exc)}") from exc
