"""The ``asyncckpt`` command: inspect, verify, convert and find checkpoints; run the benchmark harness.

Every command takes local paths and fsspec URLs (``s3://bucket/run/step-100``); ``-o KEY=VALUE`` passes storage
options to fsspec.  Errors are one line on stderr; the exit status is 0 on success, 1 on failure and 2 on a usage
error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import threading
import time
from typing import Any, Sequence

from . import __version__

EPILOG = "Paths may be local or fsspec URLs (s3://..., gs://..., memory://...). Exit status: 0 ok, 1 failure, 2 usage."
PROGRESS_MIN_BYTES = 64 << 20  # below this a bar would only flash by


class UsageError(Exception):
    """A command line that cannot work (exit status 2)."""


# ---------------------------------------------------------------- formatting helpers

def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024  # type: ignore[assignment]
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
    raise AssertionError  # pragma: no cover


def _one_line(message: str) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(message))  # colour codes some torch errors carry
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _table(headers: Sequence[str], rows: list[Sequence[Any]], right: Sequence[int] = ()) -> list[str]:
    """Rows as aligned text columns; columns whose index is in ``right`` are right-aligned."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(parts).rstrip())
    return lines


def _fit(key: str, width: int = 72) -> str:
    """A key path shortened in the middle to ``width`` characters (both ends say the most); --json has it whole."""
    if len(key) <= width:
        return key
    head = (width - 3) // 2
    return key[:head] + "..." + key[len(key) - (width - 3 - head):]


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


# ---------------------------------------------------------------- progress bars

class _TextBar:
    """A minimal progress bar on stderr, for when tqdm is not installed."""

    def __init__(self, desc: str, total: int) -> None:
        self.desc, self.total, self.n = desc, max(total, 0), 0
        self._last = 0.0
        self._lock = threading.Lock()
        self._closed = False

    def update(self, n: int) -> None:
        with self._lock:
            self.n += n
            now = time.monotonic()
            if now - self._last >= 0.1:
                self._last = now
                self._draw()

    def _draw(self) -> None:
        done = min(self.n, self.total) if self.total else self.n
        frac = done / self.total if self.total else 1.0
        filled = int(frac * 30)
        sys.stderr.write(f"\r{self.desc:<6} [{'#' * filled}{'.' * (30 - filled)}] {frac:4.0%}  "
                         f"{human_bytes(done)} / {human_bytes(self.total)}  ")
        sys.stderr.flush()

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._draw()
                sys.stderr.write("\n")
                sys.stderr.flush()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(mode: str) -> Any:
    """A ``progress(desc, total)`` factory: tqdm when installed, else a plain stderr bar; ``mode`` auto/on/off."""
    def make(desc: str, total: int) -> Any:
        if mode == "off" or (mode == "auto" and (total < PROGRESS_MIN_BYTES or not sys.stderr.isatty())):
            return _NoBar()
        try:
            from tqdm import tqdm
        except ImportError:
            return _TextBar(desc, total)
        return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                    leave=False, dynamic_ncols=True)

    return make


# ---------------------------------------------------------------- option parsing

def _option_value(text: str) -> Any:
    """``true``/``false``/``null``, integers and JSON objects/arrays become values; everything else stays text."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none"):
        return None
    if text.lstrip("-").isdigit() and not (text.lstrip("-").startswith("0") and len(text.lstrip("-")) > 1):
        return int(text)
    if text[:1] in "{[":
        try:
            return json.loads(text)
        except ValueError as exc:
            raise UsageError(f"storage option value {text!r} is not valid JSON ({exc})") from None
    return text


def storage_options(pairs: Sequence[str] | None) -> dict[str, Any] | None:
    """Parse repeated ``KEY=VALUE`` arguments into fsspec storage options (None when there are none)."""
    if not pairs:
        return None
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"storage option {pair!r} is not KEY=VALUE")
        options[key.strip()] = _option_value(value)
    return options


# ---------------------------------------------------------------- inspect

def describe(doc: dict[str, Any], display: str, manifest_bytes: int | None = None) -> dict[str, Any]:
    """A JSON-able summary of a validated manifest: entries by key path, shards and totals."""
    from .convert import iter_leaves
    from .errors import CorruptCheckpointError
    from .manifest import DTYPES

    shard_of = [t.get("shard") if "base" not in t else doc["storages"][t["base"]]["shard"] for t in doc["tensors"]]
    tensors, objects, values = [], [], []
    first: dict[int, str] = {}

    def entry_of(table: str, i: Any, key: str) -> dict[str, Any]:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(doc[table]):
            raise CorruptCheckpointError(f"{display}: the structure refers to {table[:-1]} {i!r} at {key}, which "
                                         "the manifest does not list")
        return doc[table][i]

    for key, leaf in iter_leaves(doc["tree"]):
        key = key or "<root>"
        if isinstance(leaf, dict) and len(leaf) == 1 and "tensor" in leaf:
            i = leaf["tensor"]
            r = entry_of("tensors", i, key)
            entry: dict[str, Any] = {
                "key": key, "dtype": r["dtype"], "shape": r["shape"],
                "nbytes": math.prod(r["shape"]) * DTYPES[r["dtype"]].itemsize, "shard": shard_of[i],
                "device": r["device"]}
            if "base" in r:
                entry["view_of_storage"] = r["base"]
            if r.get("parameter"):
                entry["parameter"] = True
            if r.get("requires_grad"):
                entry["requires_grad"] = True
            if i in first:
                entry["alias_of"] = first[i]
            else:
                first[i] = key
            tensors.append(entry)
        elif isinstance(leaf, dict) and len(leaf) == 1 and "object" in leaf:
            o = entry_of("objects", leaf["object"], key)
            objects.append({"key": key, "type": o["type"], "nbytes": o["nbytes"], "shard": o["shard"]})
        else:
            values.append({"key": key, **_plain(leaf)})
    shards = []
    for i, s in enumerate(doc["shards"]):
        shards.append({"index": i, "file": s["file"], "nbytes": s["nbytes"],
                       "tensors": sum(1 for k in shard_of if k == i),
                       "objects": sum(1 for o in doc["objects"] if o["shard"] == i)})
    tensor_bytes = (sum(t["nbytes"] for t in doc["tensors"] if "base" not in t)
                    + sum(s["nbytes"] for s in doc["storages"]))
    created = doc.get("created_ns")
    return {
        "path": display, "format": doc["format"], "version": doc["version"], "producer": doc.get("producer"),
        "torch": doc.get("torch"), "save_id": doc.get("save_id"), "created_ns": created,
        "created": (datetime.datetime.fromtimestamp(created / 1e9, datetime.timezone.utc).isoformat(timespec="seconds")
                    if isinstance(created, int) else None),
        "tensors": tensors, "objects": objects, "values": values, "shards": shards,
        "totals": {"tensors": len(doc["tensors"]), "tensor_bytes": tensor_bytes, "objects": len(doc["objects"]),
                   "object_bytes": sum(o["nbytes"] for o in doc["objects"]), "values": len(values),
                   "shards": len(shards), "shard_bytes": sum(s["nbytes"] for s in doc["shards"]),
                   "manifest_bytes": manifest_bytes},
    }


def _plain(leaf: Any) -> dict[str, Any]:
    """Type and JSON-safe value of a plain (non-tensor, non-pickled) leaf."""
    from .convert import _container

    if isinstance(leaf, dict):
        if "float" in leaf:
            return {"type": "float", "value": leaf["float"]}  # "nan", "inf", "-inf": JSON has no such numbers
        kind = _container(leaf) or "?"
        return {"type": kind, "value": [] if kind in ("list", "tuple") else {}}  # an empty container
    return {"type": type(leaf).__name__ if leaf is not None else "None", "value": leaf}


def _print_description(info: dict[str, Any]) -> None:
    out = []
    t = info["totals"]
    out.append(info["path"])
    when = (info["created"] or "unknown time").replace("T", " ").replace("+00:00", " UTC")
    out.append(f"  taken     {when} by {info['producer'] or 'unknown'} (torch {info['torch'] or '?'}), "
               f"save {info['save_id'] or '?'}")
    size = f"{human_bytes(t['shard_bytes'])} in {t['shards']} shard{'s' if t['shards'] != 1 else ''}"
    if t["manifest_bytes"] is not None:
        size += f" + {human_bytes(t['manifest_bytes'])} manifest"
    out.append(f"  size      {size}")
    if info["tensors"]:
        out.append("")
        rows = []
        for e in info["tensors"]:
            note = []
            if "alias_of" in e:
                note.append(f"same tensor as {e['alias_of']}")
            elif "view_of_storage" in e:
                note.append(f"view of shared storage {e['view_of_storage']}")
            if e.get("parameter"):
                note.append("Parameter")
            elif e.get("requires_grad"):
                note.append("requires_grad")
            rows.append([_fit(e["key"]), e["dtype"], str(e["shape"]), human_bytes(e["nbytes"]), e["shard"], e["device"],
                         ", ".join(note)])
        out += _table(["TENSOR", "DTYPE", "SHAPE", "SIZE", "SHARD", "DEVICE", "NOTE"], rows, right=(3, 4))
    if info["objects"] or info["values"]:
        out.append("")
        rows = [[_fit(v["key"]), v["type"], v["value"] if v["type"] == "float" and isinstance(v["value"], str)
                 else _short(v["value"]), ""] for v in info["values"]]
        rows += [[_fit(o["key"]), o["type"], f"pickled, {human_bytes(o['nbytes'])}", o["shard"]]
                 for o in info["objects"]]
        out += _table(["OTHER ENTRY", "TYPE", "VALUE", "SHARD"], rows, right=(3,))
    out.append("")
    rows = [[s["index"], s["file"], human_bytes(s["nbytes"]), s["tensors"], s["objects"]] for s in info["shards"]]
    out += _table(["SHARD", "FILE", "SIZE", "TENSORS", "OBJECTS"], rows, right=(0, 2, 3, 4))
    out.append("")
    out.append(f"total: {t['tensors']} tensor{'s' if t['tensors'] != 1 else ''} "
               f"({human_bytes(t['tensor_bytes'])}), {t['objects']} pickled object{'s' if t['objects'] != 1 else ''} "
               f"({human_bytes(t['object_bytes'])}), {t['values']} plain value{'s' if t['values'] != 1 else ''}; "
               f"{size}")
    print("\n".join(out))


def cmd_inspect(args: argparse.Namespace) -> int:
    from .convert import _Opened, _run
    from .loader import read_manifest
    from .manifest import MANIFEST_NAME

    url = os.fspath(args.path)

    async def main() -> tuple[dict[str, Any], int | None]:
        async with _Opened(url, args.storage_options, 4) as (storage, path):
            doc = await read_manifest(storage, path, url)
            return doc, await storage.size(storage.join(path, MANIFEST_NAME))

    doc, manifest_bytes = _run(main)
    info = describe(doc, url, manifest_bytes)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_description(info)
    return 0


# ---------------------------------------------------------------- verify

def _check_structure(doc: dict[str, Any], problems: list[str], warnings: list[str]) -> None:
    """Cross-check the tree against the entry tables (``manifest.parse`` already checked each entry alone)."""
    from .convert import iter_leaves
    from .errors import CorruptCheckpointError
    from .manifest import decode

    used = {"tensor": set(), "object": set()}
    tables = {"tensor": doc["tensors"], "object": doc["objects"]}
    try:
        decode(doc["tree"], lambda i: i, lambda i: i)  # node kinds, keys, nesting depth
        for key, leaf in iter_leaves(doc["tree"]):
            if isinstance(leaf, dict) and len(leaf) == 1 and next(iter(leaf)) in used:
                (kind, i), = leaf.items()
                if isinstance(i, int) and 0 <= i < len(tables[kind]):
                    used[kind].add(i)
                else:
                    problems.append(f"the structure refers to {kind} {i} at {key or '<root>'}, which the manifest "
                                    f"does not list")
    except CorruptCheckpointError as exc:
        problems.append(str(exc))
        return
    for kind, table in tables.items():
        unused = len(table) - len(used[kind])
        if unused:
            warnings.append(f"{unused} {kind} entr{'y is' if unused == 1 else 'ies are'} listed but never used")
    bases = {t["base"] for t in doc["tensors"] if "base" in t}
    if len(bases) != len(doc["storages"]):
        warnings.append(f"{len(doc['storages']) - len(bases)} shared storage(s) are listed but never viewed")


async def _check_header(storage: Any, path: str, doc: dict[str, Any], i: int) -> str | None:
    """Compare a shard's safetensors header with the manifest's entries for that shard; a problem or None."""
    import torch

    from .convert import _spans
    from .storage import as_memoryview

    s = doc["shards"][i]
    reader = await storage.open_reader(storage.join(path, s["file"]))
    try:
        if s["nbytes"] < 8:
            return f"shard {s['file']} is too short to be a safetensors file"
        head = torch.empty(8, dtype=torch.uint8)
        await reader.read_into(0, head)
        n = int.from_bytes(as_memoryview(head).tobytes(), "little")
        if n > s["nbytes"] - 8:
            return f"shard {s['file']} has a safetensors header longer than the file"
        raw = torch.empty(n, dtype=torch.uint8)
        await reader.read_into(8, raw)
    finally:
        await reader.close()
    try:
        header = json.loads(as_memoryview(raw).tobytes())
        found = sorted((8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
                       for k, v in header.items() if k != "__metadata__")
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return f"shard {s['file']} does not start with a valid safetensors header"
    expected = sorted((r["offset"], r["nbytes"]) for _, _, r in _spans(doc, i))
    if found != expected:
        return f"shard {s['file']}: its safetensors header and the manifest place the entries differently"
    end = max((o + k for o, k in found), default=8 + n)
    if end != s["nbytes"]:
        return f"shard {s['file']}: its entries end at byte {end}, the file has {s['nbytes']}"
    return None


def cmd_verify(args: argparse.Namespace) -> int:
    from .convert import _Opened, _run, scan_shards
    from .loader import read_manifest
    from .manifest import MANIFEST_NAME, SHARD_RE

    url = os.fspath(args.path)
    progress = _progress(args.progress)
    t0 = time.perf_counter()

    async def main() -> tuple[dict[str, Any], list[str], list[str]]:
        async with _Opened(url, args.storage_options, args.concurrency) as (storage, path):
            doc = await read_manifest(storage, path, url)
            problems: list[str] = []
            warnings: list[str] = []
            _check_structure(doc, problems, warnings)
            bar = progress("verify", sum(s["nbytes"] for s in doc["shards"]))
            try:
                await scan_shards(storage, path, url, doc, list(range(len(doc["shards"]))),
                                  concurrency=args.concurrency, bar=bar, problems=problems)
            finally:
                bar.close()
            for i, s in enumerate(doc["shards"]):
                if not any(s["file"] in p for p in problems):
                    problem = await _check_header(storage, path, doc, i)
                    if problem:
                        problems.append(problem)
            listed = {s["file"] for s in doc["shards"]}
            for name in sorted(await storage.list(path)):
                if SHARD_RE.match(name) and name not in listed:
                    warnings.append(f"stray shard file {name} (left by an interrupted save; the next save to this "
                                    "path removes it)")
                elif name.startswith(MANIFEST_NAME + ".tmp-"):
                    warnings.append(f"stray temporary file {name} (left by an interrupted commit)")
            return doc, problems, warnings

    doc, problems, warnings = _run(main)
    for w in warnings:
        print(f"asyncckpt: warning: {url}: {w}", file=sys.stderr)
    if problems:
        for p in problems[:50]:
            print(f"asyncckpt: error: {url}: {_one_line(p)}", file=sys.stderr)
        if len(problems) > 50:
            print(f"asyncckpt: error: {url}: ... and {len(problems) - 50} more problems", file=sys.stderr)
        return 1
    total = sum(s["nbytes"] for s in doc["shards"])
    chunks = sum(len(s["xxh3_64"]) for s in doc["shards"])
    n = len(doc["shards"])
    print(f"ok: {url}: {n} shard{'s' if n != 1 else ''}, {human_bytes(total)}, {chunks} checksum"
          f"{'s' if chunks != 1 else ''} match, manifest consistent ({time.perf_counter() - t0:.2f} s)")
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
    if to == "native" and kind != "file":
        raise CheckpointError(f"{src} is a directory; --to native converts a torch.save file")
    if to in ("torch", "safetensors") and kind == "file":
        raise CheckpointError(f"{src} is a file; --to {to} converts a native checkpoint (directory)")
    if args.unsafe and to != "safetensors":
        print("asyncckpt: warning: --unsafe unpickles with weights_only=False, which can run arbitrary code; "
              "use it only on files you trust", file=sys.stderr)
    progress = _progress(args.progress)
    weights_only = not args.unsafe
    common = dict(overwrite=args.force, storage_options=opts, progress=progress)
    try:
        if to == "torch":
            result = convert.to_torch_file(src, dst, weights_only=weights_only, concurrency=args.concurrency,
                                           **common)
        elif to == "native":
            result = convert.from_torch_file(src, dst, weights_only=weights_only,
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
    print(f"wrote {dst} ({_KINDS[to]}, {result.tensors} tensor{'s' if result.tensors != 1 else ''}, "
          f"{human_bytes(result.bytes_written)}{files})")
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

    p = sub.add_parser("inspect", parents=[storage], help="list a checkpoint's entries, shards and totals",
                       description="List the tensors (key, dtype, shape, size, shard), other entries, shards and "
                                   "totals of a committed checkpoint. Reads the manifest only.", epilog=EPILOG)
    p.add_argument("path", metavar="PATH", help="checkpoint directory or URL")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", parents=[storage, io], help="check every checksum and the manifest",
                       description="Read every shard, check each chunk against the manifest's xxh3-64 checksums, "
                                   "and check that the manifest, the shards' safetensors headers and the files "
                                   "agree. Exit status 0 when the checkpoint is intact, 1 otherwise.", epilog=EPILOG)
    p.add_argument("path", metavar="PATH", help="checkpoint directory or URL")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "convert", parents=[storage, io], help="convert between native, torch.save and safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert a checkpoint. The direction follows SRC unless --to says otherwise:\n"
                    "  native checkpoint -> torch.save file      (--to torch, the default for a directory)\n"
                    "  torch.save file   -> native checkpoint    (--to native, the default for a file)\n"
                    "  native checkpoint -> safetensors weights  (--to safetensors; DST ending in .safetensors is\n"
                    "                       one file, otherwise a directory with one file per shard)\n"
                    "DST must not exist unless --force is given.", epilog=EPILOG)
    p.add_argument("src", metavar="SRC", help="source checkpoint directory or file")
    p.add_argument("dst", metavar="DST", help="destination path")
    p.add_argument("--to", choices=["native", "torch", "safetensors"], help="output format")
    p.add_argument("--key", metavar="KEY.PATH",
                   help="safetensors only: export just the entries under this key path (e.g. state_dict), named "
                        "relative to it")
    p.add_argument("-f", "--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--unsafe", action="store_true",
                   help="unpickle with weights_only=False (can run arbitrary code; only for files you trust)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("latest", parents=[storage], help="print the newest committed checkpoint under a directory",
                       description="Print the newest committed checkpoint directly under DIR (by commit time). "
                                   "Uncommitted or foreign directories are ignored. Exit status 1 if there is none.",
                       epilog=EPILOG)
    p.add_argument("directory", metavar="DIR", help="directory or URL prefix holding checkpoints")
    p.set_defaults(func=cmd_latest)

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
