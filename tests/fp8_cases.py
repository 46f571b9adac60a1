"""Inputs that put every FP8 e4m3 rounding decision to the test: each code's value, each midpoint
between neighbouring codes (a tie, which goes to the even code) and the float32 values either side
of it, with both signs, in blocks whose largest magnitude is ``448 * 2^e``, so that a block's scale
is exactly ``2^e`` and its scaled values are these exactly."""

from __future__ import annotations

import torch

EXPONENTS = (0, -13, 9)
"""Block scales ``2^e`` to test: ``448 * 2^-13`` stays above the quantizers' amax floor (1e-4)."""


def e4m3_boundaries() -> torch.Tensor:
    """float32 values in [-448, 448]: the 127 finite e4m3 magnitudes, the 126 midpoints between
    neighbours and each midpoint's float32 neighbours, both signs, and -0."""
    codes = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (codes[:-1] + codes[1:]) / 2
    below = torch.nextafter(mids, torch.zeros_like(mids))
    above = torch.nextafter(mids, torch.full_like(mids, 448.0))
    pos = torch.cat([codes, mids, below, above])
    return torch.cat([pos, -pos, torch.tensor([-0.0])])


def blocks(width: int, per_row: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [n, per_row * width] float32, e [n] int64)``: for each exponent ``e`` of
    :data:`EXPONENTS`, rows of ``per_row`` blocks of ``width`` values, each block ``448 * 2^e``
    then ``width - 1`` of :func:`e4m3_boundaries` times ``2^e``, all of them at least once."""
    values = e4m3_boundaries()
    per = width - 1
    n = -(-values.numel() // (per * per_row))
    body = values.repeat(2)[: n * per_row * per].view(n, per_row, per)
    row = torch.cat([torch.full((n, per_row, 1), 448.0), body], dim=2).view(n, per_row * width)
    x = torch.cat([row * 2.0**e for e in EXPONENTS])
    return x, torch.tensor(EXPONENTS).repeat_interleave(n)


def rne_codes(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """torch's own e4m3 rounding (nearest, ties to even) of ``x / 2^e`` row by row, as bytes."""
    return (x / torch.pow(2.0, e.double()).float()[:, None]).to(torch.float8_e4m3fn).view(torch.uint8)
