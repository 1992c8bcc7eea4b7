"""ShiftAttention: one set of weights, two data paths, one KV cache.

Weights are stored the SP-mode way (sharded ``tp`` ways) in *chunk-major* order: the local fused QKV weight is
``sp`` blocks, block ``s`` holding ``[q | k | v]`` of head chunk ``t*sp + s``. Hence

* SP mode: one GEMM gives the projections of the rank's ``N/sp`` tokens already grouped by destination rank,
  and one all-to-all turns (tokens/sp, heads/tp) into (tokens, heads/P);
* TP mode: block ``s`` alone is this rank's TP = P shard, a contiguous view: no second copy of any weight.

The output projection is stored transposed (in x out), so its TP-mode shard is a contiguous row block too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shiftlib.mesh import HeadMap, ShiftMesh
from shiftlib.modules.fused import rope_qk, rope_store
from shiftlib.modules.norm import RMSNorm
from shiftlib.modules.source import Source, cols, rows, whole
from shiftlib.paged_attention import AttentionBatch, attend


class ShiftAttention(nn.Module):
    def __init__(
        self,
        config,
        heads: HeadMap,
        mesh: ShiftMesh,
        window: int | None,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.mesh, self.heads, self.window = mesh, heads, window
        d, hq, hkv = heads.head_dim, heads.q_per_chunk, heads.kv_per_chunk
        self.block = (hq + 2 * hkv) * d  # rows of one head chunk in the fused QKV weight
        self.scale = d**-0.5
        dev, D, sp = mesh.device, config.hidden_size, mesh.sp
        has_bias = bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"

        self._qkv = torch.empty(sp * self.block, D, dtype=dtype, device=dev)
        self.qkv_weight = mesh.param(self._qkv, 0)
        self._qkv_bias = torch.empty(sp * self.block, dtype=dtype, device=dev) if has_bias else None
        self.qkv_bias = mesh.param(self._qkv_bias, 0) if has_bias else None
        self._o_t = torch.empty(sp * hq * d, D, dtype=dtype, device=dev)
        self.o_weight_t = mesh.param(self._o_t, 0)
        o_bias = bool(getattr(config, "attention_bias", False))
        self._o_bias = torch.empty(D, dtype=dtype, device=dev) if o_bias else None
        self.o_bias = mesh.param(self._o_bias, None) if o_bias else None
        qk_norm = config.model_type == "qwen3"
        self.q_norm = RMSNorm(d, config.rms_norm_eps, mesh, dtype) if qk_norm else None
        self.k_norm = RMSNorm(d, config.rms_norm_eps, mesh, dtype) if qk_norm else None

        # TP mode: this rank's chunk is block s of the SP-mode shard (views, no copies).
        s = mesh.s
        self._qkv_tp = self._qkv[s * self.block : (s + 1) * self.block]
        self._qkv_bias_tp = None if self._qkv_bias is None else self._qkv_bias[s * self.block : (s + 1) * self.block]
        self._o_t_tp = self._o_t[s * hq * d : (s + 1) * hq * d]

    @torch.no_grad()
    def load(self, get: Source) -> None:
        """Copy this rank's shard out of Hugging Face's ``q_proj/k_proj/v_proj/o_proj`` (and norms)."""
        d, h = self.heads.head_dim, self.heads
        chunks = range(self.mesh.t * self.mesh.sp, (self.mesh.t + 1) * self.mesh.sp)
        for part, local in (("weight", self._qkv), ("bias", self._qkv_bias)):
            if local is None:
                continue
            at = 0  # block by block into place: no second full-size buffer while loading
            for c in chunks:
                q, kv = h.q_heads(c), h.kv_heads(c)
                for name, heads in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                    block = rows(get(f"{name}.{part}"), heads.start * d, heads.stop * d)
                    local[at : at + block.shape[0]].copy_(block)
                    at += block.shape[0]
        first = chunks.start * h.q_per_chunk * d
        self._o_t.copy_(cols(get("o_proj.weight"), first, first + self._o_t.shape[0]).t())
        if self._o_bias is not None:
            self._o_bias.copy_(whole(get("o_proj.bias")))
        if self.q_norm is not None:
            self.q_norm.load(lambda n: get(f"q_norm.{n}"))
            self.k_norm.load(lambda n: get(f"k_norm.{n}"))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: AttentionBatch,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
        mode: str,
    ) -> torch.Tensor:
        """x: (tokens of this rank, D) -> (same, D). ``cos``/``sin`` cover all tokens of the step."""
        n, sp, d = x.shape[0], self.mesh.sp, self.heads.head_dim
        hq, hkv = self.heads.q_per_chunk, self.heads.kv_per_chunk
        if mode == "sp":  # (N/sp tokens, sp chunks) -> all-to-all -> (N tokens, my chunk)
            qkv = F.linear(x, self._qkv, self._qkv_bias).view(n, sp, self.block).transpose(0, 1)
            qkv = self.mesh.all_to_all_sp(qkv).view(-1, hq + 2 * hkv, d)
        else:  # every rank has all N tokens: project with my chunk's block only
            qkv = F.linear(x, self._qkv_tp, self._qkv_bias_tp).view(n, hq + 2 * hkv, d)
        q, k, v = qkv.split([hq, hkv, hkv], dim=1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if kv_cache is None:
            q, k = rope_qk(q, k, cos, sin)
        else:
            q, k = rope_store(q, k, v, cos, sin, *kv_cache, batch.write_slots)
        o = attend(q, k, v, batch, kv_cache, self.scale, self.window)  # (N, hq, d): my heads, all tokens
        if mode == "sp":  # back to (N/sp tokens, sp chunks of heads), then the tp shard of o_proj
            o = self.mesh.all_to_all_sp(o.view(sp, -1, hq * d)).transpose(0, 1).reshape(-1, sp * hq * d)
            out = o @ self._o_t
        else:
            out = o.reshape(n, hq * d) @ self._o_t_tp
        out = self.mesh.all_reduce(out, mode)
        return out if self._o_bias is None else out + self._o_bias
