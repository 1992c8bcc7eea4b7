"""Prefix caching: requests that share a prefix reuse its cached blocks and still get Hugging Face's tokens."""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from helpers import SHAPES, hf_greedy, parallel, prompts
from shiftlib import Engine, SamplingParams
from shiftlib.cache import BlockAllocator

NEW = 6


def _shared_prefixes(tp, sp, block_size, num_blocks, shared, tails, threshold, budget, overhead, caching) -> tuple:
    """Request i (a common ``shared``-token prefix + its own tail) arrives at step 2i; returns whether every
    request got its Hugging Face tokens, whether every block is free again, and the tokens the model ran."""
    base = prompts((shared,), seed=shared)[0]
    ps = [base + tail for tail in prompts(tails, seed=len(tails))]
    engine = Engine(parallel("llama", tp, sp), num_blocks=num_blocks, block_size=block_size, threshold=threshold,
                    max_num_tokens=budget, step_overhead_tokens=overhead, enable_prefix_caching=caching)
    ids, step = [], 0
    while len(ids) < len(ps) or engine.has_unfinished:
        if step % 2 == 0 and len(ids) < len(ps):
            ids.append(engine.add_request(ps[len(ids)], SamplingParams(max_new_tokens=NEW)))
        engine.step()
        step += 1
    done = [engine.completion(i) for i in ids]
    ok = all(c.tokens == hf_greedy("llama", p, NEW) and c.finish_reason == "length" for c, p in zip(done, ps))
    alloc = engine.scheduler.allocator
    no_leaks = alloc.num_free == alloc.num_blocks and not any(alloc.refs)
    return ok, no_leaks, sum(s.num_tokens for s in engine.stats), sum(s.preempted for s in engine.stats)


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    shared=st.integers(1, 40),
    tails=st.lists(st.integers(1, 12), min_size=2, max_size=4),
    block_size=st.sampled_from([1, 4, 8]),
    spare=st.integers(0, 30),
    threshold=st.integers(0, 30),
    budget=st.integers(8, 64),
    overhead=st.sampled_from([None, 1, 256]),
    shape=st.sampled_from(SHAPES[2]),
)
# A request preempted while a step is in flight: its blocks are offered before they are freed, so it restarts on them.
@example(shared=6, tails=[7, 8, 12], block_size=4, spare=6, threshold=0, budget=45, overhead=256, shape=(1, 2))
def test_prefix_hits_give_the_same_tokens_as_misses_and_leak_no_block(ranks, shared, tails, block_size, spare, threshold, budget,
                                                                       overhead, shape):
    # From one request's worth of blocks (preemption, eviction) to room for all; modes switch by the threshold.
    need = -(-(shared + max(tails) + NEW) // block_size)
    args = (*shape, block_size, need + spare, shared, tuple(tails), threshold, budget, overhead)
    for (ok, no_leaks, ran, _), (ok_off, no_leaks_off, ran_off, _) in zip(ranks(2).run(_shared_prefixes, *args, True),
                                                                     ranks(2).run(_shared_prefixes, *args, False)):
        assert ok and ok_off and no_leaks and no_leaks_off
        assert ran <= ran_off


def test_a_shared_prefix_is_run_once_in_sp_mode_and_reused_across_modes(ranks):
    # 4 ranks as 1 x 4: prefill chunks of the later requests start mid-prompt, their tokens split over 4 sp ranks.
    for ok, no_leaks, ran, _ in ranks(4).run(_shared_prefixes, 1, 4, 4, 64, 32, (5, 7, 3), 4, 64, 256, True):
        assert ok and no_leaks
        assert ran == 32 + 5 + 7 + 3 + 3 * (NEW - 1)  # the 32 shared tokens ran once: 8 blocks reused twice


def test_evicted_blocks_go_least_recently_used_first_and_shared_blocks_stay():
    alloc = BlockAllocator(4)
    a, b = alloc.allocate(2), alloc.allocate(2)
    for block, key in zip(a + b, "wxyz"):
        alloc.cache(block, key)
    alloc.share(a[0])  # a second user of a[0]
    alloc.free(a)
    alloc.free(b)  # idle now, tail first: b[1], b[0] — after a[1]
    assert alloc.num_free == 3 and alloc.refs[a[0]] == 1
    assert alloc.allocate(2) == [a[1], b[1]]  # the least recently used cached blocks, never the shared a[0]
    assert set(alloc.cached) == {"w", "y"}
