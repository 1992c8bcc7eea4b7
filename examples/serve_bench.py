"""The HTTP server against the in-process engine, on the same engine in one run (issue 14's speed check).

The benchmark's closed-loop loads (``shiftlib bench``: 512-token prompts, 64 new tokens, greedy, ``ignore_eos``)
run first straight into the engine, then through ``shiftlib serve``'s HTTP API (streamed completions with
token-id prompts, the way load generators for OpenAI endpoints send them), driven by client processes apart from
the server (:mod:`http_load`), on prompts of their own. The same engine (weights, cache, captured CUDA graphs)
serves both, so the difference is what serving costs: the per-step request broadcast and hand-off to the HTTP
process, HTTP, SSE, detokenization; and, since HTTP arrivals spread over steps, how many steps run prefill.
Also measured: the per-step cost of the request broadcast between CPU gloo ranks.

    python examples/serve_bench.py --preset llama-8b --concurrency 1,64,256 --output docs/bench/serve_h200.json
    python examples/serve_bench.py --preset tiny --concurrency 1,8 --output /tmp/serve_cpu.json     # CPU check

The random model has no tokenizer, so a byte-level BPE one of the model's vocabulary size is made here: its
tokens are 1-3 random bytes, which makes detokenization hold and flush partial UTF-8 as real text does.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
from array import array
from pathlib import Path

import torch
import torch.distributed as dist
from http_load import closed_loop  # examples/, next to this file

import shiftlib
from shiftlib.bench.driver import Clock, drive
from shiftlib.bench.metrics import RequestRecord, summarize
from shiftlib.bench.suite import machine, versions
from shiftlib.bench.workloads import Load, concurrency_sweep, warm_up
from shiftlib.presets import preset_config, random_model
from shiftlib.serve.frontend import FrontendConfig
from shiftlib.serve.loop import FrontendPipe, Lockstep, ran_prefill
from shiftlib.serve.protocol import Limits
from shiftlib.serve.sync import Arrival, StepMessage, StepSync


def byte_level_tokenizer(vocab_size: int, directory: Path) -> None:
    """A byte-level BPE tokenizer of exactly ``vocab_size`` tokens (256 bytes, then 2- and 3-byte merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    alphabet.sort()
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = []
    pairs = ((a, b) for a in alphabet for b in alphabet)
    triples = ((a + b, c) for a in alphabet for b in alphabet for c in alphabet)
    for left, right in (*pairs, *triples):
        if len(vocab) >= vocab_size:
            break
        vocab[left + right] = len(vocab)
        merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    assert len(fast) == vocab_size, len(fast)
    fast.save_pretrained(directory)


def loads(levels: list[int], input_len: int, output_len: int, vocab: int, seed: int) -> list[Load]:
    """``shiftlib bench``'s closed loops; low levels get more waves, so c = 1 has 8 requests for its p50. The two
    halves get prompts of their own (``seed``): the second would otherwise hit the prefix cache the first filled."""
    return [concurrency_sweep([c], input_len, output_len, vocab, max(2, math.ceil(8 / c)), seed)[0] for c in levels]


# -- the HTTP side -------------------------------------------------------------------------------------------------


def run_http(url: str, load: Load, processes: int) -> tuple[list[RequestRecord], float]:
    """One closed-loop level over HTTP (:mod:`http_load`)."""
    rows = closed_loop(url, "bench", [(r.prompt, r.output_len) for r in load.requests], load.concurrency,
                      processes)
    t0 = min(r[0] for r in rows)
    records = [RequestRecord(sent - t0, prompt_len, tokens, first - t0, done - t0)
               for sent, prompt_len, tokens, first, done in rows]
    return records, max(r.finish_s for r in records)


def _step_counts(url: str) -> dict[str, float]:
    """The server's steps so far, and those that ran prompt tokens (eagerly: no CUDA graph), from ``/metrics``."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    counts = {"steps": 0.0, "prefill_steps": 0.0}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            name = sample.name.removeprefix("shiftlib:").removesuffix("_total")
            if name in counts:
                counts[name] += sample.value
    return counts


def in_process_steps(stats) -> dict[str, int]:
    """:func:`_step_counts` for the in-process half, from the engine's own step records."""
    return {"steps": len(stats), "prefill_steps": sum(map(ran_prefill, stats))}


def driver_main(url: str, plan: list[Load], processes: int, out: str) -> None:
    """The client side: warm the HTTP path, run every level, write the records, then stop the server."""
    import httpx

    for _ in range(3):
        httpx.post(url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2, "stream": True}, timeout=600)
    results = []
    for load in plan:
        before = _step_counts(url)
        records, duration = run_http(url, load, processes)
        steps = {k: v - before[k] for k, v in _step_counts(url).items()}
        results.append(summarize(records, [], duration) | {"load": load.label} | steps)
    Path(out).write_text(json.dumps(results))
    os.kill(os.getppid(), signal.SIGTERM)  # the server drains and returns


# -- the per-step broadcast between CPU ranks ------------------------------------------------------------------------


def _sync_rank(rank: int, world: int, port: int, steps: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sync, tick = StepSync(dist.group.WORLD), torch.zeros(1)
    params = shiftlib.SamplingParams(max_new_tokens=64)
    payloads = {
        "nothing new": None,
        "1 arrival of 512 tokens": StepMessage([Arrival(0, array("i", range(512)), params)]),
        "64 arrivals of 512 tokens": StepMessage([Arrival(i, array("i", range(512)), params) for i in range(64)]),
        "8 aborts": StepMessage(aborts=list(range(8))),
    }
    result = {}
    for name, message in [("step alone", "skip"), *payloads.items()]:
        for timed in (False, True):  # the first pass warms the connections
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                if message != "skip":
                    sync.exchange(message if rank == 0 else None)
                dist.all_reduce(tick)  # stands for the step's own collectives: the ranks stay in lockstep
            if timed:
                result[name] = (time.perf_counter() - start) / steps
    base = result.pop("step alone")
    if rank == 0:
        queue.put({name: round(1e6 * (t - base), 1) for name, t in result.items()})
    dist.destroy_process_group()


def sync_cost(world: int, steps: int = 500) -> dict:
    """Microseconds a step gains from the broadcast, per payload, on ``world`` gloo ranks of this host."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_sync_rank, args=(r, world, port, steps, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out = queue.get()
    for p in procs:
        p.join()
    return out


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the run ---------------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-8b")
    p.add_argument("--concurrency", default="1,64,256")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--client-processes", type=int, default=8)
    p.add_argument("--sync-ranks", default="2,4", help="gloo world sizes for the broadcast cost")
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    report: dict = {"command": " ".join(["python", *sys.argv]), "machine": machine(), "versions": versions()}
    report["sync_us_per_step"] = {f"{w} ranks": sync_cost(w) for w in map(int, args.sync_ranks.split(",")) if w > 1}
    print("broadcast cost per step (µs):", report["sync_us_per_step"], flush=True)

    config = preset_config(args.preset)
    mesh = shiftlib.init_mesh(1, 1, device)
    model = shiftlib.parallelize(random_model(config, dtype, mesh.device_type), mesh)
    levels = [int(c) for c in args.concurrency.split(",")]
    plan = loads(levels, args.input_len, args.output_len, config.vocab_size, seed=0)
    http_plan = loads(levels, args.input_len, args.output_len, config.vocab_size, seed=1)
    engine = shiftlib.Engine(model, max_num_seqs=max(256, *levels), num_blocks=None if cuda else 4096)
    report["in_process"] = []
    for load in plan:
        drive(engine, warm_up(load, load.concurrency, config.vocab_size), Clock())
        engine.stats.clear()
        records, _ = drive(engine, load, Clock())
        report["in_process"].append(summarize(records, [], max(r.finish_s for r in records)) | {"load": load.label}
                                    | in_process_steps(engine.stats))
        print("in-process", load.label, report["in_process"][-1]["output_tok_per_s"], "tok/s", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1) + "\n")  # kept if the HTTP half fails

    with tempfile.TemporaryDirectory() as tmp:
        byte_level_tokenizer(config.vocab_size, Path(tmp))
        frontend = FrontendPipe(FrontendConfig("127.0.0.1", 0, tmp, "bench", 1 << 20), shutdown_timeout=60)
        error = frontend.wait_listening()
        if error:
            raise SystemExit(error)
        frontend.start(Limits(engine.max_context, engine.cache.capacity_tokens, config.vocab_size), 256, "auto")
        results = Path(tmp) / "http.json"
        client = mp.get_context("spawn").Process(target=driver_main,
                                                 args=(frontend.url, http_plan, args.client_processes, str(results)))
        client.start()
        loop = Lockstep(engine, StepSync(None), frontend)
        http_cpu = _cpu_seconds(frontend.process.pid)
        try:
            loop.run()
            http_cpu = _cpu_seconds(frontend.process.pid) - http_cpu
        finally:
            frontend.close()
        client.join()
        report["http"] = json.loads(results.read_text())
        tokens = sum(level["output_tokens"] for level in report["http"])
        report["http_process_cpu_us_per_output_token"] = round(1e6 * http_cpu / tokens, 1)
        print("HTTP process CPU per output token (µs):", report["http_process_cpu_us_per_output_token"], flush=True)
    rows = []
    for ours, http in zip(report["in_process"], report["http"]):
        rows.append({"load": ours["load"],
                     "output_tok_per_s": (ours["output_tok_per_s"], http["output_tok_per_s"]),
                     "throughput_ratio": round(http["output_tok_per_s"] / ours["output_tok_per_s"], 4),
                     "ttft_ms_p50": (ours["ttft_ms_p50"], http["ttft_ms_p50"]),
                     "ttft_p50_gap_ms": round(http["ttft_ms_p50"] - ours["ttft_ms_p50"], 3),
                     "tpot_ms_p50": (ours["tpot_ms_p50"], http["tpot_ms_p50"]),
                     "prefill_steps": (f"{ours['prefill_steps']}/{ours['steps']}",
                                       f"{http['prefill_steps']:.0f}/{http['steps']:.0f}")})
        print(json.dumps(rows[-1]), flush=True)
    report["summary"] = rows
    args.output.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
