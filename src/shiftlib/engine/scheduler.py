"""Continuous batching: which requests run this step, with how many tokens, and in which mode.

Every rank runs the same scheduler on the same requests, so all ranks reach the same plan (and the same mode)
without talking. Order of service: decodes first (one token each, latency-critical), then prefills in chunks
under the step's token budget, and under a smaller prefill budget while decodes run (a long prefill chunk
would stall every decode of the step: TPOT spikes). A new request starts past the prefix that the cache already
holds (:mod:`shiftlib.engine.prefix_cache`). When cache blocks run out, the newest running request is
preempted: its blocks are freed and it is recomputed later from its prompt and the tokens it already produced.
A speculative draft rides with its request's decode on what budget and blocks are left: it never preempts.
With ``step_overhead_tokens`` set, a burst of short prompts is spread over a few steps where that lowers their
time to first token (:func:`burst_share`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from shiftlib.cache import BlockAllocator
from shiftlib.engine import prefix_cache
from shiftlib.engine.sequence import Sequence, Status


@dataclass
class StepPlan:
    work: list[tuple[Sequence, int]]  # (request, tokens to run this step)
    mode: str
    preempted: int

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.work)


def burst_share(step_overhead: int, mean_prompt: float, waiting: int, running: int) -> float:
    """Prompt tokens of new requests worth admitting in one step, with ``waiting`` requests of ``mean_prompt``
    uncached tokens each queued and ``running`` in flight.

    Running a burst of n prompts (W tokens) as m steps gets the first ones their first token sooner, but each
    split pays one more step's fixed part a: reading the weights, as long as ``step_overhead`` prompt tokens of
    compute (b a token). The burst's TTFTs sum to n (m + 1) / 2 (a + bW / m). The extra steps are throughput lost
    to everyone in flight; pricing it as m a per running request (conservative: a lower price splits a loaded
    engine and raises its TTFT in the closed-loop simulation) makes the sum least at
    m = sqrt(bW / (a (1 + 2 running / n))), so a step takes W / m = sqrt(step_overhead mean_prompt (n + 2 running))
    of them. Under load (many running, or long prompts) that is past the budget and nothing changes; 16 prompts
    of 128 tokens at an idle engine go as 6, 7 and 3. The real engine disagreed with this model at one load: in a
    closed loop of 512-token prompts at c = 16 on an H200, the split cost 13 % of the throughput and raised TTFT
    p50 by 31 %, where the simulator had it 22 % lower. So the engine leaves it off by default.
    """
    return math.sqrt(step_overhead * mean_prompt * (waiting + 2 * running))


class Scheduler:
    def __init__(self, allocator: BlockAllocator, block_size: int, max_num_tokens: int, max_num_seqs: int,
                 max_prefill_tokens: int | None = None, prefix_caching: bool = True,
                 step_overhead_tokens: int | None = None) -> None:
        max_prefill_tokens = max_num_tokens if max_prefill_tokens is None else max_prefill_tokens
        if min(max_num_tokens, max_num_seqs, max_prefill_tokens) < 1:
            raise ValueError(f"max_num_tokens, max_num_seqs and max_prefill_tokens must be >= 1, got {max_num_tokens}, "
                             f"{max_num_seqs}, {max_prefill_tokens}")
        if step_overhead_tokens is not None and step_overhead_tokens < 1:
            raise ValueError(f"step_overhead_tokens must be >= 1 (about the GPU's ridge point, 256 on an H200) or None "
                             f"(no burst split), got {step_overhead_tokens}")
        self.allocator, self.block_size, self.prefix_caching = allocator, block_size, prefix_caching
        self.step_overhead_tokens = step_overhead_tokens
        self.max_num_tokens, self.max_num_seqs, self.max_prefill_tokens = max_num_tokens, max_num_seqs, max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _blocks_needed(self, seq: Sequence, n: int) -> int:
        return -(-(seq.num_cached + n) // self.block_size) - len(seq.blocks)

    def _preempt(self, seq: Sequence) -> None:
        self.offer(seq)  # its recomputation starts from what is cached
        self.allocator.free(seq.blocks)
        seq.blocks, seq.keys, seq.num_cached, seq.status, seq.draft = [], [], 0, Status.WAITING, []
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def schedule(self, pick_mode) -> StepPlan:
        """Plan one step; ``pick_mode(num_tokens)`` turns the step's token count into ``"tp"`` or ``"sp"``."""
        budget, prefill, work, preempted = self.max_num_tokens, self.max_num_tokens, [], 0
        scheduled: set[int] = set()

        def room(pending: int) -> int:
            return min(pending, budget, budget if pending == 1 else prefill)

        def take(seq: Sequence, n: int, pending: int) -> None:
            nonlocal budget, prefill
            if need := self._blocks_needed(seq, n):
                seq.blocks += self.allocator.allocate(need)
            work.append((seq, n))
            budget -= n
            prefill = min(prefill, self.max_prefill_tokens) if pending == 1 else prefill - n

        # Running requests, decodes before prefill chunks, oldest first.
        for pending, seq in sorted(((s.pending, s) for s in self.running), key=lambda t: (t[0] > 1, t[1].arrival)):
            if seq.status is not Status.RUNNING or seq.sampled_all or (n := room(pending)) == 0:
                continue
            if seq.draft:  # it takes what is left of the budget and of the blocks the others' next tokens need not
                spare = (len(seq.blocks) + max(self.allocator.num_free - len(self.running), 0)) * self.block_size
                seq.draft = seq.draft[: max(min(budget - n, spare - seq.num_tokens), 0)]
                n += len(seq.draft)
            while self._blocks_needed(seq, n) > self.allocator.num_free:
                victim = max((s for s in self.running if s.id not in scheduled), key=lambda s: s.arrival)
                self._preempt(victim)
                preempted += 1
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            take(seq, n, pending)
            scheduled.add(seq.id)
        # Admit waiting requests while tokens, sequences and blocks allow (no preemption for newcomers), and
        # while the burst's share of the step is not reached.
        queued, running, admitted, prompts = len(self.waiting), len(self.running), 0, 0
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            if admitted and self.step_overhead_tokens is not None and prompts >= burst_share(
                    self.step_overhead_tokens, prompts / admitted, queued, running):  # fmt: skip
                break
            seq = self.waiting[0]
            if self.prefix_caching:
                prefix_cache.claim(self.allocator, seq, self.block_size)
            if (n := room(pending := seq.pending)) == 0 or self._blocks_needed(seq, n) > self.allocator.num_free:
                self.allocator.free(seq.blocks)  # the cached blocks it matched wait with it, unclaimed
                seq.blocks, seq.keys, seq.num_cached = [], [], 0
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            take(seq, n, pending)
            admitted, prompts = admitted + 1, prompts + pending
        total = sum(n for _, n in work)
        return StepPlan(work, pick_mode(total) if work else "tp", preempted)

    def advance(self, plan: StepPlan) -> None:
        """The step is on its way: its tokens count as cached (draft tokens once verified: :meth:`rollback`)."""
        for seq, n in plan.work:
            seq.num_cached += n - len(seq.draft)

    def offer(self, *seqs: Sequence) -> None:
        """Their newly full blocks may serve later requests, now that their tokens are known."""
        for seq in seqs:
            if self.prefix_caching and seq.status is not Status.FINISHED:
                prefix_cache.offer(self.allocator, seq, self.block_size)

    def rollback(self, seq: Sequence, accepted: int) -> None:
        """A verified draft: its first ``accepted`` tokens are cached; free the blocks its rejected ones took."""
        seq.num_cached, seq.draft = seq.num_cached + accepted, []
        keep = -(-seq.num_cached // self.block_size)
        self.allocator.free(seq.blocks[keep:])
        del seq.blocks[keep:]

    def finish(self, seq: Sequence) -> None:
        """It is done (or aborted), running or still waiting: its blocks are free, the cached ones kept for reuse."""
        if seq.status is Status.RUNNING:
            self.offer(seq)
            self.allocator.free(seq.blocks)
            seq.blocks = []
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
