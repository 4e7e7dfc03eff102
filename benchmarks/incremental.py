"""Incremental saves while fine-tuning with a frozen backbone, and an embedding whose rows are sparsely touched.

    python -m benchmarks incremental [--mib 256] [--rounds 3] [--out DIR]

Figures, in one run: bytes written per incremental save against the trainable part (weights and Adam's state) plus
the manifest, and time to durable of an incremental save against a full save of the same state.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import asyncckpt

from .report import write_json

MiB = 1 << 20


def finetune(mib: int) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    """A backbone of ~90% of the parameters, frozen, and a trainable head with Adam."""
    torch.manual_seed(0)
    width = 1024
    layers = max(1, int(mib * MiB * 0.9 / (width * width * 4)))
    backbone = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    for p in backbone.parameters():
        p.requires_grad_(False)
    head = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(max(1, layers // 27))])
    return backbone, head, torch.optim.Adam(head.parameters(), lr=1e-4)


def trainable_bytes(head: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    weights = sum(p.numel() * p.element_size() for p in head.parameters())
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                  if isinstance(t, torch.Tensor))
    return weights + moments


def step(backbone: torch.nn.Module, head: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    loss = head(backbone(torch.randn(16, 1024))).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def run(mib: int, rounds: int, trust: bool) -> dict[str, Any]:
    backbone, head, opt = finetune(mib)
    step(backbone, head, opt)
    state = {"backbone": backbone, "head": head, "opt": opt}
    plain_s, full_s, inc_s, inc_bytes, manifest_bytes = [], [], [], [], []
    with tempfile.TemporaryDirectory(dir=".") as d, asyncckpt.SyncEngine() as engine:
        for r in range(rounds):
            t0 = time.perf_counter()
            engine.save(state, f"{d}/plain-{r}").result()  # a full save as any other: no digests
            plain_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            engine.save(state, f"{d}/full-{r}", digests=True, trust_versions=trust).result()
            full_s.append(time.perf_counter() - t0)
            step(backbone, head, opt)
            t0 = time.perf_counter()
            res = engine.save(state, f"{d}/inc-{r}", base=f"{d}/full-{r}", trust_versions=trust).result()
            inc_s.append(time.perf_counter() - t0)
            inc_bytes.append(res.bytes_written)
            manifest_bytes.append(Path(d, f"inc-{r}", "manifest.json").stat().st_size)
            step(backbone, head, opt)
    trainable = trainable_bytes(head, opt)
    total = sum(t.numel() * t.element_size() for t in backbone.state_dict().values()) + trainable
    return {"state_bytes": total, "trainable_bytes": trainable, "trust_versions": trust,
            "plain_durable_s": statistics.median(plain_s), "full_durable_s": statistics.median(full_s),
            "incremental_durable_s": statistics.median(inc_s),
            "incremental_bytes": statistics.median(inc_bytes), "manifest_bytes": statistics.median(manifest_bytes)}


def embedding(rows: int = 200_000, dim: int = 256, touched: float = 0.01) -> dict[str, Any]:
    """A 1%-of-rows update: the whole table is one tensor, so a tensor-level comparison writes it again."""
    table = torch.randn(rows, dim)
    with tempfile.TemporaryDirectory(dir=".") as d, asyncckpt.SyncEngine() as engine:
        engine.save({"emb": table}, f"{d}/a", digests=True).result()
        idx = torch.randperm(rows)[: int(rows * touched)]
        table[idx] += 1
        res = engine.save({"emb": table}, f"{d}/b", base=f"{d}/a").result()
    return {"table_bytes": table.nbytes, "rows_touched": len(idx), "incremental_bytes": res.bytes_written}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks incremental", description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    results = {"content": run(args.mib, args.rounds, False), "trust_versions": run(args.mib, args.rounds, True),
               "embedding": embedding()}
    for name in ("content", "trust_versions"):
        r = results[name]
        budget = 1.1 * r["trainable_bytes"] + r["manifest_bytes"]
        print(f"{name:15s}: state {r['state_bytes'] / MiB:.0f} MiB, trainable {r['trainable_bytes'] / MiB:.1f} MiB; "
              f"incremental writes {r['incremental_bytes'] / MiB:.2f} MiB ({r['incremental_bytes'] / budget:.2f}x "
              f"of 1.1x trainable + manifest); durable {r['incremental_durable_s'] * 1e3:.0f} ms vs a full save "
              f"{r['plain_durable_s'] * 1e3:.0f} ms = {r['incremental_durable_s'] / r['plain_durable_s']:.2f}x "
              f"(full save recording digests: {r['full_durable_s'] * 1e3:.0f} ms)")
    e = results["embedding"]
    print(f"embedding      : {e['rows_touched']} of {e['table_bytes'] // (256 * 4)} rows touched; the incremental "
          f"save writes {e['incremental_bytes'] / MiB:.1f} MiB of a {e['table_bytes'] / MiB:.1f} MiB table")
    write_json(args.out, "incremental.json", results)
    return 0
