"""Both faces in a training loop that never yields: time from ``save`` to durable, asyncio face vs threaded face.

    python -m benchmarks faces [--rounds 3] [--out DIR]

The asyncio face's writes run on the engine's own runtime, so they must progress while a synchronous training step
computes; the threaded face has always had a thread of its own. The figure is the ratio of the two medians.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import torch

import asyncckpt

from .report import write_json

WIDTH, STEPS, EVERY = 1024, 30, 5  # the demo's model: a ~36 MiB checkpoint with Adam


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layers = [m for _ in range(3) for m in (torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU())]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(WIDTH, 1))
    return model, torch.optim.Adam(model.parameters(), lr=3e-4)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    x = torch.randn(64, WIDTH)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _durable(handles: list[tuple[float, Any]], done_at: dict[int, float]) -> list[float]:
    return [done_at[i] - t0 for i, (t0, _) in enumerate(handles)]


def _watch(handles: list[tuple[float, Any]], done_at: dict[int, float]) -> None:
    """Record when each handle became done, polled between training steps (no await, no blocking wait)."""
    for i, (_, h) in enumerate(handles):
        if i not in done_at and h.done():
            done_at[i] = time.perf_counter()


async def run_async(root: Path) -> list[float]:
    model, opt = _model()
    handles: list[tuple[float, Any]] = []
    done_at: dict[int, float] = {}
    async with asyncckpt.CheckpointEngine() as engine:
        for step in range(1, STEPS + 1):
            _step(model, opt)
            _watch(handles, done_at)
            if step % EVERY == 0:
                handles.append((time.perf_counter(), await engine.save({"model": model, "opt": opt},
                                                                       root / f"a-{step}")))
        while len(done_at) < len(handles):  # keep training-like busy work going until the last one lands
            _step(model, opt)
            _watch(handles, done_at)
    return _durable(handles, done_at)


def run_sync(root: Path) -> list[float]:
    model, opt = _model()
    handles: list[tuple[float, Any]] = []
    done_at: dict[int, float] = {}
    with asyncckpt.SyncEngine() as engine:
        for step in range(1, STEPS + 1):
            _step(model, opt)
            _watch(handles, done_at)
            if step % EVERY == 0:
                handles.append((time.perf_counter(), engine.save({"model": model, "opt": opt}, root / f"s-{step}")))
        while len(done_at) < len(handles):
            _step(model, opt)
            _watch(handles, done_at)
    return _durable(handles, done_at)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks faces", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    results: dict[str, list[float]] = {"CheckpointEngine": [], "SyncEngine": []}
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as d:
            results["CheckpointEngine"] += anyio.run(run_async, Path(d))
        with tempfile.TemporaryDirectory() as d:
            results["SyncEngine"] += run_sync(Path(d))
    medians = {k: statistics.median(v) for k, v in results.items()}
    ratio = medians["CheckpointEngine"] / medians["SyncEngine"]
    lines = [f"time to durable in a loop that never yields ({args.rounds} rounds x {STEPS // EVERY} saves, medians):",
             *(f"  {k:16s} {v * 1e3:7.1f} ms  (min {min(results[k]) * 1e3:.1f}, max {max(results[k]) * 1e3:.1f})"
               for k, v in medians.items()),
             f"  ratio CheckpointEngine / SyncEngine = {ratio:.2f}"]
    print("\n".join(lines))
    write_json(args.out, "faces.json", {"seconds": results, "medians": medians, "ratio": ratio})
    return 0
