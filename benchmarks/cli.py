"""Command line: ``python -m benchmarks [--size 1GiB] [--repeats 3] [--out bench-out/] [--quick]``.

Runs every contender and the physical limits, round-robin, each measurement in a fresh worker
process, then writes ``results.json``, ``report.md`` and one PNG per workload into ``--out``.
``main(argv)`` is the entry point other front ends (``asyncckpt bench``) can call.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from . import report
from .contenders import CONTENDERS
from .worker import MARK

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
          "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30}

DEFAULT_CONTENDERS = ["torch.save", "lightning-async", "dcp-async", "torchsnapshot", "asyncckpt",
                      "asyncckpt-lightning", "asyncckpt-lightning-native", "asyncckpt-budget"]


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (try 1GiB, 64MiB, 500MB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_threads(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        elif part.strip():
            out.append(int(part))
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"bad thread list {text!r}")
    return sorted(set(out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Compare asyncckpt with torch.save, Lightning AsyncCheckpointIO, torch DCP "
                    "async_save and torchsnapshot, against same-run physical limits.")
    p.add_argument("--size", type=parse_size, default=None,
                   help="tensor bytes of the synthetic workload (default 1GiB; --quick: 64MiB)")
    p.add_argument("--repeats", type=int, default=None, help="rounds (default 3; --quick: 1)")
    p.add_argument("--saves", type=int, default=None,
                   help="consecutive saves per measurement (default 10; --quick: 5; steady state "
                        "= median of saves 2..N)")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory")
    p.add_argument("--target-dir", type=Path, default=None,
                   help="where checkpoints and raw-I/O files are written (default OUT/scratch)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 64MiB, 1 repeat, small model, threads 1,2,4")
    p.add_argument("--workloads", default="synthetic,model",
                   help="comma list of: synthetic, model (default both)")
    p.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS),
                   help=f"comma list of: {', '.join(CONTENDERS)}")
    p.add_argument("--raw-threads", type=parse_threads, default=None,
                   help="thread counts tried for raw write/read (default 1-8; --quick: 1,2,4)")
    p.add_argument("--drop-caches", action="store_true",
                   help="drop the whole page cache (/proc/sys/vm/drop_caches, root) before cold "
                        "reads instead of fadvise(DONTNEED) on our own files")
    p.add_argument("--python", default=sys.executable, help="interpreter for worker processes")
    p.add_argument("--extra-path", action="append", default=[],
                   help="prepend to the workers' PYTHONPATH (e.g. a side install of torchsnapshot)")
    p.add_argument("--worker-timeout", type=float, default=1800.0,
                   help="seconds before a worker is killed and recorded as an error")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--report-only", type=Path, default=None, metavar="RESULTS_JSON",
                   help="re-render report.md/plots from an existing results.json, run nothing")
    return p


class _Progress:
    """tqdm if installed, else one line per step on stderr."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.t0 = total, 0, time.monotonic()
        try:
            from tqdm import tqdm

            self.bar: Any = tqdm(total=total, unit="run", dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            self.bar = None

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)
        else:
            el = time.monotonic() - self.t0
            print(f"[{self.n + 1}/{self.total} {el:6.0f}s] {text}", file=sys.stderr, flush=True)

    def step(self, note: str = "") -> None:
        self.n += 1
        if self.bar is not None:
            if note:
                self.bar.set_postfix_str(note)
            self.bar.update(1)
        elif note:
            print(f"    {note}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _worker_env(extra: Iterable[str]) -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    parts = [*extra, root]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_worker(spec: dict[str, Any], args: argparse.Namespace, log: Path) -> dict[str, Any]:
    cmd = [args.python, "-m", "benchmarks.worker", json.dumps(spec)]
    t0 = time.monotonic()
    with open(log, "a") as errf:
        errf.write(f"\n===== {spec['contender']} / {spec['workload']} / repeat {spec['repeat']}\n")
        errf.flush()
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=errf, text=True,
                                  env=_worker_env(args.extra_path), timeout=args.worker_timeout)
        except subprocess.TimeoutExpired:
            return {**_ident(spec), "status": "error",
                    "error": f"worker timed out after {args.worker_timeout:.0f}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            res = json.loads(line[len(MARK):])
            res["wall_s"] = time.monotonic() - t0
            return res
    return {**_ident(spec), "status": "error",
            "error": f"worker exited {proc.returncode} without a result (see {log.name})"}


def _ident(spec: dict[str, Any]) -> dict[str, Any]:
    return {"contender": spec["contender"], "workload": spec["workload"], "repeat": spec["repeat"]}


def _rotate(xs: list[str], k: int) -> list[str]:
    if not xs:
        return xs
    k %= len(xs)
    return xs[k:] + xs[:k]


def _note(res: dict[str, Any]) -> str:
    c = res["contender"]
    if res.get("status") != "ok":
        why = res.get("reason") or res.get("error") or ""
        return f"{c}: {res.get('status')} {why.splitlines()[0][:80] if why else ''}"
    if c == "limits":
        return (f"limits: floor {res['copy_floor']['seconds'] * 1e3:.0f} ms, write "
                f"{res['raw_write']['gbps']:.2f} GB/s, read {res['raw_read']['gbps']:.2f} GB/s")
    return (f"{c}: block {res['steady_blocking_s'] * 1e3:.0f} ms, durable "
            f"{res['steady_durable_s'] * 1e3:.0f} ms, load {res['load_s'] * 1e3:.0f} ms")


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def finish(results: dict[str, Any], out: Path, plots: bool) -> str:
    cfg = results["config"]
    results["summary"] = report.aggregate(results["runs"], cfg["workloads"], cfg["contenders"])
    results["plots"] = report.plot(results, out) if plots else {}
    notes = []
    for w in results["summary"].values():
        for n, e in w["contenders"].items():
            if e.get("status") not in ("ok",) and e.get("reason"):
                notes.append(f"{e['label']}: {e['status']} — {e['reason'].splitlines()[0][:300]}")
            for err in e.get("errors", []):
                notes.append(f"{e['label']}: one repeat failed — {err.splitlines()[0][:300]}")
    m = results.get("machine", {})
    cpus = m.get("usable_cpus") or m.get("logical_cpus") or 1
    busy = [la[0] for la in (m.get("loadavg_before"), m.get("loadavg_after")) if la]
    if busy and max(busy) > 0.5 * cpus:
        notes.append(f"the machine was busy (1-min load average {max(busy):.1f} on {cpus} CPUs "
                     "around this run): figures are noisy; compare spreads, rerun on a quiet host")
    results["notes"] = sorted(set(notes))
    md = report.render_markdown(results)
    (out / "report.md").write_text(md)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return md


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    if args.report_only:
        results = json.loads(args.report_only.read_text())
        md = finish(results, out, not args.no_plots)
        print(md)
        return 0

    size = args.size or ((64 << 20) if args.quick else (1 << 30))
    repeats = args.repeats or (1 if args.quick else 3)
    threads = args.raw_threads or ([1, 2, 4] if args.quick else list(range(1, 9)))
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    for c in contenders:
        if c not in CONTENDERS:
            raise SystemExit(f"unknown contender {c!r}; choose from {', '.join(CONTENDERS)}")
    args.saves = args.saves or (5 if args.quick else 10)
    if args.saves < 3:
        raise SystemExit("--saves must be >= 3 (steady state and RSS drift need saves 2..N)")
    target = (args.target_dir or (out / "scratch")).resolve()
    target.mkdir(parents=True, exist_ok=True)
    log = out / "workers.log"
    log.write_text("")

    from . import sysinfo

    results: dict[str, Any] = {
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "config": {"size_bytes": size, "repeats": repeats, "saves": args.saves,
                   "quick": args.quick, "workloads": workloads, "contenders": contenders,
                   "raw_threads": threads, "drop_caches": args.drop_caches,
                   "target_dir": str(target), "python": args.python,
                   "extra_path": args.extra_path},
        "machine": sysinfo.describe(target),
        "runs": [],
    }
    load_before = _loadavg()

    # Round-robin: every round runs every (workload, contender) once, with the order rotated
    # each round so no contender always runs first (cold machine) or last.
    unavailable: set[str] = set()
    plan: list[tuple[int, str, str]] = []
    for r in range(repeats):
        for wi, w in enumerate(workloads):
            for c in _rotate(contenders + ["limits"], r + wi):
                plan.append((r, w, c))
    bar = _Progress(len(plan))
    try:
        for r, w, c in plan:
            if c in unavailable:
                bar.step()
                continue
            bar.describe(f"r{r + 1}/{repeats} {w}: {c}")
            spec = {"contender": c, "workload": w, "size_bytes": size, "quick": args.quick,
                    "saves": args.saves, "workdir": str(target / f"{c}-{w}-r{r}"),
                    "drop_caches": args.drop_caches, "raw_threads": threads, "repeat": r}
            res = run_worker(spec, args, log)
            from asyncckpt.tools.fsutil import remove

            remove(spec["workdir"])
            if res.get("status") == "unavailable":
                unavailable.add(c)
            results["runs"].append(res)
            (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
            bar.step(_note(res))
    finally:
        bar.close()
        results["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
        results["machine"]["loadavg_before"] = load_before
        results["machine"]["loadavg_after"] = _loadavg()
        md = finish(results, out, not args.no_plots)
    print(md)
    print(f"wrote {out / 'report.md'}, {out / 'results.json'}"
          + "".join(f", {out / p}" for p in results.get("plots", {}).values()), file=sys.stderr)
    return 0
