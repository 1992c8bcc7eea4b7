"""Attention over a paged KV cache: the batch description both modes share, and the exact backend.

After the Ulysses all-to-all (SP mode) or directly (TP mode) a rank holds *every* token of the step for its own
head chunk, so one attention function serves both modes. Context index ``j`` of sequence ``b`` lives in cache
slot ``block_tables[b, j // block_size] * block_size + j % block_size``; a query at context index ``i`` sees the keys at indices ``<= i`` (and
``> i - window`` for sliding-window layers).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import torch
import torch.nn.functional as F

from shiftlib.modules.fused import merge_partial


@dataclass
class AttentionBatch:
    """What attention needs to know about one step, identical on every rank.

    Tokens of sequence ``b`` occupy rows ``query_start[b]:query_start[b + 1]`` of the step; rows past
    ``query_start[-1]`` are padding, written to the cache's trash slot and never attended.
    """

    query_pos: torch.Tensor  # (N,) index of each token within its sequence's context (causal order)
    write_slots: torch.Tensor  # (N,) cache slot that receives the token's K/V
    block_tables: torch.Tensor  # (B, M) int32: cache block holding context indices [j*bs, (j+1)*bs)
    block_size: int
    context_lens: torch.Tensor  # (B,) context length after this step
    query_start: list[int]  # host copy, B + 1 offsets
    context_lens_host: list[int]
    decode: bool = False  # row i is the single new token of sequence i (the CUDA-graph case)
    num_decodes: int = 0  # leading sequences with one new token each: rows [0, num_decodes) in a mixed step
    # A mixed step of fixed shapes (a CUDA graph's; the host lists are then unused): the context length of each
    # leading decode row, 0 for the others (D,), and the prefill kernel's query offsets, with no rows for the
    # decodes (B + 1,). Sequences past the step's are empty.
    decode_lens: torch.Tensor | None = None
    prefill_start: torch.Tensor | None = None
    block_tables_host: list[list[int]] | None = None  # the host's block lists, for ``prefix_in_place``

    @property
    def num_tokens(self) -> int:
        return self.query_pos.shape[0]

    # The prefill backend's choice, worked out once per step, not per layer: from the sequences past the decodes.
    @cached_property
    def longest_prefill_context(self) -> int:
        return max(self.context_lens_host[self.num_decodes :], default=0)

    @cached_property
    def long_chunks(self) -> bool:
        """Whether the prefills with rows all run ``SDPA_LONG_CHUNK`` rows or more (whole prompts or chunks after
        a prefix)."""
        qs = self.query_start
        live = [qs[b + 1] - qs[b] for b in range(self.num_decodes, len(self.context_lens_host)) if qs[b + 1] > qs[b]]
        return bool(live) and min(live) >= SDPA_LONG_CHUNK

    @cached_property
    def prefix_in_place(self) -> list[int | None]:
        """Per sequence past the decodes, the first cache slot of a range that holds exactly its prefix (the context
        before its new rows), so that a view of the cache serves as the prefix's K/V; else ``None``. Every prefix key is
        visible to every new row, so their order does not matter: the prefix's blocks need only be consecutive ids in
        any order (a long prompt on fresh blocks, or on evicted ones, which come tail first), with a part-filled last
        block at the range's end."""
        tables, qs, bs = self.block_tables_host or [], self.query_start, self.block_size
        starts: list[int | None] = [None] * self.num_decodes  # the decode kernel reads their contexts
        for b in range(self.num_decodes, len(self.context_lens_host)):
            length = self.context_lens_host[b] - (qs[b + 1] - qs[b])
            blocks = tables[b][: -(-length // bs)] if b < len(tables) else []
            lo, hi = (min(blocks), max(blocks)) if blocks else (0, -1)
            in_place = bool(blocks) and hi - lo == len(blocks) - 1 and (length % bs == 0 or blocks[-1] == hi)
            starts.append(lo * bs if in_place else None)
        return starts

    @cached_property
    def query_start_device(self) -> torch.Tensor:
        """``query_start`` as an int32 device tensor for the prefill kernel: copied once per step, not per layer."""
        return torch.tensor(self.query_start, dtype=torch.int32).to(self.query_pos.device, non_blocking=True)

    def padded(self, n: int, trash_slot: int = 0) -> AttentionBatch:
        """The same batch with ``n - num_tokens`` padding rows appended, as empty sequences of their own."""
        extra = n - self.num_tokens
        if extra <= 0:
            return self

        def pad(x: torch.Tensor, value: int) -> torch.Tensor:
            return torch.cat([x, x.new_full((extra, *x.shape[1:]), value)])

        return replace(
            self,
            query_pos=pad(self.query_pos, 0),
            write_slots=pad(self.write_slots, trash_slot),
            block_tables=pad(self.block_tables, 0),
            context_lens=pad(self.context_lens, 0),
            query_start=self.query_start + [self.query_start[-1]] * extra,
            context_lens_host=self.context_lens_host + [0] * extra,
        )

    @classmethod
    def dense(cls, batch: int, seq_len: int, device: torch.device) -> AttentionBatch:
        """Full causal sequences with no cache: the step's own tokens are the keys (slot = row)."""
        rows = torch.arange(batch * seq_len, device=device)
        return cls(
            query_pos=rows % seq_len,
            write_slots=rows,
            block_tables=torch.arange(batch, device=device, dtype=torch.int32)[:, None],
            block_size=seq_len,
            context_lens=torch.full((batch,), seq_len, device=device),
            query_start=list(range(0, batch * seq_len + 1, seq_len)),
            context_lens_host=[seq_len] * batch,
        )


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: AttentionBatch,
    kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Attend over the cache, into which the step's K/V were already stored (``rope_store``).

    q: (N, hq, d); k, v: (N, hkv, d), the step's own; cache: (slots, hkv, d) each.

    Backends: decode rows (the step's leading sequences of one new token each; every row of a decode step) go
    through the Triton flash-decoding kernel on GPU, or its PyTorch twin on CPU, in one call driven by device
    tensors only, so a decode step can be captured in a CUDA graph. The other sequences of a mixed or prefill
    step go, on GPU, through the Triton varlen prefill kernel in one call, or, when they are all long chunks, one
    by one through cuDNN's attention (:func:`attend_after_prefix`); on CPU (and on GPU for inputs that kernel
    does not take) one by one through SDPA: ``is_causal`` where a sequence's whole context is new, the masked
    exact path otherwise. A mixed step of fixed shapes runs both kernels over every
    sequence slot (``_attend_fixed``). Without a cache the step's own K/V are the key store
    (``AttentionBatch.dense``).
    """
    if kv_cache is None:
        return _attend_by_sequence(q, k, v, k, v, batch, scale, window, first=0)
    k_store, v_store = kv_cache
    if batch.decode_lens is not None:
        return _attend_fixed(q, k_store, v_store, batch, scale, window)
    n = q.shape[0] if batch.decode else batch.num_decodes
    rest = _prefill_backend(q, batch.block_size)
    if n == 0:
        return rest(q, k, v, k_store, v_store, batch, scale, window, first=0)
    decode = paged_decode_op if q.is_cuda else decode_reference
    o = decode(q[:n], k_store, v_store, batch.block_tables[:n], batch.context_lens[:n], batch.block_size, scale, window)
    if n == q.shape[0]:
        return o
    out = rest(q, k, v, k_store, v_store, batch, scale, window, first=n)
    out[:n] = o
    return out


def paged_decode_op(*args) -> torch.Tensor:
    from shiftlib.triton_decode import paged_decode  # Triton is imported only where a GPU runs it

    return paged_decode(*args)


def _prefill_backend(q: torch.Tensor, block_size: int):
    """The Triton prefill kernel on GPU where it takes the inputs; else, CPU included, SDPA per sequence (exact:
    the CPU tests hold float64 logits to Hugging Face's)."""
    if q.is_cuda:
        from shiftlib.triton_prefill import supports  # Triton is imported only where a GPU runs it

        if supports(q, block_size):
            return _attend_prefill_kernel
    return _attend_by_sequence


# Chunks of at least this many rows (whole prompts, or chunks after a cached prefix) go through cuDNN's attention
# when they are a step's only prefills: on an H200 it ran causal attention of a whole 8k or 32k prompt at ~594
# TFLOP/s, and 4k-8k chunks after a prefix at 470-575 split in two, against 395-458 for the Triton kernel
# (docs/engine.md, Long prefill). Steps of many short prompts stay on the kernel's one call (64 prompts of 512
# tokens: 0.64 ms against 9.9 ms one SDPA at a time); single chunks between 512 and 4,096 tokens were not
# measured, so the bar sits at the default step budget.
SDPA_LONG_CHUNK = 4096


def long_chunks_only(batch: AttentionBatch, window: int | None) -> bool:
    """Whether the step's prefills are all long chunks (:attr:`AttentionBatch.long_chunks`), with no window
    (cuDNN's calls here take none)."""
    return window is None and batch.long_chunks


def _attend_prefill_kernel(
    q, k, v, k_store, v_store, batch: AttentionBatch, scale: float, window: int | None, first: int
) -> torch.Tensor:
    """``_attend_by_sequence``'s contract in one Triton call (or, for long chunks alone, cuDNN). The kernel writes
    only the rows its sequences own, so the rows before them and the padding after them are zeroed here."""
    from shiftlib.triton_prefill import paged_prefill

    if long_chunks_only(batch, window) and cudnn_takes(q):
        return _attend_long_chunks(q, k, v, k_store, v_store, batch, scale, first)
    qs = batch.query_start
    out = paged_prefill(
        q, k_store, v_store, batch.block_tables[first:], batch.query_start_device[first:], batch.context_lens[first:],
        batch.query_pos, batch.block_size, scale, window, max_context=batch.longest_prefill_context,
    )  # fmt: skip
    out[: qs[first]].zero_()
    out[qs[-1] :].zero_()
    return out


def _attend_fixed(q, k_store, v_store, batch: AttentionBatch, scale: float, window: int | None) -> torch.Tensor:
    """A mixed step whose launches depend on shapes alone: the decode kernel over the first D rows (those past the
    step's decodes have no context) and the prefill kernel over the rest; rows of neither are padding."""
    decode, prefill = (paged_decode_op, paged_prefill_op) if q.is_cuda else (decode_reference, prefill_reference)
    d, bs = batch.decode_lens.shape[0], batch.block_size
    o = decode(q[:d], k_store, v_store, batch.block_tables[:d], batch.decode_lens, bs, scale, window)
    out = prefill(q, k_store, v_store, batch.block_tables, batch.prefill_start, batch.context_lens, batch.query_pos,
                  bs, scale, window)  # fmt: skip
    out[:d] = torch.where(batch.decode_lens[:, None, None] > 0, o, out[:d])
    return out


def paged_prefill_op(*args) -> torch.Tensor:
    from shiftlib.triton_prefill import paged_prefill

    return paged_prefill(*args)


def prefill_reference(q, k_cache, v_cache, block_tables, query_start, context_lens, query_pos, block_size: int,
                      scale: float, window: int | None) -> torch.Tensor:
    """The prefill kernel's contract in plain PyTorch, from device tensors only; rows outside
    ``query_start[0]:query_start[-1]`` get zeros."""
    rows = torch.arange(q.shape[0], device=q.device)
    seq = (torch.searchsorted(query_start, rows.to(query_start.dtype), right=True) - 1).clamp(0, len(context_lens) - 1)
    keys = torch.arange(block_tables.shape[1] * block_size, device=q.device)
    slots = block_tables[seq][:, keys // block_size].long() * block_size + keys % block_size  # (N, L)
    pos, owned = query_pos[:, None], (rows >= query_start[0]) & (rows < query_start[-1])
    mask = (keys <= pos) & (keys < context_lens[seq, None]) & owned[:, None]
    if window is not None:
        mask &= keys > pos - window
    o = F.scaled_dot_product_attention(
        q[:, :, None], k_cache[slots].transpose(1, 2), v_cache[slots].transpose(1, 2),
        attn_mask=mask[:, None, None], scale=scale, enable_gqa=True,
    )[:, :, 0]  # fmt: skip
    return torch.where(mask.any(1)[:, None, None], o, 0)


def decode_reference(q, k_cache, v_cache, block_tables, context_lens, block_size: int, scale: float, window: int | None) -> torch.Tensor:
    """The decode kernel's contract in plain PyTorch, from device tensors only (static shapes, no host lists).

    Row ``b`` is the newest token of sequence ``b`` (context index ``context_lens[b] - 1``); rows with an empty
    context are padding and get zeros.
    """
    keys = torch.arange(block_tables.shape[1] * block_size, device=q.device)
    slots = block_tables[:, keys // block_size].long() * block_size + keys % block_size  # (B, L)
    last = context_lens[:, None].long() - 1
    mask = keys <= last
    if window is not None:
        mask &= keys > last - window
    o = F.scaled_dot_product_attention(
        q[:, :, None], k_cache[slots].transpose(1, 2), v_cache[slots].transpose(1, 2),
        attn_mask=mask[:, None, None], scale=scale, enable_gqa=True,
    )[:, :, 0]  # fmt: skip
    return torch.where(context_lens[:, None, None] > 0, o, 0)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, **mask) -> torch.Tensor:
    """SDPA on (tokens, heads, d), shaped for the fused kernels: 4-D inputs, and on GPU no GQA flag (KV heads
    are shared by copy) — either would send a long prefill to the quadratic-memory math kernel."""
    gqa = k.shape[1] != q.shape[1]
    if q.is_cuda and gqa:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        gqa = False
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa, **mask)[0].transpose(0, 1)


def _sdpa_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool):
    """Attention on (tokens, heads, d), KV heads shared by groups of query heads, and its log-sum-exp (tokens,
    heads), float32 at least: cuDNN's fused kernel on GPU (it takes the KV heads as they are), flash on CPU."""
    if q.is_cuda:
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
        attention = torch.ops.aten._scaled_dot_product_cudnn_attention
        o, lse = attention(q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]  # bias, lse, dropout, causal
    else:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1).transpose(0, 1)[None] for t in (k, v))
        q = q.transpose(0, 1)[None]
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return o[0].transpose(0, 1), lse.reshape(q.shape[1], q.shape[2]).t()


def cudnn_takes(q: torch.Tensor) -> bool:
    """Whether cuDNN's attention runs these queries (half precision, head_dim a multiple of 8 up to 128)."""
    d = q.shape[-1]
    return (
        q.dtype in (torch.bfloat16, torch.float16) and d % 8 == 0 and d <= 128
        and torch.backends.cuda.cudnn_sdp_enabled()
    )


def attend_after_prefix(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor, scale: float
) -> torch.Tensor:
    """A chunk of n new tokens after a prefix (maybe empty), on (tokens, heads, d): q, k, v the chunk's own, then
    the prefix's K/V.

    Two attentions that cuDNN's fused kernel takes, merged by their log-sum-exps: the chunk over itself (causal;
    top-left alignment is right, the keys being the queries' own) and over the prefix (every key visible). One
    causal call over the whole context would align its mask top-left, which is wrong here, and the lower-right
    mask runs on a slower kernel. Over the prefix the g query heads of a KV head fold into g * n rows of one head:
    the prefix's K/V are never copied per query head.
    """
    own, own_lse = _sdpa_lse(q, k, v, scale, causal=True)
    if k_prefix.shape[0] == 0:
        return own
    n, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    folded = q.view(n, hkv, g, d).transpose(1, 2).reshape(n * g, hkv, d)  # row (token, j): query head h * g + j
    o, lse = _sdpa_lse(folded, k_prefix, v_prefix, scale, causal=False)
    o, lse = o.view(n, g, hkv, d).transpose(1, 2), lse.view(n, g, hkv).transpose(1, 2)  # views, read by the merge
    return merge_partial(own.view(n, hkv, g, d), own_lse.view(n, hkv, g), o, lse).reshape(n, hq, d)


def _context_slots(batch: AttentionBatch, b: int, keys: torch.Tensor) -> torch.Tensor:
    """The cache slots of sequence ``b``'s context indices ``keys``."""
    return batch.block_tables[b, keys // batch.block_size].long() * batch.block_size + keys % batch.block_size


def _attend_by_sequence(q, k, v, k_store, v_store, batch: AttentionBatch, scale: float, window: int | None, first: int) -> torch.Tensor:
    """Sequences ``first`` onwards, one SDPA each; rows of earlier sequences are left at zero."""
    out = q.new_zeros(q.shape)
    for b in range(first, len(batch.context_lens_host)):
        length = batch.context_lens_host[b]
        lo, hi = batch.query_start[b], batch.query_start[b + 1]
        if hi == lo:
            continue
        if hi - lo == length and window is None:  # a whole prompt at once: its own K/V, plain causal (flash)
            out[lo:hi] = _sdpa(q[lo:hi], k[lo:hi], v[lo:hi], scale, is_causal=True)
            continue
        keys = torch.arange(length, device=q.device)
        slots = _context_slots(batch, b, keys)
        qpos = batch.query_pos[lo:hi, None]
        mask = keys <= qpos
        if window is not None:
            mask &= keys > qpos - window
        out[lo:hi] = _sdpa(q[lo:hi], k_store[slots], v_store[slots], scale, attn_mask=mask)
    return out


def _attend_long_chunks(q, k, v, k_store, v_store, batch: AttentionBatch, scale: float, first: int) -> torch.Tensor:
    """``_attend_by_sequence``'s contract (no window) through :func:`attend_after_prefix`, one sequence at a time."""
    out = None
    for b in range(first, len(batch.context_lens_host)):
        lo, hi = batch.query_start[b], batch.query_start[b + 1]
        if hi == lo:
            continue
        length, start = batch.context_lens_host[b] - (hi - lo), batch.prefix_in_place[b]
        if start is None:  # gathered: up to 28k tokens' K/V copied a layer for the last chunk of a 32k prompt
            prefix = _context_slots(batch, b, torch.arange(length, device=q.device))
            k_prefix, v_prefix = k_store[prefix], v_store[prefix]
        else:
            k_prefix, v_prefix = k_store[start : start + length], v_store[start : start + length]
        o = attend_after_prefix(q[lo:hi], k[lo:hi], v[lo:hi], k_prefix, v_prefix, scale)
        if hi - lo == q.shape[0]:  # the step's one sequence (a long prompt's case): no copy where o is contiguous
            return o.contiguous()
        if out is None:
            out = q.new_zeros(q.shape)
        out[lo:hi] = o
    return q.new_zeros(q.shape) if out is None else out
