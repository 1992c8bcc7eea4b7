"""The prefill budget of a step that also decodes (``max_prefill_tokens``), swept 1k-8k (issue 17's pick).

    PYTHONPATH=src python examples/prefill_budget.py --budgets 1024,2048,4096,8192 --out budget.json

An 8B-shaped bf16 Llama with random weights at P = 1, one engine per budget (``max_num_tokens`` is at least the
budget + 256, so the budget binds): the benchmark's closed loops (512-token prompts, 64 new tokens, greedy,
EOS ignored) at c = 64 and 256, and the prefix workload of ``examples/prefix_caching.py`` (64 requests of a shared
2,048-token prompt + 128 tokens of their own, c = 16). Every timed load has prompts of its own, warmed up first on
others of the same lengths, so no timed prompt is a prefix-cache hit it should not be.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time

import torch

import shiftlib
from shiftlib.bench.driver import Clock, drive
from shiftlib.bench.metrics import summarize
from shiftlib.bench.workloads import Load, RequestSpec, concurrency_sweep, warm_up
from shiftlib.presets import preset_config, random_model

KEYS = ("output_tok_per_s", "tpot_ms_p50", "tpot_ms_p99", "ttft_ms_p50", "num_steps")


def timed(engine, load: Load) -> dict:
    start = time.perf_counter()
    requests, steps = drive(engine, load, Clock())
    summary = summarize(requests, steps, time.perf_counter() - start)
    return {k: summary[k] for k in KEYS}


def shared_prefix(vocab: int, seed: str, n: int = 64) -> Load:
    rng = random.Random(seed)
    system = [rng.randrange(vocab) for _ in range(2048)]
    return Load("concurrency", [RequestSpec(system + [rng.randrange(vocab) for _ in range(128)], 64) for _ in range(n)],
                concurrency=16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-8b")
    ap.add_argument("--budgets", default="1024,2048,4096,8192")
    ap.add_argument("--out", default="budget.json")
    args = ap.parse_args()
    mesh = shiftlib.init_mesh(1, 1, "cuda")
    model = shiftlib.parallelize(random_model(preset_config(args.preset), torch.bfloat16, "cuda"), mesh)
    vocab, result = model.config.vocab_size, {}
    for budget in map(int, args.budgets.split(",")):
        engine = shiftlib.Engine(model, max_num_tokens=max(4096, budget + 256), max_prefill_tokens=budget)
        r = result[budget] = {}
        for load in concurrency_sweep([64, 256], 512, 64, vocab, waves=2, seed=budget):
            drive(engine, warm_up(load, load.concurrency, vocab), Clock())
            r[load.label] = timed(engine, load)
        for caching in (True, False):
            engine.scheduler.prefix_caching = caching
            drive(engine, shared_prefix(vocab, f"warm-{budget}-{caching}", 16), Clock())
            r["prefix " + ("on" if caching else "off")] = timed(engine, shared_prefix(vocab, f"{budget}-{caching}"))
        print(budget, json.dumps(r), flush=True)
        del engine
        gc.collect()  # the next engine sizes its cache from the free memory
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
