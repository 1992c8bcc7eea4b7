"""Triton paged prefill attention against a float64 gather-then-SDPA reference (needs CUDA and Triton; CI skips it).

As in test_triton_decode, cache slots outside every context are filled with NaN, so a kernel that reads past a
context, a partial block or an unused block-table entry shows up as NaN rather than as a small error. Windows and
block sizes are run-time arguments of the kernel, so each test sweeps them without compiling again.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from shiftlib.paged_attention import AttentionBatch, attend
from shiftlib.triton_prefill import paged_prefill

DEVICE = "cuda"
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# (cached, new) per sequence: whole prompts, suffixes after a prefix, one-token chunks, no queries at all,
# and chunks that end or start mid-block.
MIXED = [(0, 37), (2000, 128), (5, 1), (300, 0), (0, 1), (16, 16), (1000, 300), (0, 200), (7, 250)]
WINDOWS = [None, 1, 5, 64, 700, 10_000]


def reference(q, k_cache, v_cache, block_tables, starts, lens, query_pos, block_size, scale, window) -> torch.Tensor:
    """Per sequence: gather the context by the slot formula, then SDPA in float64 with the causal window as a mask.
    Rows no sequence owns stay zero."""
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    for b, length in enumerate(lens):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        j = torch.arange(length, device=q.device)
        slots = block_tables[b, j // block_size].long() * block_size + j % block_size
        qpos = query_pos[lo:hi, None]
        mask = j <= qpos
        if window is not None:
            mask &= j > qpos - window
        k, v = (c[slots].double().transpose(0, 1)[None] for c in (k_cache, v_cache))
        o = F.scaled_dot_product_attention(
            q[lo:hi].double().transpose(0, 1)[None], k, v, attn_mask=mask, scale=scale, enable_gqa=True
        )
        out[lo:hi] = o[0].transpose(0, 1)
    return out


def make_case(chunks, kv_heads, group, head_dim, block_size, dtype, seed=0, first_row=0, pad_rows=0):
    """Sequence ``b`` has ``chunks[b] = (cached, new)``: its queries are the ``new`` last of ``cached + new`` context
    indices, rows ``starts[b]:starts[b + 1]`` after ``first_row`` rows that no sequence owns; ``pad_rows`` more
    follow. Blocks are shuffled and non-contiguous, with two spare table columns; all unused slots hold NaN."""
    gen = torch.Generator().manual_seed(seed)
    lens = [c + n for c, n in chunks]
    per_seq = [math.ceil(n / block_size) for n in lens]
    num_blocks = sum(per_seq) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.full((len(lens), max(per_seq) + 2), int(perm[-1]), dtype=torch.int32)  # spare: NaN throughout
    k_cache = torch.full((num_blocks * block_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    starts, pos, used = [first_row], [], 0
    for b, ((cached, new), nb) in enumerate(zip(chunks, per_seq)):
        table[b, :nb] = perm[used : used + nb].to(torch.int32)
        used += nb
        j = torch.arange(cached + new)
        slots = table[b, j // block_size].long() * block_size + j % block_size
        k_cache[slots] = torch.randn(cached + new, kv_heads, head_dim, generator=gen).to(dtype)
        v_cache[slots] = torch.randn(cached + new, kv_heads, head_dim, generator=gen).to(dtype)
        starts.append(starts[-1] + new)
        pos += range(cached, cached + new)
    rows = starts[-1] + pad_rows
    q = (3 * torch.randn(rows, kv_heads * group, head_dim, generator=gen)).to(dtype)
    query_pos = torch.tensor([0] * first_row + pos + [0] * pad_rows)
    dev = [t.to(DEVICE) for t in (q, k_cache, v_cache, table, query_pos)]
    return (*dev, starts, lens)


def run(case, block_size: int, scale: float, window: int | None, long_tiles: bool = False):
    """The kernel's output and the reference, on the rows the sequences own; ``long_tiles``: the tiles it takes
    for contexts of 2,048 tokens and more, whatever these are."""
    q, kc, vc, bt, qpos, starts, lens = case
    qs = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    cl = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    longest = 4096 if long_tiles else None
    out = paged_prefill(q, kc, vc, bt, qs, cl, qpos, block_size, scale, window, max_context=longest)
    ref = reference(q, kc, vc, bt, starts, lens, qpos, block_size, scale, window)
    return out[starts[0] : starts[-1]], ref[starts[0] : starts[-1]]


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert out.dtype == dtype
    assert torch.isfinite(out).all(), f"NaN/inf in output: a masked or foreign slot was read {what}"
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol, msg=lambda m: f"{what}\n{m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("long_tiles", [False, True])
def test_matches_reference(long_tiles: bool, group: int, head_dim: int, dtype: torch.dtype):
    case = make_case(MIXED, 2, group, head_dim, 16, dtype)
    for window in WINDOWS:
        check(*run(case, 16, head_dim**-0.5, window, long_tiles), dtype, f"window={window}")


@pytest.mark.parametrize("block_size", [1, 2, 8, 32, 64, 256])
def test_block_sizes(block_size: int):
    case = make_case(MIXED, 2, 4, 128, block_size, torch.bfloat16, seed=1)
    for window in (None, 100):
        check(*run(case, block_size, 0.1, window), torch.bfloat16, f"window={window}")


@pytest.mark.parametrize(("dtype", "group"), [(torch.bfloat16, 2), (torch.float32, 1)])
def test_head_dim_256(dtype: torch.dtype, group: int):
    case = make_case([(0, 70), (500, 33), (3, 1)], 2, group, 256, 16, dtype, seed=2)
    for window in (None, 40):
        check(*run(case, 16, 256**-0.5, window), dtype, f"window={window}")


def test_group_not_a_power_of_two():
    """Three query heads per KV head: the group is padded to four rows, the pad rows neither read nor written."""
    case = make_case(MIXED, 3, 3, 128, 16, torch.bfloat16, seed=3)
    for window in (None, 64):
        check(*run(case, 16, 128**-0.5, window), torch.bfloat16, f"window={window}")


def test_offset_rows_and_strided_q():
    """Sequences that start after foreign rows, padding after them, and a q that is a view into a fused qkv."""
    q, kc, vc, bt, qpos, starts, lens = make_case(MIXED, 2, 4, 64, 16, torch.float16, seed=4, first_row=9, pad_rows=5)
    wide = torch.zeros(q.shape[0], q.shape[1] + 4, q.shape[2], dtype=q.dtype, device=DEVICE)
    wide[:, 2:-2] = q
    out, ref = run((wide[:, 2:-2], kc, vc, bt, qpos, starts, lens), 16, 0.125, 30)
    check(out, ref, torch.float16)


def test_one_long_chunk_after_long_prefix():
    """Many query tiles of one sequence over many key tiles: the unmasked middle, the diagonal, the window's tail."""
    case = make_case([(5000, 1500)], 8, 4, 128, 16, torch.bfloat16, seed=5)
    for window, long_tiles in itertools.product((None, 1000), (False, True)):
        check(*run(case, 16, 128**-0.5, window, long_tiles), torch.bfloat16, f"window={window}")


@settings(max_examples=30, deadline=None)
@given(
    chunks=st.lists(st.tuples(st.integers(0, 600), st.integers(0, 150)), min_size=1, max_size=12),
    group=st.sampled_from([1, 3, 4, 8]),
    block_size=st.sampled_from([1, 4, 16, 64]),
    window=st.one_of(st.none(), st.integers(1, 800)),
    long_tiles=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_mixes(chunks, group: int, block_size: int, window: int | None, long_tiles: bool, seed: int):
    case = make_case(chunks, 2, group, 128, block_size, torch.bfloat16, seed=seed)
    check(*run(case, block_size, 128**-0.5, window, long_tiles), torch.bfloat16)


@pytest.mark.parametrize("window", [None, 48])
def test_attend_routes_prefill_through_the_kernel(window: int | None):
    """A mixed step on GPU: decode rows (the decode kernel), then chunks (this one), then padding (zeros)."""
    chunks = [(40, 1), (999, 1), (0, 90), (200, 17), (33, 0), (64, 64)]
    q, kc, vc, bt, qpos, starts, lens = make_case(chunks, 2, 4, 128, 16, torch.bfloat16, seed=6, pad_rows=3)
    k = v = kc.new_zeros(q.shape[0], 2, 128)  # the step's own K/V, already in the cache
    batch = AttentionBatch(
        query_pos=qpos,
        write_slots=torch.zeros_like(qpos),
        block_tables=bt,
        block_size=16,
        context_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
        query_start=starts,
        context_lens_host=lens,
        num_decodes=2,
    )
    out = attend(q, k, v, batch, (kc, vc), 0.1, window)
    ref = reference(q, kc, vc, bt, starts, lens, qpos, 16, 0.1, window)
    check(out[: starts[-1]], ref[: starts[-1]], torch.bfloat16)
    assert (out[starts[-1] :] == 0).all()


@pytest.mark.parametrize("window", [None, 300])
@pytest.mark.parametrize("cached", [0, 1000, 5000])
def test_a_long_chunk_beside_decodes(window: int | None, cached: int):
    """Decodes and one chunk of 4,096 tokens, whole or after a cached prefix: the chunk goes through cuDNN (split at
    the prefix; with a window, through the kernel); both match the reference."""
    q, kc, vc, bt, qpos, starts, lens = make_case([(40, 1), (999, 1), (cached, 4096)], 2, 4, 128, 16, torch.bfloat16,
                                                  seed=8)  # fmt: skip
    own = torch.arange(starts[2], starts[3], device=DEVICE)
    slots = bt[2, qpos[own] // 16].long() * 16 + qpos[own] % 16
    batch = AttentionBatch(
        query_pos=qpos, write_slots=torch.zeros_like(qpos), block_tables=bt, block_size=16,
        context_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE), query_start=starts, context_lens_host=lens,
        num_decodes=2,
    )  # fmt: skip
    qkv = torch.zeros(q.shape[0], 12, 128, dtype=q.dtype, device=DEVICE)  # k, v strided as the model's are
    qkv[:, :8] = q
    q, k, v = qkv.split([8, 2, 2], dim=1)
    k[own], v[own] = kc[slots], vc[slots]
    out = attend(q, k, v, batch, (kc, vc), 0.1, window)
    check(out, reference(q, kc, vc, bt, starts, lens, qpos, 16, 0.1, window), torch.bfloat16, f"window={window}")


def test_fixed_shape_mixed_step_replays_in_a_cuda_graph():
    """The mixed-step graph's attention: captured once over fixed sequence slots, replayed for two different mixes
    of decodes and chunks (decode lengths and query offsets change in place); each matches the reference."""
    slots, rows, width = 8, 512, 80
    static = dict(
        q=torch.zeros(rows, 8, 128, dtype=torch.bfloat16, device=DEVICE),
        qpos=torch.zeros(rows, dtype=torch.long, device=DEVICE),
        bt=torch.zeros(slots, width, dtype=torch.int32, device=DEVICE),
        lens=torch.zeros(slots, dtype=torch.int32, device=DEVICE),
        decode_lens=torch.zeros(slots, dtype=torch.int32, device=DEVICE),
        prefill_start=torch.zeros(slots + 1, dtype=torch.int32, device=DEVICE),
    )
    mixes = [[(40, 1), (999, 1), (0, 90), (200, 17), (64, 64)], [(7, 1), (0, 300), (1000, 1), (16, 16)]]
    cases = [make_case(m, 2, 4, 128, 16, torch.bfloat16, seed=7 + i) for i, m in enumerate(mixes)]
    kc, vc = (torch.full((max(c[1].shape[0] for c in cases),) + cases[0][1].shape[1:], float("nan"),
                         dtype=torch.bfloat16, device=DEVICE) for _ in range(2))
    batch = AttentionBatch(
        query_pos=static["qpos"], write_slots=static["qpos"], block_tables=static["bt"], block_size=16,
        context_lens=static["lens"], query_start=[], context_lens_host=[], decode_lens=static["decode_lens"],
        prefill_start=static["prefill_start"],
    )  # fmt: skip

    def step():
        return attend(static["q"], static["q"], static["q"], batch, (kc, vc), 0.1, None)

    def fill(case, mix):
        q, k_cache, v_cache, bt, qpos, starts, lens = case
        kc[: k_cache.shape[0]], vc[: v_cache.shape[0]] = k_cache, v_cache
        nd, b = next(i for i, c in enumerate(mix + [(0, 0)]) if c[1] != 1), len(mix)  # leading decodes
        static["q"].zero_()[: q.shape[0]] = q
        static["qpos"].zero_()[: q.shape[0]] = qpos
        static["bt"].zero_()[:b, : bt.shape[1]] = bt
        static["lens"].zero_()[:b] = torch.tensor(lens, dtype=torch.int32)
        static["decode_lens"].zero_()[:nd] = static["lens"][:nd]
        offsets = [starts[nd]] * (nd + 1) + starts[nd + 1 :] + [starts[-1]] * (slots - b)
        static["prefill_start"].copy_(torch.tensor(offsets, dtype=torch.int32))

    fill(cases[0], mixes[0])
    step()  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for case, mix in zip(cases, mixes):
        fill(case, mix)
        graph.replay()
        q, k_cache, v_cache, bt, qpos, starts, lens = case
        check(out[: starts[-1]], reference(q, k_cache, v_cache, bt, starts, lens, qpos, 16, 0.1, None), torch.bfloat16)
