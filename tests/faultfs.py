"""Fault injection for the reliability tests (not part of the package).

Two injectors share one rule engine (:class:`FaultPlan`):

* :class:`FaultyFileSystem`, an fsspec filesystem registered as ``faulty://``.  It keeps files in memory with
  object-store semantics (a file written through ``open(..., "wb")`` becomes visible only when it is closed) and
  calls the plan before each operation, so the k-th ``open`` / ``write`` / ``close`` / ``pipe`` / ``cat`` /
  ``info`` / ``ls`` / ``mkdir`` / ``rm`` / ``rmtree`` / ``mv`` can fail, fail after taking effect, write short or
  hang.  This drives the engine's generic fsspec code path (the one S3, GCS, … take).
* :func:`faulty_os`, which swaps the ``os`` module (and ``open``) seen by ``asyncckpt.storage`` for a proxy that
  calls the plan before ``create`` (a new shard file), ``fallocate``, ``pwrite``, ``fsync``, ``fsync_dir``,
  ``replace`` (the rename that publishes a manifest), ``listdir``, ``unlink``, ``rmdir``, ``tmpwrite`` (the
  temporary manifest) and ``read``.  This drives the local-disk code path without root, mounts or a full disk.

Actions a rule can take:

``error``   raise ``InjectedFault`` (an ``OSError``, errno EIO unless given) before the operation runs;
``after``   run the operation, then raise: the storage did the work but the caller hears of a failure (a lost
            acknowledgement: timeout after an object-store PUT, EIO from fsync after the rename reached the disk);
``short``   for writes: write only part of the bytes and report the smaller count (fsspec ``write`` / ``os.pwrite``);
``hang``    block until :meth:`FaultPlan.release` (or ``hang_s`` seconds pass), then run normally;
``delay``   sleep ``delay_s`` seconds before every matching operation (slow storage; never fires as a fault).
"""

from __future__ import annotations

import builtins
import contextlib
import errno as errno_mod
import io
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import fsspec
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem


class InjectedFault(OSError):
    """An error raised on purpose by a fault rule (so tests can tell it from a real one)."""


@dataclass
class Rule:
    op: str
    nth: int = 1  # fire on the nth matching call (1-based); 0 = every call
    action: str = "error"
    errno: int = errno_mod.EIO
    match: str | None = None  # substring the path must contain
    delay_s: float = 0.0
    fired: int = 0


@dataclass
class FaultPlan:
    """Counts operations and decides which one misbehaves.  Thread-safe: the engine calls it from worker threads."""

    rules: list[Rule] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    log: list[tuple[str, str]] = field(default_factory=list)  # (op, path) of every operation seen
    fired: list[tuple[str, str, str]] = field(default_factory=list)  # (op, action, path) of faults that fired
    hang_s: float = 30.0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._matched: Counter = Counter()

    def add(self, op: str, nth: int = 1, action: str = "error", *, errno: int = errno_mod.EIO,
            match: str | None = None, delay_s: float = 0.0) -> "FaultPlan":
        self.rules.append(Rule(op, nth, action, errno, match, delay_s))
        return self

    def release(self) -> None:
        """Let every hung (and future hanging) operation go on."""
        self._released.set()

    def check(self, op: str, path: Any) -> Rule | None:
        """Record one operation; return the rule that fires on it, if any (``delay`` rules sleep here)."""
        path = str(path)
        delay = 0.0
        chosen = None
        with self._lock:
            self.counts[op] += 1
            self.log.append((op, path))
            for i, rule in enumerate(self.rules):
                if rule.op != op or (rule.match is not None and rule.match not in path):
                    continue
                if rule.action == "delay":
                    delay = max(delay, rule.delay_s)
                    continue
                self._matched[i] += 1
                if chosen is None and (rule.nth == 0 or self._matched[i] == rule.nth):
                    rule.fired += 1
                    chosen = rule
                    self.fired.append((op, rule.action, path))
        if delay:
            time.sleep(delay)
        if chosen is not None and chosen.action == "hang":
            self._released.wait(self.hang_s)
            return None
        return chosen

    def fault(self, rule: Rule, op: str, path: Any) -> InjectedFault:
        return InjectedFault(rule.errno, f"injected {rule.action} fault in {op} (call {self.counts[op]})", str(path))


_PLAN: FaultPlan | None = None


def active() -> FaultPlan | None:
    return _PLAN


@contextlib.contextmanager
def plan_active(plan: FaultPlan) -> Iterator[FaultPlan]:
    """Make ``plan`` the one both injectors consult; the previous one is restored afterwards."""
    global _PLAN
    previous, _PLAN = _PLAN, plan
    try:
        yield plan
    finally:
        plan.release()
        _PLAN = previous


def _run(op: str, path: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` under the active plan's decision for ``op`` on ``path``."""
    plan = _PLAN
    rule = plan.check(op, path) if plan is not None else None
    if rule is None or rule.action not in ("error", "after"):
        return fn(*args, **kwargs)
    if rule.action == "error":
        raise plan.fault(rule, op, path)
    fn(*args, **kwargs)
    raise plan.fault(rule, op, path)


# ---------------------------------------------------------------- fsspec: faulty://

class _FaultyWriteFile(io.RawIOBase):
    """A file being written: bytes stay private until ``close`` publishes them (object-store semantics)."""

    def __init__(self, fs: "FaultyFileSystem", path: str) -> None:
        super().__init__()
        self.fs, self.path, self.buf = fs, path, io.BytesIO()
        self._published = False

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        data = bytes(data)
        plan = _PLAN
        rule = plan.check("write", self.path) if plan is not None else None
        if rule is not None:
            if rule.action == "error":
                raise plan.fault(rule, "write", self.path)
            if rule.action == "short":
                keep = len(data) // 2
                self.buf.write(data[:keep])
                return keep
            if rule.action == "after":
                self.buf.write(data)
                raise plan.fault(rule, "write", self.path)
        return self.buf.write(data)

    def close(self) -> None:
        if self.closed:
            return
        if not self._published:
            self._published = True
            _run("close", self.path, self.fs._store_file, self.path, self.buf.getvalue())
        super().close()

    def discard(self) -> None:
        self._published = True
        super().close()


class FaultyFileSystem(MemoryFileSystem):
    """In-memory fsspec filesystem whose operations obey the active :class:`FaultPlan`."""

    protocol = "faulty"
    store: dict[str, Any] = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        if isinstance(path, str):
            path = path.removeprefix("faulty://")
        return super()._strip_protocol(path)

    @classmethod
    def reset(cls) -> None:
        cls.store.clear()
        cls.pseudo_dirs[:] = [""]

    def _store_file(self, path: str, data: bytes) -> None:
        self.store[self._strip_protocol(path)] = MemoryFile(self, self._strip_protocol(path), data)

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        if "w" in mode or "x" in mode:
            return _run("open", path, _FaultyWriteFile, self, path)
        return _run("open", path, super()._open, path, mode, **kwargs)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        _run("pipe", path, self._store_file, path, bytes(value))

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        return _run("cat", path, super().cat_file, path, start, end, **kwargs)

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        return _run("info", path, super().info, path, **kwargs)

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        return _run("ls", path, super().ls, path, detail=detail, **kwargs)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        return _run("mkdir", path, super().makedirs, path, exist_ok=exist_ok)

    def rm_file(self, path: str) -> None:
        return _run("rm", path, super().rm_file, path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        return _run("rmtree", path, super().rm, path, recursive=recursive, maxdepth=maxdepth)

    def mv(self, path1: str, path2: str, **kwargs: Any) -> None:
        return _run("mv", path2, super().mv, path1, path2, **kwargs)


fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)


# ---------------------------------------------------------------- local disk: the os seen by asyncckpt.storage

class _FaultyOS:
    """Stands in for the ``os`` module inside ``asyncckpt.storage``; everything not listed passes through."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self._names: dict[int, str] = {}  # fd -> path, to say which file an fsync/pwrite is about

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def open(self, path: Any, flags: int, mode: int = 0o777, *args: Any, **kwargs: Any) -> int:
        is_dir = bool(flags & getattr(self._real, "O_DIRECTORY", 0))
        op = "create" if flags & self._real.O_CREAT else "opendir" if is_dir else "open"
        fd = _run(op, path, self._real.open, path, flags, mode, *args, **kwargs)
        self._names[fd] = ("dir:" if is_dir else "") + str(path)
        return fd

    def close(self, fd: int) -> None:
        self._names.pop(fd, None)
        self._real.close(fd)

    def posix_fallocate(self, fd: int, offset: int, length: int) -> None:
        _run("fallocate", self._names.get(fd, fd), self._real.posix_fallocate, fd, offset, length)

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        path = self._names.get(fd, fd)
        plan = _PLAN
        rule = plan.check("pwrite", path) if plan is not None else None
        if rule is not None:
            if rule.action == "error":
                raise plan.fault(rule, "pwrite", path)
            if rule.action == "short":
                view = memoryview(data)
                return self._real.pwrite(fd, view[: max(1, len(view) // 2)], offset)
            if rule.action == "after":
                self._real.pwrite(fd, data, offset)
                raise plan.fault(rule, "pwrite", path)
        return self._real.pwrite(fd, data, offset)

    def fsync(self, fd: Any) -> None:
        if not isinstance(fd, int):
            fd = fd.fileno()
        path = self._names.get(fd, f"fd {fd}")
        op = "fsync_dir" if str(path).startswith("dir:") else "fsync"
        _run(op, str(path).removeprefix("dir:"), self._real.fsync, fd)

    def replace(self, src: Any, dst: Any) -> None:
        _run("replace", dst, self._real.replace, src, dst)

    def listdir(self, path: Any) -> list[str]:
        return _run("listdir", path, self._real.listdir, path)

    def unlink(self, path: Any) -> None:
        _run("unlink", path, self._real.unlink, path)

    def rmdir(self, path: Any) -> None:
        _run("rmdir", path, self._real.rmdir, path)

    def preadv(self, fd: int, buffers: Any, offset: int) -> int:
        return _run("read", self._names.get(fd, fd), self._real.preadv, fd, buffers, offset)


class _FaultyTextFile:
    """Wraps a file opened with the builtin ``open`` (the temporary manifest, reads of whole files)."""

    def __init__(self, f: Any, path: str) -> None:
        self._f, self._path = f, path

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> "_FaultyTextFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()

    def write(self, data: Any) -> int:
        return _run("tmpwrite", self._path, self._f.write, data)

    def read(self, *args: Any) -> Any:
        return _run("read", self._path, self._f.read, *args)


def _faulty_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
    op = "tmpcreate" if ("w" in mode or "x" in mode) else "open"
    f = _run(op, path, builtins.open, path, mode, *args, **kwargs)
    return _FaultyTextFile(f, str(path))


@contextlib.contextmanager
def faulty_os(plan: FaultPlan) -> Iterator[FaultPlan]:
    """Route ``asyncckpt.storage``'s os calls (and ``open``) through ``plan`` for the duration."""
    from asyncckpt import storage

    real = storage.os
    proxy = _FaultyOS(real)
    storage.os = proxy  # type: ignore[assignment]
    storage.open = _faulty_open  # type: ignore[attr-defined]
    try:
        with plan_active(plan):
            yield plan
    finally:
        storage.os = real  # type: ignore[assignment]
        del storage.open  # type: ignore[attr-defined]


# ---------------------------------------------------------------- helpers shared by the reliability tests

def _bytes_of(t: Any) -> Any:
    """The bytes of ``t`` in a fresh row-major tensor (``contiguous()`` may keep odd strides of size-1 dims)."""
    import torch

    dense = torch.empty(t.shape, dtype=t.dtype)
    dense.copy_(t.detach())
    return dense.reshape(-1).view(torch.uint8)


def same(a: Any, b: Any) -> bool:
    """Bit-exact structural equality: container types, key order, dtypes, shapes and every byte (NaN-safe)."""
    import math
    import struct

    import torch

    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.numel() == 0:
            return True
        return torch.equal(_bytes_of(a), _bytes_of(b))
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a.keys()) == list(b.keys()) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b))
    return a == b


def cause_chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and everything it was raised from (``__cause__``/``__context__``), including group members."""
    out: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is x for x in out):
            continue
        out.append(e)
        todo += [e.__cause__, e.__context__]
        if isinstance(e, BaseExceptionGroup):
            todo += list(e.exceptions)
    return out
