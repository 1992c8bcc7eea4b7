"""A cost model of shift, TP, SP and DP at P = 2, 4, 8, built from pieces measured on one GPU.

Per-rank compute. A rank's work in every mode is the work of a *smaller model on one GPU*:

* TP mode at P ranks: all N tokens through H/P query heads, max(K/P, 1) KV heads, intermediate I/P and vocab
  V/P: exactly the model whose config divides those by P (:func:`slice_config`), run unparallelized.
* SP mode on a tp x sp mesh: N/sp tokens through the tp-shard of the weights, and attention over all N tokens
  for H/P heads. Attention over N tokens x H/P heads moves the same KV bytes and does the same FLOPs as over
  N/sp tokens x H/tp heads, so the rank's work is the slice model of tp at N/sp tokens.
* DP with P replicas: the whole model (slice of 1) at N/P tokens.

So one function, the step time of the slice model of p at n tokens, measured on one GPU (:func:`measure`) for
p in 1, 2, 4, 8, gives every configuration's compute. Layer counts: measured at two depths, a step is
fixed + layers x per-layer time, which extends the 8-layer 70B-width preset to the 80 layers of the real model.

Communication is added from collectives measured on 2 x H200 (NVLink, NCCL, torch 2.11, eager; DESIGN.md):
all-reduce 8 KiB 0.034 ms, 64 MiB 0.27 ms, 256 MiB 0.97 ms; all-to-all 256 MiB 0.53 ms. Between points the
time is linear in bytes; for P ranks the bandwidth part scales with the bytes a ring moves per rank
(2(P-1)/P for all-reduce, (P-1)/P for all-to-all and all-gather), the latency part (0.034 ms) is held fixed.
These are assumptions, to be checked by the P = 2, 4, 8 runs.

Run ``python -m shiftlib.bench.costmodel measure ...`` on one GPU, ``... predict MEASUREMENT.json ...`` anywhere.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shiftlib.bench import simulate
from shiftlib.bench.metrics import RequestRecord, summarize
from shiftlib.engine.engine import Engine
from shiftlib.engine.runner import mixed_graph_tokens

# (bytes, ms) on 2 x H200, DESIGN.md.
ALL_REDUCE_2XH200 = ((1 * 4096 * 2, 0.034), (8192 * 4096 * 2, 0.27), (32768 * 4096 * 2, 0.97))
ALL_TO_ALL_2XH200 = ((0, 0.034), (32768 * 4096 * 2, 0.53))
H200_BYTES = 139 * 2**30  # usable HBM per GPU, as torch reports it
BYTES_BF16 = 2
MAX_PREFILL_TOKENS = inspect.signature(Engine).parameters["max_prefill_tokens"].default  # what the loads run with
STEP_OVERHEAD_TOKENS = inspect.signature(Engine).parameters["step_overhead_tokens"].default
MIXED_DECODE_TOKENS = 64  # new tokens of the requests that decode through a mixed-step measurement


def slice_config(config, p: int, layers: int | None = None):
    """The model whose one-GPU step is a rank's work in TP mode at P = p: heads, KV heads, MLP and vocab / p."""
    c = config.__class__(**config.to_dict())
    H, K, V, I = config.num_attention_heads, config.num_key_value_heads, config.vocab_size, config.intermediate_size
    if H % p or V % p or I % p or (K >= p and K % p) or (K < p and p % K):
        raise ValueError(
            f"cannot slice heads={H}, kv_heads={K}, intermediate={I}, vocab={V} {p} ways: each must divide "
            f"by p (or p by the KV heads); choose p among the common divisors"
        )
    c.head_dim = getattr(config, "head_dim", None) or config.hidden_size // H
    c.num_attention_heads, c.num_key_value_heads = H // p, max(K // p, 1)
    c.intermediate_size, c.vocab_size = I // p, V // p
    if layers is not None:
        c.num_hidden_layers = layers
    return c


def weight_bytes(config, bytes_per_param: int = BYTES_BF16) -> dict[str, int]:
    """Parameter bytes of the whole model: per decoder layer and for embedding + head."""
    D, H, K, I, V = (
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.intermediate_size,
        config.vocab_size,
    )
    d = getattr(config, "head_dim", None) or D // H
    layer = D * (H + 2 * K) * d + H * d * D + 3 * D * I + 2 * D
    ends = V * D * (1 if config.tie_word_embeddings else 2) + D
    return dict(
        layer=layer * bytes_per_param,
        ends=ends * bytes_per_param,
        total=(layer * config.num_hidden_layers + ends) * bytes_per_param,
    )


# -- measuring on one GPU ---------------------------------------------------------------------------------------


def _median_tail(xs: list[float], skip: int) -> float:
    if not xs:
        raise RuntimeError(
            "no step of the expected shape ran: the engine scheduled differently than the measurement assumes"
        )
    return statistics.median(xs[skip:] if len(xs) > skip else xs)


def _prompt(rng: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=rng).tolist()


def _decode_ms(engine, batch: int, context: int, steps: int, vocab: int, rng, max_num_tokens: int) -> float:
    """Median time of a decode step of ``batch`` requests at about ``context`` tokens each (after 2 warm steps).

    The prompts are prefilled over several steps, so the first requests decode while the last still prefill:
    each asks for enough tokens that all ``batch`` decode together for ``steps + 2`` steps after that.
    """
    from shiftlib import SamplingParams

    stagger = math.ceil(batch * context / max_num_tokens) + 2
    params = SamplingParams(max_new_tokens=stagger + steps + 3, ignore_eos=True)
    ids = [engine.add_request(_prompt(rng, context, vocab), params) for _ in range(batch)]
    engine.stats.clear()
    while engine.has_unfinished:
        engine.step()
    for i in ids:
        engine.completion(i)
    times = [s.seconds for s in engine.stats if s.num_seqs == batch and s.num_tokens == batch]
    return 1000 * _median_tail(times, 2)


def _steady_ms(engine, lengths: list[int], decodes: int, vocab: int, rng, steps: int = 6) -> float:
    """Median period of ``steps`` equal steps, each prefilling new prompts of ``lengths`` tokens beside the
    ``decodes`` requests that decode.

    The engine reads a step's tokens while the next one runs, so a step's ``seconds`` is the wall time of a later
    call: only in a run of equal steps is that the step's own time.
    """
    from shiftlib import SamplingParams

    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    ids: list[int] = []
    engine.stats.clear()
    for _ in range(steps):
        ids += [engine.add_request(_prompt(rng, k, vocab), one) for k in lengths]
        engine.step()
    while any(engine.requests[i].finish_reason is None for i in ids):
        engine.step()
    for i in ids:
        engine.completion(i)
    shape = (decodes + sum(lengths), decodes + len(lengths))
    times = [s.seconds for s in list(engine.stats)[:steps] if (s.num_tokens, s.num_seqs) == shape]
    return 1000 * _median_tail(times, 1)


def _lengths(tokens: int, context: int) -> list[int]:
    return [context] * (tokens // context) + ([tokens % context] if tokens % context else [])


def _prefill_ms(engine, tokens: int, context: int, vocab: int, rng) -> float:
    """Time of a step that prefills ``tokens`` tokens made of prompts of at most ``context`` tokens each."""
    return _steady_ms(engine, _lengths(tokens, context), 0, vocab, rng)


def _ttft_ms(engine, length: int, vocab: int, rng, repeats: int = 2) -> float:
    """Time to first token of one prompt of ``length`` tokens (prefilled in chunks of the engine's budget)."""
    from shiftlib import SamplingParams

    out = []
    for _ in range(repeats):
        rid = engine.add_request(_prompt(rng, length, vocab), SamplingParams(max_new_tokens=1, ignore_eos=True))
        while engine.has_unfinished:
            engine.step()
        out.append(engine.completion(rid).ttft_s)
    return 1000 * min(out)


def _mixed_ms(engine, batch: int, sizes: list[int], context: int, vocab: int, rng) -> dict:
    """Time of steps that decode ``batch`` requests at about ``context`` tokens each and prefill n prompt tokens
    (prompts of at most ``context``), for each n of ``sizes``: the steps of an engine under load."""
    from shiftlib import SamplingParams

    decoding = SamplingParams(max_new_tokens=MIXED_DECODE_TOKENS, ignore_eos=True)
    ids = [engine.add_request(_prompt(rng, context, vocab), decoding) for _ in range(batch)]
    engine.stats.clear()
    while not (engine.stats and engine.stats[-1].num_seqs == batch == engine.stats[-1].num_tokens):
        engine.step()  # until all of them decode
    out = {}
    for n in sizes:
        out[str(n)] = round(_steady_ms(engine, _lengths(n, context), batch, vocab, rng), 4)
    for i in ids:
        engine.abort(i)
    while engine.has_unfinished:
        engine.step()
    for i in ids:
        engine.completion(i)
    return out


def measure(
    preset: str,
    parts: list[int],
    layers: list[int] | None,
    batches: list[int],
    prefill_tokens: list[int],
    context: int,
    long_prompts: list[int],
    decode_steps: int = 8,
    mixed_batches: list[int] | None = None,
    mixed_prefill: list[int] | None = None,
    max_num_tokens: int = 4096,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Step times of the slice model of each p in ``parts`` on this one device (a 1 x 1 mesh), in ms.

    ``layers``: the depths to measure at (two or more give the per-layer and fixed parts); default the preset's.
    ``mixed_batches`` x ``mixed_prefill``: the mixed steps timed (decode rows x prompt tokens); default
    ``batches`` x the ``prefill`` sizes within the engine's prefill budget of a step that decodes.
    """
    import shiftlib
    from shiftlib.bench.suite import machine, versions
    from shiftlib.presets import preset_config, random_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    config = preset_config(preset)
    layers = layers or [config.num_hidden_layers]
    mixed_batches = batches if mixed_batches is None else mixed_batches
    mixed_prefill = [n for n in prefill_tokens if n <= MAX_PREFILL_TOKENS] if mixed_prefill is None else mixed_prefill
    mesh = shiftlib.init_mesh(1, 1, device)
    dev = mesh.device_type if device == "cpu" else torch.device("cuda", torch.cuda.current_device())
    runs = []
    for L in layers:
        for p in parts:
            cfg = slice_config(config, p, L)
            if progress:
                print(f"measure {preset} layers={L} p={p}", file=sys.stderr, flush=True)
            model = shiftlib.parallelize(random_model(cfg, dtype, dev, seed), mesh)
            # Decode timings come from an engine whose budget prefills every batch in one step, so its requests
            # decode together from the next step on (no mixed prefill + decode steps in between); prefill steps
            # of n tokens fit in it too. TTFT uses the benchmark's budget, with its chunked prefill.
            budget = max(max_num_tokens, max(batches) * context)
            graphs = mixed_graph_tokens(p, max_num_tokens)  # as many as an engine on p ranks replays
            longest = context + max(decode_steps, MIXED_DECODE_TOKENS) + 8
            # Room for the prompts of two steps besides the decodes: the one in flight and the one being scheduled.
            prompts = 2 * max(mixed_prefill + prefill_tokens)
            blocks = math.ceil((1.2 * max(batches) * longest + prompts) / 16) + max(batches) + 8
            engine = shiftlib.Engine(
                model, num_blocks=blocks, block_size=16, max_num_tokens=budget, mode="tp",
                max_num_seqs=max(batches) + math.ceil(prompts / context) + 2, mixed_graph_tokens=graphs,
            )  # fmt: skip
            rng = torch.Generator().manual_seed(seed)
            run = dict(layers=L, p=p, weights_bytes=weight_bytes(cfg)["total"], decode_ms={}, prefill_ms={},
                       mixed_ms={}, ttft_ms={})  # fmt: skip
            _decode_ms(engine, 1, context, 2, cfg.vocab_size, rng, budget)  # compile, autotune, first allocations
            for b in batches:
                run["decode_ms"][str(b)] = round(
                    _decode_ms(engine, b, context, decode_steps, cfg.vocab_size, rng, budget), 4
                )
            for n in prefill_tokens:
                run["prefill_ms"][str(n)] = round(_prefill_ms(engine, n, context, cfg.vocab_size, rng), 4)
            for b in mixed_batches:
                run["mixed_ms"][str(b)] = _mixed_ms(engine, b, mixed_prefill, context, cfg.vocab_size, rng)
            del engine
            if long_prompts:
                engine = shiftlib.Engine(
                    model,
                    num_blocks=math.ceil(1.2 * max(long_prompts) / 16) + 8,
                    block_size=16,
                    max_num_tokens=max_num_tokens,
                    max_num_seqs=4,
                    mode="tp",
                    mixed_graph_tokens=graphs,
                )
                for n in long_prompts:
                    run["ttft_ms"][str(n)] = round(_ttft_ms(engine, n, cfg.vocab_size, rng), 4)
                del engine
            runs.append(run)
            del model
            torch._dynamo.reset()  # the next slice has other shapes: fresh compiles, not a pile of recompiles
            if device == "cuda":
                torch.cuda.empty_cache()
    c = config
    return dict(
        kind="shiftlib-costmodel-measurement",
        preset=preset,
        dtype=str(dtype).removeprefix("torch."),
        shape=dict(
            hidden=c.hidden_size,
            heads=c.num_attention_heads,
            kv_heads=c.num_key_value_heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            intermediate=c.intermediate_size,
            vocab=c.vocab_size,
            layers=c.num_hidden_layers,
            tie_word_embeddings=bool(c.tie_word_embeddings),
        ),
        context=context,
        decode_steps=decode_steps,
        max_num_tokens=max_num_tokens,
        max_prefill_tokens=MAX_PREFILL_TOKENS,
        runs=runs,
        machine=machine(),
        versions=versions(),
        command=" ".join(sys.argv),
    )


# -- communication ----------------------------------------------------------------------------------------------


def _interp(points: tuple[tuple[float, float], ...], x: float) -> float:
    """Piecewise linear through ``points``; flat below the first, the last slope beyond the last (through the
    origin when there is one point)."""
    if not points:
        raise ValueError("no measured points to interpolate: measure this kind of step first")
    if x <= points[0][0]:
        return points[0][1]
    if len(points) == 1:
        return points[0][1] * x / points[0][0]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    (x0, y0), (x1, y1) = points[-2], points[-1]
    return y1 + max(y1 - y0, 0.0) * (x - x1) / (x1 - x0)  # a step never gets faster with more tokens


@dataclass(frozen=True)
class Comm:
    """Collective times in ms from the 2 x H200 figures, scaled to P ranks by ring bytes per rank.

    A collective costs ``latency_ms`` plus a bandwidth part: the measured time at its size minus the measured
    time of the smallest message. ``latency_ms`` defaults to that smallest measured time (eager); inside CUDA
    graphs it is lower, which ``--latency-ms`` explores.
    """

    all_reduce_2: tuple[tuple[float, float], ...] = ALL_REDUCE_2XH200
    all_to_all_2: tuple[tuple[float, float], ...] = ALL_TO_ALL_2XH200
    latency_ms: float = 0.034

    @staticmethod
    def _bandwidth_part(points: tuple[tuple[float, float], ...], nbytes: float) -> float:
        return max(_interp(points, nbytes) - points[0][1], 0.0)

    def all_reduce(self, nbytes: float, ranks: int) -> float:
        """Sum of an ``nbytes`` buffer over ``ranks`` (ring: each rank moves 2(P-1)/P of it; 1 at P = 2)."""
        if ranks <= 1:
            return 0.0
        return self.latency_ms + self._bandwidth_part(self.all_reduce_2, nbytes) * 2 * (ranks - 1) / ranks

    def all_to_all(self, nbytes_per_rank: float, ranks: int) -> float:
        """Each rank sends (P-1)/P of its ``nbytes_per_rank`` buffer (1/2 at P = 2, where it was measured)."""
        if ranks <= 1:
            return 0.0
        return self.latency_ms + self._bandwidth_part(self.all_to_all_2, nbytes_per_rank) * 2 * (ranks - 1) / ranks

    def all_gather(self, total_bytes: float, ranks: int) -> float:
        """Every rank receives (P-1)/P of the ``total_bytes`` result: half an all-reduce's traffic."""
        if ranks <= 1:
            return 0.0
        return self.latency_ms + self._bandwidth_part(self.all_reduce_2, total_bytes) * (ranks - 1) / ranks


# -- the model --------------------------------------------------------------------------------------------------


def _curve(table: dict[str, float]) -> tuple[tuple[float, float], ...]:
    return tuple(sorted((float(k), v) for k, v in table.items()))


@dataclass
class SliceTimes:
    """Step time (ms) of the slice model of one p, as fixed + layers x per-layer, for decode, prefill and TTFT,
    and for mixed steps of each measured decode batch (kind ``"mixed:<batch>"``, over prompt tokens)."""

    fixed: dict[str, tuple[tuple[float, float], ...]]
    per_layer: dict[str, tuple[tuple[float, float], ...]]

    def at(self, kind: str, n: float, layers: int) -> float:
        return max(_interp(self.fixed[kind], n) + layers * _interp(self.per_layer[kind], n), 1e-3)

    def mixed(self, prefill: float, decode: float, layers: int) -> float:
        """A step of ``prefill`` prompt tokens and ``decode`` decode rows: between the measured decode batches,
        linear in the batch."""
        if not prefill or not decode:
            return self.at("prefill", prefill, layers) if prefill else self.at("decode", decode, layers)
        batches = sorted(int(k.removeprefix("mixed:")) for k in self.fixed if k.startswith("mixed:"))
        if not batches:
            raise ValueError("the measurement has no mixed steps: measure again with this version (mixed_ms)")
        return _interp(tuple((b, self.at(f"mixed:{b}", prefill, layers)) for b in batches), decode)


def _split_layers(runs: list[dict]) -> SliceTimes:
    """Fit fixed + L x per-layer through the runs at several depths (least squares); one depth: all per layer."""
    depths = sorted({r["layers"] for r in runs})
    by_depth = {r["layers"]: r for r in runs}
    tables = {kind: {L: by_depth[L][f"{kind}_ms"] for L in depths} for kind in ("decode", "prefill", "ttft")}
    for b in set.intersection(*(set(by_depth[L].get("mixed_ms", {})) for L in depths)):
        tables[f"mixed:{b}"] = {L: by_depth[L]["mixed_ms"][b] for L in depths}
    fixed, per_layer = {}, {}
    for kind, table in tables.items():
        keys = sorted(set.intersection(*(set(table[L]) for L in depths)), key=float)
        f, s, floor = {}, {}, 0.0
        for k in keys:
            ys = [table[L][k] for L in depths]
            if len(depths) == 1:
                f[k], s[k] = 0.0, ys[0] / depths[0]
            else:
                mx, my = statistics.fmean(depths), statistics.fmean(ys)
                slope = sum((x - mx) * (y - my) for x, y in zip(depths, ys)) / sum((x - mx) ** 2 for x in depths)
                # A layer costs no less for more tokens. Where the host bounds the shallow run's step (a 70B-wide
                # p = 4 slice decoding 256 rows: 2.78 ms at 4 layers, 1.96 at 8) the fit says it does; take the
                # per-layer time of the largest smaller size instead.
                floor = slope = max(slope, floor)
                f[k], s[k] = my - slope * mx, slope
        fixed[kind], per_layer[kind] = _curve(f), _curve(s)
    return SliceTimes(fixed, per_layer)


@dataclass
class CostModel:
    """Predicted step times (ms) of each configuration, from a :func:`measure` result.

    ``layers``: the depth to predict for (default the preset's); needs measurements at two depths when it differs
    from the measured one.
    """

    measurement: dict
    layers: int | None = None
    comm: Comm = field(default_factory=Comm)

    def __post_init__(self) -> None:
        m = self.measurement
        if m.get("kind") != "shiftlib-costmodel-measurement":
            raise ValueError("not a cost-model measurement: make one with `python -m shiftlib.bench.costmodel measure`")
        self.shape = m["shape"]
        depths = {r["layers"] for r in m["runs"]}
        self.layers = self.layers or self.shape["layers"]
        if self.layers not in depths and len(depths) < 2:
            raise ValueError(
                f"predicting {self.layers} layers needs measurements at two depths, got only {sorted(depths)}: "
                f"measure with --layers A,B"
            )
        self.slices = {
            p: _split_layers([r for r in m["runs"] if r["p"] == p]) for p in sorted({r["p"] for r in m["runs"]})
        }
        self.max_num_tokens = m["max_num_tokens"]
        self.max_prefill_tokens = m.get("max_prefill_tokens", MAX_PREFILL_TOKENS)

    @property
    def parts(self) -> list[int]:
        return sorted(self.slices)

    def compute(self, p: int, kind: str, n: float) -> float:
        if p not in self.slices:
            raise ValueError(f"no measurement of the slice of p={p}: measured {self.parts}; add it with --parts")
        return self.slices[p].at(kind, n, self.layers)

    def mixed(self, p: int, prefill: float, decode: float) -> float:
        """The slice of p's step of ``prefill`` prompt tokens and ``decode`` decode rows."""
        self.compute(p, "decode", 1)  # the error for an unmeasured p
        return self.slices[p].mixed(prefill, decode, self.layers)

    # bytes of the step's collectives
    def _token_bytes(self) -> int:
        return self.shape["hidden"] * BYTES_BF16

    def comm_tp(self, P: int, n: float, sampled: float) -> float:
        """TP mode: an all-reduce of the hidden states after the embedding, attention and MLP; logits gathered."""
        L = self.layers
        return (2 * L + 1) * self.comm.all_reduce(n * self._token_bytes(), P) + self.comm.all_gather(
            sampled * self.shape["vocab"] * BYTES_BF16, P
        )

    def comm_sp(self, tp: int, sp: int, n: float, sampled: float) -> float:
        """SP mode: two all-to-alls over sp per layer (q/k/v in, attention out), all-reduces over tp of the rank's
        N/sp tokens, the sampled rows summed over sp, logits gathered over all ranks."""
        P, L, s = tp * sp, self.layers, self.shape
        n_pad = math.ceil(n / sp) * sp
        hq, hkv = s["heads"] // P, max(s["kv_heads"] // P, 1)
        qkv = n_pad * (hq + 2 * hkv) * s["head_dim"] * BYTES_BF16
        out = n_pad * hq * s["head_dim"] * BYTES_BF16
        a2a = L * (self.comm.all_to_all(qkv, sp) + self.comm.all_to_all(out, sp))
        ar = (2 * L + 1) * self.comm.all_reduce(n_pad / sp * self._token_bytes(), tp)
        return (
            a2a
            + ar
            + self.comm.all_reduce(sampled * self._token_bytes(), sp)
            + self.comm.all_gather(sampled * s["vocab"] * BYTES_BF16, P)
        )

    def step(
        self,
        config: str,
        P: int,
        prefill: float,
        decode: float,
        sampled: float | None = None,
        mesh: tuple[int, int] | None = None,
    ) -> float:
        """Predicted time of one step of ``prefill`` prompt tokens and ``decode`` decode rows, ``sampled`` of its
        rows sampling a token (default: the decode rows, or one for a prefill alone).

        ``config``: "tp" or "sp" (on ``mesh``).
        """
        n = prefill + decode
        sampled = (decode or 1) if sampled is None else sampled
        if config == "tp":
            return self.mixed(P, prefill, decode) + self.comm_tp(P, n, sampled)
        if config == "sp":
            tp, sp = mesh or (1, P)
            if tp * sp != P:
                raise ValueError(f"mesh {tp}x{sp} does not have P={P} ranks")
            return self.mixed(tp, prefill / sp, decode / sp) + self.comm_sp(tp, sp, n, sampled)
        raise ValueError(f"unknown configuration {config!r}: tp or sp")

    def shift_step(self, P: int, prefill: float, decode: float, mesh: tuple[int, int], threshold: int,
                   sampled: float | None = None) -> float:  # fmt: skip
        return self.step("tp" if prefill + decode <= threshold else "sp", P, prefill, decode, sampled, mesh)

    def ttft(self, config: str, P: int, length: int, mesh: tuple[int, int] | None = None) -> float:
        """Time to first token of one ``length``-token prompt, prefilled in chunks of ``max_num_tokens``."""
        chunks = math.ceil(length / self.max_num_tokens)
        n = min(length, self.max_num_tokens)
        if config == "tp":
            return (
                self.compute(P, "ttft", length)
                + chunks * self.comm_tp(P, n, 0)
                + self.comm.all_gather(self.shape["vocab"] * BYTES_BF16, P)
            )
        if config == "sp":
            tp, sp = mesh or (1, P)
            return (
                self.compute(tp, "ttft", length) / sp
                + chunks * self.comm_sp(tp, sp, n, 0)
                + self.comm.all_gather(self.shape["vocab"] * BYTES_BF16, P)
            )
        if config == "dp":
            return self.compute(1, "ttft", length)
        raise ValueError(f"unknown configuration {config!r}: tp, sp or dp")

    def closed_loop(
        self,
        config: str,
        P: int,
        concurrency: int,
        input_len: int,
        output_len: int,
        mesh: tuple[int, int] = (1, 1),
        threshold: int = 256,
        waves: int = 2,
    ) -> dict:
        """The benchmark's closed loop (``waves * concurrency`` requests, ``concurrency`` in flight) as the engine
        schedules it (:mod:`shiftlib.bench.simulate`), each step priced as it runs: prefill chunks and decode rows
        together. DP runs ``concurrency / P`` clients on each replica.

        Returns the benchmark's p50 TPOT and TTFT, its output throughput, and the decode step of the whole batch.
        """
        replicas = min(P, concurrency) if config == "dp" else 1
        c = math.ceil(concurrency / replicas)
        trace = simulate.closed_loop(c, waves * c, input_len, output_len, self.max_num_tokens,
                                     self.max_prefill_tokens, max(256, c), STEP_OVERHEAD_TOKENS)  # fmt: skip

        def step(prefill: int, decode: int, sampled: int) -> float:
            if config == "shift":
                return self.shift_step(P, prefill, decode, mesh, threshold, sampled)
            if config == "dp":
                return self.mixed(1, prefill, decode)
            return self.step(config, P, prefill, decode, sampled, mesh if config == "sp" else None)

        ends = [ms / 1000 for ms in itertools.accumulate(step(*s) for s in trace.steps)]  # each step's end, s
        records = [RequestRecord(ends[a] if a >= 0 else 0.0, input_len, output_len, ends[f], ends[e])
                   for a, f, e in trace.requests]  # fmt: skip
        got = summarize(records, [], ends[-1])
        return dict(
            tpot_ms=got["tpot_ms_p50"],
            ttft_ms=got["ttft_ms_p50"],
            decode_step_ms=step(0, min(c, 256), min(c, 256)),
            output_tok_per_s=got["output_tok_per_s"] * concurrency / c,  # DP: that many replicas' worth
        )

    def crossover(self, P: int, kind: str, mesh: tuple[int, int], limit: int = 4096) -> int | None:
        """The smallest step size (tokens) from which SP mode on ``mesh`` is predicted faster than TP mode.

        Searched from the smallest measured size of ``kind`` up (below it the timings are extrapolated flat);
        a result equal to that size means "at or below it". None: TP mode stays faster up to ``limit``.
        """
        for n in range(self.grid_min(kind), limit + 1):
            x, b = (n, 0) if kind == "prefill" else (0, n)
            if self.step("sp", P, x, b, mesh=mesh) < self.step("tp", P, x, b):
                return n
        return None

    def grid_min(self, kind: str) -> int:
        return int(min(x for sl in self.slices.values() for x, _ in sl.per_layer[kind]))

    def best_threshold(
        self, P: int, mesh: tuple[int, int], concurrency: tuple[int, ...], input_len: int, output_len: int
    ) -> int:
        """The threshold that minimizes shift's TPOT over the concurrency sweep (geometric mean; prefills and
        decodes both count), among round sizes and the two crossovers."""
        xs = [self.crossover(P, k, mesh) for k in ("decode", "prefill")]
        candidates = sorted(
            {0, 16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 2048, self.max_num_tokens} | {x - 1 for x in xs if x}
        )

        def score(thr: int) -> float:
            tpots = [self.closed_loop("shift", P, c, input_len, output_len, mesh, thr)["tpot_ms"] for c in concurrency]
            return round(math.fsum(math.log(t) for t in tpots), 9)

        return min(candidates, key=lambda thr: (score(thr), abs(thr - 256)))  # ties: nearest the default, 256

    def fits(self, config: str, P: int, mesh: tuple[int, int] = (1, 1), hbm_bytes: float = H200_BYTES) -> bool:
        """Weights per GPU leave at least a fifth of HBM for the KV cache and activations."""
        full = dict(self.shape)
        w = _shape_weight_bytes(full, self.layers)
        per_gpu = {"dp": w, "tp": w / P, "sp": w / mesh[0], "shift": w / mesh[0]}[config]
        return per_gpu <= 0.8 * hbm_bytes


def _shape_weight_bytes(shape: dict, layers: int) -> float:
    D, H, K, d, I, V = (shape[k] for k in ("hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab"))
    per_layer = D * (H + 2 * K) * d + H * d * D + 3 * D * I
    return BYTES_BF16 * (layers * per_layer + V * D * (1 if shape.get("tie_word_embeddings") else 2))


def meshes(P: int, shape: dict) -> list[tuple[int, int]]:
    """The (tp, sp) shapes of P ranks that the model's heads allow."""
    out = []
    for tp in range(1, P + 1):
        if P % tp:
            continue
        H, K = shape["heads"], shape["kv_heads"]
        if H % P == 0 and ((K >= P and K % P == 0) or (K < P and P % K == 0)):
            out.append((tp, P // tp))
    return out


# -- predictions ------------------------------------------------------------------------------------------------

CONCURRENCY = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def predict(
    model: CostModel,
    name: str,
    world_sizes: list[int],
    concurrency: tuple[int, ...] = CONCURRENCY,
    input_len: int = 512,
    output_len: int = 64,
    threshold: int | None = None,
    long_prompt: int = 8192,
) -> dict:
    """Curves and switch points of every configuration at each P, on the best SP mesh for that P.

    The best mesh is the feasible (weights fit) one with the highest predicted SP-mode throughput at the largest
    concurrency; shift uses it with ``threshold`` (default: the predicted decode crossover on it).
    """
    out = dict(
        name=name,
        layers=model.layers,
        input_len=input_len,
        output_len=output_len,
        concurrency=list(concurrency),
        long_prompt=long_prompt,
        by_world={},
    )
    for P in world_sizes:
        if P not in model.parts or any(tp not in model.parts for tp, _ in meshes(P, model.shape)):
            raise ValueError(
                f"predicting P={P} needs the slices of {sorted({P} | {tp for tp, _ in meshes(P, model.shape)})}, "
                f"measured {model.parts}"
            )
        candidates = [m for m in meshes(P, model.shape) if m[1] > 1 and model.fits("sp", P, m)] or [(P, 1)]
        top = max(concurrency)
        best = max(
            candidates, key=lambda m: model.closed_loop("sp", P, top, input_len, output_len, m)["output_tok_per_s"]
        )
        decode_x, prefill_x = model.crossover(P, "decode", best), model.crossover(P, "prefill", best)
        best_thr = model.best_threshold(P, best, concurrency, input_len, output_len)
        thr = best_thr if threshold is None else threshold
        curves = {}
        for config in ("shift", "tp", "sp", "dp"):
            curves[config] = [
                dict(
                    concurrency=c,
                    **{
                        k: round(v, 4)
                        for k, v in model.closed_loop(config, P, c, input_len, output_len, best, thr).items()
                    },
                )
                for c in concurrency
            ]
        ttft = {cfg: round(model.ttft(cfg, P, long_prompt, best), 3) for cfg in ("tp", "sp", "dp")}
        ttft["shift"] = ttft["sp"] if long_prompt > thr else ttft["tp"]
        per_mesh = {
            f"{tp}x{sp}": dict(
                fits=model.fits("sp", P, (tp, sp)),
                sp_tok_per_s_at_max=round(
                    model.closed_loop("sp", P, top, input_len, output_len, (tp, sp))["output_tok_per_s"], 1
                ),
                decode_crossover=model.crossover(P, "decode", (tp, sp)),
            )
            for tp, sp in meshes(P, model.shape)
        }
        out["by_world"][str(P)] = dict(
            mesh=f"{best[0]}x{best[1]}",
            threshold=thr,
            best_threshold=best_thr,
            decode_crossover=decode_x,
            prefill_crossover=prefill_x,
            grid_min=dict(decode=model.grid_min("decode"), prefill=model.grid_min("prefill")),
            fits={cfg: model.fits(cfg, P, best) for cfg in ("shift", "tp", "sp", "dp")},
            meshes=per_mesh,
            curves=curves,
            ttft_ms=ttft,
            ratios=_ratios(curves),
        )
    return out


def _ratios(curves: dict) -> dict:
    """shift against TP and DP: at concurrency 1 (TPOT, lower is better: other / shift) and at the largest
    concurrency (throughput, higher is better: shift / other)."""
    low, high = 0, -1
    r = {}
    for other in ("tp", "dp", "sp"):
        r[f"tpot_c1_{other}_over_shift"] = round(curves[other][low]["tpot_ms"] / curves["shift"][low]["tpot_ms"], 3)
        r[f"throughput_cmax_shift_over_{other}"] = round(
            curves["shift"][high]["output_tok_per_s"] / curves[other][high]["output_tok_per_s"], 3
        )
    return r


CHECKED = (("tpot_ms", "tpot_ms_p50"), ("ttft_ms", "ttft_ms_p50"), ("output_tok_per_s", "output_tok_per_s"))


def check(model: CostModel, records: list[dict]) -> list[dict]:
    """The P = 1 predictions against a benchmark run (``python -m shiftlib.bench --configs shift``) of the same
    preset on the GPU that was measured: predicted / measured for each closed-loop level on one GPU."""
    rows = []
    for r in records:
        if (r["config"], r["world"], r["workload"], r.get("preset")) != ("shift", 1, "concurrency", model.measurement["preset"]):
            continue
        c = r["concurrency"]
        pred = model.closed_loop("shift", 1, c, r["input_len"], r["output_len"], threshold=r["threshold"],
                                 waves=r["num_requests"] // c)  # fmt: skip
        row = dict(concurrency=c)
        for key, measured in CHECKED:
            row[key] = dict(predicted=round(pred[key], 3), measured=r[measured], ratio=round(pred[key] / r[measured], 3))
        rows.append(row)
    if not rows:
        raise ValueError(f"no closed-loop shift run on one GPU of {model.measurement['preset']} to check against: "
                         f"run python -m shiftlib.bench --preset {model.measurement['preset']} --configs shift --concurrency ...")
    return rows


def _x(w: dict, kind: str) -> str:
    x = w[f"{kind}_crossover"]
    if x is None:
        return "never (up to 4096)"
    return f"<= {x} (the smallest size measured)" if x <= w["grid_min"][kind] else str(x)


def markdown(predictions: list[dict]) -> str:
    """The predictions as Markdown tables for docs/benchmarks.md."""
    lines = []
    for pred in predictions:
        if pred.get("check"):
            lines += [f"#### {pred['name']}, P = 1: predicted against measured", "",
                      "| concurrency | TPOT p50 ms | TTFT p50 ms | output tok/s |", "|---|---|---|---|"]  # fmt: skip
            for row in pred["check"]:
                cells = [f"{row[k]['predicted']:,.2f} / {row[k]['measured']:,.2f} ({row[k]['ratio']:.2f}x)"
                         for k, _ in CHECKED]  # fmt: skip
                lines.append(f"| {row['concurrency']} | " + " | ".join(cells) + " |")
            lines.append("")
        for P, w in pred["by_world"].items():
            fits = ", ".join(f"{k} {'fits' if v else 'does NOT fit'}" for k, v in w["fits"].items())
            lines += [
                f"#### {pred['name']} ({pred['layers']} layers), P = {P} -- predicted",
                "",
                (
                    f"SP mesh {w['mesh']} (tp x sp); shift's threshold {w['threshold']} tokens (best over the sweep: "
                    f"{w['best_threshold']}). SP mode is predicted faster than TP mode from {_x(w, 'decode')} tokens "
                    f"in decode steps and from {_x(w, 'prefill')} in prefill steps. Weights: {fits}."
                ),
                "",
                "| concurrency | " + " | ".join(f"{c} TPOT ms | {c} tok/s" for c in ("shift", "tp", "sp", "dp")) + " |",
                "|---|" + "---|" * 8,
            ]
            for i, c in enumerate(pred["concurrency"]):
                cells = []
                for cfg in ("shift", "tp", "sp", "dp"):
                    row = w["curves"][cfg][i]
                    cells += [f"{row['tpot_ms']:.2f}", f"{row['output_tok_per_s']:,.0f}"]
                lines.append(f"| {c} | " + " | ".join(cells) + " |")
            r = w["ratios"]
            t = w["ttft_ms"]
            dp = "" if w["fits"]["dp"] else " (DP cannot hold the weights: hypothetical)"
            lines += [
                "",
                f"Ratios: TPOT at c=1, TP/shift {r['tpot_c1_tp_over_shift']}, "
                f"DP/shift {r['tpot_c1_dp_over_shift']}{dp}; "
                f"throughput at c={pred['concurrency'][-1]}, shift/TP {r['throughput_cmax_shift_over_tp']}, "
                f"shift/DP {r['throughput_cmax_shift_over_dp']}{dp}, shift/SP {r['throughput_cmax_shift_over_sp']}. "
                f"TTFT of a {pred['long_prompt']}-token prompt: "
                + ", ".join(f"{k} {v:,.0f} ms" for k, v in t.items())
                + ".",
                "",
            ]
    return "\n".join(lines)


def plot(predictions: list[dict], out: Path) -> list[Path]:
    """Predicted TPOT vs throughput, one panel per (shape, P)."""
    from shiftlib.bench.plot import _pyplot

    plt = _pyplot()
    panels = [(pred, P, w) for pred in predictions for P, w in pred["by_world"].items()]
    cols = min(len(panels), 2)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.5 * rows), squeeze=False)
    for ax, (pred, P, w) in zip(axes.flat, panels):
        for i, cfg in enumerate(("shift", "tp", "sp", "dp")):
            pts = w["curves"][cfg]
            style = "-o" if w["fits"][cfg] else ":x"
            ax.plot(
                [p["output_tok_per_s"] for p in pts],
                [p["tpot_ms"] for p in pts],
                style,
                ms=3,
                color=f"C{i}",
                label=cfg + ("" if w["fits"][cfg] else " (weights do not fit)"),
            )
            for p in pts[:: max(1, len(pts) // 5)]:
                ax.annotate(f"c{p['concurrency']}", (p["output_tok_per_s"], p["tpot_ms"]), fontsize=6, color=f"C{i}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.yaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("output tokens/s (all GPUs)")
        ax.set_ylabel("TPOT (ms)")
        ax.set_title(
            f"PREDICTED {pred['name']} ({pred['layers']} layers), P={P}, mesh {w['mesh']}, thr {w['threshold']}",
            fontsize=9,
        )
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("cost-model predictions (one-GPU slice timings + 2xH200 collectives), not measurements")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "predicted_latency_throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(predictions), figsize=(6.5 * len(predictions), 4.5), squeeze=False)
    for ax, pred in zip(axes.flat, predictions):
        for i, (P, w) in enumerate(pred["by_world"].items()):
            cs = [p["concurrency"] for p in w["curves"]["tp"]]
            for cfg, ls in (("tp", "-"), ("sp", "--")):
                ax.plot(
                    cs,
                    [p["decode_step_ms"] for p in w["curves"][cfg]],
                    ls,
                    color=f"C{i}",
                    label=f"P={P} {cfg} ({w['mesh'] if cfg == 'sp' else f'{P}x1'})",
                )
            if w["decode_crossover"]:
                ax.axvline(w["decode_crossover"], color=f"C{i}", lw=0.7, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("decode batch (tokens per step)")
        ax.set_ylabel("step time (ms)")
        ax.set_title(f"PREDICTED decode step: TP vs SP mode, {pred['name']} (dotted: crossover)", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path2 = out / "predicted_crossover.png"
    fig.savefig(path2, dpi=110)
    plt.close(fig)
    return [path, path2]


# -- command line -----------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shiftlib.bench.costmodel",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="time the slice models on this one device")
    m.add_argument("--preset", required=True)
    m.add_argument("--parts", type=_ints, default=[1, 2, 4, 8], help="slices to time: the model with heads etc. / p")
    m.add_argument("--layers", type=_ints, default=None, help="depths to time at, e.g. 8,4 (default: the preset's)")
    m.add_argument("--batches", type=_ints, default=[1, 4, 16, 32, 64, 128, 256])
    m.add_argument("--prefill", type=_ints, default=[128, 512, 1024, 2048, 4096])
    m.add_argument("--context", type=int, default=512, help="prompt tokens of the decoding requests (default 512)")
    m.add_argument("--long-prompts", type=_ints, default=[8192])
    m.add_argument("--decode-steps", type=int, default=8)
    m.add_argument("--mixed-batches", type=_ints, default=None, help="decode rows of the mixed steps (default --batches)")
    m.add_argument("--mixed-prefill", type=_ints, default=None,
                   help=f"prompt tokens of the mixed steps (default the --prefill sizes up to {MAX_PREFILL_TOKENS})")
    m.add_argument("--device", choices=("cuda", "cpu"), default=None)
    m.add_argument("--output", type=Path, required=True)
    p = sub.add_parser("predict", help="predict P = 2, 4, 8 from measurements")
    p.add_argument("measurements", type=Path, nargs="+")
    p.add_argument(
        "--layers", type=_ints, default=None, help="depth to predict per measurement file (default: the preset's)"
    )
    p.add_argument("--world", type=_ints, default=[2, 4, 8])
    p.add_argument("--threshold", type=int, default=None, help="shift's threshold (default: the best over the sweep)")
    p.add_argument(
        "--latency-ms",
        type=float,
        default=0.034,
        help="fixed cost of one collective (default 0.034: the eager 2xH200 all-reduce of 8 KiB)",
    )
    p.add_argument("--check", type=Path, default=None,
                   help="a benchmark JSON of the same preset on one GPU: its closed loops against the P = 1 predictions")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--output", type=Path, required=True, help="predictions JSON")
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--plots", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "measure":
        result = measure(
            args.preset,
            args.parts,
            args.layers,
            args.batches,
            args.prefill,
            args.context,
            args.long_prompts,
            args.decode_steps,
            args.mixed_batches,
            args.mixed_prefill,
            device=args.device,
        )
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")
        return 0
    preds = []
    for i, path in enumerate(args.measurements):
        meas = json.loads(path.read_text())
        layers = args.layers[i] if args.layers else None
        model = CostModel(meas, layers, Comm(latency_ms=args.latency_ms))
        name = meas["preset"] if layers in (None, meas["shape"]["layers"]) else f"{meas['preset']} extended"
        pred = predict(
            model, name, args.world, input_len=args.input_len, output_len=args.output_len, threshold=args.threshold
        )
        if args.check and (bench := json.loads(args.check.read_text())) and meas["preset"] in {r.get("preset") for r in bench}:
            pred["check"] = check(model, bench)
        preds.append(dict(pred, latency_ms=args.latency_ms, measurement=str(path)))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(preds, indent=1) + "\n")
    text = markdown(preds)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    else:
        print(text)
    if args.plots:
        plot(preds, args.plots)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
