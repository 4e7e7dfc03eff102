"""The structure encoding: how a state's containers and plain values are written in the manifest's ``tree``.

Leaves that JSON holds losslessly are written as themselves (null, true, 3, 2.5, "s"); everything else is a one-key
object whose key says what it is. JSON arrays and objects never appear bare, so decoding is unambiguous. Depth is
counted the same way when saving and loading (a container's items, a dict's keys and values and an OrderedDict's
``_metadata`` are one level below it), so whatever saves also loads.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import CorruptCheckpointError

MAX_DEPTH = 256
_HEX = re.compile(r"-?0x[0-9a-f]+")


def encode_float(x: float) -> Any:
    return x if math.isfinite(x) else {"float": repr(x)}


#: integers longer than this many bits are ``{"int": hex}`` nodes: JSON readers refuse decimal numbers of more
#: digits than Python's default conversion limit (4300), and a hex string converts in linear time at any length
JSON_INT_BITS = 4096


def encode_int(x: int) -> Any:
    return x if x.bit_length() <= JSON_INT_BITS else {"int": hex(x)}


def has_int_nodes(node: Any) -> bool:
    """Whether an encoded structure holds an ``{"int": …}`` node (a manifest with one needs version 4)."""
    todo = [node]  # iterative: a structure 256 levels deep is three times as many containers
    while todo:
        node = todo.pop()
        if isinstance(node, list):
            todo.extend(node)
        elif isinstance(node, dict):
            if "int" in node:
                return True
            todo.extend(node.values())
    return False


def encode_plain(value: Any, depth: int = 0) -> Any:
    """The encoding of a structure of plain values only (containers, numbers, strings, None), such as a DCP
    planner's data; anything else raises ``TypeError`` naming its type."""
    if depth > MAX_DEPTH:
        raise TypeError(f"it nests deeper than {MAX_DEPTH} levels")
    if value is None or type(value) in (bool, str):
        return value
    if type(value) is int:
        return encode_int(value)
    if type(value) is float:
        return encode_float(value)
    if type(value) in (dict, OrderedDict):
        pairs = [[encode_plain(k, depth + 1), encode_plain(v, depth + 1)] for k, v in value.items()]
        return {"dict" if type(value) is dict else "odict": pairs}
    if type(value) in (list, tuple):
        return {"list" if type(value) is list else "tuple": [encode_plain(v, depth + 1) for v in value]}
    raise TypeError(f"it holds a {type(value).__module__}.{type(value).__qualname__}")


def key_path(path: str, key: Any) -> str:
    """The dotted name of ``key`` under ``path``: the names used in shard headers, errors and the CLI."""
    part = key if isinstance(key, str) else f"<int of {key.bit_length()} bits>" if (
        type(key) is int and key.bit_length() > JSON_INT_BITS) else repr(key)
    return f"{path}.{part}" if path else part


def decode(node: Any, tensor: Callable[[int], Any], obj: Callable[[int], Any], depth: int = 0) -> Any:
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
    if kind == "int":
        if not isinstance(body, str) or _HEX.fullmatch(body) is None:
            raise CorruptCheckpointError(f"manifest int node has invalid value {str(body)[:40]!r}")
        return int(body, 16)
    if kind in ("tensor", "object"):
        if not isinstance(body, int) or isinstance(body, bool):
            raise CorruptCheckpointError(f"manifest {kind} reference is not an index")
        return tensor(body) if kind == "tensor" else obj(body)
    raise CorruptCheckpointError(f"manifest structure has unknown node kind {kind!r}")


@dataclass(frozen=True)
class Ref:
    """A tensor or pickled-object leaf of a manifest's structure, by index into its table."""

    kind: str  # "tensor" or "object"
    index: int

    def __repr__(self) -> str:
        return f"<{self.kind} {self.index}>"


def structure(tree: Any, tensors: int, objects: int) -> Any:
    """The saved structure with a `Ref` for each tensor and pickled object (out-of-range ones refused)."""
    def ref(kind: str, count: int) -> Callable[[int], Ref]:
        def make(i: int) -> Ref:
            if not 0 <= i < count:
                raise CorruptCheckpointError(f"the structure refers to {kind} {i}, which the manifest does not list")
            return Ref(kind, i)
        return make

    return decode(tree, ref("tensor", tensors), ref("object", objects))


def tensor_path(tree: Any, index: int) -> str | None:
    """The key path at which the encoded structure ``tree`` holds tensor ``index`` first, for errors about the
    tensor's record; None if it holds none (or cannot be decoded)."""
    try:
        found = decode(tree, lambda i: Ref("tensor", i), lambda i: Ref("object", i))
    except CorruptCheckpointError:
        return None
    return next((path or "<root>" for path, leaf in leaves(found) if leaf == Ref("tensor", index)), None)


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
