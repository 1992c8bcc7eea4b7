"""The engine loop: requests in, one scheduled step at a time, tokens out."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence as Seq

import torch
from torch import nn

from shiftlib.cache import BlockAllocator
from shiftlib.engine.failure import Failure
from shiftlib.engine.memory import kv_cache
from shiftlib.engine.runner import GRAPH_BUCKETS, Runner, mixed_graph_tokens as default_mixed_tokens
from shiftlib.engine.inflight import InFlight
from shiftlib.engine.sampler import Logprobs, SamplingParams, ban_stops, eos_ids, sample
from shiftlib.engine.scheduler import Scheduler, StepPlan
from shiftlib.engine.sequence import Sequence, Status
from shiftlib.engine.speculator import speculator, verify
from shiftlib.modules.model import check_mode
from shiftlib.plan import shift_model

STATS_KEPT = 100_000  # the latest steps' StepStats; older ones are dropped


@dataclass(frozen=True)
class StepStats:
    """What one step did; benchmarks read these from ``Engine.stats``.

    Attributes:
        mode: ``"tp"`` or ``"sp"``, the mode the step ran in.
        num_tokens: tokens scheduled (prefill chunks + decodes): what the threshold is compared with.
        num_seqs: requests in the step.
        num_sampled: requests that got a new token (a prefill chunk that does not end its prompt gets none).
        preempted: requests preempted to make room in the cache during scheduling.
        seconds: wall time of the :meth:`Engine.step` call that read the step's tokens: under load, the time from
            one step's tokens to the next's.
        drafted, accepted: speculated tokens verified in the step (counted in ``num_tokens``), and those kept.
    """

    mode: str
    num_tokens: int
    num_seqs: int
    num_sampled: int
    preempted: int
    seconds: float
    drafted: int = 0
    accepted: int = 0


@dataclass(frozen=True)
class Completion:
    """A finished request: its tokens, why it stopped, and its latencies (seconds from ``add_request``)."""

    id: int
    prompt: list[int]
    tokens: list[int]
    finish_reason: str
    ttft_s: float
    latency_s: float


class Engine:
    """Continuous-batching generation over a paged KV cache, switching mode at every step.

    Args:
        model: a model returned by :func:`shiftlib.parallelize` or :func:`shiftlib.from_pretrained`.
        num_blocks: KV-cache blocks per rank. Default: on GPU, ``memory_fraction`` of the memory left free by
            the largest step's activations and the CUDA graphs (the minimum over ranks); on CPU, 1024.
        block_size: tokens per cache block.
        max_num_tokens: token budget of one step (prefills are chunked to fit it).
        max_prefill_tokens: prefill tokens a step may take while decodes run in it: bounds how long a decode
            waits behind prefills (TPOT), at some cost in prefill throughput.
        step_overhead_tokens: ``None`` (default) admits new requests while the budget allows. A number, a step's
            fixed cost (reading the weights) in prompt tokens of compute, about the GPU's ridge point (256 on an
            H200), spreads a burst of short prompts over a few steps (:func:`shiftlib.engine.scheduler.burst_share`):
            on the H200 that cut a prefix-cached burst's TTFT by a fifth, but cost a closed loop of 512-token prompts
            at c = 16 an eighth of its throughput (docs/engine.md), so it is for bursts of short prompts.
        max_num_seqs: requests running at once.
        mode: ``"auto"`` (switch by the step's token count), ``"tp"`` or ``"sp"``.
        threshold: the switch point in tokens; ``None`` keeps the model's.
        memory_fraction: share of the GPU memory left after activations and graphs that the cache may take.
        cuda_graphs: replay decode steps as CUDA graphs, one per mode and batch bucket, captured here; default on
            GPU. On CPU, ``True`` runs the graphs' static-buffer path without capture (for tests).
        max_graph_batch: the largest decode batch that gets a graph; larger ones run eagerly.
        mixed_graph_tokens: mixed and prefill steps of up to this many tokens replay graphs too (0: none); default
            the whole budget on several ranks, 1,024 tokens on one (:func:`shiftlib.engine.runner.mixed_graph_tokens`).
        enable_prefix_caching: reuse the cached K/V of full blocks that a request's prefix shares with earlier
            requests (:mod:`shiftlib.engine.prefix_cache`); the tokens are the same either way.
        speculative: ``"suffix"`` drafts tokens from the prompt and earlier responses (SuffixDecoding) and
            verifies them in the step, with the same output as without; ``None`` (default) does not.
        num_speculative_tokens: draft length at most.
        speculative_max_batch: no drafts in steps of more requests (running and waiting).

    Raises:
        ValueError: unknown mode or speculative method, a model that was not parallelized, a non-positive budget.

    Example:
        >>> engine = shiftlib.Engine(model, num_blocks=256)
        >>> rid = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=8))
        >>> while engine.has_unfinished:
        ...     for request_id, token in engine.step():
        ...         print(request_id, token)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_blocks: int | None = None,
        block_size: int = 16,
        max_num_tokens: int = 4096,
        max_prefill_tokens: int = 2048,
        step_overhead_tokens: int | None = None,
        max_num_seqs: int = 256,
        mode: str = "auto",
        threshold: int | None = None,
        memory_fraction: float = 0.9,
        cuda_graphs: bool | None = None,
        max_graph_batch: int = 256,
        mixed_graph_tokens: int | None = None,
        enable_prefix_caching: bool = True,
        speculative: str | None = None,
        num_speculative_tokens: int = 16,
        speculative_max_batch: int = 32,
    ) -> None:
        self.model, self.shift = model, shift_model(model)
        self.mode, self.threshold = check_mode(mode), threshold
        mesh, config = self.shift.mesh, self.shift.config
        rope = getattr(config, "rope_parameters", None) or {}
        self.max_context, self._context_why = config.max_position_embeddings, ""
        if rope.get("rope_type") == "longrope":  # past its original length a step's longest position would pick
            self.max_context = min(self.max_context, rope["original_max_position_embeddings"])  # everyone's factors
            self._context_why = " (LongRoPE switches every request of a step to its long factors past this length)"
        # Dynamic-NTK and LongRoPE compare the positions with a length on the host: not capturable.
        graphs = mesh.device.type == "cuda" and rope.get("rope_type") not in ("dynamic", "longrope") if cuda_graphs is None else cuda_graphs
        mixed = default_mixed_tokens(mesh.world, max_num_tokens, mixed_graph_tokens)
        rows = sum(b for b in GRAPH_BUCKETS if b <= max_graph_batch) + (max_num_seqs if mixed else 0)
        self.cache = kv_cache(model, self.shift, num_blocks, block_size, memory_fraction, max_num_tokens, max_num_seqs,
                              rows if graphs else 0)
        self.scheduler = Scheduler(BlockAllocator(self.cache.num_blocks), block_size, max_num_tokens, max_num_seqs,
                                   max_prefill_tokens, enable_prefix_caching, step_overhead_tokens)
        self.runner = Runner(model, self.shift, self.cache, self.max_context, graphs, max_graph_batch, mixed, max_num_seqs)
        self.stop_ids = eos_ids(model)
        self.speculator = speculator(speculative, num_speculative_tokens, speculative_max_batch)
        self.stats: deque[StepStats] = deque(maxlen=STATS_KEPT)
        self.requests: dict[int, Sequence] = {}
        self._next_id, self._inflight = 0, None
        # A base seed shared by every rank (the largest of one random draw per rank) for unseeded requests.
        self._base_seed = int(mesh.reduce_all(torch.randint(0, 2**40, (1,), device=mesh.device), "max"))
        self.failure = Failure(mesh.world, str(self._base_seed))
        if graphs:
            self.runner.capture(self.pick_mode)

    # -- requests -----------------------------------------------------------------------------------------
    def add_request(self, prompt: list[int] | str, params: SamplingParams | None = None) -> int:
        """Queue a request. Bad input raises here and leaves the engine serving the others.

        Args:
            prompt: token ids, or a string when the model has a tokenizer.
            params: sampling and stopping; defaults to greedy, 16 new tokens.

        Returns:
            The request id, for :meth:`completion` and the pairs :meth:`step` yields.

        Raises:
            ValueError: empty prompt, token ids outside the vocabulary, prompt (plus ``max_new_tokens``)
                longer than the model's context or than the whole KV cache.
        """
        params = params or SamplingParams()
        return self._queue(self._checked(prompt, params), params)

    def _checked(self, prompt: list[int] | str, params: SamplingParams) -> list[int]:
        if isinstance(prompt, str) and getattr(self.model, "tokenizer", None) is None:
            raise ValueError("string prompts need a tokenizer: load with shiftlib.from_pretrained, or pass token ids")
        prompt = self.model.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        vocab = self.shift.config.vocab_size
        if not prompt:
            raise ValueError("empty prompt: a request needs at least one token")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt has token ids outside the vocabulary [0, {vocab})")
        total = len(prompt) + params.max_new_tokens
        if total > self.max_context:
            raise ValueError(
                f"prompt of {len(prompt)} tokens + max_new_tokens={params.max_new_tokens} exceeds the model's "
                f"context of {self.max_context} tokens{self._context_why}: shorten the prompt or lower max_new_tokens"
            )
        if total > self.cache.capacity_tokens:
            raise ValueError(
                f"prompt of {len(prompt)} tokens + max_new_tokens={params.max_new_tokens} exceeds the KV cache "
                f"({self.cache.capacity_tokens} tokens): raise num_blocks or memory_fraction (--num-blocks, --memory-fraction), "
                f"or shorten the request"
            )
        return prompt

    def _queue(self, prompt: list[int], params: SamplingParams) -> int:
        rid, self._next_id = self._next_id, self._next_id + 1
        seed = params.seed if params.seed is not None else self._base_seed + rid
        gen = torch.Generator().manual_seed(seed) if params.temperature > 0 else None  # CPU: draws never sync
        seq = Sequence(rid, prompt, params, gen)
        self.requests[rid] = seq
        self.scheduler.add(seq)
        if params.max_new_tokens == 0:
            self._finish(seq, "length")
        return rid

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason, seq.finish_time = reason, time.perf_counter()
        if self.speculator:
            self.speculator.finish(seq.id, seq.output)
        self.scheduler.finish(seq)

    def abort(self, rid: int) -> None:
        """Stop a request now (its client went away), freeing its cache blocks; finished ones are left as they are."""
        if (seq := self.requests.get(rid)) is not None and seq.status is not Status.FINISHED:
            self._finish(seq, "abort")

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work or self._inflight is not None

    def pick_mode(self, num_tokens: int) -> str:
        return self.shift.pick_mode(num_tokens, self.mode, self.threshold)

    # -- the loop -----------------------------------------------------------------------------------------
    def step(self) -> list[tuple[int, int]]:
        """Launch one step in the mode its token count picks, then read the tokens of the step before, which ran
        while this one was prepared (:mod:`shiftlib.engine.inflight`); in a step with drafts, this step's own.

        Returns:
            The ``(request id, token)`` pairs read (none for prefill chunks alone, for the first step, or with
            nothing queued). Step while :attr:`has_unfinished` to get them all.

        Raises:
            RuntimeError: a step failed before, on this rank or another (see :mod:`shiftlib.engine.failure`).
        """
        self.failure.check(store=self.shift.mesh.device.type != "cuda")
        try:
            return self._step()
        except BaseException as exc:  # this rank is now out of step: stop here and on every peer
            self.failure.record(exc)
            raise

    def _step(self) -> list[tuple[int, int]]:
        start, events, spec = time.perf_counter(), [], self.speculator
        drafting = spec is not None and spec.wants(self.scheduler, self._inflight is not None)
        if drafting and self._inflight:  # drafts need every token so far: read the step in flight first
            events, self._inflight, start = self._resolve(self._inflight, start), None, time.perf_counter()
        drafting = drafting and spec.draft(self.scheduler.running, self.max_context, self.runner.graph_rows)
        plan = self.scheduler.schedule(self.pick_mode)
        launched = self._launch(plan) if plan.work else None
        # A step with drafts is read at once; any other stays in flight while the next one is prepared.
        done, self._inflight = (launched, None) if drafting else (self._inflight, launched)
        return events + self._resolve(done, start) if done else events

    def _launch(self, plan: StepPlan) -> InFlight:
        logits, rows = self.runner.run(plan, self._inflight and self._inflight.tokens)  # k + 1 rows for k drafts
        tokens = sample(ban_stops(logits, rows, self.stop_ids), [s.params for s in rows], [s.generator for s in rows])
        self.scheduler.advance(plan)
        return InFlight(plan, rows, tokens, Logprobs(logits, rows, tokens))

    def _resolve(self, step: InFlight, start: float) -> list[tuple[int, int]]:
        (tokens, logprobs), plan, events = step.result(self.failure), step.plan, []
        now, (verified, drafted, accepted) = time.perf_counter(), verify(step.rows, tokens, self.scheduler)
        for seq, row, new in verified:
            seq.inflight -= 1
            if seq.status is Status.FINISHED:  # it stopped, or was aborted, while this step ran: drop the token
                continue
            for count, token in enumerate(new, 1):  # a stop inside accepted draft tokens ends the request there
                seq.output.append(token)
                seq.first_token_time = seq.first_token_time or now
                events.append((seq.id, token))
                stop = token in seq.params.stop_token_ids or (not seq.params.ignore_eos and token in self.stop_ids)
                if stop or len(seq.output) >= seq.params.max_new_tokens:
                    self._finish(seq, "stop" if stop else "length")
                    break
            if seq.params.logprobs is not None:
                step.logprobs.record(seq, row, count, logprobs)
        self.scheduler.offer(*(seq for seq, _ in plan.work))
        stats = (plan.mode, plan.num_tokens, len(plan.work), len(verified), plan.preempted, now - start)
        self.stats.append(StepStats(*stats, drafted, accepted))
        return events

    def stream(self) -> Iterator[tuple[int, int]]:
        """Step until every queued request is finished, yielding ``(request id, token)`` as they are produced.

        Example:
            >>> for rid, token in engine.stream():
            ...     print(rid, token)
        """
        while self.has_unfinished:
            yield from self.step()

    def completion(self, rid: int) -> Completion:
        """The tokens and latencies of a finished request, handed over once: the engine then forgets it.

        Raises:
            ValueError: the request is unknown, already handed over, or still queued or running.
        """
        seq = self.requests.get(rid)
        if seq is None:
            raise ValueError(f"request {rid} is unknown or its completion was already handed over")
        if seq.status is not Status.FINISHED:
            raise ValueError(f"request {rid} is not finished")
        del self.requests[rid]
        first = seq.first_token_time or seq.finish_time
        return Completion(rid, seq.prompt, list(seq.output), seq.finish_reason, first - seq.arrival, seq.finish_time - seq.arrival)

    def generate(self, prompts: Iterable[list[int] | str], params: SamplingParams | Seq[SamplingParams] | None = None) -> list[list[int]]:
        """Run ``prompts`` to completion (continuous batching) and return each one's new tokens, in order.

        Args:
            prompts: token-id lists, or strings when the model has a tokenizer.
            params: one :class:`SamplingParams` for all prompts, or one per prompt.

        Returns:
            The new tokens of each prompt (the prompt excluded).

        Raises:
            ValueError: as :meth:`add_request`, before any of the prompts is queued.
        """
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams: give one, or one per prompt")
        checked = [self._checked(p, sp) for p, sp in zip(prompts, params)]
        ids = [self._queue(p, sp) for p, sp in zip(checked, params)]
        deque(self.stream(), maxlen=0)  # run to the end
        return [self.requests.pop(i).output for i in ids]
