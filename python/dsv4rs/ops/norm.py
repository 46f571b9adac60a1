"""RMSNorm over the last dim (docs/model.md section 2) in one kernel, CPU and GPU."""

from __future__ import annotations

import torch

from dsv4rs import _core
from dsv4rs._tensor import as_tensor, rows_of, spec, stream

_FLOATS = (torch.float32, torch.bfloat16)


@torch.library.custom_op("dsv4rs::rms_norm", mutates_args=())
def _rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    _core.rms_norm(spec("x", x), None if weight is None else spec("weight", weight), spec("out", out), eps, stream(x))
    return out


@_rms_norm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor | None, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=out_dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMSNorm over the last dim: ``(x * rsqrt(mean(x^2) + eps)) * weight``.

    Args:
        x: ``float32``/``bfloat16 [..., D]``, ``D >= 1``. On a GPU its rows may be one stride
            apart (a column range of a matrix, as the packed projections' outputs): they are read
            in place; any other layout is copied first.
        weight: ``float32``/``bfloat16 [D]``, or ``None`` (no weight: the per-head query norm and
            the mHC input norm).
        eps: finite and > 0 (``rms_norm_eps``).
        out_dtype: ``torch.float32`` or ``torch.bfloat16`` (default: the dtype of ``x``).

    Returns:
        ``out_dtype``, the shape of ``x``: computed in float32 (a bfloat16 weight widened, not a
        float32 weight narrowed) and rounded once, so that a bfloat16 model's
        ``norm(x.float()).to(bfloat16)`` is one kernel instead of three. Non-finite values raise
        on the CPU and propagate on the GPU.
    """
    x = as_tensor("x", x)
    if out_dtype is None:  # x's dtype (any other than these two is refused, naming x)
        out_dtype = x.dtype if x.dtype in _FLOATS else torch.float32
    elif out_dtype not in _FLOATS:
        raise TypeError(f"out_dtype: expected torch.float32 or torch.bfloat16, got {out_dtype}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps: expected a float, got {type(eps).__name__}")
    return _rms_norm(rows_of(x), None if weight is None else as_tensor("weight", weight), float(eps), out_dtype)
