"""Exceptions the engine raises on purpose.

Every error a user can act on derives from :class:`CheckpointError`, so one ``except`` clause is enough to catch
everything asyncckpt raises deliberately; the subclasses say what kind of action fits.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class: a checkpoint could not be saved, loaded, listed or removed."""


class CorruptCheckpointError(CheckpointError):
    """The checkpoint was committed but its bytes are damaged: checksum mismatch, truncated or missing shard,
    or a manifest that contradicts itself. Restore from another checkpoint (see :func:`asyncckpt.latest`)."""


class IncompleteCheckpointError(CheckpointError):
    """No committed checkpoint exists at the path: its save never finished (crash, failure, still running)."""


class UnsafeCheckpointError(CheckpointError):
    """Loading needs full unpickling, which can run code; refused unless ``weights_only=False`` is given."""
