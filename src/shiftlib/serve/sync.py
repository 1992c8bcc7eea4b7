"""What rank 0 tells every rank before each step: the requests that arrived, the ones cancelled, and whether to stop.

All ranks run the same scheduler, so they stay in lockstep as long as they add and abort the same requests
before the same step. Rank 0 owns the HTTP side; once per step it broadcasts one small message over a gloo
group on the CPU (no device work, no synchronization with the GPU stream). The message travels in a buffer of
fixed size, so the common step costs exactly one broadcast; a larger one (many long prompts at once) sends its
remainder in a second. Between requests rank 0 sends an empty message once a second: the other ranks sleep in
the receive (no core spins), and a rank that died is noticed within that second.
"""

from __future__ import annotations

import pickle
import time
from array import array
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from shiftlib.engine.sampler import SamplingParams

BUFFER_BYTES = 4096
LENGTH_BYTES = 8


@dataclass(frozen=True)
class Arrival:
    """A request for the engine: ``uid`` is the server's id for it, the same on every rank.

    The prompt travels as ``array("i")``: it pickles as one block of bytes (64 prompts of 512 tokens unpickle in
    0.1 ms instead of 3.6 ms as lists of ints).
    """

    uid: int
    prompt: array
    params: SamplingParams


@dataclass
class StepMessage:
    arrivals: list[Arrival] = field(default_factory=list)
    aborts: list[int] = field(default_factory=list)  # uids
    shutdown: bool = False


class StepSync:
    """Rank 0's :class:`StepMessage` for every rank, one broadcast per step (none on one rank).

    ``seconds`` accumulates the time spent in :meth:`exchange` and ``count`` the calls, for the metrics.
    """

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.world = 1 if group is None else dist.get_world_size(group)
        self.is_source = self.world == 1 or dist.get_rank(group) == 0
        self.src = 0 if group is None else dist.get_global_rank(group, 0)
        self.buffer = torch.zeros(BUFFER_BYTES, dtype=torch.uint8)
        self.seconds, self.count = 0.0, 0

    def exchange(self, message: StepMessage | None) -> StepMessage | None:
        """Rank 0 passes its message (``None``: nothing new); every rank returns rank 0's."""
        if self.world == 1:
            return message
        start = time.perf_counter()
        view = self.buffer.numpy()
        if self.is_source:
            data = b"" if message is None else pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
            view[:LENGTH_BYTES] = np.frombuffer(len(data).to_bytes(LENGTH_BYTES, "little"), np.uint8)
            head = min(len(data), BUFFER_BYTES - LENGTH_BYTES)
            view[LENGTH_BYTES : LENGTH_BYTES + head] = np.frombuffer(data, np.uint8, head)
            dist.broadcast(self.buffer, self.src, group=self.group)
            if len(data) > head:
                dist.broadcast(torch.frombuffer(bytearray(data[head:]), dtype=torch.uint8), self.src, group=self.group)
        else:
            dist.broadcast(self.buffer, self.src, group=self.group)
            length = int.from_bytes(view[:LENGTH_BYTES].tobytes(), "little")
            head = min(length, BUFFER_BYTES - LENGTH_BYTES)
            data = view[LENGTH_BYTES : LENGTH_BYTES + head].tobytes()
            if length > head:
                rest = torch.empty(length - head, dtype=torch.uint8)
                dist.broadcast(rest, self.src, group=self.group)
                data += rest.numpy().tobytes()
            message = pickle.loads(data) if data else None
        self.seconds += time.perf_counter() - start
        self.count += 1
        return message
