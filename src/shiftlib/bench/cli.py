"""``shiftlib bench``: the command line of the benchmark.

``add_parser(subparsers)`` puts it under the ``shiftlib`` command; ``python -m shiftlib.bench`` runs it alone.
Under ``torchrun --nproc-per-node P`` every rank runs it; rank 0 shows progress and writes the files.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from shiftlib.bench.suite import CONFIGS, TRACES, BenchOptions, run_bench


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,4,16, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.5,2,8, got {text!r}") from None


def _meshes(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in m.lower().split("x", 1)) for m in text.split(",") if m.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected mesh shapes TPxSP like 2x1,1x2, got {text!r}") from None


def _configs(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown configurations {bad}: choose among {','.join(CONFIGS)}")
    return names


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from shiftlib.cli import add_speculative_arguments

    d = BenchOptions()
    a = parser.add_argument
    a(
        "--preset",
        default=d.preset,
        help="model shape with random weights: tiny, llama-8b, llama-70b-8l (default: %(default)s)",
    )
    a("--tp", type=int, default=d.tp, help="mesh tp size (weights sharded tp ways in SP mode)")
    a("--sp", type=int, default=d.sp, help="mesh sp size (tokens split sp ways in SP mode); tp*sp = number of ranks")
    a(
        "--meshes",
        type=_meshes,
        default=None,
        help="several mesh shapes in one run, e.g. 4x1,2x2,1x4 (overrides --tp/--sp)",
    )
    a("--configs", type=_configs, default=d.configs, help=f"comma-separated among {','.join(CONFIGS)} (default: all)")
    a(
        "--concurrency",
        type=_ints,
        default=d.concurrency,
        help="closed-loop levels: requests in flight (default: 1,4,16)",
    )
    a("--input-len", type=int, default=d.input_len, help="prompt tokens per request (default: %(default)s)")
    a("--output-len", type=int, default=d.output_len, help="new tokens per request (default: %(default)s)")
    a(
        "--waves",
        type=int,
        default=d.waves,
        help="requests per closed-loop level = waves x concurrency (default: %(default)s)",
    )
    a("--rates", type=_floats, default=d.rates, help="Poisson arrival rates in requests/s, e.g. 1,4,16")
    a("--num-requests", type=int, default=d.num_requests, help="requests per Poisson rate (default: %(default)s)")
    a("--trace", choices=TRACES, default=None, help="a seeded arrival trace: bursty (quiet stretches and bursts)")
    a("--trace-seconds", type=float, default=d.trace_seconds, help="length of the trace (default: %(default)s)")
    a("--quiet-rate", type=float, default=d.quiet_rate, help="trace arrivals/s between bursts (default: %(default)s)")
    a("--burst-rate", type=float, default=d.burst_rate, help="trace arrivals/s in a burst (default: %(default)s)")
    a(
        "--trace-bursts",
        type=int,
        default=d.trace_bursts,
        help="bursts in the trace, one per equal period (default: %(default)s)",
    )
    a(
        "--long-prompts",
        type=_ints,
        default=d.long_prompts,
        help="prompt lengths for time to first token, e.g. 2048,8192,32768",
    )
    a(
        "--long-output-len",
        type=int,
        default=d.long_output_len,
        help="new tokens per long-prompt request (default: %(default)s)",
    )
    a(
        "--threshold",
        type=int,
        default=d.threshold,
        help="shift: steps of at most this many tokens run in TP mode (default: %(default)s)",
    )
    a("--max-num-tokens", type=int, default=d.max_num_tokens, help="token budget per step (default: %(default)s)")
    a(
        "--max-num-seqs",
        type=int,
        default=None,
        help="requests running at once (default: max(256, largest concurrency))",
    )
    a("--block-size", type=int, default=d.block_size, help="KV-cache block size in tokens (default: %(default)s)")
    a(
        "--hf-max-concurrency",
        type=int,
        default=d.hf_max_concurrency,
        help="run the Hugging Face peer only up to this concurrency: it is slow (default: %(default)s)",
    )
    add_speculative_arguments(parser)
    a("--dtype", default=None, help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    a("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    a("--seed", type=int, default=d.seed)
    a("--no-warmup", action="store_true", help="time the first steps too (compilation, graph capture)")
    a("--no-progress", action="store_true", help="no progress bar")
    a("--output", type=Path, default=None, help="write the records as JSON here (rank 0)")
    a("--plots", type=Path, default=None, help="write PNG plots into this folder (rank 0)")
    parser.set_defaults(func=run)
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` to a ``shiftlib`` command's subparsers; ``args.func(args)`` runs it."""
    return configure(
        subparsers.add_parser(
            "bench",
            help="benchmark shift vs TP vs SP vs DP vs Hugging Face",
            description=__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )


def command_line(argv: list[str]) -> str:
    """The command that asked for this run (``argv``: the ``shiftlib`` arguments), as one shell line, under
    torchrun when several ranks run it."""
    line = shlex.join(["python", "-m", "shiftlib", *argv])
    world = os.environ.get("WORLD_SIZE")
    if world and int(world) > 1:
        line = f"torchrun --nproc-per-node {world} " + line.replace("python ", "", 1)
    return line


def options(args: argparse.Namespace) -> BenchOptions:
    return BenchOptions(
        preset=args.preset,
        tp=args.tp,
        sp=args.sp,
        meshes=args.meshes,
        configs=args.configs,
        concurrency=args.concurrency,
        input_len=args.input_len,
        output_len=args.output_len,
        waves=args.waves,
        rates=args.rates,
        num_requests=args.num_requests,
        trace=args.trace,
        trace_seconds=args.trace_seconds,
        quiet_rate=args.quiet_rate,
        burst_rate=args.burst_rate,
        trace_bursts=args.trace_bursts,
        long_prompts=args.long_prompts,
        long_output_len=args.long_output_len,
        threshold=args.threshold,
        max_num_tokens=args.max_num_tokens,
        max_num_seqs=args.max_num_seqs,
        block_size=args.block_size,
        speculative=args.speculative,
        num_speculative_tokens=args.num_speculative_tokens,
        hf_max_concurrency=args.hf_max_concurrency,
        dtype=args.dtype,
        device=args.device,
        seed=args.seed,
        warmup=not args.no_warmup,
        progress=not args.no_progress,
        command=command_line(args.argv),
    )


def write(records: list[dict], output: Path | None, plots: Path | None) -> None:
    """Rank 0's files: the JSON records and the plots."""
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(records, indent=1) + "\n")
    if plots is not None:
        from shiftlib.bench.plot import plot_all

        plot_all(records, plots)


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from shiftlib.bench.report import table
    from shiftlib.cli import user_errors

    def save(records: list[dict]) -> None:  # after every record, so a run cut short keeps what it measured
        if args.output is not None:
            write(records, args.output, None)

    with user_errors():
        records = run_bench(options(args), save)
    if dist.get_rank() == 0:
        write(records, args.output, args.plots)
        print(table(records))
    dist.barrier()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m shiftlib.bench ARGS`` is ``shiftlib bench ARGS``: the same parser, errors and exit codes."""
    from shiftlib.cli import main as shiftlib_main

    return shiftlib_main(["bench", *(sys.argv[1:] if argv is None else argv)])
