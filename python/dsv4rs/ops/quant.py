"""Weights as DeepSeek ships them, CPU and GPU: the block-scaled FP8 / MXFP4 linear and the fused
MoE over MXFP4 experts.

Numerics, the same on the CPU and the GPU up to the order of float32 sums (and, on GPUs with FP8
tensor cores, the slice and step sums of the last two points):

- ``A(v)``, what the products see of an activation vector ``v`` of length ``K``: with
  ``act="fp8"`` (DeepSeek's W8A8), ``v`` is cut into blocks of 128 values along ``K`` (the last
  block may be shorter); per block ``e`` is the smallest integer with
  ``max(amax, 1e-4) <= 448 * 2^e`` (a UE8M0 scale) and each value becomes its FP8 e4m3 rounding
  (nearest even, saturating at 448) of ``v * 2^-e``, times ``2^e``. With ``act="bf16"`` each value
  is rounded to bfloat16 (nearest even).
- The weight values: FP8 e4m3 ``code * scale[r // 128, k // 128]`` (float32 scales, one per 128 x
  128 block), MXFP4 e2m1 ``nibble * 2^(code - 127)`` (two values per byte, even index in the low
  nibble; a UE8M0 code per 32 values along ``K``; code 255 is NaN).
- The products are summed in float32 and the sum is cast to the dtype of ``x`` at the end
  (float32, or bfloat16 rounded to nearest even).
- Except: on a GPU of compute capability 8.9 or later, with ``act="fp8"``, ``K`` a multiple of 128
  and at most 16 rows per weight (decode; a linear with ``K`` of 2048 or more up to 64 rows), each
  32-wide slice of ``K`` (one MXFP4 scale block) is summed by an FP8 tensor-core instruction, then
  scaled and summed in float32. Where the GPU runs it natively (sm_89, sm_120, and sm_90 through
  ``wgmma``: the MoE, and linears with ``K`` of 2048 or more) its accumulator keeps about 13
  fraction bits (DeepSeek reports 14 bits for Hopper's FP8 GEMMs): a slice's sum lies within
  ``31 * 2^-13 / (1 - 31 * 2^-13)`` (about 2^-8) of the sum of its products' magnitudes from the
  exact one, and the activations' own FP8 rounding (up to 2^-4 a value) is far larger. On sm_100,
  and on sm_90 for the other linears or with ``DSV4RS_QGEMM_DECODE=mma``, the compiler turns the
  instruction into exact f16 products summed in float32, as the bf16 path's.
  ``DSV4RS_QGEMM_KERNEL=bf16`` keeps the bf16 path (float32 sums throughout; slower at decode).
  On compute capability 9.0 a small such linear (up to 16 rows, a small grid) runs as one kernel
  that quantizes the activations itself and sums its K splits within a thread-block cluster,
  with the same values, bit for bit, as the separate kernels (``DSV4RS_QGEMM_FUSED=on|off``
  forces the choice); one of 17 to 64 rows on FP8 weights (``K`` of 8192 or more) runs in one
  tile of 32 or 64 rows with the same arithmetic (``DSV4RS_QGEMM_WIDE=on|off``). At decode the
  MoE plan's kernel quantizes a few tokens' activations itself (up to 256 blocks of 128 values;
  ``DSV4RS_MOE_PLAN_QUANT=on|off``), and on compute capability 9.0 the MoE GEMMs of a small grid
  spread their blocks evenly over the SMs (``DSV4RS_MOE_SPREAD=on|off``); at prefill there the
  MoE's gate-up GEMM stores ``h`` for its FP8 quantization in bfloat16 rounded to odd, half the
  bytes of float32 (``DSV4RS_MOE_H_ODD=on|off``); none of these changes a bit.
- With more rows per weight (prefill) the GPU runs a tiled GEMM, on ``wgmma`` on compute
  capability 9.0 where ``K`` is a multiple of 128 and on ``mma.sync`` elsewhere; both sum the exact
  products in float32 (only the order differs). ``DSV4RS_QGEMM_TILED=mma`` forces the portable one.
  Except: on compute capability 9.0 with ``act="fp8"`` and FP8 weights the tiled GEMM runs on the
  FP8 tensor cores, as DeepSeek's FP8 GEMMs do: each 128-wide step of ``K`` is summed by four FP8
  instructions into one partial sum (within ``131 * 2^-13 / (1 - 131 * 2^-13)``, about 2^-6, of
  the sum of its 128 products' magnitudes from the exact one), then scaled and summed in float32.
  ``DSV4RS_QGEMM_KERNEL=bf16`` keeps the bf16 tiled GEMM there (MXFP4 weights always take it).

Out of range: on the CPU, scales that put the weights past float32's range (a UE8M0 code above
252, 255 being NaN; a float32 scale ``s`` with ``448 s`` not finite) raise ValueError naming the
scale, and a result that is not finite (the float32 sums overflowed, or an FP8 NaN code) raises
naming the inputs. The GPU looks for neither (that would synchronize the host): there such calls
give inf or NaN. The loader refuses non-finite weights and scales.
"""

from __future__ import annotations

import math

import torch

from dsv4rs import _core
from dsv4rs._tensor import as_tensor, spec, stream
from dsv4rs.ops._checks import cuda_index, ndim, positive

ACTS = ("fp8", "bf16")
"""The activation roundings ``act`` names."""

_MX_BLOCK = 32


@torch.library.custom_op("dsv4rs::quant_linear", mutates_args=())
def _quant_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, groups: int, act: str,
                  tiles: bool) -> torch.Tensor:
    rows, k = weight.shape[0], x.shape[-1]
    lead = x.shape[:-1] if groups == 1 else x.shape[:-2]
    flat = (x.reshape(-1, k) if groups == 1 else x.reshape(-1, groups, k)).contiguous()
    out = torch.empty((*lead, rows), dtype=x.dtype, device=x.device)
    workspace = None
    if x.device.type == "cuda":
        m = flat.shape[0]
        size = _core.quant_linear_workspace_bytes(cuda_index(x.device), m, groups, rows // groups, k,
                                                  x.dtype == torch.bfloat16, act, weight.dtype == torch.uint8)
        workspace = torch.empty(size, dtype=torch.uint8, device=x.device)
    _core.quant_linear(spec("x", flat), spec("weight", weight.view(torch.uint8)), spec("scale", scale),
                       weight.dtype == torch.uint8, groups, act, tiles,
                       None if workspace is None else spec("workspace", workspace),
                       spec("out", out.view(flat.shape[0], rows)), stream(x))
    return out


@_quant_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, groups: int, act: str, tiles: bool) -> torch.Tensor:
    lead = x.shape[:-1] if groups == 1 else x.shape[:-2]
    return x.new_empty((*lead, weight.shape[0]))


@torch.library.custom_op("dsv4rs::moe_experts", mutates_args=())
def _moe_experts(
    x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, gate_up_scale: torch.Tensor,
    down: torch.Tensor, down_scale: torch.Tensor, limit: float, act: str, tiles: bool,
) -> torch.Tensor:
    x, idx, weights = x.contiguous(), idx.contiguous(), weights.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    workspace = None
    if x.device.type == "cuda":
        size = _core.moe_workspace_bytes(x.shape[0], idx.shape[1], gate_up.shape[0], gate_up.shape[1] // 2, x.shape[1])
        workspace = torch.empty(size, dtype=torch.uint8, device=x.device)
    _core.moe_experts(
        spec("x", x), spec("idx", idx), spec("weights", weights), spec("gate_up", gate_up),
        spec("gate_up_scale", gate_up_scale), spec("down", down), spec("down_scale", down_scale), limit, act, tiles,
        None if workspace is None else spec("workspace", workspace), spec("out", out), stream(x),
    )
    return out


@_moe_experts.register_fake
def _(
    x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, gate_up_scale: torch.Tensor,
    down: torch.Tensor, down_scale: torch.Tensor, limit: float, act: str, tiles: bool,
) -> torch.Tensor:
    return x.new_empty(x.shape)


def _act(act: object) -> str:
    if not isinstance(act, str):
        raise TypeError(f"act: expected a str, got {type(act).__name__}")
    if act not in ACTS:
        raise ValueError(f'act: expected "fp8" or "bf16", got {act!r}')
    return act


def _reduced_dim(name: str, w: torch.Tensor, fp4: bool) -> int:
    """``K`` of a quantized weight (twice its last dim for MXFP4), a positive multiple of 32."""
    cols = w.shape[-1]
    k = 2 * cols if fp4 else cols
    if k == 0 or k % _MX_BLOCK:
        packed = f" ({cols} packed bytes per row)" if fp4 else ""
        raise ValueError(f"{name}: the reduced dimension K = {k}{packed} must be a positive multiple of {_MX_BLOCK}")
    return k


def quant_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, groups: int = 1, act: str = "fp8",
                 layout: str = "rows") -> torch.Tensor:
    """``A(x) W^T`` for a weight kept as DeepSeek ships it (numerics: this module's docstring).

    Args:
        x: ``float32``/``bfloat16``, ``[..., K]`` (``groups == 1``) or ``[..., groups, K]``; on the
            weight's device. On the CPU its values must be finite (ValueError); on the GPU a
            non-finite value spoils its 128-block.
        weight: ``float8_e4m3fn [R, K]`` (FP8, ``scale`` ``float32 [ceil(R/128), ceil(K/128)]``, one
            multiplier per 128 x 128 block, rows and columns may end in a partial block) or
            ``uint8 [R, K/2]`` (MXFP4: two e2m1 codes per byte, even index in the low nibble;
            ``scale`` ``uint8 [R, K/32]``, UE8M0 codes ``2^(code - 127)``). ``K`` is a positive
            multiple of 32.
        groups: ``g >= 1`` dividing ``R`` (DeepSeek's grouped ``wo_a``): group ``i`` of ``x``
            meets rows ``[i N, (i + 1) N)`` of the weight, ``N = R / g``.
        act: ``"fp8"`` (per 128-block FP8 e4m3 with a UE8M0 scale, DeepSeek's W8A8) or ``"bf16"``.
        layout: ``"rows"`` (DeepSeek's, above) or ``"tiles"``: ``weight`` as :func:`weight_tiles`
            gives it (``R`` a multiple of 64, ``K`` of 128), which the GPU reads in whole
            kilobytes; the same values, bit for bit (the CPU converts back to rows for the call).

    Returns:
        ``[..., R]`` (``groups == 1``) or ``[..., g N]`` (group-major columns), the dtype of ``x``:
        float32 sums of ``A(x)_k * w_rk``, cast once at the end.
    """
    x, weight, scale = as_tensor("x", x), as_tensor("weight", weight), as_tensor("scale", scale)
    groups = positive("groups", groups)
    act = _act(act)
    if weight.dtype not in (torch.float8_e4m3fn, torch.uint8):
        raise TypeError(f"weight: expected float8_e4m3fn (FP8) or uint8 (MXFP4), got {weight.dtype}")
    ndim("weight", weight, 2)
    k = _reduced_dim("weight", weight, weight.dtype == torch.uint8)
    if weight.shape[0] % groups:
        raise ValueError(f"groups: must divide the {weight.shape[0]} rows of weight, got {groups}")
    want = (k,) if groups == 1 else (groups, k)
    if x.dim() < len(want) or tuple(x.shape[-len(want):]) != want:
        dims = ", ".join(str(d) for d in want)
        raise ValueError(f"x: expected shape [..., {dims}], got {list(x.shape)}")
    tiles = _layout(layout)
    if tiles:
        _tile_step("weight", weight)
        if x.device.type != "cuda":
            weight, tiles = weight_rows(weight), False
    return _quant_linear(x, weight, scale, groups, act, tiles)


def moe_experts(
    x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, gate_up_scale: torch.Tensor,
    down: torch.Tensor, down_scale: torch.Tensor, limit: float, act: str = "fp8", layout: str = "rows",
) -> torch.Tensor:
    """The routed experts of a MoE layer over MXFP4 weights, fused: for each token ``t`` and choice
    ``j``, with ``e = idx[t, j]``:
    ``g = A(x_t) W_gate[e]^T``, ``u = A(x_t) W_up[e]^T`` (float32 sums, ``[I]``),
    ``h = silu(min(g, limit)) * clamp(u, -limit, limit)`` in float32 (``silu(v) = v / (1 + e^-v)``),
    ``y = A(h) W_down[e]^T`` (float32 sums, ``[d]``; rounded to bfloat16 where ``x`` is bfloat16),
    and
    ``out[t] = sum over j = 0 .. k-1, in that order, of weights[t, j] * y`` in float32, cast to the
    dtype of ``x``. ``A`` and the weight values: this module's docstring.

    Args:
        x: ``float32``/``bfloat16 [T, d]`` (finite on the CPU), ``d`` a multiple of 32.
        idx: ``int64``/``int32 [T, k]``, expert ids in ``[0, E)``, or -1: no expert, the pair
            adds nothing (an expert-parallel rank's pairs for experts it does not hold). On the
            CPU any other id is a ValueError naming ``idx``; on the GPU such a pair contributes
            zero too (checking would synchronize with the host).
        weights: ``float32 [T, k]`` routing weights.
        gate_up: ``uint8 [E, 2I, d/2]`` MXFP4 experts, rows ``0..I`` the gate (DeepSeek's ``w1``),
            ``I..2I`` the up projection (``w3``); ``gate_up_scale`` ``uint8 [E, 2I, d/32]`` UE8M0.
        down: ``uint8 [E, d, I/2]`` (``w2``), ``I`` a multiple of 32; ``down_scale``
            ``uint8 [E, d, I/32]``.
        limit: the SwiGLU clamp (``swiglu_limit``), ``> 0``; ``math.inf`` for none.
        act: ``"fp8"`` (DeepSeek's FP8 activations, on ``x`` and on ``h``) or ``"bf16"``.
        layout: ``"rows"`` (DeepSeek's, above) or ``"tiles"``: ``gate_up`` and ``down`` as
            :func:`weight_tiles` gives them (rows ``2I`` and ``d`` multiples of 64, ``d`` and ``I`` of
            128), which the GPU reads in whole kilobytes; the same values, bit for bit. The CPU
            takes them too (converting back to rows for the call).

    Returns:
        ``[T, d]``, the dtype of ``x``. On the GPU the call never synchronizes with the host and
        allocates only its output and a workspace (``torch.empty``), so it can be captured in a
        CUDA graph. Tokens run in passes of ``dsv4rs._core.moe_pass_tokens(k, E)`` (4,096 to
        16,384) over one workspace of about ``k (2 d + 4 max(d, I) + 2 I)`` bytes a pass token
        (``dsv4rs._core.moe_workspace_bytes``; 2.8 GB at V4-Flash's width).
    """
    x, idx, weights = as_tensor("x", x), as_tensor("idx", idx), as_tensor("weights", weights)
    gate_up, gate_up_scale = as_tensor("gate_up", gate_up), as_tensor("gate_up_scale", gate_up_scale)
    down, down_scale = as_tensor("down", down), as_tensor("down_scale", down_scale)
    act = _act(act)
    for name, t in (("gate_up", gate_up), ("gate_up_scale", gate_up_scale), ("down", down), ("down_scale", down_scale)):
        if t.dtype != torch.uint8:
            raise TypeError(f"{name}: expected uint8 (MXFP4 codes or UE8M0 scales), got {t.dtype}")
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise TypeError(f"limit: expected a number, got {type(limit).__name__}")
    limit = float(limit)
    if math.isnan(limit) or limit <= 0:
        raise ValueError(f"limit: must be > 0 (math.inf for no clamp), got {limit}")
    ndim("x", x, 2)
    ndim("idx", idx, 2)
    ndim("gate_up", gate_up, 3)
    tiles = _layout(layout)
    if tiles:
        for name, w in (("gate_up", gate_up), ("down", down)):
            _tile_step(name, w)
        if x.device.type != "cuda":
            gate_up, down, tiles = weight_rows(gate_up), weight_rows(down), False
    return _moe_experts(x, idx, weights, gate_up, gate_up_scale, down, down_scale, limit, act, tiles)


LAYOUTS = ("rows", "tiles")
"""The weight layouts ``quant_linear`` and ``moe_experts`` take: DeepSeek's rows, or
:func:`weight_tiles`'s."""


def _layout(layout: object) -> bool:
    """Whether ``layout`` names the tiles (checked)."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f'layout: expected "rows" or "tiles", got {layout!r}')
    return layout == "tiles"


_TILE_ROWS = 64  # a tile: 64 rows x one K step (128 values: 64 bytes MXFP4, 128 FP8)


def _tile_step(name: str, w: torch.Tensor) -> int:
    """Bytes of one K step of a row of ``w`` (MXFP4 ``uint8`` codes: 64; FP8: 128), after checking
    that ``w`` holds whole tiles."""
    if not isinstance(w, torch.Tensor) or w.dtype not in (torch.uint8, torch.float8_e4m3fn) or w.dim() not in (2, 3):
        raise TypeError(f"{name}: expected MXFP4 codes (uint8 [N, K/2] or [E, N, K/2]) or FP8 e4m3 ([N, K] or "
                        f"[E, N, K]), got {getattr(w, 'dtype', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}")
    step = 64 if w.dtype == torch.uint8 else 128
    rows, width = w.shape[-2], w.shape[-1]
    if w.numel() == 0:
        raise ValueError(f"{name}: expected a weight with rows, K and (stacked) experts, got shape {list(w.shape)}")
    if rows % _TILE_ROWS or width % step:
        k = 2 * width if step == 64 else width
        raise ValueError(f"{name}: tiles need rows a multiple of {_TILE_ROWS} and K a multiple of 128, got "
                         f"{rows} rows and K {k}")
    return step


def weight_tiles(weight: torch.Tensor) -> torch.Tensor:
    """A weight as DeepSeek ships it (MXFP4 codes ``uint8 [N, K/2]`` / ``[E, N, K/2]`` or FP8
    ``float8_e4m3fn [N, K]`` / ``[E, N, K]``, rows) in tiles, the layout ``quant_linear(...,
    layout="tiles")`` and ``moe_experts(..., layout="tiles")`` read: the same shape, dtype and
    bytes, ordered so that one K step (128 values: ``S`` = 64 bytes MXFP4, 128 FP8) of 64
    consecutive rows is one contiguous tile of ``64 S`` bytes, a block of 64 rows' tiles in K
    order: byte ``b`` of row ``n`` lies at ``(n // 64) 64 W + (b // S) 64 S + (n % 64) S + b % S``
    of its expert (``W`` the bytes of a row). ``N`` must be a multiple of 64 and ``K`` of 128. The
    scales keep their layout. Returns a new contiguous tensor on the same device;
    :func:`weight_rows` is its inverse."""
    step = _tile_step("weight", weight)
    rows, width = weight.shape[-2], weight.shape[-1]
    t = weight.view(torch.uint8).reshape(-1, rows // _TILE_ROWS, _TILE_ROWS, width // step, step)
    return t.transpose(2, 3).contiguous().view(weight.dtype).view(weight.shape)


def weight_rows(weight: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`weight_tiles`: a weight in tiles back in DeepSeek's rows (a new
    contiguous tensor of the same shape and dtype)."""
    step = _tile_step("weight", weight)
    rows, width = weight.shape[-2], weight.shape[-1]
    t = weight.view(torch.uint8).reshape(-1, rows // _TILE_ROWS, width // step, _TILE_ROWS, step)
    return t.transpose(2, 3).contiguous().view(weight.dtype).view(weight.shape)
