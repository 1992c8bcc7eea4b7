"""Benchmarks: shift vs TP vs SP vs DP vs Hugging Face ``generate`` on the same ranks, and a cost model for P > 1.

``shiftlib bench`` (``python -m shiftlib.bench``) runs the loads of :mod:`shiftlib.bench.workloads` on every
configuration of :mod:`shiftlib.bench.suite` and writes JSON records; :mod:`shiftlib.bench.plot` draws them;
:mod:`shiftlib.bench.costmodel` predicts P = 2, 4, 8 from one-GPU measurements.
"""

from shiftlib.bench.suite import BenchOptions, run_bench

__all__ = ["BenchOptions", "run_bench"]
