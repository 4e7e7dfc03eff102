"""What checkpointing costs a training loop: a real model trained with Adam on the CPU, a checkpoint every k steps.

    python -m benchmarks trainloop [--rounds 3] [--pairs 3] [--width 1536] [--layers 10] [--every 4]
                                   [--checkpoints 4] [--out DIR]

Each contender runs in fresh processes (``--rounds`` of them, round-robin). In a process, after a warm-up loop, the
same loop runs ``--pairs`` times with checkpoints and as many times without, alternating, so that the difference of
a pair is measured on one heap, one page cache and one CPU state. A loop is ``every × (checkpoints + 1)`` steps with
a checkpoint after every ``every`` steps but the last ``every``, so each checkpoint's background work has training
steps to overlap and counts in the loop's time. Overhead per checkpoint = (with − without) / checkpoints, median of
all pairs, as a ratio to the copy floor of the state (a plain copy into buffers allocated beforehand). The time the
save call itself takes (what a deferred snapshot shortens) and the last checkpoint's time to durable after the loop
ends are reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .report import write_json

CONTENDERS = ["torch.save", "lightning-async", "dcp-async", "asyncckpt", "asyncckpt-deferred"]


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


def one(name: str, width: int, layers: int, every: int, checkpoints: int, pairs: int,
        workdir: Path) -> dict[str, Any]:
    import anyio

    from .contenders import CONTENDERS as ALL, OursNative
    from .worker import drive

    model, opt = build(width, layers)
    train_step(model, opt, width)  # Adam's state exists from here on
    state = lambda: {"model": model.state_dict(), "optimizer": opt.state_dict()}  # noqa: E731
    tensors = [t for t in model.state_dict().values()] + [t for s in opt.state.values() for t in s.values()
                                                          if isinstance(t, torch.Tensor)]
    out: dict[str, Any] = {"contender": name, "state_bytes": sum(t.nbytes for t in tensors), "with_s": [],
                           "without_s": [], "drain_s": [], "blocking_s": []}
    if name == "asyncckpt-deferred":
        class Deferred(OursNative):
            def engine_options(self, workload: Any) -> dict[str, Any]:
                return {"snapshot": "deferred"}
        contender = Deferred()
    else:
        contender = ALL[name]()
    native = getattr(contender, "async_native", False)
    steps = every * (checkpoints + 1)

    async def loop(saving: bool) -> None:
        pending, paths = [], []
        t0 = time.perf_counter()
        for step in range(1, steps + 1):
            train_step(model, opt, width)
            if saving and step % every == 0 and step < steps:
                paths.append(workdir / f"ck-{step}{contender.suffix}")
                current = state()
                t1 = time.perf_counter()
                pending.append(await contender.save(current, paths[-1]))
                out["blocking_s"].append(time.perf_counter() - t1)
        elapsed = time.perf_counter() - t0
        if not saving:
            out["without_s"].append(elapsed)
            return
        out["with_s"].append(elapsed)
        t1 = time.perf_counter()
        for p in pending:
            await contender.durable(p)
        out["drain_s"].append(time.perf_counter() - t1)
        for path in paths:  # room for the next pair's checkpoints, outside the timed loop
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    async def run() -> None:
        await contender.open(workdir, None)
        engine = getattr(contender, "engine", None)
        if engine is not None:  # set-up as the docs advise: plan and allocate staging before the loop
            await engine.prepare(state())
        await loop(False)  # warm-up: the first loop of a process runs slower
        out["without_s"].clear()
        for i in range(pairs):
            for saving in ((True, False) if i % 2 == 0 else (False, True)):
                await loop(saving)
        await contender.close()

    (anyio.run if native else drive)(run() if not native else run)  # type: ignore[operator]
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
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per contender")
    parser.add_argument("--pairs", type=int, default=3, help="loops with and without checkpoints per process")
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--checkpoints", type=int, default=4, help="checkpoints per loop")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma list of: {', '.join(CONTENDERS)}")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.width, args.layers, args.every, args.checkpoints, args.pairs,
                             args.workdir)))
        return 0
    names = [n for n in args.contenders.split(",") if n]
    unknown = sorted(set(names) - set(CONTENDERS))
    if unknown:
        parser.error(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}")
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            with tempfile.TemporaryDirectory(dir=".") as d:
                proc = subprocess.run([sys.executable, "-m", "benchmarks", "trainloop", "--one", name, "--workdir", d,
                                       "--width", str(args.width), "--layers", str(args.layers),
                                       "--every", str(args.every), "--checkpoints", str(args.checkpoints),
                                       "--pairs", str(args.pairs)],
                                      capture_output=True, text=True, env=env, timeout=1800)
            if proc.returncode != 0:
                print(f"{name}: failed: {proc.stderr[-800:]}", file=sys.stderr)
                continue
            x = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[name].append(x)
            print(f"round {r + 1} {name}: with {', '.join(f'{s:.2f}' for s in x['with_s'])} s, without "
                  f"{', '.join(f'{s:.2f}' for s in x['without_s'])} s", file=sys.stderr)
    if not any(runs.values()):
        print("no contender ran", file=sys.stderr)
        return 1
    floor = statistics.median(x["copy_floor_s"] for v in runs.values() for x in v)
    without = [s for v in runs.values() for x in v for s in x["without_s"]]
    summary: dict[str, Any] = {"checkpoints_per_loop": args.checkpoints, "steps_per_loop": args.every *
                               (args.checkpoints + 1), "copy_floor_s": floor, "loop_without_s": statistics.median(
                                   without), "state_bytes": next(x["state_bytes"] for v in runs.values() for x in v),
                               "runs": runs, "contenders": {}}
    print(f"state {summary['state_bytes'] / 2**20:.0f} MiB, copy floor {floor * 1e3:.1f} ms, loop without "
          f"checkpoints {summary['loop_without_s']:.2f} s ({min(without):.2f}–{max(without):.2f}; "
          f"{summary['steps_per_loop']} steps, {args.checkpoints} checkpoints, one after every {args.every} steps)")
    for name, xs in runs.items():
        if not xs:
            continue
        per = sorted((w - wo) / args.checkpoints for x in xs for w, wo in zip(x["with_s"], x["without_s"]))
        overhead = statistics.median(per)
        drain = statistics.median(d for x in xs for d in x["drain_s"])
        blocking = statistics.median(b for x in xs for b in x["blocking_s"])
        summary["contenders"][name] = {"overhead_per_checkpoint_s": overhead, "overhead_x_floor": overhead / floor,
                                       "pairs": len(per), "overhead_range_s": [per[0], per[-1]],
                                       "blocking_s": blocking, "blocking_x_floor": blocking / floor,
                                       "final_drain_s": drain}
        print(f"  {name:20s} {overhead * 1e3:7.1f} ms per checkpoint = {overhead / floor:5.2f}x floor "
              f"({per[0] * 1e3:.0f} to {per[-1] * 1e3:.0f} ms over {len(per)} pairs; save call {blocking * 1e3:.1f} ms "
              f"= {blocking / floor:.2f}x floor; last checkpoint durable {drain * 1e3:.0f} ms after the loop)")
    write_json(args.out, "trainloop.json", summary)
    return 0
