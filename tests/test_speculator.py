"""The suffix speculator against a brute-force model: counts, matches, eviction and drafts by definition."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shiftlib.engine.sampler import SamplingParams
from shiftlib.engine.sequence import Sequence
from shiftlib.engine.speculator import SuffixIndex, SuffixSpeculator

texts = st.lists(st.integers(0, 3), min_size=1, max_size=40)  # a small alphabet: many repeats


def occurrences(seqs: list[list[int]], s: list[int]) -> int:
    return sum(seq[i : i + len(s)] == s for seq in seqs for i in range(len(seq) - len(s) + 1))


def longest_suffix(seqs: list[list[int]], tokens: list[int]) -> int:
    return max((m for m in range(len(tokens) + 1) if occurrences(seqs, tokens[len(tokens) - m :])), default=0)


def brute_draft(seqs, context, limit, max_depth=64, min_prob=0.1) -> tuple[float, list[int]]:
    """The definition: every match length, shortest first, a later (longer) match winning ties."""
    alphabet = sorted({t for seq in seqs for t in seq})
    best = (0.0, [])
    for m in range(1, min(len(context), max_depth) + 1):
        s = context[-m:]
        if not occurrences(seqs, s):
            break
        cap = min(limit, m)
        tokens, prob, score = [], 1.0, 0.0
        while len(tokens) < cap:
            counts = {t: occurrences(seqs, s + tokens + [t]) for t in alphabet}
            t = max(alphabet, key=lambda t: (counts[t], -t))
            if not counts[t]:
                break
            prob *= counts[t] / occurrences(seqs, s + tokens)
            if prob < min_prob:
                break
            tokens.append(t)
            score += prob
        if score >= best[0]:
            best = (score, tokens)
    return best


@settings(max_examples=60, deadline=None)
@given(seqs=st.lists(texts, min_size=1, max_size=4), queries=st.lists(texts, min_size=1, max_size=6), removed=st.integers(0, 3))
def test_counts_and_longest_matches_equal_brute_force_after_removals(seqs, queries, removed):
    index = SuffixIndex()
    for key, seq in enumerate(seqs):
        index.extend(key, seq[: len(seq) // 2])  # sequences grow in two parts, interleaved
    for key, seq in enumerate(seqs):
        index.extend(key, seq[len(seq) // 2 :])
    for key in range(min(removed, len(seqs))):
        index.remove(key)
    live = seqs[min(removed, len(seqs)) :]
    for q in queries:
        state, m = index.match(q)
        assert m == longest_suffix(live, q)
        if m:
            assert index.count[state] == occurrences(live, q[len(q) - m :])


@settings(max_examples=60, deadline=None)
@given(context=texts, extra=texts, limit=st.integers(1, 16), min_prob=st.sampled_from([0.1, 0.3, 0.6]),
       max_depth=st.integers(1, 12))  # fmt: skip
def test_own_drafts_equal_brute_force(context, extra, limit, min_prob, max_depth):
    spec = SuffixSpeculator(max_depth=max_depth, min_prob=min_prob, max_cached=0)
    assert spec.propose(0, context, [], limit) == brute_draft([context], context, limit, max_depth, min_prob)[1]
    grown = context + extra  # the request's index catches up with the tokens it has not seen
    assert spec.propose(0, context, extra, limit) == brute_draft([grown], grown, limit, max_depth, min_prob)[1]


@settings(max_examples=40, deadline=None)
@given(responses=st.lists(texts, min_size=1, max_size=8), context=texts, max_cached=st.integers(1, 4), limit=st.integers(1, 16))
def test_drafts_use_the_newest_responses_and_evict_the_oldest(responses, context, max_cached, limit):
    spec = SuffixSpeculator(max_cached=max_cached)
    for key, r in enumerate(responses):  # a running request proposes while others finish and grow its context
        spec.finish(key, r)
        grown = context + r[: key % 3]  # given as prompt and output
        kept = responses[max(key + 1 - max_cached, 0) : key + 1]
        own, other = brute_draft([grown], grown, limit), brute_draft(kept, grown, limit)
        assert spec.propose(-1, context, r[: key % 3], limit) == (other if other[0] > own[0] else own)[1]
        context = grown
    assert list(spec.cached) == list(range(len(responses)))[-max_cached:]


def test_a_passage_seen_before_is_drafted_from_where_its_copy_has_reached():
    passage = list(range(100, 140))
    spec = SuffixSpeculator()
    assert spec.propose(0, passage, passage[:5], 32) == passage[5:10]  # 5 matched tokens allow 5
    assert spec.propose(0, passage, passage[:20], 32) == passage[20:36]  # at most num_speculative_tokens
    assert spec.propose(0, passage + passage[:20], [], 3) == passage[20:23]  # at most what the caller allows
    spec.finish(0, passage)
    assert spec.propose(1, [7], passage[:12], 16) == passage[12:24]  # from an earlier response
    assert spec.propose(2, [1, 2, 3, 4], [], 16) == []


@given(batch=st.integers(1, 32), max_rows=st.sampled_from([None, 8, 16, 64, 256]))
@settings(max_examples=40, deadline=None)
def test_drafts_keep_a_decode_step_within_its_cuda_graph(batch, max_rows):
    passage = list(range(100, 140))
    running = [Sequence(i, passage * 2, SamplingParams(max_new_tokens=64), None) for i in range(batch)]
    for seq in running:
        seq.num_cached = seq.num_tokens - 1  # decoding: one pending token
    SuffixSpeculator(num_speculative_tokens=8, max_batch=32).draft(running, 4096, max_rows)
    rows = sum(1 + len(seq.draft) for seq in running)
    if max_rows is None or batch * 9 <= max_rows:
        assert all(len(seq.draft) == 8 for seq in running)  # the whole draft fits: nothing is cut
    else:
        assert rows <= max(max_rows, batch), (rows, max_rows)
        assert all(len(seq.draft) == max(max_rows // batch - 1, 0) for seq in running)


def test_responses_that_end_while_the_engine_is_too_busy_to_draft_are_not_indexed():
    passage, spec = list(range(100, 140)), SuffixSpeculator(max_batch=2)
    load = SimpleNamespace(running=[], waiting=[Sequence(i, [1], SamplingParams(), None) for i in range(3)],
                           max_num_seqs=8)  # fmt: skip
    assert not spec.wants(load, in_flight=False)
    spec.finish(0, passage)  # three requests: no drafts, no indexing
    assert spec.propose(1, [7], passage[:12], 16) == []
    load.waiting.pop()
    assert spec.wants(load, in_flight=False)
    spec.finish(0, passage)  # two: both again
    assert spec.propose(1, [7], passage[:12], 16) == passage[12:24]


def test_a_step_drafts_only_when_its_drafts_are_worth_the_overlap_it_gives_up():
    passage = list(range(100, 140))

    def decoding(i: int, context: list[int]) -> Sequence:
        seq = Sequence(i, context[:-1], SamplingParams(max_new_tokens=64), None)
        seq.output, seq.num_cached = context[-1:], len(context) - 1  # the last token pending
        return seq

    spec = SuffixSpeculator(max_batch=128, min_gain=0.5)
    repeats = [decoding(i, passage * 2) for i in range(2)]  # drafts of 16 likely tokens each
    novel = [decoding(10 + i, [1000 + 50 * i + t for t in range(40)]) for i in range(80)]  # nothing to match
    assert spec.draft(repeats + novel[:4], 4096) and all(len(s.draft) == 16 for s in repeats)  # ~32 for 6
    load = SimpleNamespace(running=repeats + novel, waiting=[], max_num_seqs=128)
    assert not spec.draft(load.running, 4096) and not any(s.draft for s in load.running)  # ~32 for 82
    # While a step is in flight the next look comes after 1, then 2, 4, 8 steps: a batch that gains nothing
    # seldom pays for the search.
    answers = [(spec.wants(load, in_flight=True), spec.wait) for _ in range(12)]
    assert answers == [(False, w) for w in (0, 2, 1, 0, 4, 3, 2, 1, 0, 8, 7, 6)]
    assert spec.wants(load, in_flight=False)  # no step in flight: no overlap to give up
    load.running = repeats
    assert [spec.wants(load, in_flight=True) for _ in range(7)] == [False] * 6 + [True]
    assert spec.wants(load, in_flight=True)  # worth it: looked for at every step again


@pytest.mark.parametrize("kwargs, message", [(dict(num_speculative_tokens=0), r"num_speculative_tokens must be >= 1"),
                                             (dict(min_prob=0), r"min_prob must be in \(0, 1\]"),
                                             (dict(min_gain=-1), r"min_gain must be >= 0")])
def test_bad_speculator_settings_say_which_and_why(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SuffixSpeculator(**kwargs)
