"""What the ranks of tests/dist_worker.py run: one function per scenario, ``fn(rank, world, **args)``, returning
something JSON can carry. States are deterministic (seeded), and values are compared as digests of their bytes."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from asyncckpt.dcp import StorageReader, StorageWriter, unwrapped

ENGINE = {"chunk_bytes": 64 << 10, "host_memory_budget": 64 << 20}  # small chunks: many checksummed pieces


def digest(t: torch.Tensor) -> str:
    if isinstance(t, DTensor):
        t = t.full_tensor()
    if isinstance(t, ShardedTensor):  # FSDP1's own sharded state: this rank's shards, with where they lie
        return ";".join(f"{s.metadata.shard_offsets}:{digest(s.tensor)}" for s in t.local_shards())
    t = t.detach().cpu().contiguous()
    return f"{t.dtype}{list(t.shape)}:" + xxhash.xxh3_64_hexdigest(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def digests(value: Any, path: str = "") -> dict[str, str]:
    """Every leaf of a state, by key path: tensors (whole, even sharded) as digests of their bytes, others as repr."""
    out: dict[str, str] = {}
    if isinstance(value, torch.Tensor):
        out[path] = digest(value)
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            out.update(digests(value[k], f"{path}.{k}"))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            out.update(digests(v, f"{path}.{i}"))
    else:
        out[path] = repr(value)
    return out


def model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))


def train(m: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, steps: int = 2) -> None:
    for i in range(steps):
        torch.manual_seed(100 + 10 * rank + i)
        m(torch.randn(4, 16)).square().sum().backward()
        opt.step()
        opt.zero_grad()


def save(state: dict[str, Any], path: str, mode: str, mutate: Any = None, **options: Any) -> StorageWriter:
    """Save through asyncckpt.dcp; with mode "async", ``mutate()`` runs as soon as async_save returns."""
    writer = StorageWriter(path, **{**ENGINE, **options})
    with unwrapped():
        if mode == "sync":
            dcp.save(state, storage_writer=writer)
        else:
            kind = AsyncCheckpointerType.PROCESS if mode == "process" else AsyncCheckpointerType.THREAD
            future = dcp.async_save(state, storage_writer=writer, async_checkpointer_type=kind)
            if mutate is not None:
                mutate()
            future.result()
    return writer


def load(state: dict[str, Any], path: str, **options: Any) -> StorageReader:
    reader = StorageReader(path, **{**ENGINE, **options})
    with unwrapped():
        dcp.load(state, storage_reader=reader)
    return reader


def stats(reader: StorageReader) -> dict[str, Any]:
    s = reader.stats
    return {"wanted": s.wanted, "read": s.read, "chunks": s.chunks}


# ---------------------------------------------------------------- the matrix


def ddp_adam(rank: int, world: int, path: str, mode: str = "sync", reference: str | None = None) -> dict[str, Any]:
    """DDP model + Adam: save (deduplicated: each replicated item written by one rank), load into a fresh one."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = DDP(model(0))
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    train(net, opt, rank)
    msd, osd = get_state_dict(net, opt)
    state = {"model": msd, "optim": osd, "step": 2, "note": {"run": "ddp", "lr": [0.1]}}
    expected = digests(state)
    if reference and rank == 0:
        torch.save({k: v.clone() for k, v in net.module.state_dict().items()}, reference)

    def mutate() -> None:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1000.0)
        state["note"]["lr"].append(99)

    writer = save(state, path, mode, mutate)
    fresh = DDP(model(1))
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.1)
    msd2, osd2 = get_state_dict(fresh, fresh_opt)
    target = {"model": msd2, "optim": osd2, "step": 0, "note": {"run": "", "lr": []}}
    reader = load(target, path)
    set_state_dict(fresh, fresh_opt, model_state_dict=target["model"], optim_state_dict=target["optim"])
    msd3, osd3 = get_state_dict(fresh, fresh_opt)
    loaded = digests({"model": msd3, "optim": osd3, "step": target["step"], "note": target["note"]})
    return {"expected": expected, "loaded": loaded, "bytes_written": writer.bytes_written,
            "from_staging": writer.bytes_from_staging, "read": stats(reader)}


def _ddp_embedding(seed: int) -> tuple[Any, Any]:
    """A DDP model with a large embedding (4096 x 64: 1 MiB, and so each of Adam's moments) and its Adam."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(seed)
    net = DDP(torch.nn.Sequential(torch.nn.Embedding(4096, 64), torch.nn.Linear(64, 8)))
    return net, torch.optim.Adam(net.parameters(), lr=0.1)


def _embedding_step(net: Any, opt: Any, rank: int, step: int) -> None:
    torch.manual_seed(100 + 10 * rank + step)
    net(torch.randint(0, 4096, (32,))).square().sum().backward()
    opt.step()
    opt.zero_grad()


def _loaded_embedding(path: str) -> dict[str, str]:
    """Digests of a fresh `_ddp_embedding` state loaded from ``path``."""
    fresh, fresh_opt = _ddp_embedding(1)
    fresh(torch.randint(0, 4096, (4,))).sum().backward()
    fresh_opt.step()  # Adam's state exists to load into
    msd, osd = get_state_dict(fresh, fresh_opt)
    target = {"model": msd, "optim": osd}
    load(target, path)
    set_state_dict(fresh, fresh_opt, model_state_dict=target["model"], optim_state_dict=target["optim"])
    msd, osd = get_state_dict(fresh, fresh_opt)
    return digests({"model": msd, "optim": osd})


def ddp_large(rank: int, world: int, path: str, mode: str = "sync", split_bytes: int | None = 256 << 10
              ) -> dict[str, Any]:
    """DDP with a large embedding and Adam: its weight and both moments (1 MiB each) are cut across the ranks."""
    net, opt = _ddp_embedding(0)
    for i in range(2):
        _embedding_step(net, opt, rank, i)
    msd, osd = get_state_dict(net, opt)
    state = {"model": msd, "optim": osd}
    expected = digests(state)

    def mutate() -> None:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1000.0)

    writer = save(state, path, mode, mutate, split_bytes=split_bytes)
    return {"expected": expected, "loaded": _loaded_embedding(path), "bytes_written": writer.bytes_written}


def fsdp2(rank: int, world: int, path: str, mode: str = "sync") -> dict[str, Any]:
    """FSDP2 (fully_shard on a CPU mesh) + Adam, through get_state_dict / set_state_dict."""
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))

    def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        m = model(seed)
        for layer in m:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
        return m, torch.optim.Adam(m.parameters(), lr=0.05)

    m, opt = build(0)
    train(m, opt, rank)
    msd, osd = get_state_dict(m, opt)
    state = {"model": msd, "optim": osd}
    expected = digests(state)
    sharded = isinstance(msd["0.weight"], DTensor)
    local = sum(v.to_local().nbytes for part in (msd, *osd["state"].values()) for v in part.values()
                if isinstance(v, DTensor))

    def mutate() -> None:
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(-3.0)

    writer = save(state, path, mode, mutate)
    m2, opt2 = build(1)
    msd2, osd2 = get_state_dict(m2, opt2)
    target = {"model": msd2, "optim": osd2}
    reader = load(target, path)
    set_state_dict(m2, opt2, model_state_dict=target["model"], optim_state_dict=target["optim"])
    msd3, osd3 = get_state_dict(m2, opt2)
    return {"expected": expected, "loaded": digests({"model": msd3, "optim": osd3}), "sharded": sharded,
            "local_bytes": local, "bytes_written": writer.bytes_written, "from_staging": writer.bytes_from_staging,
            "read": stats(reader)}


def dtensors(rank: int, world: int, path: str, mode: str = "sync") -> dict[str, Any]:
    """DTensors Shard(0), Shard(1) (uneven) and Replicate; then reload with other placements (resharding)."""
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(7)
    full = {"rows": torch.randn(512, 256), "cols": torch.randn(9, 7, dtype=torch.float64),
            "rep": torch.arange(30, dtype=torch.int32).view(5, 6), "half": torch.randn(16, 16).half()}
    placements = {"rows": Shard(0), "cols": Shard(1), "rep": Replicate(), "half": Shard(0)}
    state = {k: distribute_tensor(v, mesh, [placements[k]]) for k, v in full.items()}
    state["plain"] = torch.linspace(0, 1, 11)
    expected = digests(state)

    def mutate() -> None:
        with torch.no_grad():
            for v in state.values():
                (v.to_local() if isinstance(v, DTensor) else v).zero_()

    writer = save(state, path, mode, mutate)
    others = {"rows": Shard(1), "cols": Shard(0), "rep": Shard(0), "half": Replicate()}
    target = {k: distribute_tensor(torch.zeros_like(v), mesh, [others[k]]) for k, v in full.items()}
    target["plain"] = torch.zeros(11)
    reader = load(target, path)
    same = {k: distribute_tensor(torch.zeros_like(v), mesh, [placements[k]]) for k, v in full.items()}
    same["plain"] = torch.zeros(11)
    aligned = load(same, path)
    share = sum(v.to_local().nbytes for k, v in same.items() if k != "plain") + same["plain"].nbytes
    return {"expected": expected, "loaded": digests(target), "aligned": digests(same),
            "bytes_written": writer.bytes_written, "from_staging": writer.bytes_from_staging, "read": stats(reader),
            "aligned_read": stats(aligned), "share": share}


def dtensors_load(rank: int, world: int, path: str) -> dict[str, Any]:
    """Load the checkpoint of :func:`dtensors` (saved on 2 ranks) on ``world`` ranks, other placements again."""
    mesh = init_device_mesh("cpu", (world,))
    shapes = {"rows": ((512, 256), torch.float32), "cols": ((9, 7), torch.float64), "rep": ((5, 6), torch.int32),
              "half": ((16, 16), torch.float16)}
    placements = {"rows": Shard(1), "cols": Shard(0), "rep": Replicate(), "half": Shard(0)}
    target: dict[str, Any] = {k: distribute_tensor(torch.zeros(shape, dtype=dtype), mesh, [placements[k]])
                              for k, (shape, dtype) in shapes.items()}
    target["plain"] = torch.zeros(11)
    load(target, path)
    return {"loaded": digests(target)}


def s3_save(rank: int, world: int, path: str, options: dict[str, Any], mode: str = "sync") -> dict[str, Any]:
    """DTensor + plain state saved to and loaded from the moto S3 server."""
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(3)
    state = {"w": distribute_tensor(torch.randn(40, 40), mesh, [Shard(0)]), "b": torch.randn(40), "step": 5}
    expected = digests(state)
    save(state, path, mode, storage_options=options)
    target = {"w": distribute_tensor(torch.zeros(40, 40), mesh, [Shard(1)]), "b": torch.zeros(40), "step": 0}
    load(target, path, storage_options=options)
    return {"expected": expected, "loaded": digests(target)}


# ---------------------------------------------------------------- kill trials


def trial_state(step: int, world: int, rank: int) -> dict[str, Any]:
    """The state of ``step``: every value depends on the step, so old and new are told apart byte by byte."""
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(step)
    full = torch.randn(96, 256, generator=g)  # 96 KiB, sharded: a chunk per rank and then some
    return {"w": distribute_tensor(full, mesh, [Shard(0)]), "b": torch.full((300,), float(step)),
            "meta": {"step": step, "tag": f"step-{step}"}}


def trial_digests(step: int) -> dict[str, str]:
    """What a checkpoint of ``step`` loads as, on one process (used by the test to compare)."""
    g = torch.Generator().manual_seed(step)
    return digests({"w": torch.randn(96, 256, generator=g), "b": torch.full((300,), float(step)),
                    "meta": {"step": step, "tag": f"step-{step}"}})


def overwrite(rank: int, world: int, path: str, step: int, marks: str, mode: str = "sync", slow: float = 0.0,
              pause: bool = False) -> dict[str, Any]:
    """Save ``trial_state(step)`` over ``path``, marking each phase in the file ``marks`` (one line per event, with
    the rank) so the test can kill a rank there. ``slow`` sleeps in each chunk write (a slow disk); with ``pause``,
    rank 1 stops before its first write and rank 0 marks ``written`` once its own files are durable."""
    import asyncckpt.io.local as local
    import asyncckpt.pipeline.committer as committer

    def mark(what: str) -> None:
        with open(marks, "a") as f:
            f.write(f"{rank} {what} {time.monotonic()}\n")

    sink_write, put, sweep = local.LocalSink._write, local.LocalStorage.put_atomic, committer.Committer.remove
    write_data = StorageWriter.write_data

    def slow_write(self: Any, *a: Any) -> Any:
        if pause and rank == 1:
            mark("paused")
            time.sleep(60)
        mark("write")
        time.sleep(slow)
        return sink_write(self, *a)

    async def marked_put(self: Any, *a: Any) -> Any:
        mark("commit")
        await put(self, *a)
        mark("committed")

    async def marked_sweep(self: Any, *a: Any) -> Any:
        mark("sweep")
        await sweep(self, *a)
        mark("swept")

    def marked_write_data(self: Any, *a: Any) -> Any:
        out = write_data(self, *a)
        mark("written")
        return out

    local.LocalSink._write, local.LocalStorage.put_atomic = slow_write, marked_put
    committer.Committer.remove, StorageWriter.write_data = marked_sweep, marked_write_data
    state = trial_state(step, world, rank)
    mark("start")
    writer = save(state, path, mode, chunk_bytes=16 << 10)
    mark("done")
    writer.engine.close()  # the files of the save it replaced are removed in the background: let that end (the
    # ranks leave through os._exit, which a normal exit's flush would not)
    return {"ok": True}


def stock_overwrite(rank: int, world: int, path: str, step: int, marks: str, pause: bool = False) -> dict[str, Any]:
    """The same overwrite with torch's own FileSystemWriter; with ``pause`` as in :func:`overwrite`."""
    import torch.distributed.checkpoint.filesystem as filesystem

    def mark(what: str) -> None:
        with open(marks, "a") as f:
            f.write(f"{rank} {what} {time.monotonic()}\n")

    original = filesystem._write_files_from_queue

    def write_files(*a: Any, **k: Any) -> Any:
        if pause and rank == 1:
            mark("paused")
            time.sleep(60)
        out = original(*a, **k)
        mark("written")
        return out

    filesystem._write_files_from_queue = write_files
    state = trial_state(step, world, rank)
    mark("start")
    dcp.save(state, storage_writer=dcp.FileSystemWriter(path))
    mark("done")
    return {"ok": True}


def failing_save(rank: int, world: int, path: str) -> dict[str, Any]:
    """A save whose target cannot be created: DCP raises its CheckpointException on every rank."""
    from torch.distributed.checkpoint.api import CheckpointException

    from asyncckpt.dcp import unwrap

    try:
        dcp.save({"w": torch.ones(4) * rank}, storage_writer=StorageWriter(path))
    except CheckpointException as exc:
        ours = unwrap(exc)
        return {"raised": type(exc).__name__, "base_exception": not isinstance(exc, Exception),
                "unwrapped": type(ours).__name__, "message": str(ours)}
    return {"raised": None}


def engine_refuses_dtensor(rank: int, world: int, path: str) -> dict[str, Any]:
    """A DTensor handed to the single-process engine is refused, not pickled."""
    import asyncckpt

    mesh = init_device_mesh("cpu", (world,))
    state = {"model": {"w": distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)])}}
    try:
        asyncckpt.SyncEngine().save(state, path).result()
    except asyncckpt.CheckpointError as exc:
        return {"message": str(exc)}
    return {"message": ""}


def asyncio_face(rank: int, world: int, path: str, blocked: str) -> dict[str, Any]:
    """CheckpointEngine(process_group=pg): save returns after this rank's copy, the handle after the global
    commit; load reshards in place; a failing save raises our error, not DCP's CheckpointException."""
    import asyncio

    import torch.distributed as dist

    import asyncckpt

    mesh = init_device_mesh("cpu", (world,))
    group = dist.new_group(backend="gloo")  # the engine's own group: its collectives never meet the training's
    torch.manual_seed(11)
    state = {"w": distribute_tensor(torch.randn(12, 10), mesh, [Shard(0)]), "b": torch.linspace(0, 1, 7),
             "step": 3}
    expected = digests(state)

    async def main() -> dict[str, Any]:
        async with asyncckpt.CheckpointEngine(process_group=group, **ENGINE) as engine:
            handle = await engine.save(state, path)
            snapshot_done = handle.snapshot_done()
            with torch.no_grad():  # the caller may change any tensor as soon as save returns
                state["w"].to_local().add_(100)
                state["b"].add_(100)
            state["step"] = 4
            result = await handle
            target = {"w": distribute_tensor(torch.zeros(12, 10), mesh, [Shard(1)]), "b": torch.zeros(7),
                      "step": 0}
            left = await engine.load(path, state=target)
            try:
                await (await engine.save(state, blocked))
                error: list[str] = []
            except asyncckpt.CheckpointError as exc:  # an Exception: a plain `except Exception` sees it
                error = [type(exc).__name__, str(exc)]
            return {"snapshot_done": snapshot_done, "bytes_written": result.bytes_written,
                    "shards": result.shards, "left": sorted(left), "loaded": digests(target), "error": error}

    out = asyncio.run(main())
    return {"expected": expected, **out}


def ddp_repeat(rank: int, world: int, path: str, saves: int = 3) -> dict[str, Any]:
    """DDP + Adam saved again and again with dcp.async_save (parameters changed as soon as each returns): from the
    second save on, a rank copies only the replicated tensors (and rows) it wrote the time before."""
    net, opt = _ddp_embedding(0)
    records = []
    for n in range(saves):
        _embedding_step(net, opt, rank, n)
        msd, osd = get_state_dict(net, opt)
        state = {"model": msd, "optim": osd}
        expected = digests(state)
        writer = StorageWriter(f"{path}/step-{n}", **ENGINE, split_bytes=256 << 10)
        with unwrapped():
            future = dcp.async_save(state, storage_writer=writer)
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(1000.0)
            future.result()
        records.append({"expected": expected, "staged": writer.bytes_staged, "written": writer.bytes_written,
                        "from_staging": writer.bytes_from_staging})
    for n, record in enumerate(records):
        record["loaded"] = _loaded_embedding(f"{path}/step-{n}")
    return {"saves": records}


def ddp_diverge(rank: int, world: int, path: str) -> dict[str, Any]:
    """Replicated tensors saved with dcp.async_save; then rank 1 drops from its state one that it wrote: rank 0,
    whose state did not change, copies only its share, so nobody holds that tensor — the save fails on every rank
    with our error, the checkpoint it would have replaced stays, and the next save (rank 1's state whole again)
    commits."""
    from torch.distributed.checkpoint.api import CheckpointException

    from asyncckpt.dcp import unwrap
    from asyncckpt.format.manifest import MANIFEST_NAME, parse

    def state(step: int) -> dict[str, torch.Tensor]:
        return {f"w{i}": torch.full((256, 256), float(step * 10 + i)) for i in range(8)}

    def save(s: dict[str, torch.Tensor]) -> str:
        try:
            dcp.async_save(s, storage_writer=StorageWriter(path, **ENGINE)).result()
        except CheckpointException as exc:
            return f"{type(unwrap(exc)).__name__}: {unwrap(exc)}"
        return ""

    first = save(state(1))
    with open(f"{path}/{MANIFEST_NAME}", "rb") as f:
        manifest = parse(f.read(), path)
    by = {t.fqn: {manifest.shards[c.span.shard].file.split("-")[2] for c in t.chunks} for t in manifest.tensors}
    dropped = sorted(k for k, ranks in by.items() if ranks == {"r00001"})[0]
    second_state = state(2)
    if rank == 1:
        del second_state[dropped]
    second = save(second_state)
    after_failure = {k: float(v[0, 0]) for k, v in _load_plain(path, state(0)).items()}
    third = save(state(3))
    after = {k: float(v[0, 0]) for k, v in _load_plain(path, state(0)).items()}
    return {"first": first, "dropped": dropped, "second": second, "after_failure": after_failure, "third": third,
            "after": after}


def _load_plain(path: str, target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    load(target, path)
    return target


def thread_then_process(rank: int, world: int, path: str) -> dict[str, Any]:
    """The same replicated state saved by async_save in thread mode, then twice in process mode: the first process
    save carries a state staged in part (the thread save's share) to DCP's checkpoint process, which writes that
    share; the next one (no share known: the checkpoint process wrote the last) stages everything."""
    state = {f"w{i}": torch.full((256, 256), float(i)) for i in range(4)}
    outcomes, staged = [], []
    for n, kind in enumerate((AsyncCheckpointerType.THREAD, AsyncCheckpointerType.PROCESS,
                              AsyncCheckpointerType.PROCESS)):
        writer = StorageWriter(f"{path}/{n}", **ENGINE)
        with unwrapped():
            dcp.async_save(state, storage_writer=writer, async_checkpointer_type=kind).result()
        staged.append(writer.bytes_staged)
        target = {k: torch.zeros(256, 256) for k in state}
        load(target, f"{path}/{n}")
        outcomes.append(all(torch.equal(target[k], v) for k, v in state.items()))
    return {"outcomes": outcomes, "staged": staged}
