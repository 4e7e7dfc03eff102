"""``io_timeout`` on local disk: a write, read or listing that hangs (a dead NFS server, a stuck device) fails the
save or load with a clear error in bounded time; the committed checkpoint stays; nothing hangs."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import anyio
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from faultfs import FaultPlan, faulty_os  # noqa: E402

import asyncckpt  # noqa: E402
from asyncckpt import InvalidArgumentError, StorageTimeoutError  # noqa: E402

OPTS = dict(write_concurrency=2, chunk_bytes=64 << 10, host_memory_budget=4 << 20, io_timeout=1.0)
LIMIT = 30.0  # seconds any failing call may take here (the timeout is 1 s; a shared machine is slow)


def state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(100_000, generator=g), "step": seed}


def test_a_hung_write_fails_the_save_and_the_previous_checkpoint_stays(tmp_path):
    path = str(tmp_path / "ckpt")
    plan = FaultPlan(hang_s=120).add("pwrite", nth=0, action="hang", match="shard-")
    with asyncckpt.SyncEngine(**OPTS) as engine:
        engine.save(state(1), path).result()
        with faulty_os(plan):
            t0 = time.monotonic()
            with pytest.raises(StorageTimeoutError, match=r"write at byte \d+ of .*ckpt/shard-.*io_timeout=1s") as info:
                engine.save(state(2), path).result()
            assert time.monotonic() - t0 < LIMIT
            assert info.value.operation.startswith("write") and "shard-" in info.value.path
            assert any(op == "pwrite" for op, _, _ in plan.fired)
            # the engine stays usable while the hung write is still stuck in its thread, and the old one loads
            out = engine.load(path)
            assert torch.equal(out["w"], state(1)["w"]) and out["step"] == 1
        # the hung thread is let go when the plan ends; the next save commits
        engine.save(state(3), path).result()
        assert engine.load(path)["step"] == 3
    assert asyncckpt.latest(str(tmp_path)) is not None


def test_a_hung_read_fails_the_load_in_place(tmp_path):
    path = str(tmp_path / "ckpt")
    plan = FaultPlan(hang_s=120).add("read", nth=0, action="hang", match="shard-")
    with asyncckpt.SyncEngine(**OPTS) as engine:
        engine.save(state(1), path).result()
        target = state(0)
        with faulty_os(plan):
            t0 = time.monotonic()
            with pytest.raises(StorageTimeoutError, match=r"read at byte \d+ of .*shard-"):
                engine.load(path, state=target)
            assert time.monotonic() - t0 < LIMIT
            in_use = engine.core.pool.in_use_bytes
        assert in_use == 0  # the hung read's buffer is retired (never handed out again), the others returned
        out = engine.load(path)
        assert torch.equal(out["w"], state(1)["w"])


def test_a_hung_listing_after_the_commit_does_not_hang_the_save(tmp_path):
    """The sweep after the manifest lists the directory: on a hung listing the save is still committed."""
    path = str(tmp_path / "ckpt")
    plan = FaultPlan(hang_s=120).add("listdir", nth=0, action="hang", match="ckpt")
    with asyncckpt.SyncEngine(**OPTS) as engine:
        with faulty_os(plan):
            t0 = time.monotonic()
            engine.save(state(1), path).result()
            assert time.monotonic() - t0 < LIMIT
            assert any(op == "listdir" for op, _, _ in plan.fired)
        assert engine.load(path)["step"] == 1


@pytest.mark.parametrize("bad", [0, -1, float("inf"), "5", True])
def test_io_timeout_must_be_a_positive_number(bad):
    with pytest.raises(InvalidArgumentError, match="io_timeout must be a positive number"):
        asyncckpt.EngineOptions(io_timeout=bad)


def test_engines_bound_each_storage_operation_by_default():
    """A hung NFS mount or endpoint fails a save after ten minutes unless the caller asks for no limit."""
    assert asyncckpt.EngineOptions().io_timeout == 600
    assert asyncckpt.CheckpointEngine().options.io_timeout == 600
    with asyncckpt.SyncEngine() as engine:
        assert engine.options.io_timeout == 600
    assert asyncckpt.EngineOptions(io_timeout=None).io_timeout is None


async def test_a_cancelled_save_waits_for_a_blocked_write_only_until_io_timeout(tmp_path):
    """Leaving the engine's scope by cancellation waits for a write already running (it reads a staging buffer),
    but a write blocked past ``io_timeout`` is hung: it is given up on and the exit returns."""
    plan = FaultPlan(hang_s=60).add("pwrite", nth=0, action="hang", match="shard-")
    try:
        with faulty_os(plan):
            t0 = time.monotonic()
            with anyio.move_on_after(0.2):
                async with asyncckpt.CheckpointEngine(**{**OPTS, "io_timeout": 3.0}) as engine:
                    await engine.save(state(1), str(tmp_path / "ckpt"))
                    await anyio.sleep(60)
            waited = time.monotonic() - t0
            assert any(op == "pwrite" for op, _, _ in plan.fired)
            assert 2.5 < waited < LIMIT, waited
    finally:
        plan.release()
    assert asyncckpt.latest(str(tmp_path)) is None  # the cancelled save committed nothing


async def test_a_load_cancelled_while_its_reads_hang_never_hands_their_buffers_out_again(tmp_path):
    """A read given up on (its load was cancelled, and it then outlived ``io_timeout``) may still land in its staging
    buffer later. Handed to the next save, that buffer could change between the save's copy and its write, and the
    checksum, taken at the write, would vouch for the wrong bytes: such buffers leave the pool."""
    path = str(tmp_path / "ckpt")
    plan = FaultPlan(hang_s=60).add("read", nth=0, action="hang", match="shard-")
    async with asyncckpt.CheckpointEngine(**{**OPTS, "io_timeout": 2.0}) as engine:
        await (await engine.save(state(1), path))
        pool = engine.core.pool
        before = pool.allocated_bytes
        try:
            with faulty_os(plan):
                t0 = time.monotonic()
                with anyio.move_on_after(0.2):
                    await engine.load(path, state=state(0))
                assert 1.5 < time.monotonic() - t0 < LIMIT  # the running reads were waited for, up to io_timeout
                hung = sum(op == "read" for op, _, _ in plan.fired)
        finally:
            plan.release()
        assert hung == OPTS["write_concurrency"] and pool.in_use_bytes == 0
        assert before - pool.allocated_bytes >= hung * OPTS["chunk_bytes"], (before, pool.allocated_bytes)
        out = await engine.load(path)
    assert torch.equal(out["w"], state(1)["w"])


def test_a_save_fails_in_bounded_time_when_its_clean_up_hangs_too(tmp_path):
    """On a hung mount every call hangs, the clean-up's ``unlink`` of the failed shard too; it runs in a worker
    thread, so io_timeout ends it as well and the engine's loop never blocks."""
    path = str(tmp_path / "ckpt")
    plan = (FaultPlan(hang_s=120).add("pwrite", nth=0, action="hang", match="shard-")
            .add("unlink", nth=0, action="hang", match="shard-"))
    with asyncckpt.SyncEngine(**OPTS) as engine:
        engine.save(state(1), path).result()
        try:
            with faulty_os(plan):
                t0 = time.monotonic()
                with pytest.raises(StorageTimeoutError, match="write at byte"):
                    engine.save(state(2), path).result()
                assert time.monotonic() - t0 < LIMIT
                assert any(op == "unlink" for op, _, _ in plan.fired)
                assert engine.load(path)["step"] == 1  # the loop is free: other calls go on
        finally:
            plan.release()


def test_a_manifest_given_up_on_is_never_renamed_over_a_later_save(tmp_path):
    """A save whose manifest hung (creating its temporary file) failed; a later save of the path committed,
    sweeping the failed one's shards. When the hung call wakes up it must not rename its stale manifest over the
    new one: that would name deleted shards."""
    path = str(tmp_path / "ckpt")
    plan = FaultPlan(hang_s=120).add("create", nth=1, action="hang", match="manifest.json")
    with asyncckpt.SyncEngine(**OPTS) as engine:
        try:
            with faulty_os(plan):
                with pytest.raises(StorageTimeoutError):
                    engine.save(state(1), path).result()
                assert plan.fired
                engine.save(state(2), path).result()  # while the first save's call still hangs
                plan.release()
                runtime, deadline = engine.core.runtime, time.monotonic() + LIMIT
                while runtime.abandoned and time.monotonic() < deadline:  # until the hung call has finished
                    time.sleep(0.05)
                assert not runtime.abandoned
        finally:
            plan.release()
        out = engine.load(path)
    assert out["step"] == 2 and torch.equal(out["w"], state(2)["w"])


def test_calls_given_up_on_as_hung_never_starve_saves_to_a_healthy_path(tmp_path):
    """Each write given up on keeps its worker thread stuck in the hung mount. Once half the workers are, later
    calls get fresh ones: after more failed saves than the engine has workers, a save elsewhere still commits."""
    options = {**OPTS, "write_concurrency": 1}  # one write at a time: each failed save leaves one thread stuck
    plan = FaultPlan(hang_s=120).add("pwrite", nth=0, action="hang", match="hung-mount")
    with asyncckpt.SyncEngine(**options) as engine:
        try:
            with faulty_os(plan):
                for i in range(6):  # the engine has write_concurrency + 4 = 5 workers
                    with pytest.raises(StorageTimeoutError, match="hung-mount"):
                        engine.save(state(i), str(tmp_path / "hung-mount" / f"c{i}")).result()
                assert sum(op == "pwrite" for op, _, _ in plan.fired) == 6
                t0 = time.monotonic()
                engine.save(state(9), str(tmp_path / "healthy")).result()
                assert time.monotonic() - t0 < LIMIT
        finally:
            plan.release()
        assert engine.load(str(tmp_path / "healthy"))["step"] == 9


def _open_shard_files(path: str) -> list[str]:
    """What this process's descriptors under ``path``'s shards point at."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{path}/shard-"):
            found.append(target)
    return found


def test_a_commit_given_up_on_keeps_its_descriptors_until_it_returns(tmp_path):
    """A shard's fsync that hung is given up on and the save cleans up; the descriptors stay open until the hung
    call returns, so it never reaches (or closes) a number since reused for another file."""
    path = str(tmp_path / "ckpt")
    plan = FaultPlan(hang_s=120).add("fsync", nth=1, action="hang", match="ckpt/shard-")
    with asyncckpt.SyncEngine(**OPTS) as engine:
        try:
            with faulty_os(plan):
                with pytest.raises(StorageTimeoutError, match="commit of"):
                    engine.save(state(1), path).result()
                assert _open_shard_files(path)  # held by the hung commit: the file itself was deleted
                plan.release()
                deadline = time.monotonic() + LIMIT
                while _open_shard_files(path) and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert not _open_shard_files(path)  # closed by the commit once it returned
        finally:
            plan.release()
        assert asyncckpt.latest(str(tmp_path)) is None
