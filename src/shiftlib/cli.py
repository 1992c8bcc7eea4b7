"""The ``shiftlib`` command (also ``python -m shiftlib``), made to run under torchrun.

    torchrun --nproc-per-node 2 -m shiftlib generate --model DIR --tp 2 --sp 1 --prompt "Hello"
    shiftlib info --model DIR --tp 2 --sp 2

Every rank parses the same arguments and reads the same files, so input errors are the same on every rank:
rank 0 prints one line on stderr and every rank exits with code 2 at once. Errors found while loading are
agreed between ranks by :func:`shiftlib.from_pretrained`. Anything else is a bug or a crash: it keeps its
traceback, and torchrun stops the other ranks when one exits non-zero.

Each subcommand sets ``func(args) -> int`` on its parser. ``bench`` and ``serve`` live in ``shiftlib.bench.cli``
and ``shiftlib.serve.cli`` (``add_parser(subparsers)`` and ``run(args)``) and are listed when those modules exist.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

EXIT_USAGE = 2
EXIT_FAILURE = 1
FAILURE_GRACE_S = 2.0  # see _exit
TINY = "tiny"


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as one line on stderr, exit code 2.

    ``shared`` says every rank reaches the same error (then only rank 0 prints it).
    """

    def __init__(self, message: str, shared: bool = True) -> None:
        super().__init__(message)
        self.shared = shared


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the documented input errors of the library (ValueError, FileNotFoundError) into :class:`UserError`."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in help_text:
            help_text += " (default: %(default)s)"
        return help_text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, not usage + message
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# -- shared pieces -----------------------------------------------------------------------------------------


def _at_least(low: float, kind=int, at_most: float | None = None):
    """An argparse type: ``kind`` values below ``low`` (or above ``at_most``) are an error that names the flag
    (argparse adds it)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if value < low or (at_most is not None and value > at_most):
            bound = f">= {low}" if at_most is None else f"in [{low}, {at_most}]"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help=f"a Hugging Face model directory, or '{TINY}' for the built-in tiny checkpoint (written on "
                        f"first use under $SHIFTLIB_HOME or ~/.cache/shiftlib; use ./{TINY} for a directory so named)")
    p.add_argument("--tp", type=_at_least(1), default=None,
                   help="tensor-parallel size of SP mode (default: world size / sp)")
    p.add_argument("--sp", type=_at_least(1), default=1, help="Ulysses sequence-parallel size")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or float64 (default: the checkpoint's)")


def add_speculative_arguments(p: argparse.ArgumentParser) -> None:
    """``--speculative`` and ``--num-speculative-tokens`` (the engine's, and the benchmark's)."""
    p.add_argument("--speculative", choices=("suffix",), default=None,
                   help="suffix: draft tokens from the prompt and earlier answers (SuffixDecoding), same output")
    p.add_argument("--num-speculative-tokens", type=_at_least(1), default=16, help="draft length at most")


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The options of :class:`shiftlib.Engine` that every command running the engine takes."""
    p.add_argument("--threshold", type=_at_least(0), default=256, help="steps of at most this many tokens run in TP mode")
    p.add_argument("--mode", default="auto", choices=("auto", "tp", "sp"), help="force one mode")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--max-num-seqs", type=_at_least(1), default=256, help="requests running at once")
    p.add_argument("--max-num-tokens", type=_at_least(1), default=4096,
                   help="token budget of one step (prompts are prefilled in chunks of at most this)")
    p.add_argument("--block-size", type=_at_least(1), default=16, help="tokens per KV-cache block")
    p.add_argument("--num-blocks", type=_at_least(1), default=None,
                   help="KV-cache blocks per rank (default: --memory-fraction of free GPU memory; 1024 on CPU)")
    p.add_argument("--memory-fraction", type=_at_least(0.0, float), default=0.9,
                   help="share of free GPU memory the KV cache may take")
    p.add_argument("--dist-timeout", type=_at_least(1.0, float), default=None,
                   help="seconds a rank waits for its peers in a collective before it gives up and exits non-zero "
                        "(default 600; bounds the wait on a frozen peer, a dead one is noticed at once)")
    add_speculative_arguments(p)


def engine_kwargs(args) -> dict:
    """The :class:`shiftlib.Engine` keywords of :func:`add_engine_arguments`' options."""
    return dict(mode=args.mode, max_num_seqs=args.max_num_seqs, max_num_tokens=args.max_num_tokens,
                block_size=args.block_size, num_blocks=args.num_blocks, memory_fraction=args.memory_fraction,
                speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens)


def pick_device(args) -> str:
    """``--device``, checked against what torch sees on this rank."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA device: use --device cpu")
    if device == "cuda" and int(os.environ.get("LOCAL_RANK", "0")) >= torch.cuda.device_count():
        raise UserError(f"rank {_rank()} has local rank {os.environ.get('LOCAL_RANK')} but only "
                        f"{torch.cuda.device_count()} GPUs are visible: lower --nproc-per-node", shared=False)
    return device


def _model_dir(name: str) -> Path:
    if name == TINY:
        from shiftlib.checkpoint import tiny_checkpoint

        return tiny_checkpoint()
    return Path(name).expanduser()


def _mesh_shape(args) -> tuple[int, int]:
    tp = args.tp if args.tp is not None else max(_world() // args.sp, 1)
    return tp, args.sp


# -- generate ----------------------------------------------------------------------------------------------


def _add_generate(p: argparse.ArgumentParser) -> None:
    _add_model_arguments(p)
    add_engine_arguments(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", type=Path,
                   help="JSONL: one prompt per line, a JSON string or {\"prompt\": ...} or {\"messages\": [...]}")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--max-new-tokens", type=_at_least(0), default=32, help="new tokens per prompt at most")
    p.add_argument("--temperature", type=_at_least(0.0, float), default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]; 1 disables it")
    p.add_argument("--top-k", type=_at_least(0), default=0, help="sample among the k most likely tokens; 0 disables it")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (prompt i uses seed + i)")
    p.add_argument("--output", type=Path, help="write the completions as JSONL here instead of printing them")
    p.set_defaults(func=run_generate)


def read_prompts(args) -> list[str | list[dict]]:
    """The prompts of ``--prompt`` then ``--prompts-file``: strings, or chat message lists."""
    prompts: list[str | list[dict]] = list(args.prompt)
    if args.prompts_file is not None:
        path = args.prompts_file
        try:
            lines = path.read_text().splitlines()
        except OSError as e:
            raise UserError(f"cannot read --prompts-file {path}: {e.strerror}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                raise UserError(f"{path} line {n} is not valid JSON: write one JSON string or object per "
                                f"line") from None
            if isinstance(item, dict) and isinstance(item.get("messages"), list):
                prompts.append(item["messages"])
            elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
                prompts.append(item["prompt"])
            elif isinstance(item, str):
                prompts.append(item)
            else:
                raise UserError(f"{path} line {n}: expected a string, {{\"prompt\": \"...\"}} or "
                                f"{{\"messages\": [...]}}, got {line.strip()[:60]}")
    if not prompts:
        raise UserError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE.jsonl")
    return prompts


def encode_prompts(tokenizer, prompts: list[str | list[dict]], chat: bool, model_dir: Path) -> list[list[int]]:
    """Token ids of each prompt: plain encoding, or the chat template for ``--chat`` and message lists."""
    if tokenizer is None:
        raise UserError(f"{model_dir} has no tokenizer (tokenizer.json / tokenizer_config.json): text prompts need one")
    needs_template = chat or any(not isinstance(p, str) for p in prompts)
    if needs_template and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"the tokenizer in {model_dir} has no chat template: drop --chat and pass plain prompts")
    ids = []
    for p in prompts:
        if isinstance(p, str) and not chat:
            ids.append(list(tokenizer.encode(p)))
            continue
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else p
        try:
            ids.append(list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                          return_dict=False)))
        except Exception as e:  # noqa: BLE001 - a template that fails on these messages is an input error
            raise UserError(f"the chat template of {model_dir} fails on {str(messages)[:60]}: {e}") from None
    return ids


def check_lengths(ids: list[list[int]], max_new_tokens: int, config, num_blocks: int | None, block_size: int) -> None:
    """Refuse, before any weight is loaded, a prompt that cannot fit the model's context or a known cache size."""
    context = config.max_position_embeddings
    capacity = (num_blocks or 0) * block_size
    for i, prompt in enumerate(ids):
        total = len(prompt) + max_new_tokens
        if total > context:
            raise UserError(f"prompt {i} ({len(prompt)} tokens) + --max-new-tokens {max_new_tokens} exceeds the "
                            f"model's context of {context} tokens: shorten the prompt or lower --max-new-tokens")
        if num_blocks is not None and total > capacity:
            raise UserError(f"prompt {i} ({len(prompt)} tokens) + --max-new-tokens {max_new_tokens} exceeds the KV "
                            f"cache of {capacity} tokens: raise --num-blocks or --block-size, or shorten the prompt")


def run_generate(args) -> int:
    import shiftlib
    from shiftlib.engine.memory import CPU_DEFAULT_BLOCKS
    from shiftlib.loading import _load_tokenizer, _read_config

    tp, sp = _mesh_shape(args)
    prompts = read_prompts(args)
    device = pick_device(args)
    model_dir = _model_dir(args.model)
    with user_errors():  # everything cheap first, so a mistake costs no weight loading
        shiftlib.SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k)
        config = _read_config(model_dir)
        ids = encode_prompts(_load_tokenizer(model_dir), prompts, args.chat, model_dir)
        known_blocks = args.num_blocks or (CPU_DEFAULT_BLOCKS if device == "cpu" else None)  # GPU: sized after loading
        check_lengths(ids, args.max_new_tokens, config, known_blocks, args.block_size)
        mesh = shiftlib.init_mesh(tp, sp, device, timeout_s=args.dist_timeout)
        model = shiftlib.from_pretrained(model_dir, mesh, dtype=args.dtype, threshold=args.threshold)
        outputs = shiftlib.generate(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                    top_p=args.top_p, top_k=args.top_k, seed=args.seed, **engine_kwargs(args))
    tokenizer = model.tokenizer
    texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
    if _rank() == 0:
        if args.output is not None:
            with open(args.output, "w") as f:
                for prompt, prompt_ids, out, text in zip(prompts, ids, outputs, texts):
                    f.write(json.dumps({"prompt": prompt, "prompt_ids": prompt_ids, "completion": text,
                                        "token_ids": out}) + "\n")
            print(f"wrote {len(texts)} completions to {args.output}")
        else:
            for i, (prompt, text) in enumerate(zip(prompts, texts)):
                shown = prompt if isinstance(prompt, str) else json.dumps(prompt)
                print(f"=== prompt {i}: {shown}\n{text}")
    return 0


# -- info --------------------------------------------------------------------------------------------------


def _add_info(p: argparse.ArgumentParser) -> None:
    _add_model_arguments(p)
    p.add_argument("--block-size", type=_at_least(1), default=16, help="tokens per KV-cache block")
    p.set_defaults(func=run_info)


def _span(r: range) -> str:
    return f"{r.start}" if len(r) == 1 else f"{r.start}-{r.stop - 1}"


def describe(config, tp: int, sp: int, dtype, block_size: int) -> str:
    """The text of ``shiftlib info``: mesh, which heads each rank owns in each mode, and memory per rank."""
    from shiftlib.cache import PagedKVCache
    from shiftlib.loading import parameter_bytes_per_rank
    from shiftlib.mesh import HeadMap
    from shiftlib.plan import sliding_window

    P, D = tp * sp, config.hidden_size
    heads = HeadMap.from_config(config, P)
    d = heads.head_dim
    param_bytes = parameter_bytes_per_rank(config, tp, sp, dtype)
    block = PagedKVCache.bytes_per_block(config.num_hidden_layers, block_size, heads.kv_per_chunk, d, dtype)
    arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    windows = {sliding_window(config, i) for i in range(config.num_hidden_layers)} - {None}
    lines = [
        f"model   {arch}: {config.num_hidden_layers} layers, hidden {D}, {heads.num_heads} query heads and "
        f"{heads.num_kv_heads} KV heads of dim {d}, intermediate {config.intermediate_size}, vocab "
        f"{config.vocab_size}{', sliding window ' + str(sorted(windows)) if windows else ''}; dtype "
        f"{str(dtype).removeprefix('torch.')}",
        f"mesh    tp={tp} x sp={sp} = {P} ranks (launch with torchrun --nproc-per-node {P}); the rank at (t, s) is "
        f"global rank t*sp+s and owns head chunk c = t*sp+s in both modes",
        "",
        "heads   attention (TP and SP mode alike) runs chunk c's heads over all tokens. The projections differ:",
        "        SP mode projects the rank's N/sp tokens for all heads of its tp shard (chunks t*sp .. t*sp+sp-1);",
        "        TP mode projects all N tokens for chunk c's heads alone.",
    ]
    if heads.num_kv_heads < P:
        lines.append(f"        {heads.num_kv_heads} KV heads < {P} ranks: each KV head is stored on "
                     f"{P // heads.num_kv_heads} ranks (replicated)")
    header = (f"{'rank':>4} {'(t,s)':>6} {'chunk':>5}  {'q heads':>9} {'kv heads':>9}  {'SP-mode q':>9} "
              f"{'SP-mode kv':>10}  {'params':>10}")
    lines += ["", header]
    for t in range(tp):
        shard = range(t * sp, (t + 1) * sp)
        sp_q = range(heads.q_heads(shard.start).start, heads.q_heads(shard.stop - 1).stop)
        sp_kv = sorted({k for c in shard for k in heads.kv_heads(c)})
        for s in range(sp):
            c = t * sp + s
            lines.append(f"{c:>4} {f'({t},{s})':>6} {c:>5}  {_span(heads.q_heads(c)):>9} "
                         f"{_span(heads.kv_heads(c)):>9}  "
                         f"{_span(sp_q):>9} {_span(range(sp_kv[0], sp_kv[-1] + 1)):>10}  {_bytes(param_bytes):>10}")
    lines += [
        "",
        f"memory  per rank: parameters {_bytes(param_bytes)}; KV cache {_bytes(block)} per block of {block_size} "
        f"tokens ({_bytes(block / block_size)} per token, all {config.num_hidden_layers} layers, K and V)",
    ]
    return "\n".join(lines)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def run_info(args) -> int:
    import torch

    from shiftlib.loading import _read_config, resolve_dtype

    tp, sp = _mesh_shape(args)
    with user_errors():
        config = _read_config(_model_dir(args.model))
        dtype = resolve_dtype(args.dtype or getattr(config, "dtype", None), torch.device("cpu"))
        text = describe(config, tp, sp, dtype, args.block_size)
    if _rank() == 0:
        print(text)
    return 0


# -- main --------------------------------------------------------------------------------------------------

COMMANDS = {
    "generate": ("generate completions for prompts (run under torchrun for several ranks)", _add_generate),
    "info": ("print the mesh, the head-to-rank map and the memory per rank", _add_info),
}
# Modules with add_parser(subparsers) -> parser, and run(args) -> int.
PLUGINS = {"bench": "shiftlib.bench.cli", "serve": "shiftlib.serve.cli"}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shiftlib", description="Shift Parallelism inference: TP for small batches, SP x TP for "
                                                  "large ones, over one set of weights and one KV cache.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (help_text, add) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    for name, module in PLUGINS.items():
        try:
            plugin = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name not in (module, module.rpartition(".")[0]):
                raise
            continue
        p = plugin.add_parser(sub)
        if p.get_default("func") is None:
            p.set_defaults(func=plugin.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``shiftlib`` command line.

    Args:
        argv: the arguments after the program name; default ``sys.argv[1:]``.

    Returns:
        The exit code: 0 on success, 2 for a user mistake (after one line on stderr).

    Example:
        >>> main(["info", "--model", "tiny", "--tp", "2"])
    """
    owns_group = not _dist_initialized()  # a caller's process group (e.g. in tests) is left alone
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = build_parser().parse_args(argv)
        args.argv = argv  # what was asked for, recorded by the benchmarks
        code, orderly = args.func(args), True
    except UserError as e:
        if not e.shared or _rank() == 0:
            prefix = "" if e.shared else f"rank {_rank()}: "
            print(f"shiftlib: error: {prefix}{e}", file=sys.stderr)
        code, orderly = EXIT_USAGE, e.shared
    except Exception:
        if not owns_group:
            raise  # the caller's process (a test, a notebook) gets the exception itself
        traceback.print_exc()
        code, orderly = EXIT_FAILURE, False
    return _exit(code, owns_group, orderly)


def _dist_initialized() -> bool:
    if "torch" not in sys.modules:  # keep `shiftlib --help` and argument errors free of the torch import
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _exit(code: int, owns_group: bool, orderly: bool) -> int:
    """Tear down the process group this command made.

    ``orderly``: every rank reached the same end (success, or a mistake all ranks found), so all drain and destroy
    their groups together (:func:`shiftlib.mesh.shutdown`). Otherwise this rank alone failed: its peers may be
    dead, or blocked in a collective that waits for it, and a teardown that synchronizes would wait for them.

    A failing rank with peers then leaves without a teardown (``os._exit``, after flushing its output; any
    collective is drained or can never complete, so nothing is lost): torchrun stops every rank when the first one
    exits non-zero, so ranks that share an error must exit together to all report its code, and the closed
    sockets of a rank that failed alone make each peer's pending collective fail, so they exit non-zero too. Each
    rank that leaves this way waits ``FAILURE_GRACE_S`` first. The peers of a rank that raised fail only once it
    is gone, and the peers of a rank killed outright wait too, so a launcher that watches its ranks (torchrun
    polls every 0.1 s) sees the rank that failed first exit first, and names it as the root cause.
    """
    if owns_group and _dist_initialized():
        import torch.distributed as dist

        from shiftlib.mesh import shutdown

        peers = dist.get_world_size() > 1
        if orderly:
            shutdown()
        if code != 0 and peers:
            sys.stdout.flush()
            sys.stderr.flush()
            if not orderly:
                time.sleep(FAILURE_GRACE_S)
            os._exit(code)
    return code
