"""Load and concurrency: many saves, loads and removes in flight; backpressure; cancellation; closing.

* saves to many paths run while others are loaded and removed; overlapping saves of one path commit in order;
* saves issued faster than the (slowed) disk absorbs them stay inside the host-memory budget: the staging pool
  never holds more than ``host_memory_budget`` bytes and the process RSS grows by far less than what is written;
* cancelling the task that waits in ``save`` (for staging memory) or in ``await handle`` corrupts nothing, leaks no
  staging memory and no threads, and does not come back later as somebody else's error;
* leaving ``async with`` finishes pending saves (or, when cancelled, aborts them cleanly), and an exception from
  the body comes out as itself;
* a SyncEngine serves several threads at once.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from faultfs import FaultPlan, cause_chain, faulty_os, same  # noqa: E402

import asyncckpt  # noqa: E402
from asyncckpt import CheckpointError, CorruptCheckpointError  # noqa: E402
from asyncckpt.format.manifest import MANIFEST_NAME  # noqa: E402
from asyncckpt.testing import mixed_state  # noqa: E402
from asyncckpt.tools.memory import current_rss  # noqa: E402


def make_state(v: int, n: int = 20_000) -> dict[str, Any]:
    """A state of about ``6 * n`` bytes, different for every ``v``."""
    return mixed_state(v, big_tensors=1, big_bytes=4 * n)


async def outcome(engine: asyncckpt.CheckpointEngine, path: Any) -> Any:
    try:
        return await engine.load(path)
    except CheckpointError as exc:
        return exc


def slow_disk(delay_s: float) -> Any:
    """Every data write on local disk takes ``delay_s`` longer (a disk slower than the snapshot)."""
    return faulty_os(FaultPlan().add("pwrite", 0, "delay", delay_s=delay_s))


async def test_many_paths_saved_loaded_and_removed_concurrently(tmp_path: Path) -> None:
    rng = random.Random(11)
    n = 48
    states = {i: make_state(i, n=rng.choice([2_000, 20_000, 60_000])) for i in range(n)}
    paths = {i: tmp_path / f"ck-{i:03d}" for i in range(n)}
    committed: set[int] = set()
    removed: set[int] = set()
    stats = {"saves": 0, "loads": 0, "removes": 0}
    async with asyncckpt.CheckpointEngine(write_concurrency=4, host_memory_budget=512 << 10, chunk_bytes=8192,
                                          shard_bytes=64 << 10, fsync=False) as engine:

        async def saver(ids: list[int]) -> None:
            for i in ids:
                handle = await engine.save(states[i], paths[i])
                stats["saves"] += 1
                tg.start_soon(commit, i, handle)
                await anyio.sleep(rng.random() * 0.002)

        async def commit(i: int, handle: Any) -> None:
            await handle
            committed.add(i)

        # Loaders and the remover count only what they did, not how often they looked, so a slow
        # machine (few commits early on) still exercises every kind of overlap.
        async def loader() -> None:
            done = 0
            while done < 30:
                await anyio.sleep(rng.random() * 0.01)
                live = sorted(committed - removed)
                if live:
                    i = rng.choice(live)
                    got = await outcome(engine, paths[i])
                    if i not in removed:  # a remove may have started meanwhile
                        assert same(got, states[i]), f"ck-{i} loads wrong: {got!r}"[:300]
                    stats["loads"] += 1
                    done += 1

        async def remover() -> None:
            while stats["removes"] < 8:
                await anyio.sleep(rng.random() * 0.02)
                live = sorted(committed - removed)
                if live:
                    i = rng.choice(live)
                    removed.add(i)
                    await engine.remove(paths[i])
                    stats["removes"] += 1

        async with anyio.create_task_group() as tg:
            ids = list(range(n))
            rng.shuffle(ids)
            tg.start_soon(saver, ids[: n // 2])
            tg.start_soon(saver, ids[n // 2:])
            tg.start_soon(loader)
            tg.start_soon(loader)
            tg.start_soon(remover)
        await engine.wait()
        assert engine.staging.in_use_bytes == 0
        assert engine.staging.allocated_bytes <= engine.options.budget
        for i in range(n):
            if i in removed:
                assert not paths[i].exists(), f"removed ck-{i} still there"
            else:
                assert same(await engine.load(paths[i]), states[i]), f"ck-{i} loads wrong at the end"
    assert stats["removes"] == 8 and stats["loads"] == 60, stats
    print(f"\nconcurrency: {stats}")


async def test_overlapping_saves_of_one_path_commit_in_order(tmp_path: Path) -> None:
    """Saves of the same path issued back to back (none awaited): each commits whole, the last one wins.

    Each commit sweeps the shards of earlier saves of the path; it must not delete the shards of a *later* save of
    the path that is still being written.
    """
    path = tmp_path / "last"
    states = [make_state(i, n=400_000) for i in range(5)]
    async with asyncckpt.CheckpointEngine(write_concurrency=4, chunk_bytes=1 << 16, shard_bytes=1 << 20) as engine:
        handles = [await engine.save(s, path) for s in states]
        for h in handles:
            await h
        got = await outcome(engine, path)
        assert not isinstance(got, CheckpointError), f"the last save's checkpoint is damaged: {got}"
        assert same(got, states[-1])
        doc_files = {f.name for f in path.iterdir()}
        assert MANIFEST_NAME in doc_files


async def test_backpressure_keeps_staging_within_budget(tmp_path: Path) -> None:
    """Saves issued faster than the disk writes: staging never exceeds the budget; RSS grows far less than what is
    in flight; ``save`` itself waits (backpressure) instead of buffering."""
    budget = 2 << 20
    state = {"w": torch.randn(4 << 20)}  # 16 MiB per save
    saves = 8
    peak = {"allocated": 0, "in_use": 0, "rss": 0}
    base_rss = current_rss()
    async with asyncckpt.CheckpointEngine(write_concurrency=4, host_memory_budget=budget, chunk_bytes=256 << 10,
                                          shard_bytes=8 << 20, fsync=False) as engine:
        stop = anyio.Event()

        async def monitor() -> None:
            while not stop.is_set():
                peak["allocated"] = max(peak["allocated"], engine.staging.allocated_bytes)
                peak["in_use"] = max(peak["in_use"], engine.staging.in_use_bytes)
                peak["rss"] = max(peak["rss"], current_rss() - base_rss)
                await anyio.sleep(0.001)

        with slow_disk(0.002):
            async with anyio.create_task_group() as tg:
                tg.start_soon(monitor)
                t0 = time.perf_counter()
                handles = [await engine.save(state, tmp_path / f"bp-{k}") for k in range(saves)]
                issue_s = time.perf_counter() - t0
                for h in handles:
                    await h
                stop.set()
        assert engine.staging.in_use_bytes == 0
        for k in (0, saves - 1):
            assert same(await engine.load(tmp_path / f"bp-{k}"), state)
    written = saves * state["w"].nbytes
    print(f"\nbackpressure: {written >> 20} MiB through a {budget >> 20} MiB budget; peak staging "
          f"{peak['allocated'] >> 10} KiB, peak RSS growth {peak['rss'] >> 20} MiB, issuing took {issue_s:.2f}s")
    assert peak["allocated"] <= budget and peak["in_use"] <= budget
    assert peak["rss"] < 48 << 20, f"RSS grew {peak['rss'] >> 20} MiB for {written >> 20} MiB of saves"


async def test_cancelled_while_waiting_for_staging_memory(tmp_path: Path) -> None:
    """``move_on_after`` around ``save`` fires while it waits for a buffer (after part of its state was already
    staged): nothing commits half, nothing leaks, and the cancelled save does not resurface as an error from
    ``wait`` or the next ``save``."""
    big = {"w": torch.randn(48 << 10)}  # 192 KiB: three of the four chunks the budget holds
    v0, v1 = make_state(0, n=30_000), make_state(1, n=30_000)  # ~150 KiB: needs three chunks
    async with asyncckpt.CheckpointEngine(write_concurrency=2, host_memory_budget=256 << 10, chunk_bytes=64 << 10,
                                          shard_bytes=1 << 20) as engine:
        await (await engine.save(v0, tmp_path / "kept"))
        plan = FaultPlan(hang_s=30).add("pwrite", 0, "hang", match="big")
        with faulty_os(plan):
            first = await engine.save(big, tmp_path / "big")  # its writes hang: the budget stays taken
            with anyio.move_on_after(0.2) as scope:
                await engine.save(v1, tmp_path / "kept")  # overwrite, cancelled mid-snapshot
            assert scope.cancelled_caught
            with anyio.move_on_after(0.2) as scope:
                await engine.save(v1, tmp_path / "fresh")  # new path, cancelled mid-snapshot
            assert scope.cancelled_caught
            plan.release()
            await first
        await engine.wait()  # the cancelled saves were the caller's own doing: no error here
        assert engine.staging.in_use_bytes == 0
        assert same(await engine.load(tmp_path / "kept"), v0)
        got = await outcome(engine, tmp_path / "fresh")
        assert isinstance(got, CheckpointError) and not isinstance(got, CorruptCheckpointError), got
        await (await engine.save(v1, tmp_path / "fresh"))
        assert same(await engine.load(tmp_path / "fresh"), v1)
        assert sorted(os.listdir(tmp_path / "kept")).count(MANIFEST_NAME) == 1


async def test_cancelling_the_waiter_does_not_cancel_the_save(tmp_path: Path) -> None:
    state = make_state(3, n=400_000)
    async with asyncckpt.CheckpointEngine(chunk_bytes=1 << 16) as engine:
        with slow_disk(0.002):
            handle = await engine.save(state, tmp_path / "ck")
            with anyio.move_on_after(0.01):
                await handle
            result = await handle
        assert result.bytes_written > state["big"][0].nbytes
        assert same(await engine.load(tmp_path / "ck"), state)


def test_no_threads_or_buffers_leak_after_cancellations(tmp_path: Path) -> None:
    """Cancel saves at different moments on fresh event loops: worker threads and staging memory go away, and a
    save cancelled by its caller is not reported again as a failure."""
    baseline = threading.active_count()
    late_errors: list[str] = []

    async def round_(k: int) -> int:
        async with asyncckpt.CheckpointEngine(write_concurrency=4, host_memory_budget=256 << 10,
                                              chunk_bytes=32 << 10) as engine:
            with anyio.move_on_after(0.004 * k):
                h = await engine.save(make_state(k, n=100_000), tmp_path / f"t{k}")
                await h
            try:
                await engine.wait()
            except CheckpointError as exc:
                late_errors.append(f"round {k}: {exc}")
            assert engine.staging.in_use_bytes == 0
            pool = engine.staging
        return pool.allocated_bytes

    with slow_disk(0.001):
        for k in range(10):
            assert anyio.run(round_, k) == 0, "staging buffers kept after close"
    deadline = time.monotonic() + 15
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= baseline, [t.name for t in threading.enumerate()]
    assert not late_errors, late_errors


async def test_close_with_pending_saves_completes_them(tmp_path: Path) -> None:
    states = [make_state(i, n=100_000) for i in range(6)]
    with slow_disk(0.001):
        async with asyncckpt.CheckpointEngine(chunk_bytes=32 << 10, host_memory_budget=1 << 20) as engine:
            for i, s in enumerate(states):
                await engine.save(s, tmp_path / f"c{i}")
    async with asyncckpt.CheckpointEngine() as engine:
        for i, s in enumerate(states):
            assert same(await engine.load(tmp_path / f"c{i}"), s)


async def test_cancelled_close_aborts_pending_saves_cleanly(tmp_path: Path) -> None:
    v0 = make_state(0)
    async with asyncckpt.CheckpointEngine() as engine:
        await (await engine.save(v0, tmp_path / "ck"))
    with slow_disk(0.005):
        with anyio.move_on_after(0.05):
            async with asyncckpt.CheckpointEngine(chunk_bytes=8192, host_memory_budget=1 << 20) as engine:
                await engine.save(make_state(1, n=400_000), tmp_path / "ck")
                await engine.save(make_state(2, n=400_000), tmp_path / "new")
                await anyio.sleep(30)
    assert engine.staging.allocated_bytes == 0
    async with asyncckpt.CheckpointEngine() as engine:
        assert same(await engine.load(tmp_path / "ck"), v0)  # the aborted overwrite left the old one
        got = await outcome(engine, tmp_path / "new")
        assert isinstance(got, CheckpointError) and not isinstance(got, CorruptCheckpointError), got
        assert sorted(os.listdir(tmp_path / "ck")) == sorted(
            [MANIFEST_NAME, *{f.name for f in (tmp_path / "ck").iterdir() if f.name != MANIFEST_NAME}])


async def test_exception_in_the_body_propagates_as_itself_and_saves_finish(tmp_path: Path) -> None:
    """An error in user code inside ``async with CheckpointEngine()`` is not wrapped in an ExceptionGroup, and the
    saves already issued still complete (the engine's promise for a non-cancelled exit)."""
    state = make_state(5, n=200_000)
    with pytest.raises(ValueError, match="user bug"):
        with slow_disk(0.001):
            async with asyncckpt.CheckpointEngine(chunk_bytes=32 << 10) as engine:
                await engine.save(state, tmp_path / "ck")
                raise ValueError("user bug")
    async with asyncckpt.CheckpointEngine() as engine:
        assert same(await engine.load(tmp_path / "ck"), state)


def test_sync_engine_serves_many_threads(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    with asyncckpt.SyncEngine(write_concurrency=4, host_memory_budget=1 << 20, chunk_bytes=32 << 10) as engine:

        def worker(t: int) -> None:
            try:
                handles = []
                for k in range(5):
                    handles.append(engine.save(make_state(10 * t + k), tmp_path / f"t{t}-{k}"))
                    handles.append(engine.save(make_state(10 * t + k), tmp_path / f"last-{t}"))
                for h in handles:
                    h.result()
                for k in range(5):
                    assert same(engine.load(tmp_path / f"t{t}-{k}"), make_state(10 * t + k))
                assert same(engine.load(tmp_path / f"last-{t}"), make_state(10 * t + 4))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
    assert not errors, [repr(e) for e in errors]
    assert not any(isinstance(c, CorruptCheckpointError) for e in errors for c in cause_chain(e))
