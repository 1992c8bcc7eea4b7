"""``shiftlib.generate``: one call from prompts to tokens, over an engine kept on the model."""

from __future__ import annotations

from typing import Iterable

from torch import nn

from shiftlib.engine.engine import Engine
from shiftlib.engine.sampler import SamplingParams
from shiftlib.modules.model import check_mode


def generate(
    model: nn.Module,
    prompts: Iterable[list[int] | str],
    max_new_tokens: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    mode: str = "auto",
    threshold: int | None = None,
    stop_token_ids: Iterable[int] = (),
    ignore_eos: bool = False,
    return_text: bool = False,
    **engine_kwargs,
) -> list[list[int]] | list[str]:
    """Generate continuations for a batch of prompts with a parallelized model.

    Every rank calls it with the same arguments and gets the same result. The engine (and its KV cache) is
    built on first use and kept on the model for later calls with the same ``engine_kwargs``; other
    ``engine_kwargs`` replace it, and it is freed with the model.

    Args:
        model: from :func:`shiftlib.parallelize` or :func:`shiftlib.from_pretrained`.
        prompts: lists of token ids, or strings when the model has a tokenizer.
        max_new_tokens: new tokens per prompt at most (fewer when a stop token comes first).
        temperature: ``0`` is greedy; otherwise logits are divided by it before sampling.
        top_p: nucleus sampling: keep the most likely tokens up to this probability mass (``1`` disables).
        top_k: keep only the ``k`` most likely tokens (``0`` disables).
        seed: request ``i`` samples with seed ``seed + i``; ``None`` draws one seed shared by all ranks.
        mode: ``"auto"``, ``"tp"`` or ``"sp"`` for this call.
        threshold: switch point in tokens for this call; ``None`` keeps the model's.
        stop_token_ids: extra tokens that end a request (EOS always does unless ``ignore_eos``).
        ignore_eos: keep generating through the model's EOS token (benchmarks use it for fixed lengths).
        return_text: decode the new tokens with the model's tokenizer.
        **engine_kwargs: passed to :class:`Engine` (``num_blocks``, ``block_size``, ``max_num_tokens``,
            ``speculative="suffix"``, ``num_speculative_tokens``, ...).

    Returns:
        The new tokens of each prompt (without the prompt), or their text with ``return_text``.

    Raises:
        ValueError: empty prompt, prompt longer than the context or the cache, ``max_new_tokens < 0``, unknown
            mode, sampling values out of range.

    Example:
        >>> shiftlib.generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=8)
    """
    key = tuple(sorted(engine_kwargs.items()))
    cached_key, engine = getattr(model, "_shiftlib_engine", (None, None))
    if engine is None or cached_key != key:
        model._shiftlib_engine = None  # the old engine's KV cache is freed before the new one is sized
        engine = Engine(model, **engine_kwargs)
        model._shiftlib_engine = (key, engine)
    previous = engine.mode, engine.threshold
    engine.mode, engine.threshold = check_mode(mode), threshold
    try:
        prompts = list(prompts)
        params = [
            SamplingParams(max_new_tokens, temperature, top_p, top_k, None if seed is None else seed + i, tuple(stop_token_ids), ignore_eos)
            for i in range(len(prompts))
        ]
        outputs = engine.generate(prompts, params)
    finally:
        engine.mode, engine.threshold = previous
    if return_text:
        tok = getattr(model, "tokenizer", None)
        if tok is None:
            raise ValueError("return_text needs a tokenizer: load the model with shiftlib.from_pretrained")
        return [tok.decode(o, skip_special_tokens=True) for o in outputs]
    return outputs
