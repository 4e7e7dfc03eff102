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

import collections
import contextlib
import importlib
import importlib.util
import inspect
import logging
import os
import re
import stat
import sys
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any, Optional

from ..io.paths import is_local, local_path, to_url

__all__ = ["AsyncCheckpointIO", "NativeCheckpointIO", "AsyncFSDPStrategy",  # noqa: F822
           "AsyncModelParallelStrategy", "is_native_checkpoint", "read_checkpoint", "load_from_checkpoint", "pl"]

log = logging.getLogger("asyncckpt")

_PLUGINS = ("AsyncCheckpointIO", "NativeCheckpointIO")
_STRATEGIES = ("AsyncFSDPStrategy", "AsyncModelParallelStrategy")  # Lightning's strategy of the name after "Async"
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


def _is_torch_io(base: Any) -> bool:
    """Whether ``base`` is Lightning's TorchCheckpointIO (XLA's included) of an installed package: it writes one
    file at the path, replacing whatever is there at once (fsspec transaction)."""
    for _, fabric in _FLAVOURS.values():
        io = sys.modules.get(fabric + ".plugins.io")
        if io is not None and isinstance(base, io.TorchCheckpointIO):
            return True
    return False


# ---------------------------------------------------------------- calls into foreign bases

# Base CheckpointIOs are not known to be thread-safe, and Lightning's share state through fsspec's cached
# filesystems (two overlapping ``_atomic_save`` calls share one transaction and break each other, locally and on
# object stores): every call into a base, of any plugin in this process, runs under this lock.
_base_calls = threading.RLock()


def _fresh_base_lock() -> None:
    """In a forked child: the parent's lock may have been held by a thread that does not exist here."""
    global _base_calls
    _base_calls = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_base_lock)


# ---------------------------------------------------------------- pending saves, across plugins and ranks

def _path_key(path: Any) -> str:
    """One spelling per location: absolute for local paths, the URL otherwise."""
    url = to_url(path)
    return local_path(url) if is_local(url) else url


def _rank_store() -> Any:
    """The store of torch.distributed's default process group when several ranks run, else None."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    return dist.distributed_c10d._get_default_store()


class _Landings:
    """Saves issued through the plugins of this process and not landed yet, counted by path.

    A load or removal waits here, so it also waits for a save issued through another plugin (a Trainer's manual
    save, then a new Trainer that resumes from it). With several ranks the counts are kept in the process group's
    store as well, so a load on any rank waits for the save of that path on the rank that writes it (Lightning
    saves on global rank 0 and loads on every rank): no collective call, so a load on one rank alone never hangs.
    """

    poll = (0.002, 0.1)  # first and longest pause between two looks at the store

    def __init__(self) -> None:
        self._reset()
        if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's saves in flight
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._count: dict[str, int] = {}

    @staticmethod
    def _keys(key: str) -> tuple[str, str]:
        return f"asyncckpt/saves/{key}/issued", f"asyncckpt/saves/{key}/landed"

    def issued(self, key: str, handle: Any) -> None:
        """Count a save of ``key``, until ``handle`` settles (whatever its outcome)."""
        store = _rank_store()
        if store is not None:
            store.add(self._keys(key)[0], 1)
        cond = self._cond
        with cond:
            self._count[key] = self._count.get(key, 0) + 1

        def landed(_: Any) -> None:
            if self._cond is cond:  # not a forked child's copy
                with cond:
                    left = self._count.get(key, 1) - 1
                    if left:
                        self._count[key] = left
                    else:
                        self._count.pop(key, None)
                    cond.notify_all()
            if store is not None:
                try:
                    store.add(self._keys(key)[1], 1)
                except Exception as exc:  # the process group is gone: no rank can be waiting any more
                    log.debug("could not record the landing of %s in the process group's store: %s", key, exc)

        handle.add_done_callback(landed)

    def wait_here(self, key: str) -> None:
        """Until no save of ``key`` issued in this process is pending."""
        with self._cond:
            while self._count.get(key):
                self._cond.wait()

    def wait(self, key: str) -> None:
        """Until no save of ``key`` issued in this process, or on another rank before now, is pending."""
        self.wait_here(key)
        store = _rank_store()
        if store is None:
            return
        issued_key, landed_key = self._keys(key)
        issued = store.add(issued_key, 0)
        pause, deadline = self.poll[0], time.monotonic() + _rank_timeout()
        while store.add(landed_key, 0) < issued:
            if time.monotonic() > deadline:
                from ..errors import CheckpointError

                raise CheckpointError(f"a save of {key} issued on another rank has not landed after "
                                      f"{_rank_timeout():.0f} s; is that rank still running?")
            time.sleep(pause)
            pause = min(pause * 2, self.poll[1])


def _rank_timeout() -> float:
    """How long a load waits for another rank's save: the process group's own default timeout."""
    from torch.distributed import constants

    return constants.default_pg_timeout.total_seconds()


_landings = _Landings()


def _settle_paths(path: Any) -> list[str]:
    """The keys a load of ``path`` waits for: the path and, for a local symlink, what it points to."""
    key = _path_key(path)
    keys = [key]
    if is_local(to_url(path)) and os.path.islink(key):
        keys.append(os.path.realpath(key))
    return keys


# ---------------------------------------------------------------- reserving a path at save time

class _Reservation:
    """An empty file (or, for the native format, an empty directory) made at the path when a save is issued, so
    that the path exists at once: ``ModelCheckpoint(save_last="link")`` can link to it and its existence checks
    (``-v1`` versions) see it. The save replaces it; if it is still there, empty, when the save settles (the save
    failed, or the base wrote elsewhere), it is removed."""

    def __init__(self, path: str, directory: bool) -> None:
        self.path, self.directory = path, directory
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if directory:
            os.mkdir(path)
            st = os.stat(path)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
        self._id = (st.st_dev, st.st_ino)

    @classmethod
    def make(cls, path: Any, directory: bool) -> Optional["_Reservation"]:
        """A reservation of the local ``path`` if nothing is there (a link counts), else None."""
        url = to_url(path)
        if not is_local(url):
            return None
        try:
            return cls(local_path(url), directory)
        except FileExistsError:
            return None

    def release(self, *_: Any) -> None:
        """Remove the placeholder if it is still ours and empty (on the engine's loop or a strategy's checkpoint
        thread, as the save settles: quick, never raises)."""
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) != self._id:
                return  # replaced by the save
            if self.directory:
                os.rmdir(self.path)  # refuses a non-empty one
            elif st.st_size == 0:
                os.remove(self.path)
        except OSError:
            pass


def _placeholder(path: Any) -> bool:
    """Whether ``path`` is an empty local file, as a reservation whose save never finished leaves it."""
    url = to_url(path)
    if not is_local(url):
        return False
    try:
        st = os.stat(local_path(url))
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == 0


def _local_link(path: Any) -> Optional[str]:
    url = to_url(path)
    if is_local(url) and os.path.islink(local_path(url)):
        return local_path(url)
    return None


def _check_max_pending(value: Any) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        from ..errors import InvalidArgumentError

        raise InvalidArgumentError(f"max_pending_saves must be a positive int or None, not {value!r}")


class AsyncCheckpointIOMixin:
    """Asynchronous ``CheckpointIO``: the base ``CheckpointIO`` writes a point-in-time copy in the engine's pipeline.

    ``save_checkpoint`` returns once the engine has copied the checkpoint into reused host staging buffers (on the
    calling thread, where device-to-host copies belong); saves beyond ``host_memory_budget`` or beyond
    ``max_pending_saves`` wait. Removing or loading a path first waits for its pending saves, those of every plugin
    in the process and, under torch.distributed, those of the other ranks; each background failure is raised once,
    by the next call.

    Args:
        base: the ``CheckpointIO`` that writes, loads and removes; ``None``: the strategy installs its default.
        checkpoint_io: ``base`` under Lightning's name for it.
        engine: a ``SyncEngine`` to share; waited for at ``teardown``, never closed.
        max_pending_saves: saves in flight at once; the next one waits for the oldest (each holds a full copy of
            the checkpoint in staging memory). ``None``: only ``host_memory_budget`` bounds them.
        reserve: make the path exist as soon as a save is issued (an empty file, replaced by the save), so
            ``save_last="link"`` and ``ModelCheckpoint``'s existence checks see pending saves. Default: for
            Lightning's TorchCheckpointIO, which replaces a file at once; other bases may write a directory there.
        **engine_options: options for the engine this plugin creates (``host_memory_budget``, ...).

    Raises:
        TypeError: the base is given twice (``base`` and ``checkpoint_io``), or both an engine and engine options.
        ValueError: the base is itself asynchronous; `InvalidArgumentError` (a ValueError too): ``max_pending_saves``
            is not a positive count or None.
    """

    _flavour = "lightning"
    _directories = False  # what a reservation makes: this plugin's checkpoints are files

    def __init__(self, base: Any = None, *, checkpoint_io: Any = None, engine: Any = None,
                 max_pending_saves: Optional[int] = 2, reserve: Optional[bool] = None, **engine_options: Any):
        if base is not None and checkpoint_io is not None:
            raise TypeError("pass the base CheckpointIO once, as `base` or as `checkpoint_io`")
        if engine is not None and engine_options:
            raise TypeError("pass either an engine or engine options, not both")
        base = checkpoint_io if base is None else base
        if isinstance(base, AsyncCheckpointIOMixin):
            raise ValueError(f"{type(base).__name__} is already asynchronous and cannot be the base of "
                             f"{type(self).__name__}; pass it to the Trainer directly")
        _check_max_pending(max_pending_saves)
        from ..options import EngineOptions

        EngineOptions.from_kwargs(engine_options)  # bad options fail here, not at the first save mid-training
        self._checkpoint_io = base
        self._base_checkpoint_io_configured = base is not None and getattr(base, "_base_checkpoint_io_configured", True)
        self._engine, self._owns_engine, self._engine_options = engine, engine is None, engine_options
        self._max_pending, self._reserve = max_pending_saves, reserve
        self._in_flight: collections.deque[Any] = collections.deque()
        self._warned_budget = False

    def __getstate__(self) -> dict[str, Any]:
        """ddp_spawn pickles the plugin: the copy starts its own engine."""
        return {**self.__dict__, "_engine": None, "_owns_engine": True, "_in_flight": collections.deque()}

    @property
    def checkpoint_io(self) -> Any:
        """The base ``CheckpointIO`` that writes each point-in-time copy (the strategy sets its default when none
        was given); assigning one follows Lightning's rule: the first base configured stays."""
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

    @property
    def requires_cpu_collectives(self) -> bool:
        """Newer Lightning asks whether the process group needs a CPU backend: no, ranks meet through its store."""
        return False

    def _base(self) -> Any:
        if self._checkpoint_io is None:  # no strategy installed one (XLA's, or use outside a Trainer)
            self.checkpoint_io = _default_base(self._flavour)
        return self._checkpoint_io

    @property
    def engine(self) -> Any:
        """The ``SyncEngine`` in use; one created here is closed by ``teardown`` and reopened by the next save."""
        if self._engine is None:
            from ..sync_engine import SyncEngine

            self._engine = SyncEngine(**self._engine_options)
        return self._engine

    def _settle(self, path: Any, ranks: bool = False) -> None:
        """Let pending saves of ``path`` land (the base is about to touch it) — this plugin's, the process's, and
        with ``ranks`` the other ranks' — then raise any unseen failure."""
        for key in _settle_paths(path):
            (_landings.wait if ranks else _landings.wait_here)(key)
        if self._engine is not None:
            self._engine.wait_for(path)
            self._engine.check()

    def _make_room(self) -> None:
        """Wait until fewer than ``max_pending_saves`` saves are in flight; a failure of the one waited for is
        raised here (it was not seen yet)."""
        while self._in_flight and self._in_flight[0].done():
            self._in_flight.popleft()
        while self._max_pending is not None and len(self._in_flight) >= self._max_pending:
            handle = self._in_flight.popleft()
            seen = handle.observed
            try:
                handle.result()
            except Exception:
                if not seen:
                    raise

    def _reserves(self, base: Any) -> bool:
        return _is_torch_io(base) if self._reserve is None else self._reserve

    def _issued(self, path: Any, handle: Any, reservation: Optional[_Reservation]) -> None:
        if reservation is not None:
            handle.add_done_callback(reservation.release)
        _landings.issued(_path_key(path), handle)
        self._in_flight.append(handle)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        """Copy ``checkpoint`` into staging memory (the caller may change it as soon as this returns) and have the
        base write that copy in the background. With ``reserve`` (the default for Lightning's torch base) ``path``
        shows at once as a placeholder, so Lightning's existence checks see the pending save. A state larger than
        ``host_memory_budget`` is saved synchronously through the base, with a warning.

        Args:
            checkpoint: Lightning's checkpoint dict.
            path: where the base writes it.
            storage_options: passed on to the base's ``save_checkpoint``.

        Raises:
            CheckpointError: the state cannot be copied (an unpicklable value), or an earlier save failed and
                nobody has seen its error yet.
        """
        from ..errors import BudgetExceededError

        base = self._base()
        self._make_room()

        def write(copy: Any) -> None:  # runs in the pipeline, on the engine's point-in-time copy
            with _base_calls:
                base.save_checkpoint(copy, path, storage_options=storage_options)

        reservation = _Reservation.make(path, False) if self._reserves(base) else None
        try:
            handle = self.engine.save_with(checkpoint, write, path)
        except BudgetExceededError as exc:
            try:
                self._save_now(base, checkpoint, path, storage_options, exc)
            finally:
                if reservation is not None:
                    reservation.release()
            return
        except BaseException:
            if reservation is not None:
                reservation.release()
            raise
        self._issued(path, handle, reservation)

    def _save_now(self, base: Any, checkpoint: dict[str, Any], path: Any, storage_options: Any,
                  exc: Any) -> None:
        """A checkpoint too large for the staging budget: written synchronously, as Lightning's plugins would."""
        message = (f"{path}: the checkpoint needs {exc.needed} bytes of staging memory at once, more than "
                   f"host_memory_budget ({exc.budget}); it is saved synchronously. Raise host_memory_budget, or use "
                   "NativeCheckpointIO (it streams through any budget), to keep such saves asynchronous")
        if not self._warned_budget:
            warnings.warn(message, UserWarning, stacklevel=3)
            self._warned_budget = True
        log.info("%s", message)
        self._settle(path)  # after the saves of this path already pending, so it is the one that stays
        with _base_calls:
            base.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def remove_checkpoint(self, path: Any) -> None:
        """Remove the checkpoint at ``path`` once its pending saves have landed; a symlink (``save_last="link"``)
        is removed itself, never what it points to.

        Args:
            path: the checkpoint (or the link) to remove.
        """
        self._settle(path)
        link = _local_link(path)
        if link is not None:
            os.remove(link)
            return
        with _base_calls:
            self._base().remove_checkpoint(path)

    def load_checkpoint(self, path: Any, *args: Any, state: Any = None, **kwargs: Any) -> Any:
        """Load through the base once a pending save of ``path`` (on any rank) has landed.

        Lightning 2.6's ``(path, map_location, weights_only)`` or the newer form with ``state=``; a base that
        cannot restore in place gets no ``state`` and returns the whole checkpoint (all of it still to apply).

        Args:
            path: the checkpoint.
            *args: ``map_location`` and ``weights_only``, passed on to the base.
            state: restore into it in place, where the base can.
            **kwargs: passed on to the base.

        Returns:
            What the base returns: the checkpoint dict, or with ``state`` what was not applied.

        Raises:
            IncompleteCheckpointError: ``path`` is the placeholder of a save that never finished.
        """
        self._settle(path, ranks=True)
        if _placeholder(path):
            from ..errors import IncompleteCheckpointError

            raise IncompleteCheckpointError(
                f"{path} is an empty file: the save that reserved it never finished (the process ended first); "
                "load another checkpoint, and delete it")
        base = self._base()
        if state is not None and _accepts(base.load_checkpoint, "state"):
            kwargs["state"] = state
        with _base_calls:
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
        self._in_flight.clear()
        try:
            if engine is not None:
                (engine.close if self._owns_engine else engine.wait)()
        finally:
            if hasattr(self._checkpoint_io, "teardown"):
                self._checkpoint_io.teardown()


class NativeCheckpointIOMixin(AsyncCheckpointIOMixin):
    """``CheckpointIO`` writing the engine's format: a directory (or prefix) of safetensors shards committed by
    ``manifest.json``, streamed through any staging budget.  Single-file checkpoints (``torch.save``, e.g. from
    before switching) still load and get removed through the base, so a run can resume from them.  It is of
    Lightning's wrapping kind only so that every strategy, XLA's included, accepts it and installs that base.

    Saves stream through the staging budget, so ``max_pending_saves`` defaults to ``None``; a local path is reserved
    (an empty directory) unless ``reserve=False``.

    Args:
        base: the ``CheckpointIO`` for single files, as for `AsyncCheckpointIO`.
        max_pending_saves: saves in flight at once (``None``: only ``host_memory_budget`` bounds them).
        **kwargs: `AsyncCheckpointIO`'s other arguments (``storage_options=`` for remote paths goes to the
            engine).
    """

    requires_state_on_load = False  # newer Lightning: it loads without `state` too (the whole dict)
    _directories = True

    def __init__(self, base: Any = None, *, max_pending_saves: Optional[int] = None, **kwargs: Any):
        super().__init__(base, max_pending_saves=max_pending_saves, **kwargs)

    def _reserves(self, base: Any) -> bool:
        return self._reserve is not False

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        """Snapshot ``checkpoint`` into the engine's staging memory and write it in the engine's format (a
        directory of shards, committed by its manifest) in the background; a single file of that name is
        replaced.

        Args:
            checkpoint: Lightning's checkpoint dict.
            path: the checkpoint directory (a local path or fsspec URL).
            storage_options: fsspec options for a URL (default: the plugin's).

        Raises:
            CheckpointError: the state cannot be saved, or an earlier save failed and nobody has seen its error.
        """
        url = to_url(path)
        if is_local(url) and os.path.isfile(local_path(url)):
            os.remove(local_path(url))  # replaces a single file of that name, as torch.save would
        self._make_room()
        reservation = _Reservation.make(path, True) if self._reserves(None) else None
        try:
            handle = self.engine.save(checkpoint, path, storage_options=storage_options)
        except BaseException:
            if reservation is not None:
                reservation.release()
            raise
        self._issued(path, handle, reservation)

    def _kind(self, path: Any, ranks: bool = False) -> Optional[str]:
        from ..tools.convert import kind_of

        self._settle(path, ranks)
        core = self.engine.core
        return self.engine.run(kind_of, core, core.target(path, None))

    def remove_checkpoint(self, path: Any) -> None:
        """Remove a native checkpoint (manifest first) or a single file, once a pending save of it has landed; a
        symlink is removed itself, never what it points to.

        Args:
            path: the checkpoint, file or link to remove.
        """
        link = _local_link(path)
        if link is not None:
            self._settle(path)
            os.remove(link)  # the link, not the checkpoint it points to
            return
        kind = self._kind(path)
        if kind == "file":
            with _base_calls:
                self._base().remove_checkpoint(path)
        elif kind is not None:
            self.engine.remove(path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Optional[bool] = None, *,
                        state: Any = None, **kwargs: Any) -> Any:
        """Load a native checkpoint (checksums verified) or a single file, once a pending save of it has landed.

        Args:
            path: the checkpoint.
            map_location: where tensors go, as for ``torch.load`` (default: the CPU for a returned dict).
            weights_only: load pickled values with torch's weights-only rules (None: the default, on).
            state: restore into it in place (tensors keep their devices).
            **kwargs: passed on to the engine's ``load`` (``strict``, ``verify``, ...) or to the base.

        Returns:
            The checkpoint dict, or with ``state`` what was not applied.

        Raises:
            FileNotFoundError: nothing is at ``path``.
            CheckpointError: the checkpoint is damaged, incomplete or refused (see the engine's ``load``).
        """
        kind = self._kind(path, ranks=True)
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


# ---------------------------------------------------------------- sharded strategies

_META_FILE = "meta.pt"  # in a sharded strategy's checkpoint: all but the tensors (Lightning's _METADATA_FILENAME)

# the part of the sharded strategies' docstrings they share
_SHARDED = """

    Sharded saves go through ``torch.distributed.checkpoint`` with asyncckpt's ``StorageWriter`` and return after
    one copy into staging.

    A save keeps Lightning's layout — a directory at the checkpoint's path, made at once on rank 0 (so
    ``save_last="link"`` and ``ModelCheckpoint``'s ``-vN`` checks see it while it is pending), holding every rank's
    shards and ``meta.pt`` (the rest of the checkpoint, serialized when the save is issued) — but writes ``meta.pt``
    only after the global commit: Lightning takes a directory with ``meta.pt`` for a checkpoint. The DCP saves run
    one after another in a thread of the strategy's, on a gloo process group of their own (their collectives never
    meet the training's); at most ``max_pending_saves`` are in flight. Removing a checkpoint waits for its pending
    save, loading waits for every pending save (on every rank: ``meta.pt`` lands last, on rank 0) and reads through
    asyncckpt's ``StorageReader``; sharded checkpoints written by Lightning's own strategy still load.
    ``teardown`` (the end of ``fit``) waits for all of them. Each background failure is raised once, by the next
    save, load, removal or the teardown.

    Args:
        *args, **kwargs: Lightning's strategy arguments.
        max_pending_saves: sharded saves in flight at once; the next one waits for the oldest (each holds a copy of
            this rank's shards in staging memory). ``None``: only ``host_memory_budget`` bounds them.
        engine_options: options for the engine the saves and loads use (``host_memory_budget``, ``fsync``, ...);
            it is closed by ``teardown``.
"""


def _failure(future: Any) -> Optional[BaseException]:
    """Wait for ``future``; its exception, or None."""
    try:
        future.result()
    except BaseException as exc:  # noqa: B036 — reported by the caller
        return exc
    return None


class ShardedSavesMixin:
    """What the asynchronous sharded strategies add to Lightning's (see ``_SHARDED``)."""

    _flavour = "lightning"
    _model_key = "state_dict"  # the key of the module's state in the DCP checkpoint, as Lightning names it

    def __init__(self, *args: Any, max_pending_saves: Optional[int] = 2,
                 engine_options: Optional[dict[str, Any]] = None, **kwargs: Any):
        _check_max_pending(max_pending_saves)
        from ..options import EngineOptions

        EngineOptions.from_kwargs(dict(engine_options or {}))  # bad options fail here, not at the first save
        super().__init__(*args, **kwargs)
        self._max_pending, self._engine_options = max_pending_saves, dict(engine_options or {})
        self._pending: collections.deque[tuple[str, Any]] = collections.deque()  # (path key, future), oldest first
        self._ckpt_engine: Any = None
        self._ckpt_thread: Any = None
        self._ckpt_group: Any = None

    # ------------------------------------------------------------ what differs between the strategies

    def _saves_sharded(self) -> bool:
        raise NotImplementedError

    def _load_sharded(self, path: Any, weights_only: Optional[bool]) -> dict[str, Any]:
        raise NotImplementedError

    # ------------------------------------------------------------ parts

    def _lightning(self, name: str) -> Any:
        """A module of this class's Lightning package (``name`` relative to the trainer's or, with ``fabric.``, to
        the fabric's package)."""
        trainer, fabric = _FLAVOURS[self._flavour]
        return importlib.import_module(fabric + name[6:] if name.startswith("fabric") else trainer + name)

    def _engine(self) -> Any:
        if self._ckpt_engine is None:
            from ..sync_engine import SyncEngine

            self._ckpt_engine = SyncEngine(**self._engine_options)
        return self._ckpt_engine

    def _group(self) -> Any:
        """The gloo process group of the checkpoint thread's collectives (made by every rank at its first save)."""
        if self._ckpt_group is None:
            import torch.distributed as dist

            self._ckpt_group = dist.new_group(backend="gloo")
        return self._ckpt_group

    def _thread(self) -> Any:
        if self._ckpt_thread is None:
            from concurrent.futures import ThreadPoolExecutor

            self._ckpt_thread = ThreadPoolExecutor(1, thread_name_prefix="asyncckpt-dcp")
        return self._ckpt_thread

    def _landed(self, pick: Any) -> None:
        """Wait for the pending saves ``pick(index, key)`` selects, forget every landed one, and raise the first
        failure among them."""
        error: Optional[BaseException] = None
        left: collections.deque[tuple[str, Any]] = collections.deque()
        for i, (key, future) in enumerate(self._pending):
            if pick(i, key) or future.done():
                error = error or _failure(future)
            else:
                left.append((key, future))
        self._pending = left
        if error is not None:
            raise error

    def _settle(self, path: Any) -> None:
        """Let pending saves of ``path`` land: this strategy's, then those of plugins of this process."""
        for key in _settle_paths(path):
            self._landed(lambda _, k: k == key)
            _landings.wait_here(key)

    # ------------------------------------------------------------ Lightning's API

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None
                        ) -> None:
        """A sharded save: each rank copies its shards once into staging and returns; the writes, the global
        commit and ``meta.pt`` follow in the strategy's checkpoint thread. Other saves go through the
        ``CheckpointIO`` as in Lightning.

        Args:
            checkpoint: Lightning's checkpoint dict (its model and optimizer states sharded).
            filepath: the checkpoint directory (local).
            storage_options: refused for sharded saves, as Lightning's strategies refuse it.

        Raises:
            TypeError: ``storage_options`` given for a sharded save.
            CheckpointError: the state cannot be staged, or an earlier save failed and nobody has seen its error.
        """
        if not self._saves_sharded():  # one file through the CheckpointIO, as Lightning does
            self._settle(filepath)
            super().save_checkpoint(checkpoint, filepath, storage_options)  # type: ignore[misc]
            return
        if storage_options is not None:
            raise TypeError(f"`{type(self).__name__}.save_checkpoint(..., storage_options=...)` is not supported: "
                            "sharded saves do not use the CheckpointIO")
        import io
        from pathlib import Path

        import torch

        from ..dcp import StorageWriter
        from ..errors import CheckpointError

        path = Path(self.broadcast(filepath))  # type: ignore[attr-defined]
        pending = len(self._pending)
        self._landed(lambda i, _: self._max_pending is not None and i <= pending - self._max_pending)
        state = {self._model_key: checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        meta, reservation = None, None
        if self.global_rank == 0:  # type: ignore[attr-defined]
            if path.is_file():  # a single-file checkpoint of that name is replaced, as Lightning does
                self._settle(path)
                path.unlink()
            reservation = _Reservation.make(path, True)  # the path exists from now on; gone again if the save fails
            buf = io.BytesIO()
            torch.save(checkpoint, buf)  # the rest as it is now: training may change it from here on
            meta = buf.getvalue()
        writer = StorageWriter(path, engine=self._engine())
        group = self._group()
        try:
            staged = writer.stage(state)  # this rank's one copy
        except CheckpointError as exc:  # too large for the staging budget, or tensors it cannot stage
            warnings.warn(f"{path}: {exc}; this save streams through the budget and blocks until it is written",
                          UserWarning, stacklevel=2)
            staged = state
        future = self._thread().submit(self._write, writer, staged, group, meta)
        if reservation is not None:
            future.add_done_callback(reservation.release)
        _landings.issued(_path_key(path), future)
        self._pending.append((_path_key(path), future))
        if staged is state:
            self._landed(lambda i, k: True)  # it was the last one in: all of them

    @staticmethod
    def _write(writer: Any, state: Any, group: Any, meta: Optional[bytes]) -> None:
        """In the checkpoint thread: the DCP save (every rank's shards, then the global manifest), then meta.pt."""
        import torch.distributed.checkpoint as dcp

        from ..dcp import unwrapped

        with unwrapped():
            dcp.save(state, storage_writer=writer, process_group=group)
        if meta is not None:
            target = writer.target()
            writer.engine.run(target.storage.put_atomic, target.storage.join(target.path, _META_FILE), meta,
                              writer.options.fsync)

    def remove_checkpoint(self, filepath: Any) -> None:
        """Remove the checkpoint once its pending save has landed (rank 0); a symlink is removed itself.

        Args:
            filepath: the checkpoint directory (or link).
        """
        if not self.is_global_zero:  # type: ignore[attr-defined]
            return
        try:
            self._settle(filepath)
        finally:
            link = _local_link(filepath)
            if link is not None:
                os.remove(link)
            else:
                super().remove_checkpoint(filepath)  # type: ignore[misc]

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> Any:
        """Load a sharded checkpoint into the model and optimizers in place through asyncckpt's `StorageReader`
        (Lightning's own sharded checkpoints too), after every pending save.

        Args:
            checkpoint_path: the checkpoint directory (rank 0's path is used on every rank).
            weights_only: load pickled values with torch's weights-only rules.

        Returns:
            What Lightning's strategy returns from a load: the checkpoint's remaining entries (``meta.pt``'s).
        """
        from pathlib import Path

        from ..format.manifest import MANIFEST_NAME

        path = Path(self.broadcast(checkpoint_path))  # type: ignore[attr-defined]
        self._landed(lambda i, k: True)  # every pending save: the load's collectives must not meet theirs
        for key in _settle_paths(path):
            _landings.wait(key)  # on every rank: rank 0 writes meta.pt last
        if (path / MANIFEST_NAME).is_file() and (path / _META_FILE).is_file():
            return self._load_sharded(path, weights_only)
        return super().load_checkpoint(path, weights_only)  # type: ignore[misc]

    def _dcp_load(self, state: dict[str, Any], path: Any, weights_only: Optional[bool]) -> None:
        import torch.distributed.checkpoint as dcp

        from ..dcp import unwrapped

        with unwrapped():
            dcp.load(state, storage_reader=self._reader(path, weights_only))

    def _reader(self, path: Any, weights_only: Optional[bool]) -> Any:
        from ..dcp import StorageReader

        return StorageReader(path, engine=self._engine(), weights_only=weights_only is not False)

    def wait(self) -> None:
        """Block until every pending sharded save has landed; raise the first failure not reported yet."""
        self._landed(lambda i, k: True)

    def teardown(self) -> None:
        """Wait for every pending save, stop the checkpoint thread, close the engine, then Lightning's teardown;
        raise the first failure not reported yet."""
        try:
            self.wait()
        finally:
            thread, engine, group = self._ckpt_thread, self._ckpt_engine, self._ckpt_group
            self._ckpt_thread = self._ckpt_engine = self._ckpt_group = None
            try:
                if thread is not None:
                    thread.shutdown(wait=True)
                if group is not None:
                    import torch.distributed as dist

                    if dist.is_initialized():
                        dist.destroy_process_group(group)
                if engine is not None:
                    engine.close()
            finally:
                super().teardown()  # type: ignore[misc]


class AsyncModelParallelStrategyMixin(ShardedSavesMixin):
    """Lightning's ``ModelParallelStrategy`` (FSDP2, tensor parallel) saving its distributed checkpoints
    asynchronously through asyncckpt."""

    __doc__ = (__doc__ or "").rstrip() + _SHARDED

    def _saves_sharded(self) -> bool:
        return bool(self._save_distributed_checkpoint)  # type: ignore[attr-defined]

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Lightning's, but not offloaded to the CPU for a sharded save: staging is the one copy off the device.

        Returns:
            The model's state dict (sharded: DTensors).
        """
        if not self._saves_sharded():
            return super().lightning_module_state_dict()  # type: ignore[misc,no-any-return]
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions())  # type: ignore[attr-defined]

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """Lightning's, not offloaded to the CPU for a sharded save (see `lightning_module_state_dict`).

        Args:
            optimizer: the optimizer (or Lightning's wrapper of it).

        Returns:
            Its state dict (sharded state as DTensors).
        """
        if not self._saves_sharded():
            return super().optimizer_state(optimizer)  # type: ignore[misc,no-any-return]
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps it
        return get_optimizer_state_dict(self.model, optimizer, options=StateDictOptions())  # type: ignore[attr-defined]

    def _load_sharded(self, path: Any, weights_only: Optional[bool]) -> dict[str, Any]:
        """Lightning's sharded load (``fabric.strategies.model_parallel._load_checkpoint``), read through
        asyncckpt: the module and every optimizer in one DCP load."""
        import torch
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_optimizer_state_dict)

        module = self.model  # type: ignore[attr-defined]
        optimizers = list(self.optimizers)  # type: ignore[attr-defined]
        state = {self._model_key: get_model_state_dict(module)}
        state.update({f"optimizer_{i}": get_optimizer_state_dict(module, o) for i, o in enumerate(optimizers)})
        self._dcp_load(state, path, weights_only)
        module.load_state_dict(state[self._model_key], strict=self.lightning_module.strict_loading)  # type: ignore
        for i, optimizer in enumerate(optimizers):
            set_optimizer_state_dict(module, optimizer, optim_state_dict=state[f"optimizer_{i}"],
                                     options=StateDictOptions(cpu_offload=True))
        return torch.load(path / _META_FILE, weights_only=weights_only)  # type: ignore[no-any-return]


class AsyncFSDPStrategyMixin(ShardedSavesMixin):
    """Lightning's ``FSDPStrategy`` saving ``state_dict_type="sharded"`` checkpoints asynchronously through
    asyncckpt (``"full"`` ones go through the CheckpointIO as in Lightning: pass ``plugins=[AsyncCheckpointIO()]``
    to make those asynchronous)."""

    __doc__ = (__doc__ or "").rstrip() + _SHARDED
    _model_key = "model"

    def _saves_sharded(self) -> bool:
        return self._state_dict_type == "sharded"  # type: ignore[attr-defined,no-any-return]

    def setup_environment(self) -> None:
        """Lightning's, then (sharded saves, one-dimensional sharding, no mesh or group given) a device mesh over
        all ranks for FSDP: the same sharding, but state dicts of DTensors, which a save stages in one copy
        (FSDP's ShardedTensors cannot be staged: such a save streams and blocks, with a warning)."""
        super().setup_environment()  # type: ignore[misc]
        kwargs = self.kwargs  # type: ignore[attr-defined]
        if (self._saves_sharded() and "device_mesh" not in kwargs and "process_group" not in kwargs
                and self.sharding_strategy.name in ("FULL_SHARD", "SHARD_GRAD_OP")):  # type: ignore[attr-defined]
            from torch.distributed.device_mesh import init_device_mesh

            kwargs["device_mesh"] = init_device_mesh(self.root_device.type,  # type: ignore[attr-defined]
                                                     (self.world_size,))  # type: ignore[attr-defined]

    def _load_sharded(self, path: Any, weights_only: Optional[bool]) -> dict[str, Any]:
        """Lightning's sharded load (``pytorch.strategies.fsdp.FSDPStrategy.load_checkpoint``), read through
        asyncckpt."""
        import torch
        from torch.distributed.checkpoint.optimizer import load_sharded_optimizer_state_dict
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        model = self.model  # type: ignore[attr-defined]
        module = self.lightning_module  # type: ignore[attr-defined]
        fitting = module.trainer.state.fn == self._lightning(".trainer.states").TrainerFn.FITTING
        with self._lightning("fabric.strategies.fsdp")._get_sharded_state_dict_context(model):
            state = {self._model_key: model.state_dict()}
            self._dcp_load(state, path, weights_only)
            model.load_state_dict(state[self._model_key], strict=module.strict_loading)
            if fitting and self.optimizers:  # type: ignore[attr-defined]
                reader = self._reader(path, weights_only)
                for i, optimizer in enumerate(self.optimizers):  # type: ignore[attr-defined]
                    loaded = load_sharded_optimizer_state_dict(model_state_dict=state[self._model_key],
                                                               optimizer_key=f"optimizer_{i}", storage_reader=reader)
                    optimizer.load_state_dict(FSDP.optim_state_dict_to_load(
                        optim_state_dict=loaded[f"optimizer_{i}"], model=model, optim=optimizer))
        return torch.load(path / _META_FILE, weights_only=weights_only)  # type: ignore[no-any-return]


# ---------------------------------------------------------------- native checkpoints outside the Trainer


def is_native_checkpoint(path: Any, storage_options: Optional[dict] = None) -> bool:
    """Whether ``path`` holds a committed checkpoint in the engine's format.

    Args:
        path: a local path or fsspec URL.
        storage_options: fsspec options for a URL.

    Returns:
        True for a committed native (or sharded strategy's) checkpoint; False for a single file or nothing.
    """
    from ..tools.convert import path_kind

    return path_kind(path, storage_options) == "native"


def read_checkpoint(path: Any, *, map_location: Any = "cpu", weights_only: Optional[bool] = None,
                    storage_options: Optional[dict] = None) -> dict[str, Any]:
    """Read a checkpoint written by :class:`NativeCheckpointIO` (checksums verified; pickled values only with
    ``weights_only=False``, as in ``torch.load``), or by a sharded strategy (``AsyncModelParallelStrategy``,
    ``AsyncFSDPStrategy``): its tensors assembled whole and, with its ``meta.pt``, laid out as a Trainer's
    checkpoint (``state_dict``, ``optimizer_states``), as Lightning's ``consolidate_checkpoint`` makes it.

    Args:
        path: the checkpoint directory (local path or fsspec URL).
        map_location: where tensors go, as for ``torch.load``.
        weights_only: load pickled values with torch's weights-only rules (None: on).
        storage_options: fsspec options for a URL.

    Returns:
        The checkpoint dict.

    Raises:
        CheckpointError: ``path`` is not a committed checkpoint, or it is damaged or refused.
    """
    from ..sync_engine import SyncEngine

    with SyncEngine(storage_options=storage_options) as engine:
        checkpoint = engine.load(path, map_location=map_location, weights_only=weights_only)
    url = to_url(path)
    meta = os.path.join(local_path(url), _META_FILE) if is_local(url) else None
    if meta is None or not os.path.isfile(meta):
        return checkpoint
    import torch

    checkpoint.update(torch.load(meta, map_location=map_location, weights_only=weights_only))
    if "state_dict" not in checkpoint and "model" in checkpoint:  # FSDPStrategy's name for it
        checkpoint["state_dict"] = checkpoint.pop("model")
    count = sum(1 for key in checkpoint if re.fullmatch(r"optimizer_[0-9]+", str(key)))
    if count:
        checkpoint["optimizer_states"] = [checkpoint.pop(f"optimizer_{i}") for i in range(count)]
    return checkpoint


def load_from_checkpoint(cls: type, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None,
                         strict: Optional[bool] = None, weights_only: Optional[bool] = None, **kwargs: Any) -> Any:
    """``cls.load_from_checkpoint(...)`` for either format.

    Lightning's own reads single files only; for a native checkpoint this reads it with the engine and then takes
    Lightning's remaining steps (migration, ``hparams_file``, hyper-parameter overrides, ``strict``).

    Args:
        cls: the ``LightningModule`` or ``LightningDataModule`` class.
        checkpoint_path: a single file, a native checkpoint or a sharded strategy's checkpoint.
        map_location: where tensors go, as for ``torch.load``.
        hparams_file: a ``.yaml`` / ``.csv`` file of hyper-parameters, as in Lightning.
        strict: whether the state dict must match the module exactly, as in Lightning.
        weights_only: load pickled values with torch's weights-only rules.
        **kwargs: hyper-parameters that override the saved ones.

    Returns:
        The module (on the device its saved tensors were loaded to) or the data module.

    Raises:
        TypeError: ``cls`` is not a Lightning module or data module.
        ValueError: ``hparams_file`` is neither ``.csv``, ``.yml`` nor ``.yaml``.
    """
    from ..tools.convert import path_kind

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
    """The plugin (a virtual subclass of the other package's wrapping plugin too) or the strategy (of this
    flavour's package only: a strategy runs on its own package's internals) named ``kind``."""
    with _lock:
        if (kind, flavour) not in _built:
            impl: type = _IMPLS[kind]
            if kind in _STRATEGIES:
                strategies = importlib.import_module(_FLAVOURS[flavour][0] + ".strategies")
                base = getattr(strategies, kind[len("Async"):])
            else:
                base = _wrapping(flavour)
            cls = type(kind, (impl, base), {"__module__": module, "__qualname__": kind,
                                            "__doc__": impl.__doc__, "_flavour": flavour})
            for other in _FLAVOURS:
                if kind in _PLUGINS and other != flavour and _installed(other):
                    with contextlib.suppress(ImportError):  # a broken second installation must not break the first
                        _wrapping(other).register(cls)
            _built[kind, flavour] = cls
        return _built[kind, flavour]


_IMPLS: dict[str, type] = {"AsyncCheckpointIO": AsyncCheckpointIOMixin, "NativeCheckpointIO": NativeCheckpointIOMixin,
                           "AsyncFSDPStrategy": AsyncFSDPStrategyMixin,
                           "AsyncModelParallelStrategy": AsyncModelParallelStrategyMixin}


def lazy_classes(module: Any, flavour: Any) -> Any:
    """A module ``__getattr__`` that builds each public class on first access, on ``flavour()``'s package."""
    def __getattr__(name: str) -> type:
        if name not in _IMPLS:
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


__getattr__ = lazy_classes(sys.modules[__name__], _default_flavour)

if TYPE_CHECKING:  # the classes built on first access, as type checkers see them (lightning's hierarchy)
    from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    class AsyncCheckpointIO(AsyncCheckpointIOMixin, _WrappingCheckpointIO): ...

    class NativeCheckpointIO(NativeCheckpointIOMixin, _WrappingCheckpointIO): ...

    class AsyncFSDPStrategy(AsyncFSDPStrategyMixin, FSDPStrategy): ...

    class AsyncModelParallelStrategy(AsyncModelParallelStrategyMixin, ModelParallelStrategy): ...

from . import pl  # noqa: E402  (the same classes on pytorch_lightning's hierarchy)
