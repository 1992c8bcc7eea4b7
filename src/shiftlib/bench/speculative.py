"""Speculative decoding (SuffixDecoding) on one GPU: verify-step costs, the host cost of proposing, and TPOT.

    python -m shiftlib.bench.speculative --output docs/bench/speculative_h200.json

The model is the 8B-shaped random preset (bf16): no instruction-tuned checkpoint shipped in a package fits the
device's transfer limit. A verify step's cost does not depend on the weights; acceptance does, so the TPOT
workloads are ones whose repetition does not need a real model:

- ``repeat``: every prompt is asked twice; the second time its answer is already in the global index (agentic
  loops and retries re-issue requests). TPOT is measured on the second pass.
- ``ordinary``: fresh random prompts; drafts come only from what the random model's own output repeats.

Each runs at concurrency 1 (requests one after another) and 64 (all at once), with and without speculation;
at 64 also with speculation forced on (``speculative_max_batch=64``) to show what verification costs there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

import shiftlib
from shiftlib import Engine, SamplingParams
from shiftlib.engine.speculator import SuffixSpeculator
from shiftlib.presets import preset_config, random_model


def host_cost(batch: int = 64, steps: int = 100, prompt_len: int = 500, cached: int = 1024, seed: int = 0) -> dict:
    """Host milliseconds per step to propose drafts for ``batch`` requests (Zipf-distributed tokens, a global
    index of ``cached`` responses of 256 tokens): ``ordinary`` appends one token a step; ``copy`` copies a
    passage seen in its prompt, keeping each draft up to its first wrong token plus one."""
    rng = np.random.default_rng(seed)

    def zipf(n: int) -> list[int]:
        return [int(x) % 32000 for x in rng.zipf(1.2, n)]

    out = {}
    for kind in ("ordinary", "copy"):
        spec = SuffixSpeculator()
        t0 = time.perf_counter()
        for k in range(cached):
            spec.finish(-1 - k, zipf(256))
        fill_s = time.perf_counter() - t0
        passages = [zipf(prompt_len + 2000) for _ in range(batch)]
        prompts = [p[:prompt_len] + [1] for p in passages]
        outs = [p[:3] if kind == "copy" else [] for p in passages]
        t0 = time.perf_counter()
        for i in range(batch):
            spec.propose(i, prompts[i], outs[i], 16)
        first_ms = 1000 * (time.perf_counter() - t0)
        times, drafted, emitted = [], 0, 0
        for _ in range(steps):
            t0 = time.perf_counter()
            drafts = [spec.propose(i, prompts[i], outs[i], 16) for i in range(batch)]
            times.append(1000 * (time.perf_counter() - t0))
            for i, d in enumerate(drafts):
                if kind == "copy":
                    truth = passages[i][len(outs[i]) : len(outs[i]) + len(d) + 1]
                    ok = next((j for j, (a, b) in enumerate(zip(d, truth)) if a != b), len(d))
                    new = truth[: ok + 1]
                else:
                    new = zipf(1)
                outs[i] += new
                drafted, emitted = drafted + len(d), emitted + len(new)
        out[kind] = dict(
            batch=batch, step_ms_p50=round(statistics.median(times), 4), step_ms_mean=round(statistics.mean(times), 4),
            step_ms_max=round(max(times), 4), us_per_emitted_token=round(1000 * sum(times) / emitted, 3),
            mean_draft=round(drafted / (steps * batch), 2), first_proposals_ms=round(first_ms, 2),
            global_fill_s=round(fill_s, 3),
        )  # fmt: skip
    return out


def _prompt(rng: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=rng).tolist()


class _RandomDrafts:
    """The engine's speculator for :func:`verify_costs`: ``k`` random tokens for every request."""

    def __init__(self, rng: torch.Generator, vocab: int) -> None:
        self.rng, self.vocab, self.k = rng, vocab, 0

    def draft(self, running: list, max_context: int, max_rows: int | None) -> None:
        for seq in running:
            seq.draft = _prompt(self.rng, self.k, self.vocab)

    def finish(self, key: int, output: list[int]) -> None:
        pass


def verify_costs(model, vocab: int, batches: list[int], ks: list[int], context: int, steps: int = 10) -> dict:
    """Median step time of ``batch`` requests at ``context`` tokens verifying drafts of ``k`` random tokens
    (``k = 0``: a plain decode step); random drafts are rejected, so the context stays put."""
    rng = torch.Generator().manual_seed(0)
    out = {}
    for b in batches:
        blocks = b * (context + 64 + 16 * len(ks) * (steps + 2)) // 16 + 8 * b + 64
        engine = Engine(model, num_blocks=blocks, block_size=16, max_num_tokens=max(4096, b * context), max_num_seqs=b)
        engine.speculator = drafts = _RandomDrafts(rng, vocab)  # and so the loop that speculation runs in
        params = SamplingParams(max_new_tokens=len(ks) * (steps + 2) * 17 + 8, ignore_eos=True)
        for _ in range(b):
            engine.add_request(_prompt(rng, context, vocab), params)
        engine.step()  # the prefill
        row = {}
        for drafts.k in ks:
            times = []
            for _ in range(steps + 2):
                engine.step()
                s = engine.stats[-1]
                assert s.num_seqs == b and s.drafted == b * drafts.k, s
                times.append(s.seconds)
            row[str(drafts.k)] = round(1000 * statistics.median(times[2:]), 4)
        out[str(b)] = dict(step_ms=row, ratio_to_decode={k: round(v / row["0"], 3) for k, v in row.items()})
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def _run(engine: Engine, prompts: list[list[int]], new: int, concurrency: int) -> list:
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    if concurrency == 1:
        ids = []
        for p in prompts:
            ids.append(engine.add_request(p, params))
            while engine.has_unfinished:
                engine.step()
    else:
        ids = [engine.add_request(p, params) for p in prompts]
        while engine.has_unfinished:
            engine.step()
    return [engine.completion(i) for i in ids]


def tpot(model, vocab: int, workload: str, concurrency: int, speculative: str | None, max_batch: int, new: int,
         prompt_len: int, num: int) -> dict:  # fmt: skip
    rng = torch.Generator().manual_seed({"repeat": 1, "ordinary": 2}[workload])
    first = [_prompt(rng, prompt_len, vocab) for _ in range(num)]
    second = first if workload == "repeat" else [_prompt(rng, prompt_len, vocab) for _ in range(num)]
    blocks = num * (prompt_len + new + 32) // 16 + 2 * num + 64
    engine = Engine(model, num_blocks=blocks, block_size=16, max_num_seqs=max(num, 1), speculative=speculative,
                    num_speculative_tokens=16, speculative_max_batch=max_batch)  # fmt: skip
    _run(engine, first, new, concurrency)  # fills the global index; warms graphs
    engine.stats.clear()
    done = _run(engine, second, new, concurrency)
    tpots = [(c.latency_s - c.ttft_s) / (len(c.tokens) - 1) for c in done]
    verify = [s for s in engine.stats if s.drafted]
    accepted = sum(s.accepted for s in engine.stats)
    return dict(
        workload=workload, concurrency=concurrency, speculative=speculative, speculative_max_batch=max_batch,
        tpot_ms_p50=round(1000 * statistics.median(tpots), 4), tpot_ms_mean=round(1000 * statistics.mean(tpots), 4),
        decode_steps=sum(1 for s in engine.stats if s.num_sampled), verify_steps=len(verify),
        drafted=sum(s.drafted for s in engine.stats), accepted=accepted,
        accepted_per_verify_step_per_request=round(accepted / max(sum(s.num_seqs for s in verify), 1), 3),
        output_tokens=sum(len(c.tokens) for c in done),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-8b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", default="1,16,32,64")
    p.add_argument("--ks", default="0,4,8,16")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--new", type=int, default=128, help="new tokens per request in the TPOT runs")
    p.add_argument("--c1-requests", type=int, default=4)
    p.add_argument("--host-steps", type=int, default=100)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    result: dict = dict(preset=args.preset, host_cost=host_cost(steps=args.host_steps))
    print(json.dumps(result["host_cost"]), flush=True)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    mesh = shiftlib.init_mesh(1, 1, args.device)
    config = preset_config(args.preset)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    model = shiftlib.parallelize(random_model(config, dtype, device), mesh)
    vocab = config.vocab_size
    batches, ks = [int(x) for x in args.batches.split(",")], [int(x) for x in args.ks.split(",")]
    result["verify"] = verify_costs(model, vocab, batches, ks, args.context)
    print(json.dumps(result["verify"]), flush=True)
    runs = []
    for workload in ("repeat", "ordinary"):
        for c, num in ((1, args.c1_requests), (64, 64)):
            for spec, max_batch in ((None, 32), ("suffix", 32)) + ((("suffix", 64),) if c == 64 else ()):
                runs.append(tpot(model, vocab, workload, c, spec, max_batch, args.new, args.context, num))
                print(json.dumps(runs[-1]), flush=True)
    result["tpot"] = runs
    result.update(machine=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                  torch=torch.__version__, seconds=round(time.perf_counter() - t0, 1))  # fmt: skip
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
