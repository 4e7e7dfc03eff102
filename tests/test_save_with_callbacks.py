"""``save_with`` serializers that keep what they were handed, and ``SaveHandle.add_done_callback``."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

import asyncckpt


def test_a_serializer_that_keeps_the_copy_keeps_its_values(caplog, tmp_path):
    """The copy's tensors are views of staging buffers that the next save reuses: a serializer that keeps them (a
    queue, an in-memory store) must still see its own save's values after later saves."""
    kept = []
    live = {"w": torch.zeros(1 << 14), "b": torch.zeros(16)}
    with asyncckpt.SyncEngine(host_memory_budget=1 << 20, chunk_bytes=1 << 16) as engine:
        with caplog.at_level(logging.WARNING, logger="asyncckpt"):
            for step in range(5):
                for t in live.values():
                    t.fill_(step)
                engine.save_with(live, kept.append, tmp_path / f"{step}.ckpt").result()
        pool = engine.core.pool
        used, held = pool.in_use_bytes, pool.allocated_bytes
    for step, copy in enumerate(kept):
        assert torch.equal(copy["w"], torch.full((1 << 14,), float(step)))
        assert torch.equal(copy["b"], torch.full((16,), float(step)))
    assert sum("kept tensors" in r.getMessage() for r in caplog.records) == 1  # once per engine, not per save
    assert used == 0 and held == 0  # the kept buffers left the pool's accounting (they are the serializer's now)


def test_a_serializer_that_keeps_nothing_reuses_the_buffers(tmp_path):
    sums = []
    with asyncckpt.SyncEngine(host_memory_budget=1 << 20, chunk_bytes=1 << 16) as engine:
        for step in range(4):
            engine.save_with({"w": torch.full((1 << 14,), float(step))}, lambda c: sums.append(float(c["w"].sum())),
                             tmp_path / f"{step}.ckpt").result()
        allocations = engine.core.pool.allocations
    assert sums == [0.0, 16384.0, 32768.0, 49152.0]
    assert allocations == 1  # one buffer, reused by every save


def test_done_callbacks_run_once_for_every_outcome(caplog, tmp_path):
    seen = []
    with asyncckpt.SyncEngine() as engine:
        ok = engine.save_with({"w": torch.ones(4)}, lambda c: None, tmp_path / "a")
        ok.add_done_callback(lambda h: seen.append(("ok", h.done(), threading.current_thread().name)))

        def boom(copy):
            raise OSError(28, "No space left on device")

        bad = engine.save_with({"w": torch.ones(4)}, boom, tmp_path / "b")
        bad.add_done_callback(lambda h: seen.append(("bad", h.done(), None)))
        bad.add_done_callback(lambda h: 1 / 0)  # logged, never propagated, never counted as observing the error
        with pytest.raises(asyncckpt.CheckpointError, match="No space left"):
            bad.result()
        ok.result()
        late = []
        ok.add_done_callback(late.append)  # already settled: called at once, on this thread
        assert late == [ok]
    assert sorted(s[:2] for s in seen) == [("bad", True), ("ok", True)]
    assert any("done callback" in r.getMessage() for r in caplog.records)


def test_a_serializer_that_raises_systemexit_or_waits_for_its_own_save_fails_that_save_only(tmp_path):
    # SystemExit from the serializer reached the engine's loop and ended it: later saves hung, other calls raised
    # RuntimeError. close(), wait(), or a load/save/remove of its own path from inside it waited for itself forever.
    with asyncckpt.SyncEngine() as engine:
        def exits(copy):
            raise SystemExit(3)

        with pytest.raises(asyncckpt.CheckpointError, match="raised SystemExit"):
            engine.save_with({"w": torch.ones(4)}, exits, tmp_path / "x").result()
        calls = {
            "close": lambda: engine.close(),
            "wait": lambda: engine.wait(),
            "wait_for": lambda: engine.wait_for(tmp_path / "y"),
            "load": lambda: engine.load(tmp_path / "y"),
            "save": lambda: engine.save({"w": torch.ones(4)}, tmp_path / "y"),
            "remove": lambda: engine.remove(tmp_path / "y"),
        }
        refused = {}
        for name, call in calls.items():
            def serializer(copy, call=call, name=name):
                try:
                    call()
                except asyncckpt.CheckpointError as exc:
                    refused[name] = str(exc)
            engine.save_with({"w": torch.ones(4)}, serializer, tmp_path / "y").result(timeout=30)
        assert sorted(refused) == sorted(calls), refused
        assert all("inside a save_with serializer" in m for m in refused.values()), refused
        engine.save_with({"w": torch.ones(4)}, lambda copy: engine.save({"v": torch.zeros(2)}, tmp_path / "z"),
                         tmp_path / "y").result(timeout=30)  # another path is fine
        engine.wait()
        assert torch.equal(engine.load(tmp_path / "z")["v"], torch.zeros(2))
