"""CPU ranks for tests: P gloo processes, spawned once per world size, that run a function on every rank.

A failing rank raises in the test with its traceback; peers blocked in a collective give up after the gloo
timeout, so a broken case fails instead of hanging the suite.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from datetime import timedelta
from typing import Any, Callable

TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, inbox, outbox) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    while (job := inbox.get()) is not None:
        fn, args, kwargs = job
        try:
            outbox.put((rank, True, fn(*args, **kwargs)))
        except BaseException:
            outbox.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class Cluster:
    def __init__(self, world: int) -> None:
        self.world, self.stopped = world, False
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.inboxes = [ctx.Queue() for _ in range(world)]
        self.outbox = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(r, world, port, self.inboxes[r], self.outbox), daemon=True) for r in range(world)]
        for p in self.procs:
            p.start()

    def stop(self) -> None:
        """Ask the ranks to leave; :meth:`close` waits for them."""
        if not self.stopped:
            self.stopped = True
            for q in self.inboxes:
                q.put(None)

    def run(self, fn: Callable[..., Any], *args, **kwargs) -> list[Any]:
        """Call ``fn(*args, **kwargs)`` on every rank; return the per-rank results in rank order."""
        for q in self.inboxes:
            q.put((fn, args, kwargs))
        results: dict[int, Any] = {}
        failures = []
        for _ in range(self.world):
            rank, ok, value = self.outbox.get(timeout=3 * TIMEOUT_S)
            (results.__setitem__(rank, value) if ok else failures.append(f"--- rank {rank} ---\n{value}"))
        if failures:
            raise AssertionError("\n".join(failures))
        return [results[r] for r in range(self.world)]

    def close(self) -> None:
        """Stop the ranks (after :meth:`stop`, if that was called: pools stop side by side)."""
        self.stop()
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
