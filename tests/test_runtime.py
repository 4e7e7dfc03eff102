"""One runtime for both faces: background work progresses whatever the caller does, under asyncio and trio."""

from __future__ import annotations

import threading
import time

import anyio
import pytest
import torch
import trio

import asyncckpt
from faultfs import FaultPlan, faulty_os

from .helpers import assert_same

MiB = 1 << 20


def state(n: int = 2 * MiB) -> dict:
    return {"w": torch.arange(n, dtype=torch.float32), "step": 3}


async def test_writes_commit_while_the_caller_loop_never_yields(tmp_path):
    async with asyncckpt.CheckpointEngine(chunk_bytes=1 * MiB) as engine:
        handle = await engine.save(state(), tmp_path / "ck")
        deadline = time.monotonic() + 30
        while not handle.done() and time.monotonic() < deadline:  # a training step: compute, never await
            time.sleep(0.01)
        assert handle.done(), "the save made no progress while the caller's loop was busy"
        result = await handle
        assert result.bytes_written > 8 * MiB
        assert_same(await engine.load(tmp_path / "ck"), state())


def test_the_engine_runs_under_trio(tmp_path):
    async def main() -> dict:
        async with asyncckpt.CheckpointEngine(chunk_bytes=1 * MiB, host_memory_budget=4 * MiB) as engine:
            handles = [await engine.save(state(), tmp_path / f"ck{i}") for i in range(3)]
            with trio.move_on_after(0):  # cancelling a wait stops the wait, not the save
                await handles[0]
            for h in handles:
                await h
            assert await engine.latest(tmp_path) is not None
            await engine.remove(tmp_path / "ck1")
            return await engine.load(tmp_path / "ck2")

    assert_same(trio.run(main), state())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck0", "ck2"]


async def test_cancelling_save_while_it_waits_for_memory_aborts_only_that_save(tmp_path):
    async with asyncckpt.CheckpointEngine(chunk_bytes=1 * MiB, host_memory_budget=1 * MiB) as engine:
        with faulty_os(FaultPlan().add("pwrite", 0, "delay", delay_s=0.02)):  # a slow disk: 20 ms per write
            with anyio.move_on_after(0.1) as scope:
                await engine.save(state(8 * MiB), tmp_path / "big")  # 32 chunks through a one-chunk budget
        assert scope.cancelled_caught
        result = await (await engine.save(state(), tmp_path / "next"))
        assert result.shards == 1
        assert engine.staging.in_use_bytes == 0
    assert not (tmp_path / "big" / "manifest.json").exists()


def test_closing_an_engine_joins_every_thread_it_started(tmp_path):
    before = set(threading.enumerate())
    with asyncckpt.SyncEngine(chunk_bytes=1 * MiB, write_concurrency=4) as engine:
        for i in range(3):
            engine.save(state(), tmp_path / f"ck{i}")
        engine.load(tmp_path / "ck0", state=state())
        assert len(set(threading.enumerate()) - before) >= 2  # the loop and its worker threads
    assert set(threading.enumerate()) - before == set()


def test_sync_and_async_faces_share_one_feed_loop():
    from asyncckpt import engine, sync_engine
    from asyncckpt.pipeline import feed

    assert sync_engine.drive is feed.drive and engine.drive_async is feed.drive_async
    assert sync_engine.feed is engine.feed is feed.feed


@pytest.mark.parametrize("face", ["sync", "async"])
def test_options_are_validated_once_for_both_faces(face):
    make = asyncckpt.SyncEngine if face == "sync" else asyncckpt.CheckpointEngine
    with pytest.raises(asyncckpt.InvalidArgumentError, match="chunk_bytes must be a multiple of 4096"):
        make(chunk_bytes=1000)
    with pytest.raises(ValueError, match="host_memory_budget"):  # also a ValueError, as before
        make(host_memory_budget=4096, chunk_bytes=8192)


def test_calls_made_for_later_run_after_their_delay_in_the_order_made():
    """What a copying thread hands over with ``call_later`` runs on the loop once the delay has passed, in the order
    it was handed over, whichever thread made the call; a ``call_soon`` made after them may run first."""
    from asyncckpt.concurrency.runtime import Runtime

    runtime = Runtime(workers=1)
    try:
        ran: list[tuple[str, float, bool]] = []
        done = threading.Event()

        def note(name: str) -> None:
            ran.append((name, time.perf_counter(), runtime.in_loop))
            if name == "last":
                done.set()

        t0 = time.perf_counter()
        for name in ("a", "b", "c"):
            runtime.call_later(0.3, note, name)
        runtime.call_soon(note, "soon")
        runtime.call_soon(runtime.call_later, 0.3, note, "last")  # made on the loop itself
        assert done.wait(10)
        assert [name for name, _, _ in ran] == ["soon", "a", "b", "c", "last"]
        assert all(in_loop for _, _, in_loop in ran)
        assert all(at - t0 >= 0.3 for name, at, _ in ran if name != "soon")
        assert ran[0][1] - t0 < 0.3
    finally:
        runtime.close()


def test_a_call_made_for_later_that_raises_stops_neither_the_next_nor_later_ones():
    """A hand-over that fails must not strand those queued behind it: they would never run, and every save after
    them would wait forever for its job to start."""
    from asyncckpt.concurrency.runtime import Runtime

    runtime = Runtime(workers=1)
    try:
        ran: list[str] = []
        done = threading.Event()

        def boom() -> None:
            raise RuntimeError("a failing hand-over")

        runtime.call_later(0.01, boom)
        runtime.call_later(0.01, ran.append, "queued behind it")
        time.sleep(0.2)  # the first timer has fired
        runtime.call_later(0.01, done.set)  # a later hand-over arms a timer of its own
        assert done.wait(10)
        assert ran == ["queued behind it"]
    finally:
        runtime.close()


def test_a_blocking_call_cut_short_by_its_operations_deadline_is_given_up_at_that_deadline():
    """``patience`` counts from the call's start, but a call that began late in a bounded operation (after a queue,
    or after the operation's earlier calls) is given up on when the operation's own deadline passes, not later."""
    from asyncckpt.concurrency.runtime import Runtime

    runtime = Runtime(workers=1)
    gate = threading.Event()
    try:
        async def operation() -> None:
            with anyio.fail_after(0.5):
                await anyio.sleep(0.3)  # what the operation did before this call
                await runtime.run_sync(gate.wait, 30, patience=5.0)

        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            runtime.call(operation)
        assert time.monotonic() - t0 < 2.0  # not 0.3 + 5 s
    finally:
        gate.set()
        runtime.close()
