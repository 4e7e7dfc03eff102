"""CheckpointManager: retention, best-k, preemption, fallback on damage and incremental saves for custom loops.

Checkpoints live at ``<directory>/step-<step, zero-padded>``; each manifest records the step and the metrics it was
saved with, so a restarted process rebuilds the manager's view from storage alone. Retention runs after a commit,
never before: the checkpoint just committed, any checkpoint still being written (and what it builds on) and
everything a kept incremental checkpoint references are never deleted; deletion is manifest-first, newest first, so
an interrupted retention leaves only checkpoints that load or debris that loads as nothing. "Newest" is the most
recently saved (the manifests' save order), not the highest step: a run that goes on from a lower step keeps its
new checkpoints.
"""

from __future__ import annotations

import logging
import math
import re
import signal
import sys
import threading
from dataclasses import dataclass
from types import FrameType
from typing import Any, Literal, Mapping

import anyio

from .core import EngineCore
from .errors import (CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, IncompleteCheckpointError,
                     InvalidArgumentError, StorageError)
from .format.manifest import Manifest
from .io.paths import is_local, to_url
from .pipeline.handles import SaveHandle

log = logging.getLogger("asyncckpt")

STEP_RE = re.compile(r"^step-([0-9]{6,})$")


@dataclass(frozen=True)
class Entry:
    """A committed checkpoint the manager knows: its step, metrics, the siblings it references and when it was
    saved (``order``: the manifest's save order)."""

    step: int
    name: str
    metrics: Mapping[str, float]
    chain: int
    bases: frozenset[str]
    order: int


def _entry(name: str, manifest: Manifest) -> Entry | None:
    m = STEP_RE.match(name)
    meta = manifest.metadata or {}
    if m is None or meta.get("asyncckpt.step") != int(m.group(1)):
        return None  # not one of ours (a foreign or hand-made directory next to them)
    metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
    return Entry(int(m.group(1)), name, metrics, manifest.chain, frozenset(manifest.bases), manifest.order)


def by_age(entries: Mapping[int, Entry]) -> list[int]:
    """Steps, the least recently saved first: step numbers go backwards when a run restarts from an older
    checkpoint, so they cannot say which checkpoint is newest."""
    return sorted(entries, key=lambda step: (entries[step].order, step))


class Policy:
    """The manager's options (validated) and the retention rule."""

    def __init__(self, keep_last: int | None, keep_best: int | None, best_metric: str | None, best_mode: str,
                 keep_every_steps: int | None, incremental: bool, full_every: int, if_busy: str,
                 trust_versions: bool) -> None:
        for name, value in (("keep_last", keep_last), ("keep_best", keep_best),
                            ("keep_every_steps", keep_every_steps)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise InvalidArgumentError(f"{name} must be a positive integer or None, not {value!r}")
        if keep_best is not None and not best_metric:
            raise InvalidArgumentError("keep_best needs best_metric (the metric's name in save(..., metrics=))")
        if best_mode not in ("min", "max"):
            raise InvalidArgumentError(f"best_mode must be 'min' or 'max', not {best_mode!r}")
        if not isinstance(full_every, int) or full_every < 1:
            raise InvalidArgumentError(f"full_every must be a positive integer, not {full_every!r}")
        if if_busy not in ("wait", "skip"):
            raise InvalidArgumentError(f"if_busy must be 'wait' or 'skip', not {if_busy!r}")
        self.keep_last, self.keep_best, self.best_metric, self.best_mode = keep_last, keep_best, best_metric, best_mode
        self.keep_every_steps, self.incremental, self.full_every = keep_every_steps, incremental, full_every
        self.if_busy, self.trust_versions = if_busy, trust_versions

    def best(self, entries: dict[int, Entry]) -> list[int]:
        """Steps with the metric, best first (ties: the more recently saved first)."""
        scored = [(float(e.metrics[self.best_metric]), e.order, e.step) for e in entries.values()
                  if self.best_metric and isinstance(e.metrics.get(self.best_metric), (int, float))]
        sign = 1 if self.best_mode == "min" else -1
        return [step for _, _, step in sorted(scored, key=lambda x: (sign * x[0], -x[1], -x[2]))]

    def retained(self, entries: dict[int, Entry], protected: set[str]) -> set[int]:
        """Steps to keep: the policy's own choice (``keep_last`` counts the most recently saved, see `by_age`),
        then ``protected`` names (the save just committed, saves in flight and their bases) and everything kept
        references, transitively."""
        recent = by_age(entries)
        keep = set(recent if self.keep_last is None else recent[-self.keep_last:])
        if self.keep_best:
            keep |= set(self.best(entries)[:self.keep_best])
        if self.keep_every_steps:
            keep |= {s for s in entries if s % self.keep_every_steps == 0}
        by_name = {e.name: e.step for e in entries.values()}
        todo = [by_name[n] for n in protected if n in by_name] + list(keep)
        while todo:
            step = todo.pop()
            keep.add(step)
            todo += [by_name[b] for b in entries[step].bases if b in by_name and by_name[b] not in keep]
        return keep


class ManagerCore:
    """State and work shared by both managers; the coroutines run on the engine's runtime."""

    def __init__(self, directory: Any, policy: Policy) -> None:
        self.url = to_url(directory).rstrip("/") or "/"
        self.policy = policy
        self.entries: dict[int, Entry] = {}
        self.manifests: dict[str, Manifest] = {}  # by name, as last read: retention re-reads only new entries
        self.inflight: dict[int, tuple[SaveHandle, str | None]] = {}  # step -> handle, base name
        self.failure: BaseException | None = None
        self.left_alone: set[str] = set()  # paths retention could not remove, warned about once
        self.lock = anyio.Lock()

    def path(self, step: int) -> str:
        name = f"step-{step:06d}"
        return f"{self.url}/{name}" if not is_local(self.url) else f"{self.url.rstrip('/')}/{name}"

    def base_for(self, step: int) -> str | None:
        """The checkpoint an incremental save of ``step`` builds on: the newest committed one (not ``step`` itself,
        which the save replaces), unless its chain of incremental saves is already ``full_every`` long (then this
        save is full)."""
        if not self.policy.incremental:
            return None
        others = by_age({s: e for s, e in self.entries.items() if s != step})
        if not others:
            return None
        newest = self.entries[others[-1]]
        return None if newest.chain >= self.policy.full_every else self.path(newest.step)

    async def rebuild(self, core: EngineCore, fresh: str | None = None) -> None:
        """*(loop)* Read the committed checkpoints under the directory (a restarted process sees the same view).

        After the first call only entries not seen before, and ``fresh`` (the name just saved), are read again: one
        manager owns its directory, so what it read stays true until it saves or removes."""
        target = await core.open_target(self.url, None)
        known = {name: m for name, m in self.manifests.items() if name != fresh}
        found = await core.committed(target, known)
        self.entries, self.manifests = {}, {}
        for path, manifest in found:
            name = target.storage.split(path.rstrip("/"))[1]
            self.manifests[name] = manifest
            entry = _entry(name, manifest)
            if entry is not None:
                self.entries[entry.step] = entry

    async def after_commit(self, core: EngineCore, step: int, handle: SaveHandle) -> None:
        """*(loop)* Once the save of ``step`` has finished: add it to the view and apply retention."""
        await handle.settled()
        async with self.lock:
            self.inflight.pop(step, None)
            if handle.error is not None:
                return
            try:
                await self.retain(core, self.path(step).rsplit("/", 1)[1])
            except Exception as exc:  # kept for the next call on the manager; saving goes on
                log.error("retention under %s failed: %s", self.url, exc)
                self.failure = exc

    async def retain(self, core: EngineCore, fresh: str) -> None:
        await self.rebuild(core, fresh)
        protected = {fresh} | {self.path(s).rsplit("/", 1)[1] for s in self.inflight}
        protected |= {base.rsplit("/", 1)[1] for _, base in self.inflight.values() if base}
        keep = self.policy.retained(self.entries, protected)
        for step in reversed(by_age(self.entries)):  # children (always saved later) before what they build on
            if step in keep:
                continue
            self.manifests.pop(self.entries.pop(step).name, None)  # half-removed, it must be read again
            if await self.remove(core, step):
                log.info("removed %s (retention)", self.path(step))
        await self.sweep_incomplete(core, protected)

    async def remove(self, core: EngineCore, step: int) -> bool:
        """Remove what is at ``step``'s path; False when the engine refused because something there is not a
        checkpoint's (a file of the user's, a stray entry with a step's name, a reference from outside the manager):
        then it stays, warned about once, and retention goes on — a refusal must not fail this save and every later
        one. A failing store still fails retention."""
        path = self.path(step)
        try:
            await core.remove(await core.open_target(path, None))
        except StorageError:
            raise
        except CheckpointError as exc:
            if path not in self.left_alone:
                self.left_alone.add(path)
                log.warning("retention cannot remove %s (%s): it stays and saving goes on; move the files that "
                            "are yours out of it, or remove it by hand", path, exc)
            return False
        return True

    async def sweep_incomplete(self, core: EngineCore, protected: set[str]) -> None:
        """Remove step directories older than the newest checkpoint that hold no manifest: what a save or a
        removal killed half-way left (removal goes manifest first). One manager owns its directory, so none of them
        can still be being written; files that are not a checkpoint's stay."""
        if not self.entries:
            return
        newest = max(self.entries)
        target = await core.open_target(self.url, None)
        for name in await target.storage.list(target.path):
            m = STEP_RE.match(name)
            if m is None or name in self.manifests or name in protected or int(m.group(1)) >= newest:
                continue
            path = self.path(int(m.group(1)))
            if not path.endswith("/" + name):  # not a name this manager writes (another zero-padding)
                continue
            if await self.remove(core, int(m.group(1))):
                log.warning("removed %s: an incomplete checkpoint, left by a save or a removal that was interrupted",
                            path)

    async def restore_order(self, core: EngineCore) -> list[int]:
        """*(loop)* The steps to try restoring, most recently saved first, as the directory lists now: a checkpoint
        removed by hand since the last listing is not tried (its load would fail as no checkpoint at all)."""
        async with self.lock:
            await self.rebuild(core)
        return by_age(self.entries)[::-1]

    async def drain(self) -> None:
        """*(loop)* Wait until every save in flight and its retention have finished."""
        for handle, _ in list(self.inflight.values()):
            await handle.settled()
        async with self.lock:
            pass

    def raise_failure(self) -> None:
        failure, self.failure = self.failure, None
        if failure is not None:
            raise failure


class Preemption:
    """SIGTERM sets a flag instead of ending the process (main thread only). One handler serves every open manager,
    so they may close in any order: the handler it replaced comes back when the last one closes (if nobody replaced
    it meanwhile)."""

    active: list[Preemption] = []  # those of the managers open now
    previous: Any = None  # the handler before ours

    def __init__(self) -> None:
        self.preempted = False

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) is not _on_term:
                Preemption.previous = signal.signal(signal.SIGTERM, _on_term)
            Preemption.active.append(self)

    def uninstall(self) -> None:
        if self in Preemption.active:
            Preemption.active.remove(self)
            if not Preemption.active and signal.getsignal(signal.SIGTERM) is _on_term:
                signal.signal(signal.SIGTERM, Preemption.previous)


def _on_term(signum: int, frame: FrameType | None) -> None:
    if any(not p.preempted for p in Preemption.active):
        log.warning("SIGTERM received: the manager is marked preempted; save and exit")
    for p in Preemption.active:
        p.preempted = True


class ManagerBase:
    """Options shared by `CheckpointManager` and `SyncCheckpointManager`.

    Args:
        directory: a directory or fsspec URL; checkpoints live at ``directory/step-<zero-padded step>``.
        keep_last: keep the most recently saved this many (None: keep all).
        keep_best: also keep the best this many by ``best_metric`` (None: none kept for their metric).
        best_metric: the name of the metric in ``save(..., metrics=)`` that ranks checkpoints for ``keep_best``
            and `best_step`.
        best_mode: ``"min"`` (lower is better, as for a loss) or ``"max"``.
        keep_every_steps: also keep every checkpoint whose step is a multiple of this.
        incremental: tensors unchanged since the previous checkpoint reference its bytes instead of being written.
        full_every: at most this many incremental saves in a row; then a full one.
        if_busy: ``save`` while the previous save is still being written: ``"wait"`` for it, or ``"skip"`` (return
            None, logged once).
        trust_versions: with ``incremental``, skip hashing tensors whose storage and ``_version`` did not change
            (frozen weights); see `CheckpointEngine.save`.
        engine: an engine to share (not closed by the manager); otherwise one is made from ``engine_options``.
            A `CheckpointManager` takes a `CheckpointEngine`, a
            `SyncCheckpointManager` a `SyncEngine`.
        **engine_options: the options of the engine the manager makes (see `EngineOptions`).

    Retention runs after each commit: what the rules above do not keep is deleted, except the checkpoint just
    committed, saves still being written and whatever a kept incremental checkpoint references. Newest means most
    recently saved, not highest step. What retention cannot remove because it holds files that are not a
    checkpoint's stays, with a warning once; saving goes on.

    Raises:
        InvalidArgumentError: an option is out of range (a count below 1, an unknown ``best_mode`` or
            ``if_busy``, ``keep_best`` without ``best_metric``), or both ``engine`` and ``engine_options`` are given.
    """

    def __init__(self, directory: Any, *, keep_last: int | None = 3, keep_best: int | None = None,
                 best_metric: str | None = None, best_mode: Literal["min", "max"] = "min",
                 keep_every_steps: int | None = None, incremental: bool = False, full_every: int = 10,
                 if_busy: Literal["wait", "skip"] = "wait", trust_versions: bool = False, engine: Any = None,
                 **engine_options: Any) -> None:
        if engine is not None and engine_options:
            raise InvalidArgumentError("pass either an engine or engine options, not both")
        policy = Policy(keep_last, keep_best, best_metric, best_mode, keep_every_steps, incremental, full_every,
                        if_busy, trust_versions)
        self.state = ManagerCore(directory, policy)
        self._engine, self._owns_engine, self._engine_options = engine, engine is None, engine_options
        self._open = False  # entered and not yet left: the view of the directory is built, SIGTERM is caught
        self._preemption = Preemption()
        self._skipped_logged = False

    def _running(self) -> Any:
        """The engine, once the manager is entered (its view of the directory is built only then)."""
        if not self._open:
            face = "with SyncCheckpointManager(...)" if isinstance(self, SyncCheckpointManager) else \
                "async with CheckpointManager(...)"
            raise CheckpointError(f"the checkpoint manager of {self.state.url} is not open: use it as `{face} as "
                                  "manager:`")
        return self._engine

    @property
    def preempted(self) -> bool:
        """True once a SIGTERM arrived: save one last time and leave the loop (pending saves finish on exit)."""
        return self._preemption.preempted

    def steps(self) -> list[int]:
        """The steps of the committed checkpoints the manager knows: those found on entry and by the retention
        that runs after each commit (a save joins them once its retention has run; ``wait()`` waits for that).

        Returns:
            Those steps, ascending.
        """
        return sorted(self.state.entries)

    def latest_step(self) -> int | None:
        """The step of the most recently saved committed checkpoint the manager knows (see `steps`): not always the
        highest, when a run went on from a lower step.

        Returns:
            That step, or None when there is none.
        """
        recent = by_age(self.state.entries)
        return recent[-1] if recent else None

    def best_step(self) -> int | None:
        """The committed step with the best ``metrics[best_metric]`` (per ``best_mode``; a tie goes to the more
        recently saved), among those of `steps`.

        Returns:
            That step, or None without a ``best_metric`` or when no checkpoint recorded it.
        """
        best = self.state.policy.best(self.state.entries)
        return best[0] if best else None

    def _check_step(self, step: int) -> None:
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise InvalidArgumentError(f"step must be a non-negative integer, not {step!r}")

    def _busy(self) -> bool:
        busy = any(not h.done() for h, _ in self.state.inflight.values())
        if busy and self.state.policy.if_busy == "skip" and not self._skipped_logged:
            log.warning("a save under %s is still being written: skipping saves until it is done (if_busy='skip')",
                        self.state.url)
            self._skipped_logged = True
        return busy

    @staticmethod
    def _metadata(step: int, metrics: Mapping[str, float] | None) -> dict[str, Any]:
        """The manifest's metadata. A non-finite number (a diverged loss) has no JSON form: it is recorded as its
        name (``"nan"``, ``"inf"``, ``"-inf"``) and so never ranks for ``keep_best``, instead of failing the save
        that may be the run's last."""
        return {"asyncckpt.step": step,
                "metrics": {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
                            for k, v in (metrics or {}).items()}}

    @staticmethod
    def _put_back(state: Any, rest: Any) -> None:
        """Plain values of a dict state (a step counter, a config) that cannot change in place are replaced."""
        if isinstance(state, dict) and isinstance(rest, Mapping):
            for key, value in rest.items():
                if key in state:
                    state[key] = value


def _damaged(step: int, path: str, exc: BaseException) -> None:
    log.warning("checkpoint of step %d (%s) cannot be restored, trying the next newest: %s", step, path, exc)


RESTORE_ERRORS = (CorruptCheckpointError, IncompleteCheckpointError, CheckpointNotFoundError)


class CheckpointManager(ManagerBase):
    """The asyncio (and trio) manager: ``async with CheckpointManager(dir) as manager`` (see `ManagerBase`).

    Entering it starts its engine (unless given one), reads the committed checkpoints under ``directory`` and
    catches SIGTERM (see `preempted`); leaving it waits for every save and its retention.

    Example:
        ```python
        async with asyncckpt.CheckpointManager("ckpts", keep_last=2) as manager:
            start = await manager.restore(state) or 0
            for step in range(start + 1, 1001):
                train_step(state)
                if step % 100 == 0 or manager.preempted:
                    await manager.save(step, state, metrics={"loss": loss})
                if manager.preempted:
                    break
        ```
    """

    async def __aenter__(self) -> "CheckpointManager":
        from .engine import CheckpointEngine

        if self._engine is None:
            self._engine = CheckpointEngine(**self._engine_options)
            await self._engine.__aenter__()
        core = self._engine.core
        try:
            await core.runtime.call_async(self.state.rebuild, core)
        except BaseException:  # the directory cannot be read: the engine made for it goes
            if self._owns_engine:
                engine, self._engine = self._engine, None
                await engine.__aexit__(*sys.exc_info())
            raise
        self._preemption.install()
        self._open = True
        return self

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self.wait()
        finally:
            self._open = False
            self._preemption.uninstall()
            if self._owns_engine:
                await self._engine.__aexit__(*exc)

    async def save(self, step: int, state: Any, metrics: Mapping[str, float] | None = None) -> SaveHandle | None:
        """Snapshot ``state`` as ``step`` and write it in the background; returns after the snapshot.

        Args:
            step: the training step, a non-negative integer: the checkpoint goes to ``directory/step-<step>``
                (zero-padded to 6 digits) and a later save of the same step replaces it.
            state: what to save, as for the engine's ``save``.
            metrics: numbers recorded in the manifest with the step; ``keep_best`` ranks checkpoints by
                ``metrics[best_metric]``. A NaN or infinite one is recorded as ``"nan"``, ``"inf"`` or ``"-inf"``
                and never ranks.

        Returns:
            The save's handle (``await handle`` waits for the commit; retention runs after it), or None when the
                save was skipped (``if_busy="skip"`` and the previous save is still being written).

        Raises:
            InvalidArgumentError: ``step`` is not a non-negative integer.
            CheckpointError: the state cannot be saved, an earlier save or its retention failed and nobody has
                seen the error yet (that error is raised), or the engine is not running.
        """
        self._check_step(step)
        self.state.raise_failure()
        engine = self._running()
        core = engine.core
        if self._busy() and self.state.policy.if_busy == "skip":
            return None
        await core.runtime.call_async(self.state.drain)  # the previous save is in the view: it may be our base
        base = self.state.base_for(step)
        policy = self.state.policy
        handle = await engine.save(state, self.state.path(step), base=base, digests=policy.incremental,
                                         trust_versions=policy.trust_versions, metadata=self._metadata(step, metrics))
        self.state.inflight[step] = (handle, base)
        core.runtime.start(self.state.after_commit, core, step, handle)
        return handle

    async def wait(self) -> None:
        """Wait until every save and its retention have finished; raise the first failure nobody has seen.

        Raises:
            CheckpointError: the first save or retention failure nobody has seen (raised once).
        """
        engine = self._running()
        await engine.core.runtime.call_async(self.state.drain)
        await engine.wait()
        self.state.raise_failure()

    async def restore(self, state: Any) -> int | None:
        """Restore the newest checkpoint that loads and verifies into ``state`` in place, after pending saves.

        Checkpoints are tried most recently saved first, as the directory lists now (one removed by hand is not
        tried); one that is damaged or was never committed is logged and skipped. The load is not strict (keys the
        state lacks or the checkpoint lacks are logged); plain values of a dict state (a step counter, a config)
        are replaced by the saved ones.

        Args:
            state: the state to restore in place: tensors, modules, optimizers and dicts of them.

        Returns:
            The step restored, or None when no checkpoint could be restored (there is none, or all are damaged).

        Raises:
            NewerFormatError: a newer asyncckpt wrote the checkpoint tried (it is not skipped: upgrade to load it).
            CheckpointError: a pending save or its retention failed and nobody has seen the error yet; a
                checkpoint that cannot be applied to ``state`` (shapes or dtypes differ, a pickled value needs
                ``weights_only=False``), a store error, or the engine is not running.
        """
        await self.wait()
        engine = self._running()
        for step in await engine.core.runtime.call_async(self.state.restore_order, engine.core):
            try:
                self._put_back(state, await engine.load(self.state.path(step), state=state, strict=False))
                return step
            except RESTORE_ERRORS as exc:
                _damaged(step, self.state.path(step), exc)
        return None


class SyncCheckpointManager(ManagerBase):
    """The threaded manager: ``with SyncCheckpointManager(dir) as manager`` (see `ManagerBase`).

    Entering it starts its engine (unless given one), reads the committed checkpoints under ``directory`` and
    catches SIGTERM (see `preempted`); leaving it waits for every save and its retention.

    Example:
        ```python
        with asyncckpt.SyncCheckpointManager("ckpts", keep_last=2) as manager:
            start = manager.restore(state) or 0
            for step in range(start + 1, 1001):
                train_step(state)
                if step % 100 == 0 or manager.preempted:
                    manager.save(step, state, metrics={"loss": loss})
                if manager.preempted:
                    break
        ```
    """

    def __enter__(self) -> "SyncCheckpointManager":
        from .sync_engine import SyncEngine

        if self._engine is None:
            self._engine = SyncEngine(**self._engine_options)
        core = self._engine.core
        try:
            core.runtime.call(self.state.rebuild, core)
        except BaseException:  # the directory cannot be read: the engine made for it goes
            if self._owns_engine:
                engine, self._engine = self._engine, None
                engine.close()
            raise
        self._preemption.install()
        self._open = True
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.wait()
        finally:
            self._open = False
            self._preemption.uninstall()
            if self._owns_engine:
                self._engine.close()

    def save(self, step: int, state: Any, metrics: Mapping[str, float] | None = None) -> SaveHandle | None:
        """Snapshot ``state`` as ``step`` on this thread and write it in the background; returns after the snapshot.

        Args:
            step: the training step, a non-negative integer: the checkpoint goes to ``directory/step-<step>``
                (zero-padded to 6 digits) and a later save of the same step replaces it.
            state: what to save, as for the engine's ``save``.
            metrics: numbers recorded in the manifest with the step; ``keep_best`` ranks checkpoints by
                ``metrics[best_metric]``. A NaN or infinite one is recorded as ``"nan"``, ``"inf"`` or ``"-inf"``
                and never ranks.

        Returns:
            The save's handle (``handle.result()`` waits for the commit; retention runs after it), or None when the
                save was skipped (``if_busy="skip"`` and the previous save is still being written).

        Raises:
            InvalidArgumentError: ``step`` is not a non-negative integer.
            CheckpointError: the state cannot be saved, an earlier save or its retention failed and nobody has
                seen the error yet (that error is raised), or the engine is not running.
        """
        self._check_step(step)
        self.state.raise_failure()
        engine = self._running()
        core = engine.core
        if self._busy() and self.state.policy.if_busy == "skip":
            return None
        core.runtime.call(self.state.drain)  # the previous save is in the view: it may be our base
        base = self.state.base_for(step)
        policy = self.state.policy
        handle = engine.save(state, self.state.path(step), base=base, digests=policy.incremental,
                                   trust_versions=policy.trust_versions, metadata=self._metadata(step, metrics))
        self.state.inflight[step] = (handle, base)
        core.runtime.start(self.state.after_commit, core, step, handle)
        return handle

    def wait(self) -> None:
        """Block until every save and its retention have finished; raise the first failure nobody has seen.

        Raises:
            CheckpointError: the first save or retention failure nobody has seen (raised once).
        """
        engine = self._running()
        engine.core.runtime.call(self.state.drain)
        engine.wait()
        self.state.raise_failure()

    def restore(self, state: Any) -> int | None:
        """Restore the newest checkpoint that loads and verifies into ``state`` in place, after pending saves.

        Checkpoints are tried most recently saved first, as the directory lists now (one removed by hand is not
        tried); one that is damaged or was never committed is logged and skipped. The load is not strict (keys the
        state lacks or the checkpoint lacks are logged); plain values of a dict state (a step counter, a config)
        are replaced by the saved ones.

        Args:
            state: the state to restore in place: tensors, modules, optimizers and dicts of them.

        Returns:
            The step restored, or None when no checkpoint could be restored (there is none, or all are damaged).

        Raises:
            NewerFormatError: a newer asyncckpt wrote the checkpoint tried (it is not skipped: upgrade to load it).
            CheckpointError: a pending save or its retention failed and nobody has seen the error yet; a
                checkpoint that cannot be applied to ``state`` (shapes or dtypes differ, a pickled value needs
                ``weights_only=False``), a store error, or the engine is not running.
        """
        self.wait()
        engine = self._running()
        for step in engine.core.runtime.call(self.state.restore_order, engine.core):
            try:
                self._put_back(state, engine.load(self.state.path(step), state=state, strict=False))
                return step
            except RESTORE_ERRORS as exc:
                _damaged(step, self.state.path(step), exc)
        return None


__all__ = ["CheckpointManager", "SyncCheckpointManager"]
