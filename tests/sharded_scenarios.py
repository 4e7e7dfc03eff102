"""What the ranks of tests/test_lightning_sharded.py run (through tests/dist_worker.py, which imports this module
before it forks): Lightning's sharded strategies made asynchronous by asyncckpt, on a 2-rank gloo group on the CPU.

``ModelParallelStrategy`` runs in a real ``Trainer`` (FSDP2 ``fully_shard`` in ``configure_model``); Lightning
refuses ``FSDPStrategy`` on the CPU, so that one is set up by hand around an FSDP1 module, as far as Lightning allows.
Values are compared as digests of their bytes (tests/dist_scenarios.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import threading
import time
import warnings
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

import asyncckpt.io.local as local
import asyncckpt.lightning as al
from dist_scenarios import digests

warnings.filterwarnings("ignore")
PACKAGES = {name: importlib.import_module(name) for name in ("lightning.pytorch", "pytorch_lightning")
            if importlib.util.find_spec(name.split(".")[0]) is not None}


def lightning(package: str) -> tuple[Any, Any]:
    """Lightning's trainer package and asyncckpt's classes built on it."""
    return PACKAGES[package], (al if package == "lightning.pytorch" else al.pl)


def module_class(package: str, width: int = 32) -> type:
    L = PACKAGES[package]

    class Sharded(L.LightningModule):
        """16 -> width -> 4, each Linear sharded with fully_shard over the tensor-parallel mesh dimension."""

        def __init__(self, seed: int = 0) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.net = torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.ReLU(), torch.nn.Linear(width, 4))

        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            if self.device_mesh is None:  # load_from_checkpoint outside a Trainer: a plain module
                return
            mesh = self.device_mesh["tensor_parallel"]
            for layer in self.net:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: torch.Tensor, i: int) -> torch.Tensor:
            return self(batch).square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=0.01)

        def train_dataloader(self) -> Any:
            torch.manual_seed(0)
            return torch.utils.data.DataLoader(torch.randn(64, 16), batch_size=4)

    return Sharded


def state_digests(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, str]:
    """The whole (gathered) module and optimizer state: a collective, every rank calls it."""
    return digests({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)})


def trainer(package: str, out: str, strategy: Any, **kwargs: Any) -> Any:
    L, _ = lightning(package)
    return L.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=out, **kwargs)


def slow_writes(seconds: float) -> None:
    """Every shard write of this process sleeps first: a slow disk, so saves stay pending."""
    write = local.LocalSink._write

    def slow(self: Any, *a: Any) -> Any:
        time.sleep(seconds)
        return write(self, *a)

    local.LocalSink._write = slow


def fit_and_resume(rank: int, world: int, out: str, package: str) -> dict[str, Any]:
    """fit with top-k and last checkpoints; a new Trainer resumes from ckpt_path="last"."""
    L, ours = lightning(package)
    Sharded = module_class(package)
    seen: dict[str, Any] = {}

    class Record(L.Callback):
        def on_train_start(self, trainer: Any, module: Any) -> None:
            seen["step"] = trainer.global_step
            seen["digests"] = state_digests(module, trainer.optimizers[0])

    ckpt = L.callbacks.ModelCheckpoint(dirpath=out, filename="{step}", monitor="step", mode="max", save_top_k=2,
                                       every_n_train_steps=2, save_last=True)
    first = trainer(package, out, ours.AsyncModelParallelStrategy(), max_steps=6, callbacks=[ckpt])
    model = Sharded(0)
    first.fit(model)
    ended = state_digests(model, first.optimizers[0])
    listing = {name: sorted(os.listdir(os.path.join(out, name))) for name in sorted(os.listdir(out))}
    first.strategy.barrier()

    again = trainer(package, out, ours.AsyncModelParallelStrategy(), max_steps=8,
                    callbacks=[Record(), L.callbacks.ModelCheckpoint(dirpath=out, filename="{step}", save_last=True,
                                                                     every_n_train_steps=4)])
    again.fit(Sharded(1), ckpt_path="last")
    result = {"ended": ended, "resumed": seen["digests"], "resumed_step": seen["step"], "listing": listing,
              "threads": sorted(t.name for t in threading.enumerate())}
    if rank == 0:
        meta = torch.load(os.path.join(out, "step=6.ckpt", "meta.pt"))  # Lightning's loader reads it so
        result["meta"] = {"global_step": meta["global_step"], "epoch": meta["epoch"],
                          "keys": sorted(meta)}
        plain = al.load_from_checkpoint(Sharded, os.path.join(out, "step=6.ckpt"))
        result["plain"] = digests(plain.state_dict())
        result["ended_model"] = {k[len(".model"):]: v for k, v in ended.items() if k.startswith(".model.")}
    return result


def pending(rank: int, world: int, out: str, package: str, slow: float) -> dict[str, Any]:
    """Saves that stay pending (slow writes): save returns at once, remove and load wait, failures surface once."""
    L, ours = lightning(package)
    Sharded = module_class(package)
    threads_before = {t.name for t in threading.enumerate()}
    t = trainer(package, out, ours.AsyncModelParallelStrategy(), max_steps=2, enable_checkpointing=False)
    model = Sharded(0)
    t.fit(model)
    strategy, optimizer = t.strategy, t.optimizers[0]
    threads_after_fit = sorted({th.name for th in threading.enumerate()} - threads_before)
    slow_writes(slow)
    result: dict[str, Any] = {"threads_after_fit": threads_after_fit}

    def mutate() -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-3.0)

    # 1. a save returns before its writes; the directory is there at once, meta.pt only after the commit
    a = os.path.join(out, "a.ckpt")
    t0 = time.monotonic()
    t.save_checkpoint(a)
    result["save_returned_s"] = time.monotonic() - t0
    result["pending_layout"] = (os.path.isdir(a), os.path.exists(os.path.join(a, "meta.pt")))
    mutate()
    # 2. removal (rank 0, as Lightning calls it) waits for the pending save, so nothing comes back afterwards
    if rank == 0:
        t0 = time.monotonic()
        strategy.remove_checkpoint(a)
        result["remove_waited_s"] = time.monotonic() - t0
    strategy.wait()
    strategy.barrier()
    time.sleep(2 * slow)
    result["a_exists_after"] = os.path.exists(a)

    # 3. a load right after a save waits for it (every rank) and restores the values of the moment of the save
    b = os.path.join(out, "b.ckpt")
    expected = state_digests(model, optimizer)
    t.save_checkpoint(b)
    mutate()
    changed = state_digests(model, optimizer)
    meta = strategy.load_checkpoint(b)
    result.update(expected=expected, changed_differs=changed != expected, loaded=state_digests(model, optimizer),
                  meta_step=meta["global_step"], files=sorted(os.listdir(b)))

    # 4. a failed background save is raised once, by teardown
    write = local.LocalSink._write

    def failing(self: Any, *a: Any) -> Any:
        raise OSError(28, "No space left on device")

    local.LocalSink._write = failing
    c = os.path.join(out, "c.ckpt")
    t.save_checkpoint(c)
    try:
        strategy.teardown()
        result["teardown_error"] = None
    except Exception as exc:
        result["teardown_error"] = f"{type(exc).__name__}: {exc}"
    local.LocalSink._write = write
    strategy.teardown()  # reported once: a second teardown is quiet
    torch.distributed.barrier()  # rank 0 removes the failed save's directory as its save ends: look after that
    result["c_files"] = sorted(os.listdir(c)) if os.path.isdir(c) else None
    result["threads_left"] = sorted({th.name for th in threading.enumerate()} - threads_before)
    return result


def fsdp(rank: int, world: int, out: str, package: str, slow: float, mesh: bool = True) -> dict[str, Any]:
    """AsyncFSDPStrategy(state_dict_type="sharded") set up by hand (Lightning refuses FSDP on the CPU, torch's
    FSDP1 runs there): save, pending removal, load into a changed model, meta.pt, FSDP1 state as DTensors — or,
    with ``mesh=False`` (a process group given), as ShardedTensors, which are saved synchronously."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.tensor import DTensor

    L, ours = lightning(package)
    caught = warnings.catch_warnings(record=True)
    warned = caught.__enter__()
    warnings.simplefilter("always")
    fabric = "lightning.fabric" if package == "lightning.pytorch" else "lightning_fabric"
    env = importlib.import_module(fabric + ".plugins.environments").LightningEnvironment()
    cpu = torch.device("cpu")
    strategy = ours.AsyncFSDPStrategy(state_dict_type="sharded", cluster_environment=env,
                                      parallel_devices=[cpu] * world,
                                      accelerator=importlib.import_module(package + ".accelerators").CPUAccelerator(),
                                      **({} if mesh else {"process_group": dist.group.WORLD}))
    Plain = module_class(package)
    module = Plain(0)
    strategy.connect(module)
    strategy.setup_environment()  # Lightning's, with the process group already there; the mesh default is ours
    strategy.model = FSDP(module, device_id=cpu, **strategy.kwargs)
    optimizer = torch.optim.Adam(strategy.model.parameters(), lr=0.01)
    strategy.optimizers = [optimizer]
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=out)
    trainer.state.fn = importlib.import_module(package + ".trainer.states").TrainerFn.FITTING
    module.trainer = trainer
    for i in range(2):
        torch.manual_seed(10 * rank + i)
        strategy.model(torch.randn(4, 16)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    def state() -> dict[str, Any]:
        return {"model": strategy.lightning_module_state_dict(), "optim": strategy.optimizer_state(optimizer)}

    def mutate() -> None:
        with torch.no_grad():
            for p in strategy.model.parameters():
                p.mul_(-3.0)

    def checkpoint() -> dict[str, Any]:
        s = state()
        return {"state_dict": s["model"], "optimizer_states": [s["optim"]], "epoch": 1, "global_step": 5}

    result: dict[str, Any] = {"dtensors": all(isinstance(v, DTensor) for v in state()["model"].values()),
                              "kinds": sorted({type(v).__name__ for v in state()["model"].values()})}
    slow_writes(slow)
    a, b = os.path.join(out, "a.ckpt"), os.path.join(out, "b.ckpt")
    t0 = time.monotonic()
    strategy.save_checkpoint(checkpoint(), a)
    result["save_returned_s"] = time.monotonic() - t0
    if rank == 0:
        t0 = time.monotonic()
        strategy.remove_checkpoint(a)
        result["remove_waited_s"] = time.monotonic() - t0
    strategy.wait()
    strategy.barrier()
    result["a_exists_after"] = os.path.exists(a)

    expected = digests(state())
    strategy.save_checkpoint(checkpoint(), b)
    mutate()
    result["changed_differs"] = digests(state()) != expected
    meta = strategy.load_checkpoint(b)
    result.update(expected=expected, loaded=digests(state()), meta={k: meta[k] for k in ("epoch", "global_step")},
                  files=sorted(os.listdir(b)))
    if rank == 0:
        result["meta_file"] = sorted(torch.load(os.path.join(b, "meta.pt")))
        whole = al.read_checkpoint(b)  # the consolidated view: keys as Lightning's consolidate_checkpoint makes
        result["read_keys"] = sorted(whole)
    strategy.teardown()
    caught.__exit__(None, None, None)
    result["warnings"] = [str(w.message) for w in warned if issubclass(w.category, UserWarning)
                          and "streams through the budget" in str(w.message)]
    return result


def stock_then_links(rank: int, world: int, out: str, package: str) -> dict[str, Any]:
    """A checkpoint of Lightning's own ModelParallelStrategy resumes under ours; then save_last="link" with top-1
    removals: the link goes to the newest pending directory at once, and removing a link leaves its target."""
    L, ours = lightning(package)
    Sharded = module_class(package)
    seen: dict[str, Any] = {}

    class Record(L.Callback):
        def on_train_start(self, trainer: Any, module: Any) -> None:
            seen["step"] = trainer.global_step
            seen["digests"] = state_digests(module, trainer.optimizers[0])

    stock_dir, our_dir = os.path.join(out, "stock"), os.path.join(out, "ours")
    stock = trainer(package, out, L.strategies.ModelParallelStrategy(), max_steps=2,
                    callbacks=[L.callbacks.ModelCheckpoint(dirpath=stock_dir, save_last=True)])
    model = Sharded(0)
    stock.fit(model)
    ended = state_digests(model, stock.optimizers[0])
    ckpt = L.callbacks.ModelCheckpoint(dirpath=our_dir, filename="{step}", monitor="step", mode="max", save_top_k=1,
                                       every_n_train_steps=2, save_last="link")
    again = trainer(package, out, ours.AsyncModelParallelStrategy(), max_steps=6, callbacks=[Record(), ckpt])
    again.fit(Sharded(1), ckpt_path=os.path.join(stock_dir, "last.ckpt"))
    last = os.path.join(our_dir, "last.ckpt")
    return {"stock_files": sorted(os.listdir(os.path.join(stock_dir, "last.ckpt"))), "ended": ended,
            "resumed": seen["digests"], "resumed_step": seen["step"], "listing": sorted(os.listdir(our_dir)),
            "link": os.readlink(last) if os.path.islink(last) else None,
            "target_files": sorted(os.listdir(os.path.realpath(last)))}


def cuda_fit(rank: int, world: int, out: str, package: str, kind: str) -> dict[str, Any]:
    """A real Trainer on one CUDA device (run with world 0: Lightning makes its own process group): fit with
    sharded checkpoints, then resume from ckpt_path="last" bit-exact."""
    L, ours = lightning(package)
    Sharded = module_class(package)  # configure_model does nothing under FSDP (no device mesh): FSDP1 wraps it
    seen: dict[str, Any] = {}

    def make() -> Any:
        if kind == "fsdp":
            return ours.AsyncFSDPStrategy(state_dict_type="sharded")
        return ours.AsyncModelParallelStrategy()

    class Record(L.Callback):
        def on_train_start(self, trainer: Any, module: Any) -> None:
            seen["step"] = trainer.global_step
            seen["digests"] = state_digests(trainer.strategy.model, trainer.optimizers[0])

    def run(steps: int, model: Any, **fit: Any) -> Any:
        t = L.Trainer(accelerator="cuda", devices=1, strategy=make(), max_steps=steps, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
                      callbacks=[Record(), L.callbacks.ModelCheckpoint(dirpath=out, every_n_train_steps=2,
                                                                       save_last=True)])
        t.fit(model, **fit)
        return t

    first = run(4, Sharded(0))
    ended = state_digests(first.strategy.model, first.optimizers[0])
    run(6, Sharded(1), ckpt_path="last")
    return {"ended": ended, "resumed": seen["digests"], "resumed_step": seen["step"],
            "files": sorted(os.listdir(os.path.join(out, "last.ckpt")))}


def over_budget(rank: int, world: int, out: str, package: str) -> dict[str, Any]:
    """Shards larger than host_memory_budget: the save streams synchronously, with a warning, and loads back."""
    L, ours = lightning(package)
    Sharded = module_class(package, width=2048)  # about 260 KiB of parameters and Adam state per rank
    strategy = ours.AsyncModelParallelStrategy(engine_options={"host_memory_budget": 64 << 10,
                                                               "chunk_bytes": 16 << 10})
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        t = trainer(package, out, strategy, max_steps=2,
                    callbacks=[L.callbacks.ModelCheckpoint(dirpath=out, save_last=True, every_n_train_steps=2)])
        model = Sharded(0)
        t.fit(model)
    ended = state_digests(model, t.optimizers[0])
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-3.0)
    t.strategy.load_checkpoint(os.path.join(out, "last.ckpt"))
    loaded = state_digests(model, t.optimizers[0])
    t.strategy.teardown()
    return {"ended": ended, "loaded": loaded,
            "warnings": [str(w.message) for w in warned if "streams through the budget" in str(w.message)]}
