"""Which attention a prefill step takes on GPU, decided on the host from the step's shape (runs on CPU).

The kernels themselves are tested on GPU (test_triton_prefill, test_triton_decode); these are the choices
around them, which must hold on every rank alike and never depend on values still on the device.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shiftlib.paged_attention import (
    SDPA_LONG_CHUNK,
    AttentionBatch,
    _attend_by_sequence,
    _attend_long_chunks,
    long_chunks_only,
)
from shiftlib.triton_prefill import PrefillConfig, default_config

LONG = SDPA_LONG_CHUNK


def step(chunks: list[tuple[int, int]], decodes: int = 0, pad: int = 0) -> AttentionBatch:
    """A step of (cached, new) per sequence, the first ``decodes`` of them decode rows, then ``pad`` padding rows
    as empty sequences."""
    starts, lens = [0], []
    for cached, new in chunks:
        starts.append(starts[-1] + new)
        lens.append(cached + new)
    pos = torch.cat([torch.arange(c, c + n) for c, n in chunks])
    batch = AttentionBatch(
        query_pos=pos, write_slots=pos, block_tables=torch.zeros(len(chunks), 1, dtype=torch.int32), block_size=16,
        context_lens=torch.tensor(lens), query_start=starts, context_lens_host=lens, num_decodes=decodes,
    )  # fmt: skip
    return batch.padded(batch.num_tokens + pad)


@pytest.mark.parametrize(
    ("chunks", "decodes", "window", "sdpa"),
    [
        ([(0, LONG)], 0, None, True),  # a long prompt alone
        ([(100, 1), (7, 1), (0, LONG + 3)], 2, None, True),  # beside two decodes, which the decode kernel serves
        ([(0, LONG), (0, 2 * LONG)], 0, None, True),  # several long prompts, each one SDPA call
        ([(16, LONG)], 0, None, True),  # a long chunk after a cached prefix: split in two SDPA calls
        ([(0, LONG - 1)], 0, None, False),  # too short: the kernel's one call wins
        ([(3 * LONG, LONG - 1)], 0, None, False),  # a short chunk after a long prefix: the kernel
        ([(0, LONG)], 0, 4096, False),  # a sliding window: the kernel
        ([(0, LONG), (0, 512)], 0, None, False),  # a short prompt rides along: one kernel call for both
    ],
)
def test_only_long_chunks_go_through_sdpa(chunks, decodes: int, window: int | None, sdpa: bool):
    assert long_chunks_only(step(chunks, decodes), window) is sdpa
    assert long_chunks_only(step(chunks, decodes, pad=5), window) is sdpa  # padding rows change nothing


def test_a_step_with_no_prefill_rows_is_not_sent_to_sdpa():
    assert not long_chunks_only(step([(100, 1), (7, 1)], decodes=2), None)


@settings(max_examples=40, deadline=None)
@given(
    chunks=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 24)), min_size=1, max_size=3),
    kv_heads=st.sampled_from([1, 2, 4]),
    group=st.sampled_from([1, 3]),
    block_size=st.sampled_from([1, 4, 16]),
    layout=st.sampled_from(["ascending", "descending", "scattered"]),
    seed=st.integers(0, 2**16),
)
def test_a_chunk_split_into_its_prefix_and_itself_is_exact(chunks, kv_heads: int, group: int, block_size: int,
                                                           layout: str, seed: int):
    """The long-chunk route's arithmetic (two attentions merged by log-sum-exp) against the masked path, float64;
    a prefix on consecutive blocks (in either order) is read in place, one scattered through the cache gathered."""
    g = torch.Generator().manual_seed(seed)
    starts, lens = [0], []
    for cached, new in chunks:
        starts.append(starts[-1] + new)
        lens.append(cached + new)
    blocks = [-(-n // block_size) for n in lens]
    order = {"ascending": torch.arange(sum(blocks)), "descending": torch.arange(sum(blocks)).flip(0),
             "scattered": torch.randperm(sum(blocks), generator=g)}[layout].int()
    tables = torch.zeros(len(chunks), max(blocks), dtype=torch.int32)
    for b, (lo, n) in enumerate(zip([0, *torch.tensor(blocks).cumsum(0).tolist()], blocks)):
        tables[b, :n] = order[lo : lo + n]
    pos = torch.cat([torch.arange(c, c + n) for c, n in chunks])
    seq = torch.repeat_interleave(torch.arange(len(chunks)), torch.tensor([n for _, n in chunks]))
    slots = tables[seq, pos // block_size].long() * block_size + pos % block_size
    batch = AttentionBatch(query_pos=pos, write_slots=slots, block_tables=tables, block_size=block_size,
                           context_lens=torch.tensor(lens), query_start=starts, context_lens_host=lens,
                           block_tables_host=[tables[b, :n].tolist() for b, n in enumerate(blocks)])  # fmt: skip
    in_place = [start is not None for start in batch.prefix_in_place]
    whole_blocks = [cached > 0 and (layout == "ascending" or cached % block_size == 0 or cached <= block_size)
                    for cached, _ in chunks]  # a descending run's part-filled last block is the range's first
    assert in_place == whole_blocks or layout == "scattered"
    d, rows = 8, starts[-1]
    q = torch.randn(rows, kv_heads * group, d, generator=g, dtype=torch.float64)
    slots_in_cache = sum(blocks) * block_size
    k_store, v_store = (torch.randn(slots_in_cache, kv_heads, d, generator=g, dtype=torch.float64) for _ in "kv")
    k, v = k_store[slots], v_store[slots]  # the step's own K/V, already written
    exact = _attend_by_sequence(q, k, v, k_store, v_store, batch, 0.3, None, first=0)
    split = _attend_long_chunks(q, k, v, k_store, v_store, batch, 0.3, first=0)
    torch.testing.assert_close(split, exact, rtol=1e-12, atol=1e-12)
    assert split.is_contiguous()  # SP mode views it as (sp, tokens / sp, heads * d)


def test_the_longest_context_is_that_of_the_prefills():
    assert step([(5000, 1), (100, 300), (0, 64)], decodes=1).longest_prefill_context == 400


@pytest.mark.parametrize(
    ("dtype", "head_dim", "max_context", "tiles"),
    [
        (torch.bfloat16, 128, None, PrefillConfig(128, 32, 4, 3)),  # a graph's step: the host does not know
        (torch.bfloat16, 128, 2047, PrefillConfig(128, 32, 4, 3)),
        (torch.bfloat16, 128, 2048, PrefillConfig(256, 64, 8, 3)),  # long contexts: larger tiles
        (torch.float16, 64, 30000, PrefillConfig(256, 64, 8, 3)),
        (torch.float32, 128, 30000, PrefillConfig(64, 32, 4, 2)),  # wide rows keep tiles that fit shared memory
        (torch.bfloat16, 256, 30000, PrefillConfig(64, 32, 4, 2)),
    ],
)
def test_prefill_tiles_follow_the_longest_context(dtype, head_dim: int, max_context: int | None, tiles):
    assert default_config(torch.empty(1, 4, head_dim, dtype=dtype), max_context) == tiles
