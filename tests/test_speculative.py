"""Speculative decoding in the engine: the same tokens as without it, in every mode, mesh and family."""

from __future__ import annotations

import torch

from helpers import ALL_FAMILIES, SHAPES, hf_greedy, parallel, prompts, reference
from shiftlib import Engine, SamplingParams

NEW = 16
SPEC = dict(speculative="suffix", num_speculative_tokens=6)


def _repetitive(seed: int) -> list[list[int]]:
    return [p * 3 for p in prompts((5, 8), seed=seed)]


def _greedy_with_drafts(world: int) -> list[tuple]:
    """Per shape and family, one engine runs repetitive and plain prompts in modes tp, sp and auto (threshold
    16: verify steps of more tokens run SP, others TP); later calls also draft from earlier calls' responses."""
    ps = _repetitive(seed=3) + prompts((7, 13), seed=4)
    failures = []
    for tp, sp in SHAPES[world]:
        for family in ALL_FAMILIES:
            want = [hf_greedy(family, p, NEW) for p in ps]
            engine = Engine(parallel(family, tp, sp), num_blocks=64, block_size=4, **SPEC)
            for engine.mode, engine.threshold in (("tp", None), ("sp", None), ("auto", 16)):
                engine.stats.clear()
                got = engine.generate(ps, SamplingParams(max_new_tokens=NEW))
                accepted = sum(s.accepted for s in engine.stats)
                verify_modes = {s.mode for s in engine.stats if s.drafted}
                if got != want or not accepted or (engine.mode == "auto" and verify_modes != {"tp", "sp"}):
                    failures.append((tp, sp, family, engine.mode, accepted, verify_modes))
    return failures


def test_greedy_tokens_with_speculation_equal_hugging_face_in_every_mode_mesh_and_family(ranks):
    for world in (1, 2, 4):
        assert ranks(world).run(_greedy_with_drafts, world) == [[]] * world


def _preempted_with_drafts() -> tuple[bool, int, int]:
    # 12 blocks x 4 tokens cannot hold three requests of ~40 tokens: the newest is preempted and recomputed.
    ps = _repetitive(seed=5) + prompts((9,), seed=6)
    engine = Engine(parallel("qwen2", 1, 2), num_blocks=12, block_size=4, max_num_tokens=16, threshold=6, **SPEC)
    got = engine.generate(ps, SamplingParams(max_new_tokens=NEW))
    stats = engine.stats
    ok = got == [hf_greedy("qwen2", p, NEW) for p in ps] and engine.scheduler.allocator.num_free == 12
    return ok, sum(s.preempted for s in stats), sum(s.accepted for s in stats)


def test_preemption_and_rejected_drafts_keep_tokens_and_free_every_block(ranks):
    for ok, preempted, accepted in ranks(2).run(_preempted_with_drafts):
        assert ok and preempted > 0 and accepted > 0


def _alone(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[list[int], str, list[tuple]]:
    """Run one request; per verify step, where its own tokens start in the output, and how many were accepted
    (a step may also hand out the token of the step before it, which comes first)."""
    rid, verified, n = engine.add_request(prompt, params), [], 0
    while engine.has_unfinished:
        emitted = [t for r, t in engine.step() if r == rid]
        if emitted and (s := engine.stats[-1]).drafted:
            verified.append((n + len(emitted) - min(len(emitted), s.accepted + 1), s.accepted))
        n += len(emitted)
    done = engine.completion(rid)
    return done.tokens, done.finish_reason, verified


def _stop_inside_draft() -> tuple[list[int], list[int], str, int]:
    """Pick a token that a verify step emitted after an accepted draft token (its first occurrence), then stop on
    it: the request ends there, in a verify step that accepted draft tokens."""
    engine = Engine(parallel("llama", 1, 2), num_blocks=64, block_size=4, **SPEC)
    for prompt in (p for seed in range(8) for p in _repetitive(seed)):
        output, _, verified = _alone(engine, prompt, SamplingParams(max_new_tokens=NEW))
        picks = [at + i for at, k in verified for i in range(1, k + 1) if output[at + i] not in output[: at + i]]
        if picks:
            break
    at = picks[0]
    got, reason, verified = _alone(engine, prompt, SamplingParams(max_new_tokens=NEW, stop_token_ids=(output[at],)))
    return got, output[: at + 1], reason, verified[-1][1]


def test_a_stop_token_inside_accepted_draft_tokens_ends_the_request_there(ranks):
    for got, want, reason, accepted_in_last_step in ranks(2).run(_stop_inside_draft):
        assert got == want and reason == "stop" and accepted_in_last_step > 0


def _drafts_once_the_batch_is_small() -> tuple:
    """speculative_max_batch=2: four requests decode in the overlapped loop until two have finished, then the
    other two draft and verify (each step reads its own tokens)."""
    ps = _repetitive(seed=7) + _repetitive(seed=8)
    lengths = (3, 5, 20, 20)
    engine = Engine(parallel("llama", 1, 2), num_blocks=128, block_size=4, speculative_max_batch=2, **SPEC)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=n)) for p, n in zip(ps, lengths)]
    first = engine.step()
    while engine.has_unfinished:
        engine.step()
    got = [engine.completion(i).tokens for i in ids]
    want = [hf_greedy("llama", p, n) for p, n in zip(ps, lengths)]
    drafted_at = {s.num_seqs for s in engine.stats if s.drafted}
    return first, got == want, drafted_at, sum(s.accepted for s in engine.stats)


def test_a_batch_over_speculative_max_batch_keeps_the_overlapped_loop_and_drafts_once_it_shrinks(ranks):
    for first, same, drafted_at, accepted in ranks(2).run(_drafts_once_the_batch_is_small):
        assert first == []  # the prefill's tokens are read a step later, as without speculation
        assert same and drafted_at and max(drafted_at) <= 2 and accepted > 0


def _steps_with_nothing_to_draft() -> dict:
    p = prompts((5,), seed=11)[0]
    out = {}
    for spec in (None, "suffix"):
        engine = Engine(parallel("llama", 1, 1), num_blocks=16, block_size=4, speculative=spec)
        engine.add_request(p, SamplingParams(max_new_tokens=4))
        steps = []
        while engine.has_unfinished:
            steps.append(engine.step())
        out[spec] = steps, sum(s.drafted for s in engine.stats)
    return out


def test_a_request_with_nothing_to_draft_from_streams_as_without_speculation(ranks):
    (out,) = ranks(1).run(_steps_with_nothing_to_draft)
    assert out["suffix"] == out[None] and out[None][1] == 0  # the overlapped loop: tokens a step late


VOCAB, TEMPERATURE, POSITIONS, SAMPLES = 8, 0.7, 3, 1000  # tokens checked: the first 3 of 8


def _sampled_tokens(sp: int = 2) -> tuple[list[list[int]], int]:
    engine = Engine(parallel("llama", 1, sp, vocab_size=VOCAB), num_blocks=512, block_size=4, speculative="suffix",
                    num_speculative_tokens=4, speculative_max_batch=SAMPLES)  # fmt: skip
    params = [SamplingParams(max_new_tokens=8, temperature=TEMPERATURE, seed=s) for s in range(SAMPLES)]
    outs = engine.generate([_PROMPT] * SAMPLES, params)
    return outs, sum(s.accepted for s in engine.stats)


_PROMPT = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2]


def _exact_marginals() -> list[dict[int, float]]:
    """The target's distribution of each new token, by enumerating every earlier continuation (float64)."""
    model = reference("llama", vocab_size=VOCAB)
    marginals, paths = [], {(): 1.0}
    for _ in range(POSITIONS):
        step: dict[int, float] = {}
        longer = {}
        for path, p in paths.items():
            logits = model(torch.tensor([_PROMPT + list(path)])).logits[0, -1]
            for t, q in enumerate((logits / TEMPERATURE).softmax(-1).tolist()):
                step[t] = step.get(t, 0.0) + p * q
                longer[path + (t,)] = p * q
        marginals.append(step)
        paths = longer
    return marginals


def test_sampling_with_speculation_keeps_the_target_distribution(ranks):
    """Each position's token frequencies against the exact marginals: by Hoeffding's inequality and a union
    bound over 8 tokens x 3 positions, a correct engine fails with probability <= 48 exp(-2 N eps^2) = 1.3e-4."""
    (outs, accepted), again = ranks(2).run(_sampled_tokens)
    assert again[0] == outs and accepted > SAMPLES // 10  # drafts were verified and kept, on every rank alike
    eps = 0.08
    for position, exact in enumerate(_exact_marginals()):
        for t in range(VOCAB):
            seen = sum(o[position] == t for o in outs) / SAMPLES
            assert abs(seen - exact[t]) <= eps, (position, t, seen, exact[t])
