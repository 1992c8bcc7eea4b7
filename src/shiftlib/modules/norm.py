"""RMSNorm on local tensors, Hugging Face's formula (including its float32 upcast), optionally fused with the
residual add that precedes it."""

from __future__ import annotations

import torch
from torch import nn

from shiftlib.mesh import ShiftMesh
from shiftlib.modules.fused import add_rms_norm, rms_norm
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
        return rms_norm(x, self._w, self.eps)

    def add(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Norm of ``residual + x`` and that sum (the new residual); the first layer has no residual yet."""
        if residual is None:
            return self(x), x
        return add_rms_norm(x, residual, self._w, self.eps)
