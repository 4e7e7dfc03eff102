"""Load: validate the manifest, read shards concurrently with checksums, rebuild the state, optionally in place."""

from __future__ import annotations

import io
import pickle
import re
from collections.abc import Mapping
from typing import Any

import anyio
import torch

from .errors import CheckpointError, CorruptCheckpointError, IncompleteCheckpointError, UnsafeCheckpointError
from .manifest import MANIFEST_NAME, SHARD_RE, decode, finish_tensor, parse, view_tensor
from .storage import Storage, alias

MapLocation = Any  # None | str | torch.device | dict[str, str] | Callable[[storage, str], storage]


async def read_manifest(storage: Storage, path: str, display: str) -> dict[str, Any]:
    """The validated manifest at ``path``, or a CheckpointError saying why there is none."""
    kind = await storage.kind(path)
    if kind is None:
        raise CheckpointError(f"no checkpoint at {display}: the path does not exist")
    if kind == "file":
        raise CheckpointError(
            f"{display} is a file, not an asyncckpt checkpoint directory; a torch.save file loads with torch.load "
            "(or convert it: `asyncckpt convert`)")
    manifest_path = storage.join(path, MANIFEST_NAME)
    try:
        raw = await storage.read_bytes(manifest_path)
    except FileNotFoundError:
        names = await storage.list(path)
        if any(SHARD_RE.match(n) for n in names):
            raise IncompleteCheckpointError(
                f"{display} was never committed: it holds shard files but no {MANIFEST_NAME} (its save crashed, "
                "failed or is still running); use asyncckpt.latest() on its parent to find the newest committed "
                "checkpoint") from None
        raise CheckpointError(f"{display} is not an asyncckpt checkpoint (no {MANIFEST_NAME})") from None
    return parse(raw, display)


async def read_shards(storage: Storage, path: str, display: str, doc: dict[str, Any], verify: bool
                      ) -> list[torch.Tensor]:
    """Every shard's bytes in host memory, chunks read concurrently and checked against the manifest."""
    shards = doc["shards"]
    for s in shards:
        size = await storage.size(storage.join(path, s["file"]))
        if size is None:
            raise CorruptCheckpointError(f"{display}: shard {s['file']} is missing")
        if size != s["nbytes"]:
            raise CorruptCheckpointError(
                f"{display}: shard {s['file']} has {size} bytes, the manifest says {s['nbytes']} (truncated or "
                "overwritten)")
    buffers = [torch.empty(s["nbytes"], dtype=torch.uint8) for s in shards]

    async def read_shard(i: int) -> None:
        s = shards[i]
        reader = await storage.open_reader(storage.join(path, s["file"]))
        try:
            async with anyio.create_task_group() as tg:
                for k, offset in enumerate(range(0, s["nbytes"], s["chunk_bytes"])):
                    tg.start_soon(read_chunk, reader, i, k, offset)
        finally:
            await reader.close()

    async def read_chunk(reader: Any, i: int, k: int, offset: int) -> None:
        s = shards[i]
        try:
            sig = await reader.read_into(offset, buffers[i][offset:offset + s["chunk_bytes"]])
        except EOFError as exc:
            raise CorruptCheckpointError(f"{display}: shard {s['file']} is truncated ({exc})") from exc
        if verify and sig != s["xxh3_64"][k]:
            raise CorruptCheckpointError(
                f"{display}: checksum mismatch in shard {s['file']} at bytes {offset}..{offset + s['chunk_bytes']}; "
                "the checkpoint is damaged — load another one (asyncckpt.latest) or pass verify=False to inspect it")

    try:
        async with anyio.create_task_group() as tg:
            for i in range(len(shards)):
                tg.start_soon(read_shard, i)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    return buffers


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first meaningful error inside (possibly nested) exception groups."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _target_device(map_location: MapLocation, location: str, t: torch.Tensor) -> torch.device:
    if map_location is None:
        target: Any = location
    elif isinstance(map_location, (str, torch.device)):
        target = map_location
    elif isinstance(map_location, Mapping):
        target = map_location.get(location, location)
    else:  # torch-style callable(storage, location) -> storage or None
        moved = map_location(t.untyped_storage(), location)
        target = location if moved is None else moved.device
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
                from . import xla

                moved = xla.to_xla([views[i] for i in idx], dev)
            else:
                moved = [views[i].to(dev) for i in idx]
        except (RuntimeError, AssertionError, ImportError) as exc:
            raise CheckpointError(
                f"{display}: cannot place tensors on {dev} ({exc}); pass map_location='cpu'") from exc
        for i, m in zip(idx, moved):
            out[i] = m
    return out


def build_state(doc: dict[str, Any], buffers: list[torch.Tensor], display: str, map_location: MapLocation,
                weights_only: bool) -> Any:
    """Rebuild the saved structure from shard buffers; CPU tensors alias them (no copy), each with its own
    storage, so the result can go straight to ``torch.save`` or safetensors."""
    def span(r: dict[str, Any]) -> torch.Tensor:
        return alias(buffers[r["shard"]][r["offset"]:r["offset"] + r["nbytes"]])

    bases = [span(s) for s in doc["storages"]]
    records = doc["tensors"]
    try:  # the manifest was validated; this is the safety net for whatever torch still refuses
        views = [view_tensor(r, None if "base" in r else span(r), bases[r["base"]] if "base" in r else None)
                 for r in records]
    except (RuntimeError, ValueError, TypeError, OverflowError) as exc:
        raise CorruptCheckpointError(f"{display}: the manifest describes a tensor torch cannot build ({exc})") from exc
    placed = _place(views, [_target_device(map_location, r["device"], v) for r, v in zip(records, views)], display)
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
            if not 0 <= i < len(doc["objects"]):
                raise CorruptCheckpointError(f"{display}: structure refers to missing object {i}")
            r = doc["objects"][i]
            objects[i] = _unpickle(bytes(span(r)), r, display, map_location, weights_only)
        return objects[i]

    try:
        return decode(doc["tree"], tensor, obj)
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


def _unpickle(data: bytes, record: dict[str, Any], display: str, map_location: MapLocation, weights_only: bool) -> Any:
    where = record.get("key") or "<root>"
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        if weights_only:
            raise UnsafeCheckpointError(
                f"{display}: the value at {where} is a pickled {record['type']}, which weights-only loading refuses "
                f"because unpickling it could run code; if you trust this checkpoint pass weights_only=False, or "
                f"allow the type with torch.serialization.add_safe_globals ({torch_load_reason(exc)})") from None
        raise CorruptCheckpointError(f"{display}: the value at {where} cannot be unpickled ({exc})") from exc
    except Exception as exc:
        raise CorruptCheckpointError(
            f"{display}: the value at {where} ({record['type']}) cannot be unpickled: {type(exc).__name__}: "
            f"{torch_load_reason(exc)}") from exc


# ---------------------------------------------------------------- in-place restore

class _Problems:
    def __init__(self) -> None:
        self.missing: list[str] = []
        self.unexpected: list[str] = []
        self.mismatched: list[str] = []


def apply_in_place(target: Any, loaded: Any, strict: bool, display: str) -> Any:
    """Copy ``loaded`` into ``target`` (tensors, modules, optimizers, dicts of them); return what was not applied.

    At the top level of a dict target, checkpoint keys the target lacks are returned rather than reported, so a
    trainer can restore what it holds and handle the rest itself (Lightning's ``load_checkpoint(state=...)``).
    """
    problems = _Problems()
    if isinstance(target, Mapping) and isinstance(loaded, Mapping):
        remainder = {}
        for key in target:
            if key not in loaded:
                problems.missing.append(str(key))
        for key, value in loaded.items():
            if key not in target or not _apply(target[key], value, str(key), strict, problems):
                remainder[key] = value
        result: Any = remainder
    else:
        result = None if _apply(target, loaded, "", strict, problems) else loaded
    messages = []
    if problems.mismatched:
        messages.append("mismatched: " + ", ".join(problems.mismatched[:20]))
    if strict and problems.missing:
        messages.append("missing from the checkpoint: " + ", ".join(problems.missing[:20]))
    if strict and problems.unexpected:
        messages.append("not in the target: " + ", ".join(problems.unexpected[:20]))
    if messages:
        hint = "" if problems.mismatched else " (pass strict=False to load what matches)"
        raise CheckpointError(f"cannot restore {display} in place: " + "; ".join(messages) + hint)
    return result


def _apply(target: Any, value: Any, name: str, strict: bool, problems: _Problems) -> bool:
    """Restore ``value`` into ``target``; True when the target now holds it fully."""
    if isinstance(target, torch.nn.Module):
        if not isinstance(value, Mapping):
            problems.mismatched.append(f"{name} (module, checkpoint holds {type(value).__name__})")
            return False
        try:
            result = target.load_state_dict(value, strict=False)
        except RuntimeError as exc:
            problems.mismatched.append(f"{name} ({str(exc).splitlines()[-1].strip()})")
            return False
        problems.missing += [f"{name}.{k}" for k in result.missing_keys]
        problems.unexpected += [f"{name}.{k}" for k in result.unexpected_keys]
        return True
    if isinstance(target, torch.optim.Optimizer):
        try:
            target.load_state_dict(value)
        except (ValueError, KeyError, TypeError) as exc:
            problems.mismatched.append(f"{name} (optimizer: {exc})")
            return False
        return True
    if isinstance(target, torch.Tensor):
        if not isinstance(value, torch.Tensor) or value.shape != target.shape or value.dtype != target.dtype:
            got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
            problems.mismatched.append(f"{name} (target {tuple(target.shape)} {target.dtype}, checkpoint {got})")
            return False
        with torch.no_grad():
            target.copy_(value)
        return True
    if isinstance(target, (list, tuple)) and isinstance(value, (list, tuple)) and len(target) == len(value):
        applied = [_apply(t, v, f"{name}.{i}", strict, problems) for i, (t, v) in enumerate(zip(target, value))]
        return all(applied)
    if isinstance(target, Mapping) and isinstance(value, Mapping) and hasattr(target, "__setitem__"):
        whole = True
        for key in target:
            if key not in value:
                problems.missing.append(f"{name}.{key}")
        for key, v in value.items():
            if key not in target:
                problems.unexpected.append(f"{name}.{key}")
                whole = False
            elif not _apply(target[key], v, f"{name}.{key}", strict, problems):
                target[key] = v  # leaves that cannot change in place (numbers, strings…) are replaced
        return whole
    return False


async def verify_shards(storage: Storage, path: str, display: str, doc: dict[str, Any], on_chunk: Any = None
                        ) -> list[str]:
    """Every problem with the shards of a parsed manifest, one line each: a missing or resized shard, a chunk whose
    xxh3-64 differs, a safetensors header placing entries elsewhere than the manifest (a lie checksums miss).

    As many workers as the storage's limiter allows read chunks into one reused buffer each, so memory stays
    bounded whatever the checkpoint's size; ``on_chunk(nbytes)`` reports progress.
    """
    import json

    from .storage import as_memoryview

    shards, problems, sizes = doc["shards"], [], {}
    report = on_chunk or (lambda n: None)

    async def size_of(i: int) -> None:
        sizes[i] = await storage.size(storage.join(path, shards[i]["file"]))

    async def check_header(reader: Any, i: int) -> None:
        s = shards[i]
        try:
            head = torch.empty(8, dtype=torch.uint8)
            await reader.read_into(0, head)
            n = int.from_bytes(as_memoryview(head), "little")
            raw = torch.empty(n if n <= s["nbytes"] - 8 else 0, dtype=torch.uint8)
            await reader.read_into(8, raw)
            found = sorted((8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
                           for k, v in json.loads(as_memoryview(raw).tobytes()).items() if k != "__metadata__")
        except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError):
            problems.append(f"{display}: shard {s['file']} does not start with a valid safetensors header")
            return
        expected = sorted((r["offset"], r["nbytes"]) for table in ("tensors", "storages", "objects")
                          for r in doc[table] if "base" not in r and r["shard"] == i)
        if found != expected or max((o + n for o, n in found), default=s["nbytes"]) != s["nbytes"]:
            problems.append(f"{display}: shard {s['file']}: its safetensors header and the manifest place the "
                            "entries differently")

    async def worker(work: Any, nbytes: int) -> None:
        buf, reader, current = torch.empty(nbytes, dtype=torch.uint8), None, -1
        try:
            for i, k, offset in work:
                s = shards[i]
                if i != current:
                    if reader is not None:
                        await reader.close()
                    reader = None
                    reader, current = await storage.open_reader(storage.join(path, s["file"])), i
                n = min(s["chunk_bytes"], s["nbytes"] - offset)
                try:
                    sig = await reader.read_into(offset, buf[:n])
                except EOFError as exc:
                    problems.append(f"{display}: shard {s['file']} is truncated ({exc})")
                else:
                    if sig != s["xxh3_64"][k]:
                        problems.append(f"{display}: checksum mismatch in shard {s['file']} at bytes "
                                        f"{offset}..{offset + n}")
                    elif k == 0:
                        await check_header(reader, i)
                report(n)
        finally:
            if reader is not None:
                await reader.close()

    try:
        async with anyio.create_task_group() as tg:
            for i in range(len(shards)):
                tg.start_soon(size_of, i)
        intact = []
        for i, s in enumerate(shards):
            if sizes[i] == s["nbytes"]:
                intact.append(i)
                continue
            problems.append(f"{display}: shard {s['file']} is missing" if sizes[i] is None else
                            f"{display}: shard {s['file']} has {sizes[i]} bytes, the manifest says {s['nbytes']} "
                            "(truncated or overwritten)")
            report(s["nbytes"])
        work = iter([(i, k, offset) for i in intact
                     for k, offset in enumerate(range(0, shards[i]["nbytes"], shards[i]["chunk_bytes"]))])
        nbytes = max((min(shards[i]["chunk_bytes"], shards[i]["nbytes"]) for i in intact), default=0)
        async with anyio.create_task_group() as tg:
            for _ in range(min(int(storage.limiter.total_tokens), len(intact))):
                tg.start_soon(worker, work, nbytes)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    return problems
