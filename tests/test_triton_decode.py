"""Triton paged decode attention against a gather-then-SDPA reference (needs CUDA and Triton; CI skips it).

Cache slots outside every context are filled with NaN, so a kernel that reads past a context, a partial block or
an unused block-table entry shows up as NaN rather than as a small error.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from shiftlib.triton_decode import default_config, paged_decode

DEVICE = "cuda"
MIXED_LENS = [1, 17, 300, 2000, 0, 5]  # 0 is a padding row
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Per sequence: gather the context by the slot formula, then SDPA in float64 with the window as a mask."""
    batch, hq, d = q.shape
    out = torch.zeros(batch, hq, d, dtype=torch.float64, device=q.device)
    for b in range(batch):
        length = int(context_lens[b])
        if length == 0:
            continue
        j = torch.arange(length, device=q.device)
        slots = block_tables[b, j // block_size].long() * block_size + j % block_size
        k = k_cache[slots].double().transpose(0, 1)[None]  # (1, hkv, L, d)
        v = v_cache[slots].double().transpose(0, 1)[None]
        visible = j > length - 1 - window if window is not None else torch.ones_like(j, dtype=torch.bool)
        o = F.scaled_dot_product_attention(
            q[b, :, None].double()[None], k, v, attn_mask=visible[None, None, None], scale=scale, enable_gqa=True
        )
        out[b] = o[0, :, 0]
    return out


def make_case(
    lens: list[int],
    kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
    device: str = DEVICE,
) -> tuple[torch.Tensor, ...]:
    """A shuffled, non-contiguous block assignment with two spare table columns; all unused slots hold NaN."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = [math.ceil(n / block_size) for n in lens]
    width = max(per_seq) + 2
    num_blocks = sum(per_seq) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    spare = int(perm[-1])  # never written: NaN throughout
    table = torch.full((len(lens), width), spare, dtype=torch.int32)
    k_cache = torch.full((num_blocks * block_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    used = 0
    for b, (n, nb) in enumerate(zip(lens, per_seq)):
        table[b, :nb] = perm[used : used + nb].to(torch.int32)
        used += nb
        j = torch.arange(n)
        slots = table[b, j // block_size].long() * block_size + j % block_size
        k_cache[slots] = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype)
        v_cache[slots] = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype)
    q = (3 * torch.randn(len(lens), kv_heads * group, head_dim, generator=gen)).to(dtype)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    return tuple(t.to(device) for t in (q, k_cache, v_cache, table, lens_t))


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype
    assert torch.isfinite(out).all(), "NaN/inf in output: a masked or foreign slot was read"
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [None, 64])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32])
def test_matches_reference(block_size: int, group: int, head_dim: int, window: int | None, dtype: torch.dtype):
    q, kc, vc, bt, lens = make_case(MIXED_LENS, 2, group, head_dim, block_size, dtype)
    scale = head_dim**-0.5
    out = paged_decode(q, kc, vc, bt, lens, block_size, scale, window)
    check(out, reference(q, kc, vc, bt, lens, block_size, scale, window), dtype)
    assert (out[MIXED_LENS.index(0)] == 0).all()


@pytest.mark.parametrize("splits", [1, 2, 7, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_split_counts_agree(splits: int, dtype: torch.dtype):
    """Every split count, the direct one-split path included, gives the same answer, empty splits too."""
    q, kc, vc, bt, lens = make_case(MIXED_LENS + [4099], 4, 4, 128, 16, dtype, seed=1)
    cfg = dataclasses.replace(default_config(q), splits=splits)
    for window in (None, 100):
        out = paged_decode(q, kc, vc, bt, lens, 16, 0.1, window, config=cfg)
        check(out, reference(q, kc, vc, bt, lens, 16, 0.1, window), dtype)


@pytest.mark.parametrize("head_dim", [96, 256])
def test_odd_and_wide_head_dims(head_dim: int):
    q, kc, vc, bt, lens = make_case([3, 250, 0, 700], 2, 4, head_dim, 16, torch.bfloat16, seed=2)
    out = paged_decode(q, kc, vc, bt, lens, 16, head_dim**-0.5, None)
    check(out, reference(q, kc, vc, bt, lens, 16, head_dim**-0.5, None), torch.bfloat16)


@pytest.mark.parametrize("window", [1, 5, 10_000])
def test_window_edges_fp16_strided_q(window: int):
    """Window of one token, window wider than the context, and a q that is a strided view (as from a fused qkv)."""
    q, kc, vc, bt, lens = make_case([1, 4, 33, 600], 1, 8, 64, 32, torch.float16, seed=3)
    wide = torch.zeros(q.shape[0], q.shape[1], 3 * q.shape[2], dtype=q.dtype, device=q.device)
    wide[..., 64:128] = q
    q_view = wide[..., 64:128]
    out = paged_decode(q_view, kc, vc, bt, lens, 32, 0.125, window)
    check(out, reference(q, kc, vc, bt, lens, 32, 0.125, window), torch.float16)


@pytest.mark.parametrize("batch", [1, 64])
def test_cuda_graph_replay_follows_new_lengths(batch: int):
    """Captured once, replayed after the lengths, tables and queries change in place: no host state is baked in."""
    lens0 = [(37 * b + 5) % 900 + 1 for b in range(batch)]
    q, kc, vc, bt, lens = make_case(lens0, 8, 4, 128, 16, torch.bfloat16, seed=4)
    args = (q, kc, vc, bt, lens, 16, 128**-0.5, None)
    paged_decode(*args)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode(*args)
    shorter = [max(0, n - 3 * (b % 3)) for b, n in enumerate(lens0)]
    shorter[0] = 0
    order = list(reversed(range(batch)))  # sequences swap rows: table rows and lengths move together
    lens.copy_(torch.tensor([shorter[i] for i in order], dtype=torch.int32))
    bt.copy_(bt[order])
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    check(out, reference(*args), torch.bfloat16)
