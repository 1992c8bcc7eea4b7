"""The loads a benchmark puts on an engine: closed-loop concurrency, Poisson arrivals, a bursty trace, long prompts.

A load is a list of requests plus how they arrive. Everything is drawn from a seed, so every rank builds the
same requests; arrival *times* are in benchmark seconds and the driver admits a request once the clock (rank 0's,
shared with every rank) has passed it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RequestSpec:
    prompt: list[int]
    output_len: int
    arrival_s: float = 0.0  # open loop: when it arrives; closed loop: ignored (it arrives when a slot frees)


@dataclass(frozen=True)
class Load:
    """One point of a curve: a set of requests and the rule that admits them.

    ``concurrency`` set: closed loop, that many requests in flight, a new one added as soon as one finishes.
    ``concurrency`` None: open loop, each request arrives at its ``arrival_s``.
    """

    workload: str  # "concurrency", "poisson", "bursty" or "long-prompt"
    requests: list[RequestSpec]
    concurrency: int | None = None
    rate: float | None = None  # mean arrivals per second of an open-loop load
    params: dict = field(default_factory=dict)  # what made it, for the record

    @property
    def label(self) -> str:
        if self.workload == "concurrency":
            return f"c={self.concurrency}"
        if self.workload == "poisson":
            return f"rate={self.rate:g}/s"
        if self.workload == "long-prompt":
            return f"prompt={self.params['prompt_len']}"
        return self.workload

    @property
    def max_context(self) -> int:
        return max(len(r.prompt) + r.output_len for r in self.requests)

    @property
    def peak_in_flight(self) -> int:
        return self.concurrency or len(self.requests)


def _prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(length)]


def warm_up(load: Load, n: int, vocab: int) -> Load:
    """``n`` requests in flight with the lengths of ``load``'s first ``n`` prompts and two new tokens each: the
    kernels and graphs of its shapes are made before it is timed. The tokens are new, since ``load``'s own
    prompts would then be prefix-cache hits."""
    rng = random.Random("warm-up")
    return Load("concurrency", [RequestSpec(_prompt(rng, len(r.prompt), vocab), 2) for r in load.requests[:n]],
                concurrency=n)


def concurrency_sweep(
    levels: list[int], input_len: int, output_len: int, vocab: int, waves: int = 2, seed: int = 0
) -> list[Load]:
    """Closed loop: ``c`` requests in flight, ``waves * c`` in all, so each level reaches a steady state."""
    if waves < 1:
        raise ValueError(f"waves must be >= 1, got {waves}")
    loads = []
    for c in levels:
        if c < 1:
            raise ValueError(f"concurrency levels must be >= 1, got {c}")
        rng = random.Random(f"{seed}-c{c}")
        requests = [RequestSpec(_prompt(rng, input_len, vocab), output_len) for _ in range(waves * c)]
        loads.append(
            Load("concurrency", requests, concurrency=c, params=dict(input_len=input_len, output_len=output_len))
        )
    return loads


def poisson(
    rates: list[float], num_requests: int, input_len: int, output_len: int, vocab: int, seed: int = 0
) -> list[Load]:
    """Open loop: exponential gaps between arrivals at ``rate`` requests per second."""
    loads = []
    for rate in rates:
        if rate <= 0:
            raise ValueError(f"Poisson rates must be > 0 requests/s, got {rate}")
        rng = random.Random(f"{seed}-r{rate}")
        t, requests = 0.0, []
        for _ in range(num_requests):
            requests.append(RequestSpec(_prompt(rng, input_len, vocab), output_len, t))
            t += rng.expovariate(rate)
        loads.append(Load("poisson", requests, rate=rate, params=dict(input_len=input_len, output_len=output_len)))
    return loads


def bursty(
    seconds: float,
    input_len: int,
    output_len: int,
    vocab: int,
    quiet_rate: float = 1.0,
    burst_rate: float = 32.0,
    bursts: int = 4,
    seed: int = 0,
) -> Load:
    """Quiet stretches with bursts, like the production traces of the Shift Parallelism paper (seed 001).

    The trace is cut into ``bursts`` equal periods; each holds one burst a fifth of the period long, at a random
    point, where requests arrive at ``burst_rate`` per second; elsewhere they arrive at ``quiet_rate``. Prompt
    and output lengths vary between half and one and a half times the given ones, so steps mix long prefills
    with short decodes.
    """
    if seconds <= 0 or quiet_rate <= 0 or burst_rate <= 0 or bursts < 1:
        raise ValueError(
            f"bursty trace needs seconds > 0, rates > 0 and bursts >= 1, got seconds={seconds}, "
            f"quiet_rate={quiet_rate}, burst_rate={burst_rate}, bursts={bursts}"
        )
    rng = random.Random(f"{seed}-bursty")
    period = seconds / bursts
    burst_s = period / 5
    starts = [k * period + rng.uniform(0, period - burst_s) for k in range(bursts)]
    peak = max(burst_rate, quiet_rate)

    def rate_at(t: float) -> float:
        return burst_rate if any(b <= t < b + burst_s for b in starts) else quiet_rate

    # Thinning: draw at the peak rate, keep each arrival with probability rate(t) / peak.
    t, requests = 0.0, []
    while True:
        t += rng.expovariate(peak)
        if t >= seconds:
            break
        if rng.random() < rate_at(t) / peak:
            n_in = max(1, round(input_len * rng.uniform(0.5, 1.5)))
            n_out = max(1, round(output_len * rng.uniform(0.5, 1.5)))
            requests.append(RequestSpec(_prompt(rng, n_in, vocab), n_out, t))
    if not requests:
        raise ValueError(f"the bursty trace of {seconds} s drew no request: lengthen it or raise the rates")
    params = dict(
        input_len=input_len,
        output_len=output_len,
        seconds=seconds,
        quiet_rate=quiet_rate,
        burst_rate=burst_rate,
        burst_s=burst_s,
        bursts_s=[round(b, 4) for b in starts],
    )
    return Load("bursty", requests, rate=len(requests) / seconds, params=params)


def long_prompts(lengths: list[int], output_len: int, vocab: int, repeats: int = 1, seed: int = 0) -> list[Load]:
    """One request at a time with a long prompt: time to first token of a 2k-32k prefill."""
    loads = []
    for n in lengths:
        if n < 1:
            raise ValueError(f"long-prompt lengths must be >= 1 token, got {n}")
        rng = random.Random(f"{seed}-p{n}")
        requests = [RequestSpec(_prompt(rng, n, vocab), output_len) for _ in range(repeats)]
        loads.append(
            Load("long-prompt", requests, concurrency=1, params=dict(prompt_len=n, input_len=n, output_len=output_len))
        )
    return loads
