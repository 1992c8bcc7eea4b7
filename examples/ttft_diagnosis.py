"""Where a c = 1 TTFT goes: idle gaps before a request, and a prefill's host launch time against its GPU time.

    PYTHONPATH=src python examples/ttft_diagnosis.py --preset llama-8b --mixed-graph-tokens 0 --out ttft.json

One engine on an 8B-shaped bf16 Llama with random weights (P = 1): requests of 512 new tokens one at a time,
after idle gaps of 0-300 ms (sleeping, or spinning the CPU), give each gap's TTFT; then single prefills, timed
from the host (until ``step()`` returns, and until the GPU is done) and with CUDA events. A step whose launch
time equals its GPU time is bound by the host's kernel launches. On CPU (``--preset tiny``) only the gaps mean
anything.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

import shiftlib
from shiftlib import SamplingParams
from shiftlib.presets import preset_config, random_model

GAPS_S = (0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-8b")
    p.add_argument("--mixed-graph-tokens", type=int, default=0, help="0: prefills run eagerly")
    p.add_argument("--requests", type=int, default=12, help="per gap")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    config = preset_config(args.preset)
    mesh = shiftlib.init_mesh(1, 1, "cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    model = shiftlib.parallelize(random_model(config, dtype, mesh.device_type), mesh)
    engine = shiftlib.Engine(model, mixed_graph_tokens=args.mixed_graph_tokens, num_blocks=None if cuda else 1024)
    rng = random.Random(0)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def request(gap_s: float, spin: bool) -> float:
        end = time.perf_counter() + gap_s
        while spin and time.perf_counter() < end:
            pass
        time.sleep(max(end - time.perf_counter(), 0))
        start = time.perf_counter()
        rid = engine.add_request([rng.randrange(config.vocab_size) for _ in range(512)],
                                 SamplingParams(max_new_tokens=16, ignore_eos=True))
        first = None
        while engine.has_unfinished:
            events = engine.step()
            if first is None and any(r == rid for r, _ in events):
                first = time.perf_counter() - start
        engine.completion(rid)
        return 1000 * first

    def prefill() -> dict:
        rid = engine.add_request([rng.randrange(config.vocab_size) for _ in range(512)],
                                 SamplingParams(max_new_tokens=4, ignore_eos=True))
        sync()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else []
        start = time.perf_counter()
        if events:
            events[0].record()
        engine.step()  # launches the prefill and returns: its token is read by the next step
        launched = time.perf_counter()
        if events:
            events[1].record()
        sync()
        done = time.perf_counter()
        while engine.has_unfinished:
            engine.step()
        engine.completion(rid)
        gpu = events[0].elapsed_time(events[1]) if events else None
        return {"launch_ms": round(1000 * (launched - start), 2), "done_ms": round(1000 * (done - start), 2),
                "gpu_ms": gpu and round(gpu, 2)}

    for _ in range(5):
        request(0, False)
    gaps = {}
    for gap in GAPS_S:
        for spin in (False, True) if gap else (False,):
            ttft = [request(gap, spin) for _ in range(args.requests)]
            key = f"{1000 * gap:g} ms {'spin' if spin else 'sleep'}"
            gaps[key] = {"ttft_ms_p50": round(statistics.median(ttft), 2), "min": round(min(ttft), 2),
                         "max": round(max(ttft), 2)}
            print(key, gaps[key], flush=True)
    prefills = [prefill() for _ in range(16)]
    print(prefills, flush=True)
    with open(args.out, "w") as f:
        json.dump({"preset": args.preset, "mixed_graph_tokens": args.mixed_graph_tokens,
                   "machine": torch.cuda.get_device_name() if cuda else "cpu", "ttft_after_idle_gap": gaps,
                   "prefill_512": prefills}, f, indent=1)


if __name__ == "__main__":
    main()
