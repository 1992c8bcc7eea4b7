"""ShiftMLP: gate/up column-parallel, down row-parallel, over ``tp`` ranks (SP mode) or all P ranks (TP mode).

As in attention, the fused gate/up weight is chunk-major (``sp`` blocks of ``[gate_c | up_c]``) and the down
projection is stored transposed, so TP mode's P-way shard is block ``s`` of the SP-mode shard: a view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from shiftlib.mesh import ShiftMesh
from shiftlib.modules.fused import silu_mul
from shiftlib.modules.source import Source, cols, rows, whole


class ShiftMLP(nn.Module):
    def __init__(self, config, mesh: ShiftMesh, dtype: torch.dtype) -> None:
        super().__init__()
        P, I, D = mesh.world, config.intermediate_size, config.hidden_size
        if I % P:
            raise ValueError(
                f"intermediate_size={I} is not divisible by tp*sp={P}: choose tp*sp among its divisors"
            )
        self.mesh, self.act = mesh, ACT2FN[config.hidden_act]
        self.silu = config.hidden_act == "silu"  # every supported family: one fused kernel
        self.part = I // P  # intermediate columns of one chunk
        dev, sp, bias = mesh.device, mesh.sp, bool(getattr(config, "mlp_bias", False))
        self._gate_up = torch.empty(sp * 2 * self.part, D, dtype=dtype, device=dev)
        self.gate_up_weight = mesh.param(self._gate_up, 0)
        self._gate_up_bias = torch.empty(sp * 2 * self.part, dtype=dtype, device=dev) if bias else None
        self.gate_up_bias = mesh.param(self._gate_up_bias, 0) if bias else None
        self._down_t = torch.empty(sp * self.part, D, dtype=dtype, device=dev)
        self.down_weight_t = mesh.param(self._down_t, 0)
        self._down_bias = torch.empty(D, dtype=dtype, device=dev) if bias else None
        self.down_bias = mesh.param(self._down_bias, None) if bias else None

        s, blk = mesh.s, 2 * self.part
        self._gate_up_tp = self._gate_up[s * blk : (s + 1) * blk]
        self._gate_up_bias_tp = None if self._gate_up_bias is None else self._gate_up_bias[s * blk : (s + 1) * blk]
        self._down_t_tp = self._down_t[s * self.part : (s + 1) * self.part]

    @torch.no_grad()
    def load(self, get: Source) -> None:
        chunks = range(self.mesh.t * self.mesh.sp, (self.mesh.t + 1) * self.mesh.sp)
        for part, local in (("weight", self._gate_up), ("bias", self._gate_up_bias)):
            if local is None:
                continue
            for i, (c, name) in enumerate((c, name) for c in chunks for name in ("gate_proj", "up_proj")):
                local[i * self.part : (i + 1) * self.part].copy_(rows(get(f"{name}.{part}"), c * self.part, (c + 1) * self.part))
        first = chunks.start * self.part
        self._down_t.copy_(cols(get("down_proj.weight"), first, first + self._down_t.shape[0]).t())
        if self._down_bias is not None:
            self._down_bias.copy_(whole(get("down_proj.bias")))

    def forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "sp":
            h, down = F.linear(x, self._gate_up, self._gate_up_bias), self._down_t
        else:
            h, down = F.linear(x, self._gate_up_tp, self._gate_up_bias_tp), self._down_t_tp
        gate, up = h.view(x.shape[0], -1, 2, self.part).unbind(2)
        act = silu_mul(gate, up) if self.silu else (self.act(gate) * up).flatten(1)
        out = self.mesh.all_reduce(act @ down, mode)
        return out if self._down_bias is None else out + self._down_bias
