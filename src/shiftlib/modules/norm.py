"""RMSNorm on local tensors, bit-for-bit Hugging Face's formula (including its float32 upcast)."""

from __future__ import annotations

import torch
from torch import nn

from shiftlib.mesh import ShiftMesh
from shiftlib.modules.source import Source, whole


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, mesh: ShiftMesh, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self._w = torch.empty(size, dtype=dtype, device=mesh.device)
        self.weight = mesh.param(self._w, None)

    @torch.no_grad()
    def load(self, get: Source) -> None:
        self._w.copy_(whole(get("weight")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self._w * x.to(dtype)
