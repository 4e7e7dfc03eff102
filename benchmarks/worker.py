"""One measurement in a fresh process: ``python -m benchmarks.worker '<json spec>'``.

Prints one line ``BENCH_RESULT <json>`` on stdout (everything else goes to stderr). A fresh
process per (contender, workload, repeat) keeps RSS and first-save numbers honest: no warm
allocator, no leftover threads or staging buffers from another library.

Spec keys: ``contender`` (a name from ``contenders.CONTENDERS`` or ``"limits"``), ``workload``,
``size_bytes``, ``quick``, ``saves``, ``workdir``, ``drop_caches``, ``raw_threads``.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Coroutine

MARK = "BENCH_RESULT "


def drive(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends, without an event loop (for synchronous libraries)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("a synchronous contender awaited something; run it under asyncio instead")


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


async def measure(contender: Any, workload: Any, workdir: Path, saves: int,
                  drop_caches: bool) -> dict[str, Any]:
    from asyncckpt.tools import fsutil, memory
    import torch

    from .workloads import iter_tensors, same_tensors, tensor_bytes

    nbytes = tensor_bytes(workload.state())
    out: dict[str, Any] = {"bytes": nbytes}
    await contender.open(workdir, workload)
    try:
        blocking: list[float] = []
        durable: list[float] = []
        rss_after: list[int] = []
        paths: list[Path] = []
        baseline = memory.settle()
        with memory.PeakRSS() as peak:
            for i in range(saves):
                if i:
                    workload.step()  # training moves on: every tensor changes between saves
                state = workload.state()
                path = workdir / f"ckpt-{i}{contender.suffix}"
                t0 = time.perf_counter()
                pending = await contender.save(state, path)
                t1 = time.perf_counter()
                await contender.durable(pending)
                fsutil.fsync_tree(path)
                t2 = time.perf_counter()
                del pending, state
                blocking.append(t1 - t0)
                durable.append(t2 - t0)
                paths.append(path)
                rss_after.append(memory.settle())
                if len(paths) > 1:  # keep the newest only (untimed), like a keep-last-1 policy
                    fsutil.remove(paths[-2])
        out.update(
            blocking_s=blocking, durable_s=durable, rss_after=rss_after, rss_baseline=baseline,
            rss_method=peak.method,
            save_peak_rss_growth=peak.peak - baseline,
            first_blocking_s=blocking[0], first_durable_s=durable[0],
            steady_blocking_s=_median(blocking[1:]) if saves > 1 else blocking[0],
            steady_durable_s=_median(durable[1:]) if saves > 1 else durable[0],
            rss_drift=(rss_after[-1] - rss_after[1]) if saves > 2 else None,
            bytes_on_disk=fsutil.bytes_on_disk(paths[-1]),
        )

        # Load the newest checkpoint, cold, into a separately built model/state.
        last = paths[-1]
        target = workload.make_target()
        # An existing model has its memory faulted in; zeros from calloc would not be, and
        # would show up as "load RSS growth" for in-place loaders.
        with torch.no_grad():
            for _, t in iter_tensors(workload.target_state(target)):
                t.zero_()
        out["evict"] = fsutil.evict(last, drop_caches=drop_caches)
        rss0 = memory.settle()
        with memory.PeakRSS() as lpeak:
            t0 = time.perf_counter()
            await contender.load(last, workload, target)
            out["load_s"] = time.perf_counter() - t0
        out["load_peak_rss_growth"] = lpeak.peak - rss0
        out["load_verified"] = same_tensors(workload.state(), workload.target_state(target))
        del target
        fsutil.remove(last)
    finally:
        await contender.close()
    out["info"] = contender.info()
    if hasattr(contender, "budget"):
        out["budget_bytes"] = contender.budget
    return out


def run_limits(workload: Any, workdir: Path, threads: list[int], drop_caches: bool) -> dict[str, Any]:
    from asyncckpt.tools import fsutil, limits
    from .workloads import iter_tensors, tensor_bytes

    tensors = [t for _, t in iter_tensors(workload.state())]
    nbytes = tensor_bytes(workload.state())
    res: dict[str, Any] = {"bytes": nbytes}
    res["copy_floor"] = limits.copy_floor(tensors)
    raw_dir = workdir / "raw"
    try:
        res["raw_write"] = limits.raw_write(raw_dir, nbytes, threads)
        files = [Path(f) for f in res["raw_write"].pop("files")]
        res["raw_read"] = limits.raw_read(files, threads, drop_caches=drop_caches)
    finally:
        fsutil.remove(raw_dir)
    return res


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from .contenders import CONTENDERS, Unavailable
    from .workloads import make_workload

    name = spec["contender"]
    workdir = Path(spec["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"contender": name, "workload": spec["workload"],
                              "repeat": spec.get("repeat", 0), "pid": os.getpid(),
                              "torch_threads": torch.get_num_threads()}
    contender = None
    if name != "limits":
        contender = CONTENDERS[name]()
        try:
            contender.check()
        except Unavailable as e:
            result.update(status="unavailable", reason=str(e))
            return result
    t0 = time.perf_counter()
    workload = make_workload(spec["workload"], int(spec["size_bytes"]), bool(spec.get("quick")))
    result["workload_build_s"] = time.perf_counter() - t0
    result["workload_info"] = workload.describe()
    try:
        if contender is None:
            result.update(run_limits(workload, workdir, list(spec["raw_threads"]),
                                     bool(spec.get("drop_caches"))))
        else:
            coro = measure(contender, workload, workdir, int(spec["saves"]),
                           bool(spec.get("drop_caches")))
            if getattr(contender, "async_native", False):
                result.update(asyncio.run(coro))
            else:
                result.update(drive(coro))
        result["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - reported, not raised: one failure must not end the run
        result.update(status="error", error=f"{type(e).__name__}: {e}",
                      traceback=traceback.format_exc())
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # libraries that print must not corrupt the result line
    try:
        result = run(spec)
    finally:
        sys.stdout = real_stdout
    real_stdout.write(MARK + json.dumps(result) + "\n")
    real_stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
