"""What checkpointing costs a training loop: a real model trained with Adam on the CPU, a checkpoint every k steps.

    python -m benchmarks trainloop [--rounds 3] [--width 1536] [--layers 10] [--steps 16] [--every 4] [--out DIR]

Overhead per checkpoint = (loop time with checkpoints - loop time without) / checkpoints, as a ratio to the copy
floor of the state (a plain copy into buffers allocated beforehand), median of rounds. Each run is a fresh process;
contenders alternate round-robin. The loop's own time stops when its last step ends; durability of the last
checkpoint is measured after that and reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .report import write_json

CONTENDERS = ["none", "torch.save", "lightning-async", "dcp-async", "asyncckpt", "asyncckpt-deferred"]


def build(width: int, layers: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    mods: list[torch.nn.Module] = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.GELU()]
    model = torch.nn.Sequential(*mods)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    return model, opt


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, width: int) -> None:
    loss = model(torch.randn(64, width)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def one(name: str, width: int, layers: int, steps: int, every: int, workdir: Path) -> dict[str, Any]:
    import anyio

    from .contenders import CONTENDERS as ALL, OursNative
    from .worker import drive

    model, opt = build(width, layers)
    train_step(model, opt, width)  # Adam's state exists from here on
    state = lambda: {"model": model.state_dict(), "optimizer": opt.state_dict()}  # noqa: E731
    tensors = [t for t in model.state_dict().values()] + [t for s in opt.state.values() for t in s.values()
                                                          if isinstance(t, torch.Tensor)]
    out: dict[str, Any] = {"contender": name, "state_bytes": sum(t.nbytes for t in tensors)}
    if name == "none":
        contender = None
    elif name == "asyncckpt-deferred":
        class Deferred(OursNative):
            def engine_options(self, workload: Any) -> dict[str, Any]:
                return {"snapshot": "deferred"}
        contender = Deferred()
    else:
        contender = ALL[name]()
    native = contender is not None and getattr(contender, "async_native", False)

    async def loop() -> None:
        pending = []
        if contender is not None:
            await contender.open(workdir, None)
            engine = getattr(contender, "engine", None)
            if engine is not None:  # set-up as the docs advise: plan and allocate staging before the loop
                await engine.prepare(state())
        t0 = time.perf_counter()
        for step in range(1, steps + 1):
            train_step(model, opt, width)
            if contender is not None and step % every == 0:
                pending.append(await contender.save(state(), workdir / f"ck-{step}{contender.suffix}"))
        out["loop_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        for p in pending:
            await contender.durable(p)
        out["drain_s"] = time.perf_counter() - t1
        if contender is not None:
            await contender.close()

    (anyio.run if native else drive)(loop() if not native else loop)  # type: ignore[operator]
    bufs = [torch.empty_like(t) for t in tensors]
    for b in bufs:
        b.zero_()
    floor = []
    for _ in range(5):
        t0 = time.perf_counter()
        for b, t in zip(bufs, tensors):
            b.copy_(t)
        floor.append(time.perf_counter() - t0)
    out["copy_floor_s"] = min(floor)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks trainloop", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--contenders", default=",".join(CONTENDERS[1:]),
                        help=f"comma list of: {', '.join(CONTENDERS[1:])} (the loop without checkpoints always runs)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.width, args.layers, args.steps, args.every, args.workdir)))
        return 0
    names = ["none", *(n for n in args.contenders.split(",") if n != "none")]
    unknown = sorted(set(names) - set(CONTENDERS))
    if unknown:
        parser.error(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS[1:])}")
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            with tempfile.TemporaryDirectory(dir=".") as d:
                proc = subprocess.run([sys.executable, "-m", "benchmarks", "trainloop", "--one", name, "--workdir", d,
                                       "--width", str(args.width), "--layers", str(args.layers),
                                       "--steps", str(args.steps), "--every", str(args.every)],
                                      capture_output=True, text=True, env=env, timeout=1800)
            if proc.returncode != 0:
                print(f"{name}: failed: {proc.stderr[-800:]}", file=sys.stderr)
                continue
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {name}: loop {runs[name][-1]['loop_s']:.2f} s", file=sys.stderr)
    checkpoints = args.steps // args.every
    base = statistics.median(x["loop_s"] for x in runs["none"]) if runs.get("none") else None
    floor = statistics.median(x["copy_floor_s"] for v in runs.values() for x in v)
    summary: dict[str, Any] = {"checkpoints_per_run": checkpoints, "copy_floor_s": floor, "baseline_loop_s": base,
                               "state_bytes": next(x["state_bytes"] for v in runs.values() for x in v), "runs": runs,
                               "contenders": {}}
    print(f"state {summary['state_bytes'] / 2**20:.0f} MiB, copy floor {floor * 1e3:.1f} ms, loop without "
          f"checkpoints {base:.2f} s ({args.steps} steps, a checkpoint every {args.every})")
    for name, xs in runs.items():
        if name == "none" or not xs or base is None:
            continue
        overhead = (statistics.median(x["loop_s"] for x in xs) - base) / checkpoints
        drain = statistics.median(x["drain_s"] for x in xs)
        summary["contenders"][name] = {"overhead_per_checkpoint_s": overhead, "overhead_x_floor": overhead / floor,
                                       "final_drain_s": drain}
        print(f"  {name:20s} {overhead * 1e3:7.1f} ms per checkpoint = {overhead / floor:5.2f}x floor "
              f"(last checkpoint durable {drain * 1e3:.0f} ms after the loop)")
    write_json(args.out, "trainloop.json", summary)
    return 0
