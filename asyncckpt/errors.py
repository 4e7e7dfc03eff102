"""Exceptions the engine raises on purpose.

Every error a user can act on derives from `CheckpointError`, so one ``except`` clause catches everything
asyncckpt raises deliberately; the subclasses say which action fits. Bad arguments raise
`InvalidArgumentError`, which is also a ``ValueError``.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class: a checkpoint could not be saved, loaded, listed or removed."""


class InvalidArgumentError(CheckpointError, ValueError):
    """An option or argument cannot work (a bad engine option, an unknown ``map_location``, a ``bytes`` path)."""


class CorruptCheckpointError(CheckpointError):
    """The checkpoint was committed but its bytes are damaged: checksum mismatch, truncated or missing shard,
    or a manifest that contradicts itself. Restore from another checkpoint (see `asyncckpt.latest`)."""


class NewerFormatError(CheckpointError):
    """The checkpoint was written in a format version this release does not read (a newer asyncckpt wrote it):
    upgrade asyncckpt to load it. Nothing is wrong with the checkpoint."""


class CheckpointReplacedError(CheckpointError):
    """The checkpoint was replaced by a newer save of the same path while it was being read (another process
    overwrote it); the data read was not used. Load again: the next attempt reads the newer checkpoint."""


class CheckpointNotFoundError(CheckpointError):
    """Nothing exists at the path (no directory, no object under the prefix): not a checkpoint that failed, none at
    all, as on a first run."""


class IncompleteCheckpointError(CheckpointError):
    """No committed checkpoint exists at the path: its save never finished (crash, failure, still running)."""


class UnsafeCheckpointError(CheckpointError):
    """Loading needs full unpickling, which can run code; refused unless ``weights_only=False`` is given."""


class BudgetExceededError(CheckpointError):
    """The state must be in staging memory whole at once (it is handed to another serializer, such as a Lightning
    base ``CheckpointIO``) and needs more than ``host_memory_budget``: ``needed`` and ``budget`` say by how much.

    Args:
        message: what happened, and what to change.
        needed: bytes of staging memory the state needs at once.
        budget: bytes the engine's ``host_memory_budget`` allows.
    """

    def __init__(self, message: str, *, needed: int = 0, budget: int = 0) -> None:
        super().__init__(message)
        self.needed, self.budget = needed, budget


class StorageError(CheckpointError):
    """A storage operation failed for good. ``operation`` and ``code`` (the store's own error code, when it gave
    one) say which; ``attempts`` says how often it was tried.

    Args:
        message: what failed, naming the path.
        operation: the store's API call that failed (such as ``"put_object"``), when known.
        code: the store's error code (such as ``"AccessDenied"``), when it gave one.
        attempts: how many times the operation was tried, retries included, when known.
    """

    def __init__(self, message: str, *, operation: str | None = None, code: str | None = None,
                 attempts: int | None = None) -> None:
        super().__init__(message)
        self.operation, self.code, self.attempts = operation, code, attempts


class StorageTimeoutError(StorageError):
    """A storage operation made no progress within the engine's ``io_timeout``: the store is hung or unreachable.
    ``operation`` and ``path`` say which; the save or load it belonged to failed, committed checkpoints are
    untouched. Its ``code`` is ``"Timeout"``.

    Args:
        message: what timed out, and after how many seconds.
        operation: the storage operation that made no progress (such as ``"open for writing"`` or
            ``"atomic write"``).
        path: the file or directory it was working on.
    """

    def __init__(self, message: str, *, operation: str | None = None, path: str | None = None) -> None:
        super().__init__(message, operation=operation, code="Timeout")
        self.path = path


class S3Error(StorageError):
    """An S3 request failed for good: a permanent error (credentials, permissions, missing bucket…) or a transient
    one that outlasted the retry policy. ``bucket``, ``key``, ``operation``, ``code`` and ``attempts`` say which.

    Args:
        message: what failed, naming the object.
        bucket: the S3 bucket.
        key: the object's key in ``bucket``.
        operation: the S3 API call, as boto names it (such as ``"put_object"`` or ``"upload_part"``).
        code: S3's error code (such as ``"AccessDenied"``, ``"NoSuchBucket"``, ``"SlowDown"``).
        attempts: how many times the request was tried, retries included.
    """

    def __init__(self, message: str, *, bucket: str | None = None, key: str | None = None,
                 operation: str | None = None, code: str | None = None, attempts: int | None = None) -> None:
        super().__init__(message, operation=operation, code=code, attempts=attempts)
        self.bucket, self.key = bucket, key


def restate(error: BaseException, message: str) -> CheckpointError:
    """``error`` told again with ``message`` (which names the operation and the path), the original as its cause.

    A `CheckpointError` keeps its type and attributes, so ``except S3Error`` and ``exc.code`` still work;
    its constructor is not called again (subclasses may take other arguments). Anything else becomes a plain
    ``CheckpointError``.
    """
    restated: CheckpointError | None = None
    if isinstance(error, CheckpointError):
        try:
            restated = BaseException.__new__(type(error))
            restated.args = (message,)
            restated.__dict__.update(error.__dict__)
        except Exception:  # an exotic subclass that cannot be built this way: the base class still carries it
            restated = None
    if restated is None:
        restated = CheckpointError(message)
    restated.__cause__ = error
    return restated
