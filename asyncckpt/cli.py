"""The ``asyncckpt`` command: inspect, verify, convert and find checkpoints; measure a storage target.

Argument parsing and printing only; the work is done by `asyncckpt.tools`. Paths are local or fsspec URLs;
``-o KEY=VALUE`` passes storage options. Errors are one line on stderr; the exit status is 0 on success, 1 when a
check fails or an operation cannot be done, 2 on a usage error. Commands import torch only when they run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Sequence

from .version import __version__

EPILOG = ("Paths may be local or fsspec URLs (s3://..., gs://..., ...). Exit status: 0 ok, 1 a check failed or the "
          "operation could not be done, 2 usage error.")


class UsageError(Exception):
    """A command line that cannot work (exit status 2)."""


# ---------------------------------------------------------------- formatting

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

def _print_description(info: dict[str, Any]) -> None:
    from .tools.progress import human_bytes

    t = info["totals"]
    when = (info["created"] or "unknown time").replace("T", " ").replace("+00:00", " UTC")
    size = f"{human_bytes(t['shard_bytes'])} in {_count(t['shards'], 'shard')}"
    if t["manifest_bytes"] is not None:
        size += f" + {human_bytes(t['manifest_bytes'])} manifest"
    out = [info["path"], f"  taken     {when} by {info['producer'] or 'unknown'} (torch {info['torch'] or '?'}), "
                         f"save {info['save_id'] or '?'}", f"  size      {size}"]
    if info.get("layout") == "dcp":
        out[1:1] = [f"  written   by {_count(info['world_size'], 'rank')} through torch.distributed.checkpoint"]
        per_rank = ", ".join(f"rank {r}: {human_bytes(n)}" for r, n in t["bytes_per_rank"].items())
        out.append(f"  per rank  {per_rank or 'nothing'}")
    if info["tensors"] and info.get("layout") == "dcp":
        rows = [[_fit(e["key"]), e["dtype"], e["shape"], human_bytes(e["nbytes"]), e["chunks"],
                 ",".join(map(str, e["ranks"])), "requires_grad" if e.get("requires_grad") else ""]
                for e in info["tensors"]]
        out += ["", *_table(["TENSOR", "DTYPE", "SHAPE", "SIZE", "CHUNKS", "RANKS", "NOTE"], rows, right=(3, 4))]
    elif info["tensors"]:
        rows = []
        for e in info["tensors"]:
            note = [f"same tensor as {e['alias_of']}" if "alias_of" in e else
                    f"view of shared storage {e['view_of_storage']}" if "view_of_storage" in e else "",
                    "Parameter" if e.get("parameter") else "requires_grad" if e.get("requires_grad") else ""]
            rows.append([_fit(e["key"]), e["dtype"], e["shape"], human_bytes(e["nbytes"]), e["shard"], e["device"],
                         ", ".join(filter(None, note))])
        out += ["", *_table(["TENSOR", "DTYPE", "SHAPE", "SIZE", "SHARD", "DEVICE", "NOTE"], rows, right=(3, 4))]
    if info["objects"] or info["values"]:
        rows = [[_fit(v["key"]), v["type"], _fit(v["value"], 60) if v["type"] in ("float", "int")
                 and isinstance(v["value"], str) else _fit(repr(v["value"]), 60), ""] for v in info["values"]]
        rows += [[_fit(o["key"]), o["type"], f"pickled, {human_bytes(o['nbytes'])}", o["shard"]]
                 for o in info["objects"]]
        out += ["", *_table(["OTHER ENTRY", "TYPE", "VALUE", "SHARD"], rows, right=(3,))]
    rows = [[s["index"], s["file"] if s.get("in") is None else f"{s['in']}/{s['file']} (referenced)",
             human_bytes(s["nbytes"]), s["tensors"], s["objects"]] for s in info["shards"]]
    heads = ["SHARD", "FILE", "SIZE", "CHUNKS" if info.get("layout") == "dcp" else "TENSORS", "OBJECTS"]
    out += ["", *_table(heads, rows, right=(0, 2, 3, 4)), "",
            f"total: {_count(t['tensors'], 'tensor')} ({human_bytes(t['tensor_bytes'])}), "
            f"{_count(t['objects'], 'pickled object')} ({human_bytes(t['object_bytes'])}), "
            f"{_count(t['values'], 'plain value')}; {size}"]
    print("\n".join(out))


def cmd_inspect(args: argparse.Namespace) -> int:
    from .tools.inspect import inspect

    info = inspect(args.path, args.storage_options)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_description(info)
    return 0


# ---------------------------------------------------------------- verify

def cmd_verify(args: argparse.Namespace) -> int:
    from .tools.inspect import verify
    from .tools.progress import human_bytes, terminal_progress

    found = verify(args.path, args.storage_options, args.concurrency, terminal_progress(args.progress))
    if args.json:
        print(json.dumps({"path": found.path, "ok": found.ok, "shards": found.shards, "bytes": found.nbytes,
                          "checksums": found.checksums, "problems": found.problems, "warnings": found.warnings,
                          "seconds": found.seconds}, indent=2))
        return 0 if found.ok else 1
    for w in found.warnings if not args.quiet else []:
        print(f"asyncckpt: warning: {found.path}: {w}", file=sys.stderr)
    for p in found.problems[:50]:
        print(f"asyncckpt: error: {_one_line(p)}", file=sys.stderr)
    if len(found.problems) > 50:
        print(f"asyncckpt: error: {found.path}: ... and {len(found.problems) - 50} more problems", file=sys.stderr)
    if not found.ok:
        return 1
    print(f"ok: {found.path}: {_count(found.shards, 'shard')}, {human_bytes(found.nbytes)}, "
          f"{_count(found.checksums, 'checksum')} match, manifest consistent ({found.seconds:.2f} s)")
    return 0


# ---------------------------------------------------------------- convert

def cmd_convert(args: argparse.Namespace) -> int:
    from .errors import CheckpointError, UnsafeCheckpointError
    from .tools import convert
    from .tools.progress import human_bytes, terminal_progress

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
    if args.unsafe and to != "safetensors" and not args.quiet:
        print("asyncckpt: warning: --unsafe unpickles with weights_only=False, which can run arbitrary code; "
              "use it only on files you trust", file=sys.stderr)
    common: dict[str, Any] = dict(overwrite=args.force, storage_options=opts, progress=terminal_progress(args.progress))
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
    if args.json:
        print(json.dumps({"src": result.src, "dst": result.dst, "to": result.to, "files": result.files,
                          "bytes": result.bytes_written, "tensors": result.tensors, "notes": result.notes}, indent=2))
        return 0
    for note in result.notes if not args.quiet else []:
        print(f"asyncckpt: note: {note}", file=sys.stderr)
    files = f" in {len(result.files)} files" if len(result.files) > 1 else ""
    kind_name = {"native": "native checkpoint", "torch": "torch.save file", "safetensors": "safetensors"}[to]
    print(f"wrote {dst} ({kind_name}, {_count(result.tensors, 'tensor')}, {human_bytes(result.bytes_written)}{files})")
    return 0


# ---------------------------------------------------------------- latest

def cmd_latest(args: argparse.Namespace) -> int:
    from .catalog import latest
    from .errors import CheckpointError
    from .tools.convert import path_kind

    found = latest(args.directory, args.storage_options)
    if args.json:
        print(json.dumps({"directory": args.directory, "latest": found}))
        return 0 if found is not None else 1
    if found is None:
        missing = path_kind(args.directory, args.storage_options) is None
        raise CheckpointError(f"no committed checkpoint under {args.directory}"
                              + (" (it does not exist)" if missing else ""))
    print(found)
    return 0


# ---------------------------------------------------------------- bench

def cmd_bench(args: argparse.Namespace) -> int:
    from .tools import bench

    result = bench.run(args.target, args.size, args.repeats, args.storage_options,
                       write_concurrency=args.concurrency)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(bench.report(result)))
    return 0


# ---------------------------------------------------------------- parser

def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
          "g": 1000**3, "gb": 1000**3, "gib": 1 << 30}


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (try 256MiB, 1GiB, 500MB)")
    return max(1, int(float(m.group(1)) * _UNITS[m.group(2).lower()]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncckpt", description="Inspect, verify, convert and find asyncckpt checkpoints.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"asyncckpt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show a traceback when a command fails")
    talk = argparse.ArgumentParser(add_help=False)  # before or after the command; SUPPRESS: after keeps before's
    for p, default in ((parser, True), (talk, False)):
        p.add_argument("-v", "--verbose", action="count", default=0 if default else argparse.SUPPRESS,
                       help="log what the engine does (-v: each save, retries and fallbacks; -vv: details)")
        p.add_argument("-q", "--quiet", action="store_true", default=False if default else argparse.SUPPRESS,
                       help="print errors only (no warnings or notes)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    machine = argparse.ArgumentParser(add_help=False)
    machine.add_argument("--json", action="store_true", help="print one JSON document (exit status as without it)")
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
        p = sub.add_parser(name, parents=[*parents, talk], help=help, description=description, epilog=EPILOG, **kw)
        p.set_defaults(func=func)
        return p

    p = command("inspect", cmd_inspect, [storage, machine], "list a checkpoint's entries, shards and totals",
                "List the tensors (key, dtype, shape, size, shard), other entries, shards and totals of a committed "
                "checkpoint. Reads the manifest only.")
    p.add_argument("path", metavar="PATH", help="checkpoint directory or URL")
    p = command("verify", cmd_verify, [storage, io, machine], "check every checksum and the manifest",
                "Read every shard, check each chunk against the manifest's xxh3-64 checksums, and check that the "
                "manifest, the shards' safetensors headers and the files agree. Exit status 0 when the checkpoint "
                "is intact, 1 otherwise.")
    p.add_argument("path", metavar="PATH", help="checkpoint directory or URL")
    p = command("convert", cmd_convert, [storage, io, machine], "convert between native, torch.save and safetensors",
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
    p = command("latest", cmd_latest, [storage, machine], "print the newest committed checkpoint under a directory",
                "Print the newest committed checkpoint directly under DIR (by snapshot time). Uncommitted or "
                "foreign directories are ignored. Exit status 1 if there is none.")
    p.add_argument("directory", metavar="DIR", help="directory or URL prefix holding checkpoints")
    p = command("bench", cmd_bench, [storage, machine], "measure a storage target and the engine on it",
                "Measure how fast TARGET (a directory or URL) writes and reads without the engine, and how fast "
                "the engine saves and loads a synthetic state there, in the same run; says whether the storage or "
                "the engine is the bottleneck. Peer comparisons: `python -m benchmarks` in a checkout.")
    p.add_argument("target", metavar="TARGET", nargs="?", default=None,
                   help="directory or URL to measure (default: the system's temporary directory)")
    p.add_argument("--size", type=_size, default=256 << 20, help="bytes of state (default 256MiB)")
    p.add_argument("--repeats", type=_positive, default=3, help="measured saves and loads (default 3)")
    p.add_argument("-j", "--concurrency", type=_positive, default=8, metavar="N",
                   help="I/O operations in flight at once (default: 8)")
    return parser


def _logging(verbose: int, quiet: bool) -> None:
    """The ``asyncckpt`` logger on stderr: warnings by default, -v info, -vv debug, -q errors only."""
    import logging

    class Lowercase(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return f"asyncckpt: {record.levelname.lower()}: {record.getMessage()}"

    level = logging.ERROR if quiet else logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logger = logging.getLogger("asyncckpt")
    for old in [h for h in logger.handlers if getattr(h, "asyncckpt_cli", False)]:
        logger.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Lowercase())
    handler.asyncckpt_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    from .errors import CheckpointError

    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    _logging(args.verbose, args.quiet)
    try:
        args.storage_options = storage_options(getattr(args, "storage_option", None))
        if args.command == "bench" and args.target is None:
            import tempfile

            args.target = tempfile.gettempdir()
        return int(args.func(args))
    except UsageError as exc:
        print(f"asyncckpt {args.command}: error: {_one_line(str(exc))}", file=sys.stderr)
        return _failed(args, str(exc), 2)
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
        return _failed(args, message, 1)


def _failed(args: argparse.Namespace, message: str, status: int) -> int:
    """``status``; with --json, the error is also the JSON document on stdout (``{"error": ..., "status": ...}``)."""
    if getattr(args, "json", False):
        print(json.dumps({"error": _one_line(message), "status": status}))
    return status
