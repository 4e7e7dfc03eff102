"""A short description of the machine and of the file system under the target directory."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _cpu_model() -> str:
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.lower().startswith(("model name", "hardware", "cpu model")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _mem_total() -> int | None:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return None


def _mount_of(path: Path) -> dict[str, Any]:
    real = str(path.resolve())
    best: dict[str, Any] = {}
    for line in (_read("/proc/mounts") or "").splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        dev, mnt, fstype, opts = parts[:4]
        mnt = mnt.replace("\\040", " ")
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best.get("mount", "")):
            best = {"device": dev, "mount": mnt, "fstype": fstype, "options": opts}
    dev = best.get("device", "")
    if dev.startswith("/dev/"):
        name = os.path.basename(os.path.realpath(dev))
        # partition -> parent disk in sysfs
        sys_block = Path("/sys/class/block") / name
        disk = name
        if (sys_block / "partition").exists():
            disk = sys_block.resolve().parent.name
        q = Path("/sys/block") / disk / "queue"
        rot = _read(str(q / "rotational"))
        best["rotational"] = None if rot is None else rot == "1"
        best["disk_model"] = _read(f"/sys/block/{disk}/device/model")
        best["scheduler"] = _read(str(q / "scheduler"))
    try:
        st = os.statvfs(real)
        best["free_bytes"] = st.f_bavail * st.f_frsize
        best["size_bytes"] = st.f_blocks * st.f_frsize
    except OSError:
        pass
    return best


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def describe(target_dir: Path) -> dict[str, Any]:
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "ram_bytes": _mem_total(),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "lightning": _version("lightning"),
        "psutil": _version("psutil"),
        "target_dir": str(target_dir.resolve()),
        "target_fs": _mount_of(target_dir),
        "uid": os.getuid() if hasattr(os, "getuid") else None,
    }
