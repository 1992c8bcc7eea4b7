"""``parallelize``: what happens to each Hugging Face module, as a table, and the mode switch.

======================================  ==========================================  =======================
Hugging Face module                     becomes                                     placement (tp, sp)
======================================  ==========================================  =======================
``model.embed_tokens``                  ``VocabParallelEmbedding``                  Shard(0), Replicate()
``layers[i].self_attn.{q,k,v}_proj``    ``ShiftAttention.qkv_weight`` (chunk-major) Shard(0), Replicate()
``layers[i].self_attn.o_proj``          ``ShiftAttention.o_weight_t`` (transposed)  Shard(0), Replicate()
``layers[i].self_attn.{q,k}_norm``      ``RMSNorm`` (Qwen3)                         Replicate(), Replicate()
``layers[i].mlp.{gate,up}_proj``        ``ShiftMLP.gate_up_weight`` (chunk-major)   Shard(0), Replicate()
``layers[i].mlp.down_proj``             ``ShiftMLP.down_weight_t`` (transposed)     Shard(0), Replicate()
``layers[i].*_layernorm``, ``norm``     ``RMSNorm``                                 Replicate(), Replicate()
``model`` (the decoder stack)           ``ShiftModel``                              —
``lm_head``                             ``VocabParallelHead`` (tied: shared)        Shard(0), Replicate()
======================================  ==========================================  =======================

The TP-mode weights are views of these shards (block ``s`` of each), so the model holds one copy of its weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from shiftlib.mesh import HeadMap, ShiftMesh
from shiftlib.modules import (
    RMSNorm,
    ShiftAttention,
    ShiftDecoderLayer,
    ShiftMLP,
    ShiftModel,
    VocabParallelEmbedding,
    VocabParallelHead,
)
from shiftlib.modules.model import check_mode
from shiftlib.modules.source import Source

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def check_architecture(name: str) -> None:
    if name not in SUPPORTED:
        raise ValueError(f"unsupported architecture {name!r}: shiftlib supports {', '.join(SUPPORTED)}")


def sliding_window(config, layer: int) -> int | None:
    """The attention window of one layer, as Hugging Face decides it for these families."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return config.sliding_window if types[layer] == "sliding_attention" else None
    return getattr(config, "sliding_window", None)


def parallelize(model: nn.Module, mesh: DeviceMesh, threshold: int = 256) -> nn.Module:
    """Shard a Hugging Face causal LM over a ``(tp, sp)`` mesh so it runs in either Shift Parallelism mode.

    In place: the decoder stack, attention, MLP, embedding and head are replaced by their shift versions
    (see the table in this module), parameters become DTensors sharded over ``tp`` and replicated over
    ``sp``, and the full weights are released. ``model(input_ids=ids).logits`` still returns the whole
    (B, S, vocab) logits on every rank.

    Every rank must call it with the same, fully materialized model (e.g. the same seed or checkpoint).

    Args:
        model: a ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` or ``Qwen3ForCausalLM``.
        mesh: from :func:`shiftlib.init_mesh`.
        threshold: steps of at most this many tokens run in TP mode, larger ones in SP mode.

    Returns:
        The same model object, parallelized.

    Raises:
        ValueError: unsupported architecture; head counts, intermediate size or vocabulary not divisible
            by the mesh; a negative threshold; a mesh without dims ``("tp", "sp")``.

    Example:
        >>> model = shiftlib.parallelize(AutoModelForCausalLM.from_pretrained(path), shiftlib.init_mesh(2, 2))
        >>> logits = model(input_ids=ids).logits
    """
    check_architecture(type(model).__name__)
    if isinstance(getattr(model, "model", None), ShiftModel):
        raise ValueError("this model is already parallelized")
    hf = model.model
    params = dict(model.named_parameters(remove_duplicate=False))
    build(model, mesh, threshold, lambda name: params[name], next(model.parameters()).dtype, hf.rotary_emb)
    return model


def build(model: nn.Module, mesh: DeviceMesh, threshold: int, get: Source, dtype: torch.dtype, rotary_emb: nn.Module) -> None:
    """Replace the modules of ``model`` by shift modules holding this rank's shards, read through ``get``."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0 tokens, got {threshold}")
    config = model.config
    sm = ShiftMesh.from_device_mesh(mesh)
    D, V = config.hidden_size, config.vocab_size
    heads = HeadMap.from_config(config, sm.world)

    def under(prefix: str) -> Source:
        return lambda name: get(prefix + name)

    def norm(size: int, prefix: str) -> RMSNorm:
        n = RMSNorm(size, config.rms_norm_eps, sm, dtype)
        n.load(under(prefix))
        return n

    embed = VocabParallelEmbedding(V, D, sm, dtype)
    embed.load(under("model.embed_tokens."))
    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        attn = ShiftAttention(config, heads, sm, sliding_window(config, i), dtype)
        attn.load(under(p + "self_attn."))
        mlp = ShiftMLP(config, sm, dtype)
        mlp.load(under(p + "mlp."))
        layers.append(ShiftDecoderLayer(norm(D, p + "input_layernorm."), attn, norm(D, p + "post_attention_layernorm."), mlp))
    head = VocabParallelHead(V, D, sm, dtype, embed if config.tie_word_embeddings else None)
    head.load(under("lm_head."))
    model.model = ShiftModel(config, embed, layers, norm(D, "model.norm."), rotary_emb.to(sm.device), sm, threshold)
    model.lm_head = head


def shift_model(model: nn.Module) -> ShiftModel:
    """The ``ShiftModel`` inside a parallelized model (or a clear error if it was never parallelized)."""
    inner = getattr(model, "model", None)
    if not isinstance(inner, ShiftModel):
        raise ValueError("this model is not parallelized: call shiftlib.parallelize(model, mesh) first")
    return inner


@contextmanager
def mode(model: nn.Module, m: str) -> Iterator[nn.Module]:
    """Run the model's steps in one mode inside the block: ``"tp"``, ``"sp"`` or ``"auto"``.

    In ``"auto"`` (the default outside any block) a forward of at most ``threshold`` tokens runs in TP mode.
    Both modes give the same logits; the mode only changes how the work is split over the ranks.

    Args:
        model: a model from :func:`shiftlib.parallelize` or :func:`shiftlib.from_pretrained`.
        m: ``"tp"``, ``"sp"`` or ``"auto"``.

    Returns:
        A context manager that yields ``model`` and restores the previous mode on exit.

    Raises:
        ValueError: unknown mode, or a model that was not parallelized.

    Example:
        >>> with shiftlib.mode(model, "sp"):
        ...     logits = model(input_ids=ids).logits
    """
    inner = shift_model(model)
    previous, inner.mode = inner.mode, check_mode(m)
    try:
        yield model
    finally:
        inner.mode = previous
