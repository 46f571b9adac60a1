"""Linear layers over weights kept as DeepSeek ships them (docs/model.md section 9): FP8 e4m3 codes
with one float32 multiplier per 128x128 block, or MXFP4 (two e2m1 codes per byte, one UE8M0 scale
per 32 values), run by :func:`dsv4rs.ops.quant_linear`.

The activations are rounded before the products (``act``): ``"fp8"`` (the default, DeepSeek's
reference W8A8) cuts each input vector into blocks of 128 along the reduced dimension and rounds
every value to FP8 e4m3 under one power-of-two scale per block (relative error up to 2^-4 per
value, absolute at most 2^-10 of the block's scale in its subnormal range); ``"bf16"`` rounds
each value to bfloat16. Products are summed in float32 and the output has the input's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dsv4rs import ops
from dsv4rs.ops._checks import choice

FP8_BLOCK = 128
FP4_BLOCK = 32
K_MULTIPLE = 32
"""The reduced dimension of every quantized weight must be a multiple of this (the kernels' tile
of K and MXFP4's scale block)."""

ACT_MODES = ("fp8", "bf16")
"""How the activations of a quantized weight are rounded: FP8 e4m3 per 1x128 block (DeepSeek's
W8A8), or bfloat16."""

FORMATS = ("fp8", "fp4")


def check_act(act: object) -> str:
    """``act`` if it is one of :data:`ACT_MODES`; else ValueError naming ``act``."""
    return choice("act", act, ACT_MODES)  # type: ignore[arg-type]


def scale_shape(fmt: str, rows: int, cols: int) -> tuple[int, int]:
    """The scale tensor's shape of a ``[rows, cols]`` weight (``cols`` counted in values)."""
    if fmt == "fp8":
        return -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)
    return rows, cols // FP4_BLOCK


def split_blocker(fmt: str, dim: int, r: range, size: int) -> int | None:
    """Whether ``r`` (along ``dim``, of ``size`` values) cuts a quantized weight on its scale
    blocks: ``None`` when it does, else the block size it misses. FP8 blocks are 128x128 in both
    dimensions; MXFP4 has a scale per row and per 32 values of a row. A part's end may also be the
    weight's end (a partial last block)."""
    block = FP8_BLOCK if fmt == "fp8" else (FP4_BLOCK if dim == 1 else 1)
    ok = r.start % block == 0 and (r.stop % block == 0 or r.stop == size)
    return None if ok else block


class QuantLinear(nn.Module):
    """A bias-free linear layer over a stored quantized weight.

    Buffers (never converted by ``module.to(dtype)``, ``half()`` or :func:`dsv4rs.model.model.set_dtype`):

    - ``weight``: ``uint8 [R, K]`` FP8 e4m3 codes (``fmt="fp8"``; :attr:`codes` views them as
      ``float8_e4m3fn``) or ``uint8 [R, K / 2]`` packed MXFP4 (``fmt="fp4"``, low nibble first);
    - ``scale``: ``float32 [ceil(R / 128), ceil(K / 128)]`` multipliers per 128x128 block (FP8),
      or ``uint8 [R, K / 32]`` UE8M0 codes (MXFP4).

    ``groups`` (``g``): 1, or ``o_groups`` for ``W_oa`` as DeepSeek ships it (one
    ``[g * N, K]`` matrix): then the input is ``[..., g, K]`` and group ``i`` uses rows
    ``[i N, (i + 1) N)``, the output ``[..., g * N]``. ``act``: the activation rounding
    (:data:`ACT_MODES`). ``dtype``: the floating-point dtype of the model around it (what the
    dense layer it replaces would hold; the attention casts its output to it before ``W_oa``)."""

    def __init__(self, in_features: int, out_features: int, fmt: str = "fp8", groups: int = 1,
                 act: str = "fp8", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"fmt: expected one of {FORMATS}, got {fmt!r}")
        if in_features % K_MULTIPLE:
            raise ValueError(f"in_features: {in_features} is not a multiple of {K_MULTIPLE}")
        if groups < 1 or out_features % groups:
            raise ValueError(f"groups: {groups} does not divide out_features = {out_features}")
        self.fmt, self.groups, self.act, self.dtype = fmt, groups, check_act(act), dtype
        cols = in_features if fmt == "fp8" else in_features // 2
        self.register_buffer("weight", torch.zeros(out_features, cols, dtype=torch.uint8))
        self.register_buffer("scale", torch.zeros(scale_shape(fmt, out_features, in_features),
                                                  dtype=torch.float32 if fmt == "fp8" else torch.uint8))
        self.layout = "rows"  # how weight holds its bytes (tile(): "tiles")
        self._register_state_dict_hook(_weight_rows_in_state_dict)
        self._register_load_state_dict_pre_hook(_weight_tiles_from_state_dict, with_module=True)

    weight: torch.Tensor
    scale: torch.Tensor

    @property
    def in_features(self) -> int:
        """Input width."""
        return self.weight.shape[1] * (1 if self.fmt == "fp8" else 2)

    @property
    def out_features(self) -> int:
        """Output width."""
        return self.weight.shape[0]

    @property
    def codes(self) -> torch.Tensor:
        """The weight as the op takes it: ``float8_e4m3fn`` codes, or the packed MXFP4 bytes."""
        return self.weight.view(torch.float8_e4m3fn) if self.fmt == "fp8" else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.quant_linear(x, self.codes, self.scale, self.groups, self.act, layout=self.layout)

    def tile(self) -> bool:
        """Holds the weight in :func:`dsv4rs.ops.weight_tiles`'s layout, which the GPU reads in whole
        kilobytes (in place; the same values; the state dict still gives DeepSeek's rows). Returns whether
        the weight is in tiles now (not where rows or K make no whole tiles: rows a multiple of
        64, K of 128)."""
        if self.layout == "tiles":
            return True
        if self.out_features % 64 or self.in_features % 128:
            return False
        retile_(self.weight, self.fmt == "fp8", True)
        self.layout = "tiles"
        return True

    def stored_weight(self) -> torch.Tensor:
        """``weight`` in DeepSeek's rows (itself, or a new tensor when held in tiles)."""
        return self.weight if self.layout == "rows" else _rows(self.fmt, self.weight)

    def dequantized(self) -> torch.Tensor:
        """The weight's values, ``float32 [R, K]`` (a new tensor; for tests and inspection)."""
        rows, cols = self.out_features, self.in_features
        weight = self.stored_weight()
        if self.fmt == "fp8":
            s = self.scale.repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]
            return weight.view(torch.float8_e4m3fn).float() * s
        b = weight.to(torch.int64)
        codes = torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)
        values = _FP4_VALUES.to(self.weight.device)[codes].view(rows, -1, FP4_BLOCK)
        return (values * torch.exp2(self.scale.float() - 127)[..., None]).flatten(-2)

    def narrow_(self, dim: int, r: range) -> None:
        """Keeps values ``r`` of dimension ``dim`` (0: rows, 1: the reduced dimension) with the
        scales covering them (copies, so the whole tensors can be freed). ValueError unless
        ``r`` cuts on scale blocks (:func:`split_blocker`)."""
        if self.layout == "tiles":  # cut the rows as stored, tiles again after
            self.weight, self.layout = self.stored_weight(), "rows"
            self.narrow_(dim, r)
            self.tile()
            return
        size = self.weight.shape[0] if dim == 0 else self.in_features
        block = split_blocker(self.fmt, dim, r, size)
        if block is not None:
            raise ValueError(f"values [{r.start}, {r.stop}) of dimension {dim} of a {self.fmt.upper()} weight of "
                             f"{size} do not start and end on its {block}-value scale blocks")
        if self.fmt == "fp8":
            w_part, s_part = r, range(r.start // FP8_BLOCK, -(-r.stop // FP8_BLOCK))
        elif dim == 0:
            w_part = s_part = r
        else:
            w_part, s_part = range(r.start // 2, r.stop // 2), range(r.start // FP4_BLOCK, r.stop // FP4_BLOCK)
        self.weight = self.weight.narrow(dim, w_part.start, len(w_part)).clone()
        self.scale = self.scale.narrow(dim, s_part.start, len(s_part)).clone()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantLinear:
        # ``module.to(torch.bfloat16)`` converts every floating-point tensor: the float32 scales
        # travel as their int32 bits (moved, never converted); the codes are uint8 already.
        float_scale = self.scale.dtype == torch.float32
        if float_scale:
            self._buffers["scale"] = self.scale.view(torch.int32)
        try:
            super()._apply(fn, recurse)
        finally:
            if float_scale:
                self._buffers["scale"] = self._buffers["scale"].view(torch.float32)
        try:  # follow a dtype conversion of the model around it
            self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        except (RuntimeError, TypeError, ValueError):
            pass
        return self

    def extra_repr(self) -> str:
        g = f", groups={self.groups}" if self.groups > 1 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}{g}, act={self.act}"


_FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def compute_dtype(linear: nn.Module) -> torch.dtype:
    """The floating-point dtype a linear layer computes in: its weight's, or for a
    :class:`QuantLinear` the model's (:attr:`QuantLinear.dtype`)."""
    return linear.dtype if isinstance(linear, QuantLinear) else linear.weight.dtype


def retile_(weight: torch.Tensor, fp8: bool, to_tiles: bool, rows_at_once: int = 4096) -> None:
    """Reorders ``weight`` (``uint8`` codes ``[N, W]`` or ``[E, N, W]``, FP8 when ``fp8``) in place
    into :func:`dsv4rs.ops.weight_tiles`'s layout (``to_tiles``) or back into rows. A block of 64
    rows is the same bytes in both layouts, so this goes ``rows_at_once`` rows of one expert at a
    time: the memory it takes beside the weight is that much, not a second copy."""
    step = 64 * (rows_at_once // 64 or 1)
    for part in weight.view(-1, *weight.shape[-2:]):
        for r in range(0, part.shape[0], step):
            chunk = part[r : r + step]
            chunk.copy_(_reordered(chunk, fp8, to_tiles))


def _reordered(weight: torch.Tensor, fp8: bool, to_tiles: bool) -> torch.Tensor:
    """A ``uint8`` code buffer (FP8 codes when ``fp8``, whose K step is 128 bytes, else MXFP4's 64)
    in tiles (``to_tiles``) or in DeepSeek's rows: a new ``uint8`` tensor."""
    fn = ops.weight_tiles if to_tiles else ops.weight_rows
    return fn(weight.view(torch.float8_e4m3fn) if fp8 else weight).view(torch.uint8)


def _rows(fmt: str, weight: torch.Tensor) -> torch.Tensor:
    """A ``uint8`` weight buffer held in tiles, in DeepSeek's rows."""
    return _reordered(weight, fmt == "fp8", False)


def _weight_rows_in_state_dict(module: QuantLinear, state: dict, prefix: str, local_metadata: dict) -> None:
    """A weight held in tiles still saves DeepSeek's rows."""
    if getattr(module, "layout", "rows") == "tiles":
        state[prefix + "weight"] = _rows(module.fmt, state[prefix + "weight"])


def _weight_tiles_from_state_dict(module: QuantLinear, state: dict, prefix: str, *args) -> None:
    """A state dict holds DeepSeek's rows; a weight held in tiles loads them as tiles."""
    if getattr(module, "layout", "rows") == "tiles" and prefix + "weight" in state:
        state[prefix + "weight"] = _reordered(state[prefix + "weight"], module.fmt == "fp8", True)
