"""Many ranks through torch.distributed.checkpoint: asyncckpt.dcp against torch's own FileSystemWriter.

    python -m benchmarks multirank [--ranks 2] [--mib 256] [--rounds 3] [--out DIR]

Each rank (a forked process on gloo, CPU) holds ``--mib`` MiB of DTensor shards (Shard(0) of a few global
tensors) plus a replicated tensor. In one run, for both storages: ``dcp.save`` (time to durable), ``dcp.async_save``
thread mode (time it blocked, time to durable), ``dcp.load`` into the same placement, and a reshard load into
Shard(1) with the bytes each rank read against its share (asyncckpt's reader reports them). Then the same saves and
a load of a DDP model with Adam (an embedding of half ``--ddp-mib`` MiB, every rank holding all of it). Loads read
from the disk: the checkpoint's files are pushed out of the page cache first. Figures are the slowest rank's, medians over
rounds; bytes written per rank come from the files.
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


def _timed(fn: Any, cold: str | None = None) -> float:
    """Time ``fn`` on every rank at once; with ``cold``, that checkpoint's files are out of the page cache first
    (both storages' loads read from the disk, as after a restart)."""
    import torch.distributed as dist

    from asyncckpt.tools.fsutil import evict

    if cold is not None and dist.get_rank() == 0:
        evict(cold)
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def _ddp_model(width: int, vocab: int) -> torch.nn.Module:
    """A DDP-wrapped language-model-like stack: a large embedding (the tensor DCP alone writes on one rank),
    four square layers and an output head."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Embedding(vocab, width)]
    layers += [torch.nn.Linear(width, width) for _ in range(4)]
    layers.append(torch.nn.Linear(width, 256))
    return DDP(torch.nn.Sequential(*layers))


def _ddp_state(width: int, vocab: int, train: bool) -> tuple[dict[str, Any], Any, Any]:
    """The model's and Adam's state dicts (get_state_dict), after one step (values differ on every save)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = _ddp_model(width, vocab)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randint(0, vocab, (8,))
    model(x).square().mean().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd, "step": 1 if train else 0}, model, opt


def _ddp_shape(mib: int) -> tuple[int, int]:
    """Width and vocabulary of a :func:`_ddp_model` whose embedding takes half of ``mib`` MiB (the layers and head
    add 4.5 MiB; Adam's moments triple it all)."""
    width = 512
    vocab = max(256, (mib * MiB // 2) // (width * 4))
    return width, vocab


def _rank(rank: int, world: int, store: str, base: str, mib: int, ddp_mib: int, rounds: int, out: str) -> None:
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
    budget = {"host_memory_budget": 2 * max(mib, 3 * ddp_mib) * MiB + 256 * MiB}
    writers = {"asyncckpt": lambda p: StorageWriter(p, **budget), "torch": lambda p: FileSystemWriter(p)}
    readers = {"asyncckpt": lambda p: StorageReader(p, **budget), "torch": lambda p: FileSystemReader(p)}
    state = _state(rank, world, mib, Shard(0), fill=True)
    figures: dict[str, dict[str, list[float]]] = {name: {} for name in writers}

    def note(name: str, key: str, value: float) -> None:
        figures[name].setdefault(key, []).append(value)

    width, vocab = _ddp_shape(ddp_mib)
    ddp_state, _, _ = _ddp_state(width, vocab, True)

    def saves(name: str, make: Any, key: str, state: dict[str, Any]) -> str:
        path = f"{base}/{name}-{key}sync"
        note(name, f"{key}save_durable_s", _timed(lambda: dcp.save(state, storage_writer=make(path))))
        apath = f"{base}/{name}-{key}async"
        dist.barrier()
        t0 = time.perf_counter()
        future = dcp.async_save(state, storage_writer=make(apath))
        note(name, f"{key}async_blocking_s", time.perf_counter() - t0)
        future.result()
        dist.barrier()
        note(name, f"{key}async_durable_s", time.perf_counter() - t0)
        return path

    with unwrapped():
        for r in range(rounds):
            for name, make in writers.items():
                path = saves(name, make, "", state)
                target = _state(rank, world, mib, Shard(0))
                note(name, "load_s", _timed(lambda: dcp.load(target, storage_reader=readers[name](path)), path))
                resharded = _state(rank, world, mib, Shard(1))
                reader = readers[name](path)
                note(name, "reshard_load_s", _timed(lambda: dcp.load(resharded, storage_reader=reader), path))
                if name == "asyncckpt":
                    share = sum(v.to_local().nbytes for k, v in resharded.items() if k.startswith("layer"))
                    note(name, "reshard_read_vs_share", reader.stats.read / max(share, 1))
                path = saves(name, make, "ddp_", ddp_state)
                fresh, _, _ = _ddp_state(width, vocab, False)
                note(name, "ddp_load_s", _timed(lambda: dcp.load(fresh, storage_reader=readers[name](path)), path))
    mine = {"asyncckpt": f"-r{rank:05d}-", "torch": f"__{rank}_"}
    written = {f"{name}{key}": sum(p.stat().st_size for p in Path(f"{base}/{name}-{key}sync").iterdir()
                                   if mine[name] in p.name)
               for name in writers for key in ("", "ddp_")}
    with open(out, "w") as f:
        json.dump({"figures": figures, "bytes_written": written}, f)
    dist.barrier()
    dist.destroy_process_group()


def run(world: int, mib: int, ddp_mib: int, rounds: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(dir=".") as d:
        d = os.path.abspath(d)  # file:// stores need an absolute path
        outs = [f"{d}/rank-{r}.json" for r in range(world)]
        procs = [ctx.Process(target=_rank, args=(r, world, f"{d}/store", f"{d}/ck", mib, ddp_mib, rounds, outs[r]))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=1800)
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
        ranks = [json.loads(Path(o).read_text()) for o in outs]
    result: dict[str, Any] = {"ranks": world, "mib_per_rank": mib, "ddp_weights_mib": ddp_mib, "rounds": rounds}
    for name in ("asyncckpt", "torch"):
        keys = ranks[0]["figures"][name]
        result[name] = {k: statistics.median(max(r["figures"][name][k][i] for r in ranks) for i in range(rounds))
                        for k in keys}
        result[name]["bytes_written_per_rank"] = [r["bytes_written"][name] for r in ranks]
        result[name]["ddp_bytes_written_per_rank"] = [r["bytes_written"][f"{name}ddp_"] for r in ranks]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks multirank", description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--mib", type=int, default=256, help="DTensor shards per rank")
    parser.add_argument("--ddp-mib", type=int, default=64,
                        help="twice the DDP model's embedding, in MiB (64: 36.5 MiB of weights, 110 MiB with Adam)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    r = run(args.ranks, args.mib, args.ddp_mib, args.rounds)
    ours, stock = r["asyncckpt"], r["torch"]
    for key in ("save_durable_s", "async_blocking_s", "async_durable_s", "load_s", "reshard_load_s",
                "ddp_save_durable_s", "ddp_async_blocking_s", "ddp_async_durable_s", "ddp_load_s"):
        print(f"{key:22s} asyncckpt {ours[key] * 1e3:8.0f} ms   torch FileSystemWriter {stock[key] * 1e3:8.0f} ms   "
              f"ratio {ours[key] / stock[key]:.2f}")
    print(f"reshard read / share (asyncckpt): {ours['reshard_read_vs_share']:.3f}")
    for key in ("bytes_written_per_rank", "ddp_bytes_written_per_rank"):
        print(f"{key}: asyncckpt {ours[key]}, torch {stock[key]}")
    write_json(args.out, "multirank.json", r)
    return 0
