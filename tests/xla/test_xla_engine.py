"""CheckpointEngine end to end with state living on an XLA device (CPU PJRT, one process)."""

from __future__ import annotations

import pytest
import torch

import asyncckpt
from asyncckpt.snapshot import xla

pytestmark = pytest.mark.xla


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 4))


def _host_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = list(state)
    return dict(zip(keys, xla.to_cpu([state[k] for k in keys])))


def _assert_bit_exact(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.detach().cpu().reshape(-1).view(torch.uint8), want.detach().cpu().reshape(-1).view(torch.uint8))


def _xla_state(dev) -> dict[str, torch.Tensor]:
    """A trained-looking XLA state: parameters after an optimizer step (pending lazy work), bf16/int extras."""
    import torch_xla

    model = _model().to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(torch.randn(8, 16).to(dev)).square().mean()
    loss.backward()
    opt.step()
    torch_xla.sync()
    sd = dict(model.state_dict())
    sd["extra.bf16"] = (torch.randn(5, 3) * 10).to(torch.bfloat16).to(dev)
    sd["extra.fp16"] = torch.randn(7).to(torch.float16).to(dev)
    sd["extra.int8"] = torch.randint(-128, 127, (9,), dtype=torch.int8).to(dev)
    sd["extra.lazy"] = sd["0.weight"] * 2 + 1  # still pending when saved
    return sd


async def test_save_xla_state_load_on_cpu(tmp_path, dev):
    sd = _xla_state(dev)
    want = _host_state(sd)
    async with asyncckpt.CheckpointEngine() as engine:
        handle = await engine.save(sd, tmp_path / "ckpt")
        await handle
        got = await engine.load(tmp_path / "ckpt", map_location="cpu")
    assert set(got) == set(want)
    for k in want:
        assert got[k].device.type == "cpu"
        _assert_bit_exact(got[k], want[k])


async def test_save_is_a_point_in_time_snapshot_of_xla_tensors(tmp_path, dev):
    import torch_xla

    model = _model().to(dev)
    torch_xla.sync(wait=True)
    want = _host_state(model.state_dict())
    async with asyncckpt.CheckpointEngine() as engine:
        handle = await engine.save(model.state_dict(), tmp_path / "ckpt")
        with torch.no_grad():  # training goes on while the write is in flight
            for p in model.parameters():
                p.mul_(-3).add_(1)
        torch_xla.sync(wait=True)
        await handle
        got = await engine.load(tmp_path / "ckpt", map_location="cpu")
    for k in want:
        _assert_bit_exact(got[k], want[k])


@pytest.mark.parametrize("where", ["xla", "xla:0", "device-obj"])
async def test_load_onto_xla_device(tmp_path, dev, where):
    map_location = torch.device("xla") if where == "device-obj" else where
    sd = _xla_state(dev)
    want = _host_state(sd)
    async with asyncckpt.CheckpointEngine() as engine:
        await (await engine.save(sd, tmp_path / "ckpt"))
        got = await engine.load(tmp_path / "ckpt", map_location=map_location)
    for k in want:
        assert got[k].device == dev, k
        _assert_bit_exact(xla.to_cpu([got[k]])[0], want[k])


async def test_load_without_map_location_restores_to_the_saved_xla_device(tmp_path, dev):
    sd = _xla_state(dev)
    want = _host_state(sd)
    async with asyncckpt.CheckpointEngine() as engine:
        await (await engine.save(sd, tmp_path / "ckpt"))
        got = await engine.load(tmp_path / "ckpt")
    for k in want:
        assert got[k].device == dev, k
        _assert_bit_exact(xla.to_cpu([got[k]])[0], want[k])


async def test_in_place_load_into_module_and_optimizer_on_xla(tmp_path, dev):
    import torch_xla

    src = _model().to(dev)
    src_opt = torch.optim.AdamW(src.parameters(), lr=1e-2)
    for _ in range(2):
        src(torch.randn(8, 16).to(dev)).square().mean().backward()
        src_opt.step()
        src_opt.zero_grad()
        torch_xla.sync()
    state = {"model": src, "optimizer": src_opt, "step": 2}
    want_model = _host_state(src.state_dict())
    async with asyncckpt.CheckpointEngine() as engine:
        await (await engine.save({"model": src.state_dict(), "optimizer": src_opt.state_dict(), "step": 2},
                                 tmp_path / "ckpt"))

        torch.manual_seed(1)
        dst = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                  torch.nn.Linear(32, 4)).to(dev)
        dst_opt = torch.optim.AdamW(dst.parameters(), lr=1e-2)
        params_before = [id(p) for p in dst.parameters()]
        target = {"model": dst, "optimizer": dst_opt, "step": 0}
        rest = await engine.load(tmp_path / "ckpt", state=target, strict=True)
    torch_xla.sync(wait=True)
    assert [id(p) for p in dst.parameters()] == params_before  # loaded in place
    assert all(p.device == dev for p in dst.parameters())
    assert rest == {"step": 2}  # top-level plain values come back to the caller (Lightning semantics)
    got = _host_state(dst.state_dict())
    for k in want_model:
        _assert_bit_exact(got[k], want_model[k])
    # optimizer state restored: the next step on both sides matches exactly
    x = torch.randn(8, 16)
    for model, opt in ((state["model"], state["optimizer"]), (dst, dst_opt)):
        model(x.to(dev)).square().mean().backward()
        opt.step()
        torch_xla.sync(wait=True)
    after_src, after_dst = _host_state(src.state_dict()), _host_state(dst.state_dict())
    for k in after_src:
        _assert_bit_exact(after_dst[k], after_src[k])


async def test_in_place_load_into_xla_tensors_from_a_cpu_checkpoint(tmp_path, dev):
    host = {"w": torch.randn(4, 4), "b": torch.randn(4).to(torch.bfloat16)}
    target = {"w": torch.zeros(4, 4).to(dev), "b": torch.zeros(4, dtype=torch.bfloat16).to(dev)}
    ids = {k: id(v) for k, v in target.items()}
    async with asyncckpt.CheckpointEngine() as engine:
        await (await engine.save(host, tmp_path / "ckpt"))
        await engine.load(tmp_path / "ckpt", state=target)
    assert {k: id(v) for k, v in target.items()} == ids
    for k in host:
        assert target[k].device == dev
        _assert_bit_exact(xla.to_cpu([target[k]])[0], host[k])
