"""Fault injection for the reliability tests (not part of the package).

Two injectors share one rule engine (:class:`FaultPlan`):

* :class:`FaultyFileSystem`, an fsspec filesystem registered as ``faulty://``.  It keeps files in memory with
  object-store semantics (a file written through ``open(..., "wb")`` becomes visible only when it is closed) and
  calls the plan before each operation, so the k-th ``open`` / ``write`` / ``close`` / ``pipe`` / ``cat`` /
  ``info`` / ``ls`` / ``mkdir`` / ``rm`` / ``rmtree`` / ``mv`` can fail, fail after taking effect, write short or
  hang.  This drives the engine's generic fsspec code path (the one S3, GCS, … take).
* :func:`faulty_os`, which registers a LocalStorage whose operating-system calls (its injectable ``OsOps``) call
  the plan before ``create`` (a new shard or temporary manifest file), ``fallocate``, ``pwrite``, ``fsync``,
  ``fsync_dir``, ``replace`` (the rename that publishes a manifest), ``mkdir``, ``listdir``, ``unlink``, ``rmdir``
  and ``read``.  This drives the local-disk code path without root, mounts or a full disk.

Actions a rule can take:

``error``   raise ``InjectedFault`` (an ``OSError``, errno EIO unless given) before the operation runs;
``after``   run the operation, then raise: the storage did the work but the caller hears of a failure (a lost
            acknowledgement: timeout after an object-store PUT, EIO from fsync after the rename reached the disk);
``short``   for writes: write only part of the bytes and report the smaller count (fsspec ``write`` / ``os.pwrite``);
``hang``    block until :meth:`FaultPlan.release` (or ``hang_s`` seconds pass), then run normally;
``delay``   sleep ``delay_s`` seconds before every matching operation (slow storage; never fires as a fault).
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import io
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import fsspec
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

from asyncckpt.io import register, unregister
from asyncckpt.io.local import LocalStorage, OsOps


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


# ---------------------------------------------------------------- local disk: LocalStorage's OsOps

class FaultyOps(OsOps):
    """The operating-system calls of LocalStorage, each passing the active plan first."""

    def __init__(self) -> None:
        self._names: dict[int, str] = {}  # fd -> path, to say which file an fsync/pwrite is about

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        op = "create" if flags & os.O_CREAT else "open"
        fd = _run(op, path, super().open, path, flags, mode)
        self._names[fd] = str(path)
        return fd

    def close(self, fd: int) -> None:
        self._names.pop(fd, None)
        super().close(fd)

    def posix_fallocate(self, fd: int, offset: int, length: int) -> None:
        _run("fallocate", self._names.get(fd, fd), super().posix_fallocate, fd, offset, length)

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        path = self._names.get(fd, fd)
        plan = _PLAN
        rule = plan.check("pwrite", path) if plan is not None else None
        if rule is not None:
            if rule.action == "error":
                raise plan.fault(rule, "pwrite", path)
            if rule.action == "short":
                view = memoryview(data)
                return super().pwrite(fd, view[: max(1, len(view) // 2)], offset)
            if rule.action == "after":
                super().pwrite(fd, data, offset)
                raise plan.fault(rule, "pwrite", path)
        return super().pwrite(fd, data, offset)

    def fsync(self, fd: int) -> None:
        _run("fsync", self._names.get(fd, f"fd {fd}"), super().fsync, fd)

    def fsync_dir(self, path: str) -> None:
        _run("fsync_dir", path, super().fsync_dir, path)

    def replace(self, src: str, dst: str) -> None:
        _run("replace", dst, super().replace, src, dst)

    def listdir(self, path: str) -> list[str]:
        return _run("listdir", path, super().listdir, path)

    def mkdir(self, path: str) -> None:
        _run("mkdir", path, super().mkdir, path)

    def unlink(self, path: str) -> None:
        _run("unlink", path, super().unlink, path)

    def rmdir(self, path: str) -> None:
        _run("rmdir", path, super().rmdir, path)

    def preadv(self, fd: int, buffers: Any, offset: int) -> int:
        return _run("read", self._names.get(fd, fd), super().preadv, fd, buffers, offset)


class FaultyLocalStorage(LocalStorage):
    """LocalStorage whose operating-system calls go through :class:`FaultyOps`."""

    @classmethod
    def create(cls, protocol: str, storage_options: Any, io: Any) -> "FaultyLocalStorage":
        return cls(io, FaultyOps())


def install() -> None:
    """Serve local paths with :class:`FaultyLocalStorage` in this process (it passes everything through while no
    plan is active). The test suite does this once per session (tests/conftest.py); crash writers do it too."""
    register("file", FaultyLocalStorage, clobber=True)


def uninstall() -> None:
    unregister("file")


@contextlib.contextmanager
def faulty_os(plan: FaultPlan) -> Iterator[FaultPlan]:
    """Make local-disk operations obey ``plan`` for the duration (see :func:`install`)."""
    from asyncckpt.io.registry import backend_for

    assert backend_for("file") is FaultyLocalStorage, "faultfs.install() has not run in this process"
    with plan_active(plan):
        yield plan


# ---------------------------------------------------------------- helpers shared by the reliability tests

from asyncckpt.testing import same  # noqa: E402,F401  (the reliability tests import it from here)

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
