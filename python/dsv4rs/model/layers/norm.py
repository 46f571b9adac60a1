"""RMSNorm (docs/model.md section 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32 (float64 stays float64); ``weight`` may be
    ``None`` (the per-head query norm and the mHC input norm have none). On a GPU in float32,
    torch's fused RMSNorm (one kernel instead of six; the same float32 math, its own order of
    the sum of squares)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    y = x.to(dtype)
    if y.is_cuda and dtype == torch.float32:
        return F.rms_norm(y, y.shape[-1:], None if weight is None else weight.to(dtype), eps)
    y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps).to(x.dtype)


def linear(d_in: int, d_out: int) -> nn.Linear:
    """A bias-free linear layer (every V4 projection)."""
    return nn.Linear(d_in, d_out, bias=False)
