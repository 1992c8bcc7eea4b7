"""The decoder stack of a parallelized model: where tokens are split (SP mode) or not (TP mode).

``ShiftModel`` takes the place of Hugging Face's ``LlamaModel``/``Qwen3Model``/...: HF's own ``ForCausalLM``
wrapper still calls it, so ``model(input_ids=ids).logits`` keeps working, while the engine calls
:meth:`ShiftModel.hidden` with a paged cache. Between layers a rank holds all N tokens (TP mode) or its
contiguous ``N/sp`` slice of them (SP mode); the step's mode is a plain string, fixed for the whole step.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

from shiftlib.mesh import ShiftMesh
from shiftlib.modules.attention import ShiftAttention
from shiftlib.modules.embedding import VocabParallelEmbedding
from shiftlib.modules.mlp import ShiftMLP
from shiftlib.modules.norm import RMSNorm
from shiftlib.paged_attention import AttentionBatch

MODES = ("tp", "sp", "auto")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use 'tp' (all ranks share every token), 'sp' (tokens split "
                         f"over sp ranks) or 'auto' (decided per step by the token count and the threshold)")
    return mode


class ShiftDecoderLayer(nn.Module):
    """Pre-norm decoder layer (Llama, Mistral, Qwen2, Qwen3); attribute names match Hugging Face's."""

    def __init__(self, input_layernorm: RMSNorm, self_attn: ShiftAttention, post_attention_layernorm: RMSNorm, mlp: ShiftMLP) -> None:
        super().__init__()
        self.input_layernorm, self.self_attn = input_layernorm, self_attn
        self.post_attention_layernorm, self.mlp = post_attention_layernorm, mlp

    def forward(self, x, residual, cos, sin, batch: AttentionBatch, kv_cache, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the MLP output and the residual stream before it; the next norm adds them (one kernel)."""
        h, residual = self.input_layernorm.add(x, residual)
        h, residual = self.post_attention_layernorm.add(self.self_attn(h, cos, sin, batch, kv_cache, mode), residual)
        return self.mlp(h, mode), residual


class ShiftModel(nn.Module):
    def __init__(
        self,
        config,
        embed_tokens: VocabParallelEmbedding,
        layers: list[ShiftDecoderLayer],
        norm: RMSNorm,
        rotary_emb: nn.Module,
        mesh: ShiftMesh,
        threshold: int,
    ) -> None:
        super().__init__()
        self.config, self.mesh = config, mesh
        self.embed_tokens, self.layers, self.norm, self.rotary_emb = embed_tokens, nn.ModuleList(layers), norm, rotary_emb
        self.threshold = threshold
        self.mode = "auto"

    def pick_mode(self, num_tokens: int, mode: str | None = None, threshold: int | None = None) -> str:
        """The switch: a step of at most ``threshold`` tokens runs in TP mode, a larger one in SP mode.

        ``mode`` and ``threshold`` override the model's own (``None`` keeps them).
        """
        mode = check_mode(mode or self.mode)
        if mode == "auto":
            return "tp" if num_tokens <= (self.threshold if threshold is None else threshold) else "sp"
        return mode

    def hidden(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        batch: AttentionBatch,
        mode: str,
        rows: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        trash_slot: int = 0,
    ) -> torch.Tensor:
        """Run one step; return the final-norm hidden states of ``rows`` (R,), the same on every rank.

        ``tokens``, ``positions`` and ``batch`` describe all N tokens of the step on every rank. In SP mode they
        are padded to a multiple of ``sp`` here and each rank embeds only its slice.
        """
        n, sp = tokens.shape[0], self.mesh.sp
        if mode == "sp" and n % sp:
            pad = sp - n % sp
            tokens, positions = torch.cat([tokens, tokens.new_zeros(pad)]), torch.cat([positions, positions.new_zeros(pad)])
            batch = batch.padded(n + pad, trash_slot)
        cos, sin = (t[0] for t in self.rotary_emb(self.norm._w, positions[None]))
        first, count = 0, tokens.shape[0]
        if mode == "sp":
            count = tokens.shape[0] // sp
            first = self.mesh.s * count
        x, residual = self.embed_tokens(tokens[first : first + count], mode), None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, cos, sin, batch, None if kv_caches is None else kv_caches[i], mode)
        x, _ = self.norm.add(x, residual)
        if mode == "tp" or sp == 1:
            return x[rows]
        local = rows - first  # each sampled row lives on one sp rank: pick it there, zeros elsewhere, sum
        mine = (local >= 0) & (local < count)
        return self.mesh.sum_over_sp(torch.where(mine[:, None], x[local.clamp(0, count - 1)], 0))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Hugging Face's call on full sequences (no cache): returns the whole (B, S, D) on every rank."""
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("a parallelized model takes input_ids (inputs_embeds is not supported)")
        if past_key_values is not None:
            raise ValueError("past_key_values is not supported: use shiftlib.generate for cached decoding")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padding in attention_mask is not supported: pass unpadded sequences of one "
                             "length, or use shiftlib.generate for ragged batches")
        B, S = input_ids.shape
        device = input_ids.device
        positions = (position_ids.expand(B, S) if position_ids is not None else torch.arange(S, device=device).expand(B, S))
        mode = self.pick_mode(B * S)
        rows = torch.arange(B * S, device=device)
        h = self.hidden(input_ids.flatten(), positions.flatten(), AttentionBatch.dense(B, S, device), mode, rows)
        return BaseModelOutputWithPast(last_hidden_state=h.view(B, S, -1))
