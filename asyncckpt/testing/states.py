"""Deterministic training-like states for tests: a small model, what Lightning's connector saves, and a state that
exercises every corner of the format."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch


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


def mixed_state(seed: int = 0, scale: int = 1, big_tensors: int = 0, big_bytes: int = 0) -> dict[str, Any]:
    """A state different for every ``seed``: float32/float64/bf16/int8/int64/bool/complex64 tensors (``scale``
    multiplies their sizes), a non-contiguous view and overlapping views sharing storage, a Parameter, an empty
    tensor, a pickled value (a set, weights-only loadable) and nested plain data with None, NaN and an
    OrderedDict; plus ``big_tensors`` float32 tensors of ``big_bytes`` each (multipart uploads, many chunks)."""
    g = torch.Generator().manual_seed(1000 + seed)
    w = torch.randn(48 * scale, 80, generator=g)
    base = torch.randn(600 * scale, generator=g)
    state: dict[str, Any] = {
        "model": {
            "w": w,
            "w_t": w.t()[::2],  # a non-contiguous view sharing w's storage
            "b": torch.randn(700 * scale, generator=g).to(torch.bfloat16),
            "emb": torch.randint(-128, 127, (100 * scale, 64), generator=g, dtype=torch.int8),
            "ids": torch.randint(-(1 << 40), 1 << 40, (300 * scale,), generator=g),
            "mask": torch.rand(513, generator=g) > 0.5,
            "z": torch.randn(40, generator=g).to(torch.complex64),
            "p": torch.nn.Parameter(torch.randn(33, generator=g)),
            "empty": torch.zeros(0, 3),
        },
        "views": [base[10:400], base[100:], base[::3]],  # overlapping views: one shared storage blob
        "optim": {"state": {0: {"exp_avg": torch.randn(2000 * scale, generator=g, dtype=torch.float64)}},
                  "param_groups": [{"lr": 1e-3 / (seed + 1), "params": [0]}]},
        "tags": {f"s{seed}", "x"},
        "meta": OrderedDict(step=seed, name=f"run-{seed}", loss=float("nan"), hist=[seed * 0.5, (seed, None, True)]),
    }
    if big_tensors:
        state["big"] = [torch.randn(big_bytes // 4, generator=g) for _ in range(big_tensors)]
    return state
