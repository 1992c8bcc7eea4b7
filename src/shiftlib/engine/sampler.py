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
        min_tokens: EOS and ``stop_token_ids`` cannot be chosen before this many new tokens.
        logprobs: record each new token's log-probability and the ``logprobs`` most likely alternatives in
            ``Sequence.logprobs`` (``None``: record nothing, the fast path).

    Raises:
        ValueError: ``max_new_tokens < 0``, ``temperature < 0``, ``top_p`` outside (0, 1], ``top_k < 0``,
            ``min_tokens < 0``, ``logprobs < 0``.

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
    min_tokens: int = 0
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.min_tokens < 0 or (self.logprobs is not None and self.logprobs < 0):
            raise ValueError(f"min_tokens and logprobs must be >= 0, got {self.min_tokens} and {self.logprobs}")


TOP_P_CANDIDATES = 1024  # top-p alone looks for its cut among this many most likely tokens first


def filter_logits(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Set to -inf, per row of ``x`` (R, V), the logits outside its top-k and then outside its nucleus.

    The nucleus is the smallest set of most likely tokens (after top-k) whose probability reaches ``top_p``;
    tokens tied with the last one kept are kept too. No sort and no sync with the host (the engine launches the
    next step before this one's tokens are read): top-k rows take one batched ``topk`` of the largest k; top-p
    alone takes its cut from the best ``TOP_P_CANDIDATES`` tokens, or, in rows whose candidates hold less than
    ``top_p`` of the mass, from :func:`_nucleus_cut` over the whole vocabulary.
    """
    V, dev = x.shape[-1], x.device
    k = torch.tensor([kk if 0 < kk < V else V for kk in top_k], device=dev)
    p = torch.tensor(top_p, dtype=x.dtype, device=dev)
    widths = [kk if 0 < kk < V else (TOP_P_CANDIDATES if pp < 1 else 0) for kk, pp in zip(top_k, top_p)]
    if max(widths) == 0:
        return x
    cut, short = _cut(x, x.topk(min(max(widths), V), -1).values, k, p)
    if max(widths) < V:  # flat rows: their nucleus reaches past the candidates
        cut = torch.where(short, _nucleus_cut(x, p), cut)
    return x.masked_fill(x < cut[:, None], float("-inf"))


def _nucleus_cut(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The smallest logit each row's nucleus keeps, without a sort: the nucleus keeps the probabilities ``>= v`` for
    the largest ``v`` of the row whose tokens at or above it hold ``p`` of the mass. Non-negative floats order
    like their bit patterns, so bisecting on the bits finds that ``v`` exactly, in one pass per bit."""
    probs = x.softmax(-1)
    bits = probs.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[probs.element_size()])
    lo, hi = torch.zeros_like(bits[:, 0]), bits.amax(-1) + 1  # mass at or above: lo's reaches p, hi's does not
    for _ in range(8 * probs.element_size() - 1):
        mid = lo + (hi - lo) // 2
        enough = torch.where(bits >= mid[:, None], probs, 0).sum(-1) >= p
        lo, hi = torch.where(enough, mid, lo), torch.where(enough, hi, mid)
    return x.masked_fill(bits < lo[:, None], float("inf")).amin(-1)


def _cut(x, vals, k, p) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest logit each row keeps, from its best logits ``vals`` (sorted); and which rows' nucleus
    may reach past ``vals``."""
    V, rank = x.shape[-1], torch.arange(vals.shape[-1], device=x.device)
    in_k = rank < k[:, None]
    logz = torch.where(k < V, vals.masked_fill(~in_k, float("-inf")).logsumexp(-1), x.logsumexp(-1))
    probs = (vals - logz[:, None]).exp().masked_fill(~in_k, 0)
    keep = in_k & ((probs.cumsum(-1) - probs < p[:, None]) | (rank == 0) | (p[:, None] >= 1))
    cut = vals.masked_fill(~keep, float("inf")).amin(-1)
    cut = torch.where((k == V) & (p >= 1), float("-inf"), cut)  # nothing to filter in this row
    return cut, (k == V) & (p < 1) & (probs.sum(-1) < p)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of ``logits`` (R, V), left on the device: greedy rows take the argmax; sampled rows
    work in float32, all in one batch, by inverting their CDF at a uniform draw from the request's own CPU
    generator (no per-row kernel, no sync)."""
    tokens = logits.argmax(-1)
    hot = [i for i, p in enumerate(params) if p.temperature > 0]
    if not hot:
        return tokens
    dev, ps = logits.device, [params[i] for i in hot]
    rows = torch.tensor(hot, device=dev)
    x = logits[rows].float() / torch.tensor([p.temperature for p in ps], device=dev)[:, None]
    probs = filter_logits(x, [p.top_k for p in ps], [p.top_p for p in ps]).softmax(-1)
    cdf = probs.cumsum(-1)
    u = torch.cat([torch.rand(1, dtype=torch.float64, generator=generators[i]) for i in hot]).to(dev)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1].double()).to(cdf.dtype)[:, None], right=True)[:, 0]
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)  # a rounded-up draw stays on a kept token
    return tokens.index_put((rows,), torch.minimum(pick, last))


def eos_ids(model) -> frozenset[int]:
    """The model's end-of-sequence tokens (its generation config's, else its config's)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def _positions(rows: list) -> list[int]:
    """Each row's output position: a request with a draft has rows for positions ``len(output) + j``."""
    out, seen = [], {}
    for s in rows:
        seen[s.id] = seen.get(s.id, -1) + 1
        out.append(len(s.output) + seen[s.id])
    return out


def ban_stops(logits: torch.Tensor, rows: list, stop_ids: frozenset[int]) -> torch.Tensor:
    """``logits`` with EOS and the stop tokens at -inf in the rows of positions short of their ``min_tokens``."""
    if not any(s.params.min_tokens for s in rows):
        return logits
    cells = [(i, t) for i, (s, pos) in enumerate(zip(rows, _positions(rows))) if pos < s.params.min_tokens
             for t in set(s.params.stop_token_ids) | (set() if s.params.ignore_eos else stop_ids)]
    if not cells:
        return logits
    logits = logits.clone()
    logits[tuple(torch.tensor(c, device=logits.device) for c in zip(*cells))] = float("-inf")
    return logits


class Logprobs:
    """Each sampled token's log-probability and its most likely alternatives, for the rows that ask: the model's
    own distribution, before temperature, top-k/top-p and ``min_tokens``. Computed on the device as the step
    runs (a CUDA graph's logits are overwritten by the next replay), read with the step's tokens."""

    def __init__(self, logits: torch.Tensor, rows: list, tokens: torch.Tensor) -> None:
        self.index = {r: i for i, r in enumerate(r for r, s in enumerate(rows) if s.params.logprobs is not None)}
        self.tensors: list[torch.Tensor] = []
        if self.index:
            at = torch.tensor(list(self.index), device=logits.device)
            lp = logits[at].to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
            top = lp.topk(min(max(rows[r].params.logprobs for r in self.index), lp.shape[-1]), dim=-1)
            self.tensors = [lp.gather(1, tokens[at, None])[:, 0], top.values, top.indices]

    def record(self, seq, row: int, count: int, host: list[list]) -> None:
        """Append to ``seq.logprobs`` the entries of its ``count`` tokens from rows ``row`` on; ``host``: the
        tensors, read."""
        (chosen, values, ids), n = host, seq.params.logprobs
        for i in (self.index[r] for r in range(row, row + count)):
            seq.logprobs.append((chosen[i], list(zip(ids[i][:n], values[i][:n]))))
