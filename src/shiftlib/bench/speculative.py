"""Speculative decoding (SuffixDecoding) on one GPU: verify-step costs, the host cost of proposing, and TPOT.

    python -m shiftlib.bench.speculative --output docs/bench/speculative_h200.json
    python -m shiftlib.bench.speculative --model DIR --output docs/bench/speculative_smollm2_h200.json

Without ``--model`` the model is the 8B-shaped random preset (bf16). A verify step's cost does not depend on the
weights; acceptance does, so its TPOT workloads are ones whose repetition does not need a real model:

- ``repeat``: every prompt is asked twice; the second time its answer is already in the global index (agentic
  loops and retries re-issue requests). TPOT is measured on the second pass.
- ``ordinary``: fresh random prompts; drafts come only from what the random model's own output repeats.

With ``--model`` (an instruction-tuned checkpoint: SmolLM2-135M-Instruct ships in a package, see
``examples/gguf_checkpoint.py``) the workloads are chat requests through the model's template, greedy, ending at EOS:

- ``edit``: return a function of Python's standard library (300-800 tokens) with one comment added: the answer
  copies the prompt (code editing);
- ``multi-turn``: the second turn of a conversation asks for the first answer again, formatted as a list;
  the first turns run on the same engine, untimed, so their answers are in its global index too;
- ``ordinary``: questions that share nothing.

Each runs at concurrency 1 (requests one after another) and 64 (all at once), with and without speculation;
at 64 also with speculation forced on (``speculative_max_batch=64``) to show what verification costs there.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import statistics
import time

import numpy as np
import torch

import shiftlib
from shiftlib import Engine, SamplingParams
from shiftlib.engine.speculator import SuffixSpeculator, draft_limit
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
    """The engine's speculator for :func:`verify_costs`: ``k`` random tokens for every request (fewer where
    the engine's speculator would cut its drafts)."""

    def __init__(self, rng: torch.Generator, vocab: int) -> None:
        self.rng, self.vocab, self.k = rng, vocab, 0

    def wants(self, scheduler, in_flight: bool) -> bool:
        return True

    def draft(self, running: list, max_context: int, max_rows: int | None) -> bool:
        for seq in running:  # cut as the engine's speculator cuts them, to keep within the CUDA graphs
            seq.draft = _prompt(self.rng, draft_limit(len(running), self.k, max_rows), self.vocab)
        return self.k > 0

    def finish(self, key: int, output: list[int]) -> None:
        pass


def verify_costs(model, vocab: int, batches: list[int], ks: list[int], context: int, steps: int = 10) -> dict:
    """Median step time of ``batch`` requests at ``context`` tokens verifying drafts of ``k`` random tokens
    (``k = 0``: a plain decode step; ``draft_tokens_run``: ``k`` as the CUDA graphs cut it); random drafts are
    rejected, so the context stays put."""
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
        row, cut = {}, {}
        for drafts.k in ks:
            times, cut[str(drafts.k)] = [], draft_limit(b, drafts.k, engine.runner.graph_rows)
            for _ in range(steps + 2):
                engine.step()
                s = engine.stats[-1]
                assert s.num_seqs == b and s.drafted == b * cut[str(drafts.k)], s
                times.append(s.seconds)
            row[str(drafts.k)] = round(1000 * statistics.median(times[2:]), 4)
        ratios = {k: round(v / row["0"], 3) for k, v in row.items()}
        out[str(b)] = dict(step_ms=row, ratio_to_decode=ratios, draft_tokens_run=cut)
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def _run(engine: Engine, prompts: list[list[int]], params: SamplingParams, concurrency: int) -> list:
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
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    _run(engine, first, params, concurrency)  # fills the global index; warms graphs
    engine.stats.clear()
    done = _run(engine, second, params, concurrency)
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


_LIBRARY = ("textwrap", "heapq", "json.encoder", "argparse", "difflib", "shlex", "fractions", "statistics",
            "calendar", "configparser", "csv", "ipaddress", "string", "tokenize", "pprint", "dataclasses")  # fmt: skip
_TOPICS = ("the moon", "photosynthesis", "jazz", "volcanoes", "bicycles", "the printing press", "honeybees",
           "chess", "rainbows", "the Roman empire", "coffee", "glaciers", "electric cars", "origami", "whales",
           "the internet")  # fmt: skip
_ASKS = ("Explain {} to a ten-year-old.", "Write a short poem about {}.", "Give three surprising facts about {}.",
         "What are the pros and cons of {}?")  # fmt: skip


def library_functions(tokenizer, num: int, lo: int = 300, hi: int = 800) -> list[str]:
    """Sources of ``num`` functions of Python's standard library of ``lo``-``hi`` tokens, in a fixed order."""
    found = {}
    for name in _LIBRARY:
        module = importlib.import_module(name)
        for obj in vars(module).values():
            for f in [obj, *vars(obj).values()] if inspect.isclass(obj) else [obj]:
                if inspect.isfunction(f) and f.__module__ == name:
                    src = inspect.getsource(f)
                    if lo <= len(tokenizer(src)["input_ids"]) <= hi:
                        found.setdefault(f"{name}.{f.__qualname__}", inspect.cleandoc("\n" + src))
    if len(found) < num:
        raise ValueError(f"only {len(found)} library functions of {lo}-{hi} tokens, {num} asked for")
    return [found[k] for k in sorted(found)[:num]]


def _chat(tokenizer, turns: list[tuple[str, str]]) -> list[int]:
    roles = ("user", "assistant")
    msgs = [{"role": roles[i % 2], "content": text} for i, text in enumerate(t for turn in turns for t in turn if t)]
    return list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))


def chat_tpot(model, tokenizer, workload: str, concurrency: int, speculative: str | None, max_batch: int,
              num: int, new: int, edits: list[str]) -> dict:  # fmt: skip
    """TPOT of ``num`` requests of ``workload`` (see the module's docstring), greedy, ending at EOS or ``new``;
    ``edits``: the functions the ``edit`` requests ask to edit (:func:`library_functions`)."""
    questions = [a.format(t) for a in _ASKS for t in _TOPICS][:num]
    if workload == "edit":
        asks = [
            "Add a one-line comment above the first line of this Python function's body and return the whole "
            f"function, otherwise unchanged.\n\n```python\n{src}\n```"
            for src in edits
        ]
    else:
        asks = questions if workload == "ordinary" else [q.replace(".", " in a paragraph.") for q in questions]
    blocks = num * (1024 + 2 * new) // 16 + 64
    engine = Engine(model, num_blocks=blocks, block_size=16, max_num_seqs=max(num, 1), speculative=speculative,
                    num_speculative_tokens=16, speculative_max_batch=max_batch)  # fmt: skip
    params = SamplingParams(max_new_tokens=new)
    _run(engine, [_chat(tokenizer, [("Hello! Who are you?", "")])], params, 1)  # warms kernels, shares nothing
    prompts = [_chat(tokenizer, [(a, "")]) for a in asks]
    if workload == "multi-turn":
        first = _run(engine, prompts, params, concurrency)
        again = "Repeat your previous answer word for word, as a numbered list of its sentences."
        prompts = [_chat(tokenizer, [(a, tokenizer.decode(c.tokens, skip_special_tokens=True)), (again, "")])
                   for a, c in zip(asks, first)]  # fmt: skip
    engine.stats.clear()
    done = _run(engine, prompts, params, concurrency)
    tpots = [(c.latency_s - c.ttft_s) / (len(c.tokens) - 1) for c in done if len(c.tokens) > 1]
    verify = sum(s.num_seqs for s in engine.stats if s.drafted)
    accepted = sum(s.accepted for s in engine.stats)
    wall = sum(s.seconds for s in engine.stats)
    return dict(
        workload=workload, concurrency=concurrency, speculative=speculative, speculative_max_batch=max_batch,
        requests=num, tpot_ms_p50=round(1000 * statistics.median(tpots), 4),
        tpot_ms_mean=round(1000 * statistics.mean(tpots), 4), steps=len(engine.stats), verify_rows=verify,
        drafted=sum(s.drafted for s in engine.stats), accepted=accepted,
        accepted_per_verify=round(accepted / max(verify, 1), 3),
        tokens_per_verify=round((accepted + verify) / max(verify, 1), 3),
        output_tokens=sum(len(c.tokens) for c in done), output_tok_s=round(sum(len(c.tokens) for c in done) / wall, 1),
        finish_reasons={r: sum(c.finish_reason == r for c in done) for r in ("stop", "length")},
        output_head=tokenizer.decode(done[0].tokens[:48]),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-8b")
    p.add_argument("--model", default=None, help="an instruction-tuned checkpoint: chat workloads instead")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", default="1,16,32,64")
    p.add_argument("--ks", default="0,4,8,16")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--new", type=int, default=128, help="new tokens per request in the TPOT runs (--model: at most)")
    p.add_argument("--c1-requests", type=int, default=4)
    p.add_argument("--c64-requests", type=int, default=64)
    p.add_argument("--workloads", default=None, help="comma-separated (default: all of the model's or preset's)")
    p.add_argument("--host-steps", type=int, default=100)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    result: dict = dict(preset=args.model or args.preset, host_cost=host_cost(steps=args.host_steps))
    print(json.dumps(result["host_cost"]), flush=True)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    mesh = shiftlib.init_mesh(1, 1, args.device)
    chosen = args.workloads.split(",") if args.workloads else None
    if args.model:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = shiftlib.from_pretrained(args.model, mesh, dtype=dtype)
        workloads = chosen or ("edit", "multi-turn", "ordinary")
        # scanned once; the c = 1 runs take the first ones
        edits = library_functions(tokenizer, max(args.c1_requests, args.c64_requests)) if "edit" in workloads else []

        def measure(workload: str, c: int, spec: str | None, max_batch: int, num: int) -> dict:
            return chat_tpot(model, tokenizer, workload, c, spec, max_batch, num, args.new, edits[:num])
    else:
        config = preset_config(args.preset)
        device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
        model = shiftlib.parallelize(random_model(config, dtype, device), mesh)
        vocab = config.vocab_size
        batches, ks = [int(x) for x in args.batches.split(",")], [int(x) for x in args.ks.split(",")]
        result["verify"] = verify_costs(model, vocab, batches, ks, args.context)
        print(json.dumps(result["verify"]), flush=True)
        workloads = chosen or ("repeat", "ordinary")

        def measure(workload: str, c: int, spec: str | None, max_batch: int, num: int) -> dict:
            return tpot(model, vocab, workload, c, spec, max_batch, args.new, args.context, num)
    runs = []
    for workload in workloads:
        for c, num in ((1, args.c1_requests), (64, args.c64_requests)):
            for spec, max_batch in ((None, 32), ("suffix", 32)) + ((("suffix", 64),) if c == 64 else ()):
                runs.append(measure(workload, c, spec, max_batch, num))
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
