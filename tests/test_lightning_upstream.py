"""Lightning's own acceptance checks for an asynchronous ``CheckpointIO``, held against our plugin.

The scenarios are those of Lightning 2.6's ``tests_pytorch/plugins/test_async_checkpoint.py`` and
``tests_pytorch/plugins/test_checkpoint_io_plugin.py`` (the tests that involve ``AsyncCheckpointIO``), written
here for ``asyncckpt.lightning.AsyncCheckpointIO`` and for both Lightning packages. Where we deliberately differ
(an asynchronous plugin as the base of another is refused), the test says so and checks the refusal instead.
``scripts/lightning-lane.sh`` runs Lightning's own files, unchanged, with our plugin injected into every Trainer.
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("pytorch_lightning")

import asyncckpt.lightning as al  # noqa: E402
from tests.test_lightning import PACKAGES  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.parametrize("package", list(PACKAGES)),
]


def lightning(package: str):
    trainer_pkg, fabric_pkg = PACKAGES[package]
    L = importlib.import_module(trainer_pkg)
    L.demos = importlib.import_module(trainer_pkg + ".demos.boring_classes")
    L.fabric_io = importlib.import_module(fabric_pkg + ".plugins.io")
    L.plugins_io = importlib.import_module(fabric_pkg + ".plugins")
    L.strategies = importlib.import_module(trainer_pkg + ".strategies")
    L.ours = al if package == "lightning" else al.pl
    return L


# ---------------------------------------------------------------- test_async_checkpoint.py


def test_the_copy_is_taken_before_training_changes_the_tensors(package):
    """A base that keeps the very dict it was handed, after a delay, must see the values at save time."""
    L = lightning(package)

    class Capture(L.fabric_io.CheckpointIO):
        def __init__(self):
            self.saved = None

        def save_checkpoint(self, checkpoint, path, storage_options=None):
            time.sleep(0.05)  # widen the window in which training moves on
            self.saved = checkpoint

        def load_checkpoint(self, path, map_location=None):
            raise NotImplementedError

        def remove_checkpoint(self, path):
            pass

    base = Capture()
    plugin = L.ours.AsyncCheckpointIO(checkpoint_io=base)
    weight = torch.tensor([0.0])
    plugin.save_checkpoint({"w": weight}, path="unused")
    weight.add_(1.0)  # the optimizer steps right after the save returned
    plugin.teardown()
    assert base.saved is not None
    assert torch.equal(base.saved["w"], torch.tensor([0.0]))
    assert not os.path.exists("unused")  # a base of another kind gets no placeholder at its path


# ---------------------------------------------------------------- test_checkpoint_io_plugin.py


def custom_io(L):
    class CustomCheckpointIO(L.plugins_io.CheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            torch.save(checkpoint, path)

        def load_checkpoint(self, path, storage_options=None, weights_only=True):
            return torch.load(path, weights_only=True)

        def remove_checkpoint(self, path):
            os.remove(path)

    return CustomCheckpointIO


def test_a_custom_base_is_called_through_the_plugin(package, tmp_path):
    """Lightning's call counts for a custom CheckpointIO (4 saves, 1 removal, the load of ``last.ckpt``) hold when
    that CheckpointIO is the base of our plugin, given to the strategy or as a Trainer plugin."""
    L = lightning(package)
    CustomCheckpointIO = custom_io(L)
    for round_, how in enumerate(("strategy", "plugins")):
        base = mock.MagicMock(wraps=CustomCheckpointIO(), spec=CustomCheckpointIO)
        plugin = L.ours.AsyncCheckpointIO(base)
        ck = L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
        where = ({"strategy": L.strategies.SingleDeviceStrategy("cpu", checkpoint_io=plugin)} if how == "strategy"
                 else {"strategy": L.strategies.SingleDeviceStrategy("cpu"), "plugins": [plugin]})
        trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", callbacks=ck, max_epochs=2,
                            limit_train_batches=1, limit_val_batches=0, limit_test_batches=1, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, **where)
        trainer.fit(L.demos.BoringModel())
        suffix = "" if round_ == 0 else "-v1"
        expected = {"epoch=1-step=2.ckpt", "last.ckpt"} | ({"epoch=1-step=2-v1.ckpt", "last-v1.ckpt"} if round_
                                                          else set())
        assert {p.name for p in Path(tmp_path).glob("*.ckpt")} == expected
        assert ck.best_model_path == str(tmp_path / f"epoch=1-step=2{suffix}.ckpt")
        assert ck.last_model_path == str(tmp_path / f"last{suffix}.ckpt")
        assert base.save_checkpoint.call_count == 4
        assert base.remove_checkpoint.call_count == 1
        trainer.test(L.demos.BoringModel(), ckpt_path=ck.last_model_path)
        base.load_checkpoint.assert_called_once()
        assert base.load_checkpoint.call_args.args[0] == str(tmp_path / f"last{suffix}.ckpt")


def test_calls_are_counted_across_validate_then_fit(package, tmp_path):
    """``validate`` then ``fit`` (teardown in between, so the engine starts again): 3 saves and the one removal of
    ``save_top_k=2`` reach both the plugin and the base the strategy installed."""
    L = lightning(package)
    plugin = L.ours.AsyncCheckpointIO()
    plugin.save_checkpoint = mock.Mock(wraps=plugin.save_checkpoint)
    plugin.remove_checkpoint = mock.Mock(wraps=plugin.remove_checkpoint)

    class Model(L.demos.BoringModel):
        def on_fit_start(self):
            base = self.trainer.strategy.checkpoint_io.checkpoint_io
            base.save_checkpoint = mock.Mock(wraps=base.save_checkpoint)
            base.remove_checkpoint = mock.Mock(wraps=base.remove_checkpoint)

    ck = L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=2, monitor="step", mode="max")
    trainer = L.Trainer(default_root_dir=tmp_path, plugins=[plugin], callbacks=ck, max_epochs=3,
                        limit_train_batches=1, limit_val_batches=0, enable_progress_bar=False,
                        enable_model_summary=False, logger=False)
    model = Model()
    trainer.validate(model)
    trainer.fit(model)
    assert plugin.save_checkpoint.call_count == 3 and plugin.remove_checkpoint.call_count == 1
    base = trainer.strategy.checkpoint_io.checkpoint_io
    assert base.save_checkpoint.call_count == 3 and base.remove_checkpoint.call_count == 1
    assert sorted(p.name for p in Path(tmp_path).glob("*.ckpt")) == ["epoch=1-step=2.ckpt", "epoch=2-step=3.ckpt"]


def test_base_configuration_flags(package):
    """Lightning's ``_base_checkpoint_io_configured`` rules: a given base counts as configured; the strategy's
    default is installed once and then counts too. Wrapping an asynchronous plugin in another is where we differ
    on purpose (two copies and two queues for one save): it is refused with a message that says what to do."""
    L = lightning(package)
    base = L.fabric_io.TorchCheckpointIO()
    plugin = L.ours.AsyncCheckpointIO(base)
    assert plugin.checkpoint_io is base and plugin._base_checkpoint_io_configured is True

    plugin = L.ours.AsyncCheckpointIO()
    assert plugin._base_checkpoint_io_configured is False
    trainer = L.Trainer(accelerator="cpu", plugins=[plugin], logger=False)
    assert trainer.strategy.checkpoint_io is plugin
    assert isinstance(plugin.checkpoint_io, L.fabric_io.TorchCheckpointIO)
    assert plugin._base_checkpoint_io_configured is True

    for inner in (L.ours.AsyncCheckpointIO(), L.ours.NativeCheckpointIO()):
        with pytest.raises(ValueError, match="already asynchronous.*pass it to the Trainer directly"):
            L.ours.AsyncCheckpointIO(inner)
