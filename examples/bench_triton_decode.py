"""Micro-benchmark of ``shiftlib.triton_decode.paged_decode``: microseconds and achieved KV bandwidth.

Two timings per shape. *eager*: ``triton.testing.do_bench`` of one call (L2 flushed each time, host launch cost
included). *graph*: one CUDA graph holding one call per "layer", each layer with its own cache, so that, as in
a real decode step, no call finds the previous call's KV in L2; the time is per call. GB/s counts the KV bytes
a call must read (context x kv heads x head_dim x 2 tensors) plus q and the output.

Run: ``PYTHONPATH=src python examples/bench_triton_decode.py [--sweep]``.
"""

from __future__ import annotations

import argparse
import math

import torch
import triton.testing

from shiftlib.triton_decode import DecodeConfig, _sm_count, default_config, num_splits, paged_decode

KV_HEADS, Q_HEADS, HEAD_DIM, BLOCK_SIZE = 8, 32, 128, 16
DTYPE = torch.bfloat16
SWEEP_SHAPES = {(1, 512, 32), (1, 512, 2048), (1, 32768, 2048)}  # (batch, ctx, table width)


def make_layer(batch: int, ctx: int, width: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """One layer's cache with every sequence at ``ctx`` tokens over shuffled blocks; ``width`` table columns."""
    per_seq = math.ceil(ctx / BLOCK_SIZE)
    num_blocks = batch * per_seq
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32).view(batch, per_seq)
    table = torch.zeros(batch, max(width, per_seq), dtype=torch.int32)
    table[:, :per_seq] = perm
    k = torch.randn(num_blocks * BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    v = torch.randn_like(k)
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return q, k, v, table.cuda(), lens


def bytes_moved(batch: int, ctx: int) -> int:
    kv = batch * ctx * KV_HEADS * HEAD_DIM * 2 * 2
    return kv + 2 * batch * Q_HEADS * HEAD_DIM * 2


def time_graph(layers: list[tuple[torch.Tensor, ...]], cfg: DecodeConfig | None, reps: int = 20) -> float:
    """Microseconds per call, replaying one graph that walks through every layer's cache."""

    def step() -> None:
        for q, k, v, bt, lens in layers:
            paged_decode(q, k, v, bt, lens, BLOCK_SIZE, HEAD_DIM**-0.5, None, config=cfg)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * len(layers))


def layers_for(batch: int, ctx: int, width: int) -> list[tuple[torch.Tensor, ...]]:
    """Enough layers that their caches together are several times the 50 MB L2."""
    gen = torch.Generator().manual_seed(0)
    count = max(2, math.ceil(256e6 / bytes_moved(batch, ctx)))
    return [make_layer(batch, ctx, width, gen) for _ in range(min(count, 64))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="also time other tile/warp/stage/split choices")
    args = parser.parse_args()

    buf = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    copy_ms = triton.testing.do_bench(buf.clone, warmup=10, rep=100)
    print(f"copy ceiling: {2 * buf.numel() / copy_ms / 1e6:.0f} GB/s (1 GiB clone, read + write)")
    buf = None

    shapes = [(1, 512, 32), (1, 512, 2048), (1, 32768, 2048), (8, 4096, 256)]
    shapes += [(16, 576, 36), (32, 576, 36), (64, 576, 36), (256, 576, 36)]
    print(f"bf16, {Q_HEADS} q heads / {KV_HEADS} kv heads x {HEAD_DIM}, block {BLOCK_SIZE}")
    print(f"{'batch':>5} {'ctx':>6} {'M':>5} {'splits':>6} {'eager us':>9} {'GB/s':>6} {'graph us':>9} {'GB/s':>6}")
    for batch, ctx, width in shapes:
        layers = layers_for(batch, ctx, width)
        q, bt = layers[0][0], layers[0][3]
        cfg = default_config(q)
        splits = num_splits(batch, KV_HEADS, bt.shape[1], BLOCK_SIZE, None, cfg, _sm_count(q.device))
        eager = 1e3 * triton.testing.do_bench(
            lambda a=layers[0]: paged_decode(*a, BLOCK_SIZE, HEAD_DIM**-0.5, None), warmup=25, rep=200
        )
        graph = time_graph(layers, None)
        nbytes = bytes_moved(batch, ctx)
        print(
            f"{batch:>5} {ctx:>6} {bt.shape[1]:>5} {splits:>6} {eager:>9.2f} {nbytes / eager / 1e3:>6.0f}"
            f" {graph:>9.2f} {nbytes / graph / 1e3:>6.0f}"
        )
        if args.sweep and (batch, ctx, width) in SWEEP_SHAPES:
            sweep(layers, batch, ctx)
        del layers
        torch.cuda.empty_cache()


def sweep(layers: list[tuple[torch.Tensor, ...]], batch: int, ctx: int) -> None:
    """Graph time of other launch choices, best first, to pick the defaults from."""
    results = []
    for block_n in (32, 64):
        for warps in (4,):
            for stages in (2, 3):
                for per_sm in (2, 4, 8):
                    cfg = DecodeConfig(block_n=block_n, num_warps=warps, num_stages=stages, programs_per_sm=per_sm)
                    try:
                        results.append((time_graph(layers, cfg, reps=5), cfg))
                    except Exception as exc:  # noqa: BLE001 - a choice that does not compile or fit is just skipped
                        print(f"    {cfg}: {type(exc).__name__}")
    nbytes = bytes_moved(batch, ctx)
    for t, cfg in sorted(results, key=lambda r: r[0])[:6]:
        print(f"    {t:8.2f} us {nbytes / t / 1e3:6.0f} GB/s  {cfg}")


if __name__ == "__main__":
    main()
