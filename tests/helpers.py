"""Shared test utilities: deep structural equality and a Lightning-shaped training state."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch


def assert_same(a: Any, b: Any, where: str = "<root>") -> None:
    """Deep equality including container types, key types and order, and bit-exact tensors."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"
        assert a.requires_grad == b.requires_grad, f"{where}: requires_grad differs"
        x, y = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
        if x.numel():
            assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), f"{where}: values differ"
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{where}: keys {list(a)[:5]} != {list(b)[:5]}"
        for (ka, va), kb in zip(a.items(), b.keys()):
            assert type(ka) is type(kb), f"{where}: key {ka!r} type differs"
            assert_same(va, b[kb], f"{where}.{ka}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length differs"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}.{i}")
    elif isinstance(a, float) and a != a:
        assert b != b, f"{where}: NaN lost"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def lightning_state(model: torch.nn.Module | None = None) -> dict[str, Any]:
    """What Lightning's checkpoint connector builds: nested metadata, int keys, optimizer and scheduler states."""
    model = model or tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    for _ in range(3):
        model(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": model.state_dict(),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4, "completed": 3}},
                               "epoch_loop.batch_progress": {"current": {"ready": 40}, "is_last_batch": False}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
            "best_model_score": torch.tensor(0.25), "best_model_path": "/ckpt/epoch=2.ckpt",
            "best_k_models": {"/ckpt/epoch=2.ckpt": torch.tensor(0.25)}, "kth_value": torch.tensor(float("inf")),
            "dirpath": None}},
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [sched.state_dict()],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 1e-3, "layers": [16, 32, 4], "betas": (0.9, 0.999), "name": "tiny", "eps": 1e-8,
                             "nan": float("nan"), 7: "int key", (1, 2): "tuple key"},
        "ordered": OrderedDict([("b", 1), ("a", 2.5)]),
    }
