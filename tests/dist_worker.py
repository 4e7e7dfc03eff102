"""Child side of the multi-rank tests (tests/test_dcp.py): a fork server that runs process groups of real ranks.

Run as ``python dist_worker.py [MODULE...]``. It imports torch, torch.distributed, asyncckpt and the scenario
modules named (``dist_scenarios`` always) once, then reads commands from stdin, one JSON object per line, and
answers one line each:

``{"cmd": "start", "scenario": name, "world": n, "args": {...}, "timeout": s, "dir": path}``  fork ``n`` ranks;
    answer ``{"pids": [...]}`` at once. Each rank joins a gloo group (a fresh file store in a new directory under
    ``dir``, the test's own temporary directory) and runs ``dist_scenarios.<name>(rank, world, **args)`` (or, for
    a name ``module:function``, that module's function); what it returns is its result.
``{"cmd": "wait", "pids": [...], "timeout": s}``  reap them (killing any still running when the time is up);
    answer ``{"rcs": [...], "results": [...]}`` — a result is the scenario's return value, or
    ``{"error": traceback}``. Once every rank of a start is reaped its directory is removed; the server removes
    what is left when its input closes.

Forking from an interpreter that already imported torch makes a group cost well under a second instead of the
several seconds each fresh ``import torch`` takes, so the multi-rank matrix and the kill trials fit in the
default test run. The server itself starts no thread (forking a threaded process is unsafe); the ranks do.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from datetime import timedelta

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint  # noqa: E402,F401
import torch.distributed.checkpoint.state_dict  # noqa: E402,F401
import torch.distributed.fsdp  # noqa: E402,F401
import torch.distributed.tensor  # noqa: E402,F401

import asyncckpt.dcp  # noqa: E402,F401
import dist_scenarios  # noqa: E402

SCENARIOS = {"dist_scenarios": dist_scenarios}


def rank_main(scenario: str, rank: int, world: int, store: str, out: str, args: dict, timeout: float) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    code = 0
    try:
        if world:
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                    timeout=timedelta(seconds=timeout))
        module, _, name = scenario.rpartition(":")
        result = getattr(SCENARIOS[module or "dist_scenarios"], name)(rank, world, **args)
    except BaseException:  # noqa: B036 — a rank reports everything
        result, code = {"error": traceback.format_exc()}, 1
    with open(out + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(out + ".tmp", out)
    sys.stdout.flush()
    os._exit(code)  # no atexit, no dist teardown: a rank that outlives its peers must not hang


def warm_up() -> None:
    """Pay DTensor's first-use costs (about two seconds of lazy set-up) once, here, instead of in every rank: on
    torch's fake process group, which starts no thread and is torn down before any fork."""
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError:
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        for placement in (Shard(0), Shard(1), Replicate()):
            distribute_tensor(torch.randn(8, 6), mesh, [placement]).full_tensor()
    finally:
        dist.destroy_process_group()


def serve() -> None:
    warm_up()
    running: dict[int, str] = {}
    groups: dict[str, set[int]] = {}  # each start's directory, and its ranks not yet reaped
    try:
        for line in sys.stdin:
            answer = handle(json.loads(line), running, groups)
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    finally:
        for pid in list(running):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for tmp in groups:
            shutil.rmtree(tmp, ignore_errors=True)


def handle(cmd: dict, running: dict[int, str], groups: dict[str, set[int]]) -> dict:
    """Answer one command."""
    if cmd["cmd"] == "start":
        world = cmd["world"]
        tmp = tempfile.mkdtemp(prefix="ranks-", dir=cmd.get("dir"))
        store = os.path.join(tmp, "store")
        pids = []
        for rank in range(max(world, 1)):
            out = os.path.join(tmp, f"result-{rank}.json")
            pid = os.fork()
            if pid == 0:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                rank_main(cmd["scenario"], rank, world, store, out, cmd.get("args", {}),
                          cmd.get("timeout", 60))
            running[pid] = out
            pids.append(pid)
        groups[tmp] = set(pids)
        return {"pids": pids}
    if cmd["cmd"] == "wait":
        deadline = time.monotonic() + cmd.get("timeout", 60)
        rcs, results = [], []
        for pid in cmd["pids"]:
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    _, status = os.waitpid(pid, 0)
                    break
                time.sleep(0.01)
            rcs.append(os.waitstatus_to_exitcode(status))
            out = running.pop(pid)
            try:
                with open(out) as f:
                    results.append(json.load(f))
            except (OSError, ValueError):
                results.append(None)
            for tmp, left in list(groups.items()):
                left.discard(pid)
                if not left:
                    shutil.rmtree(tmp, ignore_errors=True)
                    del groups[tmp]
        return {"rcs": rcs, "results": results}
    return {"error": f"unknown command {cmd['cmd']!r}"}


if __name__ == "__main__":
    for name in sys.argv[1:]:  # before any fork, so no rank pays for the import
        SCENARIOS[name] = importlib.import_module(name)
    serve()
