"""``asyncckpt bench TARGET``: is the storage or the engine the bottleneck?

Measures, on the target itself (a local directory or any URL the engine can write), how fast the storage moves
bytes without the engine — parallel ``O_DIRECT`` writes and reads for a directory, concurrent whole-object PUTs and
ranged GETs for object stores — and how fast the engine saves and loads a synthetic state of the same size, in the
same run. Comparisons with other libraries live in the repository's ``benchmarks/`` harness.
"""

from __future__ import annotations

import statistics
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

import anyio
import torch

from ..core import EngineCore
from ..io.paths import is_local, local_path
from ..sync_engine import SyncEngine
from . import fsutil, limits
from .progress import human_bytes

MiB = 1 << 20


def synthetic_state(nbytes: int, tensor_bytes: int = 64 * MiB) -> dict[str, torch.Tensor]:
    """float32 tensors of at most ``tensor_bytes`` adding up to ``nbytes``, plus 64 small ones (biases, norms)."""
    g = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    left = nbytes
    while left > 0:
        n = min(tensor_bytes, left) // 4 or 1
        state[f"layer.{len(state)}.weight"] = torch.randn(n, generator=g)
        left -= n * 4
    for i in range(64):
        state[f"norm.{i}.bias"] = torch.randn(256, generator=g)
    return state


async def _raw_object_store(core: EngineCore, url: str, nbytes: int, part: int) -> tuple[float, float]:
    """Seconds to PUT ``nbytes`` as ``part``-sized objects, then to GET them back, ``write_concurrency`` at once."""
    target = await core.open_target(url, None)
    storage = target.storage
    data = bytes(range(256)) * (part // 256) + bytes(part % 256)
    names = [storage.join(target.path, f"raw-{i:05d}.bin") for i in range(max(1, nbytes // part))]
    limiter = anyio.Semaphore(core.io.limit)

    async def put(name: str) -> None:
        async with limiter:
            await storage.put_atomic(name, data, True)

    async def get(name: str) -> None:
        async with limiter:
            out = torch.empty(part, dtype=torch.uint8)
            reader = await storage.open_reader(name)
            try:
                await reader.read_into(0, out)
            finally:
                await reader.close()

    times = []
    for step in (put, get):
        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(step, name)
        times.append(time.perf_counter() - t0)
    for name in names:
        await storage.remove(name)
    return times[0], times[1]


def run(target: Any, size: int = 256 * MiB, repeats: int = 3, storage_options: Mapping[str, Any] | None = None,
        **engine_options: Any) -> dict[str, Any]:
    """Measure the storage at ``target`` and the engine on it; see `report` for reading the result."""
    url = str(target).rstrip("/")
    state = synthetic_state(size)
    tensors = list(state.values())
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    out: dict[str, Any] = {"target": url, "bytes": nbytes, "repeats": repeats, "tensors": len(tensors),
                           "copy_floor_s": limits.copy_floor(tensors, repeats=3)["seconds"]}
    with SyncEngine(storage_options=storage_options, **engine_options) as engine:
        core = engine.core
        run_dir = f"{url}/asyncckpt-bench-{uuid.uuid4().hex[:8]}"
        if is_local(url):
            raw = Path(local_path(run_dir)) / "raw"
            write = limits.raw_write(raw, nbytes, [1, 2, 4, 8])
            read = limits.raw_read([Path(f) for f in write["files"]], [1, 2, 4, 8])
            fsutil.remove(raw)
            out.update(raw_write_s=write["seconds"], raw_read_s=read["seconds"],
                       raw_how=f"{write['mode']} pwrite + fsync, {read['mode']} preadv, best of 1-8 threads")
        else:
            part = engine.options.chunk_bytes
            w, r = engine.run(_raw_object_store, core, run_dir, nbytes, part)
            out.update(raw_write_s=w, raw_read_s=r, raw_how=f"{human_bytes(part)} objects, "
                       f"{core.io.limit} requests in flight")
        blocking, durable, loads = [], [], []
        for i in range(repeats + 1):  # the first save allocates and touches the staging buffers
            path = f"{run_dir}/ckpt-{i}"
            t0 = time.perf_counter()
            handle = engine.save(state, path)
            t1 = time.perf_counter()
            handle.result()
            t2 = time.perf_counter()
            if is_local(url):
                fsutil.evict(local_path(path))
            engine.load(path, state=state)
            t3 = time.perf_counter()
            engine.remove(path)
            if i == 0:
                out["first_blocking_s"] = t1 - t0
                continue
            blocking.append(t1 - t0)
            durable.append(t2 - t0)
            loads.append(t3 - t2)
        if is_local(url):
            fsutil.remove(local_path(run_dir))
    out.update(blocking_s=statistics.median(blocking), durable_s=statistics.median(durable),
               load_s=statistics.median(loads))
    return out


def report(r: dict[str, Any]) -> list[str]:
    """Lines that say what was measured and which side is the bottleneck."""
    gb = r["bytes"] / 1e9
    write_ratio = r["raw_write_s"] / r["durable_s"]
    read_ratio = r["raw_read_s"] / r["load_s"]
    lines = [
        f"target {r['target']}: {human_bytes(r['bytes'])} in {r['tensors']} tensors, median of {r['repeats']} saves",
        f"  storage alone   write {gb / r['raw_write_s']:6.2f} GB/s   read {gb / r['raw_read_s']:6.2f} GB/s"
        f"   ({r['raw_how']})",
        f"  engine          save  {gb / r['durable_s']:6.2f} GB/s   load {gb / r['load_s']:6.2f} GB/s"
        f"   (save durable in {r['durable_s'] * 1e3:.0f} ms, load in place {r['load_s'] * 1e3:.0f} ms)",
        f"  training blocked {r['blocking_s'] * 1e3:.1f} ms per save ({r['blocking_s'] / r['copy_floor_s']:.2f}x "
        f"the {r['copy_floor_s'] * 1e3:.1f} ms memory-copy floor; the first save: "
        f"{r['first_blocking_s'] * 1e3:.0f} ms, allocating its staging buffers)",
    ]
    for what, ratio in (("saves", write_ratio), ("loads", read_ratio)):
        if ratio >= 0.8:
            lines.append(f"  {what} reach {ratio:.0%} of what the storage does alone: the storage is the bottleneck")
        else:
            lines.append(f"  {what} reach {ratio:.0%} of what the storage does alone: the engine is the bottleneck "
                         "here; try more write_concurrency or larger chunk_bytes")
    return lines
