"""Shard layout by construction (asyncckpt.format.parts): headers never spill a chunk, a store's part limits are
never broken."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncckpt import CheckpointError, InvalidArgumentError
from asyncckpt.format.parts import NO_RULES, PartRules
from asyncckpt.snapshot.plan import prepare

KiB = 1 << 10
CHUNK = 256 * KiB  # the smallest chunk that may grow (by 1/64: one page)
S3_LIKE = PartRules(min_part=5 * CHUNK, max_part=64 * CHUNK, max_parts=10_000)  # S3's rules, scaled down


def check_tiling(plan) -> None:
    """Chunks tile each shard exactly: every one but the shard's last has the shard's chunk size."""
    for shard, (size, chunk) in enumerate(zip(plan.shard_sizes, plan.shard_chunks)):
        mine = [c for c in plan.chunks if c.shard == shard]
        assert [c.offset for c in mine] == list(range(0, max(size, 1), chunk))[:len(mine)]
        assert sum(c.nbytes for c in mine) == size
        assert all(c.nbytes == chunk for c in mine[:-1]) and 0 < mine[-1].nbytes <= chunk
        assert chunk % 4096 == 0 and chunk >= CHUNK


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=8), st.sampled_from([None, 3, 8]),
       st.booleans())
def test_whole_chunk_tensors_take_whole_chunks(sizes, shard_chunks, s3):
    """Tensors of whole chunks take exactly that many chunks: the shard's header never adds a part of a few bytes."""
    state = {f"t{i}": torch.zeros(n * CHUNK, dtype=torch.uint8) for i, n in enumerate(sizes)}
    shard_bytes = 1 << 40 if shard_chunks is None else shard_chunks * CHUNK
    plan = prepare(state, shard_bytes, CHUNK, rules=S3_LIKE if s3 else NO_RULES)
    check_tiling(plan)
    members: dict[int, int] = {}
    for e in plan.entries:
        members[e.shard] = members.get(e.shard, 0) + e.nbytes // CHUNK
    for shard, size in enumerate(plan.shard_sizes):
        count = -(-size // plan.shard_chunks[shard])
        # never a chunk more than the tensors' whole chunks; exactly as many while pages of growth per chunk add
        # up to less than a chunk (always, for real chunk sizes: 8192 chunks of 32 MiB)
        assert count <= members[shard] and (count == members[shard] or members[shard] * 4096 >= CHUNK)
        # a shard holds as many whole chunks as fit its target (one tensor alone may be larger)
        assert members[shard] * CHUNK <= shard_bytes or len([e for e in plan.entries if e.shard == shard]) == 1


def test_store_default_is_one_part_per_shard():
    """With S3's rules, a shard of one part's worth of tensors is one chunk: a single PUT."""
    state = {f"t{i}": torch.zeros(5 * CHUNK, dtype=torch.uint8) for i in range(4)}
    plan = prepare(state, S3_LIKE.part_bytes(CHUNK), CHUNK, rules=S3_LIKE)
    assert len(plan.shard_sizes) == 4
    assert all(S3_LIKE.parts(n, c) == 1 for n, c in zip(plan.shard_sizes, plan.shard_chunks))


def test_small_chunks_gather_into_minimum_parts():
    rules = PartRules(min_part=5 * CHUNK)
    assert rules.part_bytes(CHUNK) == 5 * CHUNK and rules.part_bytes(2 * CHUNK) == 6 * CHUNK
    assert rules.parts(11 * CHUNK, CHUNK) == 3 and rules.parts(1, CHUNK) == 1


def test_growth_stays_within_the_largest_part_and_the_budget():
    state = {"t": torch.zeros(3 * CHUNK, dtype=torch.uint8)}
    tight = PartRules(max_part=CHUNK)  # no room to grow: the header takes a fourth, short chunk
    plan = prepare(state, 1 << 40, CHUNK, rules=tight)
    assert plan.shard_chunks == [CHUNK] and len(plan.chunks) == 4
    plan = prepare(state, 1 << 40, CHUNK, chunk_limit=CHUNK)  # staging holds one chunk, no more
    assert plan.shard_chunks == [CHUNK] and len(plan.chunks) == 4
    plan = prepare(state, 1 << 40, CHUNK)
    assert plan.shard_chunks[0] > CHUNK and len(plan.chunks) == 3


def test_a_tensor_beyond_the_part_count_is_refused_with_the_way_out():
    rules = PartRules(max_parts=4)
    with pytest.raises(CheckpointError, match=r"big .*more than 4 parts.*raise chunk_bytes"):
        prepare({"small": torch.zeros(10), "big": torch.zeros(5 * CHUNK, dtype=torch.uint8)}, 1 << 40, CHUNK,
                rules=rules)
    plan = prepare({f"t{i}": torch.zeros(CHUNK, dtype=torch.uint8) for i in range(9)}, 1 << 40, CHUNK, rules=rules)
    assert all(rules.parts(n, c) <= 4 for n, c in zip(plan.shard_sizes, plan.shard_chunks))  # shards cut to fit
    assert len(plan.shard_sizes) == 3


def test_a_chunk_larger_than_a_part_is_refused():
    with pytest.raises(InvalidArgumentError, match="chunk_bytes.*lower chunk_bytes"):
        prepare({"t": torch.zeros(4)}, 1 << 40, 2 * CHUNK, rules=PartRules(max_part=CHUNK))


def test_parts_in_whole_multiples_grow_by_whole_multiples():
    """GCS takes resumable-upload chunks in whole 256 KiB: a header's spill grows a 32 MiB chunk by 256 KiB (not a
    page), and a chunk_bytes that is not a multiple is refused with one that is."""
    gcs_like = PartRules(multiple=CHUNK)
    state = {"t": torch.zeros(2 * 128 * CHUNK, dtype=torch.uint8)}  # two 32 MiB chunks and a header
    plan = prepare(state, 1 << 40, 128 * CHUNK, rules=gcs_like)
    assert plan.shard_chunks == [129 * CHUNK] and len(plan.chunks) == 2
    assert prepare(state, 1 << 40, 128 * CHUNK, rules=NO_RULES).shard_chunks[0] == 128 * CHUNK + 4096
    small = prepare(state, 1 << 40, 4 * CHUNK, rules=gcs_like)  # 1/64 of 1 MiB is no whole multiple: no growth
    assert small.shard_chunks == [4 * CHUNK] and all(c.nbytes == 4 * CHUNK for c in small.chunks[:-1])
    with pytest.raises(InvalidArgumentError, match=f"not a whole multiple of the {CHUNK} bytes.*such as {CHUNK}"):
        prepare(state, 1 << 40, CHUNK + 4096, rules=gcs_like)
