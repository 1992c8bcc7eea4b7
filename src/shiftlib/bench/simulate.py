"""The steps an engine runs for a closed-loop load, from its own scheduler with no model: what the cost model prices.

Pricing each step as a pure prefill or a pure decode step missed what the engine does under load: its steps mix
prefill chunks (at most ``max_prefill_tokens`` of them while decodes run) with decode rows, and a closed loop's
first wave arrives at once. So the cost model replays the load on the engine's :class:`Scheduler` as the
overlapped loop drives it (a step is scheduled before the tokens of the one in flight are read, so a finished
request's successor is admitted a step late) and prices the steps that come out. Which tokens a step runs does not
depend on how long steps take, so one replay serves every configuration and threshold.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass

from shiftlib.cache import BlockAllocator
from shiftlib.engine.sampler import SamplingParams
from shiftlib.engine.scheduler import Scheduler
from shiftlib.engine.sequence import Sequence


@dataclass(frozen=True)
class Trace:
    """``steps``: (prefill tokens, decode rows, rows sampled) of each step. ``requests``: for each request the
    step after whose end it arrived (-1: at the start), and the steps that sampled its first and last tokens."""

    steps: tuple[tuple[int, int, int], ...]
    requests: tuple[tuple[int, int, int], ...]


@functools.lru_cache(maxsize=256)
def closed_loop(concurrency: int, requests: int, input_len: int, output_len: int, max_num_tokens: int,
                max_prefill_tokens: int, max_num_seqs: int, step_overhead_tokens: int | None,
                block_size: int = 16) -> Trace:  # fmt: skip
    """The steps of ``requests`` requests of ``input_len`` prompt and ``output_len`` new tokens, ``concurrency`` in
    flight (a new one arrives as one finishes), on a cache that never preempts, as the benchmark's prompts
    (random: no prefix hits) run on an engine with these settings."""
    blocks = concurrency * (-(-(input_len + output_len) // block_size) + 1) + 1
    scheduler = Scheduler(BlockAllocator(blocks), block_size, max_num_tokens, max_num_seqs, max_prefill_tokens,
                          prefix_caching=False, step_overhead_tokens=step_overhead_tokens)  # fmt: skip
    todo, live = deque(range(requests)), 0
    arrived, first, last, steps = {}, {}, {}, []

    def admit(after: int) -> None:
        nonlocal live
        while todo and live < concurrency:
            rid = todo.popleft()
            scheduler.add(Sequence(rid, [0] * input_len, SamplingParams(max_new_tokens=output_len), None, arrival=rid))
            arrived[rid], live = after, live + 1

    admit(-1)
    in_flight: tuple[int, list[Sequence]] | None = None
    while scheduler.has_work or in_flight:
        plan, launched = scheduler.schedule(lambda n: "tp"), None
        if plan.work:
            prefill = sum(n for seq, n in plan.work if seq.num_cached < len(seq.prompt))
            decodes = len(plan.work) - sum(1 for seq, _ in plan.work if seq.num_cached < len(seq.prompt))
            scheduler.advance(plan)
            rows = [seq for seq, _ in plan.work if seq.pending == 0]  # the step samples their next token
            for seq in rows:
                seq.inflight += 1
            steps.append((prefill, decodes, len(rows)))
            launched = (len(steps) - 1, rows)
        if in_flight:  # the host reads the step before: stop checks, then the driver tops the loop up
            step, rows = in_flight
            for seq in rows:
                seq.inflight -= 1
                seq.output.append(0)
                first.setdefault(seq.id, step)
                if len(seq.output) == output_len:
                    last[seq.id], live = step, live - 1
                    scheduler.finish(seq)
            admit(step)
        in_flight = launched
    return Trace(tuple(steps), tuple((arrived[r], first[r], last[r]) for r in range(requests)))
