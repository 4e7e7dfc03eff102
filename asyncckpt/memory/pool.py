"""Reusable host staging buffers under a byte budget.

The snapshot copies tensors into these buffers so that ``save`` can return while the bytes are still being
written. Buffers are cached by size and handed out again, so a training loop that saves the same state structure
every N steps allocates them once; the sum of all buffers (cached or in use) never exceeds the budget, and a
request that does not fit waits until writes release memory (backpressure instead of growth).

Thread safety: `try_acquire`, `reserve` and `clear` may be called from any thread (the snapshot
runs on the caller's); `acquire` and `release` run on the engine's event loop, where waiting happens.
"""

from __future__ import annotations

import threading
from collections import defaultdict

import anyio
import torch

from ..errors import CheckpointError
from .buffers import aligned_size, mapped_buffer, pinned_buffer


class StagingPool:
    """Size-keyed cache of page-aligned uint8 host tensors, at most ``budget`` bytes in all."""

    def __init__(self, budget: int, pin_memory: bool | None = None) -> None:
        self.budget = budget
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._lock = threading.Lock()
        self._free: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._allocated = 0  # bytes held by the pool, free, in use, or being allocated
        self._in_use = 0
        self._held: dict[int, int] = defaultdict(int)  # buffers of each size the pool holds, free or in use
        self._changed: anyio.Event | None = None
        self.allocations = 0  # how many buffers were ever allocated (tests check reuse with it)

    @property
    def allocated_bytes(self) -> int:
        return self._allocated

    @property
    def in_use_bytes(self) -> int:
        return self._in_use

    def _check(self, nbytes: int) -> int:
        size = aligned_size(nbytes)
        if size > self.budget:
            raise CheckpointError(
                f"a staging buffer of {size} bytes exceeds the host-memory budget of {self.budget} bytes; "
                "raise host_memory_budget or lower chunk_bytes")
        return size

    def _new(self, size: int) -> torch.Tensor:
        """Allocate a buffer whose bytes are already counted in ``_allocated`` (outside the lock: it may be slow)."""
        try:
            with torch.inference_mode(False):  # a save made under inference mode must not leave the pool buffers
                # that later saves cannot write (inference tensors take no in-place update outside that mode)
                buf = pinned_buffer(size) if self.pin_memory else mapped_buffer(size)
        except BaseException:
            with self._lock:
                self._allocated -= size
                self._held[size] -= 1
            raise
        with self._lock:
            self.allocations += 1
        return buf

    def _make_room(self, size: int) -> list[torch.Tensor]:
        """Under the lock: count ``size`` more bytes if the budget allows, evicting cached buffers of other sizes.
        Returns the evicted buffers (dropped by the caller, outside the lock); raises nothing."""
        dropped: list[torch.Tensor] = []
        need = self._allocated + size - self.budget
        if need > 0:
            for other in sorted(self._free, reverse=True):
                bufs = self._free[other]
                while bufs and need > 0 and other != size:
                    dropped.append(bufs.pop())
                    self._allocated -= other
                    self._held[other] -= 1
                    need -= other
        return dropped

    def try_acquire(self, nbytes: int) -> torch.Tensor | None:
        """A buffer of at least ``nbytes`` (rounded up to whole pages) if one is free or fits; never waits."""
        size = self._check(nbytes)
        with self._lock:
            cached = self._free.get(size)
            if cached:
                self._in_use += size
                return cached.pop()
            dropped = self._make_room(size)
            if self._allocated + size > self.budget:
                return None
            self._allocated += size
            self._held[size] += 1
            self._in_use += size
        del dropped
        try:
            return self._new(size)
        except BaseException:
            with self._lock:
                self._in_use -= size
            raise

    async def acquire(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least ``nbytes``; waits while the budget is taken by buffers still being written."""
        while True:
            if self._changed is None:
                self._changed = anyio.Event()
            changed = self._changed
            buf = self.try_acquire(nbytes)
            if buf is not None:
                return buf
            await changed.wait()

    def release(self, buf: torch.Tensor) -> None:
        """Return a buffer (on the engine's loop); waiters for memory try again."""
        self._give_back(buf, keep=True)

    def retire(self, buf: torch.Tensor) -> None:
        """Return a buffer that must never be handed out again (a read given up on as hung may still fill it):
        the pool forgets it, and its memory goes when the last reference does."""
        self._give_back(buf, keep=False)

    def _give_back(self, buf: torch.Tensor, keep: bool) -> None:
        size = buf.numel()
        with self._lock:
            self._in_use -= size
            if keep:
                self._free[size].append(buf)
            else:
                self._allocated -= size
                self._held[size] -= 1
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    def give_away(self, buf: torch.Tensor) -> None:
        """Stop counting an in-use buffer (on the engine's loop): someone else keeps it, so it is never handed out
        again; its memory goes back to the system when the last reference to it is dropped. Waiters try again."""
        size = buf.numel()
        with self._lock:
            self._in_use -= size
            self._allocated -= size
            self._held[size] -= 1
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

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
                with self._lock:
                    dropped = self._make_room(size)
                    if self._allocated + size > self.budget:
                        return
                    self._allocated += size
                    self._held[size] += 1
                del dropped
                buf = self._new(size)
                with self._lock:
                    self._free[size].append(buf)

    def clear(self) -> None:
        """Return every free buffer to the system (on engine close)."""
        with self._lock:
            dropped = []
            for size, bufs in self._free.items():
                while bufs:
                    dropped.append(bufs.pop())
                    self._allocated -= size
                    self._held[size] -= 1
        del dropped
