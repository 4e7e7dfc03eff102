"""The ``asyncckpt`` command: inspect, verify, convert and find checkpoints; run the benchmark harness.

Paths are local or fsspec URLs; ``-o KEY=VALUE`` passes storage options.  Errors are one line on stderr; the exit
status is 0 on success, 1 on failure, 2 on a usage error.  Commands import torch only when they run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import time
from typing import Any, Sequence

from . import __version__

EPILOG = "Paths may be local or fsspec URLs (s3://..., gs://..., memory://...). Exit status: 0 ok, 1 failure, 2 usage."
PROGRESS_MIN_BYTES = 64 << 20  # below this a bar would only flash by


class UsageError(Exception):
    """A command line that cannot work (exit status 2)."""


# ---------------------------------------------------------------- formatting

def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _one_line(message: str) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(message))  # colour codes some torch errors carry
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _table(headers: Sequence[str], rows: list[Sequence[Any]], right: Sequence[int] = ()) -> list[str]:
    """Rows as aligned text columns; columns whose index is in ``right`` are right-aligned."""
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in cells]


def _fit(text: str, width: int = 72) -> str:
    """``text`` shortened in the middle, where a key path says least (--json has it whole)."""
    if len(text) <= width:
        return text
    head = (width - 3) // 2
    return text[:head] + "..." + text[len(text) - (width - 3 - head):]


# ---------------------------------------------------------------- progress bars

class _TextBar:
    """A plain progress bar on stderr, for when tqdm is not installed."""

    def __init__(self, desc: str, total: int) -> None:
        self.desc, self.total, self.n, self.drawn = desc, max(total, 0), 0, 0.0

    def update(self, n: int, end: str = "") -> None:
        self.n += n
        if end or time.monotonic() - self.drawn >= 0.1:
            self.drawn = time.monotonic()
            frac = min(self.n / self.total, 1.0) if self.total else 1.0
            sys.stderr.write(f"\r{self.desc:<6} [{'#' * int(frac * 30):.<30}] {frac:4.0%}  "
                             f"{human_bytes(min(self.n, self.total))} / {human_bytes(self.total)}  {end}")
            sys.stderr.flush()

    def close(self) -> None:
        self.update(0, "\n")


def _progress(mode: str) -> Any:
    """A ``progress(desc, total)`` factory for ``--progress``/``--no-progress``/auto: tqdm's bar if installed."""
    def make(desc: str, total: int) -> Any:
        if mode == "off" or (mode == "auto" and (total < PROGRESS_MIN_BYTES or not sys.stderr.isatty())):
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return _TextBar(desc, total)
        return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                    leave=False, dynamic_ncols=True)

    return make


# ---------------------------------------------------------------- options

def storage_options(pairs: Sequence[str] | None) -> dict[str, Any] | None:
    """Repeated ``KEY=VALUE`` arguments as fsspec storage options: true/false/null, integers and JSON objects or
    arrays are parsed, anything else stays text."""
    if not pairs:
        return None
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"storage option {pair!r} is not KEY=VALUE")
        value: Any = {"true": True, "false": False, "null": None, "none": None}.get(text.lower(), text)
        if re.fullmatch(r"-?(0|[1-9][0-9]*)", text):
            value = int(text)
        elif text[:1] in ("{", "["):
            try:
                value = json.loads(text)
            except ValueError as exc:
                raise UsageError(f"storage option value {text!r} is not valid JSON ({exc})") from None
        options[key.strip()] = value
    return options


# ---------------------------------------------------------------- inspect

def describe(doc: dict[str, Any], display: str, manifest_bytes: int | None = None) -> dict[str, Any]:
    """A JSON-able summary of a validated manifest: entries by key path, shards and totals."""
    from collections import OrderedDict

    from .convert import Ref, leaves, structure, tensor_shard
    from .manifest import DTYPES

    shard_of = [tensor_shard(doc, i) for i in range(len(doc["tensors"]))]
    tensors, objects, values, first = [], [], [], {}
    for key, leaf in leaves(structure(doc, display)):
        key = key or "<root>"
        if isinstance(leaf, Ref) and leaf.kind == "tensor":
            r = doc["tensors"][leaf.index]
            entry = {"key": key, "dtype": r["dtype"], "shape": r["shape"],
                     "nbytes": math.prod(r["shape"]) * DTYPES[r["dtype"]].itemsize, "shard": shard_of[leaf.index],
                     "device": r["device"]}
            if "base" in r:
                entry["view_of_storage"] = r["base"]
            entry.update({flag: True for flag in ("parameter", "requires_grad") if r.get(flag)})
            if first.setdefault(leaf.index, key) != key:
                entry["alias_of"] = first[leaf.index]
            tensors.append(entry)
        elif isinstance(leaf, Ref):
            o = doc["objects"][leaf.index]
            objects.append({"key": key, "type": o["type"], "nbytes": o["nbytes"], "shard": o["shard"]})
        elif isinstance(leaf, float) and not math.isfinite(leaf):
            values.append({"key": key, "type": "float", "value": repr(leaf)})  # JSON has no nan or inf
        else:
            kind = "None" if leaf is None else "odict" if isinstance(leaf, OrderedDict) else type(leaf).__name__
            values.append({"key": key, "type": kind, "value": leaf})
    shards = [{"index": i, "file": s["file"], "nbytes": s["nbytes"], "tensors": shard_of.count(i),
               "objects": sum(1 for o in doc["objects"] if o["shard"] == i)} for i, s in enumerate(doc["shards"])]
    created = doc.get("created_ns")
    return {
        "path": display, "format": doc["format"], "version": doc["version"], "producer": doc.get("producer"),
        "torch": doc.get("torch"), "save_id": doc.get("save_id"), "created_ns": created,
        "created": (datetime.datetime.fromtimestamp(created / 1e9, datetime.timezone.utc).isoformat(timespec="seconds")
                    if isinstance(created, int) else None),
        "tensors": tensors, "objects": objects, "values": values, "shards": shards,
        "totals": {"tensors": len(doc["tensors"]),
                   "tensor_bytes": sum(t["nbytes"] for t in doc["tensors"] + doc["storages"] if "base" not in t),
                   "objects": len(doc["objects"]), "object_bytes": sum(o["nbytes"] for o in doc["objects"]),
                   "values": len(values), "shards": len(shards), "shard_bytes": sum(s["nbytes"] for s in doc["shards"]),
                   "manifest_bytes": manifest_bytes},
    }


def _print_description(info: dict[str, Any]) -> None:
    t = info["totals"]
    when = (info["created"] or "unknown time").replace("T", " ").replace("+00:00", " UTC")
    size = f"{human_bytes(t['shard_bytes'])} in {_count(t['shards'], 'shard')}"
    if t["manifest_bytes"] is not None:
        size += f" + {human_bytes(t['manifest_bytes'])} manifest"
    out = [info["path"], f"  taken     {when} by {info['producer'] or 'unknown'} (torch {info['torch'] or '?'}), "
                         f"save {info['save_id'] or '?'}", f"  size      {size}"]
    if info["tensors"]:
        rows = []
        for e in info["tensors"]:
            note = [f"same tensor as {e['alias_of']}" if "alias_of" in e else
                    f"view of shared storage {e['view_of_storage']}" if "view_of_storage" in e else "",
                    "Parameter" if e.get("parameter") else "requires_grad" if e.get("requires_grad") else ""]
            rows.append([_fit(e["key"]), e["dtype"], e["shape"], human_bytes(e["nbytes"]), e["shard"], e["device"],
                         ", ".join(filter(None, note))])
        out += ["", *_table(["TENSOR", "DTYPE", "SHAPE", "SIZE", "SHARD", "DEVICE", "NOTE"], rows, right=(3, 4))]
    if info["objects"] or info["values"]:
        rows = [[_fit(v["key"]), v["type"], v["value"] if v["type"] == "float" and isinstance(v["value"], str)
                 else _fit(repr(v["value"]), 60), ""] for v in info["values"]]
        rows += [[_fit(o["key"]), o["type"], f"pickled, {human_bytes(o['nbytes'])}", o["shard"]]
                 for o in info["objects"]]
        out += ["", *_table(["OTHER ENTRY", "TYPE", "VALUE", "SHARD"], rows, right=(3,))]
    rows = [[s["index"], s["file"], human_bytes(s["nbytes"]), s["tensors"], s["objects"]] for s in info["shards"]]
    out += ["", *_table(["SHARD", "FILE", "SIZE", "TENSORS", "OBJECTS"], rows, right=(0, 2, 3, 4)), "",
            f"total: {_count(t['tensors'], 'tensor')} ({human_bytes(t['tensor_bytes'])}), "
            f"{_count(t['objects'], 'pickled object')} ({human_bytes(t['object_bytes'])}), "
            f"{_count(t['values'], 'plain value')}; {size}"]
    print("\n".join(out))


def cmd_inspect(args: argparse.Namespace) -> int:
    from .convert import with_manifest
    from .manifest import MANIFEST_NAME
    from .sync import SyncEngine

    async def size(storage: Any, path: str, doc: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        return doc, await storage.size(storage.join(path, MANIFEST_NAME))

    with SyncEngine(storage_options=args.storage_options) as engine:
        doc, manifest_bytes = with_manifest(engine, args.path, size)
    info = describe(doc, args.path, manifest_bytes)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_description(info)
    return 0


# ---------------------------------------------------------------- verify

def cmd_verify(args: argparse.Namespace) -> int:
    from .convert import progress_bar, structure, with_manifest
    from .errors import CheckpointError
    from .loader import verify_shards
    from .manifest import MANIFEST_NAME, SHARD_RE
    from .sync import SyncEngine

    url, t0 = args.path, time.perf_counter()

    async def check(storage: Any, path: str, doc: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
        problems = []
        try:
            structure(doc, url)  # refers only to entries the manifest lists
        except CheckpointError as exc:
            problems.append(str(exc))
        bar = progress_bar(_progress(args.progress), "verify", sum(s["nbytes"] for s in doc["shards"]))
        try:
            problems += await verify_shards(storage, path, url, doc, bar.update)
        finally:
            bar.close()
        listed = {s["file"] for s in doc["shards"]}
        warnings = [f"stray shard file {name} (left by an interrupted save; the next save to this path removes it)"
                    if SHARD_RE.match(name) else f"stray temporary file {name} (left by an interrupted commit)"
                    for name in sorted(await storage.list(path))
                    if (SHARD_RE.match(name) and name not in listed) or name.startswith(MANIFEST_NAME + ".tmp-")]
        return doc, problems, warnings

    with SyncEngine(write_concurrency=args.concurrency, storage_options=args.storage_options) as engine:
        doc, problems, warnings = with_manifest(engine, url, check)
    for w in warnings:
        print(f"asyncckpt: warning: {url}: {w}", file=sys.stderr)
    for p in problems[:50]:
        print(f"asyncckpt: error: {_one_line(p)}", file=sys.stderr)
    if len(problems) > 50:
        print(f"asyncckpt: error: {url}: ... and {len(problems) - 50} more problems", file=sys.stderr)
    if problems:
        return 1
    chunks = sum(len(s["xxh3_64"]) for s in doc["shards"])
    print(f"ok: {url}: {_count(len(doc['shards']), 'shard')}, {human_bytes(sum(s['nbytes'] for s in doc['shards']))}, "
          f"{_count(chunks, 'checksum')} match, manifest consistent ({time.perf_counter() - t0:.2f} s)")
    return 0


# ---------------------------------------------------------------- convert

_KINDS = {"native": "native checkpoint", "torch": "torch.save file", "safetensors": "safetensors"}


def cmd_convert(args: argparse.Namespace) -> int:
    from . import convert
    from .errors import CheckpointError, UnsafeCheckpointError

    src, dst, opts = args.src, args.dst, args.storage_options
    if args.key is not None and args.to != "safetensors":
        raise UsageError("--key only applies to --to safetensors")
    kind = convert.path_kind(src, opts)
    if kind is None:
        raise CheckpointError(f"no checkpoint or file at {src}")
    to = args.to or ("native" if kind == "file" else "torch")
    if (to == "native") != (kind == "file"):
        raise CheckpointError(f"{src} is a directory; --to native converts a torch.save file" if to == "native" else
                              f"{src} is a file; --to {to} converts a native checkpoint (directory)")
    if args.unsafe and to != "safetensors":
        print("asyncckpt: warning: --unsafe unpickles with weights_only=False, which can run arbitrary code; "
              "use it only on files you trust", file=sys.stderr)
    common = dict(overwrite=args.force, storage_options=opts, progress=_progress(args.progress))
    try:
        if to == "torch":
            result = convert.to_torch_file(src, dst, weights_only=not args.unsafe, concurrency=args.concurrency,
                                           **common)
        elif to == "native":
            result = convert.from_torch_file(src, dst, weights_only=not args.unsafe,
                                             write_concurrency=args.concurrency, **common)
        else:
            result = convert.to_safetensors(src, dst, key=args.key, concurrency=args.concurrency, **common)
    except UnsafeCheckpointError as exc:
        if "--unsafe" in str(exc):
            raise
        raise UnsafeCheckpointError(f"{_one_line(str(exc))} [pass --unsafe if you trust it]") from None
    for note in result.notes:
        print(f"asyncckpt: note: {note}", file=sys.stderr)
    files = f" in {len(result.files)} files" if len(result.files) > 1 else ""
    kind_name = {"native": "native checkpoint", "torch": "torch.save file", "safetensors": "safetensors"}[to]
    print(f"wrote {dst} ({kind_name}, {_count(result.tensors, 'tensor')}, {human_bytes(result.bytes_written)}{files})")
    return 0


# ---------------------------------------------------------------- latest

def cmd_latest(args: argparse.Namespace) -> int:
    from .catalog import latest
    from .convert import path_kind
    from .errors import CheckpointError

    found = latest(args.directory, args.storage_options)
    if found is None:
        missing = path_kind(args.directory, args.storage_options) is None
        raise CheckpointError(f"no committed checkpoint under {args.directory}"
                              + (" (it does not exist)" if missing else ""))
    print(found)
    return 0


# ---------------------------------------------------------------- bench

def cmd_bench(argv: list[str]) -> int:
    if os.getcwd() not in sys.path:  # the harness lives in the source tree: found from a checkout's root
        sys.path.append(os.getcwd())
    try:
        import benchmarks
        bench_main = benchmarks.main
    except (ImportError, AttributeError):
        print("asyncckpt: error: the benchmark harness is not importable here; it lives in the source tree: run "
              "`asyncckpt bench` (or `python -m benchmarks`) from a checkout of the repository root "
              "(see docs/benchmarks.md)", file=sys.stderr)
        return 1
    try:
        return int(bench_main(argv) or 0)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] != "benchmarks":
            print(f"asyncckpt: error: the benchmarks need {exc.name}, which is not installed: "
                  "pip install 'asyncckpt[bench]'", file=sys.stderr)
            return 1
        raise


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncckpt", description="Inspect, verify, convert and find asyncckpt checkpoints.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"asyncckpt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show a traceback when a command fails")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    storage = argparse.ArgumentParser(add_help=False)
    storage.add_argument("-o", "--storage-option", dest="storage_option", action="append", metavar="KEY=VALUE",
                         help="fsspec storage option for URL paths, repeatable (e.g. -o anon=true, "
                              "-o endpoint_url=http://localhost:9000); true/false/null, integers and JSON "
                              "objects are parsed, anything else is a string")
    io = argparse.ArgumentParser(add_help=False)
    io.add_argument("-j", "--concurrency", type=_positive, default=8, metavar="N",
                    help="I/O operations in flight at once (default: 8)")
    bars = io.add_mutually_exclusive_group()
    bars.add_argument("--progress", dest="progress", action="store_const", const="on", default="auto",
                      help="always show a progress bar (default: on a terminal, for checkpoints over 64 MiB)")
    bars.add_argument("--no-progress", dest="progress", action="store_const", const="off",
                      help="never show a progress bar")

    def command(name: str, func: Any, parents: list[Any], help: str, description: str, **kw: Any) -> Any:
        p = sub.add_parser(name, parents=parents, help=help, description=description, epilog=EPILOG, **kw)
        p.set_defaults(func=func)
        return p

    p = command("inspect", cmd_inspect, [storage], "list a checkpoint's entries, shards and totals",
                "List the tensors (key, dtype, shape, size, shard), other entries, shards and totals of a committed "
                "checkpoint. Reads the manifest only.")
    p.add_argument("path", metavar="PATH", help="checkpoint directory or URL")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    p = command("verify", cmd_verify, [storage, io], "check every checksum and the manifest",
                "Read every shard, check each chunk against the manifest's xxh3-64 checksums, and check that the "
                "manifest, the shards' safetensors headers and the files agree. Exit status 0 when the checkpoint "
                "is intact, 1 otherwise.")
    p.add_argument("path", metavar="PATH", help="checkpoint directory or URL")
    p = command("convert", cmd_convert, [storage, io], "convert between native, torch.save and safetensors",
                "Convert a checkpoint. The direction follows SRC unless --to says otherwise:\n"
                "  native checkpoint -> torch.save file      (--to torch, the default for a directory)\n"
                "  torch.save file   -> native checkpoint    (--to native, the default for a file)\n"
                "  native checkpoint -> safetensors weights  (--to safetensors; DST ending in .safetensors is\n"
                "                       one file, otherwise a directory with one file per shard)\n"
                "DST must not exist unless --force is given.", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="source checkpoint directory or file")
    p.add_argument("dst", metavar="DST", help="destination path")
    p.add_argument("--to", choices=["native", "torch", "safetensors"], help="output format")
    p.add_argument("--key", metavar="KEY.PATH", help="safetensors only: export just the entries under this key "
                                                     "path (e.g. state_dict), named relative to it")
    p.add_argument("-f", "--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--unsafe", action="store_true",
                   help="unpickle with weights_only=False (can run arbitrary code; only for files you trust)")
    p = command("latest", cmd_latest, [storage], "print the newest committed checkpoint under a directory",
                "Print the newest committed checkpoint directly under DIR (by snapshot time). Uncommitted or "
                "foreign directories are ignored. Exit status 1 if there is none.")
    p.add_argument("directory", metavar="DIR", help="directory or URL prefix holding checkpoints")
    sub.add_parser("bench", add_help=False, help="run the benchmark harness (arguments are passed on; "
                                                 "`asyncckpt bench --help` shows its options)")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    from .errors import CheckpointError

    argv = list(sys.argv[1:] if argv is None else argv)
    if "bench" in argv:  # everything after `bench` belongs to the harness, --help included
        head = argv[:argv.index("bench")]
        if all(a == "--debug" for a in head):
            return cmd_bench(argv[len(head) + 1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.storage_options = storage_options(getattr(args, "storage_option", None))
        return args.func(args)
    except UsageError as exc:
        print(f"asyncckpt {args.command}: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("asyncckpt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as exc:  # one line, never a traceback, unless --debug asks for it
        if args.debug:
            raise
        if isinstance(exc, CheckpointError):
            message = str(exc)
        elif isinstance(exc, OSError) and exc.strerror:
            where = f": {exc.filename}" if exc.filename else ""
            message = f"{exc.strerror}{where}"
        else:
            message = f"{type(exc).__name__}: {exc} (run with --debug for a traceback)"
        print(f"asyncckpt: error: {_one_line(message)}", file=sys.stderr)
        return 1
