"""The one-kernel RoPE + cache write against the PyTorch formula it replaces (needs CUDA and Triton; CI skips it)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from shiftlib import triton_rope
from shiftlib.modules.fused import _rope_store


def rotary(positions: torch.Tensor, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (500_000 ** (torch.arange(0, d, 2, device="cuda").double() / d))
    angles = positions[:, None].double() * inv[None]
    emb = torch.cat([angles, angles], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "hq", "hkv", "d"), [(1, 32, 8, 128), (37, 4, 1, 64), (300, 6, 2, 96), (5, 4, 4, 80)])
def test_matches_the_formula(tokens: int, hq: int, hkv: int, d: int, dtype: torch.dtype):
    """Views of one fused qkv as the model passes them; unused cache slots stay NaN, so a stray write shows."""
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    qkv = torch.randn(tokens, hq + 2 * hkv, d, device="cuda", generator=gen).to(dtype)
    q, k, v = qkv.split([hq, hkv, hkv], 1)
    cos, sin = rotary(torch.randint(0, 100_000, (tokens,), device="cuda", generator=gen), d, dtype)
    caches = [torch.full((2 * tokens + 3, hkv, d), float("nan"), device="cuda", dtype=dtype) for _ in range(4)]
    slots = torch.randperm(2 * tokens + 3, device="cuda", generator=gen)[:tokens]
    assert triton_rope.supports(q, k, v, cos, sin, *caches[:2])

    got = triton_rope.rope_store(q, k, v, cos, sin, *caches[:2], slots)
    want = _rope_store(q.double(), k.double(), v.double(), cos.double(), sin.double(),
                       *(c.double() for c in caches[2:]), slots)  # fmt: skip
    tol = dict(rtol=1e-6, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    for a, b in zip((*got, *caches[:2]), (*want, *caches[2:])):
        torch.testing.assert_close(a.double(), b.double(), equal_nan=True, **tol)
    assert got[0].is_contiguous() and got[1].is_contiguous()
    assert torch.equal(caches[1][slots], v)  # V is copied, not rounded


def test_replays_in_a_cuda_graph():
    q, k, v = torch.randn(4, 12, 64, device="cuda").split([8, 2, 2], 1)
    cos, sin = rotary(torch.arange(4, device="cuda"), 64, torch.float32)
    kc, vc = torch.zeros(16, 2, 64, device="cuda"), torch.zeros(16, 2, 64, device="cuda")
    slots = torch.arange(4, device="cuda")
    triton_rope.rope_store(q, k, v, cos, sin, kc, vc, slots)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_out, _ = triton_rope.rope_store(q, k, v, cos, sin, kc, vc, slots)
    slots.copy_(torch.tensor([9, 3, 15, 0], device="cuda"))
    cos.copy_(torch.ones_like(cos))
    sin.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(q_out, q)  # the identity rotation, read from the new cos/sin
    torch.testing.assert_close(kc[slots], k)
