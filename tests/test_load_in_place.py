"""In-place loads stream chunk by chunk through staging buffers into the target's own tensors."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st
import torch

from asyncckpt import CheckpointEngine, CorruptCheckpointError
from asyncckpt.tools.memory import PeakRSS

from .helpers import assert_same, tiny_model

KiB, MiB = 1 << 10, 1 << 20


def engine(**kw) -> CheckpointEngine:
    opts = dict(chunk_bytes=256 * KiB, shard_bytes=4 * MiB, host_memory_budget=2 * MiB, fsync=False)
    opts.update(kw)
    return CheckpointEngine(**opts)


async def test_tensors_are_restored_in_their_own_memory_without_shard_sized_buffers(tmp_path):
    torch.manual_seed(0)
    state = {"weights": {f"w{i}": torch.randn(1 << 20) for i in range(24)},  # 96 MiB, many shards and chunks
             "step": 7, "odd": torch.arange(1001, dtype=torch.int16)}
    target = {"weights": {k: torch.zeros_like(v) for k, v in state["weights"].items()},
              "odd": torch.zeros(1001, dtype=torch.int16)}
    addresses = {k: v.data_ptr() for k, v in target["weights"].items()}
    async with engine() as eng:
        await (await eng.save(state, tmp_path / "ck"))
        for t in (*target["weights"].values(), target["odd"]):
            t.fill_(1)  # pages resident before the measurement
        with PeakRSS(interval=0.001) as rss:  # kernel high-water mark where resettable, else sampled
            rest = await eng.load(tmp_path / "ck", state=target)
        growth = rss.growth
    assert rest == {"step": 7}
    assert_same(target["weights"], state["weights"])
    assert torch.equal(target["odd"], state["odd"])
    assert {k: v.data_ptr() for k, v in target["weights"].items()} == addresses
    # Reading whole shards first would add the state's 96 MiB; streaming adds the 2 MiB budget and slack.
    assert growth < 32 * MiB, f"in-place load grew RSS by {growth / MiB:.1f} MiB"


async def test_damaged_chunk_stops_the_load_and_says_the_target_may_be_partial(tmp_path):
    state = {f"w{i}": torch.randn(256 * KiB // 4) for i in range(8)}
    async with engine() as eng:
        await (await eng.save(state, tmp_path / "ck"))
        shard = sorted((tmp_path / "ck").glob("shard-*"))[-1]
        data = bytearray(shard.read_bytes())
        data[-5] ^= 0x01
        shard.write_bytes(bytes(data))
        target = {k: torch.zeros_like(v) for k, v in state.items()}
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch.*may already hold part"):
            await eng.load(tmp_path / "ck", state=target)
        assert torch.count_nonzero(target["w7"][-16:]) == 0  # the damaged (last) chunk's bytes never reach it


class Custom:
    """A value only full unpickling restores (weights-only loading refuses it)."""

    def __init__(self) -> None:
        self.x = 1


def zeroed_linear() -> torch.nn.Linear:
    m = torch.nn.Linear(4, 4)
    with torch.no_grad():
        m.weight.zero_()
        m.bias.zero_()
    return m


async def test_a_refused_load_leaves_the_target_untouched(tmp_path):
    """(a) a re-sealed structure naming a tensor the manifest lacks, (b) a pickled value weights-only loading
    refuses: both errors used to come after the saved weights had streamed into the target, without saying so."""
    from asyncckpt import UnsafeCheckpointError
    from asyncckpt.format.manifest import seal

    src = torch.nn.Linear(4, 4)
    async with engine() as eng:
        await (await eng.save({"model": src.state_dict(), "step": 1}, tmp_path / "a"))
        doc = json.loads((tmp_path / "a" / "manifest.json").read_bytes())
        doc["tree"]["dict"].append(["extra", {"tensor": 99}])
        (tmp_path / "a" / "manifest.json").write_bytes(seal(doc))
        await (await eng.save({"model": src.state_dict(), "meta": Custom()}, tmp_path / "b"))
        for path, error in ((tmp_path / "a", CorruptCheckpointError), (tmp_path / "b", UnsafeCheckpointError)):
            target = zeroed_linear()
            with pytest.raises(error, match="tensor 99" if path.name == "a" else "weights_only=False"):
                await eng.load(path, state={"model": target})
            assert torch.count_nonzero(target.weight) == 0 and torch.count_nonzero(target.bias) == 0, path.name
        target = zeroed_linear()
        rest = await eng.load(tmp_path / "b", state={"model": target}, weights_only=False)
    assert torch.equal(target.weight, src.weight) and isinstance(rest["meta"], Custom)


class Delta(torch.nn.Module):
    """Loads checkpoints as deltas: a pre-hook adds the weight it holds to the incoming one."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(64, 64))
        self.register_load_state_dict_pre_hook(
            lambda m, sd, prefix, *a: sd.update({prefix + "weight": sd[prefix + "weight"] + m.weight.detach()}))


class Accumulating(torch.nn.Module):
    """Its own ``_load_from_state_dict`` adds the held bias to the incoming one."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.randn(16))

    def _load_from_state_dict(self, sd, prefix, *args):
        sd[prefix + "bias"] = sd[prefix + "bias"] + self.bias.detach()
        super()._load_from_state_dict(sd, prefix, *args)


def hooked(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.ModuleDict({"delta": Delta(), "acc": Accumulating(), "plain": torch.nn.Linear(8, 8)})


async def test_modules_with_hooks_or_custom_loading_go_through_load_state_dict(tmp_path):
    saved = hooked(1).state_dict()
    expected = hooked(2)
    expected.load_state_dict(saved)  # what torch itself makes of this state dict: held values take part
    dst = hooked(2)
    async with engine() as eng:
        await (await eng.save({"model": hooked(1)}, tmp_path / "ck"))
        await eng.load(tmp_path / "ck", state={"model": dst})
    for (name, got), want in zip(dst.named_parameters(), expected.parameters()):
        assert torch.equal(got, want), name
    assert torch.equal(dst["plain"].weight, saved["plain.weight"])


async def test_targets_sharing_memory_get_the_last_value_like_copy(tmp_path):
    from asyncckpt.format.manifest import parse
    from asyncckpt.load.in_place import destinations

    values = {k: torch.full((1000,), float(i)) for i, k in enumerate("abcde")}
    shared, overlap, alone = torch.zeros(1000), torch.zeros(1500), torch.zeros(1000)
    target = {"a": shared, "b": shared, "c": overlap[:1000], "d": overlap[500:], "e": alone}
    async with engine() as eng:
        await (await eng.save(values, tmp_path / "ck"))
        # racing chunk copies into shared memory would make the result depend on timing: only "e" streams
        doc = parse((tmp_path / "ck" / "manifest.json").read_bytes(), "ck")
        assert list(destinations(doc, target)) == [4]
        await eng.load(tmp_path / "ck", state=target)
    assert torch.equal(shared, values["b"]) and torch.equal(alone, values["e"])
    assert torch.equal(overlap[:500], values["c"][:500]) and torch.equal(overlap[500:], values["d"])


async def test_model_and_optimizer_resume_bit_exact_through_streaming(tmp_path):
    torch.manual_seed(2)
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randn(4, model[0].in_features)).sum().backward()
        opt.step()
    state = {"model": model, "opt": opt, "bf16": torch.randn(33, 7).to(torch.bfloat16)}
    fresh = tiny_model()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    target = {"model": fresh, "opt": fresh_opt, "bf16": torch.zeros(33, 7, dtype=torch.bfloat16)}
    async with engine(chunk_bytes=4 * KiB, host_memory_budget=64 * KiB) as eng:
        await (await eng.save(state, tmp_path / "ck"))
        await eng.load(tmp_path / "ck", state=target)
    assert_same(fresh.state_dict(), model.state_dict())
    assert_same(fresh_opt.state_dict(), opt.state_dict())
    assert torch.equal(target["bf16"], state["bf16"])


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 9), st.integers(1, 12), st.data())
def test_a_column_band_lands_in_its_rows_whatever_the_chunks_cut(rows, row_bytes, data):
    """Rows.scatter, fed the file chunk by chunk (any cut), fills exactly the band's bytes of each row."""
    from asyncckpt.load.ranged import Rows

    skip = data.draw(st.integers(0, row_bytes - 1))
    take = data.draw(st.integers(1, row_bytes - skip))
    lead = data.draw(st.integers(0, 7))  # bytes of the file before the first row
    file = torch.arange(lead + rows * row_bytes, dtype=torch.int64).remainder(251).to(torch.uint8)
    expected = file[lead:].view(rows, row_bytes)[:, skip:skip + take]
    gap = data.draw(st.integers(0, 3))  # the destination's rows lie apart, as in a wider tensor
    dest = torch.full((rows, take + gap), 255, dtype=torch.uint8)
    band = Rows(lead, row_bytes, skip, dest[:, :take])
    cuts = sorted(set(data.draw(st.lists(st.integers(1, file.numel() - 1), max_size=6)))) if file.numel() > 1 else []
    for a, b in zip([0, *cuts], [*cuts, file.numel()]):
        band.scatter(file[a:b], a)
    assert torch.equal(dest[:, :take], expected)
    assert bool((dest[:, take:] == 255).all())  # nothing outside the band was touched
    assert band.wanted == rows * take and band.end - band.start == (rows - 1) * row_bytes + take
