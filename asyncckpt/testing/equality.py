"""Bit-exact structural equality of training states."""

from __future__ import annotations

import math
import struct
from typing import Any

import torch


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` in row-major order (exotic dtypes have no copy kernel: contiguous ones are viewed)."""
    t = t.detach().cpu()
    if not t.is_contiguous():
        dense = torch.empty(t.shape, dtype=t.dtype)
        dense.copy_(t)
        t = dense
    return t.as_strided((t.numel(),), (1,)).view(torch.uint8)  # reshape keeps odd strides of size-1 dims


def assert_same(a: Any, b: Any, where: str = "<root>", *, grad: bool = True) -> None:
    """Assert deep equality: container types, key types and order, bit-exact tensors (dtype, shape, every byte,
    NaN payloads included) and, with ``grad``, ``requires_grad``. The message names the first place that differs."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, \
            f"{where}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"
        assert not grad or a.requires_grad == b.requires_grad, f"{where}: requires_grad differs"
        if a.numel():
            assert torch.equal(_bytes_of(a), _bytes_of(b)), f"{where}: values differ"
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{where}: keys {list(a)[:5]} != {list(b)[:5]}"
        for (ka, va), kb in zip(a.items(), b.keys()):
            assert type(ka) is type(kb), f"{where}: key {ka!r} type differs"
            assert_same(va, b[kb], f"{where}.{ka}", grad=grad)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length differs"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}.{i}", grad=grad)
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b)), \
            f"{where}: {a!r} != {b!r}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def same(a: Any, b: Any) -> bool:
    """`assert_same` as a predicate (``requires_grad`` not compared)."""
    try:
        assert_same(a, b, grad=False)
    except AssertionError:
        return False
    return True
