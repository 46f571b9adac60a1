"""RoPE on the last dims of a tensor (docs/model.md section 2), CPU and GPU."""

from __future__ import annotations

from typing import Literal

import torch

from dsv4rs import _core
from dsv4rs._tensor import as_tensor, spec, stream
from dsv4rs.ops._checks import choice, flag

RopeTable = Literal["official", "exact"]
ROPE_TABLES: tuple[str, ...] = ("official", "exact")
"""How RoPE computes an angle's sine and cosine (docs/model.md section 2), in every op that
rotates (:func:`rope`, the compressor's entries, the attention output's inverse rotation):

- ``"official"`` (the default): as DeepSeek's float32 table, the one its reference code,
  transformers, vLLM and SGLang compute: the position and the frequency rounded to float32,
  their product rounded to float32, its sine and cosine rounded to float32. The angle's error
  grows with the position (up to 1.5e-2 rad at 2^20).
- ``"exact"``: the float64 product, its sine and cosine in float64.

The rotation itself is computed in float64 either way."""


@torch.library.custom_op("dsv4rs::rope", mutates_args=())
def _rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool, table: str) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    _core.rope(spec("x", x), spec("positions", positions), spec("inv_freq", inv_freq), spec("out", out), inverse,
               table, stream(x))
    return out


@_rope.register_fake
def _(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool, table: str) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=torch.float32)


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False,
         table: RopeTable = "official") -> torch.Tensor:
    """RoPE (docs/model.md section 2) on the last ``2 * len(inv_freq)`` dims of ``x``, interleaved pairs.

    Args:
        x: ``float32``/``bfloat16 [T, ..., D]``.
        positions: ``int32``/``int64 [T]``, the position of each row of dim 0.
        inv_freq: ``float32``/``float64 [R/2]`` inverse frequencies (``reference.rope_inv_freq``),
            ``R <= D``.
        inverse: rotate by ``-position`` (undoes the rotation).
        table: how the angles' sines and cosines are computed (:data:`ROPE_TABLES`).

    Returns:
        ``float32``, the shape of ``x``. The rotation is computed in float64, on the CPU and on
        the GPU alike; the two agree to float32 rounding. Non-finite values raise on the CPU and
        propagate on the GPU.
    """
    table = choice("table", table, ROPE_TABLES)
    return _rope(as_tensor("x", x), as_tensor("positions", positions), as_tensor("inv_freq", inv_freq),
                 flag("inverse", inverse), table)
