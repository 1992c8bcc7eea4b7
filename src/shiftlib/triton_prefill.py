"""Prefill attention over the paged KV cache in Triton: every query chunk of a step in one call (varlen flash).

A prefill or mixed step brings, per sequence, a chunk of new queries after a cached prefix that may be long (a
128-token suffix after 2,048 cached tokens) or empty (a whole prompt). Run one SDPA per sequence and a step of
many short prompts is bound by launches, and a suffix after a cache pays for gathering its whole context into a
dense copy first. This kernel reads K/V straight from the cache's blocks and serves all sequences at once.

* **Programs.** One program per (query tile of a sequence, KV head). The tiles are numbered per sequence, so a
  tile never straddles two sequences; a program finds its sequence by binary search over ``query_start`` on the
  device, as the tile ``t`` of sequence ``b`` is number ``(query_start[b] - query_start[0]) // tile + b + t``.
  The grid is an upper bound from static shapes; surplus programs exit at once.
* **GQA groups.** A program's rows are ``tile`` query tokens x the ``hq // hkv`` query heads of its KV head
  (the group padded to a power of two), so each K/V tile is loaded once per group, and a chunk of one token
  (a speculative verify row) still fills a tensor-core tile with its heads.
* **Longest first.** Programs run a sequence's tiles from its last, which see the most keys, to its first, so
  the short ones fill the GPU at the end instead of a few long ones running alone (5 % on a 4k-8k chunk).
* **Masks only where needed.** Key tiles that every row sees whole (below the tile's first query, inside every
  row's window) run without the causal and window masks or load masks; only the tiles at the diagonal and at the
  window's trailing edge pay for them.

Rows outside ``query_start[0]:query_start[-1]`` are not written. Triton's import is guarded, so a CPU-only install
without it can still import this module; only calling :func:`paged_prefill` needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The decode kernel's guarded Triton import (``None`` on CPU-only installs: paged_prefill raises) and constants.
from shiftlib.triton_decode import _LOG2E, _NO_WINDOW, _pow2, tl, triton

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
HEAD_DIMS = (16, 32, 64, 128, 256)  # powers of two: the head dimension needs no mask


@dataclass(frozen=True)
class PrefillConfig:
    """Launch parameters: ``block_m`` rows (query tokens x padded GQA group) per program, ``block_n`` keys a step."""

    block_m: int = 128
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 3


def default_config(q: torch.Tensor, max_context: int | None = None) -> PrefillConfig:
    """Measured on an H200 (bf16, d = 128, 4 query heads per KV head; examples/bench_triton_prefill.py --sweep).
    Short contexts: 128 rows x 32 keys, 4 warps, 3 stages, within 2.5 % of the best on 64 prompts of 512 tokens,
    where 256 x 64 with 8 warps is 10 % slower (its diagonal tiles mask away more). From contexts of 2,048 tokens
    on, 256 x 64 with 8 warps wins: 16 suffixes of 128 after 2,048 cached 6 % faster, 4,096 tokens after 28,672
    12 %, 8,192 after 24,576 16 %. ``max_context`` is the step's longest context where the host knows it (eager
    steps); a graph's fixed-shape step keeps the short-context choice. Wider rows (fp32, d = 256) take smaller tiles, so
    that the staged K/V tiles and the Q tile still fit in shared memory and the fp32 accumulator in registers."""
    row_bytes = q.element_size() * q.shape[-1]
    if row_bytes <= 256:
        long = max_context is not None and max_context >= 2048
        return PrefillConfig(256, 64, 8, 3) if long else PrefillConfig()
    if row_bytes <= 512:
        return PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    return PrefillConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)


def supports(q: torch.Tensor, block_size: int) -> bool:
    """Whether :func:`paged_prefill` handles these inputs; callers fall back to another path where it does not."""
    return (
        triton is not None
        and q.dtype in DTYPES
        and q.shape[-1] in HEAD_DIMS
        and block_size > 0
        and block_size & (block_size - 1) == 0
    )


if triton is not None:

    @triton.jit
    def _find_sequence(QS, t, q_base, num_seqs, BLOCK_Q: tl.constexpr):
        """The last sequence whose first tile number is <= t (tile numbers grow strictly with the sequence)."""
        left: tl.int32 = 0
        right = num_seqs
        while left < right:
            mid = (left + right) // 2
            first_tile = (tl.load(QS + mid) - q_base) // BLOCK_Q + mid
            if first_tile <= t:
                left = mid + 1
            else:
                right = mid
        return left - 1

    @triton.jit
    def _key_tiles(
        acc, l_i, m_i, q, qpos, k_head, v_head, bt_row,
        k_lo, k_hi, hi, window, qk_scale, bs_shift, stride_ks, stride_btm,
        HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """Online softmax over the keys [k_lo, k_hi). Unmasked tiles are visible to every row whole; masked ones
        apply the causal and window bounds per row and load nothing at or past ``hi``."""
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        bs_mask = (1 << bs_shift) - 1
        for start in range(k_lo, k_hi, BLOCK_N):
            j = start + offs_n
            if MASKED:
                live = j < hi
                blk = tl.load(bt_row + (j >> bs_shift) * stride_btm, mask=live, other=0)
            else:
                blk = tl.load(bt_row + (j >> bs_shift) * stride_btm)
            kv_off = (blk.to(tl.int64) << bs_shift | (j & bs_mask))[:, None] * stride_ks + offs_d[None, :]
            if MASKED:
                k = tl.load(k_head + kv_off, mask=live[:, None], other=0.0)
            else:
                k = tl.load(k_head + kv_off)
            if IEEE:
                qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
            else:
                qk = tl.dot(q, tl.trans(k)) * qk_scale
            if MASKED:
                see = (j[None, :] <= qpos[:, None]) & (j[None, :] > qpos[:, None] - window) & live[None, :]
                qk = tl.where(see, qk, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                m_use = m_new
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(qk - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if MASKED:
                v = tl.load(v_head + kv_off, mask=live[:, None], other=0.0)
            else:
                v = tl.load(v_head + kv_off)
            acc = acc * alpha[:, None]
            if IEEE:
                acc = tl.dot(p, v, acc, input_precision="ieee")
            else:
                acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new
        return acc, l_i, m_i

    # The arguments that change from step to step are not specialized on (divisibility by 16, alignment): each
    # new specialization is a compile of about a second in the middle of serving.
    @triton.jit(do_not_specialize=["window", "num_seqs", "stride_btb"],
                do_not_specialize_on_alignment=["BT", "QS", "LENS", "QPOS"])
    def _prefill_kernel(
        Q, K, V, BT, QS, LENS, QPOS, OUT,
        qk_scale, window, num_seqs, group, bs_shift,
        stride_qt, stride_qh, stride_ks, stride_kh, stride_btb, stride_btm, stride_ot, stride_oh,
        GP: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        BLOCK_M: tl.constexpr = GP * BLOCK_Q
        t = tl.num_programs(0) - 1 - tl.program_id(0)  # a sequence's last tiles, the longest, start first
        kvh = tl.program_id(1)
        q_base = tl.load(QS)
        b = _find_sequence(QS, t, q_base, num_seqs, BLOCK_Q)
        q_lo = tl.load(QS + b)
        q_hi = tl.load(QS + b + 1)
        tile_start = q_lo + (t - ((q_lo - q_base) // BLOCK_Q + b)) * BLOCK_Q
        if tile_start >= q_hi:  # surplus program, or a sequence with no queries
            return

        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        tok = tile_start + offs_m // GP
        sub = offs_m % GP
        tok_ok = tok < q_hi
        row_ok = tok_ok & (sub < group)
        head = kvh * group + sub
        tok64 = tok.to(tl.int64)
        q_off = tok64[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(Q + q_off, mask=row_ok[:, None], other=0.0)
        # Rows past the chunk's end take the last real position: finite, harmless, never stored.
        qpos = tl.load(QPOS + tok, mask=tok_ok, other=0).to(tl.int32)
        max_pos = tl.max(tl.where(tok_ok, qpos, -1), 0)
        qpos = tl.where(tok_ok, qpos, max_pos)
        min_pos = tl.min(qpos, 0)

        # Keys [lo, hi) are visible to some row; [u_lo, u_hi) to every row, in whole tiles.
        hi = tl.minimum(tl.load(LENS + b), max_pos + 1)
        lo = tl.maximum(min_pos - window + 1, 0) // BLOCK_N * BLOCK_N
        u_lo = tl.minimum(tl.maximum(lo, tl.cdiv(tl.maximum(max_pos - window + 1, 0), BLOCK_N) * BLOCK_N), hi)
        u_hi = tl.maximum(tl.minimum(min_pos + 1, hi) // BLOCK_N * BLOCK_N, u_lo)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        k_head = K + kvh.to(tl.int64) * stride_kh
        v_head = V + kvh.to(tl.int64) * stride_kh
        bt_row = BT + b.to(tl.int64) * stride_btb
        acc, l_i, m_i = _key_tiles(
            acc, l_i, m_i, q, qpos, k_head, v_head, bt_row, lo, u_lo, hi, window, qk_scale, bs_shift,
            stride_ks, stride_btm, HEAD_DIM, BLOCK_N, True, IEEE,
        )  # fmt: skip
        acc, l_i, m_i = _key_tiles(
            acc, l_i, m_i, q, qpos, k_head, v_head, bt_row, u_lo, u_hi, hi, window, qk_scale, bs_shift,
            stride_ks, stride_btm, HEAD_DIM, BLOCK_N, False, IEEE,
        )  # fmt: skip
        acc, l_i, m_i = _key_tiles(
            acc, l_i, m_i, q, qpos, k_head, v_head, bt_row, u_hi, hi, hi, window, qk_scale, bs_shift,
            stride_ks, stride_btm, HEAD_DIM, BLOCK_N, True, IEEE,
        )  # fmt: skip

        out = acc / l_i[:, None]
        o_off = tok64[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(OUT + o_off, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])


def paged_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
    query_pos: torch.Tensor,
    block_size: int,
    scale: float,
    window: int | None,
    *,
    config: PrefillConfig | None = None,
    max_context: int | None = None,
) -> torch.Tensor:
    """Causal attention of every sequence's query rows over its paged context; ``(N, hq, d)`` in ``q``'s dtype.

    Sequence ``b`` owns rows ``query_start[b]:query_start[b + 1]`` of ``q`` (int32 offsets on the device; they
    need not start at 0) and context indices ``[0, context_lens[b])``, the step's own K/V already in the cache.
    Row ``r`` is context index ``query_pos[r]`` and sees the keys ``<= query_pos[r]``, and with a ``window`` only
    those ``> query_pos[r] - window``. Rows outside ``query_start[0]:query_start[-1]`` are left unwritten.
    Only static shapes and ``max_context`` (the longest context, if the caller knows it: it picks the tiles)
    steer the launch: the call never waits for the device.
    """
    if triton is None:
        raise RuntimeError("paged_prefill needs Triton, which is not installed")
    rows, hq, d = q.shape
    _, hkv, dk = k_cache.shape
    if not supports(q, block_size):
        raise ValueError(f"unsupported: dtype {q.dtype}, head_dim {d}, block_size {block_size} (see supports)")
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError("k_cache and v_cache must have one shape and one layout")
    if dk != d or hq % hkv != 0:
        raise ValueError(f"q {tuple(q.shape)} does not fit a cache of {hkv} heads x {dk}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("q and the cache must be contiguous along head_dim")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    seqs = block_tables.shape[0]
    if block_tables.dim() != 2 or query_start.shape != (seqs + 1,) or context_lens.shape != (seqs,):
        raise ValueError("block_tables must be (B, M), query_start (B + 1,) and context_lens (B,)")
    if query_start.dtype != torch.int32 or query_pos.shape != (rows,):
        raise ValueError("query_start must be int32 and query_pos hold one index per row of q")

    out = torch.empty((rows, hq, d), dtype=q.dtype, device=q.device)
    if rows == 0 or seqs == 0:
        return out
    cfg = config or default_config(q, max_context)
    group = hq // hkv
    gp = _pow2(group)
    block_q = max(cfg.block_m, gp, 16) // gp
    grid = (rows // block_q + seqs, hkv)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start, context_lens, query_pos, out,
        scale * _LOG2E, _NO_WINDOW if window is None else window, seqs, group, block_size.bit_length() - 1,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), *block_tables.stride(), out.stride(0),
        out.stride(1),
        GP=gp, BLOCK_Q=block_q, HEAD_DIM=d, BLOCK_N=cfg.block_n, IEEE=q.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
