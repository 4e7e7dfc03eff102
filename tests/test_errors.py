"""Errors keep their identity across the background boundary; limits match on both sides; closed engines say so."""

from __future__ import annotations

import json

import pytest
import torch

import asyncckpt
from asyncckpt import CheckpointError
from asyncckpt.io import register, unregister
from asyncckpt.io.local import LocalStorage


class QuotaError(CheckpointError):
    """A backend's own error whose constructor takes more than a message."""

    def __init__(self, volume: str, used: int) -> None:
        super().__init__(f"quota exceeded on {volume} ({used} bytes used)")
        self.volume, self.used = volume, used


class QuotaStorage(LocalStorage):
    """Local disk that refuses every new shard with a QuotaError."""

    @classmethod
    def create(cls, protocol, storage_options, io):
        return cls(io)

    def strip(self, url: str) -> str:
        return super().strip(url.removeprefix("quota://"))

    async def open_sink(self, path, nbytes, fsync, chunk_bytes):
        raise QuotaError("/vol0", 123)


@pytest.fixture
def quota():
    register("quota", QuotaStorage)
    yield
    unregister("quota")


async def test_background_error_keeps_its_type_attributes_and_cause(quota, tmp_path):
    async with asyncckpt.CheckpointEngine() as engine:
        handle = await engine.save({"w": torch.ones(8)}, f"quota://{tmp_path}/ck")
        with pytest.raises(QuotaError) as caught:
            await handle
        assert handle.done()
    error = caught.value
    assert f"save to quota://{tmp_path}/ck failed" in str(error) and "quota exceeded on /vol0" in str(error)
    assert (error.volume, error.used) == ("/vol0", 123)
    assert isinstance(error.__cause__, QuotaError) and error.__cause__ is not error
    assert not (tmp_path / "ck").exists()


def test_background_error_reaches_a_sync_waiter_too(quota, tmp_path):
    with asyncckpt.SyncEngine() as engine:
        handle = engine.save({"w": torch.ones(8)}, f"quota://{tmp_path}/ck")
        with pytest.raises(QuotaError, match="quota exceeded"):
            handle.result(timeout=30)
        engine.wait()  # already observed: not raised again


def nest(depth: int) -> list:
    node: list = [1]
    for _ in range(depth - 1):
        node = [node]
    return node


@pytest.mark.parametrize("depth", [250, 300])
def test_nesting_limit_is_the_same_on_save_and_load(tmp_path, depth):
    with asyncckpt.SyncEngine() as engine:
        if depth > 256:
            with pytest.raises(CheckpointError, match="nests deeper than 256 levels"):
                engine.save({"deep": nest(depth)}, tmp_path / "ck")
            assert not (tmp_path / "ck").exists(), "nothing is written for a state that could not load"
        else:
            engine.save({"deep": nest(depth)}, tmp_path / "ck").result()
            assert engine.load(tmp_path / "ck") == {"deep": nest(depth)}


def test_closed_sync_engine_raises_checkpoint_error_everywhere(tmp_path):
    engine = asyncckpt.SyncEngine()
    engine.save({"w": torch.ones(2)}, tmp_path / "ck").result()
    engine.close()
    engine.close()  # idempotent
    calls = {
        "save": lambda: engine.save({"w": torch.ones(2)}, tmp_path / "x"),
        "save_with": lambda: engine.save_with({"w": torch.ones(2)}, lambda c: None, tmp_path / "y"),
        "load": lambda: engine.load(tmp_path / "ck"), "remove": lambda: engine.remove(tmp_path / "ck"),
        "wait": engine.wait, "wait_for": lambda: engine.wait_for(tmp_path / "ck"), "check": engine.check,
        "latest": lambda: engine.latest(tmp_path), "committed": lambda: engine.committed(tmp_path),
        "run": lambda: engine.run(lambda: None),
    }
    for name, call in calls.items():
        with pytest.raises(CheckpointError, match="closed"):
            call()
    assert (tmp_path / "ck" / "manifest.json").exists()


async def test_closed_async_engine_raises_checkpoint_error(tmp_path):
    engine = asyncckpt.CheckpointEngine()
    with pytest.raises(CheckpointError, match="not running"):
        await engine.save({"w": torch.ones(2)}, tmp_path / "x")
    async with engine:
        await (await engine.save({"w": torch.ones(2)}, tmp_path / "ck"))
    for call in (lambda: engine.save({"w": torch.ones(2)}, tmp_path / "x"), lambda: engine.load(tmp_path / "ck"),
                 lambda: engine.remove(tmp_path / "ck"), engine.wait):
        with pytest.raises(CheckpointError, match="closed"):
            await call()


def test_public_names_live_at_the_package_root():
    for name in asyncckpt.__all__:
        assert getattr(asyncckpt, name) is not None, name
    for name in ("S3Error", "StorageError", "RetryPolicy", "EngineOptions", "InvalidArgumentError", "SaveHandle",
                 "SaveResult", "SyncHandle", "Manifest", "verify", "to_torch_file"):
        assert name in asyncckpt.__all__, name
    assert issubclass(asyncckpt.S3Error, asyncckpt.StorageError) and issubclass(asyncckpt.StorageError,
                                                                             CheckpointError)
    assert asyncckpt.RetryPolicy(attempts=3).attempts == 3


def test_bad_arguments_raise_invalid_argument_error_before_anything_is_read(tmp_path):
    with asyncckpt.SyncEngine() as engine:
        engine.save({"w": torch.ones(2)}, tmp_path / "ck").result()
        for bad in ("bogus", 123, {"cpu": "nowhere"}, {1: "cpu"}):
            with pytest.raises(asyncckpt.InvalidArgumentError, match="map_location"):
                engine.load(tmp_path / "ck", map_location=bad)
        with pytest.raises(asyncckpt.InvalidArgumentError, match="str or os.PathLike"):
            engine.save({"w": torch.ones(2)}, 42)
        with pytest.raises(asyncckpt.InvalidArgumentError, match="text"):
            engine.load(b"/tmp/ck")
        with pytest.raises(asyncckpt.InvalidArgumentError, match="metadata must be JSON"):
            engine.save({"w": torch.ones(2)}, tmp_path / "x", metadata={"f": object()})
    for options, match in (({"chunk_bytes": 4095}, "multiple of 4096"), ({"write_concurrency": 0}, "positive"),
                           ({"fsync": "yes"}, "True or False"), ({"snapshot": "lazy"}, "snapshot must be")):
        with pytest.raises(asyncckpt.InvalidArgumentError, match=match):
            asyncckpt.SyncEngine(**options)
    with pytest.raises(asyncckpt.InvalidArgumentError, match="did you mean 'chunk_bytes'"):
        asyncckpt.EngineOptions.from_kwargs({"chunk_byte": 4096})


def test_strict_false_restores_what_matches_and_says_what_did_not(tmp_path, caplog):
    with asyncckpt.SyncEngine() as engine:
        engine.save({"model": {"a": torch.ones(2), "b": torch.ones(2)}}, tmp_path / "ck").result()
        target = {"model": {"a": torch.zeros(2), "c": torch.zeros(2)}}
        with caplog.at_level("WARNING", logger="asyncckpt"):
            engine.load(tmp_path / "ck", state=target, strict=False)
    assert torch.equal(target["model"]["a"], torch.ones(2))
    message = " ".join(r.message for r in caplog.records)
    assert "missing from the checkpoint: model.c" in message and "not in the target: model.b" in message
    target = {"model": {"a": torch.zeros(2), "c": torch.zeros(2)}}
    with asyncckpt.SyncEngine() as engine, pytest.raises(asyncckpt.CheckpointError) as raised:
        engine.load(tmp_path / "ck", state=target)  # strict: refused, but only once the matching entry was copied
    assert "pass strict=False" in str(raised.value) and "matched were restored" in str(raised.value)
    assert torch.equal(target["model"]["a"], torch.ones(2))  # the error says so, since it is so


def test_a_manifest_of_a_newer_format_says_so_and_what_to_upgrade(tmp_path):
    from asyncckpt.format.manifest import seal

    with asyncckpt.SyncEngine() as engine:
        engine.save({"w": torch.ones(2)}, tmp_path / "ck").result()
        doc = json.loads((tmp_path / "ck" / "manifest.json").read_text())
        doc["version"] = 7
        (tmp_path / "ck" / "manifest.json").write_bytes(seal(doc))
        with pytest.raises(asyncckpt.NewerFormatError, match="newer asyncckpt.*format version 7.*upgrade") as info:
            engine.load(tmp_path / "ck")
    assert not isinstance(info.value, asyncckpt.CorruptCheckpointError)


def test_a_damaged_chunk_is_reported_with_its_real_byte_range(tmp_path):
    with asyncckpt.SyncEngine() as engine:
        engine.save({"w": torch.ones(4)}, tmp_path / "ck").result()
        shard = next((tmp_path / "ck").glob("shard-*"))
        data = bytearray(shard.read_bytes())
        data[-1] ^= 1
        shard.write_bytes(bytes(data))
        with pytest.raises(asyncckpt.CorruptCheckpointError, match=f"at bytes 0..{len(data)};"):
            engine.load(tmp_path / "ck")


def test_a_path_with_nothing_there_is_checkpoint_not_found(tmp_path):
    with asyncckpt.SyncEngine() as engine:
        with pytest.raises(asyncckpt.CheckpointNotFoundError, match="no checkpoint at .*nothing: the path does not"):
            engine.load(tmp_path / "nothing")
        (tmp_path / "empty").mkdir()  # a directory, but not a checkpoint: not "nothing there"
        with pytest.raises(asyncckpt.CheckpointError) as raised:
            engine.load(tmp_path / "empty")
        assert not isinstance(raised.value, asyncckpt.CheckpointNotFoundError)


def test_a_target_tensor_torch_cannot_write_in_place_is_named(tmp_path):
    # an expand()ed target: torch's copy_ raised its bare RuntimeError ("unsupported operation: more than one
    # element of the written-to tensor refers to a single memory location")
    with asyncckpt.SyncEngine() as engine:
        engine.save({"w": torch.arange(6.0).view(2, 3), "b": torch.ones(3)}, tmp_path / "ck").result()
        target = {"w": torch.zeros(1, 3).expand(2, 3), "b": torch.zeros(3)}
        with pytest.raises(asyncckpt.CheckpointError, match=r"mismatched: w \(the target cannot be written in place"):
            engine.load(tmp_path / "ck", state=target)
