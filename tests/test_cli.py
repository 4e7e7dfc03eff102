"""The ``asyncckpt`` command line, run as a real subprocess (``python -m asyncckpt``) on checkpoints in tmp_path."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import asyncckpt
from asyncckpt import cli
from asyncckpt.format.manifest import seal
from asyncckpt.format.tree import key_path
from asyncckpt.tools import convert

from .helpers import assert_same

ROOT = Path(__file__).resolve().parents[1]


def run(*args: object, cwd: Path | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    """``python -m asyncckpt ARGS`` (or ``python -c CODE ARGS``) with this checkout importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("COLUMNS", None)
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "asyncckpt"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd or ROOT,
                          timeout=240)


def call(capsys, *args: object) -> subprocess.CompletedProcess:
    """The same command in this process (``cli.main``), for checks that need no fresh interpreter."""
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def assert_error(proc: subprocess.CompletedProcess, *needles: str, status: int = 1) -> str:
    """The command failed with ``status`` and exactly one line on stderr, no traceback; returns that line."""
    assert proc.returncode == status, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith("usage:") and not line.startswith(" ")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def make_state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    base = torch.arange(12, dtype=torch.float64)
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": 42,
        "name": "run-a",
        "loss": float("nan"),
        "tags": {"seen"},                                        # pickled (weights-only loadable)
        "half": torch.ones(2, 3, dtype=torch.bfloat16),
        "window": base[2:8].view(2, 3), "overlap": base[5:11],   # overlapping views: one shared storage
        "tied": OrderedDict(a=model[0].weight),                  # the same tensor twice
        "empty": {},
    }


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    with asyncckpt.SyncEngine(shard_bytes=1200, chunk_bytes=4096) as engine:
        engine.save(make_state(), path).result()
    assert len(json.loads((path / "manifest.json").read_text())["shards"]) > 1
    return path


def load(path: Path, **kw) -> dict:
    with asyncckpt.SyncEngine() as engine:
        return engine.load(path, **kw)


def flatten(obj: object, path: str = ""):
    """``(key path, leaf)`` pairs, named as the engine names them."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from flatten(v, key_path(path, k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from flatten(v, key_path(path, str(i)))
    else:
        yield path, obj


# ---------------------------------------------------------------- help and usage

def test_help_lists_every_command():
    proc = run("--help")
    assert proc.returncode == 0
    for command in ("inspect", "verify", "convert", "latest", "bench"):
        assert command in proc.stdout
    assert run("--version").stdout.strip() == f"asyncckpt {asyncckpt.__version__}"


def test_subcommand_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["convert", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "--force" in out and "--unsafe" in out and "safetensors" in out


def test_console_script_entry_point_exists():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'asyncckpt = "asyncckpt.cli:main"' in text
    assert callable(cli.main)


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["inspect"], ["verify", "x", "-j", "0"]])
def test_usage_errors_exit_2(args):
    proc = run(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "usage:" in proc.stderr


def test_bad_storage_option_is_a_usage_error(ckpt):
    assert_error(run("inspect", ckpt, "-o", "no-equals-sign"), "KEY=VALUE", status=2)


def test_storage_option_values():
    assert cli.storage_options(["anon=true", "n=8", "key=0123", "endpoint_url=http://h:9000",
                                'client_kwargs={"region_name": "x"}']) == {
        "anon": True, "n": 8, "key": "0123", "endpoint_url": "http://h:9000", "client_kwargs": {"region_name": "x"}}
    assert cli.storage_options(None) is None


# ---------------------------------------------------------------- inspect

def test_inspect_table(ckpt):
    proc = run("inspect", ckpt)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in ("model.0.weight", "float32", "[16, 8]", "512 B", "optimizer.state.0.momentum_buffer",
                   "bfloat16", "view of shared storage", "same tensor as model.0.weight", "step", "42",
                   "builtins.set", "pickled", "SHARD", "total:"):
        assert needle in out, needle
    doc = json.loads((ckpt / "manifest.json").read_text())
    for s in doc["shards"]:
        assert s["file"] in out


def test_inspect_json(ckpt):
    proc = run("inspect", "--json", ckpt)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    doc = json.loads((ckpt / "manifest.json").read_text())
    tensors = {t["key"]: t for t in info["tensors"]}
    assert tensors["model.0.weight"]["shape"] == [16, 8] and tensors["model.0.weight"]["nbytes"] == 512
    assert tensors["half"]["dtype"] == "bfloat16"
    assert tensors["tied.a"]["alias_of"] == "model.0.weight"
    assert tensors["window"]["view_of_storage"] == tensors["overlap"]["view_of_storage"]
    values = {v["key"]: v for v in info["values"]}
    assert values["step"] == {"key": "step", "type": "int", "value": 42}
    assert values["loss"]["value"] == "nan" and values["empty"]["value"] == {}
    assert [o["key"] for o in info["objects"]] == ["tags"]
    assert info["totals"]["shards"] == len(doc["shards"]) == len(info["shards"])
    assert info["totals"]["shard_bytes"] == sum(s["nbytes"] for s in doc["shards"])
    assert info["save_id"] == doc["save_id"]


def test_inspect_shows_an_integer_too_long_for_str(tmp_path):
    """A 5000-digit int (format version 4) made inspect and --json raise Python's int-to-str limit error; both
    show it in hex, as the manifest holds it."""
    n = 10 ** 5000
    with asyncckpt.SyncEngine() as engine:
        engine.save({"w": torch.ones(2), "n": n}, tmp_path / "big").result()
    proc = run("inspect", tmp_path / "big")
    assert proc.returncode == 0, proc.stderr
    assert hex(n)[:20] in proc.stdout
    proc = run("inspect", "--json", tmp_path / "big")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["values"] == [{"key": "n", "type": "int", "value": hex(n)}] and info["version"] == 4


# ---------------------------------------------------------------- verify

def test_verify_ok(ckpt):
    proc = run("verify", ckpt)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: ") and "checksums match" in proc.stdout


def _shard(ckpt: Path, i: int = 0) -> Path:
    return ckpt / json.loads((ckpt / "manifest.json").read_text())["shards"][i]["file"]


def test_verify_detects_flipped_byte(ckpt):
    shard = _shard(ckpt)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    line = assert_error(run("verify", ckpt), "checksum mismatch", shard.name)
    assert line.startswith("asyncckpt: error: ")


def test_verify_detects_truncated_and_missing_shards(ckpt, capsys):
    _shard(ckpt, 0).write_bytes(_shard(ckpt, 0).read_bytes()[:50])
    _shard(ckpt, 1).unlink()
    proc = call(capsys, "verify", ckpt)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "has 50 bytes" in proc.stderr and "is missing" in proc.stderr


@pytest.mark.parametrize("jobs", ["1", "3"])
def test_verify_names_the_damaged_chunk(tmp_path, capsys, jobs):
    with asyncckpt.SyncEngine(shard_bytes=64 << 10, chunk_bytes=4096) as engine:
        engine.save({f"w{i}": torch.randn(10_000) for i in range(3)}, tmp_path / "c").result()
    doc = json.loads((tmp_path / "c" / "manifest.json").read_text())
    s = doc["shards"][1]
    assert len(s["xxh3_64"]) > 3
    with open(tmp_path / "c" / s["file"], "r+b") as f:
        f.seek(2 * 4096 + 5)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    proc = call(capsys, "verify", tmp_path / "c", "-j", jobs)
    assert_error(proc, f"checksum mismatch in shard {s['file']} at bytes 8192..12288")


def test_verify_reports_stray_shards_without_failing(ckpt, capsys):
    (ckpt / "shard-0123456789abcdef-00000.safetensors").write_bytes(b"leftover")
    proc = call(capsys, "verify", ckpt)
    assert proc.returncode == 0 and "stray shard file" in proc.stderr


def test_verify_checks_the_manifest_against_the_shard_headers(ckpt, capsys):
    # a manifest that parses and whose checksums match, but that places the shard's first tensor 8 bytes early
    # (into the header, overlapping no other record): loading would silently return wrong values, and only the
    # shard's own safetensors header can tell
    doc = json.loads((ckpt / "manifest.json").read_text())
    t = min((t for t in doc["tensors"] if t.get("shard") == 0), key=lambda t: t["offset"])
    t["offset"] -= 8
    (ckpt / "manifest.json").write_bytes(seal(doc))  # a consistent lie: its own checksum matches
    assert_error(call(capsys, "verify", ckpt), "safetensors header and the manifest")


@pytest.mark.parametrize("command", ["inspect", "verify", "convert"])
def test_missing_uncommitted_and_foreign_paths(command, ckpt, tmp_path, capsys):
    extra = [tmp_path / "out.pt"] if command == "convert" else []
    assert_error(run(command, tmp_path / "nope", *extra), "nope")  # once as a real process, then in-process
    (ckpt / "manifest.json").unlink()  # a save that never committed
    assert_error(call(capsys, command, ckpt, *extra), "never committed")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hi")
    assert_error(call(capsys, command, foreign, *extra), "not an asyncckpt checkpoint")


def test_inspect_of_a_torch_file_points_at_convert(tmp_path, capsys):
    torch.save({"w": torch.ones(2)}, tmp_path / "model.pt")
    assert_error(call(capsys, "inspect", tmp_path / "model.pt"), "is a file", "asyncckpt convert")


def test_corrupt_manifest_is_one_line(ckpt, capsys):
    (ckpt / "manifest.json").write_text('{"format": "asyncckpt", "version": 1, "shards": 3}')
    assert_error(run("verify", ckpt), "manifest is invalid")
    (ckpt / "manifest.json").write_text("{not json")
    assert_error(call(capsys, "inspect", ckpt), "not valid JSON")


# ---------------------------------------------------------------- latest

def test_latest(tmp_path):
    root = tmp_path / "run"
    with asyncckpt.SyncEngine() as engine:
        for step in (1, 2):
            engine.save({"step": step, "w": torch.full((2,), step)}, root / f"step-{step}").result()
    crashed = root / "step-3"
    crashed.mkdir()
    (crashed / "shard-0123456789abcdef-00000.safetensors").write_bytes(b"partial")
    proc = run("latest", root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(root / "step-2")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_error(run("latest", empty), "no committed checkpoint under")
    assert_error(run("latest", tmp_path / "missing"), "does not exist")


# ---------------------------------------------------------------- convert

def test_native_torch_native_round_trip(ckpt, tmp_path):
    original = load(ckpt)
    proc = run("convert", ckpt, tmp_path / "full.pt")
    assert proc.returncode == 0, proc.stderr
    assert "torch.save file" in proc.stdout
    as_file = torch.load(tmp_path / "full.pt", weights_only=True)
    assert_same(original, as_file)
    assert as_file["tied"]["a"] is as_file["model"]["0.weight"]
    window, overlap = as_file["window"], as_file["overlap"]
    assert window.untyped_storage().data_ptr() == overlap.untyped_storage().data_ptr()
    # only the tensors' bytes are written, not whole shard buffers
    assert as_file["model"]["0.weight"].untyped_storage().nbytes() == 16 * 8 * 4

    proc = run("convert", tmp_path / "full.pt", tmp_path / "back")
    assert proc.returncode == 0, proc.stderr
    assert "native checkpoint" in proc.stdout
    assert_same(original, load(tmp_path / "back"))
    assert run("verify", tmp_path / "back").returncode == 0


def test_convert_refuses_to_overwrite(ckpt, tmp_path, capsys):
    dst = tmp_path / "out.pt"
    dst.write_bytes(b"precious")
    assert_error(run("convert", ckpt, dst), "already exists", "--force")
    assert dst.read_bytes() == b"precious"
    assert call(capsys, "convert", ckpt, dst, "--force").returncode == 0
    assert "model" in torch.load(dst, weights_only=True)

    native = tmp_path / "native"
    assert call(capsys, "convert", dst, native).returncode == 0
    assert_error(call(capsys, "convert", dst, native), "already exists")
    assert call(capsys, "convert", dst, native, "-f").returncode == 0  # replaces the checkpoint at its commit
    assert len(json.loads((native / "manifest.json").read_text())["shards"]) == len(list(native.glob("shard-*")))
    assert_error(call(capsys, "convert", native, dst), "already exists")
    assert call(capsys, "convert", native, dst, "--force").returncode == 0
    assert call(capsys, "convert", dst, native / "x.pt", "--to", "torch").returncode == 1

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    assert_error(call(capsys, "convert", ckpt, foreign, "--force"), "refusing to replace")
    assert (foreign / "keep.txt").exists()
    assert_error(call(capsys, "convert", ckpt, ckpt, "--force", "--to", "safetensors"), "same path")


def test_torch_file_with_arbitrary_objects_needs_unsafe(tmp_path, capsys):
    torch.save({"w": torch.ones(3), "hparams": argparse.Namespace(lr=0.5)}, tmp_path / "old.pt")
    line = assert_error(run("convert", tmp_path / "old.pt", tmp_path / "n"), "argparse.Namespace", "--unsafe")
    assert "weights_only" in line or "weights-only" in line
    assert not (tmp_path / "n").exists()
    proc = run("convert", tmp_path / "old.pt", tmp_path / "n", "--unsafe")
    assert proc.returncode == 0, proc.stderr
    assert "warning" in proc.stderr and "arbitrary code" in proc.stderr
    assert load(tmp_path / "n", weights_only=False)["hparams"].lr == 0.5
    # reading it back out needs the same trust
    assert_error(call(capsys, "convert", tmp_path / "n", tmp_path / "again.pt"), "--unsafe")
    assert call(capsys, "convert", tmp_path / "n", tmp_path / "again.pt", "--unsafe").returncode == 0


def test_convert_rejects_files_that_are_not_torch_saves(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    assert_error(run("convert", tmp_path / "junk.pt", tmp_path / "out"), "not a readable torch.save file")
    assert not (tmp_path / "out").exists()


def test_convert_direction_errors(ckpt, tmp_path, capsys):
    torch.save({"w": torch.ones(1)}, tmp_path / "a.pt")
    assert_error(call(capsys, "convert", tmp_path / "a.pt", tmp_path / "b.pt", "--to", "torch"), "is a file")
    assert_error(call(capsys, "convert", ckpt, tmp_path / "x", "--to", "native"), "is a directory")
    assert_error(call(capsys, "convert", ckpt, tmp_path / "x.pt", "--key", "model"), "--key", status=2)


def test_views_of_one_storage_as_two_dtypes(tmp_path):
    # the native format keeps them, torch.save refuses them: the torch file gets separate copies
    from safetensors.torch import load_file

    x = torch.arange(12, dtype=torch.float32)
    state = {"x": x, "bits": x.view(torch.int32), "t": x.view(3, 4).t()}
    with asyncckpt.SyncEngine() as engine:
        engine.save(state, tmp_path / "n").result()
    convert.to_torch_file(tmp_path / "n", tmp_path / "a.pt")
    assert_same(state, torch.load(tmp_path / "a.pt", weights_only=True))
    convert.to_safetensors(tmp_path / "n", tmp_path / "w.safetensors")
    exported = load_file(tmp_path / "w.safetensors")
    assert_same(state, {k: exported[k] for k in state})


def test_torch_file_of_a_sub_byte_tensor_names_it(tmp_path, capsys):
    """torch.save cannot store uint1 (which the format stores as bytes): a clear error naming the key and the
    dtype, not torch's bare KeyError."""
    with asyncckpt.SyncEngine() as engine:
        engine.save({"w": torch.ones(2), "bits": torch.zeros(8, dtype=torch.uint8).view(torch.uint1)},
                    tmp_path / "n").result()
    assert_error(call(capsys, "convert", tmp_path / "n", tmp_path / "a.pt"), "uint1 tensor at bits")
    assert not (tmp_path / "a.pt").exists()


def _resealed(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    doc = json.loads((dst / "manifest.json").read_text())
    change(doc)
    (dst / "manifest.json").write_bytes(seal(doc))
    return dst


def test_safetensors_export_of_one_tensor_under_two_records(ckpt, tmp_path):
    """Two records on one span (one tensor under two names, as the format allows) made safetensors' save raise
    a bare RuntimeError ("Some tensors share memory"); the tensor is written once, under its first name."""
    from safetensors.torch import load_file

    def twin(doc):
        t = next(t for t in doc["tensors"] if "base" not in t and t["dtype"] == "bfloat16")
        doc["tensors"].append(dict(t))
        doc["tree"]["dict"].append(["twin", {"tensor": len(doc["tensors"]) - 1}])

    src = _resealed(ckpt, tmp_path / "twin", twin)
    proc = run("convert", src, tmp_path / "w.safetensors", "--to", "safetensors")
    assert proc.returncode == 0, proc.stderr
    assert "twin is the same tensor as half" in proc.stderr
    assert torch.equal(load_file(tmp_path / "w.safetensors")["half"], torch.ones(2, 3, dtype=torch.bfloat16))


@pytest.mark.parametrize("length", [1 << 26, 1 << 43])
def test_safetensors_export_refuses_views_the_files_do_not_justify(ckpt, tmp_path, capsys, length):
    """A stride-0 view of 2**26 or 2**43 elements over a 96-byte storage: export allocated 1 GiB from a 2 KiB
    checkpoint, or failed with torch's bare allocation error. Broadcast views as small as users save still export."""
    from safetensors.torch import load_file

    def stretch(doc):
        next(t for t in doc["tensors"] if "base" in t).update(shape=[length], stride=[0])

    src = _resealed(ckpt, tmp_path / "stretched", stretch)
    assert_error(call(capsys, "convert", src, tmp_path / "w.safetensors", "--to", "safetensors"),
                 "would take", "load it with asyncckpt.load")
    assert not (tmp_path / "w.safetensors").exists()
    row = torch.arange(1000.0)
    with asyncckpt.SyncEngine() as engine:  # a view record: 4 MB dense over 4 KB stored
        engine.save({"row": row, "wide": row.expand(1000, 1000)}, tmp_path / "broadcast").result()
    asyncckpt.to_safetensors(tmp_path / "broadcast", tmp_path / "b.safetensors")
    assert torch.equal(load_file(tmp_path / "b.safetensors")["wide"], row.expand(1000, 1000))


def test_safetensors_export_unpickles_nothing(tmp_path, capsys):
    with asyncckpt.SyncEngine() as engine:
        engine.save({"w": torch.ones(2), "hparams": argparse.Namespace(lr=0.5)}, tmp_path / "n").result()
    proc = call(capsys, "convert", tmp_path / "n", tmp_path / "w.safetensors", "--to", "safetensors")
    assert proc.returncode == 0, proc.stderr
    assert "hparams" in proc.stderr and "1 tensor," in proc.stdout


def test_safetensors_single_file(ckpt, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    dst = tmp_path / "weights.safetensors"
    proc = run("convert", ckpt, dst, "--to", "safetensors")
    assert proc.returncode == 0, proc.stderr
    assert "note: skipped" in proc.stderr and "step" in proc.stderr and "tags" in proc.stderr
    assert "tied.a is the same tensor as model.0.weight" in proc.stderr
    original = load(ckpt)
    tensors = load_file(dst)
    assert set(tensors) == {"model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias",
                            "optimizer.state.0.momentum_buffer", "optimizer.state.1.momentum_buffer",
                            "optimizer.state.2.momentum_buffer", "optimizer.state.3.momentum_buffer",
                            "half", "window", "overlap"}
    flat = dict(flatten(original))
    for name, t in tensors.items():
        assert torch.equal(t, flat[name].detach()), name
    with safe_open(dst, "pt") as f:
        assert f.metadata()["format"] == "pt"


def test_safetensors_per_shard_directory_and_key(ckpt, tmp_path):
    from safetensors.torch import load_file

    dst = tmp_path / "export"
    proc = run("convert", ckpt, dst, "--to", "safetensors", "--key", "model")
    assert proc.returncode == 0, proc.stderr
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in dst.glob("*.safetensors"))
    assert len(files) > 1 and set(index["weight_map"].values()) == set(files)
    merged = {}
    for name in files:
        merged.update(load_file(dst / name))
    assert set(merged) == set(index["weight_map"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model.load_state_dict(merged)
    assert torch.equal(model[0].weight, load(ckpt)["model"]["0.weight"])
    assert_error(run("convert", ckpt, dst, "--to", "safetensors"), "already exists")
    assert run("convert", ckpt, dst, "--to", "safetensors", "--key", "model", "--force").returncode == 0
    assert_error(run("convert", ckpt, tmp_path / "e2", "--to", "safetensors", "--key", "nothing"), "no entry")


def test_text_progress_bar_without_tqdm(ckpt, tmp_path):
    code = ("import sys; sys.modules['tqdm'] = None; from asyncckpt.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    proc = run("verify", ckpt, "--progress", code=code)
    assert proc.returncode == 0, proc.stderr
    assert "verify" in proc.stderr and "[" in proc.stderr and "100%" in proc.stderr
    for dst in (tmp_path / "c.pt", tmp_path / "back"):  # convert both ways
        proc = run("convert", ckpt if dst.suffix else tmp_path / "c.pt", dst, "--progress", code=code)
        assert proc.returncode == 0, proc.stderr
        assert "100%" in proc.stderr, proc.stderr


def test_bench_measures_the_target_and_never_imports_the_working_directory(tmp_path):
    # a stray package named like the repository's harness, in the directory the command runs from
    stray = tmp_path / "cwd" / "benchmarks"
    stray.mkdir(parents=True)
    sentinel = tmp_path / "stray-code-ran"
    (stray / "__init__.py").write_text(f"open({str(sentinel)!r}, 'w').close()\nmain = lambda argv: 0\n")
    script = shutil.which("asyncckpt", path=os.path.dirname(sys.executable))
    assert script is not None, "the console script is installed with the package"
    target = tmp_path / "target"
    target.mkdir()
    proc = subprocess.run([script, "bench", str(target), "--size", "4MiB", "--repeats", "1", "--json"],
                          capture_output=True, text=True, cwd=tmp_path / "cwd", timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert not sentinel.exists(), "asyncckpt bench ran code from the working directory"
    result = json.loads(proc.stdout)
    assert result["bytes"] >= 4 << 20 and result["target"] == str(target)
    for key in ("raw_write_s", "raw_read_s", "durable_s", "load_s", "blocking_s", "copy_floor_s"):
        assert result[key] > 0, key
    assert os.listdir(target) == [], "the benchmark leaves nothing behind"
    text = run("bench", target, "--size", "4MiB", "--repeats", "1")
    assert text.returncode == 0, text.stderr
    assert "storage alone" in text.stdout and "engine" in text.stdout and "bottleneck" in text.stdout



# ---------------------------------------------------------------- one convention: --json, -v/-q, exit statuses

def test_every_command_prints_json_with_the_documented_exit_status(ckpt, tmp_path, capsys):
    def as_json(*args: object, status: int) -> dict:
        proc = call(capsys, *args)
        assert proc.returncode == status, (args, proc.stdout, proc.stderr)
        return json.loads(proc.stdout)

    assert as_json("inspect", ckpt, "--json", status=0)["totals"]["tensors"] > 0
    found = as_json("verify", ckpt, "--json", status=0)
    assert found["ok"] is True and found["problems"] == [] and found["checksums"] > 0
    made = as_json("convert", ckpt, tmp_path / "c.pt", "--json", status=0)
    assert made["to"] == "torch" and made["bytes"] == (tmp_path / "c.pt").stat().st_size
    assert as_json("latest", ckpt.parent, "--json", status=0)["latest"] == str(ckpt)
    (tmp_path / "bench").mkdir()
    assert as_json("bench", tmp_path / "bench", "--size", "1MiB", "--repeats", "1", "--json",
                   status=0)["bytes"] >= 1 << 20
    # a check that fails: 1, and still one JSON document
    empty = tmp_path / "empty"
    empty.mkdir()
    assert as_json("latest", empty, "--json", status=1)["latest"] is None
    data = bytearray(_shard(ckpt).read_bytes())
    data[-1] ^= 0xFF
    _shard(ckpt).write_bytes(bytes(data))
    found = as_json("verify", ckpt, "--json", status=1)
    assert found["ok"] is False and "checksum mismatch" in found["problems"][0]
    # an operation that cannot be done (1) and a usage error found after parsing (2): the error as JSON too
    for args, status in ((["inspect", tmp_path / "nowhere"], 1), (["convert", ckpt, tmp_path / "c.pt"], 1),
                         (["inspect", ckpt, "-o", "no-equals-sign"], 2)):
        failed = as_json(*args, "--json", status=status)
        assert failed["status"] == status and failed["error"], failed
    # argparse's own usage errors: 2, before any command runs
    assert run("verify", "--json").returncode == 2


def test_verbose_and_quiet_on_every_command(ckpt, tmp_path, capsys):
    torch.save({"w": torch.ones(3)}, tmp_path / "w.pt")
    for args in (["-v", "convert", tmp_path / "w.pt", tmp_path / "a"], ["convert", tmp_path / "w.pt",
                                                                         tmp_path / "b", "-v"]):
        proc = call(capsys, *args)
        assert proc.returncode == 0, proc.stderr
        assert "asyncckpt: info: saved " in proc.stderr and "durable after" in proc.stderr, proc.stderr
    (ckpt / "shard-0123456789abcdef-00000.safetensors").write_bytes(b"leftover")
    assert "stray shard file" in call(capsys, "verify", ckpt).stderr
    for args in (["-q", "verify", ckpt], ["verify", ckpt, "-q"]):
        proc = call(capsys, *args)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    for command in ("inspect", "verify", "convert", "latest", "bench"):
        assert "-q, --quiet" in run(command, "--help").stdout, command


# ---------------------------------------------------------------- in-process: fsspec URLs and the Python API

def test_fsspec_urls_in_process(capsys, tmp_path):
    import fsspec

    fsspec.filesystem("memory").store.clear()
    state = {"w": torch.arange(6.0).view(2, 3), "step": 3}
    with asyncckpt.SyncEngine() as engine:
        engine.save(state, "memory://runs/a").result()
    assert cli.main(["inspect", "memory://runs/a", "-o", "skip_instance_cache=false"]) == 0
    assert "[2, 3]" in capsys.readouterr().out
    assert cli.main(["verify", "memory://runs/a", "--no-progress"]) == 0
    assert cli.main(["latest", "memory://runs"]) == 0
    assert capsys.readouterr().out.split()[-1] == "memory://runs/a"
    assert cli.main(["convert", "memory://runs/a", "memory://out/a.pt"]) == 0
    with fsspec.open("memory://out/a.pt", "rb") as f:
        assert torch.equal(torch.load(f, weights_only=True)["w"], state["w"])
    assert cli.main(["convert", "memory://out/a.pt", "memory://runs/b"]) == 0
    assert cli.main(["convert", "memory://runs/b", "memory://out/w.safetensors", "--to", "safetensors"]) == 0
    assert cli.main(["convert", "memory://runs/b", str(tmp_path / "local.pt")]) == 0
    assert torch.load(tmp_path / "local.pt", weights_only=True)["step"] == 3
    capsys.readouterr()
    assert cli.main(["inspect", "memory://nothing/here"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoint at memory://nothing/here" in err


def test_python_api(ckpt, tmp_path):
    bars = []

    class Bar:
        def __init__(self, desc, total):
            self.desc, self.total, self.n = desc, total, 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            pass

    result = convert.to_torch_file(ckpt, tmp_path / "a.pt", progress=Bar)
    assert result.files == [str(tmp_path / "a.pt")] and result.tensors == 11
    assert [b.desc for b in bars] == ["read", "write"] and bars[0].n == bars[0].total > 0
    result = convert.from_torch_file(tmp_path / "a.pt", tmp_path / "b", shard_bytes=1 << 20)
    assert_same(load(ckpt), load(tmp_path / "b"))
    with pytest.raises(asyncckpt.CheckpointError, match="already exists"):
        convert.to_torch_file(ckpt, tmp_path / "a.pt")
    assert torch.load(tmp_path / "a.pt", weights_only=True)["model"]["0.weight"].untyped_storage().nbytes() == 512


def test_converted_lightning_checkpoint_loads_with_load_from_checkpoint(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")

    class Net(pl.LightningModule):
        def __init__(self, hidden: int = 4):
            super().__init__()
            self.save_hyperparameters()
            self.layer = torch.nn.Linear(3, hidden)

    net = Net(hidden=5)
    checkpoint = {"state_dict": net.state_dict(), "pytorch-lightning_version": pl.__version__, "epoch": 1,
                  "global_step": 10, "hyper_parameters": dict(net.hparams), "optimizer_states": [],
                  "lr_schedulers": [], "loops": {}, "callbacks": {}}
    with asyncckpt.SyncEngine() as engine:
        engine.save(checkpoint, tmp_path / "native").result()
    proc = run("convert", tmp_path / "native", tmp_path / "last.ckpt")
    assert proc.returncode == 0, proc.stderr
    restored = Net.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    assert restored.hparams.hidden == 5
    assert torch.equal(restored.layer.weight, net.layer.weight)
