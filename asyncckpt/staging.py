"""Reusable host staging buffers under a byte budget.

The snapshot stage copies device/host tensors into these buffers so that ``save`` can return while the bytes are
still being written.  Buffers are cached by size and handed out again, so a training loop that saves the same state
structure every N steps allocates them once; the sum of all buffers (cached or in use) never exceeds the budget, and
a request that does not fit waits until writes release memory (backpressure instead of growth).
"""

from __future__ import annotations

from collections import defaultdict

import anyio
import torch

from .errors import CheckpointError

ALIGN = 4096  # buffers start and end on page boundaries, as O_DIRECT writes require


def aligned_size(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class StagingPool:
    """Size-keyed cache of uint8 host tensors; all methods run on the engine's event loop."""

    def __init__(self, budget: int, pin_memory: bool | None = None) -> None:
        self.budget = budget
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._free: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._allocated = 0  # bytes held by the pool, free or in use
        self._in_use = 0
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
            if self._allocated + nbytes > self.budget:
                self._evict(self._allocated + nbytes - self.budget)
            if self._allocated + nbytes <= self.budget:
                raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=self.pin_memory)
                start = -raw.data_ptr() % ALIGN
                buf = raw[start:start + nbytes]
                self.allocations += 1
                self._allocated += nbytes
                self._in_use += nbytes
                return buf
            await self._changed.wait()

    def release(self, buf: torch.Tensor) -> None:
        nbytes = buf.numel()
        self._in_use -= nbytes
        self._free[nbytes].append(buf)
        self._changed.set()
        self._changed = anyio.Event()

    def _evict(self, need: int) -> None:
        """Drop cached free buffers (largest first) until ``need`` bytes are returned to the system."""
        for size in sorted(self._free, reverse=True):
            bufs = self._free[size]
            while bufs and need > 0:
                bufs.pop()
                self._allocated -= size
                need -= size
            if need <= 0:
                return

    def clear(self) -> None:
        """Return every free buffer to the system (on engine close)."""
        self._evict(self._allocated)
