"""CheckpointManager and incremental saves: retention, best-k, restart, fallback, preemption, references."""

from __future__ import annotations

import array
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import asyncckpt
from asyncckpt import CheckpointError, CheckpointManager, SyncCheckpointManager
from faultfs import FaultPlan, faulty_os

from .helpers import assert_same

ROOT = Path(__file__).resolve().parents[1]


def state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(64, generator=g), "step": step}


def steps_on_disk(d: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in d.glob("step-*") if (p / "manifest.json").exists())


def test_retention_keeps_last_best_and_every_kth_and_survives_a_restart(tmp_path):
    with SyncCheckpointManager(tmp_path, keep_last=2, keep_best=2, best_metric="val_loss", keep_every_steps=4) as m:
        for step in range(1, 11):
            m.save(step, state(step), metrics={"val_loss": abs(step - 3) + 0.5})
        m.wait()
        # last 2 (9, 10), best 2 (3, then 4: of 2 and 4, equally good, the newer), every 4th (4, 8)
        assert m.steps() == [3, 4, 8, 9, 10] == steps_on_disk(tmp_path)
        assert (m.latest_step(), m.best_step()) == (10, 3)
    with SyncCheckpointManager(tmp_path, keep_last=2, keep_best=2, best_metric="val_loss") as again:
        assert again.steps() == [3, 4, 8, 9, 10] and again.best_step() == 3  # rebuilt from the manifests
        target = state(0)
        assert again.restore(target) == 10
        assert_same(target, state(10))
        again.save(11, state(11), metrics={"val_loss": 9.0})
    assert steps_on_disk(tmp_path) == [3, 4, 10, 11]


def test_retention_reads_only_the_new_manifest_and_sees_removed_directories(tmp_path):
    import shutil

    with SyncCheckpointManager(tmp_path, keep_last=None) as m:
        for step in range(1, 13):
            m.save(step, state(step))
            m.wait()
        with faulty_os(FaultPlan()) as plan:
            m.save(13, state(13))
            m.wait()
        reads = sorted(p for op, p in plan.log if op == "open" and p.endswith("manifest.json"))
        assert reads == [str(tmp_path / "step-000013" / "manifest.json")]  # not all 13, on every save
        shutil.rmtree(tmp_path / "step-000005")  # gone behind the manager's back: the listing notices
        m.save(14, state(14))
        m.wait()
        assert m.steps() == [s for s in range(1, 15) if s != 5] == steps_on_disk(tmp_path)


def test_restore_falls_back_past_a_damaged_checkpoint_and_says_so(tmp_path, caplog):
    with SyncCheckpointManager(tmp_path, keep_last=3) as m:
        for step in (1, 2, 3):
            m.save(step, state(step)).result()
        shard = next((tmp_path / "step-000003").glob("shard-*"))
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))
        target = state(0)
        with caplog.at_level("WARNING", logger="asyncckpt"):
            assert m.restore(target) == 2
        assert_same(target, state(2))
        assert any("step 3" in r.message and "checksum mismatch" in r.message for r in caplog.records)
    with SyncCheckpointManager(tmp_path / "empty") as m:
        assert m.restore(state(0)) is None and m.latest_step() is None and m.best_step() is None


def test_if_busy_skip_returns_none_instead_of_piling_up(tmp_path, caplog):
    big = {"w": torch.randn(2 << 20)}
    with SyncCheckpointManager(tmp_path, if_busy="skip", keep_last=None, chunk_bytes=1 << 20) as m:
        with faulty_os(FaultPlan().add("pwrite", 0, "delay", delay_s=0.05)):
            first = m.save(1, big)
            with caplog.at_level("WARNING", logger="asyncckpt"):
                skipped = [m.save(step, big) for step in (2, 3)]
            first.result()
        assert first is not None and skipped == [None, None]
        assert sum("if_busy='skip'" in r.message for r in caplog.records) == 1  # logged once
        assert m.save(4, big) is not None
    assert steps_on_disk(tmp_path) == [1, 4]


def test_frozen_backbone_writes_only_the_trainable_part(tmp_path):
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(9)])
    head = torch.nn.Linear(256, 256)
    for p in backbone.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(head.parameters())
    trainable = sum(p.numel() * 4 * 3 for p in head.parameters())  # weights + Adam's two moments
    with SyncCheckpointManager(tmp_path, keep_last=None, incremental=True, full_every=10) as m:
        written = []
        for step in range(1, 5):
            head(torch.randn(8, 256)).sum().backward()
            opt.step()
            result = m.save(step, {"backbone": backbone, "head": head, "opt": opt}).result()
            written.append(result.bytes_written)
    manifest = len((tmp_path / "step-000004" / "manifest.json").read_bytes())
    assert written[0] > 9 * 256 * 256 * 4  # the first save is full
    for w in written[1:]:
        assert w <= 1.1 * trainable + manifest + 4096, (w, trainable, manifest)
    with asyncckpt.SyncEngine() as engine:
        got = engine.load(tmp_path / "step-000004")
        assert_same(got["backbone"], backbone.state_dict())
        assert_same(got["head"], head.state_dict())
        with pytest.raises(CheckpointError, match="hold references"):
            engine.remove(tmp_path / "step-000001")
    assert asyncckpt.verify(tmp_path / "step-000004").ok
    converted = asyncckpt.to_torch_file(tmp_path / "step-000004", tmp_path / "flat.pt")
    assert converted.tensors == len(got["backbone"]) + len(got["head"]) + 6  # Adam: step and two moments each
    assert_same(torch.load(tmp_path / "flat.pt", weights_only=True)["backbone"], backbone.state_dict())


def test_full_every_bounds_the_chain_and_retention_keeps_what_is_referenced(tmp_path):
    frozen = torch.randn(4096)
    with SyncCheckpointManager(tmp_path, keep_last=1, incremental=True, full_every=2) as m:
        for step in range(1, 8):
            m.save(step, {"frozen": frozen, "step": torch.tensor(step)}).result()
        m.wait()
        chains = {s: json.loads((tmp_path / f"step-{s:06d}" / "manifest.json").read_text()).get("chain", 0)
                  for s in m.steps()}
    # 1 full, 2-3 incremental, 4 full, 5-6 incremental, 7 full: keep_last=1 keeps 7, which references nothing
    assert chains == {7: 0}
    assert steps_on_disk(tmp_path) == [7]
    with SyncCheckpointManager(tmp_path, keep_last=1, incremental=True, full_every=2) as m:
        m.save(8, {"frozen": frozen, "step": torch.tensor(8)}).result()
        m.wait()
        assert m.steps() == [7, 8]  # 8 references 7's frozen bytes: 7 stays
    with asyncckpt.SyncEngine() as engine:
        assert torch.equal(engine.load(tmp_path / "step-000008")["frozen"], frozen)


def test_trust_versions_skips_hashing_of_unchanged_tensors_and_sees_in_place_updates(tmp_path):
    frozen, moving = torch.randn(1 << 16), torch.zeros(1 << 16)
    with asyncckpt.SyncEngine() as engine:
        engine.save({"f": frozen, "m": moving}, tmp_path / "a", digests=True, trust_versions=True).result()
        moving.add_(1)  # bumps _version: hashed again, written again
        r = engine.save({"f": frozen, "m": moving}, tmp_path / "b", base=tmp_path / "a", trust_versions=True).result()
        assert r.bytes_written < frozen.nbytes + moving.nbytes
        got = engine.load(tmp_path / "b")
    assert torch.equal(got["f"], frozen) and torch.equal(got["m"], moving)


def test_trust_versions_never_gives_a_new_tensor_at_a_freed_ones_address_its_digest(tmp_path):
    # a new tensor where a hashed one lived, with the same layout, starts at the same _version (0): keyed by address
    # and version only, it took the old tensor's digest and the checkpoint referenced the old bytes
    memory = bytearray(4 * 4096)  # both tensors over this buffer: the second lies exactly where the first did
    with asyncckpt.SyncEngine() as engine:
        first = torch.frombuffer(memory, dtype=torch.float32)  # zeros, _version 0
        engine.save({"w": first}, tmp_path / "a", digests=True, trust_versions=True).result()
        del first
        memory[:] = array.array("f", [1.0] * 4096).tobytes()  # new values, not through torch
        second = torch.frombuffer(memory, dtype=torch.float32)
        assert second._version == 0
        engine.save({"w": second}, tmp_path / "b", base=tmp_path / "a", trust_versions=True).result()
        assert torch.equal(engine.load(tmp_path / "b")["w"], torch.ones(4096))


def test_an_incremental_save_builds_on_its_base_as_pending_saves_of_it_leave_it(tmp_path):
    # the base's manifest was read while a save replacing it was still writing: its commit swept the shards the
    # child referenced, and the child committed unloadable
    big = torch.randn(1 << 18)
    with asyncckpt.SyncEngine() as engine:
        engine.save({"w": big, "x": torch.zeros(4)}, tmp_path / "a", digests=True).result()
        with faulty_os(FaultPlan().add("pwrite", 0, "delay", delay_s=0.05)):
            first = engine.save({"w": big + 1, "x": torch.zeros(4)}, tmp_path / "a", digests=True)
            child = engine.save({"w": big, "x": torch.ones(4)}, tmp_path / "b", base=tmp_path / "a")
            first.result(), child.result()
        got = engine.load(tmp_path / "b")
    assert torch.equal(got["w"], big) and torch.equal(got["x"], torch.ones(4))


def test_an_empty_tensor_never_ties_a_checkpoint_to_its_base(tmp_path):
    with asyncckpt.SyncEngine() as engine:
        engine.save({"empty": torch.zeros(0), "x": torch.zeros(4)}, tmp_path / "a", digests=True).result()
        engine.save({"empty": torch.zeros(0), "x": torch.ones(4)}, tmp_path / "b", base=tmp_path / "a").result()
        manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
        assert [s.get("in") for s in manifest["shards"]] == [None] and manifest.get("chain", 0) == 0
        engine.remove(tmp_path / "a")  # nothing references it
        got = engine.load(tmp_path / "b")
    assert got["empty"].shape == (0,) and torch.equal(got["x"], torch.ones(4))


def test_a_path_saved_again_on_top_of_its_own_child_can_be_removed(tmp_path):
    # a's second save builds on b, which references a's first save's shard: a marked itself as that shard's
    # referrer, so removing a (and retention of a manager going back to an older step) was refused for good
    big = torch.randn(1 << 16)
    with asyncckpt.SyncEngine() as engine:
        engine.save({"w": big, "x": torch.zeros(4)}, tmp_path / "a", digests=True).result()
        engine.save({"w": big, "x": torch.ones(4)}, tmp_path / "b", base=tmp_path / "a").result()
        engine.save({"w": big, "x": torch.full((4,), 2.0)}, tmp_path / "a", base=tmp_path / "b").result()
        manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
        assert [s.get("in") for s in manifest["shards"]] == [None, None] and manifest.get("chain", 0) == 0
        engine.remove(tmp_path / "b")
        got = engine.load(tmp_path / "a")
        assert torch.equal(got["w"], big) and torch.equal(got["x"], torch.full((4,), 2.0))
        engine.remove(tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_bases_must_be_siblings_and_committed(tmp_path):
    with asyncckpt.SyncEngine() as engine:
        engine.save({"w": torch.ones(4)}, tmp_path / "x" / "a", digests=True).result()
        with pytest.raises(asyncckpt.InvalidArgumentError, match="next to it"):
            engine.save({"w": torch.ones(4)}, tmp_path / "y" / "b", base=tmp_path / "x" / "a")
        with pytest.raises(CheckpointError, match="no checkpoint"):
            engine.save({"w": torch.ones(4)}, tmp_path / "x" / "b", base=tmp_path / "x" / "nothing")


async def test_the_asyncio_manager(tmp_path):
    async with CheckpointManager(tmp_path, keep_last=2, incremental=True) as m:
        for step in range(5):
            handle = await m.save(step, state(step))
        await handle
        target = state(-1)
        assert await m.restore(target) == 4
    assert_same(target, state(4))
    assert steps_on_disk(tmp_path) == [3, 4]


def test_bad_manager_options_are_refused():
    for kwargs, match in (({"keep_best": 2}, "best_metric"), ({"best_mode": "up"}, "best_mode"),
                          ({"if_busy": "queue"}, "if_busy"), ({"keep_last": 0}, "keep_last"),
                          ({"full_every": 0}, "full_every")):
        with pytest.raises(asyncckpt.InvalidArgumentError, match=match):
            SyncCheckpointManager("x", **kwargs)


PREEMPTED = textwrap.dedent("""
    import sys, time, torch, asyncckpt
    with asyncckpt.SyncCheckpointManager(sys.argv[1], keep_last=2) as manager:
        step = 0
        print("ready", flush=True)
        while not manager.preempted:
            step += 1
            time.sleep(0.01)  # a training step
            if step % 10 == 0:
                manager.save(step, {"w": torch.full((1 << 16,), float(step)), "step": step})
        manager.save(step, {"w": torch.full((1 << 16,), float(step)), "step": step})  # the last one
        print("final", step, flush=True)
""")


def test_sigterm_marks_the_manager_preempted_and_the_last_save_lands(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", PREEMPTED, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    final = int(out.split()[-1])
    with asyncckpt.SyncEngine() as engine:
        assert engine.load(tmp_path / f"step-{final:06d}")["step"] == final
    assert steps_on_disk(tmp_path)[-1] == final


def policy_steps(saved: list[tuple[int, float]], keep_last: int, keep_best: int, every: int) -> set[int]:
    """The retention rule, written independently: newest, last k, best k (lowest metric, the newer on ties), every
    n-th step."""
    steps = [s for s, _ in saved]
    best = [s for s, _ in sorted(saved, key=lambda x: (x[1], -x[0]))][:keep_best]
    return set(steps[-keep_last:]) | set(best) | {s for s in steps if s % every == 0}


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["save", "restart", "restore"]), st.floats(0, 10, allow_nan=False)),
                min_size=1, max_size=14))
def test_retained_set_is_what_the_policy_says(tmp_path_factory, ops):
    d = tmp_path_factory.mktemp("policy")
    options = dict(keep_last=2, keep_best=1, best_metric="m", keep_every_steps=3)
    saved: list[tuple[int, float]] = []
    manager = SyncCheckpointManager(d, **options).__enter__()
    try:
        for op, metric in ops:
            if op == "save":
                step = len(saved) + 1
                manager.save(step, state(step), metrics={"m": metric})
                saved.append((step, metric))
            elif op == "restart":
                manager.__exit__(None, None, None)
                manager = SyncCheckpointManager(d, **options).__enter__()
            elif saved:
                manager.wait()
                target = state(0)
                assert manager.restore(target) == saved[-1][0]
                assert_same(target, state(saved[-1][0]))
        manager.wait()
        expected = policy_steps(saved, 2, 1, 3) if saved else set()
        assert set(manager.steps()) == expected == set(steps_on_disk(d))
        with asyncckpt.SyncEngine() as engine:
            for step in expected:
                assert_same(engine.load(d / f"step-{step:06d}"), state(step))
    finally:
        manager.__exit__(None, None, None)


async def test_a_manager_used_before_it_is_entered_says_how_to_open_it(tmp_path):
    manager = CheckpointManager(tmp_path)
    for call in (lambda: manager.save(1, state(1)), manager.wait, lambda: manager.restore(state(0))):
        with pytest.raises(CheckpointError, match=r"not open: use it as `async with CheckpointManager"):
            await call()
    sync = SyncCheckpointManager(tmp_path, engine=asyncckpt.SyncEngine())
    for call in (lambda: sync.save(1, state(1)), sync.wait, lambda: sync.restore(state(0))):
        with pytest.raises(CheckpointError, match=r"not open: use it as `with SyncCheckpointManager"):
            call()
    with sync:
        sync.save(1, state(1)).result()
    with pytest.raises(CheckpointError, match="not open"):  # and after it was left
        sync.save(2, state(2))
    assert steps_on_disk(tmp_path) == [1]


def test_what_interrupted_saves_and_removals_left_is_swept_by_the_next_retention(tmp_path):
    with SyncCheckpointManager(tmp_path, keep_last=3) as manager:
        for step in (1, 2, 3):
            manager.save(step, state(step)).result()
        manager.wait()
    (tmp_path / "step-000001" / "manifest.json").unlink()  # a removal killed after its manifest went
    debris = tmp_path / "step-000000"  # a save killed before its commit
    debris.mkdir()
    (debris / "shard-00000000deadbeef-00000.safetensors").write_bytes(b"\0" * 100)
    foreign = tmp_path / "step-000002x"  # not a name the manager writes: left alone
    foreign.mkdir()
    with SyncCheckpointManager(tmp_path, keep_last=3) as manager:
        assert manager.steps() == [2, 3]
        manager.save(4, state(4)).result()
        manager.wait()
        assert manager.steps() == [2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000002x", "step-000003", "step-000004"]
    with asyncckpt.SyncEngine() as engine:
        for step in (2, 3, 4):
            assert_same(engine.load(tmp_path / f"step-{step:06d}"), state(step))


def test_files_that_are_not_a_checkpoints_stay_and_saving_goes_on(tmp_path, caplog):
    with SyncCheckpointManager(tmp_path, keep_last=1) as m:
        m.save(1, state(1)).result()
        (tmp_path / "step-000001" / "config.yaml").write_text("lr: 0.1\n")  # the user's, next to the shards
        (tmp_path / "step-000000").write_text("a log file")  # a stray file with a step's name
        with caplog.at_level("WARNING", logger="asyncckpt"):
            for step in (2, 3, 4):
                m.save(step, state(step)).result()
                m.wait()  # before, retention failed here and every other save raised that failure
                assert m.steps() == [step] == steps_on_disk(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000", "step-000001", "step-000004"]
    assert [p.name for p in (tmp_path / "step-000001").iterdir()] == ["config.yaml"]  # the checkpoint's files went
    assert (tmp_path / "step-000001" / "config.yaml").read_text() == "lr: 0.1\n"
    assert (tmp_path / "step-000000").read_text() == "a log file"
    for name in ("step-000000", "step-000001"):  # each named once, with the way out
        warned = [r.message for r in caplog.records if f"{name} " in r.message or f"{name}:" in r.message]
        assert len(warned) == 1 and "remove it by hand" in warned[0], warned


def test_a_run_that_goes_on_from_a_lower_step_keeps_its_new_checkpoints(tmp_path):
    with SyncCheckpointManager(tmp_path, keep_last=1) as m:
        for step in (10, 20):
            m.save(step, state(step))
    shard = next((tmp_path / "step-000020").glob("shard-*"))
    shard.write_bytes(shard.read_bytes()[:10])  # the newest is damaged: the next run starts over
    with SyncCheckpointManager(tmp_path, keep_last=1) as m:
        assert m.restore(state(0)) is None
        for step in (1, 2):
            m.save(step, state(step)).result()
            m.wait()
            assert m.steps() == [step] == steps_on_disk(tmp_path) and m.latest_step() == step
    with SyncCheckpointManager(tmp_path, keep_last=1) as m:
        target = state(0)
        assert m.restore(target) == 2
    assert_same(target, state(2))


def test_sigterm_reaches_every_open_manager_and_the_handler_comes_back_in_any_closing_order(tmp_path):
    received = []

    def mine(signum, frame):
        received.append(signum)

    def term(*managers):
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not (all(m.preempted for m in managers) if managers else received) and time.monotonic() < deadline:
            time.sleep(0.01)

    original = signal.signal(signal.SIGTERM, mine)
    try:
        a = SyncCheckpointManager(tmp_path / "a").__enter__()
        b = SyncCheckpointManager(tmp_path / "b").__enter__()
        c = SyncCheckpointManager(tmp_path / "c").__enter__()
        a.__exit__(None, None, None)  # not the last opened
        term(b, c)
        assert (b.preempted, c.preempted, received) == (True, True, [])
        c.__exit__(None, None, None)
        b.__exit__(None, None, None)
        assert signal.getsignal(signal.SIGTERM) is mine
        term()
        assert received == [signal.SIGTERM] and not a.preempted
    finally:
        signal.signal(signal.SIGTERM, original)


def test_restore_skips_a_checkpoint_removed_after_the_manager_opened(tmp_path):
    import shutil

    with SyncCheckpointManager(tmp_path, keep_last=None) as m:
        for step in (1, 2):
            m.save(step, state(step))
    with SyncCheckpointManager(tmp_path, keep_last=None) as m:
        shutil.rmtree(tmp_path / "step-000002")
        target = state(0)
        assert m.restore(target) == 1
        assert m.steps() == [1]
    assert_same(target, state(1))


async def test_a_directory_that_cannot_be_read_on_entry_closes_the_engine_made_for_it():
    import threading

    before = set(threading.enumerate())
    with pytest.raises(CheckpointError, match="nosuchproto:// is not a protocol"):
        with SyncCheckpointManager("nosuchproto://bucket/run"):
            pass
    with pytest.raises(CheckpointError, match="nosuchproto:// is not a protocol"):
        async with CheckpointManager("nosuchproto://bucket/run"):
            pass
    assert [t.name for t in set(threading.enumerate()) - before] == []  # each engine's threads joined


def test_a_diverged_metric_is_recorded_by_name_and_never_ranks_as_best(tmp_path):
    # a NaN loss at the last save of a diverged run (often the preemption save) used to fail it: JSON has no NaN
    losses = {1: 0.5, 2: float("nan"), 3: float("-inf"), 4: 0.9}
    with SyncCheckpointManager(tmp_path, keep_last=1, keep_best=1, best_metric="loss") as m:
        for step, loss in losses.items():
            m.save(step, state(step), metrics={"loss": loss})
        m.wait()
        assert m.steps() == [1, 4] and m.best_step() == 1
    manifest = json.loads((tmp_path / "step-000004" / "manifest.json").read_text())
    assert manifest["metadata"]["metrics"] == {"loss": 0.9}
    with SyncCheckpointManager(tmp_path, keep_best=3, best_metric="loss") as m:
        m.save(5, state(5), metrics={"loss": float("nan"), "acc": 0.25})
        m.wait()
        assert m.best_step() == 1
        manifest = json.loads((tmp_path / "step-000005" / "manifest.json").read_text())
        assert manifest["metadata"]["metrics"] == {"loss": "nan", "acc": 0.25}


def test_a_missing_base_shard_is_reported_with_the_base_that_should_hold_it(tmp_path):
    frozen = torch.randn(1 << 14)
    with asyncckpt.SyncEngine() as engine:
        engine.save({"f": frozen, "x": torch.zeros(4)}, tmp_path / "p", digests=True).result()
        engine.save({"f": frozen, "x": torch.ones(4)}, tmp_path / "q", base=tmp_path / "p").result()
        for shard in (tmp_path / "p").glob("shard-*"):
            shard.unlink()  # by hand: the engine refuses to remove what q references
        with pytest.raises(asyncckpt.CorruptCheckpointError, match=r"q: shard \S+ \(in p, the base checkpoint"):
            engine.load(tmp_path / "q")
