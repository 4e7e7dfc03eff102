"""Multi-rank checkpoints through torch.distributed.checkpoint with asyncckpt as its storage (asyncckpt.dcp).

Real process groups: a fork server (tests/dist_worker.py) forks the ranks, which join a gloo group on the CPU and
run a scenario of tests/dist_scenarios.py. Values are compared bit for bit, as digests of their bytes.

* the matrix: DDP + Adam, FSDP2 (``fully_shard`` on a CPU mesh, through get_state_dict / set_state_dict), DTensor
  Shard(0) / Shard(1) / Replicate; each with ``dcp.save`` and with ``dcp.async_save`` (the state changed as soon as
  it returns: the checkpoint keeps the old values); reloaded resharded (other placements; 2 ranks -> 4; 2 -> 1 plain
  module), and one case on the moto S3 server;
* kill trials: SIGKILL a rank or the coordinator during an overwrite, at chosen phases and at random moments ->
  the checkpoint loads exactly the old or the new state, and torch's own FileSystemWriter, killed at the same
  moment, does not;
* hostile global manifests, errors across ranks (DCP's CheckpointException unwrapped), DTensor refused by the
  single-process engine.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import asyncckpt
from asyncckpt import CheckpointError, CorruptCheckpointError, NewerFormatError, UnsafeCheckpointError
from asyncckpt.dcp import StorageReader, StorageWriter, unwrap, unwrapped
from asyncckpt.format.manifest import MANIFEST_NAME, SHARD_RE, parse, seal

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import dist_scenarios  # noqa: E402

from .helpers import Ranks  # noqa: E402

@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    server = Ranks(tmp_path_factory.mktemp("ranks"))
    yield server
    server.close()


def same(result: dict[str, Any], key: str = "loaded") -> None:
    expected, loaded = result["expected"], result[key]
    wrong = {k: (v, loaded.get(k)) for k, v in expected.items() if loaded.get(k) != v}
    assert not wrong, f"values that did not round-trip: {wrong}"


def files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def one_process_load(path: Path, state: dict[str, Any]) -> StorageReader:
    reader = StorageReader(path)
    with warnings.catch_warnings(), unwrapped():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.load(state, storage_reader=reader, no_dist=True)
    return reader


# ---------------------------------------------------------------- the matrix


@pytest.mark.parametrize("mode", ["sync", "async", "process"])
def test_ddp_model_and_adam_round_trip_and_load_on_one_process(ranks, tmp_path, mode):
    path, reference = tmp_path / "ddp", tmp_path / "reference.pt"
    results = ranks.run("ddp_adam", path=str(path), mode=mode, reference=str(reference))
    for r in results:
        same(r)  # under async_save the parameters changed right after it returned: the old values were saved
    assert results[0]["expected"] == results[1]["expected"]  # DDP: every rank holds the same state
    written = [r["bytes_written"] for r in results]
    if mode != "process":  # there the writer that counts is DCP's checkpoint process's copy
        assert all(written), f"each rank writes part of the replicated state: {written}"
    if mode == "async":  # whole staged shards went to one rank each and were written from staging, no copy
        assert sum(r["from_staging"] for r in results) >= 0.5 * sum(written), results
    names = files(path)
    assert MANIFEST_NAME in names and all(SHARD_RE.match(n) for n in names if n != MANIFEST_NAME)
    assert {n.split("-")[2] for n in names if n != MANIFEST_NAME} == {"r00000", "r00001"}

    # resharded to one process: a plain module, through DCP and through asyncckpt's own loader
    expected = torch.load(reference)
    net = dist_scenarios.model(5)
    target = {"model": net.state_dict()}
    one_process_load(path, target)
    net.load_state_dict(target["model"])
    assert all(torch.equal(net.state_dict()[k], v) for k, v in expected.items())
    whole = asyncckpt.SyncEngine().load(path)
    assert set(whole) == {"model", "optim", "step", "note"} and whole["step"] == 2
    assert all(torch.equal(whole["model"][k], v) for k, v in expected.items())
    assert whole["note"] == {"run": "ddp", "lr": [0.1]}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_large_replicated_tensors_are_cut_so_each_rank_writes_its_share(ranks, tmp_path, mode):
    path = tmp_path / "ddp-large"
    results = ranks.run("ddp_large", path=str(path), mode=mode)
    for r in results:
        same(r)
    written = [r["bytes_written"] for r in results]
    # three 1 MiB items (the embedding and its two Adam moments): written whole, one rank would write two of them
    assert max(written) <= 1.1 * min(written), f"bytes written per rank: {written}"
    manifest = parse((path / MANIFEST_NAME).read_bytes(), str(path))
    cut = {t.fqn: {manifest.shards[c.span.shard].file.split("-")[2] for c in t.chunks}
           for t in manifest.tensors if len(t.chunks) > 1}
    assert cut == {k: {"r00000", "r00001"} for k in ("model.0.weight", "optim.state.0.weight.exp_avg",
                                                      "optim.state.0.weight.exp_avg_sq")}, cut
    # the pieces are rows of one tensor: a plain process loads it whole
    whole = asyncckpt.SyncEngine().load(path)
    assert tuple(whole["model"]["0.weight"].shape) == (4096, 64)
    assert dist_scenarios.digest(whole["model"]["0.weight"]) == results[0]["expected"][".model.0.weight"]


def test_repeated_async_saves_copy_only_what_each_rank_writes(ranks, tmp_path):
    results = ranks.run("ddp_repeat", path=str(tmp_path / "ddp"), saves=3)
    saves = [r["saves"] for r in results]
    for per_rank in saves:
        for record in per_rank:  # every save holds the values of its moment (they changed as async_save returned)
            same(record)
    first = [per_rank[0]["staged"] for per_rank in saves]
    assert first[0] == first[1], first  # the first save copies everything, on every rank
    for n in (1, 2):
        staged = [per_rank[n]["staged"] for per_rank in saves]
        written = [per_rank[n]["written"] for per_rank in saves]
        # each rank copies about its half (the shard headers aside) and writes all of it straight from staging
        assert all(s <= 0.6 * first[0] for s in staged), (n, staged, first)
        assert sum(staged) >= first[0], (n, staged, first)
        assert [per_rank[n]["from_staging"] for per_rank in saves] == staged, saves
        assert max(written) <= 1.1 * min(written), written


def test_a_rank_whose_state_changed_unlike_the_others_fails_one_save_cleanly(ranks, tmp_path):
    results = ranks.run("ddp_diverge", path=str(tmp_path / "ck"))
    dropped = results[0]["dropped"]
    for r in results:
        assert r["first"] == "" and r["third"] == "", r
        assert r["second"].startswith("CheckpointError: ") and f"no rank staged {dropped}:" in r["second"], r
        assert r["after_failure"] == {f"w{i}": 10.0 + i for i in range(8)}, r  # the first save stays
        assert r["after"] == {f"w{i}": 30.0 + i for i in range(8)}, r


def test_a_state_staged_in_part_goes_to_the_process_mode_and_saves_whole(ranks, tmp_path):
    for r in ranks.run("thread_then_process", path=str(tmp_path / "ck"), timeout=120, wait_s=180):
        assert r["outcomes"] == [True, True, True], r
        first, in_part, again = r["staged"]
        assert in_part <= 0.6 * first and again == first, r


def test_replicated_tensors_stay_whole_when_cutting_is_off(ranks, tmp_path):
    path = tmp_path / "ddp-whole"
    results = ranks.run("ddp_large", path=str(path), split_bytes=None)
    for r in results:
        same(r)
    manifest = parse((path / MANIFEST_NAME).read_bytes(), str(path))
    assert all(len(t.chunks) == 1 for t in manifest.tensors)
    written = sorted(r["bytes_written"] for r in results)
    assert written[1] >= 1.8 * written[0], written  # two of the three large items on one rank


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_fsdp2_fully_shard_round_trips_through_get_and_set_state_dict(ranks, tmp_path, mode):
    results = ranks.run("fsdp2", path=str(tmp_path / "fsdp"), mode=mode)
    for r in results:
        assert r["sharded"]
        same(r)
    assert results[0]["expected"] == results[1]["expected"]
    if mode == "async":  # the sharded parameters and optimizer state: staged once, written from staging
        assert all(r["from_staging"] >= r["local_bytes"] > 0 for r in results), results


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_dtensor_shard_and_replicate_reshard_on_load(ranks, tmp_path, mode):
    path = tmp_path / "dt"
    results = ranks.run("dtensors", path=str(path), mode=mode)
    for r in results:
        same(r)  # loaded with other placements: Shard(0) -> Shard(1), Shard(1) -> Shard(0), Replicate -> Shard
        same(r, "aligned")  # and with the same ones
        # a rank loading its own placement reads about its own share: only the chunks covering its tensors
        aligned = r["aligned_read"]
        assert aligned["wanted"] == r["share"]
        assert aligned["read"] <= 1.05 * r["share"], aligned
        assert r["read"]["read"] <= 1.05 * sum(results[i]["bytes_written"] for i in range(2))
    # one process, plain tensors: every chunk of every rank assembled
    torch.manual_seed(7)
    full = {"rows": torch.randn(512, 256), "cols": torch.randn(9, 7, dtype=torch.float64),
            "rep": torch.arange(30, dtype=torch.int32).view(5, 6), "half": torch.randn(16, 16).half(),
            "plain": torch.linspace(0, 1, 11)}
    target = {k: torch.zeros_like(v) for k, v in full.items()}
    reader = one_process_load(path, target)
    assert all(torch.equal(target[k], v) for k, v in full.items())
    assert reader.stats.wanted == sum(v.nbytes for v in full.values())
    if mode == "sync":  # the same shards on 4 ranks (2 cores: more would only be slower), bit-exact
        for r in ranks.run("dtensors_load", world=4, path=str(path)):
            assert r["loaded"] == results[0]["expected"]


def test_save_and_load_on_the_s3_server(ranks, moto, options, bucket):
    # generous deadlines: moto is one Python process, slow under load; retries may take a minute
    (r0, r1) = ranks.run("s3_save", path=f"s3://{bucket}/run/step-1", options=options, timeout=240, wait_s=300)
    same(r0)
    same(r1)
    listing = asyncckpt.committed(f"s3://{bucket}/run", storage_options=options)
    assert [p for p, _ in listing] == [f"s3://{bucket}/run/step-1"]
    assert isinstance(listing[0][1], asyncckpt.GlobalManifest) and listing[0][1].world_size == 2


def test_an_error_on_a_rank_reaches_every_rank_as_our_error(ranks, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    results = ranks.run("failing_save", path=str(blocker / "ck"))
    for r in results:
        assert r["raised"] == "CheckpointException" and r["base_exception"]
        assert r["unwrapped"] == "CheckpointError" and "rank" in r["message"] and str(blocker) in r["message"]


def test_the_asyncio_face_on_a_process_group_saves_commits_and_reshards(ranks, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    path = tmp_path / "ck"
    results = ranks.run("asyncio_face", path=str(path), blocked=str(blocker / "ck"))
    for r in results:
        same(r)  # the values at save time, though every tensor changed right after save returned
        assert r["snapshot_done"] and r["left"] == []
        assert r["bytes_written"] > 0 and r["shards"] >= 1, r
        assert r["error"][0] == "CheckpointError" and str(blocker) in r["error"][1], r["error"]
    assert results[0]["expected"] == results[1]["expected"]  # DTensor digests are of the full tensors
    assert (path / MANIFEST_NAME).exists()
    whole = asyncckpt.SyncEngine().load(path)  # one process: every rank's chunks assembled
    assert whole["step"] == 3 and whole["w"].shape == (12, 10)


def test_engine_save_refuses_a_dtensor_naming_the_key_and_the_way_out(ranks, tmp_path):
    (result,) = ranks.run("engine_refuses_dtensor", world=1, path=str(tmp_path / "x"))
    assert "model.w" in result["message"] and "asyncckpt.dcp" in result["message"]
    assert not (tmp_path / "x").exists()


def test_the_fork_server_removes_each_groups_directory_once_its_ranks_are_reaped(ranks):
    before = set(Path(tempfile.gettempdir()).glob("asyncckpt-ranks-*"))
    ranks.run("engine_refuses_dtensor", world=2, path=str(ranks.scratch / "unused"))
    assert not list(ranks.scratch.iterdir())  # its file store and result files are gone
    assert set(Path(tempfile.gettempdir()).glob("asyncckpt-ranks-*")) <= before  # nothing left in /tmp either


# ---------------------------------------------------------------- kill trials


PHASES = [  # (victim rank, mark to wait for, which occurrence)
    (1, "start", 1), (0, "start", 1), (1, "write", 1), (0, "write", 2), (1, "write", 3), (0, "commit", 1),
    (0, "committed", 1), (0, "sweep", 1), (0, "swept", 1), (0, "random", 0), (1, "random", 0),
]


def wait_for_mark(marks: Path, rank: int, what: str, count: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            lines = marks.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        if sum(1 for ln in lines if ln.split()[:2] == [str(rank), what]) >= count:
            return True
        if any(ln.split()[1] == "done" for ln in lines):
            return False  # the save finished first
        time.sleep(0.002)
    return False


def kill_trials(ranks: Ranks, tmp_path: Path, trials: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    path = tmp_path / "ck"
    ranks.run("overwrite", path=str(path), step=1, marks=str(tmp_path / "marks-0"))
    committed, landed = 1, {"old": 0, "new": 0}
    engine = asyncckpt.SyncEngine()
    for trial in range(trials):
        step = trial + 2
        rank, what, count = PHASES[trial % len(PHASES)]
        marks = tmp_path / f"marks-{step}"
        pids = ranks.start("overwrite", path=str(path), step=step, marks=str(marks), slow=0.004, timeout=20)
        if what == "random":
            time.sleep(rng.uniform(0.0, 0.35))
        else:
            wait_for_mark(marks, rank, what, count, time.monotonic() + 20)
        os.kill(pids[rank], signal.SIGKILL)
        time.sleep(rng.uniform(0.0, 0.02))  # the other rank may get a little further, then the job is torn down
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        ranks.wait(pids, timeout=20)
        loaded = dist_scenarios.digests(engine.load(path))
        if loaded == dist_scenarios.trial_digests(step):
            committed, kind = step, "new"
        else:
            assert loaded == dist_scenarios.trial_digests(committed), (
                f"trial {trial} (kill rank {rank} at {what} #{count}): the checkpoint is neither step {committed} "
                f"nor step {step}")
            kind = "old"
        landed[kind] += 1
    # the next save that commits sweeps what the killed ones left
    ranks.run("overwrite", path=str(path), step=10_000, marks=str(tmp_path / "marks-last"))
    assert dist_scenarios.digests(engine.load(path)) == dist_scenarios.trial_digests(10_000)
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert files(path) == sorted([MANIFEST_NAME] + [s["file"] for s in manifest["shards"]])
    assert asyncckpt.verify(path).ok
    engine.close()
    return landed


def test_killing_a_rank_or_the_coordinator_during_an_overwrite_leaves_old_or_new(ranks, tmp_path):
    landed = kill_trials(ranks, tmp_path, trials=int(os.environ.get("ASYNCCKPT_KILL_TRIALS", "55")), seed=12)
    assert landed["old"] and landed["new"], landed  # kills landed on both sides of the commit


@pytest.mark.soak
def test_many_kill_trials(ranks, tmp_path):
    landed = kill_trials(ranks, tmp_path, trials=400, seed=99)
    assert landed["old"] and landed["new"], landed


def test_torch_file_system_writer_killed_before_finish_serves_a_mix(ranks, tmp_path):
    """The difference, measured: the stock writer rewrites its data files in place, so an overwrite killed before
    its finish() leaves the old metadata over the new data. Ours, killed at the same moment, leaves the old."""
    stock, ours = tmp_path / "stock", tmp_path / "ours"
    for name, path in (("stock_overwrite", stock), ("overwrite", ours)):
        ranks.run(name, path=str(path), step=1, marks=str(tmp_path / f"{name}-1"))
        marks = tmp_path / f"{name}-2"
        pids = ranks.start(name, path=str(path), step=2, marks=str(marks), pause=True)
        assert wait_for_mark(marks, 0, "written", 1, time.monotonic() + 30)  # rank 0's new data is durable
        assert wait_for_mark(marks, 1, "paused", 1, time.monotonic() + 30)  # rank 1 has not written yet
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        ranks.wait(pids)
    old = {k: v for k, v in dist_scenarios.trial_digests(1).items() if k.startswith(".w")}
    new = {k: v for k, v in dist_scenarios.trial_digests(2).items() if k.startswith(".w")}
    template = {"w": torch.zeros(96, 256)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(template, storage_reader=dcp.FileSystemReader(stock), no_dist=True)
    mixed = dist_scenarios.digests(template)
    assert mixed != old and mixed != new  # rank 0's rows of step 2 with rank 1's rows of step 1, as if committed
    assert dist_scenarios.digests(asyncckpt.SyncEngine().load(ours)) == dist_scenarios.trial_digests(1)


# ---------------------------------------------------------------- hostile global manifests (one process)


def one_process_save(path: Path, state: dict[str, Any], **options: Any) -> None:
    with warnings.catch_warnings(), unwrapped():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=StorageWriter(path, **options), no_dist=True)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "ck"
    one_process_save(path, {"w": torch.arange(64.0).view(8, 8), "n": 3, "s": {"x": torch.ones(5)}},
                     chunk_bytes=4096)
    return path


def test_shard_files_several_ranks_read_are_marked_shared_for_every_rank(tmp_path):
    """Each rank reads the files other ranks read too through the page cache (one device read for all)."""
    from torch.distributed.checkpoint.default_planner import create_default_local_load_plan

    path = tmp_path / "two-files"
    one_process_save(path, {"a": torch.randn(4096), "b": torch.randn(4096)}, chunk_bytes=4096, shard_bytes=16384,
                     split_bytes=None)
    reader = StorageReader(path)
    metadata = reader.read_metadata()
    reader.set_up_storage_reader(metadata, True)
    layout = metadata.storage_data
    both = {"a": torch.zeros(4096), "b": torch.zeros(4096)}
    plans = [reader.prepare_local_plan(create_default_local_load_plan(s, metadata))
             for s in (both, both, {"b": torch.zeros(4096)})]
    files = [{layout.shard_of(r.storage_index) for r in p.items} for p in plans]
    assert len(files[0]) == 2 and files[2] < files[0]  # a and b in files of their own
    out = reader.prepare_global_plan(plans)
    assert {p.storage_data.shared for p in out} == {frozenset(files[0])}  # every file is read by two ranks or more
    assert reader.prepare_global_plan(plans[:1])[0].storage_data.shared == frozenset()  # one reader: direct
    assert reader.prepare_global_plan([plans[0], plans[2]])[0].storage_data.shared == frozenset(files[2])


def rewrite(path: Path, change) -> None:
    doc = json.loads((path / MANIFEST_NAME).read_text())
    doc.pop("manifest_xxh3_64")
    change(doc)
    (path / MANIFEST_NAME).write_bytes(seal(doc))


def halves(doc: dict[str, Any], *rows: int) -> list[dict[str, Any]]:
    """Item ``w`` (8 x 8 float32, one chunk) as two chunks of 4 rows over the two halves of its bytes, the first
    placed at row ``rows[0]`` and the second at ``rows[1]`` (default 0 and 4)."""
    w = next(t for t in doc["tensors"] if t["fqn"] == "w")
    span = w["chunks"][0]
    return [{"offsets": [row, 0], "sizes": [4, 8], "shard": span["shard"], "offset": span["offset"] + 128 * k,
             "nbytes": 128} for k, row in enumerate(rows or (0, 4))]


def split_w(doc: dict[str, Any], chunks: list[dict[str, Any]], shape: tuple[int, int] = (8, 8)) -> None:
    w = next(t for t in doc["tensors"] if t["fqn"] == "w")
    w.update(shape=list(shape), chunks=chunks)


HOSTILE = {
    "a shard outside the directory": lambda d: d["shards"][0].update(file="../../etc/passwd"),
    "an absolute shard path": lambda d: d["shards"][0].update(file="/tmp/shard-0000000000000000-r00000-00000"
                                                                   ".safetensors"),
    "an absurd shape": lambda d: d["tensors"][0].update(shape=[1 << 40, 1 << 40]),
    "a negative dimension": lambda d: d["tensors"][0].update(shape=[-8, 8]),
    "a chunk past its shard": lambda d: d["tensors"][0]["chunks"][0].update(offset=1 << 40),
    "a chunk outside its tensor": lambda d: d["tensors"][0]["chunks"][0].update(offsets=[4, 0]),
    "chunks that leave a gap": lambda d: d["tensors"][0]["chunks"][0].update(sizes=[4, 8], nbytes=128),
    "overlapping chunks": lambda d: d["tensors"][0]["chunks"].append(dict(d["tensors"][0]["chunks"][0])),
    "a size that disagrees": lambda d: d["tensors"][0]["chunks"][0].update(nbytes=8),
    "a misaligned chunk": lambda d: d["tensors"][0]["chunks"][0].update(offset=d["tensors"][0]["chunks"][0]
                                                                         ["offset"] + 1),
    "an unknown dtype": lambda d: d["tensors"][0].update(dtype="float128"),
    "a shard index out of range": lambda d: d["objects"][0].update(shard=7),
    "an item twice": lambda d: d["objects"].append(dict(d["objects"][0])),
    "planner data with a tensor": lambda d: d.update(planner_data={"tensor": 0}),
    "a bad world size": lambda d: d.update(world_size=0),
    "a rank that disagrees with the file name": lambda d: d["shards"][0].update(rank=3),
    "chunks that overlap and leave a gap as large": lambda d: split_w(d, halves(d, 0, 2)),
    "two chunks of a tensor over one span": lambda d: split_w(d, [halves(d)[0], dict(halves(d)[0], offsets=[4, 0])]),
}


@pytest.mark.parametrize("lie", sorted(HOSTILE))
def test_a_hostile_global_manifest_is_refused_before_anything_is_allocated(saved, lie):
    rewrite(saved, HOSTILE[lie])
    with pytest.raises(CorruptCheckpointError, match="manifest is invalid"):
        one_process_load(saved, {"w": torch.zeros(8, 8), "n": 0, "s": {"x": torch.zeros(5)}})
    with pytest.raises(CorruptCheckpointError):
        asyncckpt.SyncEngine().load(saved)


def test_chunks_share_bytes_only_as_one_tensor_under_two_names(saved):
    """Tied weights (one tensor under two names) share their chunks' spans and load as two equal tensors; any
    other chunk over bytes already claimed is refused before anything is allocated: 8 chunks over one span made a
    load assemble 8 copies (a 1 MiB checkpoint allocated 400 MiB with 400)."""
    original = (saved / MANIFEST_NAME).read_bytes()

    def load(change):
        (saved / MANIFEST_NAME).write_bytes(original)
        rewrite(saved, lambda d: (split_w(d, halves(d)), change(d)))
        return asyncckpt.SyncEngine().load(saved)

    out = load(lambda d: d["tensors"].append(dict(next(t for t in d["tensors"] if t["fqn"] == "w"), fqn="tied")))
    assert torch.equal(out["w"], torch.arange(64.0).view(8, 8)) and torch.equal(out["tied"], out["w"])
    assert out["w"].data_ptr() == out["tied"].data_ptr()  # assembled once
    bombs = {  # w as 8 chunks of 4 rows, all over the same 128 bytes; a tensor v of w's chunks in swapped rows
        "chunk 1 of tensor 'w' has the bytes of chunk 0 of tensor 'w'":
            lambda d: split_w(d, [dict(halves(d)[0], offsets=[4 * k, 0]) for k in range(8)], (32, 8)),
        "chunk 0 of tensor 'v' has the bytes of chunk 0 of tensor 'w'":
            lambda d: d["tensors"].append({"fqn": "v", "dtype": "float32", "shape": [8, 8], "chunks": halves(d, 4, 0)}),
    }
    for message, bomb in bombs.items():
        with pytest.raises(CorruptCheckpointError) as err:
            load(bomb)
        assert str(saved) in str(err.value) and message in str(err.value)


def staircase(k: int, shift: bool = False) -> dict[str, Any]:
    """A manifest whose one tensor, [k, 2k] bytes, is tiled by 3k - 1 chunks: row i is cut at columns i and k + i, so
    a sweep along either dimension keeps about k chunks active. ``shift`` moves the middle chunk of row k // 2 one
    row down: as many bytes, one row overlapped and one left bare."""
    chunks, at = [], 0
    for i in range(k):
        for col, width in ((0, i), (i, k), (i + k, k - i)):
            if width:
                row = i + 1 if shift and i == k // 2 and col == i else i
                chunks.append({"offsets": [row, col], "sizes": [1, width], "shard": 0, "offset": at, "nbytes": width})
                at += width
    return {"format": "asyncckpt", "version": 3, "layout": "dcp", "producer": "test", "torch": "test",
            "save_id": "0123456789abcdef", "created_ns": 1, "world_size": 1,
            "shards": [{"file": "shard-0123456789abcdef-r00000-00000.safetensors", "nbytes": at,
                        "chunk_bytes": at, "xxh3_64": ["0" * 16], "rank": 0}],
            "tensors": [{"fqn": "t", "dtype": "uint8", "shape": [k, 2 * k], "chunks": chunks}],
            "objects": [], "planner_data": None, "storage_meta": None, "dcp_version": None}


def test_validating_chunks_takes_linear_time_however_they_are_laid_out():
    """A staircase of 5999 chunks validates in well under a second (7.3 s before: a sweep compared each chunk with
    the ~2000 still active; a 1 GiB manifest could stall a listing for hours), and the same staircase with one
    chunk moved a row down, same number of bytes, is refused as overlapping."""
    raw = seal(staircase(2000))
    start = time.perf_counter()
    manifest = parse(raw, "stairs")
    elapsed = time.perf_counter() - start
    assert len(manifest.tensors[0].chunks) == 5999 and manifest.tensors[0].shape == (2000, 4000)
    assert elapsed < 2.0, f"validating 5999 chunks took {elapsed:.1f} s"
    with pytest.raises(CorruptCheckpointError, match="stairs: manifest is invalid: tensor 't': two of its chunks "
                                                     "overlap"):
        parse(seal(staircase(2000, shift=True)), "stairs")


def test_a_newer_format_version_is_refused_with_a_clear_error(saved):
    rewrite(saved, lambda d: d.update(version=99))
    with pytest.raises(NewerFormatError, match="newer asyncckpt.*format version 99"):
        one_process_load(saved, {"w": torch.zeros(8, 8)})
    assert asyncckpt.latest(saved.parent) is None  # listings skip what they cannot read


def test_a_damaged_chunk_is_a_corrupt_checkpoint_error(saved):
    shard = next(p for p in saved.iterdir() if SHARD_RE.match(p.name))
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        one_process_load(saved, {"w": torch.zeros(8, 8), "n": 0, "s": {"x": torch.zeros(5)}})


class Custom:
    """A class weights-only loading does not know (its unpickling could run any code)."""

    def __init__(self) -> None:
        self.value = 41


def test_unsafe_pickles_are_refused_unless_the_reader_trusts_them(tmp_path):
    path = tmp_path / "ck"
    one_process_save(path, {"w": torch.ones(3), "custom": Custom()})
    target: dict[str, Any] = {"w": torch.zeros(3), "custom": None}
    with pytest.raises(UnsafeCheckpointError, match="weights_only=False"):
        one_process_load(path, target)
    reader = StorageReader(path, weights_only=False)
    with warnings.catch_warnings(), unwrapped():
        warnings.simplefilter("ignore")
        dcp.load(target, storage_reader=reader, no_dist=True)
    assert target["custom"].value == 41 and torch.equal(target["w"], torch.ones(3))


def test_the_manifest_is_json_and_dcp_metadata_comes_back_without_pickle(saved):
    doc = json.loads((saved / MANIFEST_NAME).read_text())
    assert doc["version"] == 3 and doc["layout"] == "dcp" and doc["world_size"] == 1
    assert {t["fqn"] for t in doc["tensors"]} == {"w", "s.x"} and [o["fqn"] for o in doc["objects"]] == ["n"]
    metadata = StorageReader(saved).read_metadata()
    assert metadata.planner_data == {"w": ("w",), "n": ("n",), "s.x": ("s", "x")}
    assert list(metadata.state_dict_metadata["w"].size) == [8, 8]
    assert isinstance(parse((saved / MANIFEST_NAME).read_bytes(), "ck"), asyncckpt.GlobalManifest)


def test_a_single_process_checkpoint_is_pointed_to_engine_load(tmp_path):
    asyncckpt.SyncEngine().save({"w": torch.ones(2)}, tmp_path / "one").result()
    with pytest.raises(CheckpointError, match="engine.load"):
        one_process_load(tmp_path / "one", {"w": torch.zeros(2)})


def test_unwrap_passes_other_exceptions_through():
    error = ValueError("x")
    assert unwrap(error) is error


def test_the_tools_read_a_multi_rank_checkpoint(saved, tmp_path, capsys):
    from safetensors.torch import load_file

    from asyncckpt.cli import main

    assert asyncckpt.latest(saved.parent) == str(saved) and asyncckpt.verify(saved).ok
    asyncckpt.to_torch_file(saved, tmp_path / "one.pt")
    whole = torch.load(tmp_path / "one.pt")
    assert torch.equal(whole["w"], torch.arange(64.0).view(8, 8)) and whole["n"] == 3
    assert torch.equal(whole["s"]["x"], torch.ones(5))
    asyncckpt.to_safetensors(saved, tmp_path / "one.safetensors")
    flat = load_file(tmp_path / "one.safetensors")
    assert torch.equal(flat["w"], torch.arange(64.0).view(8, 8)) and torch.equal(flat["s.x"], torch.ones(5))
    assert main(["inspect", str(saved), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["version"], info["layout"], info["world_size"]) == (3, "dcp", 1)
    assert {t["key"] for t in info["tensors"]} == {"w", "s.x"}
    assert int(info["totals"]["bytes_per_rank"]["0"]) == info["totals"]["shard_bytes"]
    assert main(["inspect", str(saved)]) == 0
    text = capsys.readouterr().out
    assert "through torch.distributed.checkpoint" in text and "rank 0:" in text
    assert main(["verify", str(saved)]) == 0


def test_async_saves_of_one_path_issued_back_to_back_commit_the_later_one_whole(tmp_path):
    # the first commit's sweep took the second save's shards (written, not yet committed) for stale files: the
    # second then published a manifest naming deleted files
    path = tmp_path / "ck"
    for trial in range(3):
        w = torch.randn(256, 256)
        with warnings.catch_warnings(), unwrapped():
            warnings.simplefilter("ignore")
            first = dcp.async_save({"w": w, "step": 2 * trial}, storage_writer=StorageWriter(path), no_dist=True)
            second = dcp.async_save({"w": w + 1, "step": 2 * trial + 1}, storage_writer=StorageWriter(path),
                                    no_dist=True)
            first.result(), second.result()
        with asyncckpt.SyncEngine() as engine:
            got = engine.load(path)
        assert got["step"] == 2 * trial + 1 and torch.equal(got["w"], w + 1), trial
    named = {s.file for s in parse((path / MANIFEST_NAME).read_bytes(), str(path)).shards}
    deadline = time.monotonic() + 10  # the files of the saves it replaced are swept in the background
    while {p.name for p in path.iterdir() if SHARD_RE.match(p.name)} != named and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {p.name for p in path.iterdir() if SHARD_RE.match(p.name)} == named
