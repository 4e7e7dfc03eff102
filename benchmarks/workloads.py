"""Workloads: the training states that every contender saves and loads.

Two kinds, both built with torch only:

* ``synthetic``: a Lightning-style checkpoint dict of a configurable byte size: transformer-shaped
  weight tensors, their Adam moments (``exp_avg``, ``exp_avg_sq``, ``step``), a crowd of small
  buffers of assorted dtypes and the usual Lightning metadata (epoch, global_step,
  hyper_parameters, callbacks, loops, lr_schedulers).
* ``model``: a real tiny transformer language model trained for a few steps with
  ``torch.optim.Adam`` so that the optimizer state is genuine.

A workload object gives the state to save (``state()``), a way to change it between saves the
way training would (``step()``), a freshly allocated target of the same layout for in-place loads
(``make_target()``), and the ways to load into that target the way a user of each API would.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch

MiB = 1 << 20
GiB = 1 << 30


# ----------------------------------------------------------------------------------- helpers


def iter_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(path, tensor)`` for every tensor in a nested dict/list/tuple, in a stable order."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from iter_tensors(v, f"{prefix}/{i}")


def tensor_bytes(obj: Any) -> int:
    return sum(t.numel() * t.element_size() for _, t in iter_tensors(obj))


def count_tensors(obj: Any) -> int:
    return sum(1 for _ in iter_tensors(obj))


@torch.no_grad()
def copy_into(target: Any, loaded: Any) -> None:
    """What ``load_state_dict`` does for a plain state dict: copy every tensor in place."""
    if isinstance(target, torch.Tensor):
        target.copy_(loaded)
    elif isinstance(target, dict):
        for k, v in target.items():
            if isinstance(v, (torch.Tensor, dict, list, tuple)):
                copy_into(v, loaded[k])
            else:
                target[k] = loaded[k]
    elif isinstance(target, (list, tuple)):
        for a, b in zip(target, loaded):
            copy_into(a, b)


def same_tensors(a: Any, b: Any) -> bool:
    """True when both trees hold the same tensors (paths, dtypes, shapes and values)."""
    ta, tb = list(iter_tensors(a)), list(iter_tensors(b))
    if len(ta) != len(tb):
        return False
    for (pa, xa), (pb, xb) in zip(ta, tb):
        if pa != pb or xa.dtype != xb.dtype or xa.shape != xb.shape or not torch.equal(xa, xb):
            return False
    return True


@torch.no_grad()
def _bump(t: torch.Tensor) -> None:
    """Change one element so every tensor differs from the previous save (cheap)."""
    if t.numel() == 0:
        return
    flat = t.view(-1)
    if t.dtype == torch.bool:
        flat[:1].logical_not_()
    else:
        flat[:1].add_(1)


def lightning_metadata(epoch: int, global_step: int, hparams: dict[str, Any]) -> dict[str, Any]:
    """The non-tensor (and tiny-tensor) parts of a Lightning checkpoint, shaped like the real ones."""
    progress = {"ready": epoch, "started": epoch, "processed": epoch, "completed": epoch}
    batch_progress = {"ready": global_step, "started": global_step, "processed": global_step,
                      "completed": global_step}
    return {
        "epoch": epoch,
        "global_step": global_step,
        "pytorch-lightning_version": "2.6.6",
        "hyper_parameters": dict(hparams),
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, "
            "'every_n_epochs': 1, 'train_time_interval': None}": {
                "monitor": "val_loss",
                "best_model_score": torch.tensor(0.4213),
                "best_model_path": f"/ckpts/epoch={epoch - 1}-step={global_step - 100}.ckpt",
                "current_score": torch.tensor(0.4301),
                "dirpath": "/ckpts",
                "best_k_models": {f"/ckpts/epoch={e}.ckpt": torch.tensor(0.5 - 0.01 * e)
                                  for e in range(3)},
                "kth_best_model_path": "/ckpts/epoch=0.ckpt",
                "kth_value": torch.tensor(0.5),
                "last_model_path": "/ckpts/last.ckpt",
            },
            "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}": {
                "wait_count": 1, "stopped_epoch": 0, "best_score": torch.tensor(0.4213),
                "patience": 5,
            },
            "LearningRateMonitor": {},
        },
        "loops": {
            "fit_loop": {
                "state_dict": {},
                "epoch_loop.state_dict": {"_batches_that_stepped": global_step},
                "epoch_loop.batch_progress": {"total": batch_progress, "current": batch_progress,
                                              "is_last_batch": False},
                "epoch_loop.scheduler_progress": {"total": {"ready": global_step,
                                                            "completed": global_step},
                                                  "current": {"ready": 0, "completed": 0}},
                "epoch_loop.automatic_optimization.optim_progress": {
                    "optimizer": {"step": {"total": batch_progress, "current": batch_progress},
                                  "zero_grad": {"total": batch_progress,
                                                "current": batch_progress}}},
                "epoch_progress": {"total": progress, "current": progress},
            },
            "validate_loop": {"state_dict": {}, "batch_progress": {"total": progress,
                                                                   "current": progress}},
            "test_loop": {"state_dict": {}},
            "predict_loop": {"state_dict": {}},
        },
        "lr_schedulers": [{"step_size": 30, "gamma": 0.1, "base_lrs": [hparams.get("lr", 1e-3)],
                           "last_epoch": epoch, "verbose": False, "_step_count": epoch + 1,
                           "_get_lr_called_within_step": False,
                           "_last_lr": [hparams.get("lr", 1e-3)]}],
    }


# --------------------------------------------------------------------------------- synthetic


class SyntheticWorkload:
    """A ~``size_bytes`` Lightning checkpoint of a transformer trained with Adam."""

    name = "synthetic"

    def __init__(self, size_bytes: int, seed: int = 0, n_small: int = 256) -> None:
        self.size_bytes = int(size_bytes)
        self.seed = seed
        self.n_small = n_small
        self._shapes = self._plan(self.size_bytes)
        self._state = self._build(fill=True)

    @staticmethod
    def _plan(size_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
        # fp32 weights + fp32 exp_avg + fp32 exp_avg_sq -> 12 bytes per parameter.
        params = max(size_bytes // 12, 4096)
        # ~12 h^2 parameters per transformer block; aim for 8 blocks, h a multiple of 64.
        n_layers = 8
        h = max(64, int(math.sqrt(params / (12 * n_layers)) // 64 * 64))
        shapes: list[tuple[str, tuple[int, ...]]] = []
        used = 0
        for i in range(n_layers):
            for name, shp in (
                ("attn.qkv.weight", (3 * h, h)), ("attn.qkv.bias", (3 * h,)),
                ("attn.proj.weight", (h, h)), ("attn.proj.bias", (h,)),
                ("ln1.weight", (h,)), ("ln1.bias", (h,)),
                ("mlp.fc1.weight", (4 * h, h)), ("mlp.fc1.bias", (4 * h,)),
                ("mlp.fc2.weight", (h, 4 * h)), ("mlp.fc2.bias", (h,)),
                ("ln2.weight", (h,)), ("ln2.bias", (h,)),
            ):
                n = math.prod(shp)
                if used + n > params:
                    break
                shapes.append((f"blocks.{i}.{name}", shp))
                used += n
        # Spend what is left on the token embedding so the total lands on the requested size.
        rest = params - used
        if rest >= h:
            shapes.insert(0, ("tok_emb.weight", (rest // h, h)))
        return shapes

    def _build(self, fill: bool) -> dict[str, Any]:
        g = torch.Generator().manual_seed(self.seed)

        def mk(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            if not fill:
                return torch.zeros(shape, dtype=dtype)
            if dtype.is_floating_point:
                return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)
            if dtype == torch.bool:
                return torch.randint(0, 2, shape, generator=g).bool()
            return torch.randint(0, 1000, shape, generator=g, dtype=dtype)

        weights = {name: mk(shp) for name, shp in self._shapes}
        # Small tensors: norm statistics, counters, masks, scales, as real models carry them.
        small_dtypes = (torch.float32, torch.int64, torch.bfloat16, torch.float16, torch.bool,
                        torch.int32)
        for i in range(self.n_small):
            dt = small_dtypes[i % len(small_dtypes)]
            weights[f"buffers.{i}"] = mk((1 + (i * 37) % 257,), dt)
        opt_state = {}
        for idx, (_, shp) in enumerate(self._shapes):
            opt_state[idx] = {
                "step": torch.tensor(float(1000 if fill else 0)),
                "exp_avg": mk(shp),
                "exp_avg_sq": mk(shp).abs_() if fill else mk(shp),
            }
        hparams = {"lr": 3e-4, "batch_size": 32, "model_name": "synthetic-transformer",
                   "n_layers": 8, "dropout": 0.1, "betas": [0.9, 0.999], "size_bytes": self.size_bytes}
        state = lightning_metadata(epoch=3 if fill else 0, global_step=1000 if fill else 0,
                                   hparams=hparams)
        state["state_dict"] = weights
        state["optimizer_states"] = [{
            "state": opt_state,
            "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                              "amsgrad": False, "maximize": False, "foreach": None,
                              "capturable": False, "differentiable": False, "fused": None,
                              "decoupled_weight_decay": False,
                              "params": list(range(len(self._shapes)))}],
        }]
        return state

    # -- protocol
    def state(self) -> dict[str, Any]:
        return self._state

    def step(self) -> None:
        for _, t in iter_tensors(self._state):
            _bump(t)
        self._state["global_step"] += 1

    def make_target(self) -> dict[str, Any]:
        return self._build(fill=False)

    def apply_loaded(self, target: dict[str, Any], loaded: dict[str, Any]) -> None:
        copy_into(target, loaded)

    def target_state(self, target: dict[str, Any]) -> dict[str, Any]:
        """The tree a library that loads in place (DCP, ours, torchsnapshot) is given."""
        return target

    def describe(self) -> dict[str, Any]:
        return {"kind": self.name, "tensor_bytes": tensor_bytes(self._state),
                "tensors": count_tensors(self._state), "weight_tensors": len(self._shapes),
                "small_tensors": self.n_small}


# ------------------------------------------------------------------------------------- model


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Parameter(torch.zeros(seq, dim))
        layer = torch.nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0,
                                                 batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos[: x.shape[1]]
        return self.head(self.norm(self.blocks(h)))


class ModelWorkload:
    """A real tiny transformer LM, trained a few steps with Adam on random tokens."""

    name = "model"

    def __init__(self, dim: int = 384, layers: int = 4, vocab: int = 8192, seq: int = 64,
                 batch: int = 8, warm_steps: int = 3, seed: int = 0) -> None:
        self.cfg = dict(dim=dim, layers=layers, vocab=vocab, seq=seq, batch=batch)
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed + 1)
        self.model, self.opt = self._make(seed)
        self.global_step = 0
        for _ in range(warm_steps):
            self._train_step(self.model, self.opt)
            self.global_step += 1

    def _make(self, seed: int) -> tuple[TinyLM, torch.optim.Adam]:
        torch.manual_seed(seed)
        c = self.cfg
        model = TinyLM(c["vocab"], c["dim"], c["layers"], max(1, c["dim"] // 64), c["seq"])
        return model, torch.optim.Adam(model.parameters(), lr=3e-4)

    def _train_step(self, model: TinyLM, opt: torch.optim.Adam) -> None:
        c = self.cfg
        x = torch.randint(0, c["vocab"], (c["batch"], c["seq"]), generator=self._gen)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def _checkpoint(self, model: TinyLM, opt: torch.optim.Adam, step: int) -> dict[str, Any]:
        hparams = {"lr": 3e-4, **self.cfg, "model_name": "tiny-transformer-lm"}
        state = lightning_metadata(epoch=1 + step // 100, global_step=step, hparams=hparams)
        state["state_dict"] = model.state_dict()
        state["optimizer_states"] = [opt.state_dict()]
        return state

    # -- protocol
    def state(self) -> dict[str, Any]:
        # Lightning rebuilds the checkpoint dict at every save; the tensors are the live ones.
        return self._checkpoint(self.model, self.opt, self.global_step)

    def step(self) -> None:
        self._train_step(self.model, self.opt)
        self.global_step += 1

    def make_target(self) -> tuple[TinyLM, torch.optim.Adam]:
        model, opt = self._make(self.seed + 100)
        self._train_step(model, opt)  # so the optimizer has state to load into
        return model, opt

    def apply_loaded(self, target: tuple[TinyLM, torch.optim.Adam], loaded: dict[str, Any]) -> None:
        model, opt = target
        model.load_state_dict(loaded["state_dict"])
        opt.load_state_dict(loaded["optimizer_states"][0])

    def target_state(self, target: tuple[TinyLM, torch.optim.Adam]) -> dict[str, Any]:
        # state_dict() tensors alias the live parameters / optimizer moments, so an in-place
        # load into this tree updates the model and the optimizer.
        model, opt = target
        return self._checkpoint(model, opt, 0)

    def describe(self) -> dict[str, Any]:
        st = self.state()
        return {"kind": self.name, "tensor_bytes": tensor_bytes(st), "tensors": count_tensors(st),
                "parameters": sum(p.numel() for p in self.model.parameters()), **self.cfg}


def make_workload(name: str, size_bytes: int, quick: bool = False) -> Any:
    if name == "synthetic":
        return SyntheticWorkload(size_bytes)
    if name == "model":
        if quick:
            return ModelWorkload(dim=128, layers=2, vocab=2048, seq=32, batch=4)
        return ModelWorkload()
    raise ValueError(f"unknown workload {name!r}")
