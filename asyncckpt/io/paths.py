"""The one rule for telling local paths from URLs."""

from __future__ import annotations

import os
from typing import Any

from ..errors import InvalidArgumentError

LOCAL_PREFIXES = ("file://", "local://")


def to_url(path: Any) -> str:
    """A user's path (``str`` or ``os.PathLike``) as text; anything else is refused."""
    try:
        url = os.fspath(path)
    except TypeError:
        raise InvalidArgumentError(f"a checkpoint path must be a str or os.PathLike, not {type(path).__name__}")\
            from None
    if not isinstance(url, str):
        raise InvalidArgumentError(f"a checkpoint path must be text, not {type(url).__name__} ({url!r}); decode it "
                                   "first (os.fsdecode)")
    if not url or "\0" in url:
        raise InvalidArgumentError(f"{url!r} is not a usable path")
    return url


def is_local(url: str) -> bool:
    """Local disk: a plain path or a ``file://`` / ``local://`` URL."""
    return "://" not in url or url.startswith(LOCAL_PREFIXES)


def protocol_of(url: str) -> str:
    """``file`` for local paths, otherwise the URL's scheme."""
    return "file" if is_local(url) else url.split("://", 1)[0]


def local_path(url: str) -> str:
    """The absolute filesystem path of a local path or ``file://`` URL."""
    for prefix in LOCAL_PREFIXES:
        url = url.removeprefix(prefix)
    return os.path.abspath(url)
