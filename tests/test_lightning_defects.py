"""Lightning 2.6's own AsyncCheckpointIO, defect by defect, next to asyncckpt's plugin.

Every test runs the same scenario twice: against Lightning's plugin (``builtin``: the defect must show) and against
``asyncckpt.lightning.AsyncCheckpointIO`` (``asyncckpt``: it must not).  Both Lightning packages are covered.  The
slow storage is a TorchCheckpointIO whose writes wait on a gate the test opens, so nothing depends on timing.
"""

from __future__ import annotations

import importlib
import os
import threading
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


pytest.importorskip("lightning")
pytest.importorskip("pytorch_lightning")

PACKAGES = {
    "lightning": ("lightning.pytorch", "lightning.fabric"),
    "pytorch_lightning": ("pytorch_lightning", "lightning_fabric"),
}
IMPLS = ["builtin", "asyncckpt"]

STATE_TENSORS = 8
TENSOR_SHAPE = (128, 1024)  # 512 KiB each, 4 MiB per checkpoint
STATE_BYTES = STATE_TENSORS * 128 * 1024 * 4


def _torch_io_cls(package: str) -> type:
    return importlib.import_module(PACKAGES[package][1] + ".plugins.io").TorchCheckpointIO


def _make_gated_io(package: str):
    base_cls = _torch_io_cls(package)

    class GatedIO(base_cls):
        """TorchCheckpointIO on storage that accepts writes only once ``gate`` is open."""

        def __init__(self) -> None:
            self.gate = threading.Event()
            self.started = 0
            self.written: list[str] = []
            self.seen_ptrs: list[set[int]] = []
            self.lock = threading.Lock()

        def save_checkpoint(self, checkpoint, path, storage_options=None):
            with self.lock:
                self.started += 1
            assert self.gate.wait(30), "test gate never opened"
            ptrs = {t.data_ptr() for t in tree_leaves(checkpoint) if isinstance(t, torch.Tensor)}
            super().save_checkpoint(checkpoint, path, storage_options)
            with self.lock:
                self.seen_ptrs.append(ptrs)
                self.written.append(str(path))

    return GatedIO()


def _plugin(impl: str, package: str, base, **engine_options):
    if impl == "builtin":
        return importlib.import_module(PACKAGES[package][0] + ".plugins.io").AsyncCheckpointIO(base)
    import asyncckpt.lightning as al

    cls = al.AsyncCheckpointIO if package == "lightning" else al.pl.AsyncCheckpointIO
    return cls(base, **engine_options)


def _state(step: int) -> dict:
    gen = torch.Generator().manual_seed(step)
    return {
        "state_dict": {f"layer{i}.weight": torch.randn(TENSOR_SHAPE, generator=gen) for i in range(STATE_TENSORS)},
        "global_step": step,
    }


def _drain(plugin, io, n: int) -> None:
    """Wait until ``n`` writes have completed (ours: until its buffers are back in the pool)."""
    if hasattr(plugin, "wait"):
        plugin.wait()
    deadline = time.monotonic() + 30
    while len(io.written) < n and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(io.written) >= n


class AllocationCounter(TorchDispatchMode):
    """Counts bytes of tensor storage newly created by aten ops on this thread (views and in-place ops excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.bytes += t.untyped_storage().nbytes()
        return out


@pytest.mark.parametrize("package", list(PACKAGES))
@pytest.mark.parametrize("impl", IMPLS)
def test_defect1_fresh_copy_of_whole_state_per_save(impl, package, tmp_path):
    """Lightning clones every tensor into newly allocated memory on every save; ours copies into reused buffers."""
    io = _make_gated_io(package)
    io.gate.set()
    plugin = _plugin(impl, package, io, host_memory_budget=4 * STATE_BYTES, chunk_bytes=1 << 20)
    allocated = []
    try:
        for step in range(4):
            state = _state(step)
            with AllocationCounter() as counter:
                plugin.save_checkpoint(state, tmp_path / f"step{step}.ckpt")
            allocated.append(counter.bytes)
            _drain(plugin, io, step + 1)  # let the write finish, so that a reusing implementation can reuse
    finally:
        plugin.teardown()
    assert len(io.written) == 4
    steady = allocated[1:]
    if impl == "builtin":
        assert all(b >= STATE_BYTES for b in steady), allocated  # a full clone each time
    else:
        assert all(b < STATE_BYTES // 16 for b in steady), allocated  # no per-save copy of the state
        # and the base was handed the very same staging memory every time
        assert io.seen_ptrs[1] == io.seen_ptrs[2] == io.seen_ptrs[3]
    for step in range(4):  # either way the files hold the right data
        loaded = torch.load(tmp_path / f"step{step}.ckpt", weights_only=True)
        expected = _state(step)
        assert loaded["global_step"] == step
        for k, v in expected["state_dict"].items():
            assert torch.equal(loaded["state_dict"][k], v)


@pytest.mark.parametrize("package", list(PACKAGES))
@pytest.mark.parametrize("impl", IMPLS)
def test_defect2_unbounded_queue(impl, package, tmp_path):
    """Against slow storage Lightning queues every save (and its clone) without limit; ours applies backpressure."""
    io = _make_gated_io(package)
    budget = int(2.5 * STATE_BYTES)
    plugin = _plugin(impl, package, io, host_memory_budget=budget, chunk_bytes=1 << 20)
    n = 12
    accepted = []
    state = _state(0)

    def submit() -> None:
        for i in range(n):
            plugin.save_checkpoint(state, tmp_path / f"s{i}.ckpt")
            accepted.append(i)

    submitter = threading.Thread(target=submit, daemon=True)
    submitter.start()
    submitter.join(timeout=1.5)  # storage is stalled meanwhile
    stalled_accepted = len(accepted)
    try:
        if impl == "builtin":
            assert not submitter.is_alive()
            assert stalled_accepted == n
            # everything sits in the executor's queue, each with its own clone of the state
            assert plugin._executor._work_queue.qsize() >= n - 1
        else:
            assert submitter.is_alive(), "save_checkpoint never blocked although storage is stalled"
            assert stalled_accepted <= budget // STATE_BYTES + 1
    finally:
        io.gate.set()
        submitter.join(timeout=60)
        plugin.teardown()
    assert not submitter.is_alive()
    assert sorted(os.listdir(tmp_path)) == sorted(f"s{i}.ckpt" for i in range(n))


@pytest.mark.parametrize("package", list(PACKAGES))
@pytest.mark.parametrize("impl", IMPLS)
def test_defect3_remove_before_pending_save_leaks_file(impl, package, tmp_path):
    """ModelCheckpoint(save_top_k=...) removes an old checkpoint while its save may still be queued: Lightning's
    removal runs first and the file appears afterwards (a leak); ours removes after the save has landed."""
    io = _make_gated_io(package)
    plugin = _plugin(impl, package, io)
    path = tmp_path / "epoch=0.ckpt"
    opener = threading.Timer(0.3, io.gate.set)
    try:
        plugin.save_checkpoint(_state(0), path)
        if impl == "asyncckpt":
            opener.start()  # our removal blocks until the save has landed, so the storage must come back meanwhile
        plugin.remove_checkpoint(path)
        io.gate.set()
    finally:
        io.gate.set()
        opener.cancel()
        plugin.teardown()
    assert io.written == [str(path)]
    if impl == "builtin":
        assert path.exists()  # removed before it was written: survives
    else:
        assert not path.exists()


@pytest.mark.parametrize("package", list(PACKAGES))
@pytest.mark.parametrize("impl", IMPLS)
def test_defect4_load_right_after_save(impl, package, tmp_path):
    """Loading a checkpoint that was just saved fails with FileNotFoundError under Lightning's plugin; ours waits for
    the pending save of that path."""
    io = _make_gated_io(package)
    plugin = _plugin(impl, package, io)
    path = tmp_path / "last.ckpt"
    opener = threading.Timer(0.3, io.gate.set)
    try:
        plugin.save_checkpoint(_state(7), path)
        if impl == "builtin":
            with pytest.raises(FileNotFoundError):
                plugin.load_checkpoint(path)
            io.gate.set()
        else:
            opener.start()
            loaded = plugin.load_checkpoint(path)
            assert loaded["global_step"] == 7
            assert torch.equal(loaded["state_dict"]["layer3.weight"], _state(7)["state_dict"]["layer3.weight"])
    finally:
        io.gate.set()
        opener.cancel()
        plugin.teardown()
