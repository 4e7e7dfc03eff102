"""Storage faults: every operation of a save fails in turn, on the fsspec path and on the local-disk path.

For each injected fault the tests check the engine's promises:

* the error surfaces from ``await handle`` as a CheckpointError naming the path, with the injected error as its
  cause (or the save succeeds, when the engine legitimately absorbs the fault, e.g. by retrying a short write);
* the path holds a whole checkpoint afterwards — the previous one, or (only when the storage may have taken the
  write before failing) the new one — never a mix, never a corrupt one; a fresh path holds nothing loadable;
* the engine stays usable: the next save to the same path commits, loads bit-exactly and sweeps the leftovers;
* staging memory is all returned.

The number of injected faults is printed (``-s``) and summarised in docs/reliability.md.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from faultfs import FaultPlan, FaultyFileSystem, InjectedFault, cause_chain, faulty_os, plan_active, same  # noqa: E402

import asyncckpt  # noqa: E402
from asyncckpt import CheckpointError, CorruptCheckpointError  # noqa: E402
from asyncckpt.format.manifest import MANIFEST_NAME  # noqa: E402
from asyncckpt.testing import mixed_state  # noqa: E402

OPTS = dict(write_concurrency=4, shard_bytes=24 << 10, chunk_bytes=8192, host_memory_budget=256 << 10)
REPO = Path(__file__).resolve().parents[1]
COUNTS: dict[str, int] = {}


V0, V1, V2 = mixed_state(0), mixed_state(1), mixed_state(2)


@pytest.fixture(autouse=True)
def _fresh_memory_store():
    FaultyFileSystem.reset()
    yield
    FaultyFileSystem.reset()


class Target:
    """Where a test's checkpoints live, and how faults are switched on for that kind of storage."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind = kind
        self.root = str(tmp) if kind == "local" else f"faulty://{uuid.uuid4().hex}"

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def faults(self, plan: FaultPlan) -> Any:
        return faulty_os(plan) if self.kind == "local" else plan_active(plan)

    def listdir(self, path: str) -> list[str]:
        if self.kind == "local":
            return sorted(os.listdir(path)) if os.path.isdir(path) else []
        fs = FaultyFileSystem()
        if not fs.exists(path):
            return []
        return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))

    def manifest(self, path: str) -> dict[str, Any]:
        if self.kind == "local":
            return json.loads(Path(path, MANIFEST_NAME).read_bytes())
        return json.loads(FaultyFileSystem().cat_file(f"{path}/{MANIFEST_NAME}"))


async def outcome(engine: asyncckpt.CheckpointEngine, path: str) -> Any:
    """What loading ``path`` gives: the state, or the CheckpointError (anything else propagates and fails)."""
    try:
        return await engine.load(path)
    except CheckpointError as exc:
        return exc


def count_ops(target: Target, tmp: Path, fresh: bool) -> dict[str, int]:
    """Operations one save performs (overwriting a previous checkpoint, or to a fresh path)."""
    plan = FaultPlan()

    async def main() -> None:
        async with asyncckpt.CheckpointEngine(**OPTS) as engine:
            p = target.path("dry")
            if not fresh:
                await (await engine.save(V0, p))
            with target.faults(plan):
                await (await engine.save(V1, p))

    anyio.run(main)
    return dict(plan.counts)


ACTIONS = {
    # op: actions that make sense for it; "error" = fails before doing anything
    "pwrite": ("error", "short", "after"), "write": ("error", "short", "after"),
    "close": ("error", "after"), "pipe": ("error", "after"), "replace": ("error", "after"),
    "fsync": ("error",), "fsync_dir": ("error",), "rm": ("error", "after"), "unlink": ("error", "after"),
}


async def fault_case(target: Target, op: str, nth: int, action: str, fresh: bool, err_no: int) -> str:
    """One injected fault; returns a short label of what happened (for the summary)."""
    p = target.path(f"{op}-{nth}-{action}-{'fresh' if fresh else 'over'}")
    async with asyncckpt.CheckpointEngine(**OPTS) as engine:
        if not fresh:
            await (await engine.save(V0, p))
        plan = FaultPlan().add(op, nth, action, errno=err_no)
        error = None
        with target.faults(plan):
            handle = await engine.save(V1, p)
            try:
                await handle
            except CheckpointError as exc:
                error = exc
        fired = bool(plan.fired)
        where = f"{target.kind} {op}#{nth} {action} ({'fresh' if fresh else 'overwrite'})"
        if error is not None:
            assert fired, f"{where}: failed without a fault: {error!r}"
            assert p in str(error), f"{where}: error does not name the path: {error}"
            # the cause is the injected error, or for a short write the engine's own report of it
            wanted = OSError if action == "short" else InjectedFault
            assert any(isinstance(c, wanted) for c in cause_chain(error)), f"{where}: cause lost: {error!r}"
        got = await outcome(engine, p)
        if isinstance(got, CheckpointError):
            assert not isinstance(got, CorruptCheckpointError), f"{where}: left a corrupt checkpoint: {got}"
            assert fresh and error is not None, f"{where}: nothing loads after {'success' if error is None else error}: {got}"
        elif error is None:
            assert same(got, V1), f"{where}: the save reported success but the path does not hold it"
        else:
            allowed = [V1] if fresh else [V0, V1]
            assert any(same(got, v) for v in allowed), f"{where}: the path holds a mix after {error}"
            if same(got, V1):  # committed although an error was reported: only when the storage took the write
                assert action == "after" or op in ("fsync_dir", "opendir"), f"{where}: committed despite {error}"
        assert engine.staging.in_use_bytes == 0, f"{where}: staging buffers leaked"
        # the engine stays usable, and the next save to the path cleans up after the failed one
        await (await engine.save(V2, p))
        assert same(await engine.load(p), V2), f"{where}: the next save does not load"
        expected = sorted([MANIFEST_NAME, *[s["file"] for s in target.manifest(p)["shards"]]])
        assert target.listdir(p) == expected, f"{where}: leftovers survive the next save"
    return "absorbed" if error is None else ("committed-with-error" if not isinstance(got, Exception)
                                             and same(got, V1) else "failed-clean")


@pytest.mark.parametrize("kind", ["fsspec", "local"])
def test_every_save_operation_fails_in_turn(kind: str, tmp_path: Path) -> None:
    """Make the k-th operation of each type fail (error / short write / error after success), one at a time."""
    target = Target(kind, tmp_path)
    summary: dict[str, int] = {}
    failures: list[str] = []
    cases = 0
    for fresh in (False, True):
        ops = count_ops(target, tmp_path, fresh)
        for op, n in sorted(ops.items()):
            for nth in range(1, n + 1):
                for action in ACTIONS.get(op, ("error",)):
                    cases += 1
                    try:
                        label = anyio.run(fault_case, target, op, nth, action, fresh, errno.EIO)
                    except BaseException as exc:  # the engine's task group may wrap the assertion in a group
                        broken = [c for c in cause_chain(exc) if isinstance(c, AssertionError)]
                        if not broken:
                            raise
                        failures.append(str(broken[0]).splitlines()[0])
                        continue
                    summary[label] = summary.get(label, 0) + 1
    COUNTS[f"matrix-{kind}"] = cases
    print(f"\n{kind}: {cases} injected faults: {summary}")
    assert not failures, f"{len(failures)}/{cases} fault cases broke a promise:\n" + "\n".join(failures[:40])


@pytest.mark.parametrize("kind", ["fsspec", "local"])
async def test_disk_full_mid_save(kind: str, tmp_path: Path) -> None:
    """ENOSPC on the third data write: clear error with a hint, previous checkpoint intact, engine usable."""
    target = Target(kind, tmp_path)
    p = target.path("full")
    async with asyncckpt.CheckpointEngine(**OPTS) as engine:
        await (await engine.save(V0, p))
        with target.faults(FaultPlan().add("pwrite" if kind == "local" else "write", 3, errno=errno.ENOSPC)):
            handle = await engine.save(V1, p)
            with pytest.raises(CheckpointError, match="free space") as info:
                await handle
        assert p in str(info.value)
        assert any(isinstance(c, OSError) and c.errno == errno.ENOSPC for c in cause_chain(info.value))
        assert same(await engine.load(p), V0)
        await (await engine.save(V2, p))
        assert same(await engine.load(p), V2)


@pytest.mark.parametrize("kind", ["fsspec", "local"])
async def test_disk_full_when_reserving_space(kind: str, tmp_path: Path) -> None:
    """ENOSPC from space reservation (local: posix_fallocate) or from opening the shard (fsspec)."""
    target = Target(kind, tmp_path)
    p = target.path("reserve")
    async with asyncckpt.CheckpointEngine(**OPTS) as engine:
        await (await engine.save(V0, p))
        with target.faults(FaultPlan().add("fallocate" if kind == "local" else "open", 2, errno=errno.ENOSPC)):
            with pytest.raises(CheckpointError, match="free space"):
                await (await engine.save(V1, p))
        assert same(await engine.load(p), V0)
        assert engine.staging.in_use_bytes == 0
        await (await engine.save(V2, p))
        assert same(await engine.load(p), V2)


async def test_a_shard_still_opening_when_the_save_fails_is_removed_too(tmp_path: Path) -> None:
    """The first write fails while another shard's file is being created in a worker thread: the save's abort
    must delete that file too (and close it), so a failed save to a fresh path leaves nothing behind. Before the
    fix, the open finished after the job was cancelled, its sink was never registered, and the file (with its
    descriptors) outlived the abort."""
    p = tmp_path / "fresh"
    fds = len(os.listdir("/proc/self/fd"))
    plan = FaultPlan().add("create", 0, "delay", match="-00001.", delay_s=0.5).add("pwrite", 1)
    async with asyncckpt.CheckpointEngine(**OPTS) as engine:
        with faulty_os(plan):
            with pytest.raises(CheckpointError, match="injected"):
                await (await engine.save(V1, p))
        assert engine.staging.in_use_bytes == 0
    assert any("-00001." in path for op, path in plan.log if op == "create")  # the second shard was opening
    assert not p.exists(), sorted(os.listdir(p))  # no shard file, no directory named like the checkpoint
    assert len(os.listdir("/proc/self/fd")) == fds  # and no descriptor of one left open


RLIMIT_CHILD = textwrap.dedent("""
    import json, os, resource, signal, sys
    import anyio, torch
    import asyncckpt
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # get EFBIG from the kernel instead of being killed
    root, limit = sys.argv[1], int(sys.argv[2])
    small = {"w": torch.arange(1000, dtype=torch.float32)}
    big = {"w": torch.ones(limit // 2, dtype=torch.float32)}   # 2x the file-size limit in one shard
    out = {}
    async def main():
        async with asyncckpt.CheckpointEngine(shard_bytes=1 << 30, chunk_bytes=1 << 16) as e:
            p = os.path.join(root, "ckpt")
            await (await e.save(small, p))
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            try:
                await (await e.save(big, p))
                out["error"] = None
            except asyncckpt.CheckpointError as exc:
                out["error"] = str(exc)
                out["errno"] = next((c.errno for c in [exc.__cause__] if isinstance(c, OSError)), None)
            got = await e.load(p)
            out["previous_intact"] = torch.equal(got["w"], small["w"])
            out["files"] = sorted(os.listdir(p))
            small2 = {"w": small["w"] + 1}
            await (await e.save(small2, p))
            out["next_ok"] = torch.equal((await e.load(p))["w"], small2["w"])
            out["files_after"] = sorted(os.listdir(p))
    anyio.run(main)
    print(json.dumps(out))
""")


def test_file_size_limit_in_child_process(tmp_path: Path) -> None:
    """A real kernel error (EFBIG under RLIMIT_FSIZE) mid-save, in a child so the limit stays there."""
    limit = 1 << 20
    proc = subprocess.run([sys.executable, "-c", RLIMIT_CHILD, str(tmp_path), str(limit)], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["error"] and "ckpt" in out["error"], out
    assert out["errno"] == errno.EFBIG, out
    assert out["previous_intact"] and out["next_ok"], out
    assert len(out["files"]) == len(out["files_after"]) == 2, out  # manifest + one shard: no leftovers


@pytest.mark.parametrize("kind", ["fsspec", "local"])
async def test_with_no_io_timeout_a_hung_write_is_not_bounded_by_the_engine(kind: str, tmp_path: Path) -> None:
    """With ``io_timeout=None`` a write that never returns keeps ``await handle`` waiting.

    Callers bound their *waiting* with their own deadline (``anyio.fail_after``); the save itself finishes once the
    storage answers, and other paths stay usable meanwhile.
    """
    target = Target(kind, tmp_path)
    p, other = target.path("hang"), target.path("other")
    async with asyncckpt.CheckpointEngine(**OPTS, io_timeout=None) as engine:
        await (await engine.save(V0, other))
        plan = FaultPlan(hang_s=20).add("pwrite" if kind == "local" else "write", 2, "hang")
        with target.faults(plan):
            handle = await engine.save(V1, p)
            with pytest.raises(TimeoutError):
                with anyio.fail_after(0.5):
                    await handle
            assert not handle.done()
            assert same(await engine.load(other), V0)  # other paths stay usable meanwhile
            plan.release()
            with anyio.fail_after(10):
                await handle
        assert same(await engine.load(p), V1)


async def test_cancelled_close_waits_for_a_blocked_worker_thread(tmp_path: Path) -> None:
    """Cancelling the engine's scope does not abandon a write blocked for less than ``io_timeout`` (the default, ten
    minutes): exit returns when the write does."""
    plan = FaultPlan(hang_s=20).add("pwrite", 2, "hang")
    released_at: list[float] = []

    async def release_later() -> None:
        await anyio.sleep(1.0)
        released_at.append(anyio.current_time())
        plan.release()

    with faulty_os(plan):
        async with anyio.create_task_group() as tg:
            tg.start_soon(release_later)
            with anyio.move_on_after(0.2):
                async with asyncckpt.CheckpointEngine(**OPTS) as engine:
                    await engine.save(V1, tmp_path / "hang")
                    await anyio.sleep(30)
            exited_at = anyio.current_time()
    assert released_at and exited_at >= released_at[0], "the engine exited while its write was still blocked"
    async with asyncckpt.CheckpointEngine(**OPTS) as engine:
        got = await outcome(engine, str(tmp_path / "hang"))
        assert isinstance(got, CheckpointError) and not isinstance(got, CorruptCheckpointError), got


@pytest.mark.parametrize("op", ["cat", "info", "ls"])
async def test_read_faults_on_load_are_checkpoint_errors(op: str) -> None:
    """An I/O error while loading surfaces as a CheckpointError that names the path and keeps the cause (not as
    a bare OSError, and not as "the path does not exist")."""
    target = Target("fsspec", Path("/unused"))
    p = target.path("load")
    async with asyncckpt.CheckpointEngine(**OPTS) as engine:
        await (await engine.save(V0, p))
        if op == "ls":  # listing is only consulted when the manifest is missing
            FaultyFileSystem.store.pop(FaultyFileSystem._strip_protocol(f"{p}/{MANIFEST_NAME}"))
        error = None
        with target.faults(FaultPlan().add(op, 0)):
            try:
                await engine.load(p)
            except Exception as exc:  # noqa: BLE001 - checked below
                error = exc
    assert isinstance(error, CheckpointError), f"{op} fault surfaced as {error!r}"
    assert p in str(error)
    assert any(isinstance(c, InjectedFault) for c in cause_chain(error)), f"cause lost: {error!r}"


@pytest.mark.parametrize("kind", ["fsspec", "local"])
async def test_remove_interrupted_never_leaves_a_loadable_half(kind: str, tmp_path: Path) -> None:
    """A delete failing midway through ``remove``: the checkpoint is already uncommitted; a retry finishes."""
    target = Target(kind, tmp_path)
    p = target.path("rm")
    async with asyncckpt.CheckpointEngine(**OPTS) as engine:
        await (await engine.save(V0, p))
        with target.faults(FaultPlan().add("unlink" if kind == "local" else "rm", 3)):
            with pytest.raises(OSError):
                await engine.remove(p)
        got = await outcome(engine, p)
        assert isinstance(got, CheckpointError) and not isinstance(got, CorruptCheckpointError), got
        await engine.remove(p)
        assert target.listdir(p) == []
        await (await engine.save(V1, p))
        assert same(await engine.load(p), V1)


async def test_failed_snapshot_is_reported_once(tmp_path: Path) -> None:
    """A state that cannot be copied fails ``save`` itself; the engine stays usable and does not raise it again."""

    class Unpicklable:
        def __reduce__(self) -> Any:
            raise TypeError("no pickling")

    async with asyncckpt.CheckpointEngine(**OPTS) as engine:
        with pytest.raises(CheckpointError, match="not picklable"):
            await engine.save({"x": Unpicklable()}, tmp_path / "bad")
        await (await engine.save(V0, tmp_path / "good"))
        assert same(await engine.load(tmp_path / "good"), V0)
        await engine.wait()


async def test_unobserved_failure_surfaces_from_wait_and_next_save(tmp_path: Path) -> None:
    """A failed save nobody awaited is reported by wait() (once), and the engine then saves normally."""
    target = Target("fsspec", tmp_path)
    async with asyncckpt.CheckpointEngine(**OPTS) as engine:
        with target.faults(FaultPlan().add("write", 1)):
            await engine.save(V0, target.path("a"))
            with pytest.raises(CheckpointError, match="injected"):
                await engine.wait()
        await engine.wait()  # reported once only
        await (await engine.save(V1, target.path("a")))
        assert same(await engine.load(target.path("a")), V1)


async def test_failure_pending_at_close_is_raised_by_close(tmp_path: Path) -> None:
    """Leaving ``async with`` with a failed, unobserved save raises its error there."""
    target = Target("fsspec", tmp_path)
    with pytest.raises(CheckpointError, match="injected"):
        with target.faults(FaultPlan().add("close", 1)):
            async with asyncckpt.CheckpointEngine(**OPTS) as engine:
                await engine.save(V0, target.path("a"))
