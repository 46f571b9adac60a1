"""RoPE on the last dims of a tensor (docs/model.md section 2), CPU and GPU."""

from __future__ import annotations

import torch

from dsv4rs import _core
from dsv4rs._tensor import as_tensor, spec, stream

@torch.library.custom_op("dsv4rs::rope", mutates_args=())
def _rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    _core.rope(spec("x", x), spec("positions", positions), spec("inv_freq", inv_freq), spec("out", out), inverse,
               stream(x))
    return out


@_rope.register_fake
def _(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=torch.float32)


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """RoPE (docs/model.md section 2) on the last ``2 * len(inv_freq)`` dims of ``x``, interleaved pairs.

    Args:
        x: ``float32``/``bfloat16 [T, ..., D]``.
        positions: ``int32``/``int64 [T]``, the position of each row of dim 0.
        inv_freq: ``float32``/``float64 [R/2]`` inverse frequencies (``reference.rope_inv_freq``),
            ``R <= D``.
        inverse: rotate by ``-position`` (undoes the rotation).

    Returns:
        ``float32``, the shape of ``x``. Angles, their sines and cosines and the rotation are
        computed in float64 (positions reach 2^20), on the CPU and on the GPU alike; the two
        agree to float32 rounding. Non-finite values raise on the CPU and propagate on the GPU.
    """
    return _rope(as_tensor("x", x), as_tensor("positions", positions), as_tensor("inv_freq", inv_freq), inverse)
