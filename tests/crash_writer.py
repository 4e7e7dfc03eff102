"""Child side of the crash-consistency test (tests/test_crash.py): saves until it is SIGKILLed.

Run as ``python crash_writer.py serve``: a small fork server.  It imports torch and asyncckpt once, then reads
commands from stdin, one JSON object per line:

``{"cmd": "run", ...config}``  fork a writer; answer ``{"pid": N}``
``{"cmd": "wait", "pid": N}``  reap it; answer ``{"status": S}`` (the raw ``waitpid`` status)

Forking from an already-imported interpreter makes a trial cost milliseconds instead of the seconds a fresh
``import torch`` takes, so many kills fit in the default test run; ``python crash_writer.py once '<json>'`` runs
one writer in a fresh process, for the trials that check exactly that.

A writer resumes after the newest committed step (``asyncckpt.latest``) and loops: save ``steps/step-N``, await it,
append ``step N <fingerprint>`` to the side log and fsync it; save the same state to the fixed path ``last``,
await, log ``last N <fingerprint>``; then remove every step directory that fell out of the retention window (committed or
left behind by a killed save), logging ``rm N`` before and ``rmdone N`` after.  A log line therefore proves the commit it names; a commit without a log
line is possible (killed between the two) and the test accounts for it.

While it runs, the writer marks what it is doing in a shared memory page (``phase`` file): one byte for the phase
and a count per phase.  The page survives SIGKILL (it is the page cache), so the test knows where each kill
landed.  With ``pause`` set to ``[code, n]`` the writer stops dead at the n-th occurrence of a phase and raises a
flag there, so the test can kill it at exactly that point; otherwise the test kills it after a random delay.
Small random sleeps inside the storage calls (a slow disk) widen the windows between the steps of a save.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import sys
import time
from typing import Any

import torch
import xxhash

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import anyio  # noqa: E402

import asyncckpt  # noqa: E402
from asyncckpt.format.manifest import MANIFEST_NAME  # noqa: E402
from asyncckpt.io import register  # noqa: E402
from asyncckpt.io.local import LocalStorage, OsOps  # noqa: E402
from asyncckpt.pipeline.committer import Committer  # noqa: E402
from asyncckpt.snapshot.plan import Plan  # noqa: E402
from asyncckpt.testing import mixed_state  # noqa: E402

KEEP = 3  # step checkpoints kept (older ones are removed)
PHASES = {
    "S": "snapshot copy", "O": "shard create", "W": "shard write", "F": "shard fsync", "P": "manifest write",
    "R": "manifest written, before rename", "r": "manifest renamed, before dir fsync/sweep", "D": "dir fsync",
    "X": "sweep of stale shards", "U": "unlink (sweep or remove)", "M": "remove", "C": "committed, not yet logged",
    "G": "logged", "-": "starting",
}
PAGE = 4096
FLAG_AT = 1  # byte 1: 1 when paused at the requested point; byte 2: the phase it paused in
COUNTS_AT = 64  # 4-byte counters per phase code, indexed by ord(code)


# ---------------------------------------------------------------- the state a step saves (shared with the test)

def make_state(step: int) -> dict[str, Any]:
    """Deterministic training-like state for ``step`` (several shards at the trial sizes)."""
    return mixed_state(step, scale=2)


FROZEN_SEED = 7  # the frozen part of a manager trial's state: the same bytes at every step


def manager_state(step: int) -> dict[str, Any]:
    """A fine-tuning state: a frozen backbone (identical every step) and a head that changes every step."""
    g = torch.Generator().manual_seed(FROZEN_SEED)
    frozen = {f"layer{i}": torch.randn(64, 96, generator=g) for i in range(4)}
    return {"backbone": frozen, "head": mixed_state(step)["model"], "step": step}


def fingerprint(state: Any) -> str:
    h = xxhash.xxh3_64()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            h.update(f"T{x.dtype}{tuple(x.shape)}".encode())
            dense = torch.empty(x.shape, dtype=x.dtype)
            dense.copy_(x.detach())
            h.update(dense.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, (set, frozenset)):
            h.update(repr(sorted(map(repr, x))).encode())  # set order depends on the process's hash seed
        elif isinstance(x, dict):
            h.update(b"{")
            for k, v in x.items():
                walk(k)
                walk(v)
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[" if isinstance(x, list) else b"(")
            for v in x:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode())

    walk(state)
    return h.hexdigest()


def step_name(step: int) -> str:
    return f"step-{step:06d}"


# ---------------------------------------------------------------- phase markers

class Marker:
    def __init__(self, path: str, pause: list | None, jitter: float, rng: random.Random) -> None:
        fd = os.open(path, os.O_RDWR)
        self.page = mmap.mmap(fd, PAGE)
        os.close(fd)
        self.pause = (pause[0], int(pause[1])) if pause else None
        self.jitter, self.rng = jitter, rng
        self.counts: dict[str, int] = {}

    def __call__(self, code: str, sleep: bool = False) -> None:
        n = self.counts[code] = self.counts.get(code, 0) + 1
        self.page[0] = ord(code)
        at = COUNTS_AT + 4 * ord(code)
        self.page[at:at + 4] = n.to_bytes(4, "little")
        if self.pause is not None and self.pause == (code, n):
            self.page[FLAG_AT + 1] = ord(code)
            self.page[FLAG_AT] = 1
            time.sleep(3600)  # the test kills us here
        if sleep and self.jitter:
            time.sleep(self.rng.random() * self.jitter)


def read_page(path: str) -> tuple[str, bool, dict[str, int]]:
    """(phase, paused flag, count per phase) from a writer's phase file; the phase is the one the writer paused
    in, else the last one any of its threads marked."""
    with open(path, "rb") as f:
        page = f.read(PAGE)
    counts = {}
    for code in PHASES:
        at = COUNTS_AT + 4 * ord(code)
        n = int.from_bytes(page[at:at + 4], "little")
        if n:
            counts[code] = n
    phase = page[FLAG_AT + 1] if page[FLAG_AT] else page[0]
    return chr(phase) if phase else "-", bool(page[FLAG_AT]), counts


class PhaseOps(OsOps):
    """LocalStorage's operating-system calls in the writer: each marks its phase and sleeps a little."""

    def __init__(self, mark: Marker) -> None:
        self._mark = mark
        self._temp: set[int] = set()  # descriptors of temporary manifests

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        temp = MANIFEST_NAME + ".tmp-" in os.path.basename(path)
        if flags & os.O_CREAT:
            self._mark("P" if temp else "O", sleep=temp)
        fd = super().open(path, flags, mode)
        if temp:
            self._temp.add(fd)
        return fd

    def close(self, fd: int) -> None:
        self._temp.discard(fd)
        super().close(fd)

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        self._mark("P" if fd in self._temp else "W", sleep=True)
        return super().pwrite(fd, data, offset)

    def fsync(self, fd: int) -> None:
        self._mark("P" if fd in self._temp else "F", sleep=True)
        super().fsync(fd)

    def fsync_dir(self, path: str) -> None:
        self._mark("D", sleep=True)
        super().fsync_dir(path)

    def replace(self, src: str, dst: str) -> None:
        self._mark("R", sleep=True)
        super().replace(src, dst)
        self._mark("r", sleep=True)

    def unlink(self, path: str) -> None:
        self._mark("U", sleep=True)
        super().unlink(path)


def install_hooks(mark: Marker) -> None:
    """Mark phases: the OS calls through a registered LocalStorage, the copy and the sweep by wrapping the one
    method each (they must exist where named: a moved method fails here, loudly)."""
    class PhaseStorage(LocalStorage):
        @classmethod
        def create(cls, protocol: str, storage_options: Any, io: Any) -> "PhaseStorage":
            return cls(io, PhaseOps(mark))

    register("file", PhaseStorage, clobber=True)

    fill = Plan.fill

    def marked_fill(self: Any, chunk: Any, buf: Any) -> Any:
        mark("S", sleep=True)
        return fill(self, chunk, buf)

    Plan.fill = marked_fill  # type: ignore[method-assign]

    stale = Committer.stale

    async def marked_stale(self: Any, *args: Any) -> list[str]:
        mark("X")  # the sweep starts
        return await stale(self, *args)

    Committer.stale = marked_stale  # type: ignore[method-assign]


# ---------------------------------------------------------------- the writer

def manage_forever(cfg: dict[str, Any]) -> None:
    """Manager trials: an incremental CheckpointManager saving every step, logging each commit after it."""
    rng = random.Random(cfg["seed"])
    mark = Marker(cfg["phase"], cfg.get("pause"), cfg.get("jitter", 0.0), rng)
    install_hooks(mark)
    log = os.open(cfg["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    with asyncckpt.SyncCheckpointManager(cfg["root"], keep_last=2, keep_every_steps=5, incremental=True,
                                         full_every=3, chunk_bytes=cfg["chunk_bytes"], shard_bytes=cfg["shard_bytes"],
                                         host_memory_budget=cfg["budget"]) as manager:
        step = (manager.latest_step() or 0) + 1
        while True:
            state = manager_state(step)
            manager.save(step, state, metrics={"loss": 1.0 / step}).result()
            mark("C")
            os.write(log, f"mstep {step} {fingerprint(state)}\n".encode())
            os.fsync(log)
            mark("G")
            step += 1


def write_forever(cfg: dict[str, Any]) -> None:
    rng = random.Random(cfg["seed"])
    mark = Marker(cfg["phase"], cfg.get("pause"), cfg.get("jitter", 0.0), rng)
    install_hooks(mark)
    root = cfg["root"]
    steps_dir, last = os.path.join(root, "steps"), os.path.join(root, "last")
    log = os.open(cfg["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def note(line: str) -> None:
        os.write(log, (line + "\n").encode())
        os.fsync(log)
        mark("G")

    async def main() -> None:
        newest = asyncckpt.latest(steps_dir)
        step = int(os.path.basename(newest).split("-")[1]) + 1 if newest else 0
        async with asyncckpt.CheckpointEngine(
                chunk_bytes=cfg["chunk_bytes"], shard_bytes=cfg["shard_bytes"],
                write_concurrency=cfg["write_concurrency"], host_memory_budget=cfg["budget"]) as engine:
            for _ in range(cfg.get("max_steps", 10 ** 9)):
                state = make_state(step)
                fp = fingerprint(state)
                await (await engine.save(state, os.path.join(steps_dir, step_name(step))))
                mark("C")
                note(f"step {step} {fp}")
                await (await engine.save(state, last))
                mark("C")
                note(f"last {step} {fp}")
                for name in sorted(os.listdir(steps_dir)):  # keep the newest KEEP steps, as a trainer would
                    old = int(name.split("-")[1])
                    if old > step - KEEP:
                        continue
                    note(f"rm {old}")
                    mark("M")
                    path = os.path.join(steps_dir, name)
                    if os.listdir(path):
                        await engine.remove(path)
                    else:  # a save killed right after creating the directory (engine.remove refuses it)
                        os.rmdir(path)
                    note(f"rmdone {old}")
                step += 1

    anyio.run(main)
    os.close(log)


def serve() -> None:
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "run":
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    os.dup2(os.open(cmd["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), 2)
                    (manage_forever if cmd.get("mode") == "manager" else write_forever)(cmd)
                except BaseException:
                    import traceback

                    traceback.print_exc()
                    code = 3
                finally:
                    os._exit(code)
            reply: dict[str, Any] = {"pid": pid}
        elif cmd["cmd"] == "wait":
            _, status = os.waitpid(cmd["pid"], 0)
            reply = {"status": status}
        else:
            reply = {"error": f"unknown command {cmd!r}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    elif sys.argv[1] == "once":
        write_forever(json.loads(sys.argv[2]))
