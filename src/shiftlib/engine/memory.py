"""How many KV-cache blocks fit on the GPU once a step's activations and the decode graphs have their room.

The cache is sized last, from what is free after a dry run of the largest step the scheduler can plan (every
mode, no cache: attention over the step's own tokens, which is what a whole-prompt prefill does), so a full
prefill step never runs out of memory next to a full cache. CUDA graphs keep their own pool and their logits
alive, so they get room of their own.
"""

from __future__ import annotations

import torch

from shiftlib.cache import PagedKVCache
from shiftlib.modules.model import ShiftModel
from shiftlib.paged_attention import AttentionBatch

CPU_DEFAULT_BLOCKS = 1024


@torch.inference_mode()
def activation_bytes(model, shift: ShiftModel, num_tokens: int, num_rows: int) -> int:
    """Peak memory of a step of ``num_tokens`` prompt tokens sampling ``num_rows`` rows, over the modes."""
    dev, peak = shift.mesh.device, 0
    tokens, rows = torch.zeros(num_tokens, dtype=torch.long, device=dev), torch.arange(min(num_rows, num_tokens), device=dev)
    for mode in ("tp", "sp") if shift.mesh.world > 1 else ("tp",):
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        model.lm_head(shift.hidden(tokens, tokens, AttentionBatch.dense(1, num_tokens, dev), mode, rows))
        peak = max(peak, torch.cuda.max_memory_allocated(dev) - base)
    torch.cuda.empty_cache()
    return peak


def kv_blocks(model, shift: ShiftModel, per_block: int, fraction: float, max_num_tokens: int, max_num_seqs: int,
              graph_rows: int) -> int:
    """Blocks per rank (the minimum over ranks): ``fraction`` of the memory left after the largest step's
    activations and, with ``graph_rows`` rows of captured decode graphs, their pool and logits."""
    mesh = shift.mesh
    step = activation_bytes(model, shift, max_num_tokens, max_num_seqs)
    graphs = (step + graph_rows * model.config.vocab_size * shift.norm._w.element_size()) if graph_rows else 0
    free, _ = torch.cuda.mem_get_info(mesh.device)
    blocks = int((free - step - graphs) * fraction) // per_block
    blocks = int(mesh.reduce_all(torch.tensor([blocks], device=mesh.device), "min"))
    if blocks < 1:
        raise ValueError(f"no GPU memory left for the KV cache ({free / 2**30:.2f} GiB free, {(step + graphs) / 2**30:.2f} "
                         f"GiB kept for activations and graphs): free GPU memory, lower max_num_tokens or raise "
                         f"memory_fraction")
    return blocks


def kv_cache(model, shift: ShiftModel, num_blocks: int | None, block_size: int, fraction: float, max_num_tokens: int,
             max_num_seqs: int, graph_rows: int) -> PagedKVCache:
    """The engine's cache: ``num_blocks`` blocks per rank, or on GPU as many as :func:`kv_blocks` finds room for
    (on CPU :data:`CPU_DEFAULT_BLOCKS`)."""
    attn, device = shift.layers[0].self_attn, shift.mesh.device
    shape = (len(shift.layers), block_size, attn.heads.kv_per_chunk, attn.heads.head_dim, attn._qkv.dtype)
    if num_blocks is None and device.type != "cuda":
        num_blocks = CPU_DEFAULT_BLOCKS
    elif num_blocks is None:
        per_block = PagedKVCache.bytes_per_block(*shape)
        num_blocks = kv_blocks(model, shift, per_block, fraction, max_num_tokens, max_num_seqs, graph_rows)
    return PagedKVCache(shape[0], num_blocks, *shape[1:], device)
