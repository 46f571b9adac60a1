"""RoPE of one layer type (docs/model.md section 2): interleaved pairs of the last 64 dims,
``rope_theta`` on sliding-window layers, ``compress_rope_theta`` with YaRN on compressed ones."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dsv4rs import ops


class RotaryEmbedding(nn.Module):
    """Holds the inverse frequencies (a non-persistent buffer: computed from the config, never
    read from a checkpoint) and rotates through :func:`dsv4rs.ops.rope`."""

    inv_freq: torch.Tensor

    def __init__(self, inv_freq: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("inv_freq", torch.tensor(inv_freq, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x [T, ..., D]`` rotated at ``positions [T]``, float32 (angles in float64)."""
        return ops.rope(x, positions, self.inv_freq)
