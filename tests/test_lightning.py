"""asyncckpt.lightning with real Trainers of both Lightning packages, on CPU with a tiny model.

The end-to-end test trains with ``ModelCheckpoint(save_top_k=2, monitor="val_loss", save_last=True)``, checks the
files left behind, resumes with ``ckpt_path="last"`` and compares every restored state bit for bit with the same
run done synchronously (plain Lightning, no plugin); for both plugin kinds (TorchCheckpointIO base with slow
storage, native format) and both packages (``lightning`` and ``pytorch_lightning``).
"""

from __future__ import annotations

import copy
import functools
import importlib
import os
import pickle
import subprocess
import sys
import threading
import time
import types
import zipfile

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import asyncckpt

pytest.importorskip("lightning")
pytest.importorskip("pytorch_lightning")

from tests.helpers import assert_same  # noqa: E402

import asyncckpt.lightning as al  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

PACKAGES = {
    "lightning": ("lightning.pytorch", "lightning.fabric"),
    "pytorch_lightning": ("pytorch_lightning", "lightning_fabric"),
}
KINDS = ["torch", "native", "torch-deferred", "native-deferred"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def pkg(package: str) -> types.SimpleNamespace:
    """The classes of one Lightning distribution, and a tiny LightningModule built on it."""
    trainer_pkg, fabric_pkg = PACKAGES[package]
    mod = importlib.import_module(trainer_pkg)
    fabric_io = importlib.import_module(fabric_pkg + ".plugins.io")

    class TinyModel(mod.LightningModule):
        def __init__(self, hidden: int = 16, lr: float = 0.05) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)}

    class Capture(mod.Callback):
        """Records what the Trainer restored, once training (re)starts."""

        def __init__(self) -> None:
            self.restored = None

        def on_train_start(self, trainer, pl_module):
            self.restored = copy.deepcopy({
                "epoch": trainer.current_epoch,
                "global_step": trainer.global_step,
                "model": pl_module.state_dict(),
                "optimizer": trainer.optimizers[0].state_dict(),
                "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
            })

    class SlowTorchIO(fabric_io.TorchCheckpointIO):
        """TorchCheckpointIO on slow storage, so saves are still pending when ModelCheckpoint removes files."""

        def save_checkpoint(self, checkpoint, path, storage_options=None):
            time.sleep(0.05)
            super().save_checkpoint(checkpoint, path, storage_options)

    return types.SimpleNamespace(
        mod=mod, Trainer=mod.Trainer, ModelCheckpoint=mod.callbacks.ModelCheckpoint, TinyModel=TinyModel,
        Capture=Capture, SlowTorchIO=SlowTorchIO, TorchCheckpointIO=fabric_io.TorchCheckpointIO,
        WrappingCheckpointIO=importlib.import_module(trainer_pkg + ".plugins.io.wrapper")._WrappingCheckpointIO,
        SingleDeviceStrategy=mod.strategies.SingleDeviceStrategy,
    )


def loaders():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(96, 4, generator=gen)
    y = x.sum(1, keepdim=True) + 0.1 * torch.randn(96, 1, generator=gen)
    train = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16)
    val = DataLoader(TensorDataset(x[64:], y[64:]), batch_size=16)
    return train, val


def make_trainer(p, root, max_epochs, plugin=None, callbacks=()):
    return p.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(root), plugins=[plugin] if plugin is not None else None,
        callbacks=list(callbacks), num_sanity_val_steps=0,
    )


def make_plugin(kind: str, p):
    options = {"snapshot": "deferred"} if kind.endswith("-deferred") else {}  # the next optimizer step is the fence
    if kind.startswith("torch"):
        return al.AsyncCheckpointIO(p.SlowTorchIO(), **options)
    return al.NativeCheckpointIO(**options)


def train_and_resume(package: str, kind: str | None, root) -> dict:
    """Fit 4 epochs with top-2 + last checkpoints, then resume from "last" for one more epoch."""
    p = pkg(package)
    ckpt_dir = root / "ckpts"
    p.mod.seed_everything(0)
    model = p.TinyModel()
    topk = p.ModelCheckpoint(dirpath=str(ckpt_dir), save_top_k=2, monitor="val_loss", save_last=True)
    trainer = make_trainer(p, root, 4, make_plugin(kind, p) if kind else None, [topk])
    trainer.fit(model, *loaders())
    files = sorted(os.listdir(ckpt_dir))
    best_k = sorted(os.path.basename(k) for k in topk.best_k_models)
    best_path = topk.best_model_path
    final = copy.deepcopy(model.state_dict())

    p.mod.seed_everything(0)
    resumed = p.TinyModel()
    capture = p.Capture()
    ckpt_cb = p.ModelCheckpoint(dirpath=str(ckpt_dir), save_top_k=2, monitor="val_loss", save_last=True)
    trainer2 = make_trainer(p, root, 5, make_plugin(kind, p) if kind else None, [ckpt_cb, capture])
    trainer2.fit(resumed, *loaders(), ckpt_path="last")
    # validate from an explicit path: a top-k checkpoint, loaded through the plugin
    checker = make_trainer(p, root, 1, make_plugin(kind, p) if kind else None)
    metrics = checker.validate(p.TinyModel(), loaders()[1], ckpt_path=best_path, verbose=False)
    return {"files": files, "best_k": best_k, "best_path": best_path, "final": final,
            "restored": capture.restored, "after_resume": copy.deepcopy(resumed.state_dict()), "val": metrics}


_baselines: dict[str, dict] = {}


@pytest.fixture
def baseline(tmp_path_factory):
    def get(package: str) -> dict:
        if package not in _baselines:
            _baselines[package] = train_and_resume(package, None, tmp_path_factory.mktemp(f"sync-{package}"))
        return _baselines[package]
    return get


# ---------------------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("package", list(PACKAGES))
def test_fit_topk_last_and_resume_bit_exact(package, kind, tmp_path, baseline):
    sync = baseline(package)
    run = train_and_resume(package, kind, tmp_path)

    # exactly the top-2 and last.ckpt are left: no leaked removals, nothing missing
    assert run["files"] == sorted(run["best_k"] + ["last.ckpt"])
    assert run["files"] == sync["files"]
    assert_same(run["final"], sync["final"])

    # the resumed Trainer restored epoch, step, model, optimizer and scheduler exactly as the synchronous run did
    assert run["restored"]["epoch"] == 4 and run["restored"]["global_step"] == 16
    assert_same(run["restored"], sync["restored"])
    assert_same(run["restored"]["model"], run["final"])
    assert_same(run["after_resume"], sync["after_resume"])
    assert run["val"] == sync["val"]

    p = pkg(package)
    best = run["best_path"]
    if kind.startswith("torch"):
        # plain Lightning tooling opens these files
        assert os.path.isfile(best)
        model = p.TinyModel.load_from_checkpoint(best)
    else:
        assert al.is_native_checkpoint(best)
        model = al.load_from_checkpoint(p.TinyModel, best)
        converted = str(tmp_path / "converted.ckpt")
        from asyncckpt.tools.convert import to_torch_file

        to_torch_file(best, converted)  # or, from a shell: asyncckpt convert BEST converted.ckpt
        assert_same(p.TinyModel.load_from_checkpoint(converted).state_dict(), model.state_dict())
    sync_model = p.TinyModel.load_from_checkpoint(sync["best_path"])
    assert_same(model.state_dict(), sync_model.state_dict())
    assert model.hparams == sync_model.hparams


# ---------------------------------------------------------------------------------------------------------------
# recognition by both packages


def test_import_does_not_import_lightning():
    code = ("import sys, asyncckpt, asyncckpt.lightning, asyncckpt.lightning.pl; "
            "bad = [m for m in ('lightning', 'pytorch_lightning', 'lightning_fabric') if m in sys.modules]; "
            "assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)


@pytest.mark.parametrize("name", ["AsyncCheckpointIO", "NativeCheckpointIO"])
@pytest.mark.parametrize("flavour", ["default", "pl"])
@pytest.mark.parametrize("package", list(PACKAGES))
def test_trainer_accepts_plugin_and_installs_default_base(package, flavour, name, tmp_path):
    p = pkg(package)
    cls = getattr(al if flavour == "default" else al.pl, name)
    assert isinstance(cls(), p.WrappingCheckpointIO)

    plugin = cls()
    trainer = make_trainer(p, tmp_path, 1, plugin)
    assert trainer.strategy.checkpoint_io is plugin
    assert type(plugin.checkpoint_io) is p.TorchCheckpointIO  # the strategy's default base, of that package

    plugin = cls()
    trainer = p.Trainer(strategy=p.SingleDeviceStrategy("cpu", checkpoint_io=plugin), logger=False)
    assert trainer.strategy.checkpoint_io is plugin
    assert type(plugin.checkpoint_io) is p.TorchCheckpointIO

    base = p.TorchCheckpointIO()
    plugin = cls(base)
    make_trainer(p, tmp_path, 1, plugin).strategy.checkpoint_io
    assert plugin.checkpoint_io is base  # a given base is kept


def test_class_identity_and_real_subclassing():
    assert al.AsyncCheckpointIO is al.AsyncCheckpointIO
    from asyncckpt.lightning.pl import AsyncCheckpointIO as PLAsync

    assert PLAsync is al.pl.AsyncCheckpointIO
    assert issubclass(al.pl.AsyncCheckpointIO, pkg("pytorch_lightning").WrappingCheckpointIO)
    assert al.pl.AsyncCheckpointIO.__mro__[2] is pkg("pytorch_lightning").WrappingCheckpointIO
    assert al.AsyncCheckpointIO.__mro__[2] is pkg("lightning").WrappingCheckpointIO


def test_base_argument_forms():
    p = pkg("lightning")
    base = p.TorchCheckpointIO()
    assert al.AsyncCheckpointIO(checkpoint_io=base).checkpoint_io is base  # Lightning's keyword
    assert al.AsyncCheckpointIO(base).checkpoint_io is base
    with pytest.raises(TypeError):
        al.AsyncCheckpointIO(base, checkpoint_io=base)
    with pytest.raises(ValueError, match="already asynchronous"):
        al.AsyncCheckpointIO(al.NativeCheckpointIO())
    with pytest.raises(TypeError):
        al.AsyncCheckpointIO(engine=object(), host_memory_budget=1 << 30)


def test_pickle_after_use(tmp_path):
    """ddp_spawn pickles the strategy (and its plugin) into the workers."""
    plugin = al.AsyncCheckpointIO(pkg("lightning").TorchCheckpointIO())
    plugin.save_checkpoint({"w": torch.ones(3)}, tmp_path / "a.ckpt")
    clone = pickle.loads(pickle.dumps(plugin))
    clone.save_checkpoint({"w": torch.zeros(3)}, tmp_path / "b.ckpt")
    clone.teardown()
    plugin.teardown()
    assert torch.equal(torch.load(tmp_path / "b.ckpt")["w"], torch.zeros(3))
    assert torch.equal(torch.load(tmp_path / "a.ckpt")["w"], torch.ones(3))
    native = pickle.loads(pickle.dumps(al.pl.NativeCheckpointIO()))
    assert type(native) is al.pl.NativeCheckpointIO


# ---------------------------------------------------------------------------------------------------------------
# snapshot stage and errors


class RecordingEngine:
    """Stands in for SyncEngine to observe how the plugin calls it."""

    def __init__(self) -> None:
        self.calls = []

    class Done:
        observed = False

        def done(self):
            return True

        def result(self):
            return None

        def add_done_callback(self, fn):
            fn(self)

    def save_with(self, state, fn, path):
        self.calls.append(("save_with", threading.get_ident(), state, path))
        return self.Done()

    def save(self, state, path, storage_options=None):
        self.calls.append(("save", threading.get_ident(), state, path))
        return self.Done()

    def wait(self):
        pass

    def wait_for(self, path):
        pass

    def check(self):
        pass


@pytest.mark.parametrize("name", ["AsyncCheckpointIO", "NativeCheckpointIO"])
def test_snapshot_is_taken_by_the_engine_on_the_caller_thread(name, tmp_path):
    """Nothing is moved off the caller's thread, and no tensor is touched, before the engine's snapshot (for XLA the
    device-to-host copy must happen there)."""
    engine = RecordingEngine()
    plugin = getattr(al, name)(pkg("lightning").TorchCheckpointIO(), engine=engine)
    weight = torch.randn(4, 4)
    checkpoint = {"state_dict": {"w": weight}, "epoch": 1}
    plugin.save_checkpoint(checkpoint, tmp_path / "x.ckpt")
    assert len(engine.calls) == 1
    _, thread, state, path = engine.calls[0]
    assert thread == threading.get_ident()
    assert state["state_dict"]["w"] is weight  # handed over as is: the engine copies it
    plugin.teardown()


def _failing_io(package: str, fail_times: int):
    p = pkg(package)

    class FailingIO(p.TorchCheckpointIO):
        def __init__(self):
            self.failures = fail_times

        def save_checkpoint(self, checkpoint, path, storage_options=None):
            if self.failures > 0:
                self.failures -= 1
                raise OSError(28, "No space left on device")
            super().save_checkpoint(checkpoint, path, storage_options)

    return FailingIO()


def test_background_error_surfaces_on_next_call_once(tmp_path):
    plugin = al.AsyncCheckpointIO(_failing_io("lightning", 1))
    plugin.save_checkpoint({"w": torch.ones(2)}, tmp_path / "a.ckpt")  # fails in the background
    with pytest.raises(Exception, match="No space left"):
        plugin.load_checkpoint(tmp_path / "a.ckpt")  # waits for that save, then reports its failure
    plugin.save_checkpoint({"w": torch.ones(2)}, tmp_path / "b.ckpt")  # reported once: the next call works
    plugin.teardown()  # and teardown does not raise it again
    assert (tmp_path / "b.ckpt").exists() and not (tmp_path / "a.ckpt").exists()


def test_background_error_surfaces_on_next_save(tmp_path):
    plugin = al.AsyncCheckpointIO(_failing_io("lightning", 1))
    plugin.save_checkpoint({"w": torch.ones(2)}, tmp_path / "a.ckpt")
    deadline = time.monotonic() + 30
    with pytest.raises(Exception, match="No space left"):
        while time.monotonic() < deadline:  # the first save after the failure happened raises it
            plugin.save_checkpoint({"w": torch.ones(2)}, tmp_path / "b.ckpt")
            time.sleep(0.01)
    plugin.teardown()


def test_background_error_raised_by_teardown(tmp_path):
    plugin = al.AsyncCheckpointIO(_failing_io("lightning", 1))
    plugin.save_checkpoint({"w": torch.ones(2)}, tmp_path / "a.ckpt")
    with pytest.raises(Exception, match="No space left"):
        plugin.teardown()
    plugin.teardown()  # nothing left to report
    # usable again after teardown (Lightning reuses plugins across fit/validate/test)
    plugin.save_checkpoint({"w": torch.ones(2)}, tmp_path / "c.ckpt")
    plugin.teardown()
    assert (tmp_path / "c.ckpt").exists()


@pytest.mark.parametrize("package", list(PACKAGES))
def test_fit_fails_when_a_save_fails(package, tmp_path):
    p = pkg(package)
    plugin = al.AsyncCheckpointIO(_failing_io(package, 100))
    trainer = make_trainer(p, tmp_path, 3, plugin, [p.ModelCheckpoint(dirpath=str(tmp_path / "c"), save_last=True)])
    with pytest.raises(Exception, match="No space left"):
        trainer.fit(p.TinyModel(), *loaders())


# ---------------------------------------------------------------------------------------------------------------
# native loading: Lightning 2.6's call, the newer in-place call, single-file checkpoints


def test_native_load_call_forms(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    plugin = al.NativeCheckpointIO(pkg("lightning").TorchCheckpointIO())
    path = tmp_path / "epoch=0.ckpt"
    checkpoint = {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()], "epoch": 3}
    plugin.save_checkpoint(checkpoint, path)
    # Lightning 2.6: load_checkpoint(path, weights_only=...), right after the save
    loaded = plugin.load_checkpoint(path, weights_only=None)
    assert_same(loaded["state_dict"], model.state_dict())
    assert loaded["epoch"] == 3
    # positional map_location, as the 2.6 abstract signature allows
    assert plugin.load_checkpoint(path, "cpu")["epoch"] == 3
    # the newer form: in place into the given objects, the rest is returned
    model2 = torch.nn.Linear(3, 2)
    rest = plugin.load_checkpoint(path, state={"state_dict": model2}, map_location="cpu", weights_only=True)
    assert_same(model2.state_dict(), model.state_dict())
    assert "state_dict" not in rest and rest["epoch"] == 3
    assert plugin.requires_state_on_load is False
    with pytest.raises(FileNotFoundError):
        plugin.load_checkpoint(tmp_path / "missing.ckpt")
    plugin.remove_checkpoint(path)
    plugin.teardown()
    assert not path.exists()


def test_native_reads_and_removes_single_file_checkpoints(tmp_path):
    """Switching an existing run to NativeCheckpointIO: old torch.save checkpoints still resume and get cleaned."""
    old = tmp_path / "old.ckpt"
    torch.save({"epoch": 1, "state_dict": {"w": torch.arange(4.0)}}, old)
    plugin = al.NativeCheckpointIO()
    plugin.checkpoint_io = pkg("lightning").TorchCheckpointIO()
    assert_same(plugin.load_checkpoint(old)["state_dict"], {"w": torch.arange(4.0)})
    plugin.save_checkpoint({"epoch": 2}, old)  # a native checkpoint replaces the file of that name
    assert plugin.load_checkpoint(old) == {"epoch": 2}
    assert al.is_native_checkpoint(old)
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"epoch": 0}, legacy)
    plugin.remove_checkpoint(legacy)
    plugin.teardown()
    assert not legacy.exists()


def test_torch_base_load_with_state_returns_everything(tmp_path):
    """A base without in-place loading (2.6's TorchCheckpointIO) gets no ``state`` and its full dict comes back."""
    plugin = al.AsyncCheckpointIO(pkg("lightning").TorchCheckpointIO())
    plugin.save_checkpoint({"epoch": 5, "w": torch.ones(2)}, tmp_path / "x.ckpt")
    out = plugin.load_checkpoint(tmp_path / "x.ckpt", state={"w": torch.zeros(2)}, weights_only=True)
    assert out["epoch"] == 5 and torch.equal(out["w"], torch.ones(2))
    plugin.teardown()


def test_state_dict_metadata_kept_for_torch_base(tmp_path):
    """``state_dict._metadata`` (module versions) survives, as with a synchronous torch.save (Lightning's own plugin
    drops it when it clones)."""
    model = torch.nn.BatchNorm1d(3)
    plugin = al.AsyncCheckpointIO(pkg("lightning").TorchCheckpointIO())
    plugin.save_checkpoint({"state_dict": model.state_dict()}, tmp_path / "bn.ckpt")
    plugin.teardown()
    loaded = torch.load(tmp_path / "bn.ckpt", weights_only=True)["state_dict"]
    assert loaded._metadata == model.state_dict()._metadata


def _zip_entries(path) -> list:
    """(record name without the archive's folder, size) of a torch.save file."""
    with zipfile.ZipFile(path) as z:
        return [(i.filename.split("/", 1)[1], i.file_size) for i in z.infolist() if "serialization_id" not in i.filename]


def test_files_match_a_synchronous_save(tmp_path):
    """The base writes the snapshot exactly as it would write the live state: same tensors, same file size (every
    tensor gets its own storage, not the shared staging buffer), and safetensors-based bases accept it."""
    from safetensors.torch import load_file, save_file

    state = {"a": torch.randn(100), "b": torch.arange(7), "c": torch.zeros(0), "d": (torch.ones(2, 3).t(),),
             "bf": torch.randn(5).to(torch.bfloat16)}
    base_ptr = torch.randn(10)
    state["v1"], state["v2"] = base_ptr[:6], base_ptr[4:]  # genuinely shared: stays shared
    torch.save(state, tmp_path / "sync.pt")

    class SafetensorsIO(pkg("lightning").TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            save_file({k: v for k, v in checkpoint.items() if k in ("a", "b", "bf")}, str(path) + ".st")
            super().save_checkpoint(checkpoint, path, storage_options)

    plugin = al.AsyncCheckpointIO(SafetensorsIO())
    plugin.save_checkpoint(state, tmp_path / "async.pt")
    plugin.teardown()
    loaded = torch.load(tmp_path / "async.pt", weights_only=True)
    assert_same(loaded, torch.load(tmp_path / "sync.pt", weights_only=True))
    assert _zip_entries(tmp_path / "async.pt") == _zip_entries(tmp_path / "sync.pt")  # same bytes per record
    assert loaded["v1"].untyped_storage().data_ptr() == loaded["v2"].untyped_storage().data_ptr()
    assert torch.equal(load_file(str(tmp_path / "async.pt") + ".st")["a"], state["a"])


def test_exit_flushes_a_save_issued_after_teardown(tmp_path):
    """A save after teardown (ddp_spawn writes the final weights after the Trainer tore down) is not lost when the
    process exits without another teardown."""
    code = (  # the Lightning-free core of the plugin keeps the subprocess light
        "import time, torch, asyncckpt.lightning as al\n"
        "class SlowBase:\n"
        "    def save_checkpoint(self, c, p, storage_options=None):\n"
        "        time.sleep(0.5); torch.save(c, p)\n"
        "p = al.AsyncCheckpointIOMixin(SlowBase())\n"
        "p.teardown()\n"
        f"p.save_checkpoint({{'w': torch.ones(3)}}, {str(tmp_path / 'late.ckpt')!r})\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO, timeout=300)
    assert torch.equal(torch.load(tmp_path / "late.ckpt")["w"], torch.ones(3))


def test_engine_is_shared_not_closed(tmp_path):
    with asyncckpt.SyncEngine() as engine:
        a = al.AsyncCheckpointIO(pkg("lightning").TorchCheckpointIO(), engine=engine)
        b = al.NativeCheckpointIO(engine=engine)
        a.save_checkpoint({"x": torch.ones(1)}, tmp_path / "a.ckpt")
        b.save_checkpoint({"x": torch.ones(1)}, tmp_path / "b.ckpt")
        a.teardown()
        b.teardown()
        assert al.is_native_checkpoint(tmp_path / "b.ckpt") and (tmp_path / "a.ckpt").is_file()
        engine.save({"y": torch.zeros(1)}, tmp_path / "c").result()  # still open
