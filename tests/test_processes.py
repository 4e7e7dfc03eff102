"""Hangs and deadlocks in real processes: forked children, Ctrl-C (a real SIGINT), special files, dropped engines.

Each case runs in a fresh interpreter under a wall-clock bound, so a regression shows up as a failed test with the
child's output, never as a hung suite. The child prints one JSON line of observations; the test asserts on them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


PRELUDE = """
import gc, json, os, sys, time, signal, threading, warnings
import torch, asyncckpt
STATE = {f"t{i}": torch.arange(i, i + 256 * 1024, dtype=torch.float32).reshape(256, 1024) for i in range(32)}
def same(loaded):
    return sorted(loaded) == sorted(STATE) and all(torch.equal(loaded[k], STATE[k]) for k in STATE)
"""


def run_child(script: str, tmp_path: Path, timeout: float = 90) -> tuple[dict[str, Any], str]:
    """Run ``script`` after PRELUDE in a new interpreter, ``D`` a scratch directory; its last stdout line is JSON."""
    code = f"D = {str(tmp_path)!r}\n" + PRELUDE + textwrap.dedent(script)
    try:
        done = subprocess.run([sys.executable, "-X", "dev", "-c", code], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the child hung (> {timeout} s); its output so far:\n{exc.stdout}\n{exc.stderr}")
    assert done.returncode == 0, f"child failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr



# ---------------------------------------------------------------------------------------------- forks


@pytest.mark.parametrize("how", ["os.fork", "multiprocessing", "DataLoader"])
def test_forked_children_exit_promptly_and_never_touch_the_parents_sync_engine(how: str, tmp_path: Path) -> None:
    """A child of a process holding a SyncEngine (with a save in flight at the fork) exits at once, and the
    parent's save still commits. A child that tries to use the engine is told to make its own."""
    out, _ = run_child(f"""
        how = {how!r}
        engine = asyncckpt.SyncEngine()
        engine.save(STATE, D + "/before").result()
        handle = engine.save(STATE, D + "/pending")          # threads busy while the children fork
        t0 = time.monotonic()
        if how == "os.fork":
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    engine.save(STATE, D + "/child")
                    os.write(w, b"saved")
                except asyncckpt.CheckpointError as exc:
                    os.write(w, ("refused: " + str(exc)).encode())
                sys.exit(0)                                   # a normal exit: atexit and threading hooks run
            _, status = os.waitpid(pid, 0)
            os.close(w)
            said = os.read(r, 4096).decode()
            codes = [os.waitstatus_to_exitcode(status)]
        elif how == "multiprocessing":
            import multiprocessing as mp
            ctx = mp.get_context("fork")
            procs = [ctx.Process(target=sum, args=([1, 2],)) for _ in range(4)]
            for p in procs: p.start()
            for p in procs: p.join(60)
            codes, said = [p.exitcode for p in procs], ""
        else:
            from torch.utils.data import DataLoader, TensorDataset
            loader = DataLoader(TensorDataset(torch.arange(64.0)), batch_size=8, num_workers=2,
                                multiprocessing_context="fork")
            seen = [float(b[0].sum()) for _ in range(2) for b in loader]
            codes, said = [0 if sum(seen) == 2 * sum(range(64)) else 1], ""
        children_s = time.monotonic() - t0
        handle.result()
        ok = same(engine.load(D + "/pending"))
        engine.close()
        print(json.dumps(dict(codes=codes, said=said, children_s=children_s, ok=ok,
                              child_dir=os.path.exists(D + "/child/manifest.json"))))
    """, tmp_path)
    assert out["codes"] and all(code == 0 for code in out["codes"]), out
    assert out["children_s"] < 30, out  # 21 s for two DataLoader epochs when a child's exit joined the parent's engine
    assert out["ok"] is True
    assert out["child_dir"] is False
    if how == "os.fork":
        assert out["said"].startswith("refused: ") and "create a new engine in the child" in out["said"], out


def test_a_forked_child_finds_the_asyncio_engine_inert(tmp_path: Path) -> None:
    """Inside ``async with CheckpointEngine()``, a forked child may leave the block (and drop the engine) without
    touching the parent's threads: no error, no warning, no close. Its saves are refused with a clear error."""
    out, _ = run_child("""
        import asyncio
        async def main():
            async with asyncckpt.CheckpointEngine() as engine:
                handle = await engine.save(STATE, D + "/pending")
                r, w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    said = []
                    try:
                        await engine.save(STATE, D + "/child")
                    except asyncckpt.CheckpointError as exc:
                        said.append("refused" if "forked child" in str(exc) else str(exc))
                    try:
                        with warnings.catch_warnings():
                            warnings.simplefilter("error")
                            await engine.__aexit__(None, None, None)   # what leaving the block runs
                            del engine
                            gc.collect()
                        said.append("left")
                    except BaseException as exc:
                        said.append(f"{type(exc).__name__}: {exc}")
                    os.write(w, json.dumps(said).encode())
                    os._exit(0)   # never run the parent's event loop on in a child: asyncio is not fork-safe
                os.close(w)
                _, status = os.waitpid(pid, 0)
                said = json.loads(os.read(r, 4096).decode())
                await handle
                ok = same(await engine.load(D + "/pending"))
            return dict(said=said, code=os.waitstatus_to_exitcode(status), ok=ok)
        print(json.dumps(asyncio.run(main())))
    """, tmp_path)
    assert out["said"] == ["refused", "left"], out
    assert out["code"] == 0 and out["ok"] is True


# ---------------------------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_anywhere_in_a_sync_save_leaves_the_engine_usable(tmp_path: Path) -> None:
    """Real SIGINTs at 25 points in and around ``SyncEngine.save`` (budget of 2 chunks, so saves wait for memory):
    each interrupted save is aborted or committed whole, no buffer leaks, and the emergency save that follows a
    Ctrl-C (the usual ``except KeyboardInterrupt: save; raise`` pattern) commits and loads bit for bit."""
    out, _ = run_child("""
        engine = asyncckpt.SyncEngine(host_memory_budget=8 << 20, chunk_bytes=4 << 20, write_concurrency=2)
        interrupted = 0
        for i in range(25):
            try:
                threading.Timer((i % 13) * 0.003, os.kill, (os.getpid(), signal.SIGINT)).start()
                engine.save(STATE, f"{D}/s{i % 3}")
                time.sleep(0.15)
            except KeyboardInterrupt:
                interrupted += 1
            try:
                time.sleep(0.05)                        # a late signal lands here, not in the next save
            except KeyboardInterrupt:
                interrupted += 1
        engine.wait_for(D + "/s0"); engine.wait_for(D + "/s1"); engine.wait_for(D + "/s2")
        leaked = engine.staging.in_use_bytes
        outcomes = []
        for i in range(3):
            try:
                outcomes.append("same" if same(engine.load(f"{D}/s{i}")) else "DIFFERENT")
            except asyncckpt.CorruptCheckpointError as exc:
                outcomes.append("CORRUPT " + str(exc))
            except asyncckpt.CheckpointError:
                outcomes.append("absent")
        try:
            threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGINT)).start()
            time.sleep(5)
        except KeyboardInterrupt:
            engine.save(STATE, D + "/emergency").result()   # the emergency save on Ctrl-C
        emergency = same(engine.load(D + "/emergency"))
        engine.close()
        print(json.dumps(dict(interrupted=interrupted, leaked=leaked, outcomes=outcomes, emergency=emergency)))
    """, tmp_path, timeout=120)
    assert out["interrupted"] == 25, out  # every signal was delivered as a KeyboardInterrupt somewhere
    assert out["leaked"] == 0, out
    assert all(o in ("same", "absent") for o in out["outcomes"]), out
    assert out["emergency"] is True


def test_ctrl_c_while_close_waits_aborts_the_pending_save_and_exits(tmp_path: Path) -> None:
    """Ctrl-C during ``close()`` aborts what is still pending (it is never committed torn), keeps the checkpoint
    committed before it, and propagates: the process ends instead of hanging."""
    out, _ = run_child("""
        big = {f"b{i}": torch.full((1024, 1024), float(i)) for i in range(192)}     # 768 MiB to write
        engine = asyncckpt.SyncEngine(write_concurrency=1)
        engine.save(STATE, D + "/kept").result()
        engine.save(big, D + "/kept")
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
        t0 = time.monotonic()
        try:
            engine.close()
            raised = False
        except KeyboardInterrupt:
            raised = True
        took = time.monotonic() - t0
        with asyncckpt.SyncEngine() as fresh:
            loaded = fresh.load(D + "/kept")
        kept = "old" if same(loaded) else ("new" if torch.equal(loaded["b191"], big["b191"]) else "OTHER")
        print(json.dumps(dict(raised=raised, took=took, kept=kept)))
    """, tmp_path, timeout=120)
    assert out["kept"] in ("old", "new"), out
    if out["raised"]:  # the signal came while close waited: it aborted, so the older checkpoint stays
        assert out["kept"] == "old", out


# ---------------------------------------------------------------------------------------------- special files


def test_special_files_never_hang_a_load_or_a_listing(tmp_path: Path) -> None:
    """A FIFO, a link to /dev/zero, a symlink loop or an oversized file where a manifest or shard should be: loads
    fail at once with a CheckpointError naming the file; ``latest()``/``committed()`` skip (and log) the bad sibling."""
    out, err = run_child("""
        import logging
        logging.basicConfig(level=logging.WARNING, format="LOG %(levelname)s %(message)s")
        engine = asyncckpt.SyncEngine()
        engine.save(STATE, D + "/good").result()
        os.makedirs(D + "/fifo"); os.mkfifo(D + "/fifo/manifest.json")
        os.makedirs(D + "/zero"); os.symlink("/dev/zero", D + "/zero/manifest.json")
        os.makedirs(D + "/loop"); os.symlink(D + "/loop/manifest.json", D + "/loop/manifest.json")
        os.makedirs(D + "/dir/manifest.json")
        os.makedirs(D + "/huge")
        with open(D + "/huge/manifest.json", "wb") as f:
            f.truncate((1 << 30) + 1)          # sparse: past the manifest cap without using the disk
        engine.save(STATE, D + "/shardfifo").result()
        shard = next(n for n in os.listdir(D + "/shardfifo") if n.endswith(".safetensors"))
        os.remove(f"{D}/shardfifo/{shard}"); os.mkfifo(f"{D}/shardfifo/{shard}")
        loads = {}
        for name in ("fifo", "zero", "loop", "dir", "huge", "shardfifo"):
            t0 = time.monotonic()
            try:
                engine.load(f"{D}/{name}")
                loads[name] = "LOADED"
            except asyncckpt.CheckpointError as exc:
                loads[name] = type(exc).__name__ + ": " + str(exc)
            except BaseException as exc:
                loads[name] = "RAW " + type(exc).__name__ + ": " + str(exc)
            assert time.monotonic() - t0 < 10, name
        names = [os.path.basename(p) for p in engine.committed(D)]
        latest = os.path.basename(engine.latest(D))
        engine.close()
        print(json.dumps(dict(loads=loads, names=names, latest=latest)))
    """, tmp_path)
    loads = out["loads"]
    assert all(not v.startswith(("LOADED", "RAW")) for v in loads.values()), loads
    assert "not a regular file" in loads["fifo"] and "fifo/manifest.json" in loads["fifo"]
    assert "symbolic link" in loads["zero"] and "symbolic link" in loads["loop"]
    assert "more than the" in loads["huge"]
    assert "not a regular file" in loads["shardfifo"] and loads["shardfifo"].count(".safetensors"), loads
    assert out["names"] == ["good", "shardfifo"] and out["latest"] == "shardfifo"
    for name in ("fifo", "zero", "loop", "huge"):  # a manifest that is there but unusable is worth a warning
        assert any(line.startswith("LOG WARNING") and f"/{name}" in line for line in err.splitlines()), (name, err)


# ---------------------------------------------------------------------------------------------- dropped engines


def test_a_dropped_sync_engine_finishes_its_save_and_says_so(tmp_path: Path) -> None:
    """A SyncEngine garbage-collected with a save pending does not abort it silently: the save still commits, and a
    ResourceWarning plus a logged error name the path."""
    out, err = run_child("""
        import logging
        logging.basicConfig(level=logging.ERROR, format="LOG %(levelname)s %(message)s")
        warnings.simplefilter("always", ResourceWarning)
        engine = asyncckpt.SyncEngine()
        handle = engine.save(STATE, D + "/dropped")
        del engine
        gc.collect()
        result = handle.result()
        with asyncckpt.SyncEngine() as fresh:
            ok = same(fresh.load(D + "/dropped"))
        print(json.dumps(dict(ok=ok, path=result.path)))
    """, tmp_path)
    assert out["ok"] is True
    path = str(tmp_path / "dropped")
    assert any("ResourceWarning" in line and path in line for line in err.splitlines()), err
    assert any(line.startswith("LOG ERROR") and path in line for line in err.splitlines()), err


# ---------------------------------------------------------------------------------------------- readers racing a writer


WRITER = """
import os, sys, torch, asyncckpt
import time
path, stop = sys.argv[1:]
parent, end = os.getppid(), time.monotonic() + 90   # never outlive the test's child, nor run unbounded
with asyncckpt.SyncEngine(fsync=False, shard_bytes=1 << 20, chunk_bytes=1 << 20) as engine:
    i = 0
    while not os.path.exists(stop) and os.getppid() == parent and time.monotonic() < end:
        i += 1
        engine.save({f"t{k}": torch.full((64, 1024), float(i)) for k in range(12)}, path).result()
"""


def test_a_reader_racing_an_overwrite_gets_old_or_new_never_corrupt(tmp_path: Path) -> None:
    """A second process loading a path while its owner keeps overwriting it gets one whole save each time (every
    tensor holds that save's number) or ``CheckpointReplacedError`` — never ``CorruptCheckpointError`` on a healthy
    checkpoint (it used to, 1–3 times per few hundred loads)."""
    (tmp_path / "writer.py").write_text(WRITER)
    out, _ = run_child("""
        import subprocess
        path = D + "/ckpt"
        writer = subprocess.Popen([sys.executable, D + "/writer.py", path, D + "/stop"])
        while not os.path.exists(path + "/manifest.json") and writer.poll() is None:
            time.sleep(0.01)
        counts = {"whole": 0, "replaced": 0}
        bad = []
        t0 = time.monotonic()
        with asyncckpt.SyncEngine() as engine:
            while time.monotonic() - t0 < 25 and len(bad) < 3:
                try:
                    loaded = engine.load(path)
                except asyncckpt.CheckpointReplacedError:
                    counts["replaced"] += 1
                    continue
                except asyncckpt.CheckpointError as exc:
                    bad.append(f"{type(exc).__name__}: {exc}")
                    continue
                values = {float(t[0, 0]) for t in loaded.values()} | {float(t[-1, -1]) for t in loaded.values()}
                if len(values) == 1 and len(loaded) == 12:
                    counts["whole"] += 1
                else:
                    bad.append(f"MIXED {sorted(values)}")
        open(D + "/stop", "w").close()
        print(json.dumps(dict(counts=counts, bad=bad, writer=writer.wait(60))))
    """, tmp_path, timeout=120)
    assert out["bad"] == [], out
    assert out["writer"] == 0 and out["counts"]["whole"] >= 20, out
