"""What a load measured: per-request times in, percentiles and throughputs out.

Times are benchmark seconds from the start of the load. TTFT runs from a request's arrival (not from when a
busy engine got round to it) to the end of the step that sampled its first token; TPOT is the mean gap between
its later tokens; latency runs from arrival to its last token.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass


@dataclass
class RequestRecord:
    arrival_s: float
    prompt_len: int
    output_len: int = 0
    first_token_s: float | None = None
    finish_s: float | None = None

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        if self.output_len < 2:
            return None
        return (self.finish_s - self.first_token_s) / (self.output_len - 1)

    @property
    def latency_s(self) -> float:
        return self.finish_s - self.arrival_s


@dataclass(frozen=True)
class StepRecord:
    """One engine step as the benchmark saw it: when it ended (benchmark seconds) and what it ran."""

    end_s: float
    mode: str
    num_tokens: int
    num_seqs: int
    seconds: float
    preempted: int
    drafted: int = 0
    accepted: int = 0


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile ``q`` in [0, 100]; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 4)


def summarize(requests: list[RequestRecord], steps: list[StepRecord], duration_s: float) -> dict:
    """The metrics of one load. ``duration_s``: from the load's start to its last token (longest rank for DP)."""
    done = [r for r in requests if r.finish_s is not None]
    if len(done) != len(requests):
        raise RuntimeError(
            f"{len(requests) - len(done)} of {len(requests)} requests did not finish: the driver stopped early"
        )
    out: dict = {"num_requests": len(done), "duration_s": round(duration_s, 6)}
    series = {
        "ttft_ms": [r.ttft_s for r in done],
        "tpot_ms": [t for r in done if (t := r.tpot_s) is not None],
        "latency_ms": [r.latency_s for r in done],
    }
    for name, xs in series.items():
        for q in (50, 90, 99):
            out[f"{name}_p{q}"] = _ms(percentile(xs, q))
        out[f"{name}_mean"] = _ms(sum(xs) / len(xs)) if xs else None
    out_tokens = sum(r.output_len for r in done)
    in_tokens = sum(r.prompt_len for r in done)
    rate = (lambda n: round(n / duration_s, 3)) if duration_s > 0 else (lambda n: None)
    out.update(
        output_tokens=out_tokens,
        input_tokens=in_tokens,
        output_tok_per_s=rate(out_tokens),
        total_tok_per_s=rate(out_tokens + in_tokens),
        requests_per_s=rate(len(done)),
    )
    # Little's law: the mean number of requests in the system over the load.
    out["mean_in_flight"] = round(sum(r.latency_s for r in done) / duration_s, 3) if duration_s > 0 else None
    modes = Counter(s.mode for s in steps)
    out["num_steps"] = len(steps)
    out["steps_per_mode"] = dict(sorted(modes.items()))
    out["tokens_per_mode"] = {m: sum(s.num_tokens for s in steps if s.mode == m) for m in sorted(modes)}
    out["step_ms_p50_per_mode"] = {
        m: _ms(percentile([s.seconds for s in steps if s.mode == m], 50)) for m in sorted(modes)
    }
    out["preempted"] = sum(s.preempted for s in steps)
    if any(s.drafted for s in steps):  # speculative decoding
        out.update(drafted=sum(s.drafted for s in steps), accepted=sum(s.accepted for s in steps))
    return out
