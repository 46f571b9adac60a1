"""The clamped SwiGLU of the shared expert in one kernel, CPU and GPU (docs/model.md section 7):
the two clamps, the SiLU and the product that torch runs as four kernels."""

from __future__ import annotations

import math

import torch

from dsv4rs import _core
from dsv4rs._tensor import as_tensor, rows_of, spec, stream


@torch.library.custom_op("dsv4rs::swiglu", mutates_args=())
def _swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    _core.swiglu(spec("gate", gate), spec("up", up), spec("out", out), limit, stream(gate))
    return out


@_swiglu.register_fake
def _(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    return gate.new_empty(gate.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float = math.inf) -> torch.Tensor:
    """``silu(min(gate, limit)) * clamp(up, -limit, limit)``, element by element, with
    ``silu(x) = x / (1 + e^-x)``: float32 math, rounded once to ``gate``'s dtype (torch's form in a
    bfloat16 model rounds the SiLU and the product each).

    Args:
        gate, up: ``float32``/``bfloat16``, one shape, on one device. On a GPU their rows may be
            one stride apart (the two column halves of the packed gate-up projection's output):
            they are read in place; any other layout is copied first.
        limit: ``> 0``; ``math.inf`` clamps nothing.

    Returns:
        ``gate``'s shape and dtype. On a GPU one kernel (no synchronization) and NaN or infinite
        values propagate (the clamps keep a NaN, as torch's); on the CPU they raise. The CPU's
        ``exp`` may round differently from the GPU's by an ulp.
    """
    gate, up = as_tensor("gate", gate), as_tensor("up", up)
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or math.isnan(limit) or limit <= 0:
        raise ValueError(f"limit: expected a number > 0, got {limit!r}")
    return _swiglu(rows_of(gate), rows_of(up), float(limit))
