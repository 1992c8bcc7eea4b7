"""Sampling on logits that are bit-identical on every rank, so seeded draws agree without a broadcast."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens.

    Args:
        max_new_tokens: tokens to generate at most.
        temperature: ``0`` is greedy; otherwise logits are divided by it before sampling.
        top_p: keep the most likely tokens up to this probability mass (``1`` disables).
        top_k: keep only the ``k`` most likely tokens (``0`` disables).
        seed: makes a sampled request reproducible across runs; draws are identical on every rank either way.
        stop_token_ids: tokens that end the request (the model's EOS does too unless ``ignore_eos``).
        ignore_eos: generate through EOS (fixed output lengths for benchmarks).

    Raises:
        ValueError: ``max_new_tokens < 0``, ``temperature < 0``, ``top_p`` outside (0, 1], ``top_k < 0``.

    Example:
        >>> SamplingParams(max_new_tokens=32, temperature=0.7, top_p=0.9, seed=0)
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set all but the ``k`` largest logits of each row to -inf (ties at the k-th value are kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``p`` (always at least one)."""
    if p >= 1:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
    drop = before >= p
    drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of ``logits`` (R, V); greedy rows take the argmax, sampled rows work in float32."""
    out = logits.argmax(-1).tolist()
    for i, p in enumerate(params):
        if p.temperature > 0:
            row = top_p_mask(top_k_mask(logits[i : i + 1].float() / p.temperature, p.top_k), p.top_p)
            out[i] = int(torch.multinomial(row.softmax(-1), 1, generator=generators[i]).item())
    return out
