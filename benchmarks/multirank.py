"""Many ranks through torch.distributed.checkpoint: asyncckpt.dcp against torch's own FileSystemWriter.

    python -m benchmarks multirank [--ranks 2] [--mib 256] [--rounds 3] [--out DIR]

Each rank (a forked process on gloo, CPU) holds ``--mib`` MiB of DTensor shards (Shard(0) of a few global
tensors) plus a replicated tensor. In one run, for both storages: ``dcp.save`` (time to durable), ``dcp.async_save``
thread mode (time it blocked, time to durable), ``dcp.load`` into the same placement, and a reshard load into
Shard(1) with the bytes each rank read against its share (asyncckpt's reader reports them). Figures are the slowest
rank's, medians over rounds; bytes written per rank come from the files.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from .report import write_json

MiB = 1 << 20
TENSORS = 4  # global tensors, each Shard(0) over the ranks


def _state(rank: int, world: int, mib: int, placement: Any, fill: bool = False) -> dict[str, Any]:
    """This rank's part of the state: ``TENSORS`` float32 ``[rows * world, 1024]`` DTensors placed by
    ``placement`` (random values with ``fill``, zeros to load into), a replicated tensor and a number."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world,))
    rows = mib * MiB // (TENSORS * 1024 * 4)  # local rows per rank under Shard(0)
    local_shape = (rows, 1024) if placement == Shard(0) else (rows * world, 1024 // world)
    torch.manual_seed(rank)
    state: dict[str, Any] = {}
    for i in range(TENSORS):
        local = torch.randn(local_shape) if fill else torch.zeros(local_shape)
        state[f"layer{i}.weight"] = DTensor.from_local(local, mesh, [placement], run_check=False,
                                                       shape=torch.Size((rows * world, 1024)),
                                                       stride=(1024, 1))
    state["replicated"] = torch.ones(1024, 256) if fill else torch.zeros(1024, 256)
    state["step"] = 7 if fill else 0
    return state


def _timed(fn: Any) -> float:
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def _rank(rank: int, world: int, store: str, base: str, mib: int, rounds: int, out: str) -> None:
    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.tensor import Shard

    from asyncckpt.dcp import StorageReader, StorageWriter, unwrapped

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    budget = {"host_memory_budget": 2 * mib * MiB + 256 * MiB}
    writers = {"asyncckpt": lambda p: StorageWriter(p, **budget), "torch": lambda p: FileSystemWriter(p)}
    readers = {"asyncckpt": lambda p: StorageReader(p, **budget), "torch": lambda p: FileSystemReader(p)}
    state = _state(rank, world, mib, Shard(0), fill=True)
    figures: dict[str, dict[str, list[float]]] = {name: {} for name in writers}

    def note(name: str, key: str, value: float) -> None:
        figures[name].setdefault(key, []).append(value)

    with unwrapped():
        for r in range(rounds):
            for name, make in writers.items():
                path = f"{base}/{name}-sync"
                note(name, "save_durable_s", _timed(lambda: dcp.save(state, storage_writer=make(path))))
                apath = f"{base}/{name}-async"
                dist.barrier()
                t0 = time.perf_counter()
                future = dcp.async_save(state, storage_writer=make(apath))
                note(name, "async_blocking_s", time.perf_counter() - t0)
                future.result()
                dist.barrier()
                note(name, "async_durable_s", time.perf_counter() - t0)
                os.sync()
                target = _state(rank, world, mib, Shard(0))
                note(name, "load_s", _timed(lambda: dcp.load(target, storage_reader=readers[name](path))))
                resharded = _state(rank, world, mib, Shard(1))
                reader = readers[name](path)
                note(name, "reshard_load_s", _timed(lambda: dcp.load(resharded, storage_reader=reader)))
                if name == "asyncckpt":
                    share = sum(v.to_local().nbytes for k, v in resharded.items() if k.startswith("layer"))
                    note(name, "reshard_read_vs_share", reader.stats.read / max(share, 1))
    mine = {"asyncckpt": f"-r{rank:05d}-", "torch": f"__{rank}_"}
    written = {name: sum(p.stat().st_size for p in Path(f"{base}/{name}-sync").iterdir() if mine[name] in p.name)
               for name in writers}
    with open(out, "w") as f:
        json.dump({"figures": figures, "bytes_written": written}, f)
    dist.barrier()
    dist.destroy_process_group()


def run(world: int, mib: int, rounds: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(dir=".") as d:
        d = os.path.abspath(d)  # file:// stores need an absolute path
        outs = [f"{d}/rank-{r}.json" for r in range(world)]
        procs = [ctx.Process(target=_rank, args=(r, world, f"{d}/store", f"{d}/ck", mib, rounds, outs[r]))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=1800)
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
        ranks = [json.loads(Path(o).read_text()) for o in outs]
    result: dict[str, Any] = {"ranks": world, "mib_per_rank": mib, "rounds": rounds}
    for name in ("asyncckpt", "torch"):
        keys = ranks[0]["figures"][name]
        result[name] = {k: statistics.median(max(r["figures"][name][k][i] for r in ranks) for i in range(rounds))
                        for k in keys}
        result[name]["bytes_written_per_rank"] = [r["bytes_written"][name] for r in ranks]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks multirank", description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    r = run(args.ranks, args.mib, args.rounds)
    ours, stock = r["asyncckpt"], r["torch"]
    for key in ("save_durable_s", "async_blocking_s", "async_durable_s", "load_s", "reshard_load_s"):
        print(f"{key:18s} asyncckpt {ours[key] * 1e3:8.0f} ms   torch FileSystemWriter {stock[key] * 1e3:8.0f} ms   "
              f"ratio {ours[key] / stock[key]:.2f}")
    print(f"reshard read / share (asyncckpt): {ours['reshard_read_vs_share']:.3f}")
    print(f"bytes written per rank: asyncckpt {ours['bytes_written_per_rank']}, torch "
          f"{stock['bytes_written_per_rank']}")
    write_json(args.out, "multirank.json", r)
    return 0
