"""Batched vs per-tensor XLA<->host transfer on the CPU PJRT backend (numbers quoted in docs/xla.md).

    PJRT_DEVICE=CPU PYTHONPATH=. ~/.cache/asyncckpt/xla-venv/bin/python tests/xla/bench_transfer.py

Not collected by pytest (the file name does not start with test_).
"""

from __future__ import annotations

import math
import os
import statistics
import time

os.environ.setdefault("PJRT_DEVICE", "CPU")

import torch  # noqa: E402
import torch_xla  # noqa: E402

from asyncckpt.snapshot import xla  # noqa: E402


def make_host(n: int = 200, total_bytes: int = 200 << 20, seed: int = 0) -> list[torch.Tensor]:
    """n tensors, sizes log-uniform between 1 KiB and 8 MiB then scaled to total_bytes; 3 in 4 fp32, 1 in 4 bf16."""
    g = torch.Generator().manual_seed(seed)
    logs = torch.rand(n, generator=g) * (math.log(8 << 20) - math.log(1 << 10)) + math.log(1 << 10)
    raw = logs.exp()
    nbytes = (raw / raw.sum() * total_bytes).long().clamp(min=64)
    out = []
    for i, b in enumerate(nbytes.tolist()):
        dtype = torch.bfloat16 if i % 4 == 3 else torch.float32
        out.append(torch.randn(max(1, b // dtype.itemsize), generator=g).to(dtype))
    return out


def timed(fns: list, repeats: int = 5) -> list[list[float]]:
    """Per function: `repeats` timed runs, interleaved round-robin (so load from other processes hits every
    variant alike), after one untimed warm-up run each (first-touch page faults, allocator growth)."""
    for fn in fns:
        fn()
    runs: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, r in zip(fns, runs):
            torch_xla.sync(wait=True)
            t0 = time.perf_counter()
            fn()
            r.append(time.perf_counter() - t0)
    return runs


def main() -> None:
    host = make_host()
    total = sum(t.numel() * t.element_size() for t in host)
    dev = torch_xla.device()
    dev_tensors = xla.to_xla(host, dev)
    torch_xla.sync(wait=True)
    print(f"{len(host)} tensors, {total / 2**20:.1f} MiB, torch {torch.__version__}, torch_xla {torch_xla.__version__}, "
          f"{os.cpu_count()} CPUs")
    rows = [
        ("device->host  xla.to_cpu (one batched call)", lambda: xla.to_cpu(dev_tensors)),
        ("device->host  t.cpu() per tensor", lambda: [t.cpu() for t in dev_tensors]),
        ("host->device  xla.to_xla (one batched call)", lambda: xla.to_xla(host, dev)),
        ("host->device  t.to(dev) per tensor", lambda: [t.to(dev) for t in host]),
    ]
    for (name, _), runs in zip(rows, timed([fn for _, fn in rows])):
        med = statistics.median(runs)
        print(f"{name:46s} median {med * 1e3:8.1f} ms  ({total / med / 2**30:5.2f} GiB/s)  runs "
              + " ".join(f"{r * 1e3:.0f}" for r in runs))


if __name__ == "__main__":
    main()
