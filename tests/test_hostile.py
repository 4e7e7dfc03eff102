"""Damaged and hostile input: every bad checkpoint gives a clear CheckpointError and nothing worse.

Nothing read from storage is trusted.  Flipped bits, truncated or missing shards, manifests that lie (offsets past
the end, absurd shapes, wrong dtypes, path traversal in shard names, duplicate keys, deep nesting), pickles that
would run code, and paths that are not checkpoints at all must each raise the fitting subclass of CheckpointError:
never another exception, never run code, never write anything, never allocate memory the files do not justify,
never hang.  A fuzz run mutates manifests at random and a property-based run round-trips generated states.
"""

from __future__ import annotations

import builtins
import copy
import io
import json
import math
import os
import pickle
import random
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import anyio
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from faultfs import same  # noqa: E402

import asyncckpt  # noqa: E402
from asyncckpt import (  # noqa: E402
    CheckpointError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    UnsafeCheckpointError,
)
from asyncckpt.format.manifest import MANIFEST_NAME, seal
from asyncckpt.tools.memory import PeakRSS  # noqa: E402

OPTS = dict(chunk_bytes=4096, shard_bytes=16 << 10, host_memory_budget=1 << 20)
COUNTS: dict[str, int] = {}


def make_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(5)
    base = torch.randn(600, generator=g)
    return {
        "w": torch.randn(40, 50, generator=g),
        "i": torch.randint(-(1 << 40), 1 << 40, (700,), generator=g),
        "h": torch.randn(300, generator=g).to(torch.bfloat16),
        "views": [base[10:400], base[100:], base[::3]],  # overlapping views: a shared storage blob
        "odd": torch.randn(7, 3, generator=g).t(),
        "p": torch.nn.Parameter(torch.randn(33, generator=g)),
        "obj": {1, 2, 3},  # a pickled object entry (weights-only safe)
        "meta": OrderedDict(step=3, name="x", lr=1e-3, nested=[1, (2, None)]),
    }


STATE = make_state()


def zeroed(x: Any) -> Any:
    """A fresh target shaped like ``x``: zero tensors (one per storage, as a caller's own tensors would be)."""
    if isinstance(x, torch.Tensor):
        return torch.zeros(x.shape, dtype=x.dtype)
    if isinstance(x, dict):
        return type(x)((k, zeroed(v)) for k, v in x.items())
    if isinstance(x, list):
        return [zeroed(v) for v in x]
    return x


async def save(path: Path, state: Any = STATE, **opts: Any) -> None:
    async with asyncckpt.CheckpointEngine(**{**OPTS, **opts}) as engine:
        await (await engine.save(state, path))


async def load(path: Any, **kwargs: Any) -> Any:
    async with asyncckpt.CheckpointEngine(**OPTS) as engine:
        with anyio.fail_after(30):  # a hostile checkpoint must never hang the loader
            return await engine.load(path, **kwargs)


def load_sync(path: Any, **kwargs: Any) -> Any:
    """Load; a CheckpointError is returned (not raised); any other exception escapes the engine unwrapped."""
    try:
        return anyio.run(lambda: load(path, **kwargs))
    except CheckpointError as exc:
        return exc
    except BaseExceptionGroup as group:  # the engine's task group wraps what escapes load(); unwrap one level
        inner = group.exceptions[0] if len(group.exceptions) == 1 else group
        if isinstance(inner, CheckpointError):
            return inner
        raise inner


class Ckpt:
    """A saved checkpoint opened for tampering."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.doc = json.loads((path / MANIFEST_NAME).read_bytes())
        self.original = (path / MANIFEST_NAME).read_bytes()

    def shard(self, i: int = 0) -> Path:
        return self.path / self.doc["shards"][i]["file"]

    def write(self, doc: Any = None, raw: bytes | None = None) -> None:
        """Write a manifest: ``raw`` bytes as they are, or ``doc`` (re-sealed, like an attacker would)."""
        (self.path / MANIFEST_NAME).write_bytes(raw if raw is not None else to_json(self.doc if doc is None else doc))

    def rehash(self, i: int) -> None:
        """Make shard i's size and checksums in the manifest agree with the file (so only the lie remains)."""
        data = self.shard(i).read_bytes()
        s = self.doc["shards"][i]
        s["nbytes"] = len(data)
        s["xxh3_64"] = [xxhash.xxh3_64_hexdigest(data[o:o + s["chunk_bytes"]])
                        for o in range(0, len(data), s["chunk_bytes"])]

    def append(self, i: int, blob: bytes) -> int:
        """Append bytes to shard i (checksums updated); return their offset."""
        offset = self.shard(i).stat().st_size
        with open(self.shard(i), "ab") as f:
            f.write(blob)
        self.rehash(i)
        return offset


@pytest.fixture
def ckpt(tmp_path: Path) -> Ckpt:
    anyio.run(save, tmp_path / "ck")
    assert same(load_sync(tmp_path / "ck"), STATE)
    return Ckpt(tmp_path / "ck")


def with_peak_rss(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()`` and how far the resident set rose above its starting size meanwhile."""
    with PeakRSS(interval=0.001) as rss:
        result = fn()
    return result, rss.growth


def expect(result: Any, cls: type[CheckpointError], path: Path | None = None) -> CheckpointError:
    assert isinstance(result, cls), f"expected {cls.__name__}, got {result!r}"
    if path is not None:
        assert str(path) in str(result), f"error does not name the path: {result}"
    return result


# ---------------------------------------------------------------- damaged bytes

def test_bit_flips_in_shards_are_detected(ckpt: Ckpt) -> None:
    rng = random.Random(1)
    flips = 0
    for i in range(len(ckpt.doc["shards"])):
        data = bytearray(ckpt.shard(i).read_bytes())
        for _ in range(12):
            pos, bit = rng.randrange(len(data)), rng.randrange(8)
            data[pos] ^= 1 << bit
            ckpt.shard(i).write_bytes(data)
            expect(load_sync(ckpt.path), CorruptCheckpointError, ckpt.path)
            data[pos] ^= 1 << bit
            flips += 1
        ckpt.shard(i).write_bytes(data)
    assert same(load_sync(ckpt.path), STATE)
    COUNTS["shard bit flips"] = flips


def test_bit_flips_in_the_manifest_never_load_wrong_values(ckpt: Ckpt) -> None:
    """A flipped bit anywhere in the manifest either fails to load or changes nothing that is loaded.

    The manifest has no checksum of its own, so a flip in an offset, a key, a shape/dtype of the same size or a
    number in the structure would load different values silently (see the report: a manifest digest fixes it).
    """
    rng = random.Random(2)
    raw = bytearray(ckpt.original)
    silent = []
    for _ in range(300):
        pos, bit = rng.randrange(len(raw)), rng.randrange(8)
        raw[pos] ^= 1 << bit
        ckpt.write(raw=bytes(raw))
        context = bytes(ckpt.original[max(0, pos - 20):pos + 20])
        try:
            got = load_sync(ckpt.path)
        except Exception as exc:  # noqa: BLE001
            silent.append(f"byte {pos} bit {bit}: raised {type(exc).__name__}: {context!r}")
        else:
            if not isinstance(got, CheckpointError) and not same(got, STATE):
                silent.append(f"byte {pos} bit {bit}: loaded other values: {context!r}")
        raw[pos] ^= 1 << bit
    COUNTS["manifest bit flips"] = 300
    assert not silent, f"{len(silent)}/300 manifest bit flips were not refused:\n" + "\n".join(silent[:12])


@pytest.mark.parametrize("cut", ["one byte", "half", "empty", "grown"])
def test_truncated_or_grown_shard(ckpt: Ckpt, cut: str) -> None:
    data = ckpt.shard(0).read_bytes()
    new = {"one byte": data[:-1], "half": data[: len(data) // 2], "empty": b"", "grown": data + b"\0" * 10}[cut]
    ckpt.shard(0).write_bytes(new)
    err = expect(load_sync(ckpt.path), CorruptCheckpointError, ckpt.path)
    assert ckpt.doc["shards"][0]["file"] in str(err)


def test_missing_shard(ckpt: Ckpt) -> None:
    ckpt.shard(1).unlink()
    expect(load_sync(ckpt.path), CorruptCheckpointError, ckpt.path)


def test_missing_manifest_is_incomplete(ckpt: Ckpt) -> None:
    (ckpt.path / MANIFEST_NAME).unlink()
    expect(load_sync(ckpt.path), IncompleteCheckpointError, ckpt.path)
    assert asyncckpt.latest(ckpt.path.parent) is None


# ---------------------------------------------------------------- manifests that lie

def first(doc: dict[str, Any], table: str, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    return next(e for e in doc[table] if pred(e))


def own(t: dict[str, Any]) -> bool:  # a tensor stored with its own bytes (not a view of a shared blob)
    return "base" not in t


LIES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "offset past the shard's end": lambda d: first(d, "tensors", own).update(offset=10 ** 9),
    "offset + nbytes overflows": lambda d: first(d, "tensors", own).update(offset=2 ** 63 - 8),
    "negative offset": lambda d: first(d, "tensors", own).update(offset=-64),
    "misaligned offset": lambda d: first(d, "tensors", lambda t: own(t) and t["dtype"] == "float32").update(
        offset=first(d, "tensors", lambda t: own(t) and t["dtype"] == "float32")["offset"] + 2),
    "negative dimension": lambda d: first(d, "tensors", own).update(shape=[-1, 5]),
    "huge shape": lambda d: first(d, "tensors", own).update(shape=[2 ** 31, 2 ** 31, 2 ** 31]),
    "huge shape, zero elements": lambda d: first(d, "tensors", own).update(shape=[0, 2 ** 70], nbytes=0),
    "too many dimensions": lambda d: first(d, "tensors", own).update(shape=[1] * 10000),
    "shape is a string": lambda d: first(d, "tensors", own).update(shape="[4, 4]"),
    "float shape": lambda d: first(d, "tensors", own).update(shape=[2.5]),
    "boolean shape": lambda d: first(d, "tensors", own).update(shape=[True]),
    "unknown dtype": lambda d: first(d, "tensors", own).update(dtype="float128"),
    "dtype of another size": lambda d: first(d, "tensors", lambda t: t["dtype"] == "float32").update(dtype="float64"),
    "dtype is not a string": lambda d: first(d, "tensors", own).update(dtype=7),
    "sub-byte dtype": lambda d: first(d, "tensors", lambda t: own(t) and t["dtype"] == "int64").update(dtype="uint1"),
    "integer tensor that requires grad": lambda d: first(d, "tensors", lambda t: t["dtype"] == "int64").update(
        requires_grad=True),
    "unknown device": lambda d: first(d, "tensors", own).update(device="nonsense:0"),
    "device of a missing accelerator": lambda d: first(d, "tensors", own).update(device="cuda:7"),
    "tensor on the meta device": lambda d: first(d, "tensors", own).update(device="meta"),
    "created_ns in the year 318857": lambda d: d.update(created_ns=10 ** 22),
    "created_ns of 401 digits": lambda d: d.update(created_ns=10 ** 400),
    "view past its storage": lambda d: first(d, "tensors", lambda t: "base" in t).update(storage_offset=10 ** 6),
    "view with huge stride": lambda d: first(d, "tensors", lambda t: "base" in t).update(stride=[2 ** 62]),
    "view of 2**80 elements with stride 0": lambda d: first(d, "tensors", lambda t: "base" in t).update(
        shape=[2 ** 40, 2 ** 40], stride=[0, 0]),
    "view names no storage": lambda d: first(d, "tensors", lambda t: "base" in t).update(base=99),
    "empty view far past its storage": lambda d: first(d, "tensors", lambda t: "base" in t).update(
        shape=[0], stride=[1], storage_offset=2 ** 61),
    "storage past the shard": lambda d: d["storages"][0].update(nbytes=10 ** 9),
    "shard name ../../etc/passwd": lambda d: d["shards"][0].update(file="../../etc/passwd"),
    "absolute shard name": lambda d: d["shards"][0].update(file="/etc/passwd"),
    "shard name with traversal suffix": lambda d: d["shards"][0].update(
        file=d["shards"][0]["file"] + "/../../../../etc/passwd"),
    "shard name with NUL": lambda d: d["shards"][0].update(file=d["shards"][0]["file"][:-3] + "\0x"),
    "shard listed twice": lambda d: d["shards"].append(copy.deepcopy(d["shards"][0])),
    "shard bigger than its file": lambda d: d["shards"][0].update(nbytes=d["shards"][0]["nbytes"] + 4096,
                                                                  xxh3_64=d["shards"][0]["xxh3_64"] + ["0" * 16]),
    "shard claims 1 TiB": lambda d: d["shards"][0].update(nbytes=1 << 40, chunk_bytes=1 << 40, xxh3_64=["0" * 16]),
    "zero chunk size": lambda d: d["shards"][0].update(chunk_bytes=0),
    "checksums missing": lambda d: d["shards"][0].update(xxh3_64=[]),
    "checksum not hex": lambda d: d["shards"][0]["xxh3_64"].__setitem__(0, "zzzzzzzzzzzzzzzz"),
    "tree names a missing tensor": lambda d: d.update(tree={"tensor": 10 ** 6}),
    "tree names a negative tensor": lambda d: d.update(tree={"tensor": -1}),
    "tree names a missing object": lambda d: d.update(tree={"object": 5}),
    "tensor reference is a bool": lambda d: d.update(tree={"tensor": True}),
    "duplicate dict keys in the structure": lambda d: d.update(
        tree={"dict": [["a", {"tensor": 0}], ["a", {"tensor": 1}]]}),
    "unhashable key": lambda d: d.update(tree={"dict": [[{"list": [1]}, 1]]}),
    "unknown node kind": lambda d: d.update(tree={"set": [1, 2]}),
    "invalid float node": lambda d: d.update(tree={"float": "1e999"}),
    "int node that is not hex": lambda d: d.update(tree={"int": "12" * 3000}),
    "int node that is not a string": lambda d: d.update(tree={"int": 5}),
    "bare JSON list in the structure": lambda d: d.update(tree=[1, 2]),
    "structure nested 300 deep": lambda d: d.update(tree=nest(300)),
    "structure nested 100000 deep": lambda d: d.update(tree=nest(100_000)),
    "object type is not a string": lambda d: d["objects"][0].update(type=None),
    "object past the shard": lambda d: d["objects"][0].update(offset=10 ** 9),
    "wrong format": lambda d: d.update(format="safetensors"),
    "future version": lambda d: d.update(version=99),
    "references in version 1": lambda d: d["shards"][0].update({"in": "other"}),
    "reference outside the parent": lambda d: d.update(version=2) or d["shards"][0].update({"in": "../x"}),
    "shards is not a list": lambda d: d.update(shards={"0": d["shards"][0]}),
    "tensors entries are not objects": lambda d: d.update(tensors=[1, 2]),
    "no structure": lambda d: d.pop("tree"),
}


def nest(depth: int) -> Any:
    node: Any = 1
    for _ in range(depth):
        node = {"list": [node]}
    return node


def to_json(doc: Any) -> bytes:
    """A manifest for ``doc`` that passes any self-checksum the format has (hostile input is well formed)."""
    try:
        if isinstance(doc, dict):
            return seal(doc)
        return json.dumps(doc).encode()
    except (RecursionError, ValueError):  # very deep or NaN: build by hand (parsing then fails anyway)
        return json.dumps({k: v for k, v in doc.items() if k != "tree"})[:-1].encode() + b', "tree": ' + \
            b'{"list": [' * 100_000 + b"1" + b"]}" * 100_000 + b"}"


@pytest.mark.parametrize("lie", list(LIES))
def test_lying_manifest(ckpt: Ckpt, lie: str) -> None:
    doc = copy.deepcopy(ckpt.doc)
    LIES[lie](doc)
    ckpt.write(raw=to_json(doc))
    got, grown = with_peak_rss(lambda: load_sync(ckpt.path))
    grown_mib = grown / (1 << 20)
    if lie == "device of a missing accelerator" and torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    expect(got, CheckpointError, ckpt.path)
    assert not isinstance(got, (IncompleteCheckpointError, UnsafeCheckpointError)), got
    assert grown_mib < 64, f"loading grew the peak RSS by {grown_mib:.0f} MiB"
    COUNTS["lying manifests"] = len(LIES)


def test_a_tensor_on_the_meta_device_is_refused_naming_its_key(ckpt: Ckpt) -> None:
    """A record on the meta device (which save refuses) loaded as a data-less tensor, and in place raised torch's
    bare NotImplementedError: validation refuses it and names the key."""
    doc = copy.deepcopy(ckpt.doc)
    doc["tensors"][doc["tree"]["dict"][0][1]["tensor"]]["device"] = "meta"  # the record of STATE["w"]
    ckpt.write(doc)
    for kwargs in ({}, {"state": zeroed(STATE)}):
        error = expect(load_sync(ckpt.path, **kwargs), CorruptCheckpointError, ckpt.path)
        assert "(at w) is on the meta device" in str(error)


@pytest.mark.parametrize("raw", [b"", b"\0" * 100, b"\xff\xfe garbage", b"[]", b"null", b'"asyncckpt"', b"{",
                                 b'{"format": "asyncckpt", "version": 1}', b"NaN", b"1e999999"])
def test_manifest_that_is_not_a_manifest(ckpt: Ckpt, raw: bytes) -> None:
    ckpt.write(raw=raw)
    expect(load_sync(ckpt.path), CorruptCheckpointError, ckpt.path)
    assert asyncckpt.latest(ckpt.path.parent) is None


def test_duplicate_top_level_json_keys_are_refused(ckpt: Ckpt) -> None:
    """Two "shards" members: JSON parsers disagree on which wins, so a manifest must not have them."""
    raw = ckpt.original.decode()
    evil = json.dumps([{"file": "shard-0000000000000000-00000.safetensors", "nbytes": 0, "chunk_bytes": 1,
                        "xxh3_64": []}])
    ckpt.write(raw=(raw[:-1] + f', "shards": {evil}}}').encode())
    expect(load_sync(ckpt.path), CorruptCheckpointError, ckpt.path)


def test_manifest_that_lies_about_a_shared_blob_alignment(ckpt: Ckpt) -> None:
    """A storage blob at an odd offset is loaded by copying (never a misaligned view): values are still exact."""
    st = ckpt.doc["storages"][0]
    data = ckpt.shard(st["shard"]).read_bytes()[st["offset"]:st["offset"] + st["nbytes"]]
    st["offset"] = ckpt.append(st["shard"], b"\x01" + data) + 1
    ckpt.write()
    assert same(load_sync(ckpt.path), STATE)


# ---------------------------------------------------------------- pickles that would run code

class _OpenFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (builtins.open, (self.path, "w"))


class _Exec:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (builtins.exec, (f"open({self.path!r}, 'w').close()",))


def _payloads(sentinel: Path) -> dict[str, bytes]:
    out = {}
    for name, evil in (("open", _OpenFile(str(sentinel))), ("exec", _Exec(str(sentinel)))):
        out[f"raw pickle ({name})"] = pickle.dumps(evil, protocol=2)
        buf = io.BytesIO()
        torch.save({"x": evil}, buf)
        out[f"torch.save zip ({name})"] = buf.getvalue()
    return out


@pytest.mark.parametrize("kind", ["raw pickle (open)", "raw pickle (exec)", "torch.save zip (open)",
                                  "torch.save zip (exec)"])
def test_malicious_pickle_does_not_run(ckpt: Ckpt, tmp_path: Path, kind: str) -> None:
    sentinel = tmp_path / "pwned"
    blob = _payloads(sentinel)[kind]
    obj = ckpt.doc["objects"][0]
    obj.update(offset=ckpt.append(obj["shard"], blob), nbytes=len(blob), type="builtins.int")
    ckpt.write()
    err = expect(load_sync(ckpt.path), UnsafeCheckpointError, ckpt.path)
    assert "weights_only=False" in str(err)
    assert not sentinel.exists(), "the pickle ran code during a weights-only load"
    # positive control: the payload is live, so the check above means something
    try:
        load_sync(ckpt.path, weights_only=False)
    except Exception:
        pass
    assert sentinel.exists(), "the test payload is inert"
    COUNTS["malicious pickles"] = 4


# ---------------------------------------------------------------- paths that are not checkpoints

def test_paths_that_are_not_checkpoints(tmp_path: Path) -> None:
    plain = tmp_path / "notes.txt"
    plain.write_text("hello")
    tsave = tmp_path / "model.pt"
    torch.save({"w": torch.ones(3)}, tsave)
    empty = tmp_path / "empty"
    empty.mkdir()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"x" * 100)
    err = expect(load_sync(plain), CheckpointError, plain)
    assert "file" in str(err)
    err = expect(load_sync(tsave), CheckpointError, tsave)
    assert "torch.load" in str(err)
    for path in (empty, foreign):
        err = expect(load_sync(path), CheckpointError, path)
        assert type(err) is CheckpointError, err
    err = expect(load_sync(tmp_path / "missing"), CheckpointError, tmp_path / "missing")
    assert type(err) is asyncckpt.CheckpointNotFoundError, err
    assert asyncckpt.latest(tmp_path) is None
    assert asyncckpt.latest(plain) is None
    assert asyncckpt.latest(tmp_path / "missing") is None


def test_remove_refuses_a_foreign_directory_with_a_manifest_json(tmp_path: Path) -> None:
    """``manifest.json`` is a common name: remove() must check it is ours before deleting anything."""
    foreign = tmp_path / "webapp"
    foreign.mkdir()
    (foreign / MANIFEST_NAME).write_text('{"name": "my app", "icons": []}')
    (foreign / "index.html").write_text("<html>")

    async def main() -> None:
        async with asyncckpt.CheckpointEngine(**OPTS) as engine:
            with pytest.raises(CheckpointError):
                await engine.remove(foreign)

    anyio.run(main)
    assert sorted(os.listdir(foreign)) == ["index.html", MANIFEST_NAME]


def test_remove_deletes_only_checkpoint_files(ckpt: Ckpt) -> None:
    """Files a user put next to the shards are not the checkpoint's to delete."""
    (ckpt.path / "README.txt").write_text("notes")
    (ckpt.path / "sub").mkdir()

    async def main() -> None:
        async with asyncckpt.CheckpointEngine(**OPTS) as engine:
            await engine.remove(ckpt.path)

    anyio.run(main)
    assert sorted(os.listdir(ckpt.path)) == ["README.txt", "sub"]


def test_symlinked_shard_pointing_outside(ckpt: Ckpt, tmp_path: Path) -> None:
    """A shard replaced by a link to a file elsewhere: read (it is only bytes) and refused; remove() unlinks the
    link, never its target."""
    outside = tmp_path / "precious"
    outside.write_bytes(b"p" * 1000)
    ckpt.shard(0).unlink()
    ckpt.shard(0).symlink_to(outside)
    expect(load_sync(ckpt.path), CorruptCheckpointError, ckpt.path)

    async def main() -> None:
        async with asyncckpt.CheckpointEngine(**OPTS) as engine:
            await engine.remove(ckpt.path)

    anyio.run(main)
    assert outside.read_bytes() == b"p" * 1000


@pytest.mark.parametrize("which", ["shard", "manifest"])
def test_a_file_linked_outside_the_checkpoint_is_never_read(ckpt: Ckpt, tmp_path: Path, which: str) -> None:
    """Item 18: a shard or manifest replaced by a link to an identical copy elsewhere is refused as a link (bytes
    that happen to match do not make another directory's file part of this checkpoint)."""
    inside = ckpt.shard(0) if which == "shard" else ckpt.path / MANIFEST_NAME
    outside = tmp_path / "elsewhere"
    outside.write_bytes(inside.read_bytes())
    inside.unlink()
    inside.symlink_to(outside)
    error = expect(load_sync(ckpt.path), CheckpointError, ckpt.path)
    assert "symbolic link" in str(error) or "symlink" in str(error), error


# ---------------------------------------------------------------- fuzz: random mutations of a manifest

SPECIAL = [0, -1, 1, 3, 7, 64, 4096, 2 ** 31, 2 ** 32 + 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64 + 5, -(2 ** 63), 10 ** 40,
           0.5, -0.0, 1e308, "", "../../etc/passwd", "/etc/passwd", "float32", "int64", "uint1", "complex32",
           "shard-0000000000000000-00000.safetensors", "cuda", "meta", "\u0000", "é" * 3, None, True, False, [],
           {}, [0], [2 ** 40], {"tensor": 0}, {"object": 0}, {"list": []}, {"dict": [["k", 1]]}]


def _paths(node: Any, at: tuple = ()) -> list[tuple]:
    out = [at]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, at + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, at + (i,))
    return out


def _get(doc: Any, at: tuple) -> Any:
    for k in at:
        doc = doc[k]
    return doc


def mutate(doc: Any, rng: random.Random) -> Any:
    doc = copy.deepcopy(doc)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        paths = [p for p in _paths(doc) if p]
        at = rng.choice(paths)
        parent, key = _get(doc, at[:-1]), at[-1]
        op = rng.random()
        if op < 0.55:
            value = rng.choice(SPECIAL)
            if isinstance(parent[key], int) and not isinstance(parent[key], bool) and rng.random() < 0.5:
                value = parent[key] + rng.choice([-4096, -8, -1, 1, 2, 8, 4096])
            parent[key] = copy.deepcopy(value)
        elif op < 0.7:
            del parent[key]
        elif op < 0.8 and isinstance(parent, list):
            parent.insert(rng.randrange(len(parent) + 1), copy.deepcopy(parent[key]))
        elif op < 0.9 and isinstance(parent, list) and len(parent) > 1:
            j = rng.randrange(len(parent))
            parent[key], parent[j] = parent[j], parent[key]
        elif isinstance(parent[key], str):
            s = parent[key]
            parent[key] = s[:rng.randrange(len(s) + 1)] + rng.choice(["0", "f", "-", ".", "/", "\\", "x"])
        else:
            parent[key] = [parent[key]]
    return doc


def test_fuzz_mutated_manifests(ckpt: Ckpt) -> None:
    """Random structural mutations and byte-level damage: every outcome is a load or a CheckpointError."""
    rng = random.Random(3)
    outcomes: dict[str, int] = {}
    bad: list[str] = []
    n = 400
    for i in range(n):
        if i % 4 == 3:  # text-level damage: cut, or a random byte spliced in
            raw = bytearray(ckpt.original)
            pos = rng.randrange(len(raw))
            raw = raw[:pos] if rng.random() < 0.5 else raw[:pos] + bytes([rng.randrange(256)]) + raw[pos:]
            ckpt.write(raw=bytes(raw))
            what = f"byte edit at {pos}"
        else:
            doc = mutate(ckpt.doc, rng)
            ckpt.write(raw=to_json(doc) if i % 2 else json.dumps(doc).encode())  # re-sealed or not
            what = "mutation"
        try:  # every third load is in place, which matches the structure against a target before reading
            got = load_sync(ckpt.path, **({"state": zeroed(STATE), "strict": False} if i % 3 == 1 else {}))
        except Exception as exc:  # noqa: BLE001 - the point is to catch anything that is not a CheckpointError
            bad.append(f"#{i} {what}: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        key = type(got).__name__ if isinstance(got, CheckpointError) else "loaded"
        outcomes[key] = outcomes.get(key, 0) + 1
        asyncckpt.latest(ckpt.path.parent)  # the catalog reads the same manifest: it must not raise either
    ckpt.write(raw=ckpt.original)
    COUNTS["fuzzed manifests"] = n
    print(f"\nfuzz outcomes over {n} manifests: {outcomes}")
    assert not bad, f"{len(bad)}/{n} mutated manifests raised something other than a CheckpointError:\n" + \
        "\n".join(bad[:25])


# ---------------------------------------------------------------- property: generated states round-trip

def resolved(x: Any) -> Any:
    """``x`` with lazy conj/neg views materialised (what a load returns for them)."""
    if isinstance(x, torch.Tensor):
        return x.resolve_conj().resolve_neg()
    if isinstance(x, dict):
        return type(x)((k, resolved(v)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return type(x)(resolved(v) for v in x)
    return x


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int16, torch.int32,
          torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128, torch.float8_e4m3fn,
          torch.float8_e5m2, torch.uint16, torch.uint32, torch.uint64]


@st.composite
def tensors(draw: Any) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 6), min_size=0, max_size=4))
    seed = draw(st.integers(0, 2 ** 31))
    n = math.prod(shape)
    g = torch.Generator().manual_seed(seed)
    if dtype is torch.bool:
        t = torch.randint(0, 2, (n,), generator=g).bool()
    else:  # arbitrary bit patterns: NaNs, infinities, subnormals, negative zero
        itemsize = torch.empty(0, dtype=dtype).element_size()
        t = torch.randint(0, 256, (n * itemsize,), generator=g, dtype=torch.uint8).view(dtype)
    t = t.reshape(shape)
    how = draw(st.sampled_from(["plain", "transpose", "step", "narrow", "expand", "scalar-view"]))
    if how == "transpose" and t.dim() >= 2:
        t = t.transpose(0, t.dim() - 1)
    elif how == "step" and t.dim() >= 1:
        t = t[::2]
    elif how == "narrow" and t.dim() >= 1 and t.shape[0] > 1:
        t = t.narrow(0, 1, t.shape[0] - 1)
    elif how == "expand":
        t = t.reshape(-1)[:1].expand(3, 2) if n else t
    elif how == "scalar-view" and n:
        t = t.reshape(-1)[n - 1]  # a 0-dim view at an offset
    return t


@st.composite
def shared_views(draw: Any) -> list[torch.Tensor]:
    """Several views of one storage, overlapping or not; for complex data also lazy conj / neg views of it."""
    dtype = draw(st.sampled_from([torch.float32, torch.int16, torch.complex64]))
    base = torch.arange(draw(st.integers(2, 40))).to(dtype) * (1 + 1j if dtype.is_complex else 1)
    cuts = draw(st.lists(st.tuples(st.integers(0, len(base) - 1), st.integers(1, 3)), min_size=1, max_size=3))
    views = [base[a::step] for a, step in cuts] + [base]
    if dtype.is_complex and draw(st.booleans()):
        views += [base.conj(), base.conj().imag]  # same bytes, other values (the imag of a conj is a neg view)
    return views


leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), tensors(), shared_views(),
)
keys = st.one_of(st.text(max_size=8), st.integers(-(2 ** 40), 2 ** 40))
trees = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(keys, children, max_size=4),
        st.dictionaries(keys, children, max_size=3).map(OrderedDict),
    ),
    max_leaves=14,
)


@pytest.mark.parametrize("name", ["x[::2] of 2 elements", "x[::2][1:]", "row of a column slice", "x[-1:]",
                                  "0-dim view at an offset", "expanded", "conjugate", "negative view"])
def test_odd_but_contiguous_views_round_trip(name: str, tmp_path: Path) -> None:
    """Tensors torch calls contiguous whose size-1 dimensions have unusual strides, and lazy conj/neg views."""
    x = torch.arange(12.0)
    t = {"x[::2] of 2 elements": x[:2][::2], "x[::2][1:]": x[:4][::2][1:], "row of a column slice":
         x.reshape(3, 4)[:, 1:2][1:2], "x[-1:]": x[-1:], "0-dim view at an offset": x[5],
         "expanded": x[3:4].expand(4, 3), "conjugate": torch.randn(3, dtype=torch.complex64).conj(),
         "negative view": torch._neg_view(x)}[name]
    anyio.run(save, tmp_path / "ck", {"t": t, "u": x})
    got = load_sync(tmp_path / "ck")
    assert not isinstance(got, Exception), got
    assert same(got["t"], resolved(t)) and same(got["u"], x)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(state=trees, chunk=st.sampled_from([4096, 8192]), shard=st.sampled_from([512, 4096, 1 << 20]))
def test_generated_states_round_trip(state: Any, chunk: int, shard: int, tmp_path_factory: Any) -> None:
    path = tmp_path_factory.mktemp("prop") / "ck"
    anyio.run(lambda: save(path, state, chunk_bytes=chunk, shard_bytes=shard))
    got = load_sync(path)
    assert not isinstance(got, Exception), got
    assert same(got, resolved(state))
    if isinstance(got, (dict, list)):  # and in place, streamed into a target of the same shape
        target = zeroed(got)
        rest = load_sync(path, state=target)
        assert not isinstance(rest, Exception), rest
        merged = target if isinstance(got, list) else type(target)({**target, **rest})
        assert same(merged, resolved(state))
    COUNTS["generated states"] = COUNTS.get("generated states", 0) + 1


# ---------------------------------------------------------------- amplification (issue 18, item 13)

BIG = {"big": torch.arange(2 << 20, dtype=torch.float32)}  # 8 MiB


def amplified(tmp_path: Path, tamper: Callable[[Ckpt], Any], in_place: bool = False,
              budget: int = 1 << 30) -> tuple[Any, Any, float]:
    """Save BIG, let ``tamper`` rewrite the checkpoint, load it (into a zeroed BIG with ``in_place``) through an
    engine with ``budget``; return what the load gave (or its CheckpointError), the in-place target (or None) and
    the peak RSS growth in MiB."""
    anyio.run(lambda: save(tmp_path / "amp", BIG, chunk_bytes=1 << 20, shard_bytes=64 << 20))
    ck = Ckpt(tmp_path / "amp")
    tamper(ck)
    state = zeroed(BIG) if in_place else None

    async def main() -> Any:
        async with asyncckpt.CheckpointEngine(host_memory_budget=budget) as engine:
            with anyio.fail_after(60):
                return await engine.load(ck.path, state=state)

    def run() -> Any:
        try:
            return anyio.run(main)
        except CheckpointError as exc:
            return exc

    got, grown = with_peak_rss(run)
    return got, state, grown / (1 << 20)


def _twins(ck: Ckpt, n: int, shift: int) -> None:
    """``n`` more tensor records over the big tensor's bytes, each ``shift`` bytes further on (0: the same span)."""
    t = first(ck.doc, "tensors", own)
    for j in range(n):
        twin = dict(t, offset=t["offset"] + j * shift, shape=[t["shape"][0] - j * shift // 4],
                    nbytes=t["nbytes"] - j * shift)
        ck.doc["tensors"].append(twin)
        ck.doc["tree"]["dict"].append([f"twin{j}", {"tensor": len(ck.doc["tensors"]) - 1}])
    ck.write()


def _huge_chunks(ck: Ckpt) -> None:
    """One checksummed chunk claimed to be 484 MiB long over a file of 8 MiB (the checksum is right)."""
    ck.doc["shards"][0]["chunk_bytes"] = 484 << 20
    ck.rehash(0)
    ck.write()


def _byte_chunks(ck: Ckpt) -> None:
    """The shard cut into 64-byte checksummed chunks: 131,072 of them."""
    ck.doc["shards"][0]["chunk_bytes"] = 64
    ck.rehash(0)
    ck.write()


def _shared_object(ck: Ckpt) -> None:
    """600 object records over the same 1 MiB pickle, each in the structure."""
    blob = io.BytesIO()
    torch.save(torch.zeros(1 << 18), blob)
    offset = ck.append(0, blob.getvalue())
    for j in range(600):
        ck.doc["objects"].append({"type": "torch.Tensor", "key": f"o{j}", "shard": 0, "offset": offset,
                                  "nbytes": len(blob.getvalue())})
        ck.doc["tree"]["dict"].append([f"o{j}", {"object": len(ck.doc["objects"]) - 1}])
    ck.write()


def test_one_tensor_under_many_names_is_held_once(tmp_path: Path) -> None:
    """30 records sharing the big tensor's exact span (as one tensor saved under two names would) load in place
    without a buffer each (+250 MiB before)."""
    got, state, grown = amplified(tmp_path, lambda ck: _twins(ck, 30, 0), in_place=True)
    assert not isinstance(got, Exception), type(got)
    assert torch.equal(state["big"], BIG["big"])
    assert all(torch.equal(got[f"twin{j}"], BIG["big"]) for j in range(30))
    assert grown < 40, f"loading grew the peak RSS by {grown:.0f} MiB"


@pytest.mark.parametrize("case", ["overlapping tensors", "object records sharing a span"])
def test_records_claiming_the_same_bytes_are_refused(tmp_path: Path, case: str) -> None:
    """Records overlapping each other (not one tensor under two names) are refused before anything is read:
    30 tensors each 4 KiB further into one 8 MiB span, or 600 objects over one 1 MiB pickle (+625 MiB before)."""
    tamper = (lambda ck: _twins(ck, 30, 4096)) if case == "overlapping tensors" else _shared_object
    got, _, grown = amplified(tmp_path, tamper, in_place=case == "overlapping tensors")
    assert isinstance(got, CorruptCheckpointError), type(got)
    error = expect(got, CorruptCheckpointError, tmp_path / "amp")
    assert "claim the same bytes" in str(error)
    assert grown < 40, f"loading grew the peak RSS by {grown:.0f} MiB"


@pytest.mark.parametrize("case", ["484 MiB chunks", "64-byte chunks"])
def test_chunk_sizes_never_amplify_a_load(tmp_path: Path, case: str) -> None:
    """A chunk size far beyond the file (+484 MiB before: a buffer per claimed chunk) or tiny chunks (131,072 of
    them: a task and a page each before) load with memory bounded by the file, values exact."""
    got, state, grown = amplified(tmp_path, _huge_chunks if case == "484 MiB chunks" else _byte_chunks,
                                  in_place=True)
    assert not isinstance(got, Exception), got
    assert torch.equal(state["big"], BIG["big"])
    assert grown < 48, f"loading grew the peak RSS by {grown:.0f} MiB"


@pytest.mark.parametrize("dtype", ["F128", ["F32"], {"F32": 1}, "nested"])
def test_verify_reports_a_shard_header_with_a_hostile_dtype(ckpt: Ckpt, dtype: Any) -> None:
    """Item 18: ``verify`` reports a shard header whose dtype is unknown, not a string, or nested past what JSON
    parsing can take, as a damaged header of that shard, and raises nothing."""
    shard = ckpt.shard(0)
    data = bytearray(shard.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(bytes(data[8:8 + n]))
    name = next(k for k in header if k != "__metadata__")
    if dtype == "nested":  # deeper than any JSON parser's recursion, and longer than the header: append room
        raw = json.dumps(header).replace(json.dumps(header[name]["dtype"]), "[" * 100_000 + "]" * 100_000, 1)
        body = raw.encode()
        data = bytearray(len(body).to_bytes(8, "little")) + body + data[8 + n:]
    else:
        header[name]["dtype"] = dtype
        body = json.dumps(header, separators=(",", ":")).encode()
        assert len(body) <= n, "the test's header does not fit in the original's padding"
        data[8:8 + n] = body.ljust(n)
    shard.write_bytes(bytes(data))
    ckpt.rehash(0)  # sizes and checksums agree with the file: only the header is wrong
    ckpt.write()
    report = asyncckpt.verify(ckpt.path)
    assert any(shard.name in p and "header" in p for p in report.problems), report.problems
