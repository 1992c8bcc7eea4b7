"""Engine speed against the roofline on one GPU (issue 9's figures): decode step time and time to first token.

    PYTHONPATH=src python examples/decode_roofline.py --preset llama-8b --out figures.json [--profile trace.json]

An 8B-shaped bf16 Llama with random weights at P = 1. Decode steps: every request has a 512-token prompt, the
step time is the median over decode steps at a fixed batch (engine step wall time, and the GPU time of one
replay of the graph the steps ran). Rooflines: decode, the weights' GEMMs at the slower of reading the weights
(measured HBM bandwidth) and their FLOPs (measured bf16 matmul peak; it binds from batch ~200), plus reading
the KV attended over; prefill, FLOPs / matmul peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import shiftlib
from shiftlib.presets import preset_config, random_model


def hbm_bandwidth() -> float:
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 20 / (time.perf_counter() - t)  # read + write


def matmul_peak() -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 20 / (time.perf_counter() - t)


def decode_steps(model, batch: int, graphs: bool, prompt: int, new: int) -> dict:
    engine = shiftlib.Engine(model, num_blocks=(batch * (prompt + new) // 16) + batch * 2, max_num_seqs=batch,
                             max_num_tokens=16384, max_prefill_tokens=16384, cuda_graphs=graphs,
                             max_graph_batch=max(batch, 1))
    params = shiftlib.SamplingParams(max_new_tokens=new, ignore_eos=True)
    g = torch.Generator().manual_seed(batch)
    for _ in range(batch):
        engine.add_request(torch.randint(0, 128000, (prompt,), generator=g).tolist(), params)
    for _ in engine.stream():
        pass
    steps = [s.seconds for s in engine.stats if s.num_tokens == batch and s.num_sampled == batch][5:]
    out = {"batch": batch, "graphs": graphs, "step_ms_p50": 1e3 * statistics.median(steps), "steps": len(steps)}
    if graphs:  # GPU time of one replay, no host work
        graph = max(engine.runner.graphs.values(), key=lambda g: g.replays)  # the one the steps ran, on their inputs
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        out["replay_ms"] = start.elapsed_time(end) / 20
    del engine
    torch.cuda.empty_cache()
    return out


def ttft(model, prompt: int, chunk: int) -> float:
    engine = shiftlib.Engine(model, num_blocks=prompt // 16 + 4, max_num_tokens=chunk, cuda_graphs=False)
    times = []
    for _ in range(3):  # a new prompt each time: no prefix-cache hit
        ids = torch.randint(0, 128000, (prompt,)).tolist()
        rid = engine.add_request(ids, shiftlib.SamplingParams(max_new_tokens=1, ignore_eos=True))
        for _ in engine.stream():
            pass
        times.append(engine.completion(rid).ttft_s)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-8b")
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--out", default="figures.json")
    ap.add_argument("--profile", default=None)
    args = ap.parse_args()
    mesh = shiftlib.init_mesh(1, 1)
    config = preset_config(args.preset)
    model = shiftlib.parallelize(random_model(config, torch.bfloat16, "cuda"), mesh)
    torch.cuda.empty_cache()
    bw, peak = hbm_bandwidth(), matmul_peak()
    weight_bytes = sum(p.to_local().nbytes for p in set(model.parameters())) - model.model.embed_tokens._w.nbytes
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
    params = weight_bytes / 2
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "hbm_bytes_per_s": bw,
              "matmul_flops_per_s": peak, "weight_bytes_read_per_step": weight_bytes, "decode": [], "prefill": []}
    for b in [int(b) for b in args.batches.split(",") if b]:
        ctx = args.prompt + args.new // 2
        # The weights' GEMMs are bound by reading them or, at large batch, by their FLOPs; attention reads the KV.
        memory = (weight_bytes + b * ctx * kv_per_token) / bw
        roof = max(weight_bytes / bw, 2 * params * b / peak) + b * ctx * kv_per_token / bw
        for graphs in (False, True):
            r = decode_steps(model, b, graphs, args.prompt, args.new)
            r["roofline_ms"], r["memory_roofline_ms"] = 1e3 * roof, 1e3 * memory
            r["x_roofline"] = r["step_ms_p50"] / r["roofline_ms"]
            print(json.dumps(r), flush=True)
            result["decode"].append(r)
    for n, chunk in ((512, 512), (8192, 8192), (32768, 32768), (32768, 4096)):  # 4096: the engine's default budget
        t = ttft(model, n, chunk)
        flops = 2 * params * n + 2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * n * n
        r = {"prompt": n, "chunk": chunk, "ttft_ms": 1e3 * t, "matmul_peak_fraction": flops / t / peak}
        print(json.dumps(r), flush=True)
        result["prefill"].append(r)
    if args.profile:
        engine = shiftlib.Engine(model, num_blocks=128, cuda_graphs=False)
        engine.add_request(list(range(1, 513)), shiftlib.SamplingParams(max_new_tokens=12, ignore_eos=True))
        for _ in range(4):
            engine.step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                engine.step()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
        prof.export_chrome_trace(args.profile)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
