"""Prefix caching: a request reuses the cached K/V of the full blocks its tokens share with earlier requests.

A full block is keyed by its own tokens and the hash of the key before it, so a key names a whole prefix: two
requests share a block only where everything before it is the same too, which is what makes the K/V equal (the
same in TP and SP mode: one cache layout). The last token of a request is always run, so the step that admits it
has a row to sample. Keys are ints and tuples of ints, whose hashes Python does not randomize: every rank
computes the same keys and finds the same blocks.
"""

from __future__ import annotations

from shiftlib.cache import BlockAllocator
from shiftlib.engine.sequence import Sequence


def _key(parent: object, tokens: list[int]) -> object:
    return hash(parent), tuple(tokens)


def claim(allocator: BlockAllocator, seq: Sequence, bs: int) -> None:
    """Start ``seq`` (no blocks yet) on the cached blocks of its longest cached prefix, short of its last
    token: their tokens count as cached. On the host between two steps, so the tokens are sliced once."""
    tokens, parent = seq.token_slice(0, (seq.num_tokens - 1) // bs * bs), 0
    for start in range(0, len(tokens), bs):
        parent = _key(parent, tokens[start : start + bs])
        if (block := allocator.cached.get(parent)) is None:
            break
        allocator.share(block)
        seq.blocks.append(block)
        seq.keys.append(parent)
    seq.num_cached = len(seq.blocks) * bs


def offer(allocator: BlockAllocator, seq: Sequence, bs: int) -> None:
    """Offer the full blocks of ``seq`` that steps filled since the last offer for reuse by later requests, up to
    its first token still on the device (its K/V are on their way, but a key needs the token)."""
    for i in range(len(seq.keys), min(seq.num_cached, seq.num_tokens - seq.inflight) // bs):
        seq.keys.append(_key(seq.keys[-1] if seq.keys else 0, seq.token_slice(i * bs, (i + 1) * bs)))
        allocator.cache(seq.blocks[i], seq.keys[-1])
