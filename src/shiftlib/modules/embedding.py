"""Vocab-parallel token embedding and LM head.

Both shard the vocabulary: ``tp`` ways in SP mode, P ways (block ``s`` of the tp shard, a view) in TP mode. The
head always works the TP-mode way on the rows that are sampled: every rank computes logits for its vocab chunk
and an all-gather in chunk order gives each rank the same, bit-identical logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shiftlib.mesh import ShiftMesh
from shiftlib.modules.source import Source, rows


def _vocab_shard(vocab: int, hidden: int, mesh: ShiftMesh, dtype: torch.dtype) -> torch.Tensor:
    if vocab % mesh.world:
        raise ValueError(
            f"vocab_size={vocab} is not divisible by tp*sp={mesh.world}: vocab-parallel layers need equal "
            f"shards; pick tp*sp among the divisors of {vocab} or pad the vocabulary"
        )
    return torch.empty(vocab // mesh.tp, hidden, dtype=dtype, device=mesh.device)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab: int, hidden: int, mesh: ShiftMesh, dtype: torch.dtype) -> None:
        super().__init__()
        self.mesh, self.chunk_rows = mesh, vocab // mesh.world
        self._w = _vocab_shard(vocab, hidden, mesh, dtype)
        self.weight = mesh.param(self._w, 0)
        self._w_tp = self._w[mesh.s * self.chunk_rows : (mesh.s + 1) * self.chunk_rows]

    @torch.no_grad()
    def load(self, get: Source) -> None:
        first = self.mesh.t * self._w.shape[0]
        self._w.copy_(rows(get("weight"), first, first + self._w.shape[0]))

    def forward(self, tokens: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "sp":
            w, first = self._w, self.mesh.t * self._w.shape[0]
        else:
            w, first = self._w_tp, self.mesh.chunk * self.chunk_rows
        if (self.mesh.tp if mode == "sp" else self.mesh.world) == 1:
            return F.embedding(tokens, w)  # this rank holds the whole vocabulary
        idx = tokens - first
        mine = (idx >= 0) & (idx < w.shape[0])
        emb = F.embedding(idx.clamp(0, w.shape[0] - 1), w)
        return self.mesh.all_reduce(torch.where(mine[:, None], emb, 0), mode)


class VocabParallelHead(nn.Module):
    """LM head; with tied embeddings it shares the embedding's parameter (one copy, as in Hugging Face)."""

    def __init__(self, vocab: int, hidden: int, mesh: ShiftMesh, dtype: torch.dtype, tied: VocabParallelEmbedding | None) -> None:
        super().__init__()
        self.mesh, self.tied = mesh, tied is not None
        if tied is not None:
            self._w, self.weight = tied._w, tied.weight
        else:
            self._w = _vocab_shard(vocab, hidden, mesh, dtype)
            self.weight = mesh.param(self._w, 0)
        n = vocab // mesh.world
        self._w_tp = self._w[mesh.s * n : (mesh.s + 1) * n]

    @torch.no_grad()
    def load(self, get: Source) -> None:
        if not self.tied:
            first = self.mesh.t * self._w.shape[0]
            self._w.copy_(rows(get("weight"), first, first + self._w.shape[0]))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) rows present on every rank -> (..., vocab) logits, identical on every rank."""
        return self.mesh.gather_chunks(F.linear(hidden, self._w_tp))
