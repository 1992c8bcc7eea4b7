"""The generation engine: scheduler, runner, sampler and the loop that ties them."""

from shiftlib.engine.engine import Completion, Engine, StepStats
from shiftlib.engine.generate import generate
from shiftlib.engine.sampler import SamplingParams

__all__ = ["Completion", "Engine", "SamplingParams", "StepStats", "generate"]
