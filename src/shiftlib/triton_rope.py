"""RoPE on q and k, and the step's K/V into their cache slots, as one Triton kernel.

Compiled from PyTorch (:mod:`shiftlib.modules.fused`) the same work is three kernels, the two cache writes being
scatters of their own; at batch 1 each launch costs more than its work, three per layer. One program per token
reads its q, k, v and cos/sin rows once and writes the rotated q, k and both cache rows. The arithmetic is
float32 with one rounding at the end, as the compiled version's; CPU keeps Hugging Face's eager formula.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: rope_store falls back to the compiled formula
    triton = None


def supports(q, k, v, cos, sin, k_cache, v_cache) -> bool:
    """Rows of unit stride in the last dimension (the fused qkv's views are), an even head size, and one layout
    for both caches."""
    rows = all(t.stride(-1) == 1 for t in (q, k, v, cos, sin, k_cache, v_cache))
    same = k_cache.stride() == v_cache.stride()
    return triton is not None and q.is_cuda and q.shape[-1] % 2 == 0 and rows and same


if triton is not None:

    @triton.jit
    def _rotate(X, OUT, t, stride_xn, stride_xh, stride_on, stride_oh, c1, c2, s1, s2,
                H, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):  # fmt: skip
        """Hugging Face's ``x * cos + rotate_half(x) * sin`` for the H heads of token t; returns both halves."""
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_HALF)
        mask = (h[:, None] < H) & (d[None, :] < HALF)
        src = X + t * stride_xn + h[:, None] * stride_xh + d[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        o1 = (x1 * c1[None, :] - x2 * s1[None, :]).to(OUT.dtype.element_ty)
        o2 = (x2 * c2[None, :] + x1 * s2[None, :]).to(OUT.dtype.element_ty)
        dst = OUT + t * stride_on + h[:, None] * stride_oh + d[None, :]
        tl.store(dst, o1, mask=mask)
        tl.store(dst + HALF, o2, mask=mask)
        return o1, o2, h, d, mask

    @triton.jit
    def _rope_store_kernel(
        Q, K, V, COS, SIN, KC, VC, SLOTS, QO, KO,
        stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_cn, stride_sn,
        stride_cs, stride_ch, stride_qon, stride_qoh, stride_kon, stride_koh,
        HQ, HKV, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):  # fmt: skip
        t = tl.program_id(0)
        d = tl.arange(0, BLOCK_HALF)
        dm = d < HALF
        c1 = tl.load(COS + t * stride_cn + d, mask=dm, other=0.0).to(tl.float32)
        c2 = tl.load(COS + t * stride_cn + HALF + d, mask=dm, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + t * stride_sn + d, mask=dm, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + t * stride_sn + HALF + d, mask=dm, other=0.0).to(tl.float32)
        _rotate(Q, QO, t, stride_qn, stride_qh, stride_qon, stride_qoh, c1, c2, s1, s2, HQ, HALF, BLOCK_HQ, BLOCK_HALF)
        k1, k2, h, d2, mask = _rotate(K, KO, t, stride_kn, stride_kh, stride_kon, stride_koh, c1, c2, s1, s2,
                                      HKV, HALF, BLOCK_HKV, BLOCK_HALF)  # fmt: skip
        slot = tl.load(SLOTS + t).to(tl.int64)
        row = slot * stride_cs + h[:, None] * stride_ch + d2[None, :]
        tl.store(KC + row, k1.to(KC.dtype.element_ty), mask=mask)
        tl.store(KC + row + HALF, k2.to(KC.dtype.element_ty), mask=mask)
        src = V + t * stride_vn + h[:, None] * stride_vh + d2[None, :]
        tl.store(VC + row, tl.load(src, mask=mask, other=0.0).to(VC.dtype.element_ty), mask=mask)
        tl.store(VC + row + HALF, tl.load(src + HALF, mask=mask, other=0.0).to(VC.dtype.element_ty), mask=mask)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def rope_store(q, k, v, cos, sin, k_cache, v_cache, slots) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v: (tokens, heads, d); cos, sin: (tokens, d); the caches (slots, kv heads, d), rows of unit stride;
    ``slots``: (tokens,). Returns the rotated q and k, contiguous."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    q_out, k_out = q.new_empty(q.shape), k.new_empty(k.shape)
    if n == 0:
        return q_out, k_out
    _rope_store_kernel[(n,)](
        q, k, v, cos, sin, k_cache, v_cache, slots, q_out, k_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        hq, hkv, HALF=d // 2, BLOCK_HQ=_pow2(hq), BLOCK_HKV=_pow2(hkv), BLOCK_HALF=_pow2(d // 2), num_warps=4,
    )  # fmt: skip
    return q_out, k_out
