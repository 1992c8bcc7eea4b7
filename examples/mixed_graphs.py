"""Mixed and prefill steps as CUDA graphs, on and off in turn (``mixed_graph_tokens``; the engine's default pick).

    PYTHONPATH=src python examples/mixed_graphs.py --tokens 0,1024,0,1024 --out mixed.json

An 8B-shaped bf16 Llama with random weights at P = 1, one engine per setting (0: mixed steps run eagerly): the
benchmark's closed loops (512-token prompts, 64 new tokens, greedy, EOS ignored) at c = 1, 64 and 256, each on
prompts of its own after a warm-up on others of the same lengths. Settings alternate, so drift in the GPU's
clock shows as a difference between repeats rather than between settings.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

import shiftlib
from shiftlib.bench.driver import Clock, drive
from shiftlib.bench.metrics import summarize
from shiftlib.bench.workloads import concurrency_sweep, warm_up
from shiftlib.presets import preset_config, random_model

LOADS = ((1, 12), (64, 2), (256, 2), (64, 2))  # (concurrency, waves)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-8b")
    p.add_argument("--tokens", default="0,1024,0,1024", help="mixed_graph_tokens of each engine, in turn")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    config = preset_config(args.preset)
    mesh = shiftlib.init_mesh(1, 1, "cuda")
    model = shiftlib.parallelize(random_model(config, torch.bfloat16, mesh.device_type), mesh)
    runs = []
    for tokens in map(int, args.tokens.split(",")):
        start = time.perf_counter()
        engine = shiftlib.Engine(model, mixed_graph_tokens=tokens)
        row: dict = {"mixed_graph_tokens": tokens, "build_s": round(time.perf_counter() - start, 1)}
        for seed, (c, waves) in enumerate(LOADS):
            load = concurrency_sweep([c], 512, 64, config.vocab_size, waves, seed + 10 * len(runs))[0]
            drive(engine, warm_up(load, c, config.vocab_size), Clock())
            records, _ = drive(engine, load, Clock())
            s = summarize(records, [], max(r.finish_s for r in records))
            row[f"{seed}: c={c}"] = {k: s[k] for k in ("output_tok_per_s", "ttft_ms_p50", "tpot_ms_p50")}
        runs.append(row)
        print(json.dumps(row), flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"machine": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
