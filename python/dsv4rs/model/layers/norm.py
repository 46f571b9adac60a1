"""RMSNorm (docs/model.md section 2)."""

from __future__ import annotations

import torch
from torch import nn

from dsv4rs import ops

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, out_dtype: torch.dtype | None = None
             ) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32 (float64 stays float64), returned in
    ``out_dtype`` (default: the computing dtype); ``weight`` may be ``None`` (the per-head query
    norm and the mHC input norm have none). On a GPU, :func:`dsv4rs.ops.rms_norm`: the casts in
    and out and the norm are one kernel (the same float32 math, its own order of the sum of
    squares)."""
    if x.is_cuda and x.dtype in _KERNEL_DTYPES and (weight is None or weight.dtype in _KERNEL_DTYPES):
        return ops.rms_norm(x, weight, eps, out_dtype or torch.float32)
    dtype = torch.promote_types(x.dtype, torch.float32)
    y = x.to(dtype)
    y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps)
    y = y if weight is None else y * weight.to(dtype)
    return y if out_dtype is None else y.to(out_dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, x.dtype)


def linear(d_in: int, d_out: int) -> nn.Linear:
    """A bias-free linear layer (every V4 projection)."""
    return nn.Linear(d_in, d_out, bias=False)
