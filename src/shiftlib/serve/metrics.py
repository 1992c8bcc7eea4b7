"""The server's Prometheus metrics: vLLM's meanings under the ``shiftlib:`` prefix, plus the two modes.

Latencies are measured in the HTTP process, from the moment a request's body is read to the moment its tokens
reach it; engine figures (steps, modes, cache, queue) come from rank 0 with every step. What no other server
shows: ``shiftlib:steps_total{mode}`` and ``shiftlib:step_tokens_total{mode}`` count the steps and tokens that
ran in TP mode and in SP mode, and ``shiftlib:mode_threshold_tokens`` is the switch point (a step of at most
that many tokens runs in TP mode), so a dashboard shows which mode the traffic keeps the server in.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0)
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
SYNC_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2)
MODES = ("tp", "sp")


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # CPU seconds and memory of the HTTP process
        labels = dict(labelnames=["model_name"], registry=r)
        self.ttft = Histogram("shiftlib:time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS,
                              **labels).labels(model_name)
        self.itl = Histogram("shiftlib:inter_token_latency_seconds", "Time between tokens of a request",
                             buckets=LATENCY_BUCKETS, **labels).labels(model_name)
        self.e2e = Histogram("shiftlib:e2e_request_latency_seconds", "Request latency, arrival to last token",
                             buckets=LATENCY_BUCKETS, **labels).labels(model_name)
        self.queue = Histogram("shiftlib:request_queue_time_seconds", "Arrival to first scheduled step",
                               buckets=LATENCY_BUCKETS, **labels).labels(model_name)
        self.running = Gauge("shiftlib:num_requests_running", "Requests in the engine's running batch",
                             **labels).labels(model_name)
        self.waiting = Gauge("shiftlib:num_requests_waiting", "Requests queued for the engine",
                             **labels).labels(model_name)
        self.kv_usage = Gauge("shiftlib:kv_cache_usage_perc", "Share of KV-cache blocks in use (1 = full)",
                              **labels).labels(model_name)
        self.prompt_tokens = Counter("shiftlib:prompt_tokens", "Prompt tokens of requests that started",
                                     **labels).labels(model_name)
        self.generation_tokens = Counter("shiftlib:generation_tokens", "Tokens generated", **labels).labels(model_name)
        self.preemptions = Counter("shiftlib:num_preemptions", "Requests preempted for cache room",
                                   **labels).labels(model_name)
        self.finished = Counter("shiftlib:request_success", "Requests finished, by reason",
                                ["model_name", "finished_reason"], registry=r)
        self.model_name = model_name
        mode = dict(labelnames=["model_name", "mode"], registry=r)
        steps = Counter("shiftlib:steps", "Engine steps, by the mode they ran in", **mode)
        tokens = Counter("shiftlib:step_tokens", "Tokens scheduled (prefill chunks + decodes), by mode", **mode)
        seconds = Histogram("shiftlib:step_seconds", "Wall time of one engine step, by mode", buckets=STEP_BUCKETS,
                            **mode)
        prefill = Counter("shiftlib:prefill_steps", "Engine steps that ran prompt tokens, alone or beside decodes, by "
                          "mode (steps of decodes alone replay CUDA graphs; these run eagerly)", **mode)
        self.steps = {m: steps.labels(model_name, m) for m in MODES}
        self.prefill_steps = {m: prefill.labels(model_name, m) for m in MODES}
        self.step_tokens = {m: tokens.labels(model_name, m) for m in MODES}
        self.step_seconds = {m: seconds.labels(model_name, m) for m in MODES}
        self.sync = Histogram("shiftlib:request_sync_seconds", "Rank 0's per-step broadcast of new and cancelled "
                              "requests to the other ranks", buckets=SYNC_BUCKETS, **labels).labels(model_name)
        self.threshold = Gauge("shiftlib:mode_threshold_tokens", "Steps of at most this many tokens run in TP mode "
                               "(mode auto)", **labels).labels(model_name)
        self.drafted = Counter("shiftlib:spec_decode_num_draft_tokens", "Speculated tokens verified",
                               **labels).labels(model_name)
        self.accepted = Counter("shiftlib:spec_decode_num_accepted_tokens", "Speculated tokens accepted (the "
                                "acceptance rate is their ratio to the drafted ones)", **labels).labels(model_name)
        self.forced = Gauge("shiftlib:mode_forced", "1 for the mode every step is forced into (--mode tp or sp)",
                            **mode)

    def configure(self, threshold: int, mode: str) -> None:
        self.threshold.set(threshold)
        for m in MODES:
            self.forced.labels(self.model_name, m).set(1 if mode == m else 0)

    def step(self, info) -> None:
        """One engine step as rank 0 reported it (a :class:`shiftlib.serve.loop.StepInfo`)."""
        if info.num_tokens:
            self.steps[info.mode].inc()
            if info.prefill:
                self.prefill_steps[info.mode].inc()
            self.step_tokens[info.mode].inc(info.num_tokens)
            self.step_seconds[info.mode].observe(info.seconds)
        if info.preempted:
            self.preemptions.inc(info.preempted)
        if info.drafted:
            self.drafted.inc(info.drafted)
            self.accepted.inc(info.accepted)
        if info.synced:
            self.sync.observe(info.sync_seconds)
        self.running.set(info.running)
        self.waiting.set(info.waiting)
        self.kv_usage.set(info.kv_usage)

    def finish(self, reason: str, latency_s: float) -> None:
        self.finished.labels(self.model_name, reason).inc()
        self.e2e.observe(latency_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
