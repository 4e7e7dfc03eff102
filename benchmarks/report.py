"""Turn the raw per-run results into medians, ratios, PASS/MISS verdicts, Markdown and PNG plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from .contenders import CONTENDERS, OURS, PEERS


def write_json(out: Path | None, name: str, data: Any) -> None:
    """Keep a workload's raw figures as ``out/name`` (nothing without ``--out``)."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(data, indent=2, default=str))

MiB = 1 << 20
GiB = 1 << 30

# Metric -> (per-run extractor key, unit). Times in seconds, sizes in bytes.
TIME_METRICS = ("first_blocking_s", "steady_blocking_s", "first_durable_s", "steady_durable_s",
                "load_s")
MEM_METRICS = ("save_peak_rss_growth", "rss_drift", "load_peak_rss_growth")

# Target thresholds (see docs/benchmarks.md).
BLOCKING_VS_FLOOR = 1.25
DEFERRED_VS_FLOOR = 0.05
DURABLE_VS_RAW = 0.85
DURABLE_VS_PEERS = 2.0
LOAD_VS_RAW = 0.85
BUDGET_SLACK = 64 * MiB
DRIFT_TOLERANCE_MIN = 16 * MiB
DRIFT_TOLERANCE_FRAC = 0.01


def stat(values: list[float]) -> dict[str, Any] | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def label(name: str) -> str:
    c = CONTENDERS.get(name)
    return c.label if c else name


def aggregate(runs: list[dict[str, Any]], workloads: list[str], contenders: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for w in workloads:
        wruns = [r for r in runs if r.get("workload") == w]
        lim = [r for r in wruns if r.get("contender") == "limits" and r.get("status") == "ok"]
        nbytes = next((r["bytes"] for r in wruns if r.get("bytes")), None)
        info = next((r["workload_info"] for r in wruns if r.get("workload_info")), {})
        limits: dict[str, Any] = {}
        if lim:
            limits = {
                "copy_floor_s": stat([r["copy_floor"]["seconds"] for r in lim]),
                "copy_floor_gbps": stat([r["copy_floor"]["gbps"] for r in lim]),
                "raw_write_s": stat([r["raw_write"]["seconds"] for r in lim]),
                "raw_write_gbps": stat([r["raw_write"]["gbps"] for r in lim]),
                "raw_read_s": stat([r["raw_read"]["seconds"] for r in lim]),
                "raw_read_gbps": stat([r["raw_read"]["gbps"] for r in lim]),
                "raw_write_mode": sorted({r["raw_write"]["mode"] for r in lim}),
                "raw_write_threads": [r["raw_write"]["threads"] for r in lim],
                "raw_read_mode": sorted({r["raw_read"]["mode"] for r in lim}),
                "raw_read_threads": [r["raw_read"]["threads"] for r in lim],
                "evict": sorted({r["raw_read"].get("evict", "") for r in lim} - {""}),
            }
        cons: dict[str, Any] = {}
        for c in contenders:
            cr = [r for r in wruns if r.get("contender") == c]
            ok = [r for r in cr if r.get("status") == "ok"]
            entry: dict[str, Any] = {"label": label(c), "runs": len(ok), "is_ours": c in OURS}
            if not cr:
                entry["status"] = "not run"
            elif not ok:
                bad = cr[-1]
                entry["status"] = bad.get("status", "error")
                entry["reason"] = bad.get("reason") or bad.get("error", "")
            else:
                entry["status"] = "ok"
                errs = [r for r in cr if r.get("status") == "error"]
                if errs:
                    entry["errors"] = [r.get("error", "") for r in errs]
                for m in TIME_METRICS + MEM_METRICS:
                    entry[m] = stat([r.get(m) for r in ok])
                b = ok[0]["bytes"]
                entry["durable_gbps"] = stat([b / r["steady_durable_s"] / 1e9 for r in ok])
                entry["load_gbps"] = stat([b / r["load_s"] / 1e9 for r in ok])
                entry["load_verified"] = all(r.get("load_verified") for r in ok)
                entry["bytes_on_disk"] = ok[0].get("bytes_on_disk")
                entry["evict"] = sorted({r.get("evict", "") for r in ok})
                if "budget_bytes" in ok[0]:
                    entry["budget_bytes"] = ok[0]["budget_bytes"]
                entry["worst_save_peak_rss_growth"] = max(r["save_peak_rss_growth"] for r in ok)
                drifts = [r["rss_drift"] for r in ok if r.get("rss_drift") is not None]
                entry["worst_rss_drift"] = max(drifts) if drifts else None
            cons[c] = entry
        wsum = {"bytes": nbytes, "info": info, "limits": limits, "contenders": cons}
        wsum["ratios"] = ratios(wsum)
        wsum["targets"] = targets(wsum)
        out[w] = wsum
    return out


def _med(entry: dict[str, Any] | None, key: str) -> float | None:
    if not entry or entry.get("status") != "ok" or not entry.get(key):
        return None
    return entry[key]["median"]


def _ok_peers(w: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: e for n, e in w["contenders"].items() if n in PEERS and e.get("status") == "ok"}


def ratios(w: dict[str, Any]) -> dict[str, Any]:
    lim = w["limits"]
    floor = lim.get("copy_floor_s", {}) and lim["copy_floor_s"]["median"]
    wr = lim.get("raw_write_gbps", {}) and lim["raw_write_gbps"]["median"]
    rd = lim.get("raw_read_gbps", {}) and lim["raw_read_gbps"]["median"]
    peers = _ok_peers(w)
    best_block = min((_med(e, "steady_blocking_s") for e in peers.values()), default=None)
    best_dur = min((_med(e, "steady_durable_s") for e in peers.values()), default=None)
    best_load = min((_med(e, "load_s") for e in peers.values()), default=None)
    out: dict[str, Any] = {}
    for n, e in w["contenders"].items():
        if e.get("status") != "ok":
            continue
        sb, sd, ld = _med(e, "steady_blocking_s"), _med(e, "steady_durable_s"), _med(e, "load_s")
        out[n] = {
            "blocking_vs_floor": sb / floor if floor else None,
            "durable_vs_raw_write": _med(e, "durable_gbps") / wr if wr else None,
            "load_vs_raw_read": _med(e, "load_gbps") / rd if rd else None,
            "blocking_vs_best_peer": sb / best_block if best_block else None,
            "durable_vs_best_peer": sd / best_dur if best_dur else None,
            "load_vs_best_peer": ld / best_load if best_load else None,
        }
    return out


def _verdict(ok: bool | None) -> str:
    return "N/A" if ok is None else ("PASS" if ok else "MISS")


def targets(w: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, judged for asyncckpt's native engine (and the budget run)."""
    ours = w["contenders"].get("asyncckpt", {})
    lim = w["limits"]
    peers = _ok_peers(w)
    res: list[dict[str, Any]] = []

    def add(name: str, value: str, threshold: str, ok: bool | None) -> None:
        res.append({"target": name, "value": value, "threshold": threshold, "result": _verdict(ok)})

    sb = _med(ours, "steady_blocking_s")
    floor = lim["copy_floor_s"]["median"] if lim.get("copy_floor_s") else None
    add("steady blocking <= 1.25x copy floor",
        _fmt_s(sb) + (f" = {sb / floor:.2f}x floor" if sb and floor else ""),
        f"<= {_fmt_s(floor * BLOCKING_VS_FLOOR) if floor else '?'}",
        None if sb is None or floor is None else sb <= BLOCKING_VS_FLOOR * floor)
    for p, e in peers.items():
        pv = _med(e, "steady_blocking_s")
        add(f"steady blocking <= {label(p)}", _fmt_s(sb), f"<= {_fmt_s(pv)}",
            None if sb is None or pv is None else sb <= pv)

    deferred = w["contenders"].get("asyncckpt-deferred", {})
    if deferred.get("status") == "ok":
        db = _med(deferred, "steady_blocking_s")
        add("deferred: save returns <= 0.05x copy floor",
            _fmt_s(db) + (f" = {db / floor:.3f}x floor" if db and floor else ""),
            f"<= {_fmt_s(floor * DEFERRED_VS_FLOOR) if floor else '?'}",
            None if db is None or floor is None else db <= DEFERRED_VS_FLOOR * floor)

    dg = _med(ours, "durable_gbps")
    wr = lim["raw_write_gbps"]["median"] if lim.get("raw_write_gbps") else None
    add("durable throughput >= 0.85x raw write",
        _fmt_gbps(dg) + (f" = {dg / wr:.2f}x raw" if dg and wr else ""),
        f">= {_fmt_gbps(wr * DURABLE_VS_RAW) if wr else '?'}",
        None if dg is None or wr is None else dg >= DURABLE_VS_RAW * wr)
    sd = _med(ours, "steady_durable_s")
    for p, e in peers.items():
        pv = _med(e, "steady_durable_s")
        add(f"time to durable >= 2x faster than {label(p)}",
            _fmt_s(sd) + (f" ({pv / sd:.2f}x faster)" if sd and pv else ""),
            f"<= {_fmt_s(pv / DURABLE_VS_PEERS) if pv else '?'}",
            None if sd is None or pv is None else sd * DURABLE_VS_PEERS <= pv)

    lg = _med(ours, "load_gbps")
    rd = lim["raw_read_gbps"]["median"] if lim.get("raw_read_gbps") else None
    add("load throughput >= 0.85x raw read",
        _fmt_gbps(lg) + (f" = {lg / rd:.2f}x raw" if lg and rd else ""),
        f">= {_fmt_gbps(rd * LOAD_VS_RAW) if rd else '?'}",
        None if lg is None or rd is None else lg >= LOAD_VS_RAW * rd)
    ls = _med(ours, "load_s")
    tl = _med(w["contenders"].get("torch.save"), "load_s")
    add("load faster than torch.load", _fmt_s(ls), f"< {_fmt_s(tl)}",
        None if ls is None or tl is None else ls < tl)

    drift = ours.get("worst_rss_drift") if ours.get("status") == "ok" else None
    nbytes = w.get("bytes") or 0
    tol = max(DRIFT_TOLERANCE_MIN, int(DRIFT_TOLERANCE_FRAC * nbytes))
    add("no RSS growth over the saves (worst repeat, RSS after last - after 2nd)", _fmt_b(drift),
        f"<= {_fmt_b(tol)}", None if drift is None else drift <= tol)

    b = w["contenders"].get("asyncckpt-budget", {})
    if b.get("status") == "ok" and b.get("budget_bytes"):
        peak = b["worst_save_peak_rss_growth"]
        lim_b = b["budget_bytes"] + BUDGET_SLACK
        add("budget run: peak RSS growth <= budget + 64 MiB (worst repeat)", _fmt_b(peak),
            f"<= {_fmt_b(lim_b)} (budget {_fmt_b(b['budget_bytes'])})", peak <= lim_b)
    else:
        add("budget run: peak RSS growth <= budget + 64 MiB (worst repeat)", "-",
            "budget + 64 MiB", None)
    return res


# ------------------------------------------------------------------------------- formatting


def _fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 1e-3:
        return f"{v * 1e6:.0f} µs"
    if v < 1:
        return f"{v * 1e3:.1f} ms"
    return f"{v:.2f} s"


def _fmt_gbps(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} GB/s"


def _fmt_b(v: float | None) -> str:
    if v is None:
        return "-"
    sign = "-" if v < 0 else ""
    v = abs(v)
    if v >= GiB:
        return f"{sign}{v / GiB:.2f} GiB"
    if v >= MiB:
        return f"{sign}{v / MiB:.1f} MiB"
    return f"{sign}{v / 1024:.0f} KiB"


def _cell(s: dict[str, Any] | None, fmt: Any) -> str:
    if not s:
        return "-"
    if s["n"] == 1 or s["min"] == s["max"]:
        return fmt(s["median"])
    return f"{fmt(s['median'])} ({fmt(s['min'])}–{fmt(s['max'])})"


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def contender_table(w: dict[str, Any]) -> str:
    head = ("| contender | first blocking | steady blocking | x floor | x best peer | "
            "time to durable | durable GB/s | x raw write | load | load GB/s | x raw read | "
            "peak RSS growth (save) | RSS drift | peak RSS growth (load) | load ok |")
    ncols = head.count("|") - 1
    lines = [head, "|" + "---|" * ncols]
    for n, e in w["contenders"].items():
        if e.get("status") != "ok":
            reason = (e.get("reason") or "").splitlines()[0][:160] if e.get("reason") else ""
            lines.append(f"| {e['label']} | {e['status']}: {reason} |" + " |" * (ncols - 2))
            continue
        r = w["ratios"].get(n, {})
        lines.append(
            f"| {e['label']} | {_cell(e['first_blocking_s'], _fmt_s)} | "
            f"{_cell(e['steady_blocking_s'], _fmt_s)} | {_ratio(r.get('blocking_vs_floor'))} | "
            f"{_ratio(r.get('blocking_vs_best_peer'))} | {_cell(e['steady_durable_s'], _fmt_s)} | "
            f"{_cell(e['durable_gbps'], lambda v: f'{v:.2f}')} | "
            f"{_ratio(r.get('durable_vs_raw_write'))} | {_cell(e['load_s'], _fmt_s)} | "
            f"{_cell(e['load_gbps'], lambda v: f'{v:.2f}')} | {_ratio(r.get('load_vs_raw_read'))} | "
            f"{_cell(e['save_peak_rss_growth'], _fmt_b)} | {_cell(e['rss_drift'], _fmt_b)} | "
            f"{_cell(e['load_peak_rss_growth'], _fmt_b)} | "
            f"{'yes' if e['load_verified'] else 'NO'} |")
    return "\n".join(lines)


def limits_table(w: dict[str, Any]) -> str:
    lim = w["limits"]
    if not lim:
        return "_limits not measured_"
    return "\n".join([
        "| limit | time | throughput | how |",
        "|---|---|---|---|",
        f"| copy floor (into preallocated host buffers) | {_cell(lim['copy_floor_s'], _fmt_s)} | "
        f"{_cell(lim['copy_floor_gbps'], lambda v: f'{v:.2f} GB/s')} | torch copy_, best of 5 "
        f"(default and 1 intra-op thread) |",
        f"| raw write + fsync | {_cell(lim['raw_write_s'], _fmt_s)} | "
        f"{_cell(lim['raw_write_gbps'], lambda v: f'{v:.2f} GB/s')} | "
        f"{', '.join(lim['raw_write_mode'])} pwrite, best thread count per repeat: "
        f"{lim['raw_write_threads']} |",
        f"| raw read (cold) | {_cell(lim['raw_read_s'], _fmt_s)} | "
        f"{_cell(lim['raw_read_gbps'], lambda v: f'{v:.2f} GB/s')} | "
        f"best of {', '.join(lim['raw_read_mode'])} preadv, threads {lim['raw_read_threads']}; "
        f"cache eviction: {', '.join(lim['evict']) or 'n/a'} |",
    ])


def targets_table(w: dict[str, Any]) -> str:
    lines = ["| target (asyncckpt) | measured | threshold | result |", "|---|---|---|---|"]
    for t in w["targets"]:
        res = f"**{t['result']}**" if t["result"] != "N/A" else "N/A"
        lines.append(f"| {t['target']} | {t['value']} | {t['threshold']} | {res} |")
    return "\n".join(lines)


def machine_table(m: dict[str, Any]) -> str:
    fs = m.get("target_fs", {})
    disk = fs.get("device", "?")
    if fs.get("disk_model"):
        disk += f" ({fs['disk_model']})"
    if fs.get("rotational") is not None:
        disk += ", rotational" if fs["rotational"] else ", non-rotational"
        disk += " (per the kernel)"
    rows = [
        ("CPU", f"{m.get('cpu_model')} — {m.get('logical_cpus')} logical CPUs "
                f"({m.get('usable_cpus')} usable), torch threads {m.get('torch_threads')}"),
        ("RAM", _fmt_b(m.get("ram_bytes"))),
        ("target dir", f"{m.get('target_dir')}"),
        ("file system", f"{fs.get('fstype', '?')} on {disk}, mounted at {fs.get('mount', '?')} "
                        f"({fs.get('options', '')}); free {_fmt_b(fs.get('free_bytes'))}"),
        ("OS", f"{m.get('os')}"),
        ("Python / torch", f"{m.get('python')} / {m.get('torch')}"),
        ("lightning", str(m.get("lightning"))),
        ("load average (1/5/15 min) before / after", f"{m.get('loadavg_before')} / "
                                                     f"{m.get('loadavg_after')}"),
    ]
    return "\n".join(["| | |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])


def render_markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    parts = [
        "# asyncckpt benchmark report",
        "",
        f"Run at {results.get('started', '?')}; {cfg['repeats']} repeat(s), {cfg['saves']} "
        f"consecutive saves per measurement, contenders alternated round-robin, each measurement "
        f"in a fresh process. Cells show the median over repeats with (min–max). "
        f"GB/s = 10^9 bytes/s of tensor payload.",
        "",
        "## Machine",
        "",
        machine_table(results["machine"]),
    ]
    for wname, w in results["summary"].items():
        info = w.get("info", {})
        desc = ", ".join(f"{k}={v}" for k, v in info.items() if k not in ("kind",))
        parts += [
            "",
            f"## Workload `{wname}` — {_fmt_b(w.get('bytes'))} of tensors",
            "",
            f"{desc}",
            "",
            "### Physical limits (same run, same directory)",
            "",
            limits_table(w),
            "",
            "### Contenders",
            "",
            contender_table(w),
            "",
            "### Targets",
            "",
            targets_table(w),
        ]
        plot = results.get("plots", {}).get(wname)
        if plot:
            parts += ["", f"![{wname}]({plot})"]
    notes = results.get("notes") or []
    if notes:
        parts += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------ plots


def plot(results: dict[str, Any], out_dir: Path) -> dict[str, str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    files: dict[str, str] = {}
    for wname, w in results["summary"].items():
        cons = [(n, e) for n, e in w["contenders"].items() if e.get("status") == "ok"]
        if not cons:
            continue
        lim = w["limits"]
        fig, axes = plt.subplots(2, 2, figsize=(13, 9))
        names = [e["label"] for _, e in cons]
        colors = ["tab:green" if e["is_ours"] else "tab:gray" for _, e in cons]
        x = range(len(cons))

        def bars(ax: Any, key: str, scale: float, ylabel: str, title: str,
                 line: float | None, line_label: str) -> None:
            med = [e[key]["median"] * scale if e.get(key) else 0 for _, e in cons]
            lo = [m - e[key]["min"] * scale if e.get(key) else 0 for m, (_, e) in zip(med, cons)]
            hi = [e[key]["max"] * scale - m if e.get(key) else 0 for m, (_, e) in zip(med, cons)]
            ax.bar(x, med, color=colors, yerr=[lo, hi], capsize=4)
            if line:
                ax.axhline(line, color="tab:red", linestyle="--", label=line_label)
                ax.legend(loc="best", fontsize=8)
            ax.set_xticks(list(x))
            ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=10)

        floor = lim["copy_floor_s"]["median"] * 1e3 if lim.get("copy_floor_s") else None
        bars(axes[0][0], "steady_blocking_s", 1e3, "ms", "steady-state blocking time per save",
             floor, "copy floor")
        first = [e["first_blocking_s"]["median"] * 1e3 for _, e in cons]
        axes[0][0].scatter(list(x), first, marker="x", color="black", zorder=3, label="first save")
        axes[0][0].legend(loc="best", fontsize=8)
        bars(axes[0][1], "durable_gbps", 1.0, "GB/s", "durable throughput (save start -> fsynced)",
             lim["raw_write_gbps"]["median"] if lim.get("raw_write_gbps") else None,
             "raw write + fsync")
        bars(axes[1][0], "load_gbps", 1.0, "GB/s", "load throughput (cold, into existing model)",
             lim["raw_read_gbps"]["median"] if lim.get("raw_read_gbps") else None, "raw read")
        bars(axes[1][1], "save_peak_rss_growth", 1 / MiB, "MiB",
             "peak RSS growth over the saves", None, "")
        b = w["contenders"].get("asyncckpt-budget", {})
        if b.get("budget_bytes"):
            axes[1][1].axhline((b["budget_bytes"] + BUDGET_SLACK) / MiB, color="tab:red",
                               linestyle="--", label="budget + 64 MiB (budget run)")
            axes[1][1].legend(loc="best", fontsize=8)
        fig.suptitle(f"workload {wname}: {_fmt_b(w.get('bytes'))} of tensors "
                     f"(green = asyncckpt, error bars = min/max over repeats)")
        fig.tight_layout()
        name = f"{wname}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        files[wname] = name
    return files
