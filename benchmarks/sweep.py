"""The synthetic workload at several sizes, asyncckpt against its peers at each (small states expose fixed costs).

    python -m benchmarks sweep [--sizes 10MiB,64MiB,1GiB,4GiB] [--repeats 3] [--out DIR]

Runs the main harness once per size (``DIR/size-<size>``) and prints, per size, the targets that fixed costs decide:
steady blocking against every peer, time to durable against ``torch.save`` + fsync, load (in place) against
``torch.load``. Sizes that do not fit in a quarter of RAM are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from . import report
from .cli import main as harness, parse_size

PEERS = ["torch.save", "lightning-async", "dcp-async"]


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    w = report.aggregate(results["runs"], ["synthetic"], [*PEERS, "asyncckpt"])["synthetic"]
    def med(entry: dict[str, Any], key: str) -> float | None:
        return entry[key]["median"] if entry.get("status") == "ok" and entry.get(key) else None

    ours = w["contenders"]["asyncckpt"]
    out: dict[str, Any] = {"bytes": w["bytes"], "ours": {k: med(ours, k) for k in
                                                        ("steady_blocking_s", "steady_durable_s", "load_s")}}
    for p in PEERS:
        out[p] = {k: med(w["contenders"][p], k) for k in ("steady_blocking_s", "steady_durable_s", "load_s")}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10MiB,64MiB,1GiB,4GiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-out/sweep"))
    args = parser.parse_args(argv)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows = []
    for text in args.sizes.split(","):
        size = parse_size(text)
        if size > ram // 4:
            print(f"skipping {text}: more than a quarter of RAM")
            continue
        out = args.out / f"size-{text}"
        harness(["--workloads", "synthetic", "--size", text, "--repeats", str(args.repeats), "--no-plots",
                 "--contenders", ",".join([*PEERS, "asyncckpt"]), "--out", str(out)])
        rows.append((text, summarize(json.loads((out / "results.json").read_text()))))
    print("\n| size | blocking: ours / best peer | durable: ours / torch.save | load in place: ours / torch.load |")
    print("|---|---|---|---|")
    for text, s in rows:
        o = s["ours"]
        best = min((s[p]["steady_blocking_s"] for p in PEERS if s[p]["steady_blocking_s"]), default=None)
        ts = s["torch.save"]
        fmt = lambda a, b: f"{a * 1e3:.1f} / {b * 1e3:.1f} ms = {a / b:.2f}x" if a and b else "n/a"  # noqa: E731
        print(f"| {text} | {fmt(o['steady_blocking_s'], best)} | {fmt(o['steady_durable_s'], ts['steady_durable_s'])}"
              f" | {fmt(o['load_s'], ts['load_s'])} |")
    report.write_json(args.out, "sweep.json", dict(rows))
    return 0
