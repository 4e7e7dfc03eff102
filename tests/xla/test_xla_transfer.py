"""asyncckpt.xla on real torch_xla (CPU PJRT): batched transfers, snapshot independence, master check."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from asyncckpt.snapshot import xla

pytestmark = pytest.mark.xla

DTYPES = [
    torch.float32, torch.float64, torch.bfloat16, torch.float16,
    torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
    torch.uint16, torch.uint32, torch.uint64, torch.complex64,
    torch.float8_e4m3fn, torch.float8_e5m2,
]


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point or dtype.is_complex:
        return (torch.randn(shape, generator=g, dtype=torch.float32) * 300).to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2 ** 31)), min(info.max, 2 ** 31 - 1)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _assert_bit_exact(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.device.type == "cpu"
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(_bits(got), _bits(want))


def test_is_xla(dev):
    assert xla.is_xla(torch.ones(2, device=dev))
    assert not xla.is_xla(torch.ones(2))


def test_to_cpu_bit_exact_every_dtype(dev):
    shapes = [(5, 7), (), (0, 3), (1,), (3, 1, 4)]
    host = [_sample(dt, shapes[i % len(shapes)], i) for i, dt in enumerate(DTYPES)]
    out = xla.to_cpu([h.to(dev) for h in host])
    assert len(out) == len(host)
    for got, want in zip(out, host):
        _assert_bit_exact(got, want)
        assert got.is_contiguous()


def test_to_cpu_views_parameters_and_passthrough(dev):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    xbase = base.to(dev)
    param = torch.nn.Parameter(torch.randn(3, 3).to(dev))
    cpu_t = torch.ones(2)
    inputs = [xbase.t(), xbase[:, 1], xbase[1:, ::2], cpu_t, param, xbase.reshape(-1)[5]]
    out = xla.to_cpu(inputs)
    _assert_bit_exact(out[0], base.t())
    _assert_bit_exact(out[1], base[:, 1])
    _assert_bit_exact(out[2], base[1:, ::2])
    assert out[3] is cpu_t  # non-XLA inputs come back untouched
    assert type(out[4]) is torch.Tensor and not out[4].requires_grad
    _assert_bit_exact(out[4], param.detach().cpu())
    _assert_bit_exact(out[5], base.reshape(-1)[5])
    assert xla.to_cpu([]) == []


def test_to_cpu_is_one_batched_transfer(dev, metric_count):
    import torch_xla

    sizes = [1, 17, 1000, 4096, 3]
    ts = [torch.randn(n).to(dev) for n in sizes * 8]  # 40 tensors
    torch_xla.sync(wait=True)
    before = metric_count("TransferFromDeviceTime")
    xla.to_cpu(ts)
    assert metric_count("TransferFromDeviceTime") - before == 1
    # the metric counts transfers: one .cpu() per tensor records one each
    before = metric_count("TransferFromDeviceTime")
    for t in ts[:5]:
        t.cpu()
    assert metric_count("TransferFromDeviceTime") - before == 5


def test_to_cpu_materialises_pending_work_in_one_execution(dev, metric_count):
    import torch_xla

    a = [torch.arange(10, dtype=torch.float32).to(dev) + i for i in range(6)]
    torch_xla.sync(wait=True)
    pending = [t * 2 + 1 for t in a]  # lazy: not computed yet
    before_exec = metric_count("ExecuteTime")
    before_xfer = metric_count("TransferFromDeviceTime")
    out = xla.to_cpu(pending)
    assert metric_count("ExecuteTime") - before_exec == 1
    assert metric_count("TransferFromDeviceTime") - before_xfer == 1
    for i, got in enumerate(out):
        assert torch.equal(got, (torch.arange(10, dtype=torch.float32) + i) * 2 + 1)


def test_to_cpu_result_is_an_independent_point_in_time_copy(dev):
    import torch_xla

    w = torch.zeros(8, device=dev)
    torch_xla.sync(wait=True)
    snap, = xla.to_cpu([w])
    w.add_(5)
    torch_xla.sync(wait=True)
    assert torch.equal(snap, torch.zeros(8))
    snap.add_(1)
    assert torch.equal(w.cpu(), torch.full((8,), 5.0))


@pytest.mark.parametrize("where", ["xla", "xla:0", "device-obj", None])
def test_to_xla_batched_and_bit_exact(dev, metric_count, where):
    device = {"device-obj": torch.device("xla")}.get(where, where)
    host = [_sample(dt, (4, 3), i) for i, dt in enumerate(DTYPES)]
    wide = sum(h.dtype in (torch.uint16, torch.uint32, torch.uint64) for h in host)
    before = metric_count("TransferToDeviceTime")
    moved = xla.to_xla(host, device)
    # one batched upload; uint16/32/64 go one by one (the batched call would turn them signed)
    assert metric_count("TransferToDeviceTime") - before == 1 + wide
    assert all(m.device == dev for m in moved)
    for got, want in zip(xla.to_cpu(moved), host):
        _assert_bit_exact(got, want)
    # the device copies do not alias host memory
    host[0].fill_(0)
    assert not torch.equal(xla.to_cpu([moved[0]])[0], host[0])
    assert xla.to_xla([]) == []


def test_module_does_not_import_torch_xla_by_itself():
    code = ("import sys, torch, asyncckpt.snapshot.xla as x; "
            "assert x.to_cpu([torch.ones(1)])[0].device.type == 'cpu'; "
            "assert 'torch_xla' not in sys.modules, 'asyncckpt.snapshot.xla imported torch_xla'")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
