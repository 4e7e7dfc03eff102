"""Page-aligned host buffers and zero-copy views of their bytes."""

from __future__ import annotations

import ctypes
import mmap

import torch

ALIGN = 4096  # buffers start and end on page boundaries, as O_DIRECT I/O requires


def aligned_size(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def pinned_buffer(nbytes: int) -> torch.Tensor:
    """Page-locked (CUDA pinned) memory, page-aligned, every page touched."""
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=True)
    raw.zero_()  # touch every page now: a buffer first used by a later save would otherwise grow RSS then
    start = -raw.data_ptr() % ALIGN
    return raw[start:start + nbytes]


def mapped_buffer(nbytes: int, resident: bool = True) -> torch.Tensor:
    """A buffer in an anonymous mapping of its own: page-aligned, unmapped as soon as it is dropped.

    Through malloc, buffers under glibc's mmap threshold (which rises to the largest block freed) came from heap
    arenas that kept their pages after the pool evicted them, so RSS crept up whenever chunk sizes changed.
    ``resident`` faults every page in now (staging buffers, so later saves allocate nothing); without it pages
    arrive as they are first written, spread over the threads that write them (buffers a load reads into).
    """
    size = max(nbytes, ALIGN)  # mmap refuses empty mappings
    populate = getattr(mmap, "MAP_POPULATE", 0) if resident else 0
    if hasattr(mmap, "MAP_ANONYMOUS"):
        region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
    else:
        region = mmap.mmap(-1, size)
    buf = torch.frombuffer(region, dtype=torch.uint8)[:nbytes]  # the tensor keeps the mapping alive
    if resident and not populate:
        buf.zero_()
    return buf


def as_memoryview(t: torch.Tensor) -> memoryview:
    """Writable memoryview over a contiguous uint8 host tensor; the view keeps the tensor alive."""
    n = t.numel()
    if n == 0:
        return memoryview(bytearray())
    array = (ctypes.c_ubyte * n).from_address(t.data_ptr())
    array.owner = t  # type: ignore[attr-defined]
    return memoryview(array).cast("B")


def alias(region: torch.Tensor) -> torch.Tensor:
    """A uint8 tensor over ``region``'s bytes with a storage of its own (no copy).

    Tensors cut from one big buffer otherwise share its storage, which serializers take for real sharing:
    ``torch.save`` writes the whole buffer and refuses differently-typed views of it, safetensors refuses it.
    """
    if not region.numel():
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(as_memoryview(region), dtype=torch.uint8)
