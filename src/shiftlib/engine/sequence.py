"""A request's state as it moves through the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from shiftlib.engine.sampler import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    arrival: float = field(default_factory=time.perf_counter)
    output: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    blocks: list[int] = field(default_factory=list)
    keys: list[object] = field(default_factory=list)  # prefix keys of the leading full blocks, once computed
    num_cached: int = 0  # leading tokens whose K/V are in the cache
    draft: list[int] = field(default_factory=list)  # speculated tokens to verify after the pending one
    inflight: int = 0  # tokens sampled on the device that the host has not read yet (the overlapped loop)
    inflight_row: int = 0  # the newest one's row in the tokens of the step that sampled it
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)  # one per output token

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        """Tokens so far, those still on the device included."""
        return len(self.prompt) + len(self.output) + self.inflight

    def token_slice(self, start: int, stop: int) -> list[int]:
        """``tokens[start:stop]`` without building the whole list (a decode step needs one token); shorter
        where it reaches a token still on the device."""
        p = len(self.prompt)
        if start >= p:
            return self.output[start - p : stop - p]
        return self.prompt[start:stop] + self.output[: max(stop - p, 0)]

    @property
    def sampled_all(self) -> bool:
        """Its last token is sampled (it may still be on the device): nothing more to run."""
        return len(self.output) + self.inflight >= self.params.max_new_tokens

    @property
    def pending(self) -> int:
        """Tokens still to be run through the model before the next sample."""
        return self.num_tokens - self.num_cached
