"""Drive an engine through a load in engine-step time, the same way on every rank.

The ranks of one engine must add the same requests before the same step, or their schedulers (and collectives)
part ways. Closed loops need nothing extra: a request is added when another finishes, and every rank sees the
same finishes. Open loops admit requests by time, and clocks differ between ranks, so before each step rank 0's
clock is broadcast and every rank admits by that one value. When the engine is idle the clock jumps to the next
arrival instead of sleeping: no device time is spent waiting, and the jump is the same on every rank.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import torch
import torch.distributed as dist

from shiftlib.bench.metrics import RequestRecord, StepRecord
from shiftlib.bench.workloads import Load
from shiftlib.engine import Engine, SamplingParams


class Clock:
    """Benchmark seconds since :meth:`start`, plus the idle time skipped.

    ``group`` set: :meth:`shared` returns the clock of the group's first rank on every member (one broadcast of
    a float64). ``group`` None: this rank's own clock (a DP replica, or one rank).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu") -> None:
        self.group, self.device = group, torch.device(device)
        self.src = None if group is None else dist.get_global_rank(group, 0)
        self.start()

    def start(self) -> None:
        self._t0, self._skipped = time.perf_counter(), 0.0

    def local(self) -> float:
        return time.perf_counter() - self._t0 + self._skipped

    def shared(self) -> float:
        if self.group is None or dist.get_world_size(self.group) == 1:
            return self.local()
        t = torch.tensor([self.local()], dtype=torch.float64, device=self.device)
        dist.broadcast(t, self.src, group=self.group)
        return float(t.item())

    def skip_to(self, t: float) -> None:
        """Idle until ``t``, instantly."""
        self._skipped += max(0.0, t - self.local())


def drive(
    engine: Engine, load: Load, clock: Clock, on_finish: Callable[[], None] = lambda: None
) -> tuple[list[RequestRecord], list[StepRecord]]:
    """Run ``load`` to completion on ``engine``; return what each request and each step did.

    Requests are greedy with ``ignore_eos`` so every run produces exactly the asked-for number of tokens.
    ``on_finish`` is called once per finished request (the progress bar).
    """
    pending = deque(load.requests)
    records: dict[int, RequestRecord] = {}
    wanted: dict[int, int] = {}
    steps: list[StepRecord] = []
    in_flight = 0
    clock.start()

    def admit(spec, now: float) -> None:
        nonlocal in_flight
        rid = engine.add_request(spec.prompt, SamplingParams(max_new_tokens=spec.output_len, ignore_eos=True))
        records[rid] = RequestRecord(spec.arrival_s if load.concurrency is None else now, len(spec.prompt))
        wanted[rid] = spec.output_len
        in_flight += 1

    while pending or in_flight:
        if load.concurrency is not None:  # closed loop: top up to the concurrency
            now = clock.local()
            while pending and in_flight < load.concurrency:
                admit(pending.popleft(), now)
        else:  # open loop: admit what has arrived by rank 0's clock
            now = clock.shared()
            while pending and pending[0].arrival_s <= now:
                admit(pending.popleft(), now)
            if not in_flight:
                clock.skip_to(pending[0].arrival_s)
                continue
        before = engine.stats[-1] if engine.stats else None
        events = engine.step()
        t = clock.local()
        if engine.stats and engine.stats[-1] is not before:
            s = engine.stats[-1]
            steps.append(StepRecord(t, s.mode, s.num_tokens, s.num_seqs, s.seconds, s.preempted, s.drafted, s.accepted))
        for rid, _ in events:
            r = records[rid]
            r.output_len += 1
            r.first_token_s = r.first_token_s if r.first_token_s is not None else t
            if r.output_len == wanted[rid]:
                engine.completion(rid)  # raises if the engine disagrees that it is finished; then forgets it
                r.finish_s = t
                in_flight -= 1
                on_finish()
    return list(records.values()), steps
