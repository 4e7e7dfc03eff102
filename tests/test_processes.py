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
    # a child whose exit joins the parent's engine hangs: 21 s for two DataLoader epochs (the loader gives up on
    # its workers), for ever for the others; without an engine these take well under a second
    assert out["children_s"] < 8, out
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


def test_forked_workers_inside_an_asyncio_engine_exit_promptly(tmp_path: Path) -> None:
    """The asyncio face: ``multiprocessing`` fork children and ``DataLoader`` fork workers started inside
    ``async with CheckpointEngine()``, with a save in flight, exit at once (their exit runs threading's exit hooks,
    which must not reach the parent's engine), and the parent's save commits."""
    out, _ = run_child("""
        import asyncio
        import multiprocessing as mp
        from torch.utils.data import DataLoader, TensorDataset
        async def main():
            async with asyncckpt.CheckpointEngine() as engine:
                handle = await engine.save(STATE, D + "/pending")
                t0 = time.monotonic()
                procs = [mp.get_context("fork").Process(target=sum, args=([1, 2],)) for _ in range(4)]
                for p in procs: p.start()
                for p in procs: p.join(20)
                mp_s = time.monotonic() - t0
                t0 = time.monotonic()
                loader = DataLoader(TensorDataset(torch.arange(64.0)), batch_size=8, num_workers=2,
                                    multiprocessing_context="fork")
                seen = sum(float(b[0].sum()) for _ in range(2) for b in loader)
                loader_s = time.monotonic() - t0
                await handle
                ok = same(await engine.load(D + "/pending"))
            return dict(codes=[p.exitcode for p in procs], mp_s=mp_s, loader_s=loader_s, seen=seen, ok=ok)
        print(json.dumps(asyncio.run(main())))
    """, tmp_path)
    assert out["codes"] == [0, 0, 0, 0], out
    assert out["mp_s"] < 8 and out["loader_s"] < 8, out  # a child joining the parent's engine: 20 s, and 21 s
    assert out["seen"] == 2 * sum(range(64)) and out["ok"] is True, out


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


def test_ctrl_c_during_the_last_chunks_copy_aborts_the_save(tmp_path: Path) -> None:
    """A real SIGINT while the last chunk is copied aborts the save like one during any other chunk. It used to be
    raised only once the save had been handed over whole: ``save`` raised, and the checkpoint committed anyway."""
    out, _ = run_child("""
        from asyncckpt.snapshot.plan import Plan
        fill = Plan.fill
        def fill_last(plan, chunk, buf):
            if chunk is plan.chunks[-1]:
                signal.raise_signal(signal.SIGINT)  # held back by the save until a safe point
            return fill(plan, chunk, buf)
        engine = asyncckpt.SyncEngine(chunk_bytes=4 << 20)
        Plan.fill = fill_last
        try:
            engine.save(STATE, D + "/ck")
            raised = False
        except KeyboardInterrupt:
            raised = True
        Plan.fill = fill
        engine.wait_for(D + "/ck")
        committed = os.path.exists(D + "/ck/manifest.json")
        leaked = engine.staging.in_use_bytes
        engine.close()
        print(json.dumps(dict(raised=raised, committed=committed, leaked=leaked)))
    """, tmp_path)
    assert out == {"raised": True, "committed": False, "leaked": 0}, out


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


def test_ctrl_c_under_asyncio_run_aborts_pending_saves_and_exits(tmp_path: Path) -> None:
    """The asyncio face: a real SIGINT under ``asyncio.run`` (which cancels the main task) while saves stream through
    a 2-chunk budget, 12 times at different moments. Each time leaving ``async with CheckpointEngine()`` aborts what
    is pending, returns every staging byte and joins the engine's threads, and ``asyncio.run`` raises
    ``KeyboardInterrupt``; each path holds a whole checkpoint or none, and a save made after the interrupt (the
    emergency save, from a new engine) commits and loads bit for bit."""
    out, _ = run_child("""
        import asyncio
        engines = []
        async def main(i):
            async with asyncckpt.CheckpointEngine(host_memory_budget=8 << 20, chunk_bytes=4 << 20,
                                                  write_concurrency=2) as engine:
                engines.append(engine)
                while True:
                    await engine.save(STATE, f"{D}/s{i % 3}")
        threads = threading.active_count()
        interrupted, took = 0, []
        for i in range(12):
            timer = threading.Timer(0.05 + (i % 6) * 0.25, os.kill, (os.getpid(), signal.SIGINT))
            timer.start()
            t0 = time.monotonic()
            try:
                asyncio.run(main(i))
            except KeyboardInterrupt:
                interrupted += 1
            took.append(time.monotonic() - t0)
            timer.join()
        leaked = [e.staging.in_use_bytes for e in engines]
        left = threading.active_count() - threads
        async def emergency():
            async with asyncckpt.CheckpointEngine() as engine:
                await (await engine.save(STATE, D + "/emergency"))
                outcomes = []
                for i in range(3):
                    try:
                        outcomes.append("same" if same(await engine.load(f"{D}/s{i}")) else "DIFFERENT")
                    except asyncckpt.CorruptCheckpointError as exc:
                        outcomes.append("CORRUPT " + str(exc))
                    except asyncckpt.CheckpointError:
                        outcomes.append("absent")
                return outcomes, same(await engine.load(D + "/emergency"))
        outcomes, ok = asyncio.run(emergency())
        print(json.dumps(dict(interrupted=interrupted, took=max(took), leaked=leaked, left=left,
                              outcomes=outcomes, emergency=ok)))
    """, tmp_path, timeout=120)
    assert out["interrupted"] == 12, out
    assert out["leaked"] == [0] * 12 and out["left"] == 0, out  # staging returned, engine threads joined
    assert all(o in ("same", "absent") for o in out["outcomes"]), out
    assert out["took"] < 20 and out["emergency"] is True, out


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
        import asyncio
        async def via_asyncio():    # the asyncio face reads through the same storage calls: same outcome
            out = {}
            async with asyncckpt.CheckpointEngine() as engine:
                for name in ("fifo", "zero", "shardfifo"):
                    t0 = time.monotonic()
                    try:
                        await engine.load(f"{D}/{name}")
                        out[name] = "LOADED"
                    except asyncckpt.CheckpointError as exc:
                        out[name] = type(exc).__name__
                    assert time.monotonic() - t0 < 10, name
                out["latest"] = os.path.basename(await engine.latest(D))
            return out
        print(json.dumps(dict(loads=loads, names=names, latest=latest, via_asyncio=asyncio.run(via_asyncio()))))
    """, tmp_path)
    loads = out["loads"]
    assert all(not v.startswith(("LOADED", "RAW")) for v in loads.values()), loads
    assert "not a regular file" in loads["fifo"] and "fifo/manifest.json" in loads["fifo"]
    assert "symbolic link" in loads["zero"] and "symbolic link" in loads["loop"]
    assert "more than the" in loads["huge"]
    assert "not a regular file" in loads["shardfifo"] and loads["shardfifo"].count(".safetensors"), loads
    assert out["names"] == ["good", "shardfifo"] and out["latest"] == "shardfifo"
    assert out["via_asyncio"] == dict(fifo="CheckpointError", zero="CheckpointError",
                                      shardfifo="CheckpointError", latest="shardfifo"), out
    for name in ("fifo", "zero", "loop", "huge"):  # a manifest that is there but unusable is worth a warning
        assert any(line.startswith("LOG WARNING") and f"/{name}" in line for line in err.splitlines()), (name, err)


def test_an_unreadable_manifest_is_skipped_by_a_listing_and_named_by_a_load(tmp_path: Path) -> None:
    """A sibling whose ``manifest.json`` the process may not read (mode 000; as root, the child first gives up the
    capabilities that bypass file modes) is skipped by ``latest()``/``committed()`` with a WARNING, and its load is
    a CheckpointError naming the file — not a raw PermissionError."""
    out, err = run_child("""
        import ctypes, logging
        logging.basicConfig(level=logging.WARNING, format="LOG %(levelname)s %(message)s")
        with asyncckpt.SyncEngine() as engine:
            engine.save(STATE, D + "/good").result()
            engine.save(STATE, D + "/locked").result()
        os.chmod(D + "/locked/manifest.json", 0)
        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]
        libc = ctypes.CDLL(None, use_errno=True)
        header, data = Header(0x20080522, 0), (Data * 2)()    # _LINUX_CAPABILITY_VERSION_3
        assert libc.capget(ctypes.byref(header), data) == 0
        data[0].effective &= ~0b110                            # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        data[0].permitted &= ~0b110
        assert libc.capset(ctypes.byref(header), data) == 0    # threads started from now on inherit it
        try:
            open(D + "/locked/manifest.json", "rb").close()
            denied = False
        except PermissionError:
            denied = True
        found = {}
        with asyncckpt.SyncEngine() as engine:
            try:
                engine.load(D + "/locked")
                found["load"] = "LOADED"
            except asyncckpt.CheckpointError as exc:
                found["load"] = str(exc)
            except BaseException as exc:
                found["load"] = "RAW " + type(exc).__name__ + ": " + str(exc)
            found["committed"] = [os.path.basename(p) for p in engine.committed(D)]
        found["latest"] = os.path.basename(asyncckpt.latest(D))
        print(json.dumps(dict(denied=denied, **found)))
    """, tmp_path)
    assert out["denied"] is True, out  # the precondition: the manifest really cannot be read
    assert "locked/manifest.json" in out["load"] and not out["load"].startswith(("LOADED", "RAW")), out
    assert out["committed"] == ["good"] and out["latest"] == "good", out
    assert any(line.startswith("LOG WARNING") and "/locked" in line for line in err.splitlines()), err


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


def test_a_dropped_asyncio_engine_finishes_its_save_and_says_so(tmp_path: Path) -> None:
    """The asyncio face: a CheckpointEngine entered without ``async with`` and garbage-collected with a save pending
    behaves like a dropped SyncEngine — the save commits (its handle can still be awaited), and a ResourceWarning
    plus a logged error name the path."""
    out, err = run_child("""
        import asyncio, logging
        logging.basicConfig(level=logging.ERROR, format="LOG %(levelname)s %(message)s")
        warnings.simplefilter("always", ResourceWarning)
        async def main():
            engine = asyncckpt.CheckpointEngine()
            await engine.__aenter__()
            handle = await engine.save(STATE, D + "/dropped")
            del engine
            gc.collect()
            result = await handle
            async with asyncckpt.CheckpointEngine() as fresh:
                return dict(ok=same(await fresh.load(D + "/dropped")), path=result.path)
        print(json.dumps(asyncio.run(main())))
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
