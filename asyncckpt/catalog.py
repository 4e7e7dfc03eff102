"""Finding committed checkpoints under a directory or prefix, from plain synchronous code.

Each call runs a short-lived engine, so listings go through the same storage backends as saves and loads (S3's
retry policy included). Inside an engine, ``await engine.latest(directory)`` avoids starting another one.
"""

from __future__ import annotations

from typing import Any, Mapping

from .format.manifest import AnyManifest
from .sync_engine import SyncEngine


def committed(directory: Any, storage_options: Mapping[str, Any] | None = None) -> list[tuple[str, AnyManifest]]:
    """``(path, manifest)`` of every committed checkpoint directly under ``directory``, oldest snapshot first.

    Directories without a valid manifest (saves that crashed or are still running, hidden directories, foreign
    data, special files) are skipped, so they can never be mistaken for a checkpoint.

    Args:
        directory: the directory or URL prefix (``s3://bucket/run``) holding checkpoints.
        storage_options: fsspec options for a URL target (credentials, endpoint, ``retry``).

    Returns:
        ``(path, manifest)`` pairs, ordered by when each save was called; a manifest is a
            `Manifest`, or a `GlobalManifest` for a multi-rank checkpoint. Its
            ``metadata`` holds what the save was given (a `CheckpointManager`'s step and metrics).

    Raises:
        InvalidArgumentError: ``directory`` is not a usable path, or ``storage_options`` is not a dict.
        CheckpointError: the listing, or reading a manifest, failed on an object store (such as `S3Error`).
        OSError: a filesystem refused the listing (such as permission denied); a missing directory lists as empty.

    Example:
        ```python
        for path, manifest in asyncckpt.committed("ckpts"):
            print(path, manifest.total_bytes, manifest.metadata)
        ```
    """
    with SyncEngine(storage_options=storage_options) as engine:
        core = engine.core
        return core.runtime.call(core.committed, core.target(directory, None))


def latest(directory: Any, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The newest committed checkpoint directly under ``directory``, or None if there is none.

    Newest means the most recent snapshot (when ``save`` was called), not the last to finish writing.

    Args:
        directory: the directory or URL prefix (``s3://bucket/run``) holding checkpoints.
        storage_options: fsspec options for a URL target (credentials, endpoint, ``retry``).

    Returns:
        Its path (a URL for URL targets), or None.

    Raises:
        InvalidArgumentError: ``directory`` is not a usable path, or ``storage_options`` is not a dict.
        CheckpointError: the listing, or reading a manifest, failed on an object store (such as `S3Error`).
        OSError: a filesystem refused the listing (such as permission denied); a missing directory lists as empty.

    Example:
        ```python
        path = asyncckpt.latest("ckpts")
        if path is not None:
            with asyncckpt.SyncEngine() as engine:
                engine.load(path, state=state)
        ```
    """
    found = committed(directory, storage_options)
    return found[-1][0] if found else None
