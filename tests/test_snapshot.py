"""The snapshot stage: plan reuse across saves of one structure, warm-up, and deferred snapshots."""

from __future__ import annotations

import time

import anyio
import pytest
import torch

import asyncckpt
from faultfs import FaultPlan, faulty_os

from .helpers import assert_same, same


def test_a_plan_is_reused_while_the_structure_holds_and_the_checkpoints_hold_each_saves_values(tmp_path):
    model = torch.nn.Linear(32, 8)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 32)).sum().backward()
    opt.step()
    saved = []
    with asyncckpt.SyncEngine(chunk_bytes=4096, shard_bytes=8192) as engine:
        plans = engine.core.plans
        for step in range(4):
            with torch.no_grad():
                model.weight.add_(1.0)  # in place: the same memory, new values
            state = {"model": model, "opt": opt, "note": {"tags": {f"s{step % 2}"}}, "epoch": 3}
            engine.save(state, tmp_path / f"s{step}").result()
            saved.append({k: v.clone() for k, v in model.state_dict().items()})
        assert plans.reused == 3
        # a different plain value keeps the layout: the checkpoint holds the new value
        engine.save({"model": model, "opt": opt, "note": {"tags": {"s0"}}, "epoch": 4, "lr": [0.1, 0.2]},
                    tmp_path / "epoch").result()
        assert plans.reused == 4
        got = engine.load(tmp_path / "epoch")
        assert got["epoch"] == 4 and got["lr"] == [0.1, 0.2]
        # a new tensor key, a tensor under another name: each makes a new plan
        for change in ({"extra": torch.ones(3)}, {"opt": None, "o": opt}):
            engine.save({"model": model, "opt": opt, "note": {"tags": {"s0"}}, "epoch": 3, **change},
                        tmp_path / "changed").result()
            assert plans.reused == 4
            got = engine.load(tmp_path / "changed")
            for key, value in change.items():
                assert_same(got[key], value.state_dict() if isinstance(value, (torch.nn.Module, torch.optim.Optimizer))
                            else value)
        for step in range(4):
            got = engine.load(tmp_path / f"s{step}")
            assert_same(got["model"], type(got["model"])(saved[step]))
            assert got["note"] == {"tags": {f"s{step % 2}"}}  # pickled values are new every save


def test_a_tensor_changed_in_place_in_memory_shape_layout_dtype_or_sharing_gets_a_new_plan(tmp_path):
    # each change alters one thing the plan depends on, on the same tensor object (no new key, no new object)
    w, v, z = torch.arange(12.0), torch.randn(4), torch.tensor([1 + 2j, 3 - 4j])
    state = {"w": w, "v": v, "b": torch.zeros(4), "z": z, "step": 0}
    changes = {
        "shape": lambda: w.resize_(6),  # the same memory, fewer elements
        "strides": lambda: w.set_(w.untyped_storage(), 0, (6,), (2,)),
        "offset": lambda: w.set_(w.untyped_storage(), 1, (6,), (2,)),
        "dtype": lambda: setattr(w, "data", w.data.view(torch.int32)),  # .data: no version bump
        "requires_grad": lambda: v.requires_grad_(True),
        "sharing": lambda: state.update(b=w),  # one tensor under two keys
        "conjugate bit": lambda: state.update(z=z.conj()),  # the same bytes, seen conjugated
    }
    with asyncckpt.SyncEngine(chunk_bytes=4096) as engine:
        plans = engine.core.plans
        engine.save(state, tmp_path / "ck").result()
        for what, change in changes.items():
            change()
            reused = plans.reused
            engine.save(state, tmp_path / "ck").result()
            assert plans.reused == reused, what
            got = engine.load(tmp_path / "ck")
            assert torch.equal(got.pop("z"), state["z"].resolve_conj()), what
            assert_same(got, {k: v for k, v in state.items() if k != "z"}, what)
            engine.save(state, tmp_path / "ck").result()  # unchanged since: the new plan is reused
            assert plans.reused == reused + 1, what


def test_a_reused_plan_saves_the_current_values_of_conjugated_and_negated_views(tmp_path):
    z, base = torch.tensor([1 + 2j, 3 - 4j]), torch.arange(4.0)
    state = {"zc": z.conj(), "neg": base._neg_view()}  # the same objects at every save, updated in place
    with asyncckpt.SyncEngine(chunk_bytes=4096) as engine:
        for step in range(3):
            engine.save(state, tmp_path / "ck").result()
            got = engine.load(tmp_path / "ck")
            # a reused plan used to keep the bytes resolved for the first save: every later one saved those
            assert torch.equal(got["zc"], z.conj().resolve_conj()) and torch.equal(got["neg"], -base), step
            z.add_(1)
            base.add_(1)
        assert engine.core.plans.reused == 2


def test_tensors_in_new_memory_with_the_same_layout_keep_the_plan_and_their_new_values(tmp_path):
    # Lightning's checkpoints hold new score tensors at every save; a module may be rebuilt alike; a lazily
    # conjugated or negated view's bytes are resolved anew. Each save must hold that save's values.
    z = torch.tensor([1 + 2j, 3 - 4j])
    base = torch.arange(8.0)
    with asyncckpt.SyncEngine(chunk_bytes=4096) as engine:
        plans = engine.core.plans
        for step in range(4):
            state = {
                "model": torch.nn.Linear(6, 3).state_dict(),  # new memory every save
                "best_model_score": torch.tensor(0.5 - step),
                "zc": z.conj(), "neg": base._neg_view(),  # the same bytes, seen conjugated / negated
                "overlap": [base[:6], base[2:]],  # two views sharing stored bytes: they move together
                "step": step,
            }
            engine.save(state, tmp_path / f"s{step}").result()
            assert plans.reused == step
            got = engine.load(tmp_path / f"s{step}")
            assert torch.equal(got["zc"], z.conj().resolve_conj()) and torch.equal(got["neg"], -base)
            assert_same({k: v for k, v in got.items() if k not in ("zc", "neg")},
                        {k: v for k, v in state.items() if k not in ("zc", "neg")})
            z.add_(1)
            base = base + 1  # new memory for the overlapping views too
        # two tensors that become overlapping views of one storage: the layout changes, a new plan
        w = torch.randn(8)
        engine.save({"a": torch.randn(4), "b": torch.randn(4)}, tmp_path / "apart").result()
        reused = plans.reused
        engine.save({"a": w[:6], "b": w[2:]}, tmp_path / "apart").result()
        assert plans.reused == reused
        assert_same(engine.load(tmp_path / "apart"), {"a": w[:6], "b": w[2:]})


def test_a_reused_plan_never_gives_a_save_in_flight_the_next_saves_plain_values(tmp_path):
    w = torch.randn(4096)
    with asyncckpt.SyncEngine(chunk_bytes=4096) as engine:
        engine.save({"w": w, "step": 0}, tmp_path / "warm").result()
        with faulty_os(FaultPlan().add("pwrite", 0, "delay", delay_s=0.3)):  # the first save is still writing
            first = engine.save({"w": w, "step": 1, "tag": "one"}, tmp_path / "one")
            second = engine.save({"w": w, "step": 2, "tag": "two"}, tmp_path / "two")
            assert not first.done()
            first.result(), second.result()
        assert engine.core.plans.reused == 2
        assert engine.load(tmp_path / "one")["step"] == 1 and engine.load(tmp_path / "one")["tag"] == "one"
        assert engine.load(tmp_path / "two")["step"] == 2


def test_prepare_makes_the_first_save_reuse_plan_and_buffers(tmp_path):
    state = {"w": torch.randn(1 << 20), "b": torch.randn(1000), "step": 1}
    with asyncckpt.SyncEngine(chunk_bytes=1 << 20) as engine:
        engine.prepare(state)
        allocations = engine.staging.allocations
        assert allocations >= 4 and engine.core.plans.reused == 0
        engine.save(state, tmp_path / "a").result()
        assert engine.core.plans.reused == 1 and engine.staging.allocations == allocations
    with asyncckpt.SyncEngine() as engine:
        assert_same(engine.load(tmp_path / "a"), state)


def test_deferred_save_returns_before_the_copy_and_optimizer_steps_wait_for_it(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with asyncckpt.SyncEngine(chunk_bytes=1 << 20, host_memory_budget=2 << 20, snapshot="deferred") as engine:
        with faulty_os(FaultPlan().add("pwrite", 0, "delay", delay_s=0.01)):  # the copy waits for slow writes
            expected = {k: v.clone() for k, v in model.state_dict().items()}
            handle = engine.save({"model": model}, tmp_path / "ck")
            assert not handle.snapshot_done()  # 8 MiB through a 2 MiB budget: still copying
            model(torch.randn(4, 512)).sum().backward()  # forward and backward run meanwhile
            opt.step()  # waits for the copy, then changes the parameters
            assert handle.snapshot_done()
        handle.result()
        got = engine.load(tmp_path / "ck")
    assert_same(got["model"], type(got["model"])(expected), grad=False)


async def test_a_save_whose_copy_fails_never_touches_storage(tmp_path):
    """A save that fails during its copy (here: tensors changed during a deferred copy) ends before its job started:
    its storage set-up never runs, so nothing is created only to be undone."""
    state = {f"t{i}": torch.zeros(1 << 20) for i in range(64)}  # 256 MiB: the copy takes tens of milliseconds
    plan = FaultPlan()
    with faulty_os(plan):
        async with asyncckpt.CheckpointEngine(chunk_bytes=4 << 20, host_memory_budget=512 << 20) as engine:
            handle = await engine.save(state, tmp_path / "ck", snapshot="deferred")
            for t in state.values():  # without the fence, while the copy runs: those not copied yet are caught
                t.add_(1)
            with pytest.raises(asyncckpt.CheckpointError, match="was modified while the deferred snapshot"):
                await handle
    ours = str(tmp_path / "ck")
    assert not [op for op in plan.log if op[1].startswith(ours)]
    assert not (tmp_path / "ck").exists()


async def test_a_tensor_changed_during_a_deferred_copy_fails_the_save_and_names_it(tmp_path):
    w, other = torch.zeros(1 << 20), torch.zeros(1 << 20)
    async with asyncckpt.CheckpointEngine(chunk_bytes=1 << 20, host_memory_budget=1 << 20) as engine:
        await (await engine.save({"w": w, "other": other}, tmp_path / "ck")).wait()  # the previous checkpoint
        with faulty_os(FaultPlan().add("pwrite", 0, "delay", delay_s=0.05)):
            handle = await engine.save({"w": w, "other": other}, tmp_path / "ck", snapshot="deferred")
            w.add_(1)  # outside an optimizer, without the fence: a deliberate race
            other.add_(1)
            with pytest.raises(asyncckpt.CheckpointError, match="was modified while the deferred snapshot"):
                await handle
        got = await engine.load(tmp_path / "ck")
        assert torch.equal(got["w"], torch.zeros(1 << 20))  # the previous checkpoint stands, nothing torn
        handle = await engine.save({"w": w}, tmp_path / "fenced", snapshot="deferred")
        await handle.snapshotted()
        w.add_(1)
        await handle
        assert torch.equal((await engine.load(tmp_path / "fenced"))["w"], torch.ones(1 << 20))


def test_each_piece_of_a_chunk_lands_in_its_place_around_the_batched_copies(tmp_path):
    # back-to-back host tensors of a chunk are copied by one batch; a strided tensor, a chunk boundary cutting a
    # tensor, a pickled value and the aligned slots of a copy for a foreign serializer each end a batch
    g = torch.Generator().manual_seed(5)
    dtypes = (torch.float32, torch.int64, torch.bfloat16, torch.bool, torch.int16, torch.complex64)
    state = {"small": [torch.randn(1 + 7 * i, generator=g).to(dtypes[i % len(dtypes)]) for i in range(40)],
             "strided": torch.randn(33, 17, generator=g).t(),
             "cut": torch.randn(3000, generator=g),  # 12000 bytes: spans chunks of 4096
             "note": {"tags": {"x"}},
             "tail": [torch.randn(5, generator=g), torch.randn(9, generator=g)[::2], torch.arange(11)]}
    seen = []
    with asyncckpt.SyncEngine(chunk_bytes=4096) as engine:
        for _ in range(2):  # the second save reuses the plan
            engine.save(state, tmp_path / "native").result()
            assert_same(engine.load(tmp_path / "native"), state)
            engine.save_with(state, lambda copy: seen.append(same(copy, state)), tmp_path / "copy").result()
        assert engine.core.plans.reused == 1
    assert seen == [True, True]


def _hash_items() -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    g = torch.Generator().manual_seed(3)
    dense = [torch.randn(n, generator=g) for n in (3 << 20, 1 << 20, 7, 0, 1 << 18)]
    strided = torch.randn(1024, 2048, generator=g).t()  # 8 MiB, not contiguous: hashed in pieces
    items = [(t.view(torch.uint8), None) for t in dense]
    items.append((strided.view(torch.uint8) if strided.is_contiguous() else torch.empty(0, dtype=torch.uint8),
                  strided))
    return items


def test_incremental_hashing_is_shared_with_worker_threads_and_gives_the_same_digests():
    import concurrent.futures

    from asyncckpt.snapshot.incremental import PARALLEL_BYTES, bytes_digest, digest_tensors

    items = _hash_items()
    assert sum(s.numel() if t is None else t.nbytes for s, t in items) >= PARALLEL_BYTES  # the shared path runs
    alone = [bytes_digest(s, t) for s, t in items]
    ran: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        def submit(fn, *args):
            ran.append(fn.__name__)
            return pool.submit(fn, *args)

        assert digest_tensors(items, submit, workers=2) == alone
    assert len(ran) == 2


def test_hashing_never_waits_for_busy_workers():
    import concurrent.futures
    import threading

    from asyncckpt.snapshot.incremental import bytes_digest, digest_tensors

    items = _hash_items()
    release = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(release.wait, 60)  # the only worker is busy (a hung write, say)
        try:
            # the worker's share is taken back once the caller is done with its own: no wait on the busy worker
            assert digest_tensors(items, pool.submit, workers=1) == [bytes_digest(s, t) for s, t in items]
        finally:
            release.set()


def test_a_tensor_without_bytes_that_changes_dtype_or_shape_gets_a_new_plan(tmp_path):
    # a zero-element tensor has no bytes to compare: a reused plan kept the first save's dtype and shape for it
    t = torch.empty(0, 3)
    with asyncckpt.SyncEngine(chunk_bytes=4096) as engine:
        cases = [torch.empty(0, 3), torch.empty(0, dtype=torch.int64), torch.empty(2, 0, dtype=torch.float16), t]
        for step, e in enumerate(cases):
            engine.save({"w": torch.ones(4), "e": e}, tmp_path / f"s{step}").result()
        t.resize_(0, 5)  # the same object, another shape
        engine.save({"w": torch.ones(4), "e": t}, tmp_path / "resized").result()
        for name, e in [*((f"s{i}", e) for i, e in enumerate(cases[:3])), ("resized", t)]:
            got = engine.load(tmp_path / name)["e"]
            assert (got.dtype, got.shape) == (e.dtype, e.shape), name


@pytest.mark.parametrize("face", ["sync", "async"])
def test_prepare_during_a_deferred_copy_waits_for_it_and_never_repoints_its_plan(face, tmp_path):
    a = {"w": torch.full((1 << 20,), 1.0), "v": torch.full((1 << 20,), 1.0)}
    b = {"w": torch.full((1 << 20,), 2.0), "v": torch.full((1 << 20,), 2.0)}  # the same layout in other memory
    options = dict(chunk_bytes=1 << 20, host_memory_budget=2 << 20, snapshot="deferred")
    if face == "sync":
        with asyncckpt.SyncEngine(**options) as engine:
            engine.save(a, tmp_path / "warm").result()
            with faulty_os(FaultPlan().add("pwrite", 0, "delay", delay_s=0.01)):  # 8 MiB through 2: still copying
                handle = engine.save(a, tmp_path / "a")
                assert not handle.snapshot_done()
                engine.prepare(b)  # used to repoint the plan the copy was reading at b's tensors
                assert handle.snapshot_done()
                handle.result()
            got = engine.load(tmp_path / "a")
    else:
        async def run():
            async with asyncckpt.CheckpointEngine(**options) as engine:
                await (await engine.save(a, tmp_path / "warm"))
                with faulty_os(FaultPlan().add("pwrite", 0, "delay", delay_s=0.01)):
                    handle = await engine.save(a, tmp_path / "a")
                    assert not handle.snapshot_done()
                    await engine.prepare(b)
                    assert handle.snapshot_done()
                    await handle
                return await engine.load(tmp_path / "a")
        got = anyio.run(run)
    assert_same(got, a)


def test_a_deferred_save_of_inference_tensors_is_copied_before_save_returns(tmp_path, caplog):
    with torch.inference_mode():
        score = torch.tensor([0.25, 0.5])  # keeps no version counter: a deferred copy could not be proven
    w = torch.ones(1 << 16)
    with asyncckpt.SyncEngine(snapshot="deferred") as engine:
        handle = engine.save({"w": w, "score": score}, tmp_path / "ck")  # used to raise a bare RuntimeError
        assert handle.snapshot_done()  # copied at once, as an eager save
        w.add_(1)
        handle.result()
        assert "inference tensors" in caplog.text
        assert_same(engine.load(tmp_path / "ck"), {"w": torch.ones(1 << 16), "score": score})


def test_a_lazy_conjugate_changed_after_a_deferred_save_returned_does_not_fail_it(tmp_path):
    # its bytes are resolved into new memory when the save is planned: later changes cannot reach the checkpoint
    c = torch.tensor([1 + 2j, 3 - 4j])
    w = torch.zeros(1 << 20)
    with asyncckpt.SyncEngine(chunk_bytes=1 << 20, host_memory_budget=1 << 20, snapshot="deferred") as engine:
        for step in range(2):  # the second save reuses the plan
            with faulty_os(FaultPlan().add("pwrite", 0, "delay", delay_s=0.05)):
                handle = engine.save({"w": w, "z": c.conj()}, tmp_path / f"s{step}")
                assert not handle.snapshot_done()
                expected = c.conj().resolve_conj()
                c.mul_(2)  # used to fail the save: the check looked at the caller's view, not at the bytes copied
                handle.result()
            assert torch.equal(engine.load(tmp_path / f"s{step}")["z"], expected), step


def test_a_batchnorm_forward_during_a_deferred_copy_waits_for_it(tmp_path):
    # BatchNorm updates its running statistics inside its kernel, which bumps no version counter: a forward racing
    # the copy tore the checkpoint silently, or failed the save (num_batches_tracked does bump its counter)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.BatchNorm1d(256))
    big = {f"pad{i}": torch.zeros(1 << 18) for i in range(8)}  # 8 MiB through a 2 MiB budget: still copying
    with asyncckpt.SyncEngine(chunk_bytes=1 << 20, host_memory_budget=2 << 20, snapshot="deferred") as engine:
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        with faulty_os(FaultPlan().add("pwrite", 0, "delay", delay_s=0.01)):
            handle = engine.save({"pad": big, "model": model}, tmp_path / "ck")
            assert not handle.snapshot_done()
            model(torch.randn(16, 256))  # training mode: waits for the copy, then updates the running statistics
            assert handle.snapshot_done()
            handle.result()
        model.eval()
        with faulty_os(FaultPlan().add("pwrite", 0, "delay", delay_s=0.01)):
            handle = engine.save({"pad": big, "model": model}, tmp_path / "eval")
            model(torch.randn(16, 256))  # evaluation mode changes nothing: no wait
            assert not handle.snapshot_done()
            handle.result()
        got = engine.load(tmp_path / "ck")
    assert_same(got["model"], type(got["model"])(expected), grad=False)
    assert not torch.equal(model.state_dict()["1.running_mean"], expected["1.running_mean"])


def test_a_tensor_changed_after_its_chunk_was_checked_still_fails_the_deferred_save(tmp_path):
    # an in-place update bumps the version counter when its kernel returns: one that overlapped a chunk's copy can
    # move the counter only after that chunk was checked. The end of the copy checks every chunk again.
    first, second = torch.zeros(1 << 17), torch.zeros(1 << 19)  # a: in the first chunk only; b: in the next ones
    with asyncckpt.SyncEngine(chunk_bytes=1 << 20, host_memory_budget=1 << 20, snapshot="deferred") as engine:
        engine.save({"a": first, "b": second}, tmp_path / "ck").result()
        with faulty_os(FaultPlan().add("pwrite", 0, "delay", delay_s=0.2)):  # the second chunk waits for the first
            handle = engine.save({"a": first, "b": second}, tmp_path / "ck")
            time.sleep(0.05)  # the first chunk is copied and checked; the copy waits for budget
            assert not handle.snapshot_done()
            first.add_(1)
            with pytest.raises(asyncckpt.CheckpointError, match="tensor at a was modified"):
                handle.result()
        assert torch.equal(engine.load(tmp_path / "ck")["a"], torch.zeros(1 << 17))  # the previous one stands
