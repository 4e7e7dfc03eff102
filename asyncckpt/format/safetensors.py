"""Safetensors headers: every shard is a valid safetensors file, so any safetensors reader can open it.

A header is an 8-byte little-endian length, then JSON ``{name: {"dtype", "shape", "data_offsets"}, "__metadata__":
{...}}`` padded with spaces so the data section starts 64-byte aligned. Names must be unique and must not be
``__metadata__``, whatever keys the user's state has.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Iterable

from .dtypes import SAFETENSORS_ITEMSIZE

HEADER_ALIGN = 64
METADATA_KEY = "__metadata__"
MAX_HEADER = 100 << 20  # safetensors' own readers refuse larger headers


@dataclass(frozen=True)
class HeaderEntry:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    nbytes: int


def unique_names(names: Iterable[str]) -> list[str]:
    """``names`` made unique and legal: a repeat (or ``__metadata__``) gets ``#1``, ``#2``… until it is new."""
    seen: set[str] = set()
    out = []
    for name in names:
        candidate, n = name, 0
        while candidate in seen or candidate == METADATA_KEY:
            n += 1
            candidate = f"{name}#{n}"
        seen.add(candidate)
        out.append(candidate)
    return out


def build_header(entries: list[HeaderEntry], metadata: dict[str, str]) -> bytes:
    """The header bytes (length prefix included) for ``entries`` stored back to back after it."""
    meta: dict[str, Any] = {METADATA_KEY: metadata}
    pos = 0
    for e, name in zip(entries, unique_names(e.name for e in entries)):
        meta[name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        pos += e.nbytes
    body = json.dumps(meta, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % HEADER_ALIGN)
    return struct.pack("<Q", len(body)) + body


class HeaderError(ValueError):
    """The bytes are not a safetensors header this format could have written."""


def header_length(prefix: bytes) -> int:
    """The JSON length announced by the first 8 bytes of a file."""
    if len(prefix) != 8:
        raise HeaderError("the file is shorter than a safetensors length prefix")
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER:
        raise HeaderError(f"the header claims {n} bytes")
    return n


def parse_header(body: bytes) -> list[tuple[int, int]]:
    """``(start, length)`` of every entry of a header's JSON, relative to the data section, sorted by start.

    Strict: every entry must have a known dtype, a shape of non-negative integers and offsets that agree with them.
    """
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise HeaderError(f"the header is not JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise HeaderError("the header is not a JSON object")
    spans = []
    for name, entry in doc.items():
        if name == METADATA_KEY:
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise HeaderError("its __metadata__ is not a map of strings")
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise HeaderError(f"entry {name[:60]!r} is not a tensor description")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_ITEMSIZE:
            raise HeaderError(f"entry {name[:60]!r} has unknown dtype {str(dtype)[:20]!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise HeaderError(f"entry {name[:60]!r} has a bad shape")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise HeaderError(f"entry {name[:60]!r} has bad data_offsets")
        if math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype] != offsets[1] - offsets[0]:
            raise HeaderError(f"entry {name[:60]!r}: its shape and dtype disagree with its size")
        spans.append((offsets[0], offsets[1] - offsets[0]))
    return sorted(spans)
