"""The HTTP process: rank 0 starts it, it serves the API, and a pipe carries requests and tokens between them.

It never touches the model or a process group; it owns the socket, the tokenizer (prompts in, text out), the
stop strings and the metrics. Messages on the pipe, as tuples:

- to rank 0: ``("listening", url)`` or ``("error", why)`` once, ``("serving",)`` in answer to ``ready``; then
  ``("add", [Arrival])``, ``("abort", [uid])``, and ``("drained",)`` in answer to ``drain``;
- from rank 0: ``("ready", Limits, threshold, mode)`` when the engine is built; ``("step", outputs, started,
  rejected, [StepInfo])`` after each engine call (a StepInfo per step it read), ``outputs`` as ``(uid, tokens,
  logprobs or None, finish reason or None)``; ``("aborted", [uid], why)``; ``("drain",)`` on SIGINT/SIGTERM;
  ``("failed", why)`` when the engine broke; ``("stop",)`` at the end.

It ignores SIGINT and SIGTERM itself: rank 0 decides when the server stops, and when rank 0 is gone (the pipe
closes) this process stops too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import threading
from array import array
from dataclasses import dataclass
from pathlib import Path

from shiftlib.serve.sync import Arrival

BACKLOG = 4096  # connections a burst of clients may open before they are accepted


@dataclass(frozen=True)
class FrontendConfig:
    host: str
    port: int
    model_dir: str
    model_name: str
    max_waiting: int


@dataclass
class Output:
    """What one choice of a request got from one step; ``error`` set instead when it never will finish."""

    index: int
    tokens: list[int]
    logprobs: list | None = None
    finish: str | None = None
    error: str | None = None
    status: int = 500


class EngineLink:
    """This process's end of the pipe: submits requests, routes each step's tokens to the requests' queues."""

    def __init__(self, conn, metrics) -> None:
        self.conn, self.metrics = conn, metrics
        self.state = "loading"  # -> serving -> draining, or failed
        self.limits = None
        self.routes: dict[int, tuple[asyncio.Queue, int, float]] = {}  # uid -> (request's queue, choice, arrival)
        self.waiting: set[int] = set()
        self._next_uid = 0
        self.server = None
        self.exit_code = 0

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start reading the pipe; each message is handled on ``loop``."""
        def read() -> None:
            while True:
                try:
                    message = self.conn.recv()
                except (EOFError, OSError):
                    loop.call_soon_threadsafe(self._gone)
                    return
                loop.call_soon_threadsafe(self._handle, message)

        threading.Thread(target=read, name="shiftlib-pipe", daemon=True).start()

    def submit(self, prompts: list[list[int]], params: list, queue: asyncio.Queue, arrival: float) -> list[int]:
        uids = list(range(self._next_uid, self._next_uid + len(params)))
        self._next_uid += len(params)
        for i, uid in enumerate(uids):
            self.routes[uid] = (queue, i, arrival)
        self.waiting.update(uids)
        arrivals = [Arrival(uid, array("i", prompt), p) for uid, prompt, p in zip(uids, prompts, params)]
        self.conn.send(("add", arrivals))
        return uids

    def abort(self, uids: list[int]) -> None:
        uids = [u for u in uids if self.routes.pop(u, None) is not None]
        self.waiting.difference_update(uids)
        if uids and self.state != "failed":
            self.conn.send(("abort", uids))

    def _handle(self, message: tuple) -> None:
        kind, *body = message
        if kind == "step":
            outputs, started, rejected, infos = body
            for uid, tokens, logprobs, finish in outputs:
                route = self.routes.get(uid) if finish is None else self.routes.pop(uid, None)
                if route is not None:
                    route[0].put_nowait(Output(route[1], tokens, logprobs, finish))
                if finish is not None:
                    self.waiting.discard(uid)
            for uid, at, prompt_len in started:
                self.waiting.discard(uid)
                if (route := self.routes.get(uid)) is not None:
                    self.metrics.queue.observe(max(at - route[2], 0.0))
                self.metrics.prompt_tokens.inc(prompt_len)
            for uid, why in rejected:
                self._error([uid], why, 400)
            for info in infos:
                self.metrics.step(info)
        elif kind == "aborted":
            self._error(body[0], body[1], 503)
        elif kind == "ready":
            self.limits, threshold, mode = body
            self.metrics.configure(threshold, mode)
            self.state = "serving"
            self.conn.send(("serving",))
        elif kind == "drain":
            self.state = "draining"
            self.conn.send(("drained",))
        elif kind == "failed":
            self._fail(body[0])
        elif kind == "stop":
            self.server.should_exit = True

    def _error(self, uids: list[int], why: str, status: int) -> None:
        for uid in uids:
            self.waiting.discard(uid)
            if (route := self.routes.pop(uid, None)) is not None:
                route[0].put_nowait(Output(route[1], [], error=why, status=status))

    def _fail(self, why: str) -> None:
        self.state = "failed"
        self._error(list(self.routes), why, 500)

    def _gone(self) -> None:
        """Rank 0 closed the pipe: after ``stop`` that is the end; before it, rank 0 exited or died."""
        if not self.server.should_exit:
            self._fail("the engine stopped (rank 0 exited)")
            self.exit_code = 1
            self.server.should_exit = True


def run_frontend(conn, config: FrontendConfig) -> None:
    """The HTTP process's main function (``multiprocessing`` target)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets, and without it a response's
    # second write waits out the client's delayed ACK (40 ms on Linux).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((config.host, config.port))
        sock.listen(BACKLOG)
    except OSError as e:
        conn.send(("error", f"cannot listen on {config.host}:{config.port} ({e.strerror}): pick a free --port, "
                            f"or a --host of this machine"))
        return
    host, port = sock.getsockname()[:2]
    conn.send(("listening", f"http://{f'[{host}]' if family == socket.AF_INET6 else host}:{port}"))

    import uvicorn

    from shiftlib.loading import _load_tokenizer
    from shiftlib.serve.app import build_app
    from shiftlib.serve.metrics import ServerMetrics
    from shiftlib.serve.protocol import generation_defaults

    metrics = ServerMetrics(config.model_name)
    link = EngineLink(conn, metrics)
    tokenizer = _load_tokenizer(Path(config.model_dir))
    app = build_app(link, tokenizer, generation_defaults(Path(config.model_dir)), config, metrics)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # rank 0 decides when to stop, not a signal here
            yield

    link.server = Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                                        timeout_keep_alive=30))
    link.server.run(sockets=[sock])
    # Every response is sent and every socket closed; this process holds no file, so skip the interpreter's
    # teardown of torch and friends (seconds on a busy machine, and rank 0 waits for it).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(link.exit_code)
