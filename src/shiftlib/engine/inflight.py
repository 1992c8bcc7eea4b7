"""A launched step whose sampled tokens are still on the device: the overlapped loop reads them a step later.

The GPU should never wait for the host. So the engine launches step t+1 before it reads the tokens of step t:
while the GPU runs a step, the host schedules the next one, builds its inputs, launches it, and only then handles
the tokens of the step before (stop checks, streaming). A decode row whose input token the host does not know
yet takes it on the device from the tokens of the step in flight (:meth:`Runner.inputs`); a request that turns
out to have stopped drops the one extra token it was given. The tokens (and any log-probabilities) are copied
to pinned host memory as the step ends, so reading them waits for that step alone, not for the one behind it.
"""

from __future__ import annotations

import torch

from shiftlib.engine.failure import Failure
from shiftlib.engine.sampler import Logprobs
from shiftlib.engine.scheduler import StepPlan
from shiftlib.engine.sequence import Sequence


class InFlight:
    """The step ``plan``: ``tokens`` (one per row of ``rows``) on the device, on their way to the host."""

    def __init__(self, plan: StepPlan, rows: list[Sequence], tokens: torch.Tensor, logprobs: Logprobs) -> None:
        self.plan, self.rows, self.tokens, self.logprobs = plan, rows, tokens, logprobs
        tensors, self._done = [tokens, *logprobs.tensors], None
        if tokens.is_cuda:
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for host, t in zip(self._host, tensors):
                host.copy_(t, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()
        else:
            self._host = tensors
        for row, seq in enumerate(rows):  # a request with a draft has several rows, and one token in flight
            if row == 0 or rows[row - 1] is not seq:
                seq.inflight += 1
            seq.inflight_row = row

    def result(self, failure: Failure) -> tuple[list[int], list[list]]:
        """The tokens, and the log-probability tensors as lists, once the step is done."""
        failure.wait(self._done)
        tokens, *logprobs = (t.tolist() for t in self._host)
        return tokens, logprobs
