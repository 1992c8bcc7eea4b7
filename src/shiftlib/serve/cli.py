"""``shiftlib serve``: the command line of the server.

    torchrun --nproc-per-node 4 -m shiftlib serve --model DIR --tp 2 --sp 2 --port 8000

The seed system's vLLM spellings work too: ``--tensor-parallel-size``, ``--ulysses-sequence-parallel-size``,
``--shift-parallel-threshold`` and ``--enable-shift-parallel`` (the default mode, ``auto``).
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
from datetime import timedelta


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``serve`` to a ``shiftlib`` command's subparsers."""
    from shiftlib.cli import _add_model_arguments, _at_least, add_engine_arguments

    p = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API (under torchrun)",
                              description="Serve the model over an OpenAI-compatible HTTP API: every rank steps "
                                          "the engine in lockstep, rank 0 serves HTTP. vLLM's spellings of the mesh "
                                          "and mode options work as aliases.")
    _add_model_arguments(p)
    add_engine_arguments(p)
    a = p.add_argument
    alias = dict(default=argparse.SUPPRESS)  # the option it stands for holds the default
    a("--tensor-parallel-size", dest="tp", type=_at_least(1), help="the same as --tp", **alias)
    a("--ulysses-sequence-parallel-size", dest="sp", type=_at_least(1), help="the same as --sp", **alias)
    a("--shift-parallel-threshold", dest="threshold", type=_at_least(0), help="the same as --threshold", **alias)
    a("--enable-shift-parallel", dest="mode", action="store_const", const="auto", help="the same as --mode auto",
      **alias)
    a("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface")
    a("--port", type=_at_least(0, at_most=65535), default=8000, help="port to listen on; 0 picks a free one")
    a("--served-model-name", default=None, help="the model's id in the API (default: --model as given)")
    a("--max-waiting", type=_at_least(0), default=1024,
      help="requests queued beyond the running ones; more are refused with 503 and Retry-After")
    a("--shutdown-timeout", type=_at_least(0.0, float), default=20.0,
      help="seconds requests in flight get to finish after SIGINT/SIGTERM before they are aborted (keep it under "
           "torchrun's own --shutdown-timeout, 30 s by default)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import torch.distributed as dist

    import shiftlib
    from shiftlib.cli import UserError, _mesh_shape, _model_dir, _rank, engine_kwargs, pick_device, user_errors
    from shiftlib.loading import _load_tokenizer, _read_config
    from shiftlib.mesh import DIST_TIMEOUT_S, drain_at_exit
    from shiftlib.serve.frontend import FrontendConfig
    from shiftlib.serve.loop import FrontendPipe, Lockstep
    from shiftlib.serve.protocol import Limits
    from shiftlib.serve.sync import StepSync

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"shiftlib serve needs {', '.join(missing)}: pip install \"shiftlib[serve]\"")
    tp, sp = _mesh_shape(args)
    device = pick_device(args)
    model_dir = _model_dir(args.model)
    name = args.served_model_name or args.model
    with user_errors():  # everything cheap first, so a mistake costs no weight loading
        config = _read_config(model_dir)
        if _load_tokenizer(model_dir) is None:
            raise UserError(f"{model_dir} has no tokenizer (tokenizer.json / tokenizer_config.json): the server "
                            f"needs one to read prompts and write text")
        mesh = shiftlib.init_mesh(tp, sp, device, timeout_s=args.dist_timeout)
    control = None
    if dist.get_world_size() > 1:  # CPU, gloo: the per-step broadcast never waits on the GPU
        control = dist.new_group(backend="gloo", timeout=timedelta(seconds=args.dist_timeout or DIST_TIMEOUT_S))
        drain_at_exit(control)
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
            engine = shiftlib.Engine(model, **engine_kwargs(args))
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
    except Exception as e:  # a rank died (a collective failed), or a bug: the HTTP side says so before it goes
        if frontend is not None and not isinstance(e, UserError):
            frontend.fail(f"{type(e).__name__}: {e}")
        raise
    finally:
        if frontend is not None:
            frontend.close()
    if _rank() == 0:
        print("shiftlib serve: stopped", flush=True)
    return 0
