"""Two-rank Fabric run for tests/test_lightning_robustness.py: ``fabric.save(p); fabric.barrier(); fabric.load(p)``.

``python fabric_ranks.py OUT PACKAGE``: Fabric's own launcher starts rank 1 (a copy of this script) and both ranks
join a gloo process group on loopback. Rank 0 saves through ``AsyncCheckpointIO`` on a base that takes 1.5 s to
write, so the save is still pending when rank 1 loads. Each rank writes what it loaded to ``OUT/rank<N>.json``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import warnings

import torch

import asyncckpt.lightning as al

warnings.filterwarnings("ignore")
out, package = sys.argv[1], sys.argv[2]
fabric_pkg = "lightning.fabric" if package == "lightning" else "lightning_fabric"
F = importlib.import_module(fabric_pkg)
TorchCheckpointIO = importlib.import_module(fabric_pkg + ".plugins.io").TorchCheckpointIO
plugins = al if package == "lightning" else al.pl


class SlowIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        time.sleep(1.5)
        super().save_checkpoint(checkpoint, path, storage_options)


fabric = F.Fabric(accelerator="cpu", devices=2, strategy="ddp", plugins=[plugins.AsyncCheckpointIO(SlowIO())])
fabric.launch()
rank = fabric.global_rank
torch.manual_seed(0)
model = torch.nn.Linear(4, 3)
path = os.path.join(out, "step-7.ckpt")
t0 = time.monotonic()
fabric.save(path, {"model": model, "step": 7})
save_returned = time.monotonic() - t0
fabric.barrier()
loaded = fabric.load(path)
missing = None
if rank == 1:  # a load of one rank alone: nothing to wait for, so it does not wait for the other rank
    try:
        fabric.strategy.checkpoint_io.load_checkpoint(os.path.join(out, "never-saved.ckpt"))
    except FileNotFoundError as exc:
        missing = type(exc).__name__
result = {"rank": rank, "step": loaded["step"], "save_returned_s": save_returned,
          "same_weights": all(torch.equal(loaded["model"][k], v) for k, v in model.state_dict().items()),
          "missing": missing}
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
fabric.barrier()
