"""Lightning's sharded strategies made asynchronous: ``asyncckpt.lightning.AsyncModelParallelStrategy`` and
``AsyncFSDPStrategy`` (issue 13, "Sharded strategies").

Real ranks: the fork server of tests/dist_worker.py forks 2 processes on a gloo group (CPU) that run
tests/sharded_scenarios.py — a real ``Trainer`` with FSDP2 ``fully_shard`` for the model-parallel strategy (fit,
top-k removal, resume from ``ckpt_path="last"``), and for FSDP, which Lightning refuses on the CPU, the strategy set
up by hand around an FSDP1 module. Values are compared bit for bit, as digests of their bytes.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from .helpers import Ranks  # noqa: E402

PACKAGES = [name for name in ("lightning.pytorch", "pytorch_lightning")
            if importlib.util.find_spec(name.split(".")[0]) is not None]
if not PACKAGES:
    pytest.skip("needs lightning or pytorch_lightning", allow_module_level=True)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    server = Ranks(tmp_path_factory.mktemp("ranks"), ("sharded_scenarios",))
    yield server
    server.close()


def shards_of_both_ranks(files: list[str]) -> bool:
    return {f.split("-")[2] for f in files if f.startswith("shard-")} == {"r00000", "r00001"}


@pytest.mark.parametrize("package", PACKAGES)
def test_model_parallel_fit_keeps_lightnings_layout_and_resumes_bit_exact_from_last(ranks, tmp_path, package):
    out = tmp_path / "ckpts"
    results = ranks.run("sharded_scenarios:fit_and_resume", out=str(out), package=package, timeout=120, wait_s=240)
    for r in results:
        assert r["resumed_step"] == 6
        assert r["resumed"] == r["ended"], "the resumed state differs from the state the run ended with"
    listing = results[0]["listing"]
    assert sorted(listing) == ["last.ckpt", "step=4.ckpt", "step=6.ckpt"]  # top-2: step=2 removed
    for name, files in listing.items():
        assert "manifest.json" in files and "meta.pt" in files and ".metadata" not in files, (name, files)
        assert shards_of_both_ranks(files), (name, files)
    meta = results[0]["meta"]
    assert meta["global_step"] == 6 and meta["epoch"] == 0
    assert "state_dict" not in meta["keys"] and "optimizer_states" not in meta["keys"]
    assert results[0]["plain"] == results[0]["ended_model"]  # load_from_checkpoint: a whole, plain module
    assert not [t for t in results[0]["threads"] if t.startswith("asyncckpt")]


@pytest.mark.parametrize("package", PACKAGES)
def test_model_parallel_pending_saves_removal_load_and_failures(ranks, tmp_path, package):
    slow = 1.0
    results = ranks.run("sharded_scenarios:pending", out=str(tmp_path), package=package, slow=slow, timeout=120,
                        wait_s=240)
    for rank, r in enumerate(results):
        assert r["threads_after_fit"] == [], r["threads_after_fit"]  # teardown at the end of fit joins ours
        assert r["save_returned_s"] < slow, r["save_returned_s"]  # one copy, then back to training
        if rank == 0:
            assert r["pending_layout"] == [True, False]  # the directory at once, meta.pt only after the commit
            assert r["remove_waited_s"] >= slow  # it waited for the pending save ...
        assert r["a_exists_after"] is False  # ... so nothing of it came back after the removal
        assert r["changed_differs"]
        assert r["loaded"] == r["expected"]  # the load waited and restored the values of the moment of the save
        assert r["meta_step"] == 2
        assert "manifest.json" in r["files"] and "meta.pt" in r["files"] and shards_of_both_ranks(r["files"])
        assert r["teardown_error"] is not None and "c.ckpt" in r["teardown_error"], r["teardown_error"]
        assert "No space left" in r["teardown_error"]
        assert r["c_files"] is None, r["c_files"]  # a failed save leaves nothing named like the checkpoint
        assert r["threads_left"] == [], r["threads_left"]


@pytest.mark.parametrize("package", PACKAGES)
def test_fsdp_sharded_save_pending_removal_and_load_by_hand(ranks, tmp_path, package):
    slow = 1.0
    results = ranks.run("sharded_scenarios:fsdp", out=str(tmp_path), package=package, slow=slow, timeout=120,
                        wait_s=240)
    for rank, r in enumerate(results):
        assert r["dtensors"]  # the default device mesh: FSDP's sharded state dicts are DTensors, staged in one copy
        assert r["warnings"] == []
        assert r["save_returned_s"] < slow, r["save_returned_s"]
        if rank == 0:
            assert r["remove_waited_s"] >= slow
            assert r["meta_file"] == ["epoch", "global_step"]
            assert r["read_keys"] == ["epoch", "global_step", "optimizer_states", "state_dict"]
        assert r["a_exists_after"] is False
        assert r["changed_differs"] and r["loaded"] == r["expected"]
        assert r["meta"] == {"epoch": 1, "global_step": 5}
        assert "manifest.json" in r["files"] and "meta.pt" in r["files"] and shards_of_both_ranks(r["files"])


@pytest.mark.parametrize("package", PACKAGES)
def test_model_parallel_resumes_lightnings_own_checkpoint_and_links_last(ranks, tmp_path, package):
    results = ranks.run("sharded_scenarios:stock_then_links", out=str(tmp_path), package=package, timeout=120,
                        wait_s=240)
    for r in results:
        assert ".metadata" in r["stock_files"]  # torch's own FileSystemWriter layout, written by Lightning
        assert r["resumed_step"] == 2 and r["resumed"] == r["ended"]
    r = results[0]
    assert r["listing"] == ["last.ckpt", "step=6.ckpt"]  # top-1: step=2 and step=4 removed, the old links too
    assert os.path.basename(r["link"]) == "step=6.ckpt"
    assert "manifest.json" in r["target_files"] and "meta.pt" in r["target_files"]


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["model_parallel", "fsdp"])
def test_a_real_trainer_on_cuda_resumes_bit_exact(ranks, tmp_path, kind):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    r, = ranks.run("sharded_scenarios:cuda_fit", world=0, out=str(tmp_path), package=PACKAGES[0], kind=kind,
                   timeout=240, wait_s=300)
    assert r["resumed_step"] == 4 and r["resumed"] == r["ended"]
    assert "manifest.json" in r["files"] and "meta.pt" in r["files"]


@pytest.mark.parametrize("package", PACKAGES[:1])
def test_fsdp_sharded_tensors_are_saved_synchronously_with_a_warning(ranks, tmp_path, package):
    results = ranks.run("sharded_scenarios:fsdp", out=str(tmp_path), package=package, slow=0.2, mesh=False,
                        timeout=120, wait_s=240)
    for rank, r in enumerate(results):
        assert r["kinds"] == ["ShardedTensor"]  # a process group given: FSDP's own sharded state dict
        assert len(r["warnings"]) == 2 and "ShardedTensor" in r["warnings"][0], r["warnings"]  # a and b
        if rank == 0:
            assert r["remove_waited_s"] < 0.2  # nothing was pending any more: the save had blocked
        assert r["a_exists_after"] is False
        assert r["changed_differs"] and r["loaded"] == r["expected"]
        assert "manifest.json" in r["files"] and "meta.pt" in r["files"] and shards_of_both_ranks(r["files"])


def test_shards_larger_than_the_staging_budget_are_saved_synchronously(ranks, tmp_path):
    results = ranks.run("sharded_scenarios:over_budget", out=str(tmp_path), package=PACKAGES[0], timeout=120,
                        wait_s=240)
    for r in results:
        assert r["warnings"] and "more than host_memory_budget" in r["warnings"][0], r["warnings"]
        assert r["loaded"] == r["ended"]


@pytest.mark.parametrize("name", ["AsyncFSDPStrategy", "AsyncModelParallelStrategy"])
def test_bad_options_fail_when_the_strategy_is_made(name):
    import asyncckpt.lightning as al
    from asyncckpt import InvalidArgumentError

    cls = getattr(al, name)
    with pytest.raises(InvalidArgumentError, match="max_pending_saves"):
        cls(max_pending_saves=0)
    with pytest.raises(InvalidArgumentError):
        cls(engine_options={"host_memory_budget": -1})


@pytest.mark.parametrize("name", ["AsyncFSDPStrategy", "AsyncModelParallelStrategy"])
def test_each_package_gets_strategies_of_its_own(name):
    import asyncckpt.lightning as al

    for package, ours in (("lightning.pytorch", al), ("pytorch_lightning", getattr(al, "pl"))):
        if package not in PACKAGES:
            continue
        base = getattr(importlib.import_module(package + ".strategies"), name[len("Async"):])
        assert issubclass(getattr(ours, name), base)
