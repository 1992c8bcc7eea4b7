"""The paged KV cache: one layout for both modes.

A rank stores, per layer, the K and V of the KV heads of its head chunk: the same heads in TP and SP mode, so a
step may switch mode without touching the cache. Memory is cut into blocks of ``block_size`` tokens; a request
owns a list of blocks (its block table). One extra block at the end is the *trash* block: padding tokens write
there, which keeps every step's shapes static (CUDA graphs) without masking the writes.
"""

from __future__ import annotations

import torch


class BlockAllocator:
    """Free-list of cache blocks. Every rank runs the same allocator on the same schedule, so block ids agree."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} cache blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"the KV cache needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        slots = (num_blocks + 1) * block_size  # + the trash block
        self.data = torch.zeros(num_layers, 2, slots, kv_heads, head_dim, dtype=dtype, device=device)
        self.trash_slot = num_blocks * block_size
        self.layers = [(self.data[i, 0], self.data[i, 1]) for i in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * block_size * kv_heads * head_dim * torch.finfo(dtype).bits // 8

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size
