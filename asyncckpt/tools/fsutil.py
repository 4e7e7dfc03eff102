"""File-system helpers for measurements: make files durable, evict them from the page cache, sum their sizes and
remove them (local paths only)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def files_under(path: str | os.PathLike[str]) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(q for q in p.rglob("*") if q.is_file())
    return []


def bytes_on_disk(path: str | os.PathLike[str]) -> int:
    return sum(q.stat().st_size for q in files_under(path))


def fsync_dir(d: Path) -> None:
    """fsync a directory, best effort."""
    try:
        fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike[str]) -> int:
    """fsync every file under ``path`` (a file or a directory), then the directories holding them.

    Applied to every contender after it reports completion, so that all are compared at the same
    durability; for a contender that already fsynced, this costs next to nothing.
    Returns the number of files synced.
    """
    files = files_under(path)
    dirs = {Path(path).parent}
    for q in files:
        fd = os.open(q, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dirs.add(q.parent)
    for d in sorted(dirs, key=lambda x: len(x.parts), reverse=True):
        fsync_dir(d)
    return len(files)


def evict(path: str | os.PathLike[str], drop_caches: bool = False) -> str:
    """Push the files under ``path`` out of the page cache; return how it was done.

    Default: ``posix_fadvise(DONTNEED)`` on each (already durable, hence clean) file, which touches
    nothing but our files. With ``drop_caches=True`` and a writable ``/proc/sys/vm/drop_caches``
    the whole page cache is dropped instead (affects every process on the machine).
    """
    files = files_under(path)
    if drop_caches:
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
            return "drop_caches"
        except OSError:
            pass
    if not hasattr(os, "posix_fadvise"):
        return "none (no posix_fadvise)"
    for q in files:
        fd = os.open(q, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise(DONTNEED)"


def remove(path: str | os.PathLike[str]) -> None:
    p = Path(path)
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        try:
            p.unlink()
        except OSError:
            pass
