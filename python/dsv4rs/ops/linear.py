"""``x W^T`` for the few rows of a decode step in one kernel (the router's logits), CPU and GPU."""

from __future__ import annotations

import torch

from dsv4rs import _core
from dsv4rs._tensor import as_tensor, spec, stream

MAX_LINEAR_ROWS: int = _core.MAX_LINEAR_ROWS
"""The most rows of ``x`` :func:`linear_rows` takes."""


@torch.library.custom_op("dsv4rs::linear_rows", mutates_args=())
def _linear_rows(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(x.shape[0], weight.shape[0], dtype=out_dtype, device=x.device)
    _core.linear_rows(spec("x", x), spec("weight", weight), spec("out", out), stream(x))
    return out


@_linear_rows.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0], dtype=out_dtype)


def linear_rows(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x W^T`` for at most :data:`MAX_LINEAR_ROWS` rows: the products added in float32 in a
    fixed order that depends on ``N`` and ``K`` only (``32 S`` lanes a weight row, ``S`` = 8,
    4, 2 or 1 the most that gives each lane two 8-value chunks and keeps ``N S`` within 2,048;
    each lane its chunks ``lane, lane + 32 S, ...`` by fused multiply-adds, a butterfly of each
    32 lanes' sums, then the ``S`` sums in order), rounded once to ``out_dtype``. The CPU and
    the GPU give the same bits. On a GPU one kernel, each weight byte read once, where cuBLAS
    runs a split-K GEMV and its reduce.

    Args:
        x: ``float32``/``bfloat16 [T, K]``, ``T <= MAX_LINEAR_ROWS``, ``K`` a positive multiple of 8.
        weight: ``float32``/``bfloat16 [N, K]``; on a GPU ``x`` and ``weight`` start 16-byte aligned.
        out_dtype: ``torch.float32`` or ``torch.bfloat16`` (default: the dtype of ``x``).

    Returns:
        ``[T, N]``. Non-finite values propagate on the GPU and raise on the CPU.
    """
    x, weight = as_tensor("x", x), as_tensor("weight", weight)
    if out_dtype is None:
        out_dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
    elif out_dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"out_dtype: expected torch.float32 or torch.bfloat16, got {out_dtype}")
    return _linear_rows(x.contiguous(), weight.contiguous(), out_dtype)
