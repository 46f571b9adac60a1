"""RoPE of one layer type (docs/model.md section 2): interleaved pairs of the last 64 dims,
``rope_theta`` on sliding-window layers, ``compress_rope_theta`` with YaRN on compressed ones."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dsv4rs import ops
from dsv4rs.model.config import ROPE_DIM, V4Config, yarn_ramp_bounds
from dsv4rs.model.layers.norm import rms_norm


def inv_freq(cfg: V4Config, compressed: bool) -> torch.Tensor:
    """The 32 inverse frequencies ``float32`` of a layer type, in float32 arithmetic as
    transformers and DeepSeek's ``inference/model.py`` compute them (bit for bit):
    ``1 / theta^(arange(0, 64, 2) / 64)``, and on compressed layers YaRN's blend
    ``f / factor (1 - s) + f s`` with ``s = 1 - clamp((j - low) / (high - low), 0, 1)``.
    (:meth:`V4Config.inv_freq` is the same math in float64; rounded to float32 it differs from
    these in the last bit of about a third of the entries.)"""
    theta = cfg.compress_rope_theta if compressed else cfg.rope_theta
    freqs = 1.0 / (theta ** (torch.arange(0, ROPE_DIM, 2, dtype=torch.float32) / ROPE_DIM))
    yarn = cfg.yarn if compressed else None
    if yarn is None:
        return freqs
    low, width = yarn_ramp_bounds(ROPE_DIM, theta, yarn)
    smooth = 1 - ((torch.arange(ROPE_DIM // 2, dtype=torch.float32) - low) / width).clamp(0, 1)
    return freqs / yarn.factor * (1 - smooth) + freqs * smooth


class RotaryEmbedding(nn.Module):
    """Holds the inverse frequencies (a non-persistent buffer: computed from the config, never
    read from a checkpoint) and the table the layer's ops compute the angles with
    (:data:`dsv4rs.ops.ROPE_TABLES`, ``"official"`` unless
    :meth:`dsv4rs.model.DeepseekV4.set_rope_table` says otherwise), and rotates through
    :func:`dsv4rs.ops.rope`."""

    inv_freq: torch.Tensor

    def __init__(self, inv_freq: Sequence[float] | torch.Tensor, table: ops.RopeTable = "official") -> None:
        super().__init__()
        self.register_buffer("inv_freq", torch.as_tensor(inv_freq, dtype=torch.float32).clone(), persistent=False)
        self.table = table

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x [T, ..., D]`` rotated at ``positions [T]``, float32, with this layer's table
        (docs/model.md section 2 measures how the tables differ)."""
        return ops.rope(x, positions, self.inv_freq, table=self.table)

    def normed(self, x: torch.Tensor, weight: torch.Tensor | None, eps: float, dtype: torch.dtype,
               positions: torch.Tensor) -> torch.Tensor:
        """``self(rms_norm(x, weight, eps, dtype), positions)`` (:func:`.norm.rms_norm`): on a GPU
        one kernel where :func:`dsv4rs.ops.rms_norm_rope` takes the rows, the same values."""
        kernel = (torch.float32, torch.bfloat16)
        if x.is_cuda and x.dtype in kernel and dtype in kernel and (weight is None or weight.dtype in kernel):
            return ops.rms_norm_rope(x, weight, eps, positions, self.inv_freq, norm_dtype=dtype, table=self.table)
        return self(rms_norm(x, weight, eps, dtype), positions)
