"""The paged KV cache: one layout for both modes.

A rank stores, per layer, the K and V of the KV heads of its head chunk: the same heads in TP and SP mode, so a
step may switch mode without touching the cache. Memory is cut into blocks of ``block_size`` tokens; a request
owns a list of blocks (its block table). One extra block at the end is the *trash* block: padding tokens write
there, which keeps every step's shapes static (CUDA graphs) without masking the writes.
"""

from __future__ import annotations

import torch


class BlockAllocator:
    """Cache blocks: free, in use (reference-counted: prefix caching shares full blocks), or cached.

    A cached block holds the K/V of a full block of tokens under its prefix ``key`` (see
    :mod:`shiftlib.engine.prefix_cache`); once no request uses it, it still counts as free and is evicted, least
    recently used first, only when no plain free block is left. Every rank runs the same allocator on the same
    schedule, so block ids agree.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))
        self.refs = [0] * num_blocks
        self.cached: dict[object, int] = {}  # prefix key -> block
        self._key: dict[int, object] = {}  # block -> its prefix key
        self._idle: dict[int, None] = {}  # cached blocks no request uses, least recently used first

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._idle)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} cache blocks, {self.num_free} free")
        blocks = [self._free.pop() if self._free else self._evict() for _ in range(n)]
        for b in blocks:
            self.refs[b] = 1
        return blocks

    def _evict(self) -> int:
        block = next(iter(self._idle))
        del self._idle[block], self.cached[self._key.pop(block)]
        return block

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; the last request to let go of a block frees it, tail first."""
        for b in reversed(blocks):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                (self._idle.__setitem__(b, None) if b in self._key else self._free.append(b))

    def share(self, block: int) -> None:
        """One more request uses a cached block."""
        self._idle.pop(block, None)
        self.refs[block] += 1

    def cache(self, block: int, key: object) -> None:
        """Offer a full block for reuse under ``key`` (kept as it is where another block holds that key)."""
        if key not in self.cached and block not in self._key:
            self.cached[key], self._key[block] = block, key


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
