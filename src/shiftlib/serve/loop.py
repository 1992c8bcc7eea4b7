"""The serving loop: every rank steps the engine in lockstep, and rank 0 talks to the HTTP process.

Each iteration, on every rank: rank 0 gathers what the HTTP process sent since the last step (new requests,
cancellations) and broadcasts it (:mod:`shiftlib.serve.sync`); every rank adds and aborts the same requests and
runs the same step. Rank 0 then sends the step's tokens to the HTTP process in one message. The HTTP side
(tokenizing, detokenizing, JSON, sockets) runs in its own process, so it never holds the engine's interpreter
lock: at high concurrency that work is as large as the step's own host work.

Shutdown: SIGINT or SIGTERM on rank 0 starts draining (the HTTP process answers new requests and ``/health``
with 503), requests in flight finish for up to ``shutdown_timeout`` seconds and are then aborted, and rank 0
broadcasts the order to stop. The other ranks ignore those signals (torchrun sends them to every rank) and stop
on rank 0's order, so all ranks leave the loop at the same step.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import signal
import socket
import sys
import time
from collections import deque
from typing import NamedTuple

from shiftlib.engine import Engine
from shiftlib.engine.engine import StepStats
from shiftlib.engine.sequence import Status
from shiftlib.serve.frontend import FrontendConfig, run_frontend
from shiftlib.serve.protocol import Limits
from shiftlib.serve.sync import StepMessage, StepSync

TICK_S = 1.0  # longest idle wait between two broadcasts (the heartbeat that finds a dead rank)
STARTUP_TIMEOUT_S = 120.0


class StepInfo(NamedTuple):
    """What rank 0 tells the HTTP process about one step, for the metrics."""

    mode: str
    num_tokens: int
    preempted: int
    seconds: float
    synced: bool
    sync_seconds: float
    running: int
    waiting: int
    kv_usage: float
    drafted: int = 0  # speculative decoding: draft tokens verified in the step, and those accepted
    accepted: int = 0
    prefill: bool = False  # ran_prefill


def ran_prefill(stats: StepStats) -> bool:
    """The step ran prompt tokens (more than one token and its draft per request), so it ran without a graph."""
    return stats.num_tokens > stats.num_seqs + stats.drafted


class FrontendPipe:
    """Rank 0's end of the pipe to the HTTP process (see :mod:`shiftlib.serve.frontend` for the messages)."""

    def __init__(self, config: FrontendConfig, shutdown_timeout: float) -> None:
        ctx = mp.get_context("spawn")  # a fresh interpreter: no CUDA state, no torch threads inherited
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=run_frontend, args=(child, config), name="shiftlib-http", daemon=True)
        self.process.start()
        child.close()
        self.shutdown_timeout = shutdown_timeout
        self.signals, self.deadline, self.drained = 0, None, False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)

    def wait_listening(self) -> str | None:
        """The HTTP process's first word: ``None`` once it listens, else why it cannot."""
        if not self.conn.poll(STARTUP_TIMEOUT_S):
            return f"the HTTP process did not start within {STARTUP_TIMEOUT_S:.0f} s"
        kind, detail = self._recv()
        self.url = detail
        return None if kind == "listening" else detail

    def start(self, limits: Limits, threshold: int, mode: str) -> None:
        """Open the HTTP side (it answers ``serving`` once requests are taken) and take over SIGINT and SIGTERM."""
        self.conn.send(("ready", limits, threshold, mode))
        self._recv()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        signal.set_wakeup_fd(self._wake_w.fileno())

    def _on_signal(self, signum, frame) -> None:
        self.signals += 1

    def _recv(self):
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            raise RuntimeError(f"the HTTP process exited (exit code {self.process.exitcode}): the server cannot go on "
                               f"without it; its error is above") from None

    def collect(self, idle: bool, live) -> StepMessage | None:
        """The next step's message: what arrived, what was cancelled, and whether to stop (``None``: nothing).

        Blocks up to :data:`TICK_S` when the engine is idle, waking at once for a request or a signal.
        """
        if idle:
            wait = TICK_S if self.deadline is None else max(0.0, min(TICK_S, self.deadline - time.monotonic()))
            ready = multiprocessing.connection.wait([self.conn, self._wake_r], wait)
            if self._wake_r in ready:
                self._wake_r.recv(4096)
        message = StepMessage()
        while self.conn.poll():
            kind, *body = self._recv()
            if kind == "add":
                message.arrivals += body[0]
            elif kind == "abort":
                message.aborts += body[0]
            elif kind == "drained":
                self.drained = True
        if self.signals:
            self._drain(idle and not message.arrivals, live, message)
        return message if message.arrivals or message.aborts or message.shutdown else None

    def _drain(self, idle: bool, live, message: StepMessage) -> None:
        now = time.monotonic()
        if self.deadline is None:
            self.deadline = now + self.shutdown_timeout
            self.conn.send(("drain",))
            print(f"shiftlib serve: stopping; requests in flight get {self.shutdown_timeout:g} s to finish",
                  file=sys.stderr, flush=True)
        if self.signals > 1:  # asked twice: stop now
            self.deadline = now
        if now >= self.deadline and (live or message.arrivals):
            uids = list(live) + [a.uid for a in message.arrivals]
            message.aborts, message.arrivals = list(live), []
            self.conn.send(("aborted", uids, "the server shut down before this request finished"))
        message.shutdown = self.drained and (idle and not live or now >= self.deadline)

    def publish(self, outputs: list, started: list, rejected: list, infos: list[StepInfo]) -> None:
        self.conn.send(("step", outputs, started, rejected, infos))

    def fail(self, reason: str) -> None:
        """Tell the HTTP process the engine is gone (``/health`` turns 503, requests in flight get an error)."""
        try:
            self.conn.send(("failed", reason))
        except OSError:
            pass

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        try:
            self.conn.send(("stop",))
        except OSError:
            pass
        self.process.join(timeout=15)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)
        self._wake_r.close()
        self._wake_w.close()


class Lockstep:
    """The loop every rank runs; ``frontend`` is set on rank 0 only."""

    def __init__(self, engine: Engine, sync: StepSync, frontend: FrontendPipe | None) -> None:
        self.engine, self.sync, self.frontend = engine, sync, frontend
        self.rid_of: dict[int, int] = {}  # server uid -> engine request id, the same on every rank
        self.uid_of: dict[int, int] = {}
        self.unstarted: deque[int] = deque()  # engine ids not yet scheduled, in arrival order (rank 0)
        self.rejected: list = []

    def run(self) -> None:
        engine = self.engine
        while True:
            message = self.frontend.collect(not engine.has_unfinished, self.rid_of) if self.frontend else None
            before = self.sync.seconds
            message = self.sync.exchange(message)
            sync_s = self.sync.seconds - before
            if message is not None:
                self._apply(message)
                if message.shutdown:
                    return
            if engine.has_unfinished or message is not None or self.rejected:  # aborts change the gauges too
                start = time.monotonic()
                events = engine.step() if engine.has_unfinished else []
                self._after_step(events, start, message is not None, sync_s)

    def _apply(self, message: StepMessage) -> None:
        for arrival in message.arrivals:
            try:
                rid = self.engine.add_request(arrival.prompt, arrival.params)
            except ValueError as e:  # the HTTP process checks first; identical on every rank if it slips through
                self.rejected.append((arrival.uid, str(e)))
                continue
            self.rid_of[arrival.uid], self.uid_of[rid] = rid, arrival.uid
            if self.frontend is not None:
                self.unstarted.append(rid)
        for uid in message.aborts:
            rid = self.rid_of.pop(uid, None)
            if rid is not None:
                self.engine.abort(rid)
                del self.uid_of[rid]
                self.engine.requests.pop(rid)

    def _after_step(self, events: list[tuple[int, int]], start: float, synced: bool, sync_s: float) -> None:
        engine, requests = self.engine, self.engine.requests
        # Two when a step with drafts first read the one in flight; none when no step ran (the gauges still change).
        steps = list(engine.stats) or [StepStats("tp", 0, 0, 0, 0, 0.0)]
        engine.stats.clear()  # a server runs for days: keep no per-step history
        new: dict[int, list[int]] = {}
        for rid, token in events:
            new.setdefault(rid, []).append(token)
        started = self._started(start) if self.frontend is not None else []
        outputs = []
        for rid, tokens in new.items():
            seq = requests[rid]
            finished = seq.status is Status.FINISHED
            if self.frontend is not None:
                # logprobs[i] is output[i]'s
                logprobs = seq.logprobs[-len(tokens):] if seq.params.logprobs is not None else None
                outputs.append((self.uid_of[rid], tokens, logprobs, seq.finish_reason if finished else None))
            if finished:
                del requests[rid], self.rid_of[self.uid_of.pop(rid)]
        if self.frontend is not None:
            sched, alloc = engine.scheduler, engine.scheduler.allocator
            gauges = (len(sched.running), len(sched.waiting), 1 - alloc.num_free / alloc.num_blocks)
            infos = [StepInfo(s.mode, s.num_tokens, s.preempted, s.seconds, synced and i == 0, sync_s, *gauges,
                              s.drafted, s.accepted, ran_prefill(s)) for i, s in enumerate(steps)]  # fmt: skip
            self.frontend.publish(outputs, started, self.rejected, infos)
            self.rejected = []

    def _started(self, start: float) -> list[tuple[int, float, int]]:
        """``(uid, step start, prompt length)`` of the requests this step scheduled for the first time. The
        scheduler admits waiting requests in arrival order, so they are a prefix of :attr:`unstarted`."""
        started, requests = [], self.engine.requests
        while self.unstarted:
            seq = requests.get(self.unstarted[0])
            if seq is not None and seq.status is Status.WAITING:
                break
            self.unstarted.popleft()
            if seq is not None:
                started.append((self.uid_of[seq.id], start, len(seq.prompt)))
        return started
