"""RoPE on the last dims of a tensor (docs/model.md section 2), CPU and GPU."""

from __future__ import annotations

from typing import Literal

import torch

from dsv4rs import _core
from dsv4rs._tensor import as_tensor, row_stride, rows_of, spec, stream
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


@torch.library.custom_op("dsv4rs::rms_norm_rope", mutates_args=())
def _rms_norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, round_bf16: bool, positions: torch.Tensor,
                   inv_freq: torch.Tensor, table: str) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    _core.rms_norm_rope(spec("x", x), None if weight is None else spec("weight", weight), eps, round_bf16,
                        spec("positions", positions), spec("inv_freq", inv_freq), spec("out", out), table, stream(x))
    return out


@_rms_norm_rope.register_fake
def _(x: torch.Tensor, weight: torch.Tensor | None, eps: float, round_bf16: bool, positions: torch.Tensor,
      inv_freq: torch.Tensor, table: str) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=torch.float32)


NORM_ROPE_ROW_MAX: int = _core.NORM_ROPE_ROW_MAX
"""The longest rows :func:`rms_norm_rope` runs as one kernel on a GPU (a multiple of 4, aligned to
four values); longer or odd rows take the two ops, with the same values."""


def _one_kernel(t: torch.Tensor | None) -> bool:
    return t is None or (t.data_ptr() % (4 * t.element_size()) == 0 and row_stride(t) % 4 == 0)


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, positions: torch.Tensor,
                  inv_freq: torch.Tensor, norm_dtype: torch.dtype | None = None, table: RopeTable = "official"
                  ) -> torch.Tensor:
    """``rope(rms_norm(x, weight, eps, norm_dtype), positions, inv_freq, table=table)``, the same
    values (the query's per-head norm and the entry's ``kv_norm``, each then rotated). On a GPU
    one kernel where the rows have at most :data:`NORM_ROPE_ROW_MAX` values, a multiple of 4, and
    ``x`` and ``weight`` start aligned to four values; else the two ops. On the CPU one pass. On a
    GPU ``x`` may be a column range of a matrix (rows one stride apart, as the packed
    projections' outputs): it is read in place.

    Args:
        x: ``float32``/``bfloat16 [T, ..., D]``.
        weight: ``float32``/``bfloat16 [D]`` or ``None``.
        eps: finite and > 0.
        positions, inv_freq, table: as :func:`rope`.
        norm_dtype: the dtype the norm rounds to before the rotation, ``torch.float32`` or
            ``torch.bfloat16`` (default: the dtype of ``x``).

    Returns:
        ``float32``, the shape of ``x``.
    """
    x = as_tensor("x", x)
    if norm_dtype is None:
        norm_dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
    elif norm_dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"norm_dtype: expected torch.float32 or torch.bfloat16, got {norm_dtype}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps: expected a float, got {type(eps).__name__}")
    table = choice("table", table, ROPE_TABLES)
    weight = None if weight is None else as_tensor("weight", weight)
    positions, inv_freq = as_tensor("positions", positions), as_tensor("inv_freq", inv_freq)
    x = rows_of(x)
    if x.is_cuda and not (x.dim() >= 2 and 0 < x.shape[-1] <= NORM_ROPE_ROW_MAX and x.shape[-1] % 4 == 0
                          and _one_kernel(x) and _one_kernel(weight)):
        from dsv4rs.ops.norm import rms_norm

        return rope(rms_norm(x, weight, eps, norm_dtype), positions, inv_freq, table=table)
    return _rms_norm_rope(x, weight, float(eps), norm_dtype == torch.bfloat16, positions, inv_freq, table)
