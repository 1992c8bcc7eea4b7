"""A step that raises on one rank stops the engine on every rank.

After a failed step a rank is out of step with its peers (blocks allocated, tokens not counted), and a peer may be
waiting in a collective the failed rank will never join. So the failed rank posts its error to the process
group's store, and no rank runs another step once it has seen one: ranks read the store before each step on
CPU (gloo blocks in collectives, so a peer can only look between steps) and, on GPU, while they wait for a
step's tokens (NCCL does not block the host, so a peer stuck behind a dead rank notices within ``POLL_S``).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

POLL_S = 0.01


class Failure:
    def __init__(self, world: int, key: str) -> None:
        self.store = dist.distributed_c10d._get_default_store() if world > 1 else None
        self.key, self.error = f"shiftlib/engine/{key}/failed", None

    def check(self, store: bool = True) -> None:
        """Raise if a step failed here or (with ``store``) on any rank."""
        if self.error is None and store and self.store is not None and self.store.check([self.key]):
            self.error = self.store.get(self.key).decode()
        if self.error is not None:
            raise RuntimeError(f"the engine stopped because {self.error}; build a new Engine (and mesh) to go on")

    def record(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = f"a step failed on rank {dist.get_rank() if dist.is_initialized() else 0}: {exc!r}"
            if self.store is not None:
                self.store.set(self.key, self.error)

    def wait(self, done: torch.cuda.Event | None) -> None:
        """Until ``done`` (the end of a step on the GPU; ``None``: nothing to wait for), watching the store meanwhile
        when there are peers."""
        if done is None:
            return
        if self.store is None:
            done.synchronize()
            return
        next_look = time.perf_counter() + POLL_S
        while not done.query():
            if time.perf_counter() > next_look:
                self.check()
                next_look += POLL_S
