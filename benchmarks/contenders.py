"""The contenders, each driven the way its users drive it.

Every contender exposes the same small async protocol so a single measurement loop serves all:

* ``check()``: raise :class:`Unavailable` with a reason when it cannot run here;
* ``open(workdir, workload)`` / ``close()``: per-process set-up and tear-down (untimed);
* ``save(state, path) -> pending``: the call a training loop makes; its duration is the
  *blocking* time;
* ``durable(pending)``: wait until the save is complete (the harness then fsyncs every file the
  contender wrote, uniformly for all, so every contender ends at the same durability);
* ``load(path, workload, target)``: restore into an already-built model / state, as a user would.

Synchronous libraries implement the async methods without awaiting anything; the worker drives
them without an event loop (see ``worker.drive``), so they run exactly as they would in a plain
script. Only asyncckpt's native engine runs inside ``asyncio.run``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


class Unavailable(Exception):
    """The contender cannot run in this environment (reason in the message)."""


class Contender:
    name = "?"
    label = "?"
    is_ours = False
    suffix = ""  # path suffix of one checkpoint ("" = directory)
    in_place_load = False

    def check(self) -> None:
        pass

    async def open(self, workdir: Path, workload: Any) -> None:
        pass

    async def close(self) -> None:
        pass

    async def save(self, state: Any, path: Path) -> Any:
        raise NotImplementedError

    async def durable(self, pending: Any) -> None:
        pass

    async def load(self, path: Path, workload: Any, target: Any) -> None:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {}


# ------------------------------------------------------------------------------- torch.save


class TorchSave(Contender):
    name = "torch.save"
    label = "torch.save + fsync"
    suffix = ".pt"

    async def save(self, state: Any, path: Path) -> Any:
        torch.save(state, path)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return None

    async def load(self, path: Path, workload: Any, target: Any) -> None:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        workload.apply_loaded(target, loaded)


# -------------------------------------------------------------------------------- Lightning


class _CheckpointIOContender(Contender):
    """A Lightning ``CheckpointIO`` plugin: ``save_checkpoint`` is the blocking call, ``teardown``
    drains its background work (Lightning calls it at the end of fit; calling it after each save
    is the public way to wait for one save; the executor is re-created on the next save)."""

    suffix = ".ckpt"

    def _make_io(self) -> Any:
        raise NotImplementedError

    async def open(self, workdir: Path, workload: Any) -> None:
        self.io = self._make_io()

    async def save(self, state: Any, path: Path) -> Any:
        self.io.save_checkpoint(state, str(path))
        return None

    async def durable(self, pending: Any) -> None:
        self.io.teardown()

    async def load(self, path: Path, workload: Any, target: Any) -> None:
        loaded = self.io.load_checkpoint(str(path))
        workload.apply_loaded(target, loaded)

    async def close(self) -> None:
        self.io.teardown()


class LightningAsync(_CheckpointIOContender):
    name = "lightning-async"
    label = "Lightning AsyncCheckpointIO"

    def check(self) -> None:
        try:
            from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO  # noqa: F401
        except ImportError as e:
            raise Unavailable(f"lightning not importable: {e}") from e

    def _make_io(self) -> Any:
        from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

        return AsyncCheckpointIO(TorchCheckpointIO())

    def info(self) -> dict[str, Any]:
        import lightning

        return {"version": lightning.__version__}


class OursLightning(_CheckpointIOContender):
    name = "asyncckpt-lightning"
    label = "asyncckpt Lightning plugin"
    is_ours = True

    def check(self) -> None:
        try:
            from asyncckpt.lightning import AsyncCheckpointIO  # noqa: F401
            from lightning.pytorch.plugins.io import TorchCheckpointIO  # noqa: F401
        except ImportError as e:
            raise Unavailable(f"not available: {e}") from e

    def _make_io(self) -> Any:
        from asyncckpt.lightning import AsyncCheckpointIO
        from lightning.pytorch.plugins.io import TorchCheckpointIO

        return AsyncCheckpointIO(TorchCheckpointIO())

    async def durable(self, pending: Any) -> None:
        # The plugin's own drain keeps its engine and staging buffers warm across saves, as in a
        # Trainer; teardown() (closing the engine) is only the fallback.
        drain = getattr(self.io, "wait", None) or self.io.teardown
        drain()


class OursLightningNative(OursLightning):
    """``asyncckpt.lightning.NativeCheckpointIO``: the engine's sharded format behind Lightning's
    CheckpointIO API (a directory per checkpoint)."""

    name = "asyncckpt-lightning-native"
    label = "asyncckpt Lightning NativeCheckpointIO"
    suffix = ".ckpt"

    def check(self) -> None:
        try:
            from asyncckpt.lightning import NativeCheckpointIO  # noqa: F401
            from lightning.pytorch.plugins.io import TorchCheckpointIO  # noqa: F401
        except ImportError as e:
            raise Unavailable(f"not available: {e}") from e

    def _make_io(self) -> Any:
        from asyncckpt.lightning import NativeCheckpointIO
        from lightning.pytorch.plugins.io import TorchCheckpointIO

        return NativeCheckpointIO(TorchCheckpointIO())


# --------------------------------------------------------------------------------------- DCP


class DCPAsync(Contender):
    """``torch.distributed.checkpoint.async_save`` in a one-process gloo group (FileStore)."""

    name = "dcp-async"
    label = "torch DCP async_save"
    in_place_load = True

    def check(self) -> None:
        import torch.distributed as dist

        if not dist.is_available():
            raise Unavailable("torch.distributed not available in this build")

    async def open(self, workdir: Path, workload: Any) -> None:
        import torch.distributed as dist

        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        store_path = workdir / "dcp-filestore"
        if store_path.exists():
            store_path.unlink()
        store = dist.FileStore(str(store_path), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)

    async def save(self, state: Any, path: Path) -> Any:
        import torch.distributed.checkpoint as dcp

        return dcp.async_save(state, checkpoint_id=str(path))

    async def durable(self, pending: Any) -> None:
        # Thread mode returns a Future; newer staging modes return AsyncSaveResponse.
        fut = getattr(pending, "upload_completion", pending)
        fut.result()

    async def load(self, path: Path, workload: Any, target: Any) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.load(workload.target_state(target), checkpoint_id=str(path))

    async def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------ torchsnapshot


class TorchSnapshot(Contender):
    name = "torchsnapshot"
    label = "torchsnapshot async_take"
    in_place_load = True

    def check(self) -> None:
        try:
            import torchsnapshot  # noqa: F401
        except Exception as e:  # noqa: BLE001 - any import failure means "cannot run"
            raise Unavailable(f"not installable/importable here: {type(e).__name__}: {e}") from e

    async def save(self, state: Any, path: Path) -> Any:
        from torchsnapshot import Snapshot, StateDict

        try:
            return Snapshot.async_take(str(path), app_state={"ckpt": StateDict(**state)})
        except AssertionError as e:
            if "buffer stager" in str(e):
                raise RuntimeError(
                    "torchsnapshot cannot save this state: with torch "
                    f"{torch.__version__} its batched writer mis-sizes bfloat16 tensors that share "
                    f"a batch with others (bf16 buffers in this workload) [{e}]") from e
            raise

    async def durable(self, pending: Any) -> None:
        pending.wait()

    async def load(self, path: Path, workload: Any, target: Any) -> None:
        from torchsnapshot import Snapshot, StateDict

        # Restores tensors in place into the target's tensors.
        Snapshot(str(path)).restore(app_state={"ckpt": StateDict(**workload.target_state(target))})

    def info(self) -> dict[str, Any]:
        import torchsnapshot

        return {"version": getattr(torchsnapshot, "__version__", "?")}


# -------------------------------------------------------------------------------- asyncckpt


class OursNative(Contender):
    """``asyncckpt.CheckpointEngine`` used natively from asyncio."""

    name = "asyncckpt"
    label = "asyncckpt CheckpointEngine"
    is_ours = True
    in_place_load = True
    async_native = True
    budget_fraction: float | None = None

    def check(self) -> None:
        try:
            import asyncckpt

            asyncckpt.CheckpointEngine  # noqa: B018
        except (ImportError, AttributeError) as e:
            raise Unavailable(f"not available: {e}") from e

    def engine_options(self, workload: Any) -> dict[str, Any]:
        return {}

    async def open(self, workdir: Path, workload: Any) -> None:
        import asyncckpt

        self.options = self.engine_options(workload)
        self._cm = asyncckpt.CheckpointEngine(**self.options)
        self.engine = await self._cm.__aenter__()

    async def save(self, state: Any, path: Path) -> Any:
        return await self.engine.save(state, str(path))

    async def durable(self, pending: Any) -> None:
        await pending

    async def load(self, path: Path, workload: Any, target: Any) -> None:
        await self.engine.load(str(path), state=workload.target_state(target))

    async def close(self) -> None:
        await self._cm.__aexit__(None, None, None)

    def info(self) -> dict[str, Any]:
        import asyncckpt

        return {"version": getattr(asyncckpt, "__version__", "?"),
                "options": getattr(self, "options", {})}


class OursOverlap(OursNative):
    """The engine with ``overlap_writes=True``: writes start while the snapshot still copies."""

    name = "asyncckpt-overlap"
    label = "asyncckpt, overlap_writes=True"

    def engine_options(self, workload: Any) -> dict[str, Any]:
        return {"overlap_writes": True}


class OursDeferred(OursNative):
    """The engine with ``snapshot="deferred"``: ``save`` returns after planning; the copy runs in the background."""

    name = "asyncckpt-deferred"
    label = "asyncckpt, snapshot=\"deferred\""

    def engine_options(self, workload: Any) -> dict[str, Any]:
        return {"snapshot": "deferred"}


class OursBudget(OursNative):
    """The engine held to a host staging budget of 25% of the state's tensor bytes."""

    name = "asyncckpt-budget"
    label = "asyncckpt, budget 25% of state"
    budget_fraction = 0.25

    def engine_options(self, workload: Any) -> dict[str, Any]:
        from .workloads import tensor_bytes

        self.budget = int(tensor_bytes(workload.state()) * self.budget_fraction)
        opts: dict[str, Any] = {"host_memory_budget": self.budget}
        # The engine needs the budget to hold whole chunks; with the default 32 MiB chunk that
        # is a >= 128 MiB state at 25%. Smaller (quick-mode) states get a smaller chunk: the
        # largest power of two <= budget/4 (at least 4 KiB), so staging still pipelines.
        default_chunk = 32 << 20
        if self.budget < 4 * default_chunk:
            chunk = 4096
            while chunk * 2 <= self.budget // 4:
                chunk *= 2
            opts["chunk_bytes"] = chunk
        return opts


CONTENDERS: dict[str, type[Contender]] = {c.name: c for c in (
    TorchSave, LightningAsync, DCPAsync, TorchSnapshot, OursNative, OursOverlap, OursDeferred, OursLightning,
    OursLightningNative, OursBudget)}

PEERS = ("torch.save", "lightning-async", "dcp-async", "torchsnapshot")
OURS = ("asyncckpt", "asyncckpt-overlap", "asyncckpt-deferred", "asyncckpt-lightning", "asyncckpt-lightning-native",
        "asyncckpt-budget")
