"""The engine: Hugging Face's greedy tokens in every mode and mesh, through switches, batching and preemption."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import shiftlib
from helpers import ALL_FAMILIES, SHAPES, hf_greedy, parallel, prompts, rel_error, reference
from shiftlib import Engine, SamplingParams
from shiftlib.cache import BlockAllocator
from shiftlib.engine.sampler import filter_logits, sample
from shiftlib.engine.scheduler import Scheduler, burst_share
from shiftlib.engine.sequence import Sequence, Status

LENGTHS = (5, 17, 30)
NEW = 10


def _greedy_matches(world: int) -> list[tuple]:
    """Every family x shape, in modes tp / sp / auto; auto thresholds switch between prefill and decode
    (threshold 8) and in the middle of decoding (threshold 2: three decodes run SP, two or fewer TP)."""
    ps = prompts(LENGTHS)
    want = [hf_greedy(f, p, NEW)[: NEW - i] for f in ALL_FAMILIES for i, p in enumerate(ps)]
    mismatches = []
    for tp, sp in SHAPES[world]:
        models = {f: parallel(f, tp, sp) for f in ALL_FAMILIES}
        for mode, threshold in (("tp", None), ("sp", None), ("auto", 8), ("auto", 2)):
            got = []
            for f in ALL_FAMILIES:
                engine = Engine(models[f], num_blocks=32, block_size=4, mode=mode, threshold=threshold)
                params = [SamplingParams(max_new_tokens=NEW - i) for i in range(len(ps))]  # finish at different steps
                got += engine.generate(ps, params)
                if mode == "auto":
                    assert {s.mode for s in engine.stats} == {"tp", "sp"}, (f, threshold, engine.stats)
            if got != want:
                mismatches.append((tp, sp, mode, threshold))
    return mismatches


@pytest.mark.parametrize("world", [1, 2, 4])
def test_greedy_tokens_equal_hugging_face_in_every_mode_mesh_and_family(ranks, world):
    assert ranks(world).run(_greedy_matches, world) == [[]] * world


def _staggered(tp: int, sp: int, num_blocks: int, block_size: int, budget: int, threshold: int, lengths, arrivals,
               family: str = "llama", prefill: int | None = None, overhead: int | None = None, **overrides) -> tuple:
    """Requests join at different steps; the cache may be too small for all of them (preemption)."""
    ps = prompts(lengths, seed=len(lengths))
    want = [hf_greedy(family, p, NEW, **overrides) for p in ps]
    model = parallel(family, tp, sp, **overrides)
    engine = Engine(model, num_blocks=num_blocks, block_size=block_size, max_num_tokens=budget, threshold=threshold,
                    max_prefill_tokens=prefill or budget, step_overhead_tokens=overhead)
    ids, step = {}, 0
    while len(ids) < len(ps) or engine.has_unfinished:
        for i, at in enumerate(arrivals):
            if at == step:
                ids[i] = engine.add_request(ps[i], SamplingParams(max_new_tokens=NEW))
        engine.step()
        step += 1
    done = [engine.completion(ids[i]) for i in range(len(ps))]
    ok = [c.tokens for c in done] == want and all(c.finish_reason == "length" for c in done)
    chunked = any(s.num_tokens == budget and s.num_sampled < s.num_seqs for s in engine.stats)
    return ok, sum(s.preempted for s in engine.stats), {s.mode for s in engine.stats}, chunked


def test_staggered_arrivals_give_each_prompt_its_tokens_alone(ranks):
    for ok, _, modes, _ in ranks(4).run(_staggered, 2, 2, 64, 4, 16, 6, (9, 3, 21, 14), (0, 1, 1, 5)):
        assert ok and modes == {"tp", "sp"}


def test_preemption_recomputes_without_changing_tokens(ranks):
    # 10 blocks x 4 tokens cannot hold three requests of ~30 tokens: the newest is preempted and recomputed.
    for ok, preempted, _, _ in ranks(2).run(_staggered, 1, 2, 10, 4, 12, 6, (20, 25, 22), (0, 0, 2)):
        assert ok and preempted > 0


def test_chunked_prefill_and_preemption_cross_sliding_windows(ranks):
    # Mistral's window is 24: prompts of 30-41 tokens in chunks of 7, in a cache that must preempt.
    for ok, preempted, modes, chunked in ranks(2).run(_staggered, 2, 1, 16, 4, 7, 6, (30, 41, 27), (0, 0, 3), "mistral"):
        assert ok and preempted > 0 and chunked and modes == {"tp", "sp"}


def test_chunked_prefill_and_preemption_with_fewer_kv_heads_than_ranks(ranks):
    # 2 KV heads on 4 ranks: each KV head is replicated to two ranks' caches.
    for ok, preempted, modes, chunked in ranks(4).run(
        _staggered, 1, 4, 14, 4, 9, 6, (26, 33, 20), (0, 0, 2), "llama", num_key_value_heads=2
    ):
        assert ok and preempted > 0 and chunked and modes == {"tp", "sp"}


def _one_step_late() -> tuple:
    p = prompts((5,))[0]
    want = hf_greedy("llama", p, 4)
    engine = Engine(parallel("llama", 1, 1), num_blocks=16, block_size=4)
    rid = engine.add_request(p, SamplingParams(max_new_tokens=4, stop_token_ids=(want[1],)))
    out = []
    while engine.has_unfinished:
        out.append(engine.step())
    return out, [s.num_tokens for s in engine.stats], rid, want


def test_the_host_reads_a_step_s_tokens_while_the_next_one_runs_and_a_stop_drops_the_extra_token(ranks):
    (out, tokens_run, rid, want), = ranks(1).run(_one_step_late)
    # the prefill, then two decodes; the third decode was launched before the host saw the stop, and gives nothing
    assert out == [[], [(rid, want[0])], [(rid, want[1])], []]
    assert tokens_run == [5, 1, 1]


def _stopping(tp: int, sp: int) -> dict:
    """Each way a request ends, with its tokens and finish reason."""
    p = prompts((7,))[0]
    want = hf_greedy("llama", p, NEW)
    stop = want[3]  # its first occurrence ends the request there, the stop token included
    model = parallel("llama", tp, sp)
    engine = Engine(model, num_blocks=16, block_size=4)
    ids = {
        "stop_token": engine.add_request(p, SamplingParams(max_new_tokens=NEW, stop_token_ids=(stop,))),
        "length": engine.add_request(p, SamplingParams(max_new_tokens=5)),
        "zero": engine.add_request(p, SamplingParams(max_new_tokens=0)),
    }
    model.generation_config.eos_token_id = stop
    with_eos = Engine(model, num_blocks=16, block_size=4)
    eos_ids = {
        "eos": with_eos.add_request(p, SamplingParams(max_new_tokens=NEW)),
        "ignore_eos": with_eos.add_request(p, SamplingParams(max_new_tokens=NEW, ignore_eos=True)),
    }
    streamed: dict = {}  # (engine, request) -> the tokens step() gave out, one step after it ran them
    for e in (engine, with_eos):
        while e.has_unfinished:
            for rid, token in e.step():
                streamed.setdefault((id(e), rid), []).append(token)
    got = {k: engine.completion(i) for k, i in ids.items()} | {k: with_eos.completion(i) for k, i in eos_ids.items()}
    owner = {k: engine for k in ids} | {k: with_eos for k in eos_ids}
    assert all(streamed.get((id(owner[k]), c.id), []) == c.tokens for k, c in got.items()), streamed
    return {k: (c.tokens, c.finish_reason) for k, c in got.items()} | {"want": want, "stop": stop}


def test_requests_stop_on_eos_stop_tokens_and_length_with_exactly_their_tokens(ranks):
    for got in ranks(2).run(_stopping, 1, 2):
        want, stop = got["want"], got["stop"]
        until_stop = want[: want.index(stop) + 1]
        assert got["stop_token"] == (until_stop, "stop")  # the step launched behind the stop gave no token out
        assert got["eos"] == (until_stop, "stop")
        assert got["ignore_eos"] == (want, "length")
        assert got["length"] == (want[:5], "length")
        assert got["zero"] == ([], "length")


def test_a_burst_of_short_prompts_is_spread_over_steps_only_where_that_lowers_ttft():
    def admitted(step_overhead, waiting: int, prompt: int, running: int = 0) -> list[int]:
        scheduler = Scheduler(BlockAllocator(8192), 16, max_num_tokens=4096, max_num_seqs=256, max_prefill_tokens=2048,
                              step_overhead_tokens=step_overhead)
        for i in range(running):
            seq = Sequence(i, [1] * 8, SamplingParams(), None, output=[1], status=Status.RUNNING, num_cached=8)
            seq.blocks = scheduler.allocator.allocate(1)
            scheduler.running.append(seq)
        scheduler.waiting.extend(Sequence(running + i, [1] * prompt, SamplingParams(), None) for i in range(waiting))
        steps = []
        while scheduler.waiting:
            plan = scheduler.schedule(lambda n: "tp")
            steps.append(sum(1 for seq, n in plan.work if n == prompt))
            scheduler.advance(plan)
        return steps

    assert admitted(256, 16, 128) == [6, 7, 3]  # at an idle engine: sqrt(256 * 128 * 16) = 724 tokens, then 849
    assert admitted(None, 16, 128) == [16]
    assert admitted(256, 4, 128, running=16) == [4]  # under load the split would delay the running more than it saves
    assert admitted(256, 32, 2048) == admitted(None, 32, 2048) == [2] * 16  # a big burst of long prompts: the budget
    assert burst_share(256, 128, 16, 0) == pytest.approx(724.1, abs=0.1)
    with pytest.raises(ValueError, match="step_overhead_tokens must be >= 1"):
        admitted(0, 1, 8)


def test_prefill_chunks_are_capped_while_decodes_run():
    scheduler = Scheduler(BlockAllocator(64), 4, max_num_tokens=32, max_num_seqs=8, max_prefill_tokens=6)
    decoding = [Sequence(i, [1, 2], SamplingParams(), None, output=[3]) for i in range(3)]
    for seq in decoding:
        seq.num_cached, seq.status, seq.blocks = 2, Status.RUNNING, scheduler.allocator.allocate(1)
    scheduler.running += decoding
    long = [Sequence(3, [1] * 40, SamplingParams(), None), Sequence(4, [1] * 40, SamplingParams(), None)]
    scheduler.waiting.extend(long)
    plan = scheduler.schedule(lambda n: "tp")
    assert [(s.id, n) for s, n in plan.work] == [(0, 1), (1, 1), (2, 1), (3, 6)]  # 3 decodes + 6 prefill tokens
    for seq in decoding:
        scheduler.finish(seq)
    long[0].num_cached = 6
    plan = scheduler.schedule(lambda n: "tp")  # no decodes: the whole budget
    assert [(s.id, n) for s, n in plan.work] == [(3, 32)]


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    lengths=st.lists(st.integers(1, 24), min_size=1, max_size=4),
    block_size=st.sampled_from([1, 2, 4, 16]),
    threshold=st.integers(0, 40),
    budget=st.integers(4, 48),
    prefill=st.integers(1, 48),
    spare_blocks=st.integers(0, 40),
    overhead=st.sampled_from([None, 1, 4, 256]),  # 1 and 4 split bursts into steps of one or two prompts
    shape=st.sampled_from(SHAPES[2]),
)
def test_any_schedule_gives_hugging_face_tokens(ranks, lengths, block_size, threshold, budget, prefill, spare_blocks, overhead,
                                                shape):
    # Enough blocks for the longest request alone, plus a random margin: sometimes preemption, never a stall.
    need = -(-(max(lengths) + NEW) // block_size)
    arrivals = tuple(range(len(lengths)))
    results = ranks(2).run(_staggered, *shape, need + spare_blocks, block_size, budget, threshold, tuple(lengths), arrivals,
                           prefill=prefill, overhead=overhead)
    assert all(ok for ok, _, _, _ in results)


def _sampled(seed: int | None) -> list[list[int]]:
    model = parallel("qwen3", 1, 2)
    return shiftlib.generate(model, prompts((4, 9)), max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.9, seed=seed)


def test_sampling_with_a_seed_is_identical_on_every_rank_and_across_runs(ranks):
    first, again = ranks(2).run(_sampled, 7), ranks(2).run(_sampled, 7)
    assert first[0] == first[1] == again[0] == again[1]
    assert ranks(2).run(_sampled, 8)[0] != first[0]
    unseeded = ranks(2).run(_sampled, None)
    assert unseeded[0] == unseeded[1]  # still the same on every rank


def _kept_by_sorting(row: torch.Tensor, k: int, p: float) -> set[int]:
    """The definition, one row at a time: sort, keep the top k, then the smallest prefix whose mass reaches p."""
    order = row.argsort(descending=True).tolist()[: k or None]
    probs = row[order].softmax(-1).tolist()
    kept, mass = [], 0.0
    for token, prob in zip(order, probs):
        if mass >= p and kept and p < 1:
            break
        kept.append(token)
        mass += prob
    return set(kept)


@settings(max_examples=20, deadline=None)
@given(
    rows=st.lists(st.tuples(st.integers(0, 40), st.sampled_from([1.0, 0.95, 0.5, 0.1]), st.floats(0.05, 20)), min_size=1, max_size=5),
    vocab=st.sampled_from([7, 64, 3000]),
    seed=st.integers(0, 2**16),
)
@example(rows=[(0, 0.95, 0.05), (5, 0.5, 3.0), (0, 1.0, 1.0)], vocab=3000, seed=0)
def test_top_k_and_top_p_keep_the_same_tokens_as_sorting_each_row(rows, vocab, seed):
    # Sharp and flat rows in one batch: with vocab 3000 a flat row's nucleus reaches past the 1024 candidates.
    g = torch.Generator().manual_seed(seed)
    logits = torch.stack([torch.randn(vocab, generator=g, dtype=torch.float64) * spread for _, _, spread in rows])
    ks, ps = [k for k, _, _ in rows], [p for _, p, _ in rows]
    kept = torch.isfinite(filter_logits(logits, ks, ps))
    for row, k, p, mask in zip(logits, ks, ps, kept):
        assert set(mask.nonzero().flatten().tolist()) == _kept_by_sorting(row, k, p)


def test_sampled_tokens_follow_the_filtered_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    params = [SamplingParams(temperature=1.0, top_k=1), SamplingParams(), SamplingParams(temperature=1.0, top_k=3),
              SamplingParams(temperature=0.5, top_p=0.5)]
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    draws = torch.stack([sample(logits, params, gens) for _ in range(400)])
    assert (draws[:, :2] == logits[:2].argmax(-1)).all()  # top-k 1 and greedy: the argmax
    assert set(draws[:, 2].tolist()) == set(logits[2].topk(3).indices.tolist())  # all three, nothing else
    assert set(draws[:, 3].tolist()) <= _kept_by_sorting(logits[3].double() / 0.5, 0, 0.5)


def _bad_requests() -> list[str]:
    model = parallel("llama", 1, 2)
    engine = Engine(model, num_blocks=8, block_size=4)
    good = engine.add_request(prompts((6,))[0], SamplingParams(max_new_tokens=4))
    engine.step()
    messages = []
    for bad, words in (
        (lambda: engine.add_request([], SamplingParams()), "empty prompt"),
        (lambda: engine.add_request([1] * 40, SamplingParams(max_new_tokens=1)), "KV cache"),
        (lambda: engine.add_request([1] * 1000, SamplingParams(max_new_tokens=100)), "context of 1024"),
        (lambda: engine.add_request([300], SamplingParams()), "outside the vocabulary"),
        (lambda: SamplingParams(max_new_tokens=-1), "max_new_tokens"),
        (lambda: SamplingParams(top_p=0), "top_p"),
        (lambda: Engine(model, mode="fast"), "unknown mode 'fast'"),
        (lambda: shiftlib.generate(model, ["hello"]), "tokenizer"),
    ):
        with pytest.raises(ValueError) as info:
            bad()
        assert words in str(info.value), str(info.value)
        messages.append(str(info.value))
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[1, 2], []])  # checked as a whole: the good prompt is not queued either
    with pytest.raises(ValueError, match="2 prompts but 3 SamplingParams"):
        engine.generate([[1], [2]], [SamplingParams()] * 3)
    assert list(engine.requests) == [good]
    while engine.has_unfinished:  # the good request is still served
        engine.step()
    assert engine.completion(good).tokens == hf_greedy("llama", prompts((6,))[0], NEW)[:4]
    return messages


def test_bad_requests_get_clear_errors_and_the_engine_keeps_serving(ranks):
    ranks(2).run(_bad_requests)


def _logits_by_chunk(tp: int, sp: int, chunks: tuple[int, ...], block_size: int, mode: str) -> list:
    """The logits of every sampled row (the prompt's last, then each decode) for each prefill chunk size."""
    prompt = prompts((29,))[0]
    out = []
    for chunk in chunks:
        engine = Engine(parallel("mistral", tp, sp), num_blocks=32, block_size=block_size, max_num_tokens=chunk, mode=mode)
        run, seen = engine.runner.run, []
        engine.runner.run = lambda *args: (lambda r: seen.append(r[0].clone()) or r)(run(*args))
        engine.generate([prompt], SamplingParams(max_new_tokens=3))
        out.append(torch.cat(seen))
    return [rel_error(x, out[-1]) for x in out[:-1]]


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(chunks=st.lists(st.integers(1, 28), min_size=1, max_size=3), block_size=st.sampled_from([1, 4, 16]),
       mode=st.sampled_from(["tp", "sp"]), shape=st.sampled_from(SHAPES[2]))
def test_chunked_prefill_of_any_chunk_size_gives_the_logits_of_one_chunk(ranks, chunks, block_size, mode, shape):
    # Mistral: its 24-token window cuts through the 29-token prompt, so later chunks attend across the window edge.
    for errors in ranks(2).run(_logits_by_chunk, *shape, (*chunks, 29), block_size, mode):
        assert max(errors) <= 1e-9


def _failing_step(failing_rank: int) -> list[str]:
    """Rank ``failing_rank`` raises in its third step, after the step's collectives; its peers do not."""
    import time

    import torch.distributed as dist

    import shiftlib.engine.engine as engine_module

    engine = Engine(parallel("llama", 1, 2), num_blocks=16, block_size=4)
    engine.add_request(prompts((6,))[0], SamplingParams(max_new_tokens=8))
    engine.step(), engine.step()
    real = engine_module.sample
    if dist.get_rank() == failing_rank:
        engine_module.sample = lambda *args: (_ for _ in ()).throw(MemoryError("injected"))
    errors = []
    try:
        for _ in range(3):
            try:
                engine.step()
            except (MemoryError, RuntimeError) as exc:
                errors.append(str(exc))
            time.sleep(1)  # the failed rank has posted its failure well before its peer looks again
    finally:
        engine_module.sample = real
    return errors


def test_a_step_failing_on_one_rank_stops_the_engine_on_every_rank(ranks):
    peer, failed = ranks(2).run(_failing_step, 1)
    assert failed[0] == "injected" and len(failed) == 3 and len(peer) == 2
    assert all("stopped because a step failed on rank 1: MemoryError('injected')" in e for e in failed[1:] + peer)


def _engines_are_freed() -> list[bool]:
    import gc
    import weakref

    model = parallel("llama", 1, 1)
    shiftlib.generate(model, prompts((4,)), max_new_tokens=2)
    first = model._shiftlib_engine[1]
    shiftlib.generate(model, prompts((4,)), max_new_tokens=2)
    reused = model._shiftlib_engine[1] is first and not first.requests
    rid = first.add_request(prompts((3,))[0], SamplingParams(max_new_tokens=1))
    while first.has_unfinished:
        first.step()
    first.completion(rid)
    with pytest.raises(ValueError, match="already handed over"):
        first.completion(rid)
    shiftlib.generate(model, prompts((4,)), max_new_tokens=2, num_blocks=8)  # other kwargs: a new engine
    replaced = weakref.ref(first)
    del first
    gc.collect()
    kept = weakref.ref(model), weakref.ref(model._shiftlib_engine[1].cache.data)
    del model
    gc.collect()
    return [reused, replaced() is None] + [r() is None for r in kept]


def test_generate_keeps_one_engine_per_model_and_frees_it_with_the_model(ranks):
    assert ranks(1).run(_engines_are_freed) == [[True] * 4]


LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.1, 1.2, 1.3],
            "long_factor": [2.0, 3.0, 4.0, 5.0], "original_max_position_embeddings": 32}
ROPES = {"longrope": dict(rope_parameters=LONGROPE),
         # dynamic NTK rescales only past max_position_embeddings, which no request may pass
         "dynamic": dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, max_position_embeddings=40)}


def _rescaling_rope(kind: str) -> tuple[bool, str]:
    """A short request beside a neighbour at the engine's longest context: each gets its tokens alone."""
    over = ROPES[kind]
    short, long = prompts((6, 30))
    model = parallel("llama", 1, 2, **over)
    engine = Engine(model, num_blocks=32, block_size=4)
    got = engine.generate([short, long], [SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=2)])
    with pytest.raises(ValueError) as info:
        engine.add_request(long, SamplingParams(max_new_tokens=11))
    return got == [hf_greedy("llama", short, 8, **over), hf_greedy("llama", long, 2, **over)], str(info.value)


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_rescaling_ropes_give_each_request_its_own_tokens_or_refuse_it(ranks, kind):
    for ok, message in ranks(2).run(_rescaling_rope, kind):
        assert ok
        assert ("context of 32 tokens (LongRoPE" if kind == "longrope" else "context of 40 tokens:") in message


def _static_decode(tp: int, sp: int) -> bool:
    """The CUDA-graph path (static buffers, buckets with padding rows, wide block tables, mixed steps over fixed
    sequence slots), run uncaptured on CPU, with the graphs that start-up captures."""
    ps = prompts(LENGTHS)
    model = parallel("qwen2", tp, sp)
    engine = Engine(model, num_blocks=32, block_size=4, cuda_graphs=True, threshold=2, max_num_seqs=4,
                    max_num_tokens=24, max_prefill_tokens=8, mixed_graph_tokens=12)
    captured = set(engine.runner.graphs), set(engine.runner.mixed)
    got = engine.generate(ps, [SamplingParams(max_new_tokens=NEW - 3 * i) for i in range(len(ps))])
    assert (set(engine.runner.graphs), set(engine.runner.mixed)) == captured  # start-up captured every graph used
    assert {key[0] for key, g in engine.runner.graphs.items() if g.replays} == {"tp", "sp"}  # 3 decodes run SP, then TP
    mixed = [s.num_tokens for s in engine.stats if s.num_tokens != s.num_seqs]
    assert engine.runner.mixed_buckets == [16] and max(mixed) > 16  # larger prefill steps run eagerly
    assert sum(g.replays for g in engine.runner.mixed.values()) == sum(n <= 16 for n in mixed) > 0
    return got == [hf_greedy("qwen2", p, NEW)[: NEW - 3 * i] for i, p in enumerate(ps)]


def test_mixed_steps_replay_graphs_up_to_1024_tokens_on_one_rank_and_the_whole_budget_on_several():
    from shiftlib.engine.runner import mixed_graph_tokens

    assert [mixed_graph_tokens(world, 4096) for world in (1, 2, 8)] == [1024, 4096, 4096]
    assert mixed_graph_tokens(1, 512) == 512 and mixed_graph_tokens(8, 4096, 0) == 0  # asked for: none
    assert mixed_graph_tokens(2, 2048, 8192) == 2048  # never past the step's budget


def test_graph_buffers_and_padding_give_hugging_face_tokens(ranks):
    assert all(ranks(2).run(_static_decode, 1, 2))
    assert all(ranks(2).run(_static_decode, 2, 1))


def _abort_min_tokens_logprobs() -> tuple:
    engine = Engine(parallel("llama", 1, 2), num_blocks=16, block_size=4)
    ps = prompts((5, 9))
    first = hf_greedy("llama", ps[0], 1)[0]
    keep = engine.add_request(ps[0], SamplingParams(max_new_tokens=6, logprobs=3))
    drop = engine.add_request(ps[1], SamplingParams(max_new_tokens=30))
    # the greedy first token ends this request, but not before two tokens are out
    late = engine.add_request(ps[0], SamplingParams(max_new_tokens=4, stop_token_ids=(first,), min_tokens=2))
    engine.step()
    free = engine.scheduler.allocator.num_free
    engine.abort(drop)
    freed = engine.scheduler.allocator.num_free - free
    while engine.has_unfinished:
        engine.step()
    seq = engine.requests[keep]
    # with drafts verified in the step, the logprobs of accepted tokens come from their own rows
    spec = Engine(parallel("llama", 1, 2), num_blocks=32, block_size=4, speculative="suffix")
    rep = spec.add_request(ps[0] * 4, SamplingParams(max_new_tokens=12, logprobs=2))
    while spec.has_unfinished:
        spec.step()
    accepted = sum(s.accepted for s in spec.stats)
    spec_seq = spec.requests[rep]
    return (freed, engine.requests[drop].finish_reason, seq.output, seq.logprobs, engine.completion(late).tokens, first,
            spec_seq.output, spec_seq.logprobs, accepted)


def test_abort_frees_blocks_at_once_min_tokens_holds_back_stops_and_logprobs_are_log_softmax(ranks):
    freed, reason, output, logprobs, late, stop, spec_out, spec_logprobs, accepted = ranks(2).run(
        _abort_min_tokens_logprobs)[0]
    assert freed > 0 and reason == "abort"
    assert stop not in late[:2] and len(late) >= 2
    assert accepted > 0 and len(spec_logprobs) == len(spec_out) == 12
    prompt = prompts((5,))[0]
    for context, out, recorded, k in ((prompt, output, logprobs, 3), (prompt * 4, spec_out, spec_logprobs, 2)):
        lp = reference("llama")(torch.tensor([context + out])).logits[0, len(context) - 1 : -1].log_softmax(-1)
        for i, (token, (chosen, top)) in enumerate(zip(out, recorded)):
            assert abs(chosen - lp[i, token].item()) < 1e-9
            values, indices = lp[i].topk(k)
            assert [t for t, _ in top] == indices.tolist()
            assert max(abs(a - b) for (_, a), b in zip(top, values.tolist())) < 1e-9
