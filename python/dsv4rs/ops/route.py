"""MoE routing from the router's logits in one kernel, CPU and GPU: affinities, the bias-corrected
top-k (or a hash layer's table), the normalized, scaled weights (docs/model.md section 7), without
the dozen small tensor ops of the torch form."""

from __future__ import annotations

import math

import torch

from dsv4rs import _core
from dsv4rs._tensor import as_tensor, spec, stream
from dsv4rs.ops._checks import flag, ndim, positive


@torch.library.custom_op("dsv4rs::moe_route", mutates_args=())
def _moe_route(logits: torch.Tensor, bias: torch.Tensor | None, table: torch.Tensor | None, ids: torch.Tensor | None,
               k: int, scale: float, norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.empty(logits.shape[0], k, dtype=torch.int64, device=logits.device)
    w = torch.empty(logits.shape[0], k, dtype=torch.float32, device=logits.device)
    opt = {n: None if t is None else spec(n, t) for n, t in (("bias", bias), ("table", table), ("ids", ids))}
    _core.moe_route(spec("logits", logits), opt["bias"], opt["table"], opt["ids"], spec("idx", idx), spec("w", w),
                    scale, norm, stream(logits))
    return idx, w


@_moe_route.register_fake
def _(logits: torch.Tensor, bias: torch.Tensor | None, table: torch.Tensor | None, ids: torch.Tensor | None, k: int,
      scale: float, norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    t = logits.shape[0]
    return logits.new_empty(t, k, dtype=torch.int64), logits.new_empty(t, k, dtype=torch.float32)


def moe_route(logits: torch.Tensor, k: int, scale: float = 1.0, bias: torch.Tensor | None = None,
              table: torch.Tensor | None = None, ids: torch.Tensor | None = None, norm: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts and weights of each token from the router's logits:
    ``a = sqrt(softplus(logits))`` (torch's softplus: ``x`` above 20); the ``k`` experts of largest
    ``a + bias`` (descending, ties to the lower expert, a NaN first: ``torch.topk``'s order), or
    on a hash layer ``table[ids]``; weights ``a[idx]``, divided by their sum ``+ 1e-20`` when
    ``norm``, times ``scale``. All float32 from the logits' values.

    Args:
        logits: ``float32``/``bfloat16 [T, E]``, ``1 <= E <= MAX_ROUTE_EXPERTS`` (1,024).
        k: choices per token, ``1 <= k <= min(E, MAX_ROUTE_K)`` (16).
        scale: finite; the routed scaling factor.
        bias: ``float32 [E]`` (a learned layer's ``e_score_correction_bias``: it chooses, it does
            not weigh); or
        table, ids: ``int32``/``int64 [V, k]`` and ``[T]`` (a hash layer's ``tid2eid`` and the
            tokens). Exactly one of ``bias`` and ``table``.
        norm: divide the weights by their sum.

    Returns:
        ``(idx int64 [T, k], w float32 [T, k])``, on the logits' device. On the CPU non-finite
        logits, ids outside ``[0, V)`` and table entries outside ``[0, E)`` raise; on a GPU (one
        kernel, no synchronization, capturable in a CUDA graph) a token whose id is outside the
        table gets experts ``-1`` with weight 0, as does a table entry outside ``[0, E)``
        (:func:`moe_experts` skips them). The CPU and GPU compute the same float32 operations in
        the same order; their ``exp``/``log1p`` may differ by an ulp, which can change a choice
        only between scores that close.
    """
    logits = as_tensor("logits", logits)
    ndim("logits", logits, 2)
    k = positive("k", k, _core.MAX_ROUTE_K)
    if k > logits.shape[1]:
        raise ValueError(f"k: at most the experts ({logits.shape[1]}), got {k}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale!r}")
    norm = flag("norm", norm)
    bias = None if bias is None else as_tensor("bias", bias)
    table = None if table is None else as_tensor("table", table)
    ids = None if ids is None else as_tensor("ids", ids)
    if (bias is None) == (table is None) or (table is None) != (ids is None):
        raise ValueError("bias: give either bias (a learned layer) or table and ids (a hash layer)")
    return _moe_route(logits, bias, table, ids, k, float(scale), norm)
