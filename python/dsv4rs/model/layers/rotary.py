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
        if x.device.type == "cpu":
            return ops.rope(x, positions, self.inv_freq)
        angle = positions.double()[:, None] * self.inv_freq.double()
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (self.inv_freq.shape[0],)
        cos, sin = angle.cos().float().view(shape), angle.sin().float().view(shape)
        x = x.float()
        r = 2 * self.inv_freq.shape[0]
        pairs = x[..., x.shape[-1] - r :].unflatten(-1, (-1, 2))
        x0, x1 = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
        return torch.cat((x[..., : x.shape[-1] - r], rotated), dim=-1)
