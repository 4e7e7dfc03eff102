"""asyncckpt.lightning's plugins with state on an XLA device (CPU PJRT, one process, no Trainer).

A ``Trainer(accelerator="tpu")`` cannot run on the CPU PJRT backend, so these tests call the plugins the way
Lightning's ``XLAStrategy`` does: ``AsyncCheckpointIO(XLACheckpointIO())`` (the device-to-host copy on the calling
thread, the base's write in the engine's worker thread, the written file a point-in-time copy) and
``NativeCheckpointIO()`` (save, load to host or device, in-place restore into a module and optimizer on XLA).

Only-master semantics: the plugins and the engine do not check ordinals themselves. Lightning's
strategy decides who writes (``Strategy.save_checkpoint`` calls the CheckpointIO only when ``is_global_zero``, which
on XLA is ``torch_xla.runtime.global_ordinal() == 0``). That gate is exercised here through a real ``XLAStrategy``.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

import asyncckpt.lightning as al  # imports no Lightning package itself
from asyncckpt.snapshot import xla

# Lightning is imported inside the tests: the main lane collects this file (and deselects it) without needing
# Lightning, and in the XLA lane, whose venv installs it, a missing Lightning is an error rather than a skip.

pytestmark = [
    pytest.mark.xla,
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

_to_cpu = xla.to_cpu  # the real one, for building expected values while a test wraps the module attribute


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 3))


def _trained(dev) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A module and AdamW on XLA after one step, left pending (no sync): the save has to run that graph."""
    torch.manual_seed(0)
    model = _model().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(6, 8).to(dev)).square().mean().backward()
    opt.step()
    return model, opt


def _checkpoint(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """What Lightning hands a CheckpointIO, in small: the model's tensors, optimizer states, plain values."""
    return {"epoch": 3, "global_step": 7, "state_dict": model.state_dict(),
            "optimizer_states": [opt.state_dict()], "hyper_parameters": {"lr": 0.1, "name": "tiny"},
            "extra.bf16": (torch.arange(12.0) / 7).to(torch.bfloat16).to(next(model.parameters()).device)}


def _leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_leaves(v, f"{prefix}{k}/"))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(_leaves(v, f"{prefix}{i}/"))
        return out
    return {prefix: obj}


class _Want(dict):
    """The checkpoint's leaves by path, tensors on the host; ``on_xla``: the paths that were XLA tensors."""

    on_xla: frozenset[str]


def _host(obj: Any) -> _Want:
    """The checkpoint's leaves, XLA tensors read to host with one batched transfer."""
    want = _Want(_leaves(obj))
    want.on_xla = frozenset(k for k, v in want.items() if isinstance(v, torch.Tensor) and xla.is_xla(v))
    keys = sorted(want.on_xla)
    want.update(zip(keys, _to_cpu([want[k] for k in keys])))
    return want


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (_to_cpu([t])[0] if xla.is_xla(t) else t).contiguous().reshape(-1).view(torch.uint8)


def _assert_same(got: Any, want: _Want, keys: Any = None, on_xla: bool = False) -> None:
    """``got`` holds ``want``'s values (restricted to the paths in ``keys``) bit for bit: all tensors on the host,
    or with ``on_xla`` those that were XLA tensors back on the XLA device (the others may be on either)."""
    got, keys = _leaves(got), set(want if keys is None else keys)
    assert set(got) == keys
    for k in keys:
        g, w = got[k], want[k]
        if isinstance(w, torch.Tensor):
            assert isinstance(g, torch.Tensor), k
            if not on_xla:
                assert g.device.type == "cpu", k
            elif k in want.on_xla:
                assert g.device.type == "xla", k
            assert (g.dtype, g.shape) == (w.dtype, w.shape), k
            assert torch.equal(_bits(g), _bits(w)), k
        else:
            assert g == w, k


def _mutate(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Training goes on: change every parameter, buffer and optimizer moment in place, and run it."""
    import torch_xla

    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-3).add_(1)
        for b in model.buffers():
            b.add_(5)
        for s in opt.state.values():
            s["exp_avg"].add_(2)
            s["exp_avg_sq"].mul_(4)
    torch_xla.sync(wait=True)


def _xla_checkpoint_io() -> type:
    from lightning.pytorch.plugins.io import XLACheckpointIO  # lightning.fabric's class, re-exported

    return XLACheckpointIO


def _gated_xla_checkpoint_io() -> Any:
    """Lightning's XLACheckpointIO, recording where and on what it runs, and held until the test releases it."""

    class Gated(_xla_checkpoint_io()):
        def __init__(self) -> None:
            super().__init__()
            self.release = threading.Event()
            self.calls: list[tuple[threading.Thread, list[str]]] = []

        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            devices = sorted({v.device.type for v in _leaves(checkpoint).values() if isinstance(v, torch.Tensor)})
            self.calls.append((threading.current_thread(), devices))
            assert self.release.wait(60), "the test never released the write"
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)

    return Gated()


# ---------------------------------------------------------------- AsyncCheckpointIO(XLACheckpointIO())


def test_async_xla_base_copies_on_caller_writes_in_background(tmp_path, dev, metric_count, monkeypatch):
    model, opt = _trained(dev)
    checkpoint = _checkpoint(model, opt)
    transfers: list[tuple[threading.Thread, int]] = []

    def recording_to_cpu(tensors):
        transfers.append((threading.current_thread(), sum(xla.is_xla(t) for t in tensors)))
        return _to_cpu(tensors)

    monkeypatch.setattr(xla, "to_cpu", recording_to_cpu)  # snapshot.py calls it as xla.to_cpu
    base = _gated_xla_checkpoint_io()
    plugin = al.AsyncCheckpointIO(base)
    path = tmp_path / "ckpts" / "epoch=3.ckpt"
    n_xla = sum(isinstance(v, torch.Tensor) and xla.is_xla(v) for v in _leaves(checkpoint).values())
    d2h, execs = metric_count("TransferFromDeviceTime"), metric_count("ExecuteTime")
    try:
        plugin.save_checkpoint(checkpoint, path)

        # Returned: every device-side step of the save is done, on this thread, as one transfer.
        assert transfers == [(threading.current_thread(), n_xla)]
        assert metric_count("TransferFromDeviceTime") == d2h + 1
        assert metric_count("ExecuteTime") >= execs + 1  # the pending optimizer step ran for the snapshot
        # the base has not written yet (it is held in the pipeline): the path holds only the plugin's reservation
        assert path.stat().st_size == 0
        want = _host(checkpoint)  # the values at the moment of the save (nothing has changed them yet)

        _mutate(model, opt)  # in place, while the base's write is still pending
        assert not torch.equal(_bits(model[0].weight), _bits(want["state_dict/0.weight/"]))
        d2h, execs = metric_count("TransferFromDeviceTime"), metric_count("ExecuteTime")
        base.release.set()
        plugin.wait()

        # The base ran once, off this thread, on host tensors only, and did no device work there.
        assert len(base.calls) == 1
        thread, devices = base.calls[0]
        assert thread is not threading.current_thread()
        assert devices == ["cpu"]
        assert (metric_count("TransferFromDeviceTime"), metric_count("ExecuteTime")) == (d2h, execs)
        assert len(transfers) == 1
    finally:
        base.release.set()
        plugin.teardown()

    # Bit-exact, and from before the in-place changes.
    _assert_same(torch.load(path, map_location="cpu", weights_only=True), want)
    _assert_same(plugin.load_checkpoint(path), want)  # through the plugin and its base (2.6's call form)
    plugin.teardown()


# ---------------------------------------------------------------- only the master writes


def test_only_global_zero_writes_through_xla_strategy(tmp_path, dev, metric_count, monkeypatch):
    """Lightning's XLAStrategy gates the CheckpointIO on ``is_global_zero``; the plugin and engine do not check
    ordinals themselves. Ordinal 0 (this process): the default base (XLACheckpointIO, chosen because torch_xla is
    loaded) writes the file. A simulated ordinal 1: the strategy never calls the plugin, so that process takes no
    snapshot (no device-to-host transfer) and writes nothing."""
    import torch_xla.runtime as xr
    from lightning.pytorch.strategies import XLAStrategy

    model, opt = _trained(dev)
    checkpoint = _checkpoint(model, opt)

    assert xr.global_ordinal() == 0
    plugin = al.AsyncCheckpointIO()
    strategy = XLAStrategy(checkpoint_io=plugin)
    assert strategy.checkpoint_io is plugin and strategy.is_global_zero
    master_path = tmp_path / "master.ckpt"
    strategy.save_checkpoint(checkpoint, master_path)  # mark_step, then the plugin: the snapshot is taken here
    want = _host(checkpoint)
    plugin.teardown()
    assert isinstance(plugin.checkpoint_io, _xla_checkpoint_io())
    _assert_same(torch.load(master_path, weights_only=True), want)

    # Another process of the same run, seen from inside: global ordinal 1.
    monkeypatch.setattr(xr, "global_ordinal", lambda: 1)
    other = al.AsyncCheckpointIO()
    worker = XLAStrategy(checkpoint_io=other)
    worker._launched = True  # ranks come from the XLA environment only once processes have spawned
    assert worker.global_rank == 1 and not worker.is_global_zero
    d2h = metric_count("TransferFromDeviceTime")
    worker.save_checkpoint(checkpoint, tmp_path / "worker.ckpt")
    other.teardown()
    assert metric_count("TransferFromDeviceTime") == d2h
    assert other._engine is None and other.checkpoint_io is None  # never started, never needed a base
    assert not (tmp_path / "worker.ckpt").exists()


# ---------------------------------------------------------------- NativeCheckpointIO()


def test_native_save_load_and_restore_in_place_on_xla(tmp_path, dev, metric_count):
    import torch_xla

    model, opt = _trained(dev)
    plugin = al.NativeCheckpointIO()
    path = tmp_path / "epoch=3.ckpt"
    checkpoint = _checkpoint(model, opt)
    try:
        plugin.save_checkpoint(checkpoint, path)
        want = _host(checkpoint)
        _mutate(model, opt)  # after the save returned: must not reach the checkpoint
        plugin.wait()

        # Lightning 2.6's call: the whole dict, on the host by default (as XLACheckpointIO's files load).
        _assert_same(plugin.load_checkpoint(path), want)
        _assert_same(plugin.load_checkpoint(path, map_location="cpu", weights_only=True), want)
        # map_location="xla": the saved XLA tensors come back on the device (like torch.load, every tensor goes).
        got = plugin.load_checkpoint(path, map_location="xla")
        assert got["state_dict"]["0.weight"].device == dev and got["extra.bf16"].device == dev
        _assert_same(got, want, on_xla=True)

        # The newer in-place call: into a fresh module and optimizer living on XLA.
        for map_location in (None, "xla"):
            torch.manual_seed(1)
            dst = _model().to(dev)
            dst_opt = torch.optim.AdamW(dst.parameters(), lr=0.1)
            dst(torch.randn(6, 8).to(dev)).sum().backward()
            dst_opt.step()  # so the optimizer has state tensors of its own to be replaced
            torch_xla.sync(wait=True)
            params = [id(p) for p in dst.parameters()]
            h2d = metric_count("TransferToDeviceTime")
            rest = plugin.load_checkpoint(path, map_location=map_location,
                                          state={"state_dict": dst, "optimizer_states": [dst_opt]})
            torch_xla.sync(wait=True)
            if map_location == "xla":  # the whole checkpoint goes up in one batched transfer
                assert metric_count("TransferToDeviceTime") == h2d + 1
            assert [id(p) for p in dst.parameters()] == params
            assert all(t.device == dev for t in [*dst.parameters(), *dst.buffers()])
            assert set(rest) == {"epoch", "global_step", "hyper_parameters", "extra.bf16"}
            assert rest["epoch"] == 3 and rest["hyper_parameters"] == {"lr": 0.1, "name": "tiny"}
            restored = {"state_dict": dst.state_dict(), "optimizer_states": [dst_opt.state_dict()]}
            _assert_same(restored, want, [k for k in want if k.startswith(("state_dict/", "optimizer_"))],
                         on_xla=True)
    finally:
        plugin.teardown()
