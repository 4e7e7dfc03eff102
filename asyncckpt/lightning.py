"""Lightning ``CheckpointIO`` plugins that save through the asyncckpt engine::

    Trainer(plugins=[AsyncCheckpointIO()])    # drop-in for Lightning's AsyncCheckpointIO: the base's files
    Trainer(plugins=[NativeCheckpointIO()])   # the engine's sharded format (a directory per checkpoint)

Lightning's Trainer accepts a plugin only if it is an instance of *its own package's* ``_WrappingCheckpointIO``
(``lightning`` and ``pytorch_lightning`` each have one).  So the classes are built on first access, on
``lightning.pytorch``'s hierarchy (``pytorch_lightning``'s if only that is installed), and registered as virtual
subclasses of the other package's class; ``asyncckpt.lightning.pl`` holds them built on ``pytorch_lightning``.
Importing this module imports no Lightning package.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import sys
import threading
import types
from typing import Any, Optional

__all__ = ["AsyncCheckpointIO", "NativeCheckpointIO", "is_native_checkpoint", "read_checkpoint",  # noqa: F822
           "load_from_checkpoint", "pl"]

_PLUGINS = ("AsyncCheckpointIO", "NativeCheckpointIO")
_FLAVOURS = {  # distribution -> (trainer package, fabric package)
    "lightning": ("lightning.pytorch", "lightning.fabric"),
    "pytorch_lightning": ("pytorch_lightning", "lightning_fabric"),
}


def _installed(name: str) -> bool:
    return name in sys.modules or importlib.util.find_spec(name) is not None


def _wrapping(flavour: str) -> type:
    return importlib.import_module(_FLAVOURS[flavour][0] + ".plugins.io.wrapper")._WrappingCheckpointIO


def _default_base(flavour: str) -> Any:
    """The base a strategy would install; only XLA's leaves it to the plugin, and it always has torch_xla loaded."""
    io = importlib.import_module(_FLAVOURS[flavour][1] + ".plugins.io")
    return io.XLACheckpointIO() if "torch_xla" in sys.modules else io.TorchCheckpointIO()


def _accepts(fn: Any, name: str) -> bool:
    params = inspect.signature(fn).parameters.values()
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


class _AsyncCheckpointIOImpl:
    """Asynchronous ``CheckpointIO``: the base ``CheckpointIO`` writes a point-in-time copy in the engine's pipeline.

    ``save_checkpoint`` returns once the engine has copied the checkpoint into reused host staging buffers (on the
    calling thread, where device-to-host copies belong); saves beyond ``host_memory_budget`` wait.  Removing or
    loading a path first waits for its pending save, and each background failure is raised once, by the next call.

    Args:
        base: the ``CheckpointIO`` that writes, loads and removes (alias ``checkpoint_io=``, as in Lightning);
            ``None``: the strategy installs its default.
        engine: a ``SyncEngine`` to share; waited for at ``teardown``, never closed.
        **engine_options: options for the engine this plugin creates (``host_memory_budget``, ...).
    """

    _flavour = "lightning"

    def __init__(self, base: Any = None, *, checkpoint_io: Any = None, engine: Any = None, **engine_options: Any):
        if base is not None and checkpoint_io is not None:
            raise TypeError("pass the base CheckpointIO once, as `base` or as `checkpoint_io`")
        if engine is not None and engine_options:
            raise TypeError("pass either an engine or engine options, not both")
        base = checkpoint_io if base is None else base
        if isinstance(base, _AsyncCheckpointIOImpl):
            raise ValueError(f"{type(base).__name__} is already asynchronous and cannot be the base of "
                             f"{type(self).__name__}; pass it to the Trainer directly")
        from .options import EngineOptions

        EngineOptions.from_kwargs(engine_options)  # bad options fail here, not at the first save mid-training
        self._checkpoint_io = base
        self._base_checkpoint_io_configured = base is not None and getattr(base, "_base_checkpoint_io_configured", True)
        self._engine, self._owns_engine, self._engine_options = engine, engine is None, engine_options

    def __getstate__(self) -> dict[str, Any]:
        """ddp_spawn pickles the plugin: the copy starts its own engine."""
        return {**self.__dict__, "_engine": None, "_owns_engine": True}

    @property
    def checkpoint_io(self) -> Any:
        return self._checkpoint_io

    @checkpoint_io.setter
    def checkpoint_io(self, io: Any) -> None:
        # Lightning's rule (strategies assign their default on every access; the first one counts), written without
        # isinstance so that wrapping plugins of either package nest.
        if self._checkpoint_io is None:
            self._checkpoint_io, self._base_checkpoint_io_configured = io, True
        elif not self._base_checkpoint_io_configured and hasattr(self._checkpoint_io, "_base_checkpoint_io_configured"):
            self._base_checkpoint_io_configured = True
            self._checkpoint_io.checkpoint_io = io

    def _base(self) -> Any:
        if self._checkpoint_io is None:  # no strategy installed one (XLA's, or use outside a Trainer)
            self.checkpoint_io = _default_base(self._flavour)
        return self._checkpoint_io

    @property
    def engine(self) -> Any:
        """The ``SyncEngine`` in use; one created here is closed by ``teardown`` and reopened by the next save."""
        if self._engine is None:
            from .sync_engine import SyncEngine

            self._engine = SyncEngine(**self._engine_options)
        return self._engine

    def _settle(self, path: Any) -> None:
        """Let pending saves of ``path`` land (the base is about to touch it), then raise any unseen failure."""
        if self._engine is not None:
            self._engine.wait_for(path)
            self._engine.check()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        base = self._base()

        def write(copy: Any) -> None:  # runs in the pipeline, on the engine's point-in-time copy
            base.save_checkpoint(copy, path, storage_options=storage_options)

        self.engine.save_with(checkpoint, write, path)

    def remove_checkpoint(self, path: Any) -> None:
        self._settle(path)
        self._base().remove_checkpoint(path)

    def load_checkpoint(self, path: Any, *args: Any, state: Any = None, **kwargs: Any) -> Any:
        """Lightning 2.6's ``(path, map_location, weights_only)`` or the newer form with ``state=``; a base that
        cannot restore in place gets no ``state`` and returns the whole checkpoint (all of it still to apply)."""
        self._settle(path)
        base = self._base()
        if state is not None and _accepts(base.load_checkpoint, "state"):
            kwargs["state"] = state
        return base.load_checkpoint(path, *args, **kwargs)

    def wait(self) -> None:
        """Block until every pending save has landed; raise the first failure not reported yet."""
        if self._engine is not None:
            self._engine.wait()

    def teardown(self) -> None:
        """Wait for all pending saves (closing the engine if it is ours) and raise the first unseen failure."""
        engine = self._engine
        if self._owns_engine:
            self._engine = None
        try:
            if engine is not None:
                (engine.close if self._owns_engine else engine.wait)()
        finally:
            if hasattr(self._checkpoint_io, "teardown"):
                self._checkpoint_io.teardown()


class _NativeCheckpointIOImpl(_AsyncCheckpointIOImpl):
    """``CheckpointIO`` writing the engine's format: a directory (or prefix) of safetensors shards committed by
    ``manifest.json``, streamed through any staging budget.  Single-file checkpoints (``torch.save``, e.g. from
    before switching) still load and get removed through the base, so a run can resume from them.  It is of
    Lightning's wrapping kind only so that every strategy, XLA's included, accepts it and installs that base.

    Args: as :class:`AsyncCheckpointIO` (``storage_options=`` for remote paths goes to the engine).
    """

    requires_state_on_load = False  # newer Lightning: it loads without `state` too (the whole dict)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        from .io.paths import is_local, local_path, to_url

        url = to_url(path)
        if is_local(url) and os.path.isfile(local_path(url)):
            os.remove(local_path(url))  # replaces a single file of that name, as torch.save would
        self.engine.save(checkpoint, path, storage_options=storage_options)

    def _kind(self, path: Any) -> Optional[str]:
        from .tools.convert import kind_of

        self._settle(path)
        core = self.engine.core
        return self.engine.run(kind_of, core, core.target(path, None))

    def remove_checkpoint(self, path: Any) -> None:
        kind = self._kind(path)
        if kind == "file":
            self._base().remove_checkpoint(path)
        elif kind is not None:
            self.engine.remove(path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Optional[bool] = None, *,
                        state: Any = None, **kwargs: Any) -> Any:
        """The checkpoint dict, or with ``state`` (restored in place) what was not applied; tensors on the CPU
        unless ``map_location`` says otherwise, as with TorchCheckpointIO."""
        kind = self._kind(path)
        if kind is None:
            raise FileNotFoundError(f"Checkpoint not found: {path}")
        if kind == "file":
            if map_location is not None:
                kwargs["map_location"] = map_location
            return super().load_checkpoint(path, weights_only=weights_only, state=state, **kwargs)
        if map_location is None and state is None:
            map_location = "cpu"  # a returned dict lands on the CPU, as with TorchCheckpointIO
        # restoring in place keeps each tensor's saved device: XLA/CUDA targets get one batched upload, not one each
        return self.engine.load(path, state=state, map_location=map_location, weights_only=weights_only, **kwargs)


# ---------------------------------------------------------------- native checkpoints outside the Trainer


def is_native_checkpoint(path: Any, storage_options: Optional[dict] = None) -> bool:
    """True when ``path`` holds a committed checkpoint in the engine's format."""
    from .tools.convert import path_kind

    return path_kind(path, storage_options) == "native"


def read_checkpoint(path: Any, *, map_location: Any = "cpu", weights_only: Optional[bool] = None,
                    storage_options: Optional[dict] = None) -> dict[str, Any]:
    """Read a checkpoint written by :class:`NativeCheckpointIO` (checksums verified; pickled values only with
    ``weights_only=False``, as in ``torch.load``)."""
    from .sync_engine import SyncEngine

    with SyncEngine(storage_options=storage_options) as engine:
        return engine.load(path, map_location=map_location, weights_only=weights_only)


def load_from_checkpoint(cls: type, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None,
                         strict: Optional[bool] = None, weights_only: Optional[bool] = None, **kwargs: Any) -> Any:
    """``cls.load_from_checkpoint(...)`` for either format.

    Lightning's own reads single files only; for a native checkpoint this reads it with the engine and then takes
    Lightning's remaining steps (migration, ``hparams_file``, hyper-parameter overrides, ``strict``).
    """
    from .tools.convert import path_kind

    if path_kind(checkpoint_path) in ("file", None):  # the engine explains an uncommitted directory better
        return cls.load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                        strict=strict, weights_only=weights_only, **kwargs)
    for name, _ in _FLAVOURS.values():
        package = sys.modules.get(name)
        if package is not None and issubclass(cls, (package.LightningModule, package.LightningDataModule)):
            break
    else:
        raise TypeError(f"{cls!r} is not a LightningModule or LightningDataModule")
    saving = importlib.import_module(name + ".core.saving")
    checkpoint = read_checkpoint(checkpoint_path, map_location=map_location or "cpu", weights_only=weights_only)
    checkpoint = saving._pl_migrate_checkpoint(checkpoint, checkpoint_path=checkpoint_path)
    if hparams_file is not None:
        ext = str(hparams_file).rsplit(".", 1)[-1].lower()
        if ext not in ("csv", "yml", "yaml"):
            raise ValueError(".csv, .yml or .yaml is required for `hparams_file`")
        load = saving.load_hparams_from_tags_csv if ext == "csv" else saving.load_hparams_from_yaml
        checkpoint[cls.CHECKPOINT_HYPER_PARAMS_KEY] = load(hparams_file)
    checkpoint.setdefault(cls.CHECKPOINT_HYPER_PARAMS_KEY, {}).update(kwargs)
    if issubclass(cls, package.LightningDataModule):
        return saving._load_state(cls, checkpoint, **kwargs)
    model = saving._load_state(cls, checkpoint, strict=strict, **kwargs)
    import torch

    device = next((t.device for t in (checkpoint.get("state_dict") or {}).values() if isinstance(t, torch.Tensor)),
                  None)
    return model if device is None else model.to(device)


# ---------------------------------------------------------------- the public classes, built on first access

_lock = threading.Lock()
_built: dict[tuple[str, str], type] = {}


def _build(kind: str, flavour: str, module: str) -> type:
    with _lock:
        if (kind, flavour) not in _built:
            impl = _AsyncCheckpointIOImpl if kind == "AsyncCheckpointIO" else _NativeCheckpointIOImpl
            cls = type(kind, (impl, _wrapping(flavour)), {"__module__": module, "__qualname__": kind,
                                                          "__doc__": impl.__doc__, "_flavour": flavour})
            for other in _FLAVOURS:
                if other != flavour and _installed(other):
                    with contextlib.suppress(ImportError):  # a broken second installation must not break the first
                        _wrapping(other).register(cls)
            _built[kind, flavour] = cls
        return _built[kind, flavour]


def _lazy(module: Any, flavour: Any) -> Any:
    def __getattr__(name: str) -> type:
        if name not in _PLUGINS:
            raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}")
        cls = _build(name, flavour(), module.__name__)
        setattr(module, name, cls)
        return cls
    return __getattr__


def _default_flavour() -> str:
    for name in _FLAVOURS:
        if _installed(name):
            return name
    raise ImportError("asyncckpt.lightning needs `lightning` or `pytorch_lightning` "
                      "(pip install 'asyncckpt[lightning]')")


pl = types.ModuleType(__name__ + ".pl", "The plugin classes built on pytorch_lightning's hierarchy.")
pl.__all__ = list(_PLUGINS)
pl.__getattr__ = _lazy(pl, lambda: "pytorch_lightning")
sys.modules.setdefault(pl.__name__, pl)
__getattr__ = _lazy(sys.modules[__name__], _default_flavour)
