"""Engine options, validated in one place for both engines and the Lightning plugins, and the retry policy."""

from __future__ import annotations

import dataclasses
import difflib
import os
import random
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import InvalidArgumentError

MiB = 1 << 20
PAGE = 4096
SNAPSHOT_MODES = ("eager", "deferred")

#: seconds one storage operation may take unless the caller says otherwise: long enough for a 32 MiB chunk over a
#: link of 60 KB/s (a whole shard, on stores written in one request), short enough that a hung mount or endpoint
#: fails the save instead of blocking it forever
IO_TIMEOUT = 600.0


def default_budget() -> int:
    """A quarter of physical memory, capped at 16 GiB: room for a few in-flight copies of a large state."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return min(total // 4, 16 << 30)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class EngineOptions:
    """Options of `CheckpointEngine` and `SyncEngine` (keyword arguments).

    Args:
        write_concurrency: I/O operations in flight at once (worker threads for blocking I/O, requests for async
            stores), shared by every save and load of the engine.
        host_memory_budget: bytes of host staging memory; saves beyond it wait (backpressure) and a state larger
            than it streams through. ``None``: a quarter of RAM, at most 16 GiB.
        shard_bytes: target size of one shard file, in bytes. ``None``: the target's choice — 512 MiB on local disk
            and other filesystems, one chunk on object stores (S3, GCS, Azure), where each shard is then a single
            upload request.
        chunk_bytes: unit of staging, writing and checksumming (and multipart part size on object stores), in
            bytes; a positive multiple of 4096.
        fsync: make files and directories durable before a save counts as committed.
        verify: check checksums when loading.
        storage_options: passed to fsspec for URL targets (``s3://…``); ignored for local paths.
        snapshot: ``"eager"``: ``save`` returns once every byte is copied. ``"deferred"``: it returns after planning
            and the copy runs on a thread of the engine's while the caller computes; optimizer steps wait for it,
            and tensors changed in place before their bytes were copied fail the save (see docs/concepts.md).
        overlap_writes: start writing a save's chunks while its snapshot is still copying. The checkpoint is durable
            sooner, but the copy then shares cores and memory bandwidth with the writes and blocks the caller longer.
            Off by default: writes (and the save's storage set-up) wait for the copy, unless the copy itself waits
            for memory that only writes free.
        io_timeout: seconds one storage operation (a chunk written or read, a listing, a commit) may take before
            the save or load it belongs to fails with `StorageTimeoutError` naming the operation
            and path; committed checkpoints stay. Default 600 (ten minutes). ``None``: no limit (a hung store or
            NFS mount then blocks the save, and closing the engine, forever).

    Raises:
        InvalidArgumentError: an option is out of range or of the wrong type (a count or size below 1, a
            ``chunk_bytes`` that is not a multiple of 4096 or exceeds ``host_memory_budget``, an unknown
            ``snapshot`` mode, a non-positive ``io_timeout``, ``storage_options`` that is not a dict).
    """

    write_concurrency: int = 8
    host_memory_budget: int | None = None
    shard_bytes: int | None = None
    chunk_bytes: int = 32 * MiB
    fsync: bool = True
    verify: bool = True
    storage_options: Mapping[str, Any] | None = field(default=None, hash=False)
    snapshot: str = "eager"
    overlap_writes: bool = False
    io_timeout: float | None = IO_TIMEOUT

    def __post_init__(self) -> None:
        for name in ("write_concurrency", "shard_bytes", "chunk_bytes"):
            value = getattr(self, name)
            if (value is not None or name != "shard_bytes") and (not _is_int(value) or value < 1):
                raise InvalidArgumentError(f"{name} must be a positive integer{' or None' * (name == 'shard_bytes')}, "
                                           f"not {value!r}")
        if self.chunk_bytes % PAGE:
            raise InvalidArgumentError(f"chunk_bytes must be a multiple of {PAGE}, not {self.chunk_bytes}")
        if self.host_memory_budget is not None:
            if not _is_int(self.host_memory_budget) or self.host_memory_budget < 1:
                raise InvalidArgumentError(
                    f"host_memory_budget must be a positive number of bytes or None, not {self.host_memory_budget!r}")
        if self.budget < self.chunk_bytes:
            raise InvalidArgumentError(
                f"host_memory_budget ({self.budget}) must hold at least one chunk ({self.chunk_bytes} bytes); raise "
                "it or lower chunk_bytes")
        for name in ("fsync", "verify", "overlap_writes"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgumentError(f"{name} must be True or False, not {getattr(self, name)!r}")
        if self.snapshot not in SNAPSHOT_MODES:
            raise InvalidArgumentError(f"snapshot must be one of {', '.join(SNAPSHOT_MODES)}, not {self.snapshot!r}")
        if self.io_timeout is not None and (isinstance(self.io_timeout, bool)
                                            or not isinstance(self.io_timeout, (int, float))
                                            or not 0 < self.io_timeout < float("inf")):
            raise InvalidArgumentError(f"io_timeout must be a positive number of seconds or None, not "
                                       f"{self.io_timeout!r}")
        if self.storage_options is not None and not isinstance(self.storage_options, Mapping):
            raise InvalidArgumentError(f"storage_options must be a dict or None, not {self.storage_options!r}")

    @property
    def file_shard_bytes(self) -> int:
        """``shard_bytes``, or the default for filesystems (512 MiB) when it is left to the target."""
        return 512 * MiB if self.shard_bytes is None else self.shard_bytes

    @property
    def budget(self) -> int:
        """The staging budget in bytes, the default resolved."""
        return default_budget() if self.host_memory_budget is None else self.host_memory_budget

    @classmethod
    def from_kwargs(cls, options: Mapping[str, Any]) -> "EngineOptions":
        """Options from keyword arguments; an unknown name is an error that suggests the closest known one.

        Args:
            options: option names and values, as the engines take them as keywords.

        Returns:
            The validated options.

        Raises:
            InvalidArgumentError: an unknown option name (the message suggests the closest one), or a value out of
                range.
        """
        known = [f.name for f in dataclasses.fields(cls)]
        for name in options:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; the options are: {', '.join(known)}"
                raise InvalidArgumentError(f"unknown engine option {name!r}{hint}")
        return cls(**options)


@dataclass(frozen=True)
class RetryPolicy:
    """How transient storage failures are retried.

    Args:
        attempts: tries per request, the first included (1 disables retrying).
        base_delay: seconds; the sleep before retry ``i`` (from 0) is uniform in ``[0, min(max_delay,
            base_delay * 2**i)]`` ("full jitter", so many clients throttled together spread out).
        max_delay: cap of one sleep, in seconds.

    The defaults (10 attempts, 0.2 s, 20 s) ride out about a minute of throttling or an endpoint restart; the
    worst case sleeps ``sum(min(max_delay, base_delay * 2**i) for i in range(attempts - 1))`` seconds (~72 s), half
    that on average. Pass one as ``storage_options={"retry": RetryPolicy(...)}`` (a dict of the same fields works).

    Raises:
        InvalidArgumentError: ``attempts`` is below 1 or a delay is negative.

    Example:
        ```python
        engine = asyncckpt.SyncEngine(storage_options={"retry": asyncckpt.RetryPolicy(attempts=5, max_delay=5.0)})
        ```
    """

    attempts: int = 10
    base_delay: float = 0.2
    max_delay: float = 20.0

    def __post_init__(self) -> None:
        if not _is_int(self.attempts) or self.attempts < 1 or self.base_delay < 0 or self.max_delay < 0:
            raise InvalidArgumentError("RetryPolicy needs attempts >= 1 and non-negative delays")

    def delay(self, retry: int) -> float:
        """How long to sleep before a retry, drawn at random ("full jitter").

        Args:
            retry: the retry's number, from 0 (the first retry, after the first failed attempt).

        Returns:
            Seconds, uniform in ``[0, min(max_delay, base_delay * 2**retry)]``.
        """
        return random.uniform(0.0, min(self.max_delay, self.base_delay * (2 ** retry)))

    def for_cleanup(self) -> "RetryPolicy":
        """This policy cut to 4 attempts and 2 s sleeps: clean-up after a failed save must not outlast it.

        Returns:
            A new policy: at most 4 attempts, the same ``base_delay``, sleeps of at most 2 seconds.
        """
        return RetryPolicy(attempts=min(self.attempts, 4), base_delay=self.base_delay,
                           max_delay=min(self.max_delay, 2.0))

    @classmethod
    def coerce(cls, value: Any) -> "RetryPolicy":
        """A policy from ``storage_options["retry"]``: None (the defaults), a policy, or a dict of its fields.

        Args:
            value: None, a `RetryPolicy`, or a dict of its fields.

        Returns:
            The policy (``value`` itself when it is one).

        Raises:
            InvalidArgumentError: ``value`` is of another type, or a dict with unknown fields or bad values.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            try:
                return cls(**value)
            except TypeError as exc:
                raise InvalidArgumentError(f"storage_options['retry']: {exc}") from None
        raise InvalidArgumentError(f"storage_options['retry'] must be a RetryPolicy or a dict of its fields, "
                                   f"not {value!r}")
