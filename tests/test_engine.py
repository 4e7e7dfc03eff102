"""Core engine: round trips, point-in-time snapshots, buffer reuse, budget, formats, errors and ordering."""

from __future__ import annotations

import io
import json
import os
import threading
import time
from collections import OrderedDict

import anyio
import pytest
import torch
from safetensors import safe_open

import asyncckpt
from asyncckpt import CheckpointEngine, CheckpointError, CorruptCheckpointError, IncompleteCheckpointError
from asyncckpt.format.dtypes import SAFETENSORS_DTYPES

from faultfs import FaultPlan, faulty_os  # on the path: tests/conftest.py

from .helpers import assert_same, lightning_state, tiny_model

KiB, MiB = 1 << 10, 1 << 20


def small_engine(**kw) -> CheckpointEngine:
    opts = dict(chunk_bytes=64 * KiB, shard_bytes=256 * KiB, host_memory_budget=8 * MiB)
    opts.update(kw)
    return CheckpointEngine(**opts)


def manifest(path) -> dict:
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)


async def test_lightning_checkpoint_round_trip_matches_torch_save(tmp_path):
    state = lightning_state()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    via_torch = torch.load(buf, weights_only=True)
    async with small_engine(chunk_bytes=4 * KiB, shard_bytes=4 * KiB) as engine:
        result = await (await engine.save(state, tmp_path / "ck"))
        loaded = await engine.load(tmp_path / "ck")
    assert result.path == str(tmp_path / "ck") and result.bytes_written > 0 and result.shards > 1
    assert result.snapshot_seconds > 0 and result.write_seconds > 0
    assert_same(loaded, via_torch)
    assert_same(loaded, state)


def test_each_committed_save_is_one_info_record_and_nothing_is_said_by_default(tmp_path, caplog):
    import subprocess
    import sys

    silent = ("import logging, asyncckpt; log = logging.getLogger('asyncckpt'); "
              "assert log.level == logging.NOTSET and not log.handlers and not logging.getLogger().handlers")
    assert subprocess.run([sys.executable, "-c", silent], timeout=120).returncode == 0  # silent unless configured
    caplog.set_level("INFO", logger="asyncckpt")
    with asyncckpt.SyncEngine(shard_bytes=4096) as engine:
        result = engine.save({"a": torch.ones(1024), "b": torch.ones(1024)}, tmp_path / "ck").result()
        with pytest.raises(CheckpointError):
            engine.save({"a": torch.ones(2)}, tmp_path / "ck" / "manifest.json" / "x").result()
    saved = [r for r in caplog.records if r.getMessage().startswith("saved ")]
    assert len(saved) == 1 and saved[0].levelname == "INFO" and saved[0].name == "asyncckpt"
    message = saved[0].getMessage()
    assert message.startswith(f"saved {result.path}: {result.bytes_written} bytes in {result.shards} shards, ")
    assert f"blocked {result.snapshot_seconds:.3f} s" in message
    assert f"durable after {result.snapshot_seconds + result.write_seconds:.3f} s" in message


async def test_mutation_after_save_returns_does_not_reach_checkpoint(tmp_path):
    model = tiny_model()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    async with small_engine(chunk_bytes=4 * KiB) as engine:
        handle = await engine.save({"model": model}, tmp_path / "ck")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1000.0)
        await handle
        loaded = await engine.load(tmp_path / "ck")
    assert_same(loaded["model"], OrderedDict(expected))


async def test_repeated_saves_reuse_buffers_and_keep_their_own_values(tmp_path):
    weights = torch.zeros(64 * KiB // 4 * 3)  # spans several chunks
    async with small_engine(chunk_bytes=64 * KiB) as engine:
        handles = []
        for step in range(20):
            weights.fill_(step)
            handles.append(await engine.save({"w": weights, "step": step}, tmp_path / f"step-{step}"))
            if step == 0:
                await handles[0]
                first_allocations = engine.staging.allocations
            else:
                await handles[-1]
        assert engine.staging.allocations == first_allocations, "steady-state saves must reuse staging buffers"
        for step in range(20):
            loaded = await engine.load(tmp_path / f"step-{step}")
            assert loaded["step"] == step
            assert torch.all(loaded["w"] == step)


async def test_pipelined_saves_without_waiting_each_hold_their_own_values(tmp_path):
    weights = torch.zeros(200_000)
    async with small_engine(host_memory_budget=2 * MiB) as engine:
        for step in range(20):
            weights.fill_(step)
            await engine.save({"w": weights}, tmp_path / f"s{step}")
        await engine.wait()
        assert engine.staging.allocated_bytes <= 2 * MiB
        for step in range(20):
            assert torch.all((await engine.load(tmp_path / f"s{step}"))["w"] == step)


async def test_state_larger_than_budget_streams_within_budget(tmp_path):
    state = {f"layer{i}": torch.randn(256 * KiB // 4) for i in range(32)}  # 8 MiB
    budget = 1 * MiB
    peak = 0
    async with small_engine(host_memory_budget=budget, chunk_bytes=128 * KiB, shard_bytes=2 * MiB) as engine:
        async def watch():
            nonlocal peak
            while True:
                peak = max(peak, engine.staging.allocated_bytes)
                await anyio.sleep(0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            handle = await engine.save(state, tmp_path / "big")
            await handle
            tg.cancel_scope.cancel()
        loaded = await engine.load(tmp_path / "big")
    assert 0 < peak <= budget
    assert_same(loaded, state)


class _FirstOperation(FaultPlan):
    """Notes when the first local-disk operation starts."""

    def check(self, op, path):
        if self.started is None:
            self.started = time.perf_counter()
        return super().check(op, path)

    started: float | None = None


@pytest.mark.parametrize("overlap", [False, True], ids=["default", "overlap_writes"])
async def test_storage_work_waits_for_the_snapshot_unless_writes_overlap_it(tmp_path, overlap):
    """By default nothing of a save touches storage (not even its set-up) until the copy has ended: on a machine of
    few cores the copy has them to itself. With ``overlap_writes=True`` writing starts during the copy."""
    state = {f"t{i}": torch.randn(128 * KiB) for i in range(256)}  # 128 MiB in 512 chunks
    plan = _FirstOperation()
    with faulty_os(plan):
        async with small_engine(overlap_writes=overlap, chunk_bytes=256 * KiB, shard_bytes=16 * MiB,
                                host_memory_budget=256 * MiB) as engine:
            before = time.perf_counter()
            result = await (await engine.save(state, tmp_path / "c"))
    copy_ended_by = before + result.snapshot_seconds  # the save's own clock started after ``before``
    assert plan.started is not None
    assert (plan.started >= copy_ended_by) is not overlap, (plan.started - before, result.snapshot_seconds)
    async with small_engine() as engine:
        assert_same(await engine.load(tmp_path / "c"), state)


async def test_tied_weights_are_written_once_and_stay_tied(tmp_path):
    emb = torch.nn.Embedding(100, 32)
    head = torch.nn.Linear(32, 100, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    sd = model.state_dict(keep_vars=True)
    assert sd["emb.weight"] is sd["head.weight"]
    base = torch.arange(20.0)
    state = {"model": model, "whole": base, "part": base[5:15], "strided": base[::2]}
    async with small_engine() as engine:
        await (await engine.save(state, tmp_path / "tied"))
        loaded = await engine.load(tmp_path / "tied")
    m = manifest(tmp_path / "tied")
    own_bytes = sum(t.get("nbytes", 0) for t in m["tensors"])
    assert own_bytes == 100 * 32 * 4, "tied weight written once; views of `base` live in one storage blob"
    assert len(m["storages"]) == 1 and m["storages"][0]["nbytes"] == 80
    lm = loaded["model"]
    assert lm["emb.weight"] is lm["head.weight"]
    assert torch.equal(loaded["part"], base[5:15]) and torch.equal(loaded["strided"], base[::2])
    assert loaded["part"].untyped_storage().data_ptr() == loaded["whole"].untyped_storage().data_ptr()


def _all_dtype_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    out = {}
    raw = torch.randint(0, 256, (3, 5), dtype=torch.uint8)
    for dtype in sorted({d for d in vars(torch).values() if isinstance(d, torch.dtype)}, key=str):
        if dtype.is_complex or dtype.is_floating_point or dtype.itemsize == 1 or dtype in (
                torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64, torch.bits16):
            try:
                bytes_ = torch.randint(0, 256, (3, 5 * dtype.itemsize), dtype=torch.uint8)
                t = bytes_.view(dtype)
            except (RuntimeError, TypeError):
                continue
            if str(dtype).startswith("torch.q"):
                continue
            out[str(dtype)] = t
    assert len(out) >= 30, sorted(out)
    return out


async def test_every_dtype_and_layout_round_trips_bit_exactly(tmp_path):
    tensors = _all_dtype_tensors()
    state = {
        "dtypes": tensors,
        "transposed": torch.randn(7, 9).t(),
        "strided": torch.randn(50)[::3],
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "bool_scalar": torch.tensor(True),
        "param": torch.nn.Parameter(torch.randn(4)),
        "grad": torch.randn(3, requires_grad=True),
        "quantized": torch.quantize_per_tensor(torch.randn(6), 0.1, 3, torch.qint8),
        "sparse": torch.eye(4).to_sparse(),
    }
    async with small_engine(chunk_bytes=4 * KiB) as engine:
        await (await engine.save(state, tmp_path / "dt"))
        loaded = await engine.load(tmp_path / "dt")
    for key in ("dtypes", "transposed", "strided", "scalar", "empty", "bool_scalar", "param", "grad"):
        assert_same(loaded[key], state[key], key)
    assert type(loaded["param"]) is torch.nn.Parameter
    assert torch.equal(loaded["quantized"].int_repr(), state["quantized"].int_repr())
    assert torch.equal(loaded["sparse"].to_dense(), torch.eye(4))
    # every shard is a valid safetensors file holding natively-typed tensors for the dtypes safetensors knows
    names = {}
    for f in sorted((tmp_path / "dt").glob("shard-*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                names[key] = st.get_tensor(key)
    for name, t in tensors.items():
        stored = names[f"dtypes.{name}"]
        if t.dtype in SAFETENSORS_DTYPES:
            assert stored.dtype == t.dtype and torch.equal(stored.view(torch.uint8), t.view(torch.uint8))
        else:
            assert stored.dtype == torch.uint8 and stored.numel() == t.numel() * t.element_size()


@pytest.mark.parametrize("target", ["local", "memory"])
async def test_local_and_memory_targets(tmp_path, target):
    path = str(tmp_path / "ck") if target == "local" else f"memory://asyncckpt-tests/{tmp_path.name}/ck"
    state = lightning_state()
    async with small_engine() as engine:
        await (await engine.save(state, path))
        assert_same(await engine.load(path), state)
        assert asyncckpt.latest(path.rsplit("/", 1)[0]) == path
        await engine.remove(path)
        with pytest.raises(CheckpointError, match="does not exist"):
            await engine.load(path)


async def test_flipped_byte_in_shard_is_corrupt(tmp_path):
    async with small_engine() as engine:
        await (await engine.save({"w": torch.randn(1000)}, tmp_path / "ck"))
        shard = next((tmp_path / "ck").glob("shard-*"))
        data = bytearray(shard.read_bytes())
        data[-10] ^= 0x40
        shard.write_bytes(bytes(data))
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
            await engine.load(tmp_path / "ck")
        shard.write_bytes(bytes(data[:-100]))
        with pytest.raises(CorruptCheckpointError, match="truncated"):
            await engine.load(tmp_path / "ck")
        shard.unlink()
        with pytest.raises(CorruptCheckpointError, match="missing"):
            await engine.load(tmp_path / "ck")


async def test_uncommitted_checkpoint_never_loads(tmp_path):
    async with small_engine() as engine:
        await (await engine.save({"w": torch.randn(10)}, tmp_path / "ck"))
        (tmp_path / "ck" / "manifest.json").unlink()
        with pytest.raises(IncompleteCheckpointError, match="never committed"):
            await engine.load(tmp_path / "ck")
    assert asyncckpt.latest(tmp_path) is None


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['ASYNCCKPT_SENTINEL']}",))


async def test_malicious_pickle_is_refused_and_never_runs(tmp_path, monkeypatch):
    sentinel = tmp_path / "pwned"
    monkeypatch.setenv("ASYNCCKPT_SENTINEL", str(sentinel))
    async with small_engine() as engine:
        await (await engine.save({"ok": torch.ones(2), "hp": {"evil": _Evil()}}, tmp_path / "ck"))
        with pytest.raises(asyncckpt.UnsafeCheckpointError) as err:
            await engine.load(tmp_path / "ck")
        assert "hp.evil" in str(err.value) and "_Evil" in str(err.value) and "weights_only=False" in str(err.value)
        assert not sentinel.exists()


class Config:  # a user's hyper-parameter object: needs full unpickling
    def __init__(self, lr):
        self.lr = lr


async def test_custom_objects_need_explicit_weights_only_false(tmp_path):
    async with small_engine() as engine:
        await (await engine.save({"cfg": Config(0.1), "size": torch.Size([2, 3])}, tmp_path / "ck"))
        with pytest.raises(asyncckpt.UnsafeCheckpointError, match="cfg"):
            await engine.load(tmp_path / "ck")
        loaded = await engine.load(tmp_path / "ck", weights_only=False)
    assert loaded["cfg"].lr == 0.1 and loaded["size"] == torch.Size([2, 3])


async def test_load_and_remove_wait_for_pending_save_of_same_path(tmp_path):
    state = {"w": torch.randn(16 * MiB // 4)}
    async with small_engine(chunk_bytes=256 * KiB, write_concurrency=1, host_memory_budget=32 * MiB,
                            shard_bytes=64 * MiB) as engine:
        handle = await engine.save(state, tmp_path / "ck")
        assert not handle.done()
        loaded = await engine.load(tmp_path / "ck")  # would find nothing if it ran before the commit
        assert torch.equal(loaded["w"], state["w"])
        handle = await engine.save(state, tmp_path / "gone")
        assert not handle.done()
        await engine.remove(tmp_path / "gone")
        assert handle.done() and not (tmp_path / "gone").exists()


async def test_saves_to_one_path_commit_in_issue_order(tmp_path):
    async with small_engine() as engine:
        for i in range(5):
            await engine.save({"i": i, "w": torch.full((50_000,), float(i))}, tmp_path / "last")
        await engine.wait()
        loaded = await engine.load(tmp_path / "last")
    assert loaded["i"] == 4 and torch.all(loaded["w"] == 4)
    assert len(list((tmp_path / "last").glob("shard-*"))) == len(manifest(tmp_path / "last")["shards"])


async def test_write_failure_surfaces_through_every_channel(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    bad = blocker / "ck"
    async with small_engine() as engine:
        handle = await engine.save({"w": torch.ones(3)}, bad)
        with pytest.raises(CheckpointError, match=str(bad)):
            await handle
        await engine.save({"w": torch.ones(3)}, bad)
        with pytest.raises(CheckpointError, match="save to .* failed"):
            await engine.wait()
        await engine.save({"w": torch.ones(3)}, bad)
        await anyio.sleep(0.05)
        with pytest.raises(CheckpointError, match=str(bad)):
            await engine.save({"w": torch.ones(3)}, tmp_path / "fine")
        await (await engine.save({"w": torch.ones(3)}, tmp_path / "fine"))  # still usable
    with pytest.raises(CheckpointError, match=str(bad)):
        async with small_engine() as engine:
            await engine.save({"w": torch.ones(3)}, bad)
    assert not any(bad.parent.glob("*/manifest.json"))


async def test_in_place_load_into_modules_optimizers_and_tensors(tmp_path):
    state = lightning_state()
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    score = torch.tensor(0.0)
    target = {"state_dict": model, "optimizer_states": [opt],
              "callbacks": {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {"best_model_score": score}}}
    async with small_engine() as engine:
        await (await engine.save(state, tmp_path / "ck"))
        rest = await engine.load(tmp_path / "ck", state=target, strict=False)
        assert_same(model.state_dict(), state["state_dict"])
        assert_same(opt.state_dict()["state"], state["optimizer_states"][0]["state"])
        assert score.item() == 0.25
        assert "state_dict" not in rest and rest["epoch"] == 3 and "optimizer_states" not in rest
        with pytest.raises(CheckpointError, match="missing from the checkpoint: extra"):
            await engine.load(tmp_path / "ck", state={"state_dict": model, "extra": torch.zeros(1)})
        wrong = torch.nn.Linear(3, 3)
        with pytest.raises(CheckpointError, match="state_dict"):
            await engine.load(tmp_path / "ck", state={"state_dict": wrong})


async def test_map_location_forms(tmp_path):
    async with small_engine() as engine:
        await (await engine.save({"w": torch.ones(3)}, tmp_path / "ck"))
        for loc in ("cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda storage, where: storage):
            assert torch.equal((await engine.load(tmp_path / "ck", map_location=loc))["w"], torch.ones(3))


async def test_not_a_checkpoint_errors_name_the_way_out(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "model.pt")
    async with small_engine() as engine:
        with pytest.raises(CheckpointError, match="torch.load"):
            await engine.load(tmp_path / "model.pt")
        with pytest.raises(CheckpointError, match="does not exist"):
            await engine.load(tmp_path / "nope")
        (tmp_path / "dir").mkdir()
        with pytest.raises(CheckpointError, match="not an asyncckpt checkpoint"):
            await engine.load(tmp_path / "dir")
        (tmp_path / "dir" / "notes.txt").write_text("mine")
        with pytest.raises(CheckpointError, match="refusing to remove"):
            await engine.remove(tmp_path / "dir")
        assert (tmp_path / "dir" / "notes.txt").exists()
        cyclic: dict = {}
        cyclic["self"] = cyclic
        with pytest.raises(CheckpointError, match="refers to itself"):
            await engine.save(cyclic, tmp_path / "cyc")
        with pytest.raises(CheckpointError, match="not picklable"):
            await engine.save({"lock": threading.Lock()}, tmp_path / "lock")


def test_sync_engine_snapshots_on_caller_thread(tmp_path):
    seen = []
    w = torch.zeros(1000)

    def serialize(copy):
        seen.append(threading.current_thread())
        torch.save(copy, tmp_path / "copy.pt")

    with asyncckpt.SyncEngine(chunk_bytes=64 * KiB, host_memory_budget=4 * MiB) as engine:
        h = engine.save({"w": w}, tmp_path / "native")
        w.fill_(1)
        h2 = engine.save_with({"w": w}, serialize, tmp_path / "copy.pt")
        w.fill_(2)
        assert h.result().bytes_written > 4000 and h2.result().tensors == 1
        assert torch.all(engine.load(tmp_path / "native")["w"] == 0)
    assert torch.all(torch.load(tmp_path / "copy.pt")["w"] == 1)
    assert seen and seen[0] is not threading.current_thread()


def test_engine_options_are_validated():
    with pytest.raises(ValueError, match="chunk_bytes"):
        CheckpointEngine(chunk_bytes=1000)
    with pytest.raises(ValueError, match="budget"):
        CheckpointEngine(chunk_bytes=1 * MiB, host_memory_budget=KiB * 512)


async def test_state_dict_metadata_survives(tmp_path):
    model = tiny_model()
    sd = model.state_dict()
    assert sd._metadata
    async with small_engine() as engine:
        await (await engine.save({"sd": sd}, tmp_path / "ck"))
        loaded = await engine.load(tmp_path / "ck")
    assert loaded["sd"]._metadata == sd._metadata


def test_copy_for_foreign_serializers_has_no_false_sharing(tmp_path):
    state = {"f": torch.randn(10), "h": torch.randn(4).half(), "i": torch.arange(3), "e": torch.empty(0),
             "sd": tiny_model().state_dict()}
    with asyncckpt.SyncEngine(chunk_bytes=64 * KiB, host_memory_budget=4 * MiB) as engine:
        engine.save_with(state, lambda copy: torch.save(copy, tmp_path / "c.pt"), tmp_path / "c.pt").result()
    assert_same(torch.load(tmp_path / "c.pt"), state)
    assert torch.load(tmp_path / "c.pt")["sd"]._metadata == state["sd"]._metadata


def test_unclosed_sync_engine_flushes_at_exit(tmp_path):
    import subprocess
    import sys

    code = ("import torch, asyncckpt\n"
            "e = asyncckpt.SyncEngine()\n"
            f"e.save({{'w': torch.ones(1000)}}, {str(tmp_path / 'ck')!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert (tmp_path / "ck" / "manifest.json").exists()


async def test_loaded_state_goes_straight_to_torch_save_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    state = {"f": torch.randn(10), "h": torch.randn(4).half(), "i": torch.arange(3), "e": torch.empty(0)}
    async with small_engine() as engine:
        await (await engine.save(state, tmp_path / "ck"))
        loaded = await engine.load(tmp_path / "ck")
    torch.save(loaded, tmp_path / "t.pt")
    save_file(loaded, str(tmp_path / "t.safetensors"))
    assert_same(torch.load(tmp_path / "t.pt"), state)
    assert (tmp_path / "t.pt").stat().st_size < 4096, "no shard buffer dragged into the file"


async def test_first_save_reserves_every_buffer_so_later_saves_allocate_nothing(tmp_path):
    state = {f"w{i}": torch.randn(64 * KiB // 4) for i in range(24)}  # 1.5 MiB in 64 KiB chunks
    async with small_engine(host_memory_budget=4 * MiB) as engine:
        await (await engine.save(state, tmp_path / "a"))
        after_first = (engine.staging.allocations, engine.staging.allocated_bytes)
        for i in range(5):  # each save's writes interleave with its copies differently
            await (await engine.save(state, tmp_path / f"b{i}"))
        assert (engine.staging.allocations, engine.staging.allocated_bytes) == after_first
        for i in range(5):  # pipelined saves may use more buffers, never more than the budget
            await engine.save(state, tmp_path / f"c{i}")
        await engine.wait()
        assert engine.staging.allocated_bytes <= 4 * MiB


def test_removing_a_symlink_removes_the_link_and_never_its_target(tmp_path) -> None:
    """remove(link) used to delete the linked checkpoint's manifest and shards, then fail on the link."""
    state = {"w": torch.arange(6.0), "step": 3}
    with asyncckpt.SyncEngine() as engine:
        engine.save(state, tmp_path / "real").result()
        before = sorted(os.listdir(tmp_path / "real"))
        (tmp_path / "link").symlink_to(tmp_path / "real")
        engine.remove(tmp_path / "link")
        assert not os.path.lexists(tmp_path / "link")
        assert sorted(os.listdir(tmp_path / "real")) == before
        assert_same(engine.load(tmp_path / "real"), state)
        (tmp_path / "dangling").symlink_to(tmp_path / "gone")
        engine.remove(tmp_path / "dangling")
        assert not os.path.lexists(tmp_path / "dangling")
        engine.remove(tmp_path / "real")
        assert not (tmp_path / "real").exists()


@pytest.mark.parametrize("raw", [b'{"name": "someone else\'s index"}', b"not json at all"])
def test_save_refuses_a_directory_whose_manifest_is_not_ours(tmp_path, raw: bytes) -> None:
    """save used to overwrite a foreign manifest.json silently (remove() refused the same directory)."""
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "manifest.json").write_bytes(raw)
    (tmp_path / "foreign" / "data.bin").write_bytes(b"precious")
    with asyncckpt.SyncEngine() as engine:
        with pytest.raises(CheckpointError, match="refusing to save into .*foreign.*manifest.json"):
            engine.save({"w": torch.ones(3)}, tmp_path / "foreign").result()
        engine.save({"w": torch.ones(3)}, tmp_path / "ours").result()
        engine.save({"w": torch.zeros(3)}, tmp_path / "ours").result()  # our own checkpoint is overwritten
        assert torch.equal(engine.load(tmp_path / "ours")["w"], torch.zeros(3))
    assert (tmp_path / "foreign" / "manifest.json").read_bytes() == raw
    assert sorted(os.listdir(tmp_path / "foreign")) == ["data.bin", "manifest.json"]


def test_two_saves_through_a_symlink_alias_of_one_directory_are_ordered(tmp_path) -> None:
    """Per-path ordering keys on the real location: saves alternating between ``a/c`` and ``alias/c`` (alias -> a)
    commit in order, and the checkpoint is the last one, whole (keyed on the name, each save's sweep deleted the
    other's shards: a torn checkpoint in about two runs of three with two saves, every run with four)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "a")
    states = [{f"t{i}": torch.full((512, 1024), float(n)) for i in range(16)} for n in range(4)]
    with asyncckpt.SyncEngine(shard_bytes=4 << 20, chunk_bytes=1 << 20) as engine:
        handles = [engine.save(state, tmp_path / ("a" if n % 2 == 0 else "alias") / "c")
                   for n, state in enumerate(states)]
        for handle in handles:
            handle.result()
        assert_same(engine.load(tmp_path / "a" / "c"), states[-1])
        assert asyncckpt.verify(tmp_path / "a" / "c").problems == []
        # the same ordering, deterministically: a load through the alias waits for the save still writing
        handle = engine.save(states[0], tmp_path / "a" / "d")
        assert_same(engine.load(tmp_path / "alias" / "d"), states[0])
        assert handle.done()


@pytest.mark.parametrize("keys", [["__metadata__", "w"], ["__metadata__", "__metadata__#1"], ["a.b", "a/b", "a b"]])
def test_entry_names_stay_legal_safetensors_whatever_the_keys(tmp_path, keys) -> None:
    """A key named like the safetensors header or colliding once sanitised still gives valid shards."""
    state = {k: torch.arange(4.0) + i for i, k in enumerate(keys)}
    with asyncckpt.SyncEngine() as engine:
        engine.save(state, tmp_path / "c").result()
        assert_same(engine.load(tmp_path / "c"), state)
    assert asyncckpt.verify(tmp_path / "c").problems == []
    for shard in (tmp_path / "c").glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            names = list(f.keys())
        assert len(names) == len(set(names)) and "__metadata__" not in names


HOUR_NS = 3600 * 10 ** 9


def test_latest_survives_the_wall_clock_stepping_back(tmp_path, monkeypatch) -> None:
    """Item 11: a save made after an NTP step back of an hour is still the latest, within a process and in a
    new process that listed the directory first (the wall clock of the second process is stepped back for real
    in its interpreter: ``time.time_ns`` is the only clock a save reads). A manifest from before sequences
    existed orders by its wall clock, which is the same scale."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    with asyncckpt.SyncEngine() as engine:
        engine.save({"v": torch.tensor(1)}, tmp_path / "a").result()
        real = time.time_ns
        monkeypatch.setattr(time, "time_ns", lambda: real() - HOUR_NS)
        engine.save({"v": torch.tensor(2)}, tmp_path / "b").result()
        assert engine.latest(tmp_path) == str(tmp_path / "b")
    monkeypatch.undo()
    script = (
        "import sys, time, torch, asyncckpt\n"
        "real = time.time_ns\n"
        f"time.time_ns = lambda: real() - 2 * {HOUR_NS}\n"
        "with asyncckpt.SyncEngine() as engine:\n"
        "    assert engine.latest(sys.argv[1]).endswith('b')\n"
        "    engine.save({'v': torch.tensor(3)}, sys.argv[1] + '/c').result()\n")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert asyncckpt.latest(tmp_path) == str(tmp_path / "c")
    with asyncckpt.SyncEngine() as engine:
        assert engine.load(tmp_path / "c")["v"].item() == 3
    # an old manifest (no sequence member) written now orders after all three: wall clock, same scale
    from asyncckpt.format.manifest import seal
    with asyncckpt.SyncEngine() as engine:
        engine.save({"v": torch.tensor(4)}, tmp_path / "d").result()
    doc = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert doc["sequence"] >= doc["created_ns"]
    del doc["sequence"], doc["manifest_xxh3_64"]
    (tmp_path / "d" / "manifest.json").write_bytes(seal(doc))
    assert [os.path.basename(path) for path, _ in asyncckpt.committed(tmp_path)] == ["a", "b", "c", "d"]


@pytest.mark.parametrize("snapshot", ["eager", "deferred"])
def test_a_first_save_under_inference_mode_leaves_buffers_later_saves_can_use(tmp_path, snapshot):
    state = {"a": torch.randn(10), "b": torch.arange(7)}
    with asyncckpt.SyncEngine(chunk_bytes=4096, snapshot=snapshot) as engine:
        with torch.inference_mode():
            engine.save(state, tmp_path / "x").result()
        state["a"].add_(1)
        engine.save(state, tmp_path / "y").result()  # used to fail: "Inplace update to inference tensor outside..."
        with torch.inference_mode():
            engine.save(state, tmp_path / "z").result()
        for name in ("y", "z"):
            loaded = engine.load(tmp_path / name)
            assert torch.equal(loaded["a"], state["a"]) and torch.equal(loaded["b"], state["b"])
