"""Prefix caching under load (issue 17's figure): requests that share a long system prompt, caching on and off.

    PYTHONPATH=src python examples/prefix_caching.py --preset llama-8b --out prefix.json

64 requests of a shared 2,048-token system prompt + a 128-token user part each, 64 new tokens (EOS ignored),
16 in flight at a time (closed loop); TTFT p50 and output tokens/s with ``enable_prefix_caching`` on and off.
``--step-overhead-tokens 256`` spreads each wave over a few steps (:func:`shiftlib.engine.scheduler.burst_share`;
``none``, the engine's default, admits it in one).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import statistics
import time

import torch

import shiftlib
from shiftlib.presets import preset_config, random_model


def run(model, prompts: list[list[int]], concurrency: int, new: int, caching: bool, overhead: int | None) -> dict:
    engine = shiftlib.Engine(model, enable_prefix_caching=caching, step_overhead_tokens=overhead)
    params = shiftlib.SamplingParams(max_new_tokens=new, ignore_eos=True)
    engine.generate(prompts[:2], params)  # warm-up (and, with caching, the system prompt is cached from here)
    pending, running, ttft = list(prompts), set(), []
    start = time.perf_counter()
    while pending or running:
        while pending and len(running) < concurrency:
            running.add(engine.add_request(pending.pop(0), params))
        engine.step()
        for rid in [r for r in running if engine.requests[r].finish_reason]:
            ttft.append(engine.completion(rid).ttft_s)
            running.discard(rid)
    seconds, tokens_run = time.perf_counter() - start, sum(s.num_tokens for s in engine.stats)
    del engine
    gc.collect()  # the next engine sizes its cache from the free memory
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"prefix_caching": caching, "ttft_ms_p50": 1e3 * statistics.median(ttft),
            "output_tok_per_s": len(prompts) * new / seconds, "seconds": seconds,
            "tokens_run": tokens_run}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-8b")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--system", type=int, default=2048)
    ap.add_argument("--user", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--step-overhead-tokens", type=lambda s: None if s == "none" else int(s),
                    default=inspect.signature(shiftlib.Engine).parameters["step_overhead_tokens"].default)
    ap.add_argument("--out", default="prefix.json")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = shiftlib.init_mesh(1, 1, device)
    config = preset_config(args.preset)
    model = shiftlib.parallelize(random_model(config, torch.bfloat16 if device == "cuda" else torch.float32, device), mesh)
    g = torch.Generator().manual_seed(0)
    vocab = config.vocab_size
    system = torch.randint(0, vocab, (args.system,), generator=g).tolist()
    prompts = [system + torch.randint(0, vocab, (args.user,), generator=g).tolist() for _ in range(args.requests)]
    # Untimed: the step shapes of both runs once (compiled kernels specialize on first sight), on another prompt.
    other = torch.randint(0, vocab, (args.system,), generator=g).tolist()
    warm = [other + torch.randint(0, vocab, (args.user,), generator=g).tolist() for _ in range(2 * args.concurrency)]
    for caching in (False, True):
        run(model, warm, args.concurrency, args.new, caching, args.step_overhead_tokens)
    runs = [run(model, prompts, args.concurrency, args.new, c, args.step_overhead_tokens) for c in (False, True)]
    result = {"args": vars(args), "runs": runs}
    off, on = result["runs"]
    result["ttft_ratio_off_over_on"] = off["ttft_ms_p50"] / on["ttft_ms_p50"]
    result["throughput_ratio_on_over_off"] = on["output_tok_per_s"] / off["output_tok_per_s"]
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
