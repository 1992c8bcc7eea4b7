"""``shiftlib serve``: the command line of the server.

    torchrun --nproc-per-node 4 -m shiftlib serve --model DIR --tp 2 --sp 2 --port 8000

The seed system's vLLM spellings work too: ``--tensor-parallel-size``, ``--ulysses-sequence-parallel-size``,
``--shift-parallel-threshold`` and ``--enable-shift-parallel`` (the default mode, ``auto``).
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import sys
import traceback
from datetime import timedelta

EXIT_FAILURE = 1
CONTROL_TIMEOUT = timedelta(seconds=600)  # a rank waits at most this long for rank 0 (idle waits are 1 s)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``serve`` to a ``shiftlib`` command's subparsers."""
    from shiftlib.cli import TINY

    p = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API (under torchrun)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", required=True, help=f"a Hugging Face model directory, or '{TINY}' for the built-in tiny checkpoint")
    a("--tp", "--tensor-parallel-size", dest="tp", type=int, default=None,
      help="tensor-parallel size of SP mode (default: world size / sp)")
    a("--sp", "--ulysses-sequence-parallel-size", dest="sp", type=int, default=1,
      help="Ulysses sequence-parallel size (default 1)")
    a("--threshold", "--shift-parallel-threshold", dest="threshold", type=int, default=256,
      help="steps of at most this many tokens run in TP mode (default 256)")
    a("--mode", default="auto", choices=("auto", "tp", "sp"), help="force one mode (default auto)")
    a("--enable-shift-parallel", dest="mode", action="store_const", const="auto", help="same as --mode auto")
    a("--dtype", default=None, help="float32, bfloat16, float16 or float64 (default: the checkpoint's)")
    a("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    a("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    a("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    a("--served-model-name", default=None, help="the model's id in the API (default: --model as given)")
    a("--max-num-seqs", type=int, default=256, help="requests running at once (default 256)")
    a("--max-num-tokens", type=int, default=4096, help="token budget of one step (default 4096)")
    a("--num-blocks", type=int, default=None, help="KV-cache blocks per rank (default: from --memory-fraction)")
    a("--memory-fraction", type=float, default=0.9, help="share of free GPU memory for the KV cache (default 0.9)")
    a("--block-size", type=int, default=16, help="tokens per KV-cache block (default 16)")
    a("--max-waiting", type=int, default=1024,
      help="requests queued beyond the running ones; more are refused with 503 and Retry-After (default 1024)")
    a("--shutdown-timeout", type=float, default=20.0,
      help="seconds requests in flight get to finish after SIGINT/SIGTERM, then they are aborted (default 20; "
           "keep it under torchrun's --shutdown-timeout, 30 s by default)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import torch
    import torch.distributed as dist

    import shiftlib
    from shiftlib.cli import UserError, _mesh_shape, _model_dir, _rank, user_errors
    from shiftlib.loading import _load_tokenizer, _read_config
    from shiftlib.serve.frontend import FrontendConfig
    from shiftlib.serve.loop import FrontendPipe, Lockstep
    from shiftlib.serve.protocol import Limits
    from shiftlib.serve.sync import StepSync

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"shiftlib serve needs {', '.join(missing)}: pip install \"shiftlib[serve]\"")
    tp, sp = _mesh_shape(args)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_waiting < 0 or args.shutdown_timeout < 0:
        raise UserError(f"--max-waiting and --shutdown-timeout must be >= 0, got {args.max_waiting} and "
                        f"{args.shutdown_timeout}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA device: use --device cpu")
    model_dir = _model_dir(args.model)
    name = args.served_model_name or args.model
    with user_errors():  # everything cheap first, so a mistake costs no weight loading
        config = _read_config(model_dir)
        if _load_tokenizer(model_dir) is None:
            raise UserError(f"{model_dir} has no tokenizer (tokenizer.json / tokenizer_config.json): the server "
                            f"needs one to read prompts and write text")
        mesh = shiftlib.init_mesh(tp, sp, device)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT) if dist.get_world_size() > 1 else None
    frontend = None
    if _rank() == 0:
        frontend = FrontendPipe(FrontendConfig(args.host, args.port, str(model_dir), name, args.max_waiting),
                                args.shutdown_timeout)
    try:
        verdict = [frontend.wait_listening() if frontend else None]
        if control is not None:
            dist.broadcast_object_list(verdict, src=0, group=control)
        if verdict[0] is not None:
            raise UserError(verdict[0])
        with user_errors():
            model = shiftlib.from_pretrained(model_dir, mesh, dtype=args.dtype, threshold=args.threshold)
            engine = shiftlib.Engine(model, num_blocks=args.num_blocks, block_size=args.block_size,
                                     max_num_tokens=args.max_num_tokens, max_num_seqs=args.max_num_seqs,
                                     mode=args.mode, memory_fraction=args.memory_fraction)
        if frontend is not None:
            frontend.start(Limits(engine.max_context, engine.cache.capacity_tokens, config.vocab_size),
                           args.threshold, args.mode)
            print(f"shiftlib serve: {name} on {frontend.url} (mesh tp={tp} x sp={sp}, mode {args.mode}, threshold "
                  f"{args.threshold}, {engine.cache.capacity_tokens} cache tokens); stop with Ctrl-C or SIGTERM",
                  flush=True)
        else:  # torchrun signals every rank; rank 0 alone decides, and tells the others in the next step
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
        Lockstep(engine, StepSync(control), frontend).run()
    except UserError:
        raise
    except Exception as e:  # a rank died (a collective failed) or a bug: report it, then leave at once
        if frontend is not None:
            frontend.fail(f"{type(e).__name__}: {e}")
        traceback.print_exc()
        print(f"shiftlib serve: rank {_rank()} stops: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
              file=sys.stderr, flush=True)
        return EXIT_FAILURE
    finally:
        if frontend is not None:
            frontend.close()
    if _rank() == 0:
        print("shiftlib serve: stopped", flush=True)
    return 0
