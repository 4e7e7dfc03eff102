"""Crash consistency: SIGKILL a saving process at random and at chosen moments, then check what is on disk.

The writer (tests/crash_writer.py) saves ``steps/step-N`` and the fixed path ``last`` over and over, logging each
commit to an fsync'd side log after ``await handle``.  After every kill the test checks:

* every checkpoint the log says is committed loads and matches the state of its step bit for bit;
* a step directory the log does not know is the one in flight: it either does not load as a whole
  (IncompleteCheckpointError, or CheckpointError while it is still empty) or it committed just before the kill
  and loads exactly; nothing ever loads corrupt or mixed;
* ``asyncckpt.latest(steps)`` is the newest checkpoint that loads: the highest logged step, or the next one when
  it committed right before the kill and is not yet logged (the race is checked, then the step is adopted);
* ``last`` loads exactly the previous or the new step's values, never a mix, and never goes back in time;
* leftovers of a killed save are ignored by loads and ``latest`` and are gone after the next save of that path
  commits; a logged checkpoint holds exactly its manifest and its shards.

Kills land in every phase of a save (snapshot, shard create/write/fsync, manifest write, before and after the
rename, dir fsync, sweep, remove, after the commit before the log): two out of three trials pause the writer at a
chosen occurrence of a phase and kill it there, the third kills after a random delay.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import crash_writer  # noqa: E402
from crash_writer import PHASES, make_state, fingerprint, read_page, step_name  # noqa: E402

from .helpers import LineServer  # noqa: E402
from faultfs import same  # noqa: E402

import asyncckpt  # noqa: E402
from asyncckpt import CheckpointError, CorruptCheckpointError, IncompleteCheckpointError  # noqa: E402
from asyncckpt.format.manifest import MANIFEST_NAME  # noqa: E402

REPO = HERE.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
TARGETS = ["S", "O", "W", "F", "P", "R", "r", "D", "X", "U", "C", "G"]  # phases a targeted trial stops in
STATE_CACHE: dict[int, Any] = {}


def expected(step: int) -> Any:
    if step not in STATE_CACHE:
        STATE_CACHE[step] = make_state(step)
    return STATE_CACHE[step]


class ForkServer(LineServer):
    """The writer's fork server: one ``import torch`` for all trials."""

    def __init__(self) -> None:
        super().__init__(HERE / "crash_writer.py", ["serve"], REPO, ENV)


@pytest.fixture(scope="module")
def server():
    srv = ForkServer()
    yield srv
    srv.close()


class Ledger:
    """What the side log (plus what the test has verified itself) says must be on disk."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root, self.log = root, log
        self.steps_dir, self.last = root / "steps", root / "last"
        self.consumed = 0
        self.committed: set[int] = set()  # logged (or adopted) and not being removed
        self.adopted: set[int] = set()  # committed before the kill but never logged: no sweep is known to have run
        self.removing: set[int] = set()
        self.removed: set[int] = set()
        self.top = -1  # highest step known to have committed
        self.last_value: int | None = None  # newest value `last` is known to hold
        self.last_leftovers: set[str] = set()
        self.final_line = ""
        self.stats: Counter = Counter()

    def read_log(self) -> bool:
        """Consume new log lines; True when a save of `last` was logged among them."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        new, self.consumed = lines[self.consumed:], len(lines)
        last_logged = False
        for line in new:
            kind, n, *rest = line.split()
            step = int(n)
            if kind in ("step", "last"):
                assert rest[0] == fingerprint(expected(step)), f"writer and test disagree on the state of {step}"
            if kind == "step":
                self.committed.add(step)
                self.top = max(self.top, step)
            elif kind == "last":
                self.last_value = max(step, self.last_value if self.last_value is not None else -1)
                last_logged = True
            elif kind == "rm":
                self.committed.discard(step)
                self.removing.add(step)
            elif kind == "rmdone":
                self.removing.discard(step)
                self.removed.add(step)
            self.stats["log lines"] += 1
        if lines:
            self.final_line = lines[-1]
        return last_logged


def listing(path: Path) -> set[str]:
    return set(os.listdir(path)) if path.is_dir() else set()


def referenced(path: Path) -> set[str]:
    doc = json.loads((path / MANIFEST_NAME).read_bytes())
    return {MANIFEST_NAME, *(s["file"] for s in doc["shards"])}


async def verify(ledger: Ledger, where: str) -> None:
    last_logged = ledger.read_log()
    async with asyncckpt.CheckpointEngine() as engine:

        async def outcome(path: Path) -> Any:
            try:
                return await engine.load(str(path))
            except IncompleteCheckpointError as exc:
                ledger.stats["incomplete loads refused"] += 1
                return exc
            except CorruptCheckpointError as exc:
                raise AssertionError(f"{where}: {path.name} is corrupt: {exc}") from exc
            except CheckpointError as exc:  # e.g. the directory exists but nothing was written yet
                ledger.stats["empty dirs refused"] += 1
                return exc

        assert listing(ledger.root) <= {"steps", "last"}, f"{where}: stray entries {listing(ledger.root)}"
        whole: dict[int, Path] = {}
        for name in sorted(listing(ledger.steps_dir)):
            assert name.startswith("step-"), f"{where}: stray entry {name} in steps/"
            step, path = int(name.split("-")[1]), ledger.steps_dir / name
            got = await outcome(path)
            if step in ledger.committed:
                assert not isinstance(got, Exception), f"{where}: logged step {step} does not load: {got}"
                assert same(got, expected(step)), f"{where}: logged step {step} loads different values"
                if step not in ledger.adopted:  # the log line proves its sweep finished
                    assert listing(path) == referenced(path), f"{where}: leftovers in committed {name}: {listing(path)}"
                ledger.stats["committed checkpoints verified"] += 1
            elif step in ledger.removing:
                assert isinstance(got, Exception) or same(got, expected(step)), f"{where}: half-removed {name} loads wrong"
            elif step in ledger.removed:
                raise AssertionError(f"{where}: removed {name} is back")
            else:
                assert step == ledger.top + 1, f"{where}: unexpected {name} (newest known step {ledger.top})"
                if not isinstance(got, Exception):
                    assert same(got, expected(step)), f"{where}: in-flight {name} loads but with other values"
                else:
                    ledger.stats["uncommitted dirs seen"] += 1
            if not isinstance(got, Exception):
                whole[step] = path

        newest = asyncckpt.latest(str(ledger.steps_dir))
        if whole:
            best = max(whole)
            assert newest is not None and Path(newest).name == step_name(best), \
                f"{where}: latest() = {newest}, newest whole checkpoint is {step_name(best)}"
            assert best in (ledger.top, ledger.top + 1), f"{where}: newest is {best}, log says {ledger.top}"
            if best == ledger.top + 1:  # committed right before the kill, not yet logged: adopt it
                ledger.committed.add(best)
                ledger.adopted.add(best)
                ledger.top = best
                ledger.stats["commits found before their log line"] += 1
        else:
            assert newest is None, f"{where}: latest() = {newest} but nothing loads"

        # the fixed path: previous or new values, never a mix, never older than what it held before
        allowed = set() if ledger.last_value is None else {ledger.last_value}
        if ledger.top >= 0 and (ledger.last_value is None or ledger.top > ledger.last_value):
            allowed.add(ledger.top)
        got = await outcome(ledger.last)
        if isinstance(got, Exception):
            assert ledger.last_value is None, f"{where}: last does not load ({got}) though it held {ledger.last_value}"
        else:
            match = [v for v in sorted(allowed) if same(got, expected(v))]
            assert match, f"{where}: last holds none of the allowed steps {sorted(allowed)}"
            if match[-1] != ledger.last_value:
                ledger.stats["last: new value committed before its log line"] += ledger.last_value is not None
            ledger.last_value = match[-1]
        files = listing(ledger.last)
        if last_logged:
            stale = ledger.last_leftovers & files
            assert not stale, f"{where}: leftovers of an earlier killed save survive a commit: {sorted(stale)}"
        leftovers = files - referenced(ledger.last) if (ledger.last / MANIFEST_NAME).exists() else files
        if leftovers:
            ledger.stats["trials leaving leftovers in last"] += 1
            assert ledger.final_line.startswith("step"), \
                f"{where}: leftovers in last outside a save of it ({ledger.final_line!r}): {sorted(leftovers)}"
        ledger.last_leftovers = leftovers


def trial_config(rng: random.Random, ledger: Ledger, tmp: Path, trial: int) -> dict[str, Any]:
    phase = tmp / f"phase-{trial}"
    phase.write_bytes(bytes(crash_writer.PAGE))
    return {
        "cmd": "run", "root": str(ledger.root), "log": str(ledger.log), "phase": str(phase),
        "stderr": str(tmp / "writer-stderr.txt"), "seed": rng.randrange(1 << 30),
        "chunk_bytes": 4096 * rng.randint(1, 4), "shard_bytes": rng.choice([32 << 10, 64 << 10, 160 << 10]),
        "write_concurrency": rng.choice([1, 2, 4, 8]), "budget": rng.choice([64 << 10, 256 << 10, 8 << 20]),
        "jitter": rng.choice([0.0, 0.001, 0.003]),
    }


def run_trials(server: ForkServer, tmp: Path, trials: int, seed: int, fresh_process_trials: int = 0) -> Counter:
    rng = random.Random(seed)
    ledger = Ledger(tmp / "ckpts", tmp / "log.txt")
    landed: Counter = Counter()
    per_iteration: dict[str, float] = {}
    targeted_trials = 0
    for trial in range(trials + fresh_process_trials):
        t0 = time.monotonic()
        cfg = trial_config(rng, ledger, tmp, trial)
        fresh = trial >= trials
        targeted = trial % 3 != 2 and bool(per_iteration) and not fresh
        if targeted:
            code = TARGETS[targeted_trials % len(TARGETS)]
            targeted_trials += 1
            cfg["pause"] = [code, rng.randint(1, max(1, int(2 * per_iteration.get(code, 1))))]
        if fresh:
            proc = subprocess.Popen([sys.executable, str(HERE / "crash_writer.py"), "once", json.dumps(cfg)],
                                    cwd=REPO, env=ENV)
            pid = proc.pid
            deadline = time.monotonic() + 60  # the interpreter's start and `import torch` come first
            while not read_page(cfg["phase"])[2] and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.4))
        else:
            pid = server.call(**cfg)["pid"]
            if targeted:
                deadline = time.monotonic() + 20
                while not read_page(cfg["phase"])[1] and time.monotonic() < deadline:
                    time.sleep(0.002)
            else:
                time.sleep(rng.uniform(0.01, 0.6) if per_iteration else 1.0)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        status = proc.wait() if fresh else server.call(cmd="wait", pid=pid)["status"]
        if fresh:
            killed = status == -signal.SIGKILL
        else:
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        err = Path(cfg["stderr"])
        assert killed, f"writer exited on its own ({status}): {err.read_text()[-3000:] if err.exists() else ''}"
        phase, paused, counts = read_page(cfg["phase"])
        if targeted:
            assert paused, f"trial {trial}: the writer never reached phase {cfg['pause']} (counts {counts})"
        if not per_iteration and counts.get("C"):
            per_iteration = {k: v / (counts["C"] / 2) for k, v in counts.items()}
        landed[PHASES[phase]] += 1
        t1 = time.monotonic()
        anyio.run(verify, ledger, f"trial {trial} (killed in {PHASES[phase]!r}, config {cfg})")
        if os.environ.get("CRASH_DEBUG"):
            print(f"trial {trial}: {cfg.get('pause')} landed {phase} run {t1 - t0:.2f}s verify "
                  f"{time.monotonic() - t1:.2f}s")
    ledger.stats.update({f"killed in: {k}": v for k, v in landed.items()})
    ledger.stats["kills"] = trials + fresh_process_trials
    ledger.stats["steps committed"] = ledger.top + 1
    return ledger.stats


def report(stats: Counter) -> None:
    print("\ncrash trials:", json.dumps(dict(sorted(stats.items())), indent=1))


def test_sigkill_at_random_and_chosen_moments(server: ForkServer, tmp_path: Path) -> None:
    stats = run_trials(server, tmp_path, trials=30, seed=20240611, fresh_process_trials=1)
    report(stats)
    assert stats["commits found before their log line"] + stats["uncommitted dirs seen"] > 0
    assert stats["steps committed"] > 10


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_sigkill_soak(server: ForkServer, tmp_path: Path) -> None:
    stats = run_trials(server, tmp_path, trials=400, seed=int(os.environ.get("ASYNCCKPT_SOAK_SEED", "7")),
                       fresh_process_trials=3)
    report(stats)


# ---------------------------------------------------------------- what a killed save leaves, deterministically

def manager_trials(server: ForkServer, tmp: Path, trials: int, seed: int) -> Counter:
    """SIGKILL an incremental CheckpointManager (keep_last=2, keep_every_steps=5, full_every=3) at random moments
    and at chosen storage phases; after every kill each checkpoint with a manifest loads — its references resolve —
    and holds exactly its step's state, and the newest logged step is still there."""
    rng = random.Random(seed)
    root, log = tmp / "managed", tmp / "mlog.txt"
    stats: Counter = Counter()
    newest = 0
    for trial in range(trials):
        phase = tmp / f"mphase-{trial}"
        phase.write_bytes(bytes(crash_writer.PAGE))
        cfg: dict[str, Any] = {
            "cmd": "run", "mode": "manager", "root": str(root), "log": str(log), "phase": str(phase),
            "stderr": str(tmp / "mwriter-stderr.txt"), "seed": rng.randrange(1 << 30),
            "chunk_bytes": 4096 * rng.randint(1, 4), "shard_bytes": rng.choice([32 << 10, 160 << 10]),
            "budget": rng.choice([256 << 10, 8 << 20]), "jitter": rng.choice([0.0, 0.002])}
        if trial % 2:
            cfg["pause"] = [rng.choice(["W", "P", "R", "r", "X", "U", "C"]), rng.randint(1, 6)]
        pid = server.call(**cfg)["pid"]
        deadline = time.monotonic() + (20 if "pause" in cfg else rng.uniform(0.05, 0.8))
        while time.monotonic() < deadline and not ("pause" in cfg and read_page(str(phase))[1]):
            time.sleep(0.002)
        os.kill(pid, signal.SIGKILL)
        status = server.call(cmd="wait", pid=pid)["status"]
        assert os.WIFSIGNALED(status), Path(cfg["stderr"]).read_text()[-3000:]
        stats[f"killed in: {PHASES[read_page(str(phase))[0]]}"] += 1
        logged = [int(line.split()[1]) for line in log.read_text().splitlines()] if log.exists() else []
        newest = max(logged, default=newest)
        found = {}
        with asyncckpt.SyncEngine() as engine:
            for path in sorted(root.glob("step-*")):
                if (path / MANIFEST_NAME).exists():
                    got = engine.load(path)
                    assert same(got, crash_writer.manager_state(int(path.name[5:]))), f"trial {trial}: {path}"
                    found[int(path.name[5:])] = path
                    stats["checkpoints verified"] += 1
                    refs = [s for s in json.loads((path / MANIFEST_NAME).read_text())["shards"] if s.get("in")]
                    stats["references followed"] += len(refs)
        if newest:
            assert newest in found or newest + 1 in found, f"trial {trial}: the newest logged step {newest} is gone"
    # restarted once more after the last kill, one more save: what is kept is exactly what the policy says of every
    # step ever committed (a killed step is saved again by the next process, so steps 1..last all were)
    with asyncckpt.SyncCheckpointManager(root, keep_last=2, keep_every_steps=5, incremental=True,
                                         full_every=3) as manager:
        last = (manager.latest_step() or 0) + 1
        manager.save(last, crash_writer.manager_state(last)).result()
        manager.wait()
        expected = {s for s in range(1, last + 1) if s % 5 == 0} | {last - 1, last}
        todo = list(expected)
        while todo:  # and whatever a kept incremental checkpoint references, transitively
            doc = json.loads((root / f"step-{todo.pop():06d}" / MANIFEST_NAME).read_text())
            for ref in {int(sh["in"][5:]) for sh in doc["shards"] if sh.get("in")} - expected:
                expected.add(ref)
                todo.append(ref)
        assert set(manager.steps()) == expected, (sorted(manager.steps()), sorted(expected))
    on_disk = {int(p.name[5:]) for p in root.glob("step-*")}
    assert on_disk == expected, (sorted(on_disk - expected), sorted(expected - on_disk))
    with asyncckpt.SyncEngine() as engine:
        for step in expected:
            assert same(engine.load(root / f"step-{step:06d}"), crash_writer.manager_state(step)), step
    stats["kills"] = trials
    stats["steps committed"] = newest
    return stats


def test_sigkill_of_an_incremental_manager(server: ForkServer, tmp_path: Path) -> None:
    stats = manager_trials(server, tmp_path, trials=40, seed=7)
    report(stats)
    assert stats["references followed"] > 0 and stats["steps committed"] > 5


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_sigkill_of_an_incremental_manager_soak(server: ForkServer, tmp_path: Path) -> None:
    report(manager_trials(server, tmp_path, trials=200, seed=int(os.environ.get("ASYNCCKPT_SOAK_SEED", "11"))))


def _leave_debris(path: Path) -> set[str]:
    """What saves killed at various points leave in ``path``: shards of two other saves and a temporary manifest."""
    debris = {"shard-00000000deadbeef-00000.safetensors", "shard-00000000deadbeef-00001.safetensors",
              "shard-0123456789abcdef-00000.safetensors", f"{MANIFEST_NAME}.tmp-0123456789ab"}
    path.mkdir(parents=True, exist_ok=True)
    for name in debris:
        (path / name).write_bytes(b"\xde\xad" * 1000)
    return debris


async def test_leftovers_are_ignored_then_swept_by_the_next_save(tmp_path: Path) -> None:
    path = tmp_path / "last"
    async with asyncckpt.CheckpointEngine(chunk_bytes=4096, shard_bytes=32 << 10) as engine:
        await (await engine.save(expected(0), path))
        debris = _leave_debris(path)
        assert same(await engine.load(path), expected(0))  # ignored by loads
        assert asyncckpt.latest(tmp_path) == str(path)  # and by latest
        await (await engine.save(expected(1), path))
        assert not debris & listing(path), "leftovers survive the next save of the path"
        assert listing(path) == referenced(path)
        assert same(await engine.load(path), expected(1))


async def test_debris_only_directory_is_incomplete_and_removable(tmp_path: Path) -> None:
    """A directory holding only a killed save's files is refused as incomplete, skipped by latest(), removable."""
    path = tmp_path / "step-000007"
    _leave_debris(path)
    async with asyncckpt.CheckpointEngine(chunk_bytes=4096) as engine:
        with pytest.raises(IncompleteCheckpointError):
            await engine.load(path)
        assert asyncckpt.latest(tmp_path) is None
        await engine.remove(path)
        assert not path.exists()


async def test_empty_directory_left_by_a_save_killed_at_once_is_removable(tmp_path: Path) -> None:
    """Killed right after creating its directory, a save leaves it empty: loads refuse it, remove() deletes it."""
    path = tmp_path / "step-000008"
    path.mkdir()
    async with asyncckpt.CheckpointEngine(chunk_bytes=4096) as engine:
        with pytest.raises(CheckpointError):
            await engine.load(path)
        assert asyncckpt.latest(tmp_path) is None
        await engine.remove(path)
        assert not path.exists()
