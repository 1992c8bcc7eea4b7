"""One benchmark run: every configuration on every load, on the same ranks, into a list of records.

Configurations (P ranks, mesh tp x sp):

=========  ===================================================================================================
``shift``  one engine on the (tp, sp) mesh, mode ``auto``: steps of at most ``threshold`` tokens in TP mode
``tp``     the same model, every step in TP mode (TP = P)
``sp``     the same model, every step in SP mode (Ulysses over ``sp`` x TP over ``tp``)
``dp``     P independent engines, each on its own 1 x 1 mesh with the whole model, each serving 1/P of the
           requests (a round-robin balancer); their tokens are added up
``hf``     Hugging Face ``generate`` on the same seeded model; ``tp_plan="auto"`` when P > 1
=========  ===================================================================================================

Models are built one configuration group at a time and freed after it, so one GPU never holds two.
"""

from __future__ import annotations

import gc
import math
import platform
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from tqdm.auto import tqdm

import shiftlib
from shiftlib.bench.driver import Clock, drive
from shiftlib.bench.hf import load_hf_model, run_hf
from shiftlib.bench.metrics import RequestRecord, StepRecord, summarize
from shiftlib.bench.workloads import Load, bursty, concurrency_sweep, long_prompts, poisson, warm_up
from shiftlib.cache import PagedKVCache
from shiftlib.mesh import ensure_process_group
from shiftlib.presets import preset_config, random_model

CONFIGS = ("shift", "tp", "sp", "dp", "hf")
ENGINE_MODE = {"shift": "auto", "tp": "tp", "sp": "sp"}
TRACES = ("bursty",)


@dataclass
class BenchOptions:
    """Everything a run depends on; the command line maps onto it one to one."""

    preset: str = "tiny"
    tp: int = 1
    sp: int = 1
    meshes: list[tuple[int, int]] | None = None  # several (tp, sp) shapes in one run; default [(tp, sp)]
    configs: list[str] = field(default_factory=lambda: list(CONFIGS))
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    input_len: int = 512
    output_len: int = 64
    waves: int = 2
    rates: list[float] = field(default_factory=list)
    num_requests: int = 32
    trace: str | None = None
    trace_seconds: float = 20.0
    quiet_rate: float = 1.0
    burst_rate: float = 32.0
    trace_bursts: int = 4
    long_prompts: list[int] = field(default_factory=list)
    long_output_len: int = 8
    threshold: int = 256
    max_num_tokens: int = 4096
    max_num_seqs: int | None = None
    block_size: int = 16
    speculative: str | None = None  # "suffix" for the engine configurations
    num_speculative_tokens: int = 16
    hf_max_concurrency: int = 64
    dtype: str | None = None
    device: str | None = None
    seed: int = 0
    warmup: bool = True
    progress: bool = True
    command: str = ""

    def validate(self) -> None:
        bad = [c for c in self.configs if c not in CONFIGS]
        if bad or not self.configs:
            raise ValueError(f"unknown configurations {bad or self.configs}: choose among {', '.join(CONFIGS)}")
        if self.trace is not None and self.trace not in TRACES:
            raise ValueError(f"unknown trace {self.trace!r}: choose one of {', '.join(TRACES)}")
        if self.input_len < 1 or self.output_len < 1 or self.long_output_len < 1:
            raise ValueError(
                f"input and output lengths must be >= 1 token, got input_len={self.input_len}, "
                f"output_len={self.output_len}, long_output_len={self.long_output_len}"
            )
        if not (self.concurrency or self.rates or self.trace or self.long_prompts):
            raise ValueError("nothing to measure: give --concurrency, --rates, --trace or --long-prompts")


def machine() -> dict:
    """What ran it: the GPU (or CPU) name and how many ranks and devices took part."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        return dict(
            device=torch.cuda.get_device_name(),
            ranks=world,
            devices_visible=torch.cuda.device_count(),
            host=platform.node(),
        )
    return dict(
        device=f"CPU ({platform.processor() or platform.machine()})",
        ranks=world,
        devices_visible=0,
        host=platform.node(),
    )


def versions() -> dict:
    import transformers

    out = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        shiftlib=shiftlib.__version__,
        cuda=torch.version.cuda,
    )
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


def build_loads(opts: BenchOptions, vocab: int) -> list[Load]:
    loads = concurrency_sweep(opts.concurrency, opts.input_len, opts.output_len, vocab, opts.waves, opts.seed)
    loads += poisson(opts.rates, opts.num_requests, opts.input_len, opts.output_len, vocab, opts.seed)
    if opts.trace == "bursty":
        loads.append(
            bursty(
                opts.trace_seconds,
                opts.input_len,
                opts.output_len,
                vocab,
                opts.quiet_rate,
                opts.burst_rate,
                opts.trace_bursts,
                opts.seed,
            )
        )
    loads += long_prompts(opts.long_prompts, opts.long_output_len, vocab, seed=opts.seed)
    return loads


def _warmup_loads(loads: list[Load], max_seqs: int, vocab: int) -> list[Load]:
    """Each closed-loop level's first wave, so kernel compilation and the CUDA graphs of its decode batch and
    block-table width are made before anything is timed. (Open-loop and long-prompt loads mix shapes; a graph
    they meet first is captured inside the run, which shows in their p99 more than in p50.)"""
    warm = [warm_up(load, min(load.concurrency, max_seqs), vocab) for load in loads
            if load.workload == "concurrency" and load.requests]
    if not warm:
        first = next((load for load in loads if load.requests), None)
        warm = [warm_up(first, 1, vocab)] if first else []
    return warm


def _cache_blocks(
    config,
    kv_chunks: int,
    dtype: torch.dtype,
    opts: BenchOptions,
    loads: list[Load],
    max_seqs: int,
    device: torch.device,
) -> int | None:
    """Blocks for the largest load (its peak of requests in flight at their longest), None if that is more than
    the GPU can hold (then the engine takes what memory allows and preempts)."""
    tokens = max(min(load.peak_in_flight, max_seqs) * load.max_context for load in loads)
    blocks = math.ceil(1.1 * tokens / opts.block_size) + max_seqs + 1
    if device.type != "cuda":
        return blocks
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_block = PagedKVCache.bytes_per_block(config.num_hidden_layers, opts.block_size, kv_chunks, head_dim, dtype)
    free, _ = torch.cuda.mem_get_info(device)
    return blocks if blocks * per_block < 0.8 * free else None


def _free() -> None:
    """Give a finished configuration's GPU memory back before the next one is built, and its compiled kernels
    (the next model may have other per-rank shapes: fresh compiles instead of a pile of recompiles)."""
    torch._dynamo.reset()
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


class Bench:
    """Runs ``opts`` on the ranks of the default process group; :meth:`run` returns the records (on every rank)."""

    def __init__(self, opts: BenchOptions, on_record=lambda records: None) -> None:
        opts.validate()
        self.opts, self.on_record = opts, on_record
        device_type = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
        ensure_process_group(device_type)
        self.device_type = device_type
        self.device = (
            torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
        )
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.dtype = (
            getattr(torch, opts.dtype) if opts.dtype else (torch.bfloat16 if device_type == "cuda" else torch.float32)
        )
        self.config = preset_config(opts.preset)
        self.loads = build_loads(opts, self.config.vocab_size)
        self.max_seqs = opts.max_num_seqs or max([256, *opts.concurrency])
        self.meta = dict(
            preset=opts.preset,
            dtype=str(self.dtype).removeprefix("torch."),
            threshold=opts.threshold,
            max_num_tokens=opts.max_num_tokens,
            block_size=opts.block_size,
            speculative=opts.speculative,
            machine=machine(),
            versions=versions(),
            command=opts.command or " ".join(sys.argv),
        )
        self.records: list[dict] = []

    # -- progress -------------------------------------------------------------------------------------------
    def _total_requests(self) -> int:
        per_load = sum(len(load.requests) for load in self.loads)
        meshes = len(self.opts.meshes or [(self.opts.tp, self.opts.sp)])
        n = per_load * meshes * sum(c in ENGINE_MODE for c in self.opts.configs)
        n += per_load if "dp" in self.opts.configs else 0
        n += sum(len(load.requests) for load in self._hf_loads()) if "hf" in self.opts.configs else 0
        return n

    def _hf_loads(self) -> list[Load]:
        return [
            load
            for load in self.loads
            if load.concurrency is not None and load.concurrency <= self.opts.hf_max_concurrency
        ]

    # -- the run --------------------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        opts = self.opts
        self.bar = tqdm(
            total=self._total_requests(), disable=self.rank != 0 or not opts.progress, unit="req", dynamic_ncols=True
        )
        try:
            for tp, sp in opts.meshes or [(opts.tp, opts.sp)]:
                if any(c in ENGINE_MODE for c in opts.configs):
                    self._run_mesh(tp, sp)
            if "dp" in opts.configs:
                self._run_dp()
            if "hf" in opts.configs:
                self._run_hf()
        finally:
            self.bar.close()
        return self.records

    def _engine(self, model, mode: str, kv_chunks: int) -> shiftlib.Engine:
        blocks = _cache_blocks(self.config, kv_chunks, self.dtype, self.opts, self.loads, self.max_seqs, self.device)
        engine = shiftlib.Engine(
            model,
            num_blocks=blocks,
            block_size=self.opts.block_size,
            max_num_tokens=self.opts.max_num_tokens,
            max_num_seqs=self.max_seqs,
            mode=mode,
            threshold=self.opts.threshold,
            speculative=self.opts.speculative,
            num_speculative_tokens=self.opts.num_speculative_tokens,
        )
        return engine

    def _warm(self, engine: shiftlib.Engine, loads: list[Load], clock: Clock) -> None:
        if self.opts.warmup:
            for load in _warmup_loads(loads, self.max_seqs, self.config.vocab_size):
                drive(engine, load, clock)

    def _record(
        self,
        config: str,
        tp: int,
        sp: int,
        load: Load,
        requests: list[RequestRecord],
        steps: list[StepRecord],
        note: str = "",
    ) -> None:
        duration = max((r.finish_s for r in requests), default=0.0)
        rec = dict(
            config=config,
            mesh=f"{tp}x{sp}",
            tp=tp,
            sp=sp,
            world=self.world,
            workload=load.workload,
            load=load.label,
            concurrency=load.concurrency,
            rate=load.rate,
            **{k: v for k, v in load.params.items() if k != "bursts_s"},
        )
        rec.update(summarize(requests, steps, duration))
        if load.workload == "bursty":
            rec["bursts_s"] = load.params["bursts_s"]
            rec["arrivals_s"] = [round(r.arrival_s, 4) for r in load.requests]
            rec["step_trace"] = [[round(s.end_s, 5), s.mode, s.num_tokens, round(1000 * s.seconds, 3)] for s in steps]
        if note:
            rec["note"] = note
        rec.update(self.meta)
        self.records.append(rec)
        if self.rank == 0:
            self.on_record(self.records)

    def _tick(self, config: str, load: Load):
        self.bar.set_postfix_str(f"{config} {load.label}", refresh=False)
        return lambda: self.bar.update(1)

    def _run_mesh(self, tp: int, sp: int) -> None:
        mesh = shiftlib.init_mesh(tp, sp, self.device_type)
        model = shiftlib.parallelize(
            random_model(self.config, self.dtype, self.device, self.opts.seed), mesh, self.opts.threshold
        )
        _free()
        kv_chunks = max(self.config.num_key_value_heads // (tp * sp), 1)
        clock = Clock(dist.group.WORLD if self.world > 1 else None, self.device)
        for config in (c for c in self.opts.configs if c in ENGINE_MODE):
            engine = self._engine(model, ENGINE_MODE[config], kv_chunks)
            self._warm(engine, self.loads, clock)
            for load in self.loads:
                requests, steps = drive(engine, load, clock, self._tick(config, load))
                self._record(config, tp, sp, load, requests, steps)
            del engine
            _free()
        del model
        _free()

    def _share(self, load: Load, rank: int) -> Load:
        """This replica's part of a load: an equal share of the clients (closed loop) or every P-th arrival."""
        P = self.world
        if load.concurrency is None:
            return Load(load.workload, load.requests[rank::P], None, load.rate, load.params)
        counts = [load.concurrency // P + (r < load.concurrency % P) for r in range(P)]
        per_client = len(load.requests) / load.concurrency
        bounds = [round(per_client * sum(counts[:r])) for r in range(P + 1)]
        return Load(
            load.workload, load.requests[bounds[rank] : bounds[rank + 1]], max(counts[rank], 1), load.rate, load.params
        )

    def _run_dp(self) -> None:
        replica = init_device_mesh(self.device_type, (self.world, 1, 1), mesh_dim_names=("dp", "tp", "sp"))["tp", "sp"]
        model = shiftlib.parallelize(
            random_model(self.config, self.dtype, self.device, self.opts.seed), replica, self.opts.threshold
        )
        _free()
        shares = [self._share(load, self.rank) for load in self.loads]
        engine = self._engine(model, "tp", self.config.num_key_value_heads)
        clock = Clock(None, self.device)
        self._warm(engine, shares, clock)
        for load, share in zip(self.loads, shares):
            dist.barrier()  # replicas start each load together
            mine = drive(engine, share, clock, self._tick("dp", load)) if share.requests else ([], [])
            parts = [None] * self.world
            dist.all_gather_object(parts, mine)
            if self.rank == 0:  # the other replicas' requests, for the bar
                self.bar.update(sum(len(p[0]) for p in parts[1:]))
            requests = [r for p in parts for r in p[0]]
            steps = [s for p in parts for s in p[1]]
            self._record("dp", 1, 1, load, requests, steps, note=f"{self.world} replicas of 1 rank each")
        del engine, model
        _free()

    def _run_hf(self) -> None:
        model, note = load_hf_model(self.config, self.dtype, self.device, self.opts.seed)
        _free()
        clock = Clock(None, self.device)
        loads = self._hf_loads()
        if self.opts.warmup and loads:
            run_hf(model, Load("concurrency", loads[0].requests[:1], 1), clock)
        for load in loads:
            requests, steps = run_hf(model, load, clock, self._tick("hf", load))
            self._record("hf", self.world if "tp_plan" in note else 1, 1, load, requests, steps, note=note)
        del model
        _free()


def run_bench(opts: BenchOptions, on_record=lambda records: None) -> list[dict]:
    """Run the benchmark on the ranks of the default process group (made if absent); same records on every rank
    (rank 0's measurements for single-engine configurations, all replicas' for ``dp``).

    ``on_record(records)`` is called on rank 0 after each record, with all records so far (to save partial runs).
    """
    records = Bench(opts, on_record).run()
    if dist.get_world_size() > 1:
        box = [records]
        dist.broadcast_object_list(box, src=0)
        records = box[0]
    return records
