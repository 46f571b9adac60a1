"""mHC: the residual stream is ``hc_mult`` streams, mixed around every sublayer (docs/model.md
section 6). The weights of a sublayer come from :func:`dsv4rs.ops.mhc_weights` (one kernel)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4rs import ops
from dsv4rs.model.config import V4Config
from dsv4rs.model.layers.norm import rms_norm


PRE_MAX_TOKENS = 16
"""Most tokens a call that :func:`dsv4rs.ops.mhc_pre` takes on a GPU: each token reads the whole
projection (1.5 MB at V4-Flash width), where cuBLAS's GEMM (or, from :data:`MIX_MIN_TOKENS` on,
:func:`dsv4rs.ops.mhc_mix`) reads it once for many tokens."""

MIX_MIN_TOKENS = 512
"""Fewest tokens a call that :func:`dsv4rs.ops.mhc_mix` takes on a GPU (a prefill). Below, the norm
and cuBLAS's float32 GEMM were the faster on an H100 (docs/kernels/mhc.md: 17 and 64 tokens)."""


class HyperConnection(nn.Module):
    """mHC around one sublayer: from the streams ``X [T, hc, d]``, the collapse weights ``pre``,
    the expansion weights ``post`` and the Sinkhorn-projected mixing matrix ``comb``."""

    def __init__(self, cfg: V4Config) -> None:
        super().__init__()
        n = cfg.hc_mult
        self.hc, self.iters, self.eps, self.norm_eps = n, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps
        self.fn = nn.Parameter(torch.zeros((2 + n) * n, n * cfg.hidden_size, dtype=torch.float32))
        self.base = nn.Parameter(torch.zeros((2 + n) * n, dtype=torch.float32))
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float32))

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """``mu = r * (Phi vec X)``: ``[T, (2 + hc) hc]``, float32 (float64 stays float64)."""
        return _mix(x, self.fn, self.norm_eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(post [T, hc], comb [T, hc, hc], collapsed [T, d])``, the weights in float32. On a
        GPU with a few tokens (a decode step), :func:`dsv4rs.ops.mhc_pre`: the norm, the
        projection, the weights and the collapse in two kernels instead of five."""
        if x.shape[0] <= PRE_MAX_TOKENS and _kernel(x, self.fn, self.scale, self.base):
            return ops.mhc_pre(x.contiguous(), self.fn, self.scale, self.base, self.iters, self.eps, self.norm_eps)
        pre, post, comb = ops.mhc_weights(self.mix(x).float(), self.scale.float(), self.base.float(), self.iters,
                                          self.eps)
        return post, comb, collapse(x, pre)


def _mix(x: torch.Tensor, proj: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """``rsqrt(mean(vec X^2) + norm_eps) (proj vec X)``: on a GPU for at least
    :data:`MIX_MIN_TOKENS` tokens :func:`dsv4rs.ops.mhc_mix` (two kernels; the torch form writes
    the normed streams in float32 first), else in torch."""
    if x.shape[0] >= MIX_MIN_TOKENS and _kernel(x, proj):
        return ops.mhc_mix(x.contiguous(), proj, norm_eps)
    dtype = torch.promote_types(x.dtype, torch.float32)
    return F.linear(rms_norm(x.flatten(-2), None, norm_eps), proj.to(dtype))


def _kernel(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether the GPU ops take these streams ``[T, n, d]`` and float32 weights."""
    return (x.is_cuda and x.dim() == 3 and x.dtype in (torch.float32, torch.bfloat16) and x.shape[1] <= 8
            and all(w.dtype == torch.float32 for w in weights))


def collapse(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """``y = sum_j pre_j X_j``, in the dtype of the streams (on a GPU one kernel,
    :func:`dsv4rs.ops.mhc_collapse`, with the same float32 products and sums)."""
    if _kernel(x, pre):
        return ops.mhc_collapse(x.contiguous(), pre.contiguous())
    return (pre.unsqueeze(-1) * x).sum(-2).to(x.dtype)


def combine(x: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
            add: torch.Tensor | None = None) -> torch.Tensor:
    """``X'_k = post_k F + sum_j comb[j, k] X_j``, in the dtype of the streams, with ``F`` the
    sublayer's output ``out`` (plus ``add``, in ``out``'s dtype, as ``out + add`` rounds it). On a
    GPU one kernel (:func:`dsv4rs.ops.mhc_combine`, the add included) in float32, rounded once;
    the torch form computes in the streams' dtype (the weights, both terms and their sum rounded
    to it)."""
    if _kernel(x, post, comb) and out.dtype in (torch.float32, torch.bfloat16) and (add is None or add.dtype == out.dtype):
        f2 = None if add is None else add.contiguous()
        return ops.mhc_combine(x.contiguous(), out.contiguous(), post.contiguous(), comb.contiguous(), f2)
    if add is not None:
        out = out + add
    dtype = x.dtype
    return post.to(dtype).unsqueeze(-1) * out.to(dtype).unsqueeze(-2) + comb.to(dtype).transpose(-1, -2) @ x


class HyperHead(nn.Module):
    """The final collapse of the streams (``hc_head``)."""

    def __init__(self, cfg: V4Config) -> None:
        super().__init__()
        n = cfg.hc_mult
        self.eps, self.norm_eps = cfg.hc_eps, cfg.rms_norm_eps
        self.hc_fn = nn.Parameter(torch.zeros(n, n * cfg.hidden_size, dtype=torch.float32))
        self.hc_base = nn.Parameter(torch.zeros(n, dtype=torch.float32))
        self.hc_scale = nn.Parameter(torch.ones(1, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        mix = _mix(x, self.hc_fn, self.norm_eps)
        pre = torch.sigmoid(mix * self.hc_scale.to(dtype) + self.hc_base.to(dtype)) + self.eps
        return collapse(x, pre)
