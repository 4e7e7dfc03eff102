"""S3 throughput: asyncckpt save/load vs raw s3fs on the same bytes, against the same S3 endpoint.

    python -m benchmarks s3 [--mib 256] [--repeat 3] [--chunk-mib 32] [--concurrency 8] [--out DIR]

Without ``--endpoint`` it starts a moto server on a loopback port (moto[server] is in the dev extra).

Contenders, all writing/reading the same total bytes (float32 tensors of ``--tensor-mib`` each):

* ``asyncckpt``       — ``engine.save(state, s3://…)`` until committed, then ``engine.load`` (checksums verified);
  after one untimed save that opens the store's session (the raw clients open theirs untimed too) and fills the
  staging buffers, as any save after a run's first does.
* ``s3fs one object`` — ``fs._pipe_file`` of all bytes as one object (s3fs's own concurrent multipart upload),
  ``fs._cat_file`` of it (s3fs's own concurrent ranged reads).
* ``s3fs per tensor`` — ``fs._pipe`` / ``fs._cat`` of one object per tensor (s3fs batches them concurrently).
* ``s3torchconnector`` — AWS's PyTorch connector (its CRT client): ``S3Checkpoint`` writer/reader streams around
  ``torch.save`` / ``torch.load``, and its DCP ``S3StorageWriter`` / ``S3StorageReader`` (``dcp.save`` / ``dcp.load``
  in one process). Not a dependency: install it beside and point ``--extra-path`` at it
  (``pip install --no-deps --target /tmp/s3tc s3torchconnector s3torchconnectorclient``); without it these rows say
  why they are missing. Its DCP classes take no endpoint, so the bench gives them a client built with one.

Moto is a Python server in one process, so absolute numbers say little about a real S3 endpoint; the point is the
ratio: the engine's own overhead (snapshot, checksums, manifest) against a raw client moving the same bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from typing import Any

import torch

import asyncckpt
from asyncckpt.testing import MotoServer

MiB = 1 << 20
DEFAULT_CHUNK_MIB = 32  # the engine's default chunk_bytes, in MiB
DEFAULT_CONCURRENCY = 8  # the engine's default write_concurrency

def make_state(total_mib: int, tensor_mib: int) -> dict[str, torch.Tensor]:
    n = max(1, total_mib // tensor_mib)
    g = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(tensor_mib * MiB // 4, generator=g) for i in range(n)}


def engine_options(args) -> dict:
    """The engine options the command line set; the rest stay the engine's defaults."""
    given = {"chunk_bytes": args.chunk_mib, "shard_bytes": args.shard_mib, "host_memory_budget": args.budget_mib}
    options = {k: v * MiB for k, v in given.items() if v is not None}
    if args.concurrency is not None:
        options["write_concurrency"] = args.concurrency
    return options


async def bench_engine(state, url, opts, args) -> tuple[float, float]:
    async with asyncckpt.CheckpointEngine(storage_options=opts, **engine_options(args)) as eng:
        # untimed, as the raw clients' set_session: the store's session and credentials, and staging buffers
        await (await eng.save(state, f"{url}-warm-up"))
        await eng.remove(f"{url}-warm-up")
        t0 = time.perf_counter()
        await (await eng.save(state, url))
        t_save = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = await eng.load(url)
        t_load = time.perf_counter() - t0
        assert all(torch.equal(out[k], v) for k, v in state.items())
        await eng.remove(url)
    return t_save, t_load


def s3tc_config(args) -> tuple[Any, Any]:
    """s3torchconnector's client config (path-style addressing, the part size of the others) and its module."""
    import s3torchconnector

    return s3torchconnector, s3torchconnector.S3ClientConfig(force_path_style=True, part_size=args.chunk_mib * MiB)


def bench_s3tc_checkpoint(state, url, endpoint, args) -> tuple[float, float]:
    s3tc, config = s3tc_config(args)
    checkpoint = s3tc.S3Checkpoint(region="us-east-1", endpoint=endpoint, s3client_config=config)
    t0 = time.perf_counter()
    with checkpoint.writer(url) as w:
        torch.save(state, w)
    t_save = time.perf_counter() - t0
    t0 = time.perf_counter()
    with checkpoint.reader(url) as r:
        back = torch.load(r, weights_only=True)
    t_load = time.perf_counter() - t0
    assert all(torch.equal(back[k], v) for k, v in state.items())
    return t_save, t_load


def bench_s3tc_dcp(state, url, endpoint, args) -> tuple[float, float]:
    import warnings

    import torch.distributed.checkpoint as dcp
    from s3torchconnector._s3client import S3Client
    from s3torchconnector.dcp import S3FileSystem, S3StorageReader, S3StorageWriter

    _, config = s3tc_config(args)

    def fs() -> Any:  # its DCP classes build a client without an endpoint: give them one that has it
        return S3FileSystem("us-east-1", s3_client=S3Client("us-east-1", endpoint=endpoint, s3client_config=config))

    writer = S3StorageWriter("us-east-1", url, s3client_config=config, thread_count=args.concurrency)
    writer.fs = fs()
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        t0 = time.perf_counter()
        dcp.save(state, storage_writer=writer, no_dist=True)
        t_save = time.perf_counter() - t0
        reader = S3StorageReader("us-east-1", url, s3client_config=config)
        reader.fs = fs()
        t0 = time.perf_counter()
        dcp.load(target, storage_reader=reader, no_dist=True)
        t_load = time.perf_counter() - t0
    assert all(torch.equal(target[k], v) for k, v in state.items())
    return t_save, t_load


async def bench_s3fs_one(blobs, path, opts, args) -> tuple[float, float]:
    import s3fs

    fs = s3fs.S3FileSystem(asynchronous=True, skip_instance_cache=True, max_concurrency=args.concurrency, **opts)
    await fs.set_session()
    try:
        data = b"".join(blobs)
        t0 = time.perf_counter()
        await fs._pipe_file(path, data, chunksize=args.chunk_mib * MiB, max_concurrency=args.concurrency)
        t_save = time.perf_counter() - t0
        t0 = time.perf_counter()
        back = await fs._cat_file(path, chunksize=args.chunk_mib * MiB, max_concurrency=args.concurrency)
        t_load = time.perf_counter() - t0
        assert len(back) == len(data)
        await fs._rm_file(path)
    finally:
        await fs._s3.close()
    return t_save, t_load


async def bench_s3fs_many(blobs, path, opts, args) -> tuple[float, float]:
    import s3fs

    fs = s3fs.S3FileSystem(asynchronous=True, skip_instance_cache=True, max_concurrency=args.concurrency, **opts)
    await fs.set_session()
    try:
        files = {f"{path}/t{i}": b for i, b in enumerate(blobs)}
        t0 = time.perf_counter()
        await fs._pipe(files, batch_size=args.concurrency)
        t_save = time.perf_counter() - t0
        t0 = time.perf_counter()
        back = await fs._cat(list(files), batch_size=args.concurrency)
        t_load = time.perf_counter() - t0
        assert sum(map(len, back.values())) == sum(map(len, blobs))
        await fs._rm(list(files))
    finally:
        await fs._s3.close()
    return t_save, t_load


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=256, help="total state size (MiB)")
    p.add_argument("--tensor-mib", type=int, default=32)
    p.add_argument("--chunk-mib", type=int, default=None,
                   help="engine chunk_bytes = part size (MiB); default: the engine's (32), also s3fs's chunk size")
    p.add_argument("--shard-mib", type=int, default=None, help="engine shard_bytes (MiB); default: the engine's")
    p.add_argument("--budget-mib", type=int, default=None, help="engine host_memory_budget; default: the engine's")
    p.add_argument("--concurrency", type=int, default=None,
                   help="requests in flight; default: the engine's write_concurrency (8), also s3fs's")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--endpoint", default=None, help="use this S3 endpoint instead of starting moto")
    p.add_argument("--bucket", default=None, help="existing bucket to use with --endpoint")
    p.add_argument("--out", default=None, help="also write s3.json and s3.md into this folder")
    p.add_argument("--extra-path", default=None, help="a folder to import s3torchconnector from")
    args = p.parse_args(argv)
    if args.extra_path:
        sys.path.insert(0, args.extra_path)
    raw = argparse.Namespace(chunk_mib=args.chunk_mib or DEFAULT_CHUNK_MIB,
                             concurrency=args.concurrency or DEFAULT_CONCURRENCY)  # the raw clients' settings

    server = None if args.endpoint else MotoServer()
    try:
        opts = server.options() if server else {"endpoint_url": args.endpoint}
        if not server and not args.bucket:
            p.error("--endpoint needs --bucket")
        bucket = args.bucket or f"bench-{uuid.uuid4().hex[:10]}"
        if server:
            server.client().create_bucket(Bucket=bucket)
        state = make_state(args.mib, args.tensor_mib)
        blobs = [v.numpy().tobytes() for v in state.values()]
        total = sum(map(len, blobs))
        prefix = f"asyncckpt-bench-{uuid.uuid4().hex[:8]}"
        runs: dict[str, list[tuple[float, float]]] = {"asyncckpt": [], "s3fs one object": [], "s3fs per tensor": []}
        missing: dict[str, str] = {}
        try:
            s3tc_config(raw)
            os.environ.setdefault("AWS_ACCESS_KEY_ID", opts.get("key", ""))
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", opts.get("secret", ""))
            runs.update({"s3torchconnector S3Checkpoint": [], "s3torchconnector DCP": []})
        except ImportError as exc:
            missing = {"s3torchconnector": f"not importable ({exc}); see --extra-path"}
        endpoint = opts["endpoint_url"]
        for r in range(args.repeat):
            runs["asyncckpt"].append(asyncio.run(bench_engine(state, f"s3://{bucket}/{prefix}/ckpt-{r}", opts, args)))
            runs["s3fs one object"].append(asyncio.run(bench_s3fs_one(blobs, f"{bucket}/{prefix}/raw-{r}", opts, raw)))
            many = bench_s3fs_many(blobs, f"{bucket}/{prefix}/many-{r}", opts, raw)
            runs["s3fs per tensor"].append(asyncio.run(many))
            if "s3torchconnector DCP" in runs:
                url = f"s3://{bucket}/{prefix}/s3tc-{r}"
                runs["s3torchconnector S3Checkpoint"].append(bench_s3tc_checkpoint(state, f"{url}.pt", endpoint, raw))
                runs["s3torchconnector DCP"].append(bench_s3tc_dcp(state, f"{url}-dcp", endpoint, raw))
    finally:
        if server:
            server.stop()

    report = {"total_mib": total / MiB, "chunk_mib": raw.chunk_mib, "concurrency": raw.concurrency,
              "engine_options": engine_options(args),
              "repeat": args.repeat, "endpoint": "moto (local)" if server else args.endpoint, "results": {},
              "missing": missing}
    print(f"{total / MiB:.0f} MiB, part/chunk {raw.chunk_mib} MiB, concurrency {raw.concurrency}, "
          f"median of {args.repeat} ({report['endpoint']})")
    print(f"{'contender':<18}{'save MiB/s':>12}{'load MiB/s':>12}{'save s':>9}{'load s':>9}")
    for name, times in runs.items():
        save = statistics.median(t[0] for t in times)
        load = statistics.median(t[1] for t in times)
        report["results"][name] = {"save_mib_s": total / MiB / save, "load_mib_s": total / MiB / load,
                                   "save_s": save, "load_s": load}
        print(f"{name:<18}{total / MiB / save:>12.1f}{total / MiB / load:>12.1f}{save:>9.2f}{load:>9.2f}")
    for name, why in missing.items():
        print(f"{name}: {why}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "s3.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(args.out, "s3.md"), "w") as f:
            f.write(markdown(report))
    return 0


def markdown(report: dict) -> str:
    """The results as a Markdown table, ratios against each other contender."""
    lines = [f"{report['total_mib']:.0f} MiB, part/chunk {report['chunk_mib']} MiB, concurrency "
             f"{report['concurrency']}, median of {report['repeat']} ({report['endpoint']})", "",
             "| contender | save MiB/s | load MiB/s |", "|---|---|---|"]
    for name, r in report["results"].items():
        lines.append(f"| {name} | {r['save_mib_s']:.1f} | {r['load_mib_s']:.1f} |")
    ours = report["results"]["asyncckpt"]
    lines.append("")
    for name, r in report["results"].items():
        if name != "asyncckpt":
            lines.append(f"asyncckpt vs {name}: save {ours['save_mib_s'] / r['save_mib_s']:.2f}x, "
                         f"load {ours['load_mib_s'] / r['load_mib_s']:.2f}x")
    lines += [f"{name}: {why}" for name, why in report.get("missing", {}).items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
