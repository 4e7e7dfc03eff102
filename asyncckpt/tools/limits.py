"""Physical limits of a machine and a local target directory, measured the way the engine's figures are.

* copy floor: copy every tensor of the state into host buffers that were allocated (and touched)
  beforehand; the least work any point-in-time snapshot has to do.
* raw write: the same byte count written with ``os.pwrite`` from page-aligned (mmap) buffers by
  1..N threads, each to its own file, with ``O_DIRECT`` where the file system takes it (buffered
  otherwise, and the result says so), then ``fsync``; the best thread count wins.
* raw read: those bytes read back with ``os.preadv`` by 1..N threads, once with ``O_DIRECT`` and
  once buffered from a cold cache; the best wins and the result says which.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import fsutil

ALIGN = 4096


def _align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def copy_floor(tensors: list[torch.Tensor], repeats: int = 5) -> dict[str, Any]:
    """Best time to copy ``tensors`` into preallocated, already-faulted host buffers.

    Tried with torch's default intra-op thread count and with one thread (on a busy machine a
    parallel copy waits for its slowest thread); the fastest of ``repeats`` tries per setting
    is the floor.
    """
    bufs = [torch.empty_like(t) for t in tensors]
    for b in bufs:  # fault the pages in so the timing is the copy only
        b.zero_()
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    default_threads = torch.get_num_threads()
    per_threads: dict[str, list[float]] = {}
    try:
        with torch.no_grad():
            for n in sorted({default_threads, 1}, reverse=True):
                torch.set_num_threads(n)
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    for b, t in zip(bufs, tensors):
                        b.copy_(t)
                    times.append(time.perf_counter() - t0)
                per_threads[str(n)] = times
    finally:
        torch.set_num_threads(default_threads)
    del bufs
    best_n, best = min(((n, min(ts)) for n, ts in per_threads.items()), key=lambda x: x[1])
    return {"seconds": best, "bytes": nbytes, "gbps": nbytes / best / 1e9,
            "torch_threads": int(best_n), "all_seconds": per_threads}


def _run_threads(n: int, fn: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def wrap(i: int) -> None:
        try:
            fn(i)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    ths = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    if errors:
        raise errors[0]


def _probe_odirect(directory: Path) -> bool:
    if not hasattr(os, "O_DIRECT"):
        return False
    p = directory / ".odirect-probe"
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError:
        return False
    buf = mmap.mmap(-1, ALIGN)
    try:
        os.pwrite(fd, buf, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        buf.close()
        fsutil.remove(p)


def raw_write(directory: Path, nbytes: int, threads: list[int], chunk: int = 8 << 20,
              keep_last: bool = True) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    direct = _probe_odirect(directory)
    chunk = _align_up(chunk)
    total = _align_up(nbytes)
    pattern = os.urandom(chunk)
    per_threads: dict[int, float] = {}
    last_files: list[Path] = []
    for t in threads:
        per = _align_up(-(-total // t))
        sizes = [max(0, min(per, total - i * per)) for i in range(t)]
        files = [directory / f"raw-{t}-{i}.bin" for i in range(t)]
        for f in files:
            fsutil.remove(f)
        bufs = []
        for _ in range(t):
            m = mmap.mmap(-1, chunk)
            m.write(pattern)
            bufs.append(m)

        def work(i: int) -> None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
            fd = os.open(files[i], flags, 0o644)
            try:
                view = memoryview(bufs[i])
                off, size = 0, sizes[i]
                while off < size:
                    n = min(chunk, size - off)
                    w = os.pwrite(fd, view[:n], off)
                    if w <= 0:
                        raise OSError(errno.EIO, "short write")
                    off += w
                view.release()
                os.fsync(fd)
            finally:
                os.close(fd)

        t0 = time.perf_counter()
        _run_threads(t, work)
        fsutil.fsync_dir(directory)
        per_threads[t] = time.perf_counter() - t0
        for m in bufs:
            m.close()
        if keep_last and t == threads[-1]:
            last_files = files
        else:
            for f in files:
                fsutil.remove(f)
    best_t = min(per_threads, key=per_threads.__getitem__)
    best = per_threads[best_t]
    return {"seconds": best, "bytes": total, "gbps": total / best / 1e9, "threads": best_t,
            "o_direct": direct, "mode": "O_DIRECT" if direct else "buffered (O_DIRECT unsupported)",
            "per_threads_seconds": {str(k): v for k, v in per_threads.items()},
            "files": [str(f) for f in last_files]}


def raw_read(files: list[Path], threads: list[int], chunk: int = 8 << 20,
             drop_caches: bool = False) -> dict[str, Any]:
    chunk = _align_up(chunk)
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    units = [(f, off, min(chunk, size - off)) for f, size in zip(files, sizes)
             for off in range(0, size, chunk)]
    direct_ok = hasattr(os, "O_DIRECT")
    results: dict[str, dict[int, float]] = {"O_DIRECT": {}, "buffered-cold": {}}
    evict_method = ""
    for mode in ("O_DIRECT", "buffered-cold"):
        if mode == "O_DIRECT" and not direct_ok:
            continue
        for t in threads:
            if mode == "buffered-cold":
                evict_method = ""
                for f in files:
                    evict_method = fsutil.evict(f, drop_caches=drop_caches)
            q: queue.SimpleQueue = queue.SimpleQueue()
            for u in units:
                q.put(u)
            flags = os.O_RDONLY | (os.O_DIRECT if mode == "O_DIRECT" else 0)
            fds = {}
            try:
                for f in files:
                    fds[f] = os.open(f, flags)
            except OSError:
                for fd in fds.values():
                    os.close(fd)
                if mode == "O_DIRECT":
                    direct_ok = False
                    break
                raise
            bufs = [mmap.mmap(-1, chunk) for _ in range(t)]

            def work(i: int) -> None:
                view = memoryview(bufs[i])
                try:
                    while True:
                        try:
                            f, off, n = q.get_nowait()
                        except queue.Empty:
                            return
                        got = os.preadv(fds[f], [view[:_align_up(n)]], off)
                        if got < n:
                            raise OSError(errno.EIO, f"short read {got} < {n}")
                finally:
                    view.release()

            t0 = time.perf_counter()
            try:
                _run_threads(t, work)
            except OSError:
                if mode == "O_DIRECT":
                    direct_ok = False
                    break
                raise
            finally:
                for fd in fds.values():
                    os.close(fd)
                for m in bufs:
                    m.close()
            results[mode][t] = time.perf_counter() - t0
    flat = [(s, mode, t) for mode, d in results.items() for t, s in d.items()]
    best, best_mode, best_t = min(flat)
    return {"seconds": best, "bytes": total, "gbps": total / best / 1e9, "threads": best_t,
            "mode": best_mode, "evict": evict_method,
            "per_mode_threads_seconds": {m: {str(k): v for k, v in d.items()}
                                         for m, d in results.items() if d}}
