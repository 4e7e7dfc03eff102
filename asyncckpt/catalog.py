"""Finding committed checkpoints under a directory or prefix (synchronous; safe to call from anywhere)."""

from __future__ import annotations

import os
import posixpath
from typing import Any

import fsspec

from .errors import CheckpointError
from .manifest import MANIFEST_NAME, parse


def committed(directory: Any, storage_options: dict[str, Any] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """``(path, manifest)`` of every committed checkpoint directly under ``directory``, oldest first.

    Directories without a valid manifest (saves that crashed or are still running, hidden directories, foreign
    data) are skipped, so they can never be mistaken for a checkpoint.
    """
    url = os.fspath(directory)
    try:
        options = {k: v for k, v in (storage_options or {}).items() if k != "retry"}  # the engine's S3 policy
        fs, root = fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        raise CheckpointError(f"{url}: the fsspec backend for it is not installed ({exc})") from exc
    fs.invalidate_cache(root)  # fsspec reuses instances and their listings: a cached one would hide new checkpoints
    try:
        entries = fs.ls(root, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in entries:
        name = posixpath.basename(str(entry["name"]).rstrip("/"))
        if entry.get("type") != "directory" or name.startswith("."):
            continue
        full = str(entry["name"]).rstrip("/")
        try:
            doc = parse(fs.cat_file(posixpath.join(full, MANIFEST_NAME)), full)
        except (FileNotFoundError, IsADirectoryError, CheckpointError):
            continue
        shown = f"{url.rstrip('/')}/{name}" if "://" in url else os.path.join(url, name)
        found.append((doc.get("created_ns", 0), name, shown, doc))
    found.sort(key=lambda x: (x[0], x[1]))
    return [(shown, doc) for _, _, shown, doc in found]


def latest(directory: Any, storage_options: dict[str, Any] | None = None) -> str | None:
    """The newest committed checkpoint directly under ``directory``, or None if there is none.

    Newest means the most recent snapshot (when ``save`` was called), not the last to finish writing.
    """
    found = committed(directory, storage_options)
    return found[-1][0] if found else None
