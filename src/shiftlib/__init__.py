"""shiftlib: Shift Parallelism for Hugging Face causal LMs in plain PyTorch.

Each step runs in full tensor parallelism (small batches, lowest latency) or in Ulysses sequence parallelism
x TP (large batches, highest throughput) over one set of weights and one paged KV cache.
"""

from shiftlib.engine import Engine, SamplingParams, generate
from shiftlib.loading import from_pretrained
from shiftlib.mesh import init_mesh
from shiftlib.plan import mode, parallelize

__all__ = ["Engine", "SamplingParams", "from_pretrained", "generate", "init_mesh", "mode", "parallelize"]
__version__ = "0.1.0"
