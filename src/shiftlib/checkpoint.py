"""Write a small Hugging Face checkpoint (sharded safetensors + tokenizer + chat template) without any download.

``shiftlib generate --model tiny`` runs on this: the weights are random (seeded), the tokenizer is a byte-level
BPE trained here on a fixed text, over printable ASCII only, so the whole path a real checkpoint takes (sharded index, tokenizer, chat
template, EOS) is exercised on any machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from transformers.utils import logging as hf_logging

from shiftlib.presets import random_model, tiny_config

TINY_VOCAB = 256  # divisible by every P up to 8 (vocab-parallel layers need equal shards)
TINY_NAME = "tiny-v2"  # bump when the content changes, so stale caches are not reused
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_CORPUS = """\
Shift parallelism runs each step of a language model in one of two ways. Small batches take tensor parallelism:
every rank holds every token and a share of the heads. Large batches take sequence parallelism: the tokens are
split across the ranks, and an all-to-all gives each rank every token for its own heads. The key and value cache
is the same in both modes, so the mode may change at every step. The quick brown fox jumps over the lazy dog.
Hello, world! The model reads a prompt, writes one token at a time, and stops at the end of its answer.
"""


def tiny_tokenizer(vocab_size: int = TINY_VOCAB):
    """A byte-level BPE tokenizer with BOS/EOS/PAD, role tokens and a chat template, built locally.

    Its base alphabet is printable ASCII and newline: a random model samples any token, and none of them may
    print control bytes or broken UTF-8 on a terminal. Other characters in a prompt are dropped.

    Args:
        vocab_size: exact size of the vocabulary (256 bytes + special tokens + learned merges).

    Returns:
        A ``transformers`` fast tokenizer, ready for ``save_pretrained``.

    Raises:
        ValueError: the fixed training text cannot fill ``vocab_size`` tokens.

    Example:
        >>> tok = tiny_tokenizer(); tok.decode(tok.encode("hello"), skip_special_tokens=True)
        'hello'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    printable = "".join(map(chr, range(32, 127))) + "\n"
    alphabet = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(printable)[0][0]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=list(alphabet),
                                  limit_alphabet=len(alphabet), show_progress=False)
    tok.train_from_iterator([_CORPUS], trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"the tiny tokenizer's training text gives {tok.get_vocab_size()} tokens, not {vocab_size}: "
                         f"choose a smaller vocab_size")
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", chat_template=CHAT_TEMPLATE,
    )


def write_tiny(directory: str | os.PathLike, family: str = "llama", seed: int = 0, max_shard_size: int | str = "100KB",
               **overrides) -> Path:
    """Write a tiny random checkpoint of one supported family, in several safetensors shards, with its tokenizer.

    Args:
        directory: where to write (created; existing files of the same names are overwritten).
        family: ``"llama"``, ``"mistral"``, ``"qwen2"`` or ``"qwen3"`` (qwen3 ties its embeddings).
        seed: seed of the random weights.
        max_shard_size: passed to ``save_pretrained``; the default splits the tiny model into several shards.
        **overrides: config fields that replace :func:`shiftlib.presets.tiny_config`'s.

    Returns:
        The directory, ready for :func:`shiftlib.from_pretrained` and ``AutoModelForCausalLM.from_pretrained``.

    Example:
        >>> path = write_tiny("/tmp/tiny")
        >>> model = shiftlib.from_pretrained(path, shiftlib.init_mesh(1, 1))
    """
    tokenizer = tiny_tokenizer(overrides.pop("vocab_size", TINY_VOCAB))
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = tiny_config(family, vocab_size=len(tokenizer), **{**ids, **overrides})
    model = random_model(config, seed=seed)
    model.generation_config.update(**ids)
    directory = Path(directory)
    was_shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per rank for a sub-second write is noise
    try:
        model.save_pretrained(directory, max_shard_size=max_shard_size)
    finally:
        if was_shown:
            hf_logging.enable_progress_bar()
    if not (directory / "config.json").is_file():
        raise RuntimeError("save_pretrained wrote no weights: inside a process group transformers writes them on "
                           "rank 0 only, so call write_tiny there (tiny_checkpoint does)")
    tokenizer.save_pretrained(directory)
    return directory


def default_home() -> Path:
    """``$SHIFTLIB_HOME`` if set, else ``~/.cache/shiftlib``."""
    return Path(os.environ.get("SHIFTLIB_HOME") or Path.home() / ".cache" / "shiftlib")


def tiny_checkpoint(home: str | os.PathLike | None = None) -> Path:
    """The embedded default model (``--model tiny``): written on first use, then reused.

    The checkpoint is written into a temporary directory and renamed into place; a rename onto an existing
    directory fails, so the first writer wins and later ones discard theirs: processes starting at once (e.g.
    torchrun ranks before the process group exists) never see a half-written checkpoint and need no barrier.
    Inside a process group only rank 0 writes (``save_pretrained`` writes weights on rank 0 alone) and the
    others wait for its verdict.

    Args:
        home: cache root; default :func:`default_home`.

    Returns:
        The checkpoint directory (``<home>/tiny-v2``).

    Raises:
        FileNotFoundError: in a process group, rank 0 wrote it but this rank cannot see it (``home`` is not on
            a shared file system).

    Example:
        >>> shiftlib.from_pretrained(tiny_checkpoint(), shiftlib.init_mesh(1, 1))
    """
    import torch.distributed as dist

    target = (Path(home) if home is not None else default_home()) / TINY_NAME
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return _write_once(target)
    verdict: list = [None]
    if dist.get_rank() == 0:
        try:
            _write_once(target)
        except Exception as e:  # noqa: BLE001 - every rank must hear of it, then rank 0 re-raises it
            verdict[0] = f"{type(e).__name__}: {e}"
            dist.broadcast_object_list(verdict, src=0)
            raise
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise RuntimeError(f"rank 0 could not write the tiny checkpoint to {target}: {verdict[0]}")
    if not (target / "config.json").is_file():
        raise FileNotFoundError(f"rank 0 wrote the tiny checkpoint to {target}, which this rank cannot see: set "
                                f"SHIFTLIB_HOME to a directory every node shares")
    return target


def _write_once(target: Path) -> Path:
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write_tiny(tmp)
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # not a lost race: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
