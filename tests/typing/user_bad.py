"""Seven mistakes a type checker must catch in a user's script (each line marked ``# expect``)."""

from __future__ import annotations

import torch

import asyncckpt


async def mistakes() -> None:
    async with asyncckpt.CheckpointEngine(chunk_bytes="32MiB") as engine:  # expect: arg-type
        handle = await engine.save({"w": torch.ones(2)}, "x", storage_options=["anon"])  # expect: arg-type
        result = await handle
        print(result.duration)  # expect: attr-defined
        handle.result(timeout="soon")  # expect: arg-type
        await engine.load("x", verify="yes")  # expect: arg-type
    with asyncckpt.SyncEngine() as sync:
        sync.save({"w": torch.ones(2)})  # expect: call-arg


def plugin_mistake() -> None:
    from asyncckpt.lightning.pl import AsyncCheckpointIO

    AsyncCheckpointIO(max_pending_saves="two")  # expect: arg-type
