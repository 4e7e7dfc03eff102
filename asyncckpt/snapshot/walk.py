"""The state walk: encode a state's structure for the manifest and collect its tensors and other leaves.

Each value is handled by the preparer its type dispatches to: first by exact type (plain values, containers,
dense tensors), then by kind (modules and optimizers are saved as their ``state_dict()``); anything else is an
*object*, captured at call time (pickled with ``torch.save`` for the native format, deep-copied for a foreign
serializer). A type whose values need their own treatment gets its own entry in `EXACT` or `KINDS`.
"""

from __future__ import annotations

import copy
import io
import sys
from collections import OrderedDict
from typing import Any, Callable

import torch

from ..errors import CheckpointError
from ..format.manifest import MAX_DIMS, MAX_INDEX, shape_problem
from ..format.tree import MAX_DEPTH, encode_float, encode_int, key_path

Preparer = Callable[["Walker", Any, str, int], Any]


#: JSON bytes one encoded node takes at most, beside its text and digits (``{"tensor":123},``, brackets, a float)
NODE_JSON = 64


class Walker:
    """Encodes a state's structure and collects its leaves."""

    def __init__(self, pickle_objects: bool) -> None:
        self.pickle_objects = pickle_objects
        self.views: list[tuple[torch.Tensor, str]] = []  # unique tensor views, with the first path naming each
        self.keys: list[tuple[Any, ...]] = []  # where each view's bytes are and how it sees them
        self.view_index: dict[tuple[Any, ...], int] = {}
        self.objects: list[tuple[Any, str, str]] = []  # payload, path, type name
        self.json_bound = 0  # bytes the encoded structure can take as JSON at most (long text and ints counted)
        self._active: set[int] = set()

    def walk(self, value: Any, path: str = "", depth: int = 0) -> Any:
        self.json_bound += NODE_JSON
        if depth > MAX_DEPTH:
            raise CheckpointError(f"the state nests deeper than {MAX_DEPTH} levels at {path or '<root>'}; "
                                  "flatten it (checkpoints this deep could not be loaded)")
        prepare = EXACT.get(type(value))
        if prepare is None:
            prepare = next((p for kind, p in KINDS if isinstance(value, kind)), object_leaf)
        return prepare(self, value, path, depth)

    def add_tensor(self, t: torch.Tensor, path: str) -> int:
        if t.is_meta:
            raise CheckpointError(f"tensor at {path or '<root>'} is on the meta device and has no data to save; "
                                  "materialise it (e.g. module.to_empty + init) before saving")
        shape, nbytes = t.shape, t.nbytes  # a torch.Size: a tuple, compared and hashed as one
        if len(shape) > MAX_DIMS or nbytes >= MAX_INDEX or (not nbytes and shape and max(shape) >= MAX_INDEX):
            raise CheckpointError(f"cannot save the tensor at {path or '<root>'}: "
                                  f"{shape_problem(shape, t.element_size())}")
        key: tuple[Any, ...]
        if nbytes and not t.is_xla:
            st = t.untyped_storage()
            key = (t.device, st.data_ptr(), st.nbytes(), t.storage_offset(), shape, t.stride(), t.dtype,
                   t.is_conj(), t.is_neg())  # z and z.conj() share every byte but not their values
        else:  # no addressable bytes (none at all, or XLA's, which expose no data pointer): distinct, keyed by its
            # object, with what its record says of it (a reused plan must not keep a stale dtype or shape)
            key = (None, id(t), shape, t.dtype, t.device)
        views = self.views
        index = self.view_index.setdefault(key, len(views))
        if index == len(views):
            views.append((t, path))
            self.keys.append(key)
        return index

    def add_object(self, obj: Any, path: str) -> int:
        type_name = f"{type(obj).__module__}.{type(obj).__qualname__}"
        if self.pickle_objects:
            buf = io.BytesIO()
            try:
                torch.save(obj, buf)
            except Exception as exc:
                raise CheckpointError(
                    f"cannot save the {type_name} at {path or '<root>'}: it is not picklable ({exc}); convert it to "
                    "plain data or a tensor first") from exc
            self.objects.append((buf.getbuffer(), path, type_name))  # the pickle's own bytes: no second copy
        else:
            self.objects.append((copy.deepcopy(obj), path, ""))
        return len(self.objects) - 1

    def enter(self, value: Any, path: str) -> None:
        if id(value) in self._active:
            raise CheckpointError(f"the state refers to itself at {path or '<root>'}; cyclic states cannot be saved")
        self._active.add(id(value))

    def leave(self, value: Any) -> None:
        self._active.discard(id(value))


# ---------------------------------------------------------------- preparers

def plain(w: Walker, value: Any, path: str, depth: int) -> Any:
    if type(value) is str:
        w.json_bound += 12 * len(value)  # JSON escapes a character in at most 12 bytes (past U+FFFF, two escapes)
    return value


def integer(w: Walker, value: int, path: str, depth: int) -> Any:
    w.json_bound += value.bit_length() // 2  # decimal digits (or hex ones, past 4096 bits): fewer than bits / 3
    return encode_int(value)  # a huge one as a hex string: never pickled (weights-only loading refuses those)


def floating(w: Walker, value: float, path: str, depth: int) -> Any:
    return encode_float(value)


def tensor(w: Walker, value: torch.Tensor, path: str, depth: int) -> Any:
    if value.layout is torch.strided and not value.is_quantized and not value.is_nested:
        return {"tensor": w.add_tensor(value, path)}
    return object_leaf(w, value, path, depth)


def sequence(w: Walker, value: list[Any] | tuple[Any, ...], path: str, depth: int) -> Any:
    w.enter(value, path)
    try:
        items = []
        for i, v in enumerate(value):
            items.append(w.walk(v, f"{path}.{i}" if path else str(i), depth + 1))
        return {"list" if type(value) is list else "tuple": items}
    finally:
        w.leave(value)


def mapping(w: Walker, value: dict[Any, Any], path: str, depth: int) -> Any:
    w.enter(value, path)
    try:
        pairs = []
        walk, prefix, depth = w.walk, f"{path}." if path else "", depth + 1
        for k, v in value.items():
            if type(k) is str:
                w.json_bound += 12 * len(k) + NODE_JSON
                pairs.append([k, walk(v, prefix + k, depth)])
            else:
                key = walk(k, f"{path}.<key>", depth)
                pairs.append([key, walk(v, key_path(path, k), depth)])
        if type(value) is dict:
            return {"dict": pairs}
        node: dict[str, Any] = {"odict": pairs}
        metadata = getattr(value, "_metadata", None)  # state_dict() versions, read by load_state_dict
        if metadata is not None:
            node["metadata"] = w.walk(metadata, f"{path}._metadata", depth)
        return node
    finally:
        w.leave(value)


def stateful(w: Walker, value: torch.nn.Module | torch.optim.Optimizer, path: str, depth: int) -> Any:
    return w.walk(value.state_dict(), path, depth)


def object_leaf(w: Walker, value: Any, path: str, depth: int) -> Any:
    return {"object": w.add_object(value, path)}


#: tensor subclasses whose values live on many ranks, by the module that defines them (looked up only if loaded:
#: such a value cannot exist unless its module was imported, so the single-process path never imports them)
SHARDED = (("torch.distributed.tensor._api", "DTensor"), ("torch.distributed._shard.sharded_tensor.api",
                                                          "ShardedTensor"))


def sharded_kind(value: Any) -> str | None:
    """``"DTensor"`` or ``"ShardedTensor"`` if ``value`` is one, else None."""
    for module, name in SHARDED:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(value, cls):
            return name
    return None


def tensor_subclass(w: Walker, value: torch.Tensor, path: str, depth: int) -> Any:
    """A tensor subclass is an object (pickled), unless it is sharded across ranks: pickling a DTensor or a
    ShardedTensor would store one rank's piece bound to its mesh, silently. Those are refused."""
    kind = sharded_kind(value)
    if kind is not None:
        raise CheckpointError(
            f"the {kind} at {path or '<root>'} is sharded across ranks, and this engine saves one process's state; "
            "save distributed state with torch.distributed.checkpoint and asyncckpt.dcp.StorageWriter "
            "(dcp.save(state, storage_writer=StorageWriter(path)), see docs/distributed.md), or save its full value "
            f"({'dtensor.full_tensor()' if kind == 'DTensor' else 'gather it first'})")
    return object_leaf(w, value, path, depth)


#: preparers by exact type; subclasses (an ``Enum`` of ``str``, a tensor subclass) are not these types.
EXACT: dict[type, Preparer] = {
    type(None): plain, bool: plain, str: plain, int: integer, float: floating,
    torch.Tensor: tensor, torch.nn.Parameter: tensor,
    list: sequence, tuple: sequence, dict: mapping, OrderedDict: mapping,
}

#: preparers by kind, tried in order for types not in `EXACT`.
KINDS: list[tuple[type, Preparer]] = [(torch.nn.Module, stateful), (torch.optim.Optimizer, stateful),
                                      (torch.Tensor, tensor_subclass)]


def walk_state(state: Any, pickle_objects: bool) -> tuple[Any, Walker]:
    """The encoded structure of ``state`` and the walker holding its leaves."""
    walker = Walker(pickle_objects)
    try:
        tree = walker.walk(state)
    except RecursionError:
        raise CheckpointError(f"the state nests too deeply for Python to walk (at most {MAX_DEPTH} levels can be "
                              "saved); flatten it") from None
    return tree, walker
