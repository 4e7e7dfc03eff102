"""Reusable host staging buffers under a byte budget.

The snapshot stage copies device/host tensors into these buffers so that ``save`` can return while the bytes are
still being written.  Buffers are cached by size and handed out again, so a training loop that saves the same state
structure every N steps allocates them once; the sum of all buffers (cached or in use) never exceeds the budget, and
a request that does not fit waits until writes release memory (backpressure instead of growth).
"""

from __future__ import annotations

import mmap
from collections import defaultdict

import anyio
import torch

from .errors import CheckpointError

ALIGN = 4096  # buffers start and end on page boundaries, as O_DIRECT writes require


def aligned_size(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _pinned(nbytes: int) -> torch.Tensor:
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


class StagingPool:
    """Size-keyed cache of uint8 host tensors; all methods run on the engine's event loop."""

    def __init__(self, budget: int, pin_memory: bool | None = None) -> None:
        self.budget = budget
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._free: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._allocated = 0  # bytes held by the pool, free or in use
        self._in_use = 0
        self._held: dict[int, int] = defaultdict(int)  # buffers of each size the pool holds, free or in use
        self._changed = anyio.Event()
        self.allocations = 0  # how many buffers were ever allocated (tests check reuse with it)

    @property
    def allocated_bytes(self) -> int:
        return self._allocated

    @property
    def in_use_bytes(self) -> int:
        return self._in_use

    async def acquire(self, nbytes: int) -> torch.Tensor:
        """A page-aligned buffer of at least ``nbytes`` (rounded up to whole pages); waits while the budget is
        taken by buffers still being written."""
        nbytes = aligned_size(nbytes)
        if nbytes > self.budget:
            raise CheckpointError(
                f"a staging buffer of {nbytes} bytes exceeds the host-memory budget of {self.budget} bytes; "
                "raise host_memory_budget or lower chunk_bytes")
        while True:
            cached = self._free.get(nbytes)
            if cached:
                buf = cached.pop()
                self._in_use += nbytes
                return buf
            if self._allocate(nbytes):
                buf = self._free[nbytes].pop()
                self._in_use += nbytes
                return buf
            await self._changed.wait()

    def reserve(self, sizes: list[int]) -> None:
        """Hold one buffer per entry of ``sizes`` (as far as the budget allows) before a save starts.

        Saves of one state then find every buffer they need already there: the first save allocates them all and
        later ones allocate nothing, however their writes and copies happen to interleave.
        """
        want: dict[int, int] = defaultdict(int)
        for n in sizes:
            want[aligned_size(n)] += 1
        for size, count in want.items():
            for _ in range(count - self._held[size]):
                if not self._allocate(size):
                    return

    def _allocate(self, nbytes: int) -> bool:
        """Add a free buffer of ``nbytes`` (aligned) if the budget allows, dropping cached ones of other sizes."""
        if self._allocated + nbytes > self.budget:
            self._evict(self._allocated + nbytes - self.budget, keep=nbytes)
        if self._allocated + nbytes > self.budget:
            return False
        self._free[nbytes].append(_pinned(nbytes) if self.pin_memory else mapped_buffer(nbytes))
        self.allocations += 1
        self._allocated += nbytes
        self._held[nbytes] += 1
        return True

    def release(self, buf: torch.Tensor) -> None:
        nbytes = buf.numel()
        self._in_use -= nbytes
        self._free[nbytes].append(buf)
        self._changed.set()
        self._changed = anyio.Event()

    def _evict(self, need: int, keep: int = 0) -> None:
        """Drop cached free buffers (largest first, never of size ``keep``) until ``need`` bytes are returned."""
        for size in sorted(self._free, reverse=True):
            bufs = self._free[size]
            while bufs and need > 0 and size != keep:
                bufs.pop()
                self._allocated -= size
                self._held[size] -= 1
                need -= size
            if need <= 0:
                return

    def clear(self) -> None:
        """Return every free buffer to the system (on engine close)."""
        self._evict(self._allocated)
