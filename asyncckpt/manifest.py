"""The manifest: the JSON document whose presence commits a checkpoint.

It maps the state's structure (container types, keys of any JSON-able type, leaves) onto entries that live in shard
files, and records checksums.  Everything read from a manifest is untrusted: :func:`parse` validates it fully before
the loader allocates or opens anything.  See docs/format.md for the specification.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from .errors import CorruptCheckpointError

FORMAT = "asyncckpt"
VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_RE = re.compile(r"^shard-[0-9a-f]{16}-[0-9]{5}\.safetensors$")
MAX_DEPTH = 256
MAX_DIMS = 64

#: torch dtypes the format knows, by their manifest name (``str(dtype)`` without the ``torch.`` prefix).
DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
}
# quantized dtypes cannot be stored as raw bytes (they carry scales); such tensors take the pickle fallback.
for _name in ("qint8", "quint8", "qint32", "quint4x2", "quint2x4"):
    DTYPES.pop(_name, None)

#: safetensors' own names for the dtypes it supports; any other dtype is stored as ``U8`` bytes.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64", torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16",
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- structure encoding
# Leaves that JSON holds losslessly are written as themselves (null, true, 3, 2.5, "s"); everything else is a
# one-key object whose key says what it is.  JSON arrays and objects never appear bare, so decoding is unambiguous.

def encode_float(x: float) -> Any:
    return x if math.isfinite(x) else {"float": repr(x)}


@dataclass
class Tree:
    """Decoded structure: the JSON tree plus the leaf tables it points into."""

    root: Any
    tensors: list[dict[str, Any]] = field(default_factory=list)
    storages: list[dict[str, Any]] = field(default_factory=list)
    objects: list[dict[str, Any]] = field(default_factory=list)


def decode(node: Any, tensor: Any, obj: Any, depth: int = 0) -> Any:
    """Rebuild a value from its encoded ``node``; ``tensor(i)`` and ``obj(i)`` supply the leaves."""
    if depth > MAX_DEPTH:
        raise CorruptCheckpointError(f"manifest structure nests deeper than {MAX_DEPTH} levels")
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    metadata = node.get("metadata", None) if isinstance(node, dict) and "odict" in node else None
    if not isinstance(node, dict) or len(node) != 1 + (metadata is not None):
        raise CorruptCheckpointError(f"manifest structure has an invalid node: {str(node)[:80]!r}")
    kind = "odict" if metadata is not None else next(iter(node))
    body = node[kind]
    if kind in ("dict", "odict"):
        if not isinstance(body, list):
            raise CorruptCheckpointError("manifest dict node is not a list of pairs")
        out: dict[Any, Any] = {} if kind == "dict" else OrderedDict()
        for pair in body:
            if not isinstance(pair, list) or len(pair) != 2:
                raise CorruptCheckpointError("manifest dict entry is not a [key, value] pair")
            key = decode(pair[0], tensor, obj, depth + 1)
            try:
                if key in out:
                    raise CorruptCheckpointError(f"manifest has duplicate key {key!r}")
                out[key] = decode(pair[1], tensor, obj, depth + 1)
            except TypeError as exc:  # unhashable key
                raise CorruptCheckpointError(f"manifest has an unhashable key {key!r}") from exc
        if metadata is not None:
            out._metadata = decode(metadata, tensor, obj, depth + 1)  # type: ignore[attr-defined]
        return out
    if kind in ("list", "tuple"):
        if not isinstance(body, list):
            raise CorruptCheckpointError(f"manifest {kind} node is not a list")
        items = [decode(x, tensor, obj, depth + 1) for x in body]
        return items if kind == "list" else tuple(items)
    if kind == "float":
        if body not in ("nan", "inf", "-inf"):
            raise CorruptCheckpointError(f"manifest float node has invalid value {body!r}")
        return float(body)
    if kind in ("tensor", "object"):
        if not isinstance(body, int) or isinstance(body, bool):
            raise CorruptCheckpointError(f"manifest {kind} reference is not an index")
        return tensor(body) if kind == "tensor" else obj(body)
    raise CorruptCheckpointError(f"manifest structure has unknown node kind {kind!r}")


# ---------------------------------------------------------------- validation

def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise CorruptCheckpointError(f"manifest is invalid: {what}")


def _is_int(x: Any, lo: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= lo


def _check_span(entry: dict[str, Any], shards: list[dict[str, Any]], what: str) -> None:
    _expect(_is_int(entry.get("shard")) and entry["shard"] < len(shards), f"{what} names no shard")
    _expect(_is_int(entry.get("offset")) and _is_int(entry.get("nbytes")), f"{what} has a bad offset/nbytes")
    _expect(entry["offset"] + entry["nbytes"] <= shards[entry["shard"]]["nbytes"], f"{what} lies past its shard's end")


def _numel(shape: list[int]) -> int:
    return math.prod(shape)


MAX_INDEX = 1 << 62  # sizes, strides and offsets beyond this overflow torch's int64 arithmetic


def _is_device(name: str) -> bool:
    try:
        torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


DIGEST = "manifest_xxh3_64"  # last member: xxh3-64 of the compact JSON of all the others, in their order


def _body(doc: dict[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False)


def seal(doc: dict[str, Any]) -> bytes:
    """The manifest's bytes: ``doc`` as compact JSON, ending with a checksum of everything before it."""
    body = _body({k: v for k, v in doc.items() if k != DIGEST})
    return f'{body[:-1]},"{DIGEST}":"{xxhash.xxh3_64_hexdigest(body.encode())}"}}'.encode()


def _check_digest(doc: Any) -> None:
    """Shard bytes carry checksums; this covers the manifest itself (offsets, keys, dtypes, numbers)."""
    if not isinstance(doc, dict):
        return
    claimed = doc.pop(DIGEST, None)
    try:
        actual = xxhash.xxh3_64_hexdigest(_body(doc).encode())
    except (ValueError, RecursionError):
        actual = None
    _expect(claimed == actual, "its checksum does not match: the manifest is damaged")


def parse(raw: bytes, where: str) -> dict[str, Any]:
    """Parse and validate manifest bytes read from ``where``; raise CorruptCheckpointError on any lie."""
    try:
        doc = json.loads(raw, object_pairs_hook=_unique_members)
    except (ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{where}: manifest is not valid JSON ({exc})") from exc
    try:
        _check_digest(doc)
        _validate(doc)
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(f"{where}: {exc}") from None
    return doc


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise ValueError("an object has duplicate members")
    return doc


def _validate(doc: Any) -> None:
    _expect(isinstance(doc, dict) and doc.get("format") == FORMAT, "not an asyncckpt manifest")
    _expect(doc.get("version") == VERSION, f"unsupported version {doc.get('version')!r} (this reader knows {VERSION})")
    _expect(_is_int(doc.get("created_ns")), "created_ns is not a timestamp")
    shards = doc.get("shards")
    _expect(isinstance(shards, list), "shards is not a list")
    names = set()
    for s in shards:
        _expect(isinstance(s, dict) and isinstance(s.get("file"), str) and SHARD_RE.match(s["file"]) is not None,
                f"shard file name {str(s.get('file') if isinstance(s, dict) else s)[:80]!r} is not allowed")
        _expect(s["file"] not in names, f"shard {s['file']} listed twice")
        names.add(s["file"])
        _expect(_is_int(s.get("nbytes")) and _is_int(s.get("chunk_bytes"), 1), f"shard {s['file']} has bad sizes")
        sums = s.get("xxh3_64")
        _expect(isinstance(sums, list) and len(sums) == -(-s["nbytes"] // s["chunk_bytes"])
                and all(isinstance(h, str) and len(h) == 16 for h in sums), f"shard {s['file']} has bad checksums")
    for i, st in enumerate(_table(doc, "storages")):
        _check_span(st, shards, f"storage {i}")
    storages = doc["storages"]
    for i, t in enumerate(_table(doc, "tensors")):
        what = f"tensor {i}"
        _expect(isinstance(t.get("dtype"), str) and t["dtype"] in DTYPES,
                f"{what} has unknown dtype {str(t.get('dtype'))[:40]!r}")
        dtype = DTYPES[t["dtype"]]
        shape = t.get("shape")
        _expect(isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_int(d) for d in shape)
                and max(shape, default=0) < MAX_INDEX and _numel(shape) * dtype.itemsize < MAX_INDEX,
                f"{what} has a bad shape")
        itemsize = dtype.itemsize
        _expect(isinstance(t.get("device"), str) and len(t["device"]) < 64 and _is_device(t["device"]),
                f"{what} has a bad device")
        _expect(not (t.get("requires_grad") or t.get("parameter")) or dtype.is_floating_point or dtype.is_complex,
                f"{what} of dtype {t['dtype']} cannot require gradients")
        if "base" in t:  # a view into a shared storage blob
            _expect(_is_int(t["base"]) and t["base"] < len(storages), f"{what} names no storage")
            stride = t.get("stride")
            _expect(isinstance(stride, list) and len(stride) == len(shape)
                    and all(_is_int(x) and x < MAX_INDEX for x in stride)
                    and _is_int(t.get("storage_offset")) and t["storage_offset"] < MAX_INDEX, f"{what} has a bad view")
            if _numel(shape):
                last = t["storage_offset"] + sum((d - 1) * s for d, s in zip(shape, stride))
                _expect((last + 1) * itemsize <= storages[t["base"]]["nbytes"], f"{what} views past its storage")
        else:
            _check_span(t, shards, what)
            _expect(_numel(shape) * itemsize == t["nbytes"], f"{what} shape/dtype disagree with its size")
            _expect(t["offset"] % itemsize == 0, f"{what} is misaligned for {t['dtype']}")
    for i, o in enumerate(_table(doc, "objects")):
        _check_span(o, shards, f"object {i}")
        _expect(isinstance(o.get("type"), str), f"object {i} has no type")
    _expect("tree" in doc, "no structure")


def _table(doc: dict[str, Any], name: str) -> list[dict[str, Any]]:
    table = doc.get(name)
    _expect(isinstance(table, list) and all(isinstance(x, dict) for x in table), f"{name} is not a list of entries")
    return table


def view_tensor(record: dict[str, Any], data: torch.Tensor | None, base: torch.Tensor | None) -> torch.Tensor:
    """The tensor a record describes, as a view of ``data`` (its own bytes) or of ``base`` (a shared storage blob).

    Both are uint8 host tensors; no bytes are copied unless a shared blob is misaligned for the dtype.
    """
    dtype = DTYPES[record["dtype"]]
    if "base" in record:
        assert base is not None
        if base.storage_offset() % dtype.itemsize:
            base = base.clone()
        return torch.empty(0, dtype=dtype).set_(
            base.untyped_storage(), base.storage_offset() // dtype.itemsize + record["storage_offset"],
            record["shape"], record["stride"])
    assert data is not None
    return data.view(dtype).view(record["shape"])


def finish_tensor(record: dict[str, Any], t: torch.Tensor) -> torch.Tensor:
    """Restore what the record says besides bytes: Parameter type and requires_grad."""
    if record.get("parameter"):
        return torch.nn.Parameter(t, requires_grad=bool(record.get("requires_grad")))
    if record.get("requires_grad"):
        t.requires_grad_(True)
    return t
