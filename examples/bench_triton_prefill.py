"""Micro-benchmark of the prefill attention of one step: the Triton varlen kernel against SDPA per sequence.

Llama-3.1-8B attention shapes on one rank (32 query heads, 8 KV heads, head_dim 128, bf16, block 16), four steps:
(a) 16 sequences of 128 new tokens after 2,048 cached, (b) 64 whole prompts of 512 tokens, (c) one 8,192-token
chunk after 24,576 cached, (d) one 4,096-token chunk after 28,672 (a 32k prompt's last chunk at the default
budget). The kernel runs with the tiles ``attend`` picks for the step's longest context. *old* is
``_attend_by_sequence`` (flash SDPA for a whole prompt, a masked gather of the context otherwise), *new* is
``attend`` on GPU (the kernel plus its row bookkeeping, or cuDNN for long chunks), *kernel* the bare call. Each is
``triton.testing.do_bench`` (L2 flushed, launch cost included). TFLOP/s counts the causal work only: 4 x head_dim
x q heads per visible (query, key) pair.

Run: ``PYTHONPATH=src python examples/bench_triton_prefill.py [--sweep] [--out prefill.json]``.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import triton
import triton.testing

from shiftlib.paged_attention import AttentionBatch, _attend_by_sequence, attend
from shiftlib.triton_prefill import PrefillConfig, default_config, paged_prefill

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
SCALE = HEAD_DIM**-0.5
CASES = {  # name: (sequences, cached tokens each, new tokens each)
    "a_16x128_after_2048": (16, 2048, 128),
    "b_64x512_prompts": (64, 0, 512),
    "c_8192_after_24576": (1, 24576, 8192),
    "d_4096_after_28672": (1, 28672, 4096),
}
SWEEP = [PrefillConfig(128, 32, 4, 3), PrefillConfig(128, 32, 4, 2), PrefillConfig(128, 32, 4, 4),
         PrefillConfig(128, 16, 4, 4), PrefillConfig(128, 64, 4, 3), PrefillConfig(256, 32, 8, 3),
         PrefillConfig(128, 64, 8, 3), PrefillConfig(256, 64, 8, 3), PrefillConfig(128, 128, 8, 3)]  # fmt: skip


def make_step(seqs: int, cached: int, new: int, gen: torch.Generator):
    """A cache over shuffled blocks holding every context, the step's q, and its own K/V (the new rows' cache)."""
    ctx = cached + new
    per_seq = math.ceil(ctx / BLOCK_SIZE)
    table = torch.randperm(seqs * per_seq, generator=gen).to(torch.int32).view(seqs, per_seq).cuda()
    k_cache = torch.randn(seqs * per_seq * BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    v_cache = torch.randn_like(k_cache)
    pos = torch.arange(cached, ctx, device="cuda").repeat(seqs)
    seq = torch.arange(seqs, device="cuda").repeat_interleave(new)
    slots = table[seq, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
    batch = AttentionBatch(
        query_pos=pos,
        write_slots=slots,
        block_tables=table,
        block_size=BLOCK_SIZE,
        context_lens=torch.full((seqs,), ctx, dtype=torch.int32, device="cuda"),
        query_start=list(range(0, seqs * new + 1, new)),
        context_lens_host=[ctx] * seqs,
    )
    q = torch.randn(seqs * new, Q_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    return q, k_cache[slots], v_cache[slots], k_cache, v_cache, batch


def causal_flops(seqs: int, cached: int, new: int) -> float:
    pairs = seqs * sum(cached + i + 1 for i in range(new))
    return 4.0 * HEAD_DIM * Q_HEADS * pairs


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="also time other tile/warp/stage choices of the kernel")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shapes": {"q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE,
                   "dtype": str(DTYPE)},  # fmt: skip
        "cases": {},
    }
    print(f"{'case':>22} {'old ms':>8} {'TF/s':>6} {'new ms':>8} {'TF/s':>6} {'kernel ms':>9} {'TF/s':>6} {'x':>6}")
    for name, (seqs, cached, new) in CASES.items():
        q, k, v, kc, vc, batch = make_step(seqs, cached, new, gen)
        old = _attend_by_sequence(q, k, v, kc, vc, batch, SCALE, None, first=0)
        out = attend(q, k, v, batch, (kc, vc), SCALE, None)
        qs, lens = batch.query_start_device, batch.context_lens
        kernel_args = (q, kc, vc, batch.block_tables, qs, lens, batch.query_pos, BLOCK_SIZE, SCALE, None)
        t_old = bench(lambda: _attend_by_sequence(q, k, v, kc, vc, batch, SCALE, None, first=0))
        t_new = bench(lambda: attend(q, k, v, batch, (kc, vc), SCALE, None))
        t_kernel = bench(lambda: paged_prefill(*kernel_args, max_context=cached + new))
        flops = causal_flops(seqs, cached, new)
        row = {
            "sequences": seqs, "cached": cached, "new": new, "causal_tflop": flops / 1e12,
            "old_ms": t_old, "new_ms": t_new, "kernel_ms": t_kernel,
            "old_tflops": flops / t_old / 1e9, "new_tflops": flops / t_new / 1e9,
            "kernel_tflops": flops / t_kernel / 1e9,
            "speedup": t_old / t_new, "max_abs_diff_vs_old": (out.float() - old.float()).abs().max().item(),
            "config": str(default_config(q, cached + new)),
        }  # fmt: skip
        print(
            f"{name:>22} {t_old:>8.3f} {row['old_tflops']:>6.0f} {t_new:>8.3f} {row['new_tflops']:>6.0f}"
            f" {t_kernel:>9.3f} {row['kernel_tflops']:>6.0f} {row['speedup']:>6.1f}"
            f"  diff {row['max_abs_diff_vs_old']:.3g}"
        )
        if args.sweep:
            row["sweep"] = sweep(kernel_args, flops)
        results["cases"][name] = row
        del q, k, v, kc, vc, batch, old, out, kernel_args
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


def sweep(kernel_args: tuple, flops: float) -> list[dict]:
    """Kernel time of other launch choices, best first, to pick the defaults from."""
    rows = []
    for cfg in SWEEP:
        try:
            t = bench(lambda: paged_prefill(*kernel_args, config=cfg))
        except Exception as exc:  # noqa: BLE001 - a choice that does not compile or fit is just skipped
            print(f"    {cfg}: {type(exc).__name__}")
            continue
        rows.append({"config": str(cfg), "ms": t, "tflops": flops / t / 1e9})
    rows.sort(key=lambda r: r["ms"])
    for r in rows:
        print(f"    {r['ms']:8.3f} ms {r['tflops']:6.0f} TF/s  {r['config']}")
    return rows


if __name__ == "__main__":
    main()
