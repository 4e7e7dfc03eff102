"""Load: validate the manifest, read shards concurrently with checksums, rebuild the state, optionally in place."""

from __future__ import annotations

import bisect
import io
import itertools
import pickle
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import torch
from anyio import to_thread

from .errors import CheckpointError, CorruptCheckpointError, IncompleteCheckpointError, UnsafeCheckpointError
from .manifest import DTYPES, MANIFEST_NAME, SHARD_RE, decode, finish_tensor, parse, view_tensor
from .staging import StagingPool, mapped_buffer
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


Span = Callable[[dict[str, Any]], torch.Tensor]  # manifest record -> its bytes (uint8, host)


async def _check_sizes(storage: Storage, path: str, display: str, shards: list[dict[str, Any]]) -> None:
    for s in shards:
        size = await storage.size(storage.join(path, s["file"]))
        if size is None:
            raise CorruptCheckpointError(f"{display}: shard {s['file']} is missing")
        if size != s["nbytes"]:
            raise CorruptCheckpointError(
                f"{display}: shard {s['file']} has {size} bytes, the manifest says {s['nbytes']} (truncated or "
                "overwritten)")


async def _read_chunks(storage: Storage, path: str, display: str, shards: list[dict[str, Any]], verify: bool,
                       read_chunk: Callable[[Any, int, int, int], Awaitable[str]], damaged: str = "") -> None:
    """Read every chunk of every shard concurrently through ``read_chunk(reader, shard, offset, nbytes)``, which
    returns the chunk's digest; a digest that differs from the manifest's is a CorruptCheckpointError."""
    async def read_shard(i: int) -> None:
        s = shards[i]
        reader = await storage.open_reader(storage.join(path, s["file"]))
        try:
            async with anyio.create_task_group() as tg:
                for k, offset in enumerate(range(0, s["nbytes"], s["chunk_bytes"])):
                    tg.start_soon(one_chunk, reader, i, k, offset)
        finally:
            await reader.close()

    async def one_chunk(reader: Any, i: int, k: int, offset: int) -> None:
        s = shards[i]
        try:
            sig = await read_chunk(reader, i, offset, min(s["chunk_bytes"], s["nbytes"] - offset))
        except EOFError as exc:
            raise CorruptCheckpointError(f"{display}: shard {s['file']} is truncated ({exc}){damaged}") from exc
        if verify and sig != s["xxh3_64"][k]:
            raise CorruptCheckpointError(
                f"{display}: checksum mismatch in shard {s['file']} at bytes {offset}..{offset + s['chunk_bytes']}; "
                "the checkpoint is damaged — load another one (asyncckpt.latest) or pass verify=False to inspect it"
                + damaged)

    try:
        async with anyio.create_task_group() as tg:
            for i in range(len(shards)):
                tg.start_soon(read_shard, i)
    except BaseExceptionGroup as group:
        raise first_error(group) from None


async def read_shards(storage: Storage, path: str, display: str, doc: dict[str, Any], verify: bool
                      ) -> list[torch.Tensor]:
    """Every shard's bytes in host memory, chunks read concurrently and checked against the manifest."""
    shards = doc["shards"]
    await _check_sizes(storage, path, display, shards)
    buffers = [mapped_buffer(s["nbytes"], resident=False) for s in shards]  # page-aligned: chunks go O_DIRECT

    async def read_chunk(reader: Any, i: int, offset: int, nbytes: int) -> str:
        return await reader.read_into(offset, buffers[i][offset:offset + nbytes])

    await _read_chunks(storage, path, display, shards, verify, read_chunk)
    return buffers


def shard_span(buffers: list[torch.Tensor]) -> Span:
    """Records' bytes as views of whole-shard buffers, each with a storage of its own (see ``alias``)."""
    return lambda r: alias(buffers[r["shard"]][r["offset"]:r["offset"] + r["nbytes"]])


# ---------------------------------------------------------------- in-place load, streamed through staging buffers
#
# Restoring into existing tensors needs no shard-sized buffers: each chunk is read into a (reused, already resident)
# staging buffer, checked, and its bytes copied straight into the target tensors it covers.  Only entries with no
# such destination (optimizer state, which torch rebuilds; pickled values; tensors whose target differs in shape,
# dtype, device or layout) get memory of their own.  Peak extra memory is the staging budget plus those entries.

class _Slot:
    """Stands for manifest tensor ``index`` while destinations are matched (no bytes read yet)."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


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
    """Pair each slot in ``value`` with the target tensor ``apply_in_place`` would copy it into (same walk)."""
    if isinstance(value, _Slot):
        if isinstance(target, torch.Tensor):
            offers.setdefault(value.index, []).append(target)
    elif isinstance(target, torch.nn.Module):
        if isinstance(value, Mapping):
            dests = _module_destinations(target)
            for key, v in value.items():
                if isinstance(v, _Slot) and key in dests:
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


def _writable_bytes(t: torch.Tensor, r: dict[str, Any]) -> torch.Tensor | None:
    """``t`` as flat bytes if the record's bytes can land in it unchanged (same dtype and shape, dense CPU)."""
    if (type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type != "cpu" or t.layout != torch.strided
            or t.is_quantized or t.is_conj() or t.is_neg() or not t.is_contiguous() or "base" in r
            or DTYPES.get(r["dtype"]) != t.dtype or list(t.shape) != list(r["shape"]) or t.numel() == 0):
        return None
    return t.detach().reshape(-1).view(torch.uint8)


def _destinations(doc: dict[str, Any], target: Any) -> dict[int, torch.Tensor]:
    """Tensor index -> the target's own bytes to read it into; ambiguous or overlapping destinations are dropped."""
    objects: dict[int, object] = {}
    tree = decode(doc["tree"], _Slot, lambda i: objects.setdefault(i, object()))
    offers: dict[int, list[torch.Tensor]] = {}
    _offer(target, tree, offers, top=True)
    dests = {}
    for i, ts in offers.items():
        if len(ts) == 1 and (b := _writable_bytes(ts[0], doc["tensors"][i])) is not None:
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


def _scatter(chunk: torch.Tensor, start: int, regions: list[tuple[int, torch.Tensor]]) -> None:
    end = start + chunk.numel()
    for offset, out in regions:
        a, b = max(offset, start), min(offset + out.numel(), end)
        out[a - offset:b - offset].copy_(chunk[a - start:b - start])


async def read_into_state(storage: Storage, path: str, display: str, doc: dict[str, Any], verify: bool,
                          pool: StagingPool, target: Any) -> Span:
    """Stream the checkpoint's bytes into ``target``'s tensors where they fit; return the records' bytes for
    ``build_state`` (for those tensors: the target's own memory, which ``apply_in_place`` then leaves as it is)."""
    shards = doc["shards"]
    await _check_sizes(storage, path, display, shards)
    dests = _destinations(doc, target)
    by_record: dict[int, torch.Tensor] = {}
    regions: list[list[tuple[int, torch.Tensor]]] = [[] for _ in shards]
    for j, r in enumerate(doc["tensors"]):
        if "base" not in r:
            by_record[id(r)] = dests[j] if j in dests else torch.empty(r["nbytes"], dtype=torch.uint8)
    for r in (*doc["storages"], *doc["objects"]):
        by_record[id(r)] = torch.empty(r["nbytes"], dtype=torch.uint8)
    for r in (*doc["tensors"], *doc["storages"], *doc["objects"]):
        if id(r) in by_record and r["nbytes"]:
            regions[r["shard"]].append((r["offset"], by_record[id(r)]))
    starts, reach = [], []  # per shard: region starts, and the furthest end up to each region (bisectable)
    for rs in regions:
        rs.sort(key=lambda x: x[0])
        starts.append([offset for offset, _ in rs])
        reach.append(list(itertools.accumulate((offset + out.numel() for offset, out in rs), max)))

    async def read_chunk(reader: Any, i: int, offset: int, nbytes: int) -> str:
        buf = await pool.acquire(shards[i]["chunk_bytes"])
        try:
            sig = await reader.read_into(offset, buf[:nbytes])
            if verify and sig != shards[i]["xxh3_64"][offset // shards[i]["chunk_bytes"]]:
                return sig  # reported by the caller; nothing of this chunk reaches the target
            lo, hi = bisect.bisect_right(reach[i], offset), bisect.bisect_left(starts[i], offset + nbytes)
            covered = [(o, out) for o, out in regions[i][lo:hi] if o + out.numel() > offset]
            if covered:
                await to_thread.run_sync(_scatter, buf[:nbytes], offset, covered, limiter=storage.limiter)
            return sig
        finally:
            pool.release(buf)

    damaged = " (the target may already hold part of this checkpoint)" if dests else ""
    await _read_chunks(storage, path, display, shards, verify, read_chunk, damaged)
    return lambda r: by_record[id(r)]


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


def build_state(doc: dict[str, Any], span: Span, display: str, map_location: MapLocation, weights_only: bool) -> Any:
    """Rebuild the saved structure from the records' bytes (``span``); CPU tensors alias them (no copy)."""
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
