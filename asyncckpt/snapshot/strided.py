"""Row-major pieces of a strided tensor, without making it contiguous.

A non-contiguous tensor (a transpose, a slice with steps) is written in row-major order, chunk by chunk. Making
it contiguous first would hold a second copy of the whole tensor outside the host-memory budget; instead each
element range ``[a, b)`` of its row-major order splits into at most ``2 * ndim + 1`` strided views (a partial row,
whole rows, a partial row, recursively), which ``copy_`` reads in place.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

#: bytes a digest reads at once from a non-contiguous or device tensor (its temporary copy is at most this big)
DIGEST_PIECE = 16 << 20


def blocks(t: torch.Tensor, a: int, b: int) -> Iterator[torch.Tensor]:
    """Views of ``t`` whose row-major elements, one after the other, are elements ``[a, b)`` of ``t``'s."""
    if a >= b:
        return
    if t.dim() == 0 or (a == 0 and b == t.numel()):
        yield t
        return
    inner = t.numel() // t.shape[0]
    first, last = a // inner, b // inner
    if a % inner:  # the tail of a partial first row
        stop = min(b, (first + 1) * inner)
        yield from blocks(t[first], a - first * inner, stop - first * inner)
        first += 1
    if last > first:
        yield t[first:last]
    if b % inner and last >= first:  # the head of a partial last row
        yield from blocks(t[last], 0, b - last * inner)


def copy_range(dest: torch.Tensor, t: torch.Tensor, start: int, end: int, non_blocking: bool) -> None:
    """Copy bytes ``[start, end)`` of ``t``'s row-major image into ``dest`` (uint8, ``end - start`` bytes)."""
    size = t.element_size()
    a, b = -(-start // size), end // size  # the whole elements in the range
    if a > b:  # inside one element
        _element_bytes(dest, t, b, start - b * size, end - b * size, non_blocking)
        return
    head = a * size - start
    if head:
        _element_bytes(dest[:head], t, a - 1, size - head, size, non_blocking)
    pos = head
    if b > a:
        typed = dest[head:head + (b - a) * size]
        aligned = typed.storage_offset() % size == 0
        out = typed.view(t.dtype) if aligned else torch.empty(b - a, dtype=t.dtype, device=t.device)
        at = 0
        for block in blocks(t, a, b):
            n = block.numel()
            out[at:at + n].view(block.shape).copy_(block, non_blocking=non_blocking)
            at += n
        if not aligned:
            typed.copy_(out.view(torch.uint8), non_blocking=non_blocking)
        pos += (b - a) * size
    if end > b * size:  # the head of a partial last element
        _element_bytes(dest[pos:], t, b, 0, end - b * size, non_blocking)


def _element_bytes(dest: torch.Tensor, t: torch.Tensor, index: int, lo: int, hi: int, non_blocking: bool) -> None:
    """Bytes ``[lo, hi)`` of element ``index`` (row-major) of ``t``."""
    element = torch.empty(1, dtype=t.dtype, device=t.device)
    element.copy_(next(blocks(t, index, index + 1)).reshape(1))
    dest.copy_(element.view(torch.uint8)[lo:hi], non_blocking=non_blocking)


def pieces(t: torch.Tensor, piece_bytes: int = DIGEST_PIECE) -> Iterator[torch.Tensor]:
    """``t``'s row-major bytes as host uint8 tensors of at most about ``piece_bytes`` each (one temporary copy of
    that size at a time), for hashing a tensor that is not contiguous or not on the host."""
    if t.device.type == "cpu" and t.is_contiguous():
        yield t.as_strided((t.numel(),), (1,)).view(torch.uint8)
        return
    step = max(1, piece_bytes // max(1, t.element_size()))
    for a in range(0, t.numel(), step):
        b = min(t.numel(), a + step)
        out = torch.empty(b - a, dtype=t.dtype)
        at = 0
        for block in blocks(t, a, b):
            out[at:at + block.numel()].view(block.shape).copy_(block)
            at += block.numel()
        yield out.view(torch.uint8)
