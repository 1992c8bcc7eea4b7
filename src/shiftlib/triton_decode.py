"""Decode attention over the paged KV cache in Triton (flash-decoding).

A decode step brings one query token per sequence, so attention is a pass over the cached K/V and is bound by
memory bandwidth: the kernel must read every cached byte once and keep enough loads in flight. Two choices follow.

* **GQA groups.** One program serves all ``hq // hkv`` query heads of a KV head, so each K/V tile is loaded once
  per group, not once per query head. The group is padded to 16 rows so the two products run on tensor cores.
* **Split-K.** At batch 1 there are only ``hkv`` (sequence, KV head) pairs, far fewer than the GPU's SMs, so each
  pair's context is cut into ``num_splits`` ranges handled by separate programs, and a small second kernel merges
  their partial softmax states. The split count depends on static shapes alone (batch, KV heads, block-table
  width, SM count), and each program derives its token range from the context length on the device, so the call
  never syncs with the host and can be captured in a CUDA graph. With one split the first kernel writes the
  output directly and the merge is skipped.

Triton's import is guarded, so a CPU-only install without it can still import this module; only calling
:func:`paged_decode` needs it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (CI): the module stays importable, paged_decode raises.
    triton = None
    tl = None

_LOG2E = 1.4426950408889634
_NO_WINDOW = 1 << 30  # larger than any context: the window bound then never cuts
_MAX_SPLITS = 64  # past this, partials traffic and empty programs outweigh the extra parallelism
_GRANULE = 32  # a split covers a multiple of this many tokens: short contexts still spread over many programs


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters; ``splits=None`` picks the split count from the shapes and the SM count."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    splits: int | None = None
    programs_per_sm: int = 4  # how many programs the split choice aims for per SM, once splitting at all


def default_config(q: torch.Tensor) -> DecodeConfig:
    """Measured on an H200 (bf16, d = 128): 64-token tiles with 3 stages read KV at 3.8-4.2 TB/s from batch 64 up.
    Rows wider than 256 bytes (fp32, d = 256) take 32-token tiles so that the staged tiles still fit in shared
    memory."""
    row_bytes = q.element_size() * _pow2(q.shape[-1])
    return DecodeConfig(block_n=64, num_stages=3) if row_bytes <= 256 else DecodeConfig(block_n=32, num_stages=2)


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Queried once per device; CPU tensors only reach here under TRITON_INTERPRET, where a nominal count does."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(
    batch: int, kv_heads: int, max_blocks: int, block_size: int, window: int | None, cfg: DecodeConfig, sm: int
) -> int:
    """No split once (sequence, KV head) pairs cover the SMs: at batch 64 x 8 KV heads one split beat two on an
    H200 (40 vs 46 us), the merge costing more than the better balance gains. Below that, enough splits for
    ``programs_per_sm`` programs per SM, but no more than the longest visible context has granules."""
    if cfg.splits is not None:
        return max(1, min(cfg.splits, _MAX_SPLITS))
    if batch * kv_heads >= sm:
        return 1
    max_tokens = max_blocks * block_size
    if window is not None:
        max_tokens = min(max_tokens, window)
    granules = max(1, math.ceil(max_tokens / _GRANULE))
    want = math.ceil(cfg.programs_per_sm * sm / max(1, batch * kv_heads))
    return max(1, min(granules, want, _MAX_SPLITS))


if triton is not None:

    @triton.jit
    def _split_range(LENS, b, window, num_splits, GRANULE: tl.constexpr):
        """The visible range [lo, L) of sequence b and the length of each split's piece of it.

        The split count is static, the length is not: pieces are sized on the device, whole granules each, and
        splits past the end of a short context are empty.
        """
        L = tl.load(LENS + b).to(tl.int32)
        lo = tl.maximum(L - window, 0)
        per = tl.cdiv(tl.cdiv(L - lo, num_splits), GRANULE) * GRANULE
        return L, lo, tl.maximum(per, GRANULE)

    # Eager mixed steps bring any batch and block-table width: no specialization on what changes from step to step
    # (each new one is a compile of about a second in the middle of serving).
    @triton.jit(do_not_specialize=["num_splits", "stride_btb"], do_not_specialize_on_alignment=["BT", "LENS"])
    def _split_kernel(
        Q, K, V, BT, LENS, OUT, ACC, MS, LS,
        qk_scale, window, num_splits,
        stride_qb, stride_qh, stride_qd,
        stride_ks, stride_kh, stride_kd,
        stride_btb, stride_btm,
        stride_ob, stride_oh, stride_od,
        G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr, BS: tl.constexpr, DIRECT: tl.constexpr, IEEE: tl.constexpr, GRANULE: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        sid = tl.program_id(2)
        hq = tl.num_programs(1) * G

        # This split's tokens [s_lo, s_hi). Every tile the loop visits starts below s_hi, so it holds at least one
        # visible token and the running max is finite after the first tile.
        L, lo, per = _split_range(LENS, b, window, num_splits, GRANULE)
        s_lo = lo + sid * per
        s_hi = tl.minimum(s_lo + per, L)

        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        h_mask = offs_h < G
        d_mask = offs_d < HEAD_DIM
        heads = kvh * G + offs_h

        q = tl.load(
            Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
            mask=h_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        kv_head = K + kvh.to(tl.int64) * stride_kh
        v_head = V + kvh.to(tl.int64) * stride_kh

        for start in range(s_lo, s_hi, BLOCK_N):
            j = start + offs_n
            valid = j < s_hi
            blk = tl.load(BT + b * stride_btb + (j // BS) * stride_btm, mask=valid, other=0)
            slot = blk.to(tl.int64) * BS + (j % BS)
            kv_off = slot[:, None] * stride_ks + offs_d[None, :] * stride_kd
            kv_mask = valid[:, None] & d_mask[None, :]
            k = tl.load(kv_head + kv_off, mask=kv_mask, other=0.0)
            if IEEE:
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
            qk = tl.where(valid[None, :], qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_head + kv_off, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None]
            if IEEE:
                acc = tl.dot(p, v, acc, input_precision="ieee")
            else:
                acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new

        if DIRECT:
            # A padding row (L == 0) never enters the loop: l_i is 0 and its output must be 0, not 0/0.
            out = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0)
            tl.store(
                OUT + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                out.to(OUT.dtype.element_ty),
                mask=h_mask[:, None] & d_mask[None, :],
            )
        else:
            # Empty splits store nothing: the merge derives the same ranges and reads live splits only.
            row = (b * hq + heads) * num_splits + sid
            live = h_mask & (s_lo < s_hi)
            tl.store(MS + row, m_i, mask=live)
            tl.store(LS + row, l_i, mask=live)
            tl.store(ACC + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=live[:, None] & d_mask[None, :])

    @triton.jit(do_not_specialize=["num_splits"], do_not_specialize_on_alignment=["LENS"])
    def _merge_kernel(
        ACC, MS, LS, OUT, LENS,
        window, num_splits,
        stride_ob, stride_oh, stride_od,
        HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, GRANULE: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        h = tl.program_id(1)
        hq = tl.num_programs(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        L, lo, per = _split_range(LENS, b, window, num_splits, GRANULE)
        live = tl.cdiv(L - lo, per)  # none for a padding row
        base = (b * hq + h) * num_splits

        # Chunks of BLOCK_S live splits merged online, so the cost follows the live splits, not the static count.
        # The running max is kept as a [BLOCK_D] vector of equal values: a plain vector loop-carry.
        m_run = tl.full([BLOCK_D], float("-inf"), tl.float32)
        num = tl.zeros([BLOCK_D], tl.float32)
        den = tl.zeros([BLOCK_D], tl.float32)
        for s0 in range(0, live, BLOCK_S):
            s_mask = s0 + offs_s < live
            row = base + s0 + offs_s
            m = tl.load(MS + row, mask=s_mask, other=float("-inf"))
            l = tl.load(LS + row, mask=s_mask, other=0.0)
            acc = tl.load(
                ACC + row[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0
            )
            m_new = tl.maximum(m_run, tl.max(m, 0))  # finite: a chunk's first split is live
            alpha = tl.exp2(m_run - m_new)
            w = tl.exp2(m[:, None] - m_new[None, :])  # (BLOCK_S, BLOCK_D), 0 for masked splits
            num = num * alpha + tl.sum(acc * w, 0)
            den = den * alpha + tl.sum(l[:, None] * w, 0)
            m_run = m_new
        out = tl.where(den > 0, num / den, 0.0)
        tl.store(OUT + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(OUT.dtype.element_ty), mask=d_mask)


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
    window: int | None,
    *,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged context; ``(B, hq, d)`` in ``q``'s dtype.

    The query of sequence ``b`` is context index ``context_lens[b] - 1`` (its K/V already cached); with a
    ``window`` it sees the last ``window`` indices only. Rows with ``context_lens[b] == 0`` are padding and get
    zeros. Only static shapes steer the launch, so the call is CUDA-graph capturable.
    """
    if triton is None:
        raise RuntimeError("paged_decode needs Triton, which is not installed")
    batch, hq, d = q.shape
    _, hkv, dk = k_cache.shape
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError("k_cache and v_cache must have one shape and one layout")
    if dk != d or hq % hkv != 0:
        raise ValueError(f"q {tuple(q.shape)} does not fit a cache of {hkv} heads x {dk}")
    if d > 256:
        raise ValueError(f"head_dim {d} > 256 is not supported")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or context_lens.shape != (batch,):
        raise ValueError("block_tables must be (B, M) and context_lens (B,)")

    out = torch.empty((batch, hq, d), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    cfg = config or default_config(q)
    group = hq // hkv
    splits = num_splits(batch, hkv, block_tables.shape[1], block_size, window, cfg, _sm_count(q.device))
    block_d = max(16, _pow2(d))
    direct = splits == 1
    window_arg = _NO_WINDOW if window is None else window
    if direct:
        acc = ms = ls = out  # unused by the direct path
    else:  # one allocation for the three partial tensors: eager calls are host-bound at small batch
        rows = batch * hq * splits
        partials = torch.empty(rows * (d + 2), dtype=torch.float32, device=q.device)
        acc, ms, ls = partials[: rows * d], partials[rows * d : rows * (d + 1)], partials[rows * (d + 1) :]

    _split_kernel[(batch, hkv, splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, acc, ms, ls,
        scale * _LOG2E, window_arg, splits,
        *q.stride(), *k_cache.stride(), *block_tables.stride(), *out.stride(),
        G=group, HEAD_DIM=d, BLOCK_H=max(16, _pow2(group)), BLOCK_D=block_d,
        BLOCK_N=cfg.block_n, BS=block_size, DIRECT=direct, IEEE=q.dtype == torch.float32, GRANULE=_GRANULE,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if not direct:
        _merge_kernel[(batch, hq)](
            acc, ms, ls, out, context_lens, window_arg, splits, *out.stride(),
            HEAD_DIM=d, BLOCK_S=16, BLOCK_D=block_d, GRANULE=_GRANULE, num_warps=4,
        )  # fmt: skip
    return out
