"""`make demo`: train, checkpoint asynchronously every few steps, "crash", resume from the latest checkpoint.

Runs on the local disk with the engine's defaults. Prints, for each save, how long the training loop was blocked
(the snapshot) and how fast the checkpoint became durable, then shows that the resumed run continues from the
step, weights and optimizer state where the first run stopped.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import anyio
import torch

import asyncckpt

WIDTH = 1024  # ~3.1M parameters: with Adam's two moments a ~36 MiB checkpoint


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[m for _ in range(3) for m in (torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU())],
                                torch.nn.Linear(WIDTH, 1))
    return model, torch.optim.Adam(model.parameters(), lr=3e-4)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(64, WIDTH, generator=g)
    return x, x[:, :8].sum(dim=1, keepdim=True)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> float:
    x, y = batch(step)
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


async def first_run(root: Path, steps: int, every: int) -> dict[str, torch.Tensor]:
    model, opt = build()
    print(f"run 1: training {steps} steps, checkpointing every {every} steps to {root}/")
    saves = []
    async with asyncckpt.CheckpointEngine() as engine:
        for step in range(1, steps + 1):
            loss = train_step(model, opt, step)  # compute only: the writes progress on the engine's own thread
            if step % every == 0:
                t0 = time.perf_counter()
                handle = await engine.save({"model": model, "optimizer": opt, "step": step, "loss": loss},
                                           root / f"step-{step:04d}")
                saves.append((step, time.perf_counter() - t0, handle))
                print(f"  step {step:4d}  loss {loss:8.4f}  save blocked training {saves[-1][1] * 1e3:6.1f} ms")
        print("  every save, once durable:")
        for step, blocked, handle in saves:
            r = await handle
            total = r.snapshot_seconds + r.write_seconds
            print(f"    step-{step:04d}: {r.bytes_written / 2**20:5.1f} MiB, blocked {blocked * 1e3:6.1f} ms, "
                  f"durable after {total:5.3f} s ({r.throughput / 2**20:6.0f} MiB/s)")
    print(f"run 1 stops at step {steps} (pretend the job was preempted)")
    return {k: v.clone() for k, v in model.state_dict().items()}


async def resume(root: Path, extra: int, expected: dict[str, torch.Tensor]) -> None:
    model, opt = build()
    latest = asyncckpt.latest(root)
    assert latest is not None, "no committed checkpoint found"
    async with asyncckpt.CheckpointEngine() as engine:
        t0 = time.perf_counter()
        rest = await engine.load(latest, state={"model": model, "optimizer": opt})
        took = time.perf_counter() - t0
    step = rest["step"]
    same = all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    print(f"run 2: resumed from {Path(latest).name} in {took * 1e3:.0f} ms: step {step}, "
          f"weights identical to run 1's last state: {same}")
    for s in range(step + 1, step + extra + 1):
        loss = train_step(model, opt, s)
        print(f"  step {s:4d}  loss {loss:8.4f}")
    if not same:
        raise SystemExit("resume did not restore the saved state")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("demo-ckpts"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=5)
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    expected = anyio.run(first_run, args.dir, args.steps, args.every)
    anyio.run(resume, args.dir, 5, expected)


if __name__ == "__main__":
    main()
