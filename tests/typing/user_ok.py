"""A user's script, type-checked with ``mypy --strict`` by tests/test_typing.py: the public API is typed."""

from __future__ import annotations

import anyio
import torch

import asyncckpt


async def train(directory: str) -> int | None:
    model = torch.nn.Linear(4, 2)
    async with asyncckpt.CheckpointEngine(host_memory_budget=64 << 20, snapshot="eager") as engine:
        handle: asyncckpt.SaveHandle = await engine.save({"model": model, "step": 3}, f"{directory}/step-3")
        result: asyncckpt.SaveResult = await handle
        seconds: float = result.snapshot_seconds + result.write_seconds
        assert seconds >= 0 and result.bytes_written > 0
        rest = await engine.load(f"{directory}/step-3", state={"model": model})
        assert rest == {"step": 3}
        newest: str | None = await engine.latest(directory)
        assert newest is not None
    async with asyncckpt.CheckpointManager(directory + "/managed", keep_last=2) as manager:
        saved = await manager.save(1, {"model": model})
        if saved is not None:
            await saved
        step: int | None = await manager.restore({"model": model})
    return step


def threaded(directory: str) -> None:
    with asyncckpt.SyncEngine(write_concurrency=4) as engine:
        result = engine.save({"w": torch.ones(3)}, f"{directory}/a").result(timeout=60)
        print(result.throughput)
        engine.remove(f"{directory}/a")
    try:
        asyncckpt.latest(directory, storage_options={"anon": True})
    except asyncckpt.S3Error as exc:
        print(exc.code, exc.bucket)
    except asyncckpt.CheckpointError as exc:
        print(exc)
    found: asyncckpt.Verification = asyncckpt.verify(directory)
    print(found.ok, asyncckpt.RetryPolicy(attempts=3).delay(0))


def lightning_plugins() -> None:
    from asyncckpt.lightning import AsyncCheckpointIO, AsyncModelParallelStrategy
    from asyncckpt.lightning.pl import NativeCheckpointIO

    plugin = AsyncCheckpointIO(max_pending_saves=2, host_memory_budget=1 << 30)
    native = NativeCheckpointIO(max_pending_saves=None)
    strategy = AsyncModelParallelStrategy(max_pending_saves=1)
    print(plugin, native, strategy)


if __name__ == "__main__":
    print(anyio.run(train, "typed-demo"))
