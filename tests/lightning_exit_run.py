"""One resume-then-save run for the exit test (tests/test_lightning_robustness.py), in a process of its own.

``python lightning_exit_run.py ROOT HIDDEN [PACKAGE]``: fit with ``AsyncCheckpointIO`` (``ModelCheckpoint`` with
``save_last=True``) when ROOT holds no ``last.ckpt`` yet, else resume from ``"last"`` for one more epoch; then save
once more with ``trainer.save_checkpoint`` after ``fit`` (no teardown follows) and return from the script, so that
save is still being written when the interpreter starts to exit. Exits 0 when all went well; the test checks that
the interpreter's own exit does not turn that into an abort.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

import asyncckpt.lightning as al

warnings.filterwarnings("ignore")
root, hidden = sys.argv[1], int(sys.argv[2])
package = sys.argv[3] if len(sys.argv) > 3 else "lightning"
L = importlib.import_module("lightning.pytorch" if package == "lightning" else "pytorch_lightning")
plugins = al if package == "lightning" else al.pl


class Model(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Linear(hidden, hidden),
                                       torch.nn.Linear(hidden, 1))

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-4)


ckpts = os.path.join(root, "ckpts")
resume = os.path.exists(os.path.join(ckpts, "last.ckpt"))
epochs = 1
if resume:
    epochs = torch.load(os.path.join(ckpts, "last.ckpt"), weights_only=False, mmap=True)["epoch"] + 2
x = torch.randn(8, 4)
trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=root, plugins=[plugins.AsyncCheckpointIO()],
                    callbacks=[L.callbacks.ModelCheckpoint(dirpath=ckpts, save_last=True)])
trainer.fit(Model(), DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4),
            ckpt_path="last" if resume else None)
assert trainer.current_epoch == epochs
trainer.save_checkpoint(os.path.join(root, "after-fit.ckpt"))  # in flight when the interpreter exits
