"""The float64 twins of the dsv4rs ops, in plain torch (docs/model.md sections 2-5).

This module is the oracle the Rust and CUDA kernels are tested against. It follows the formulas
of docs/model.md literally and computes in float64: inputs of any floating dtype are upcast. The
quantized-weight ops model only the activation rounding their kernels do (``quantize_activations``);
their weights are dequantized exactly and their sums are float64.

The quantizers (docs/model.md section 5) model the kernels' float32 inputs: they first round their input
to float32 (exact for float32 and bfloat16 inputs), then do every step in float64, which is exact
for these steps, so they give the same codes, scales and bytes as ``rust/core/src/quant.rs``.

Arguments are checked and errors name the argument: ``TypeError`` for a wrong type or dtype,
``ValueError`` for a wrong shape or value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from dsv4rs._core import ENTRY_DIM, FP4_BLOCK, FP8_BLOCK, INDEX_DIM, NOPE_DIM, PAGE_ROWS

__all__ = [
    "PAGE_ROWS",
    "ENTRY_DIM",
    "NOPE_DIM",
    "FP8_BLOCK",
    "INDEX_DIM",
    "FP4_BLOCK",
    "FP8_MAX",
    "FP4_MAX",
    "AMAX_FLOOR",
    "FP4_AMAX_FLOOR",
    "rope_inv_freq",
    "apply_rope",
    "rms_norm",
    "compressor_prefill",
    "compressor_state_init",
    "compressor_step",
    "compressed_visible",
    "indexer_scores",
    "indexer_topk",
    "sparse_attention",
    "window_indices",
    "ue8m0_exponent",
    "fp8_e4m3_encode",
    "fp8_e4m3_decode",
    "fp4_e2m1_encode",
    "fp4_e2m1_decode",
    "entry_quant_dequant",
    "fp4_quant_dequant",
    "fp8_key_quant_dequant",
    "hadamard128",
    "encode_main_entries",
    "encode_index_keys",
    "pack_pages",
    "copy_rows",
    "ACT_BLOCK",
    "FP8_WEIGHT_BLOCK",
    "MX_BLOCK",
    "quantize_activations",
    "dequantize_weight",
    "quant_linear",
    "moe_experts",
    "moe_route",
    "swiglu",
    "step_rows",
]

F64 = torch.float64
INF = math.inf

# The format constants (page rows, entry and key widths, scale blocks) are the Rust core's.
FP8_MAX = 448.0
"""Largest finite FP8 e4m3 magnitude."""
FP4_MAX = 6.0
"""Largest FP4 e2m1 magnitude."""
AMAX_FLOOR = float(torch.tensor(1e-4, dtype=torch.float32))
"""Block maxima below this (1e-4 rounded to float32) are raised to it before the scale is chosen."""
FP4_AMAX_FLOOR = 6.0 * 2.0**-126
"""FP4 block maxima below this (6 * 2^-126, as DeepSeek's FP4 quantizer) are raised to it."""

Quant = Literal["none", "fp8", "fp4"]
IndexKeyFormat = Literal["fp4", "fp8"]


# ---------------------------------------------------------------------------------------------
# Argument checks


def _tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def _float(name: str, x: object) -> torch.Tensor:
    """``x`` upcast to float64; it must be a real floating-point tensor."""
    t = _tensor(name, x)
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    return t.to(F64)


def _index(name: str, x: object) -> torch.Tensor:
    """``x`` as int64; it must be an integer tensor."""
    t = _tensor(name, x)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got {t.dtype}")
    return t.to(torch.int64)


def _int(name: str, x: object, low: int) -> int:
    """``x`` as a Python int, at least ``low``."""
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name}: expected an int, got {type(x).__name__}")
    if x < low:
        raise ValueError(f"{name}: must be >= {low}, got {x}")
    return x


def _check_shape(name: str, x: torch.Tensor, *dims: int | str) -> None:
    """Raises unless ``x`` has ``len(dims)`` dims, each equal to the int given (a str names a
    dimension of any size)."""
    if x.dim() != len(dims) or any(isinstance(w, int) and s != w for s, w in zip(x.shape, dims)):
        want = ", ".join(str(w) for w in dims)
        raise ValueError(f"{name}: expected shape [{want}], got {list(x.shape)}")


def _check_last_dim(name: str, x: torch.Tensor, dim: int) -> None:
    if x.dim() < 1 or x.shape[-1] != dim:
        raise ValueError(f"{name}: expected shape [..., {dim}], got {list(x.shape)}")


def _exp2(e: torch.Tensor) -> torch.Tensor:
    """Exact ``2^e`` in float64 for integer ``e``."""
    return torch.ldexp(torch.ones(e.shape, dtype=F64), e.to(torch.int64))


# ---------------------------------------------------------------------------------------------
# RoPE and RMSNorm (docs/model.md section 2)


def rope_inv_freq(
    rope_dim: int = 64,
    theta: float = 10000.0,
    yarn_factor: float | None = None,
    original_max_position: int = 65536,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> torch.Tensor:
    """RoPE inverse frequencies ``float64 [rope_dim // 2]`` (docs/model.md section 2).

    ``theta_j = theta^(-2j / rope_dim)``. With ``yarn_factor``, standard YaRN without mscale: the
    correction range ``[low, high]`` is where the wavelength fits between ``beta_fast`` and
    ``beta_slow`` rotations in ``original_max_position`` tokens,
    ``low = floor(rope_dim ln(orig / (beta_fast 2 pi)) / (2 ln theta))`` (at least 0),
    ``high = ceil(rope_dim ln(orig / (beta_slow 2 pi)) / (2 ln theta))`` (at most rope_dim - 1),
    ``ramp_j = clamp((j - low) / (high - low), 0, 1)`` and
    ``inv_freq_j = theta_j (1 - ramp_j) + theta_j / yarn_factor ramp_j``. For CSA/HCA layers
    (theta 160000, factor 16 from 65536, betas 32 and 1) the ramp is ``(j - 15) / 10``.
    """
    low, width = _yarn_ramp(rope_dim, theta, yarn_factor, original_max_position, beta_fast, beta_slow)
    inv_freq = theta ** (-torch.arange(0, rope_dim, 2, dtype=F64) / rope_dim)
    if yarn_factor is None:
        return inv_freq
    ramp = ((torch.arange(rope_dim // 2, dtype=F64) - low) / width).clamp(0, 1)
    return inv_freq * (1 - ramp) + inv_freq / yarn_factor * ramp


def official_inv_freq(
    rope_dim: int = 64,
    theta: float = 10000.0,
    yarn_factor: float | None = None,
    original_max_position: int = 65536,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> torch.Tensor:
    """The inverse frequencies as DeepSeek's ``inference/model.py`` builds its table, in float32
    arithmetic (``float32 [rope_dim // 2]``): ``1 / theta^(2j / rope_dim)`` with the exponent and
    the power in float32, then YaRN as ``f / factor (1 - s) + f s`` with ``s = 1 - ramp`` in
    float32 (``ramp`` as in :func:`rope_inv_freq`)."""
    low, width = _yarn_ramp(rope_dim, theta, yarn_factor, original_max_position, beta_fast, beta_slow)
    freqs = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    if yarn_factor is None:
        return freqs
    smooth = 1 - ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / width).clamp(0, 1)
    return freqs / yarn_factor * (1 - smooth) + freqs * smooth


def _yarn_ramp(rope_dim: int, theta: float, yarn_factor: float | None, original_max_position: int, beta_fast: float,
               beta_slow: float) -> tuple[int, float]:
    """Checks the RoPE arguments; returns YaRN's ramp ``(low, high - low)`` (``(0, 1)`` without
    YaRN)."""
    rope_dim = _int("rope_dim", rope_dim, 2)
    if rope_dim % 2:
        raise ValueError(f"rope_dim: must be even, got {rope_dim}")
    if not theta > 1:
        raise ValueError(f"theta: must be > 1, got {theta}")
    if yarn_factor is None:
        return 0, 1.0
    if not yarn_factor > 0:
        raise ValueError(f"yarn_factor: must be > 0, got {yarn_factor}")
    if not original_max_position > 0:
        raise ValueError(f"original_max_position: must be > 0, got {original_max_position}")
    if not beta_fast > beta_slow > 0:
        raise ValueError(f"beta_fast, beta_slow: need beta_fast > beta_slow > 0, got {beta_fast}, {beta_slow}")

    def correction_dim(rotations: float) -> float:
        return rope_dim * math.log(original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), rope_dim - 1)
    return low, (high - low if high != low else 1e-3)


ROPE_TABLES = ("exact", "official")
"""How :func:`apply_rope` gets each angle's sine and cosine: ``"exact"`` in float64 from the
float64 product ``position x inv_freq``; ``"official"`` as DeepSeek's fp32 table does: the position
and the frequency in float32, their product rounded to float32, sine and cosine in float32
(``torch.polar`` on complex64). The rotation itself is float64 either way."""


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False,
               table: str = "exact") -> torch.Tensor:
    """RoPE (docs/model.md section 2) on the last ``2 * len(inv_freq)`` dims of ``x``.

    ``x``: ``[T, ..., D]``; ``positions``: integer ``[T]``, aligned with dim 0. Pair ``j``
    ``(x0, x1) = (x[D - 2R + 2j], x[D - 2R + 2j + 1])`` is rotated by the angle
    ``positions[t] * inv_freq[j]`` (by its negative when ``inverse``):
    ``(x0 cos - x1 sin, x0 sin + x1 cos)``. The other dims are unchanged. Returns float64.
    ``table`` (:data:`ROPE_TABLES`): how the angles' sines and cosines are computed.
    """
    if table not in ROPE_TABLES:
        raise ValueError(f"table: expected one of {ROPE_TABLES}, got {table!r}")
    x = _float("x", x)
    positions = _index("positions", positions)
    inv_freq = _float("inv_freq", inv_freq)
    if x.dim() < 2:
        raise ValueError(f"x: expected shape [T, ..., D], got {list(x.shape)}")
    _check_shape("positions", positions, x.shape[0])
    _check_shape("inv_freq", inv_freq, "R")
    pairs, dim = inv_freq.shape[0], x.shape[-1]
    if 2 * pairs > dim:
        raise ValueError(f"inv_freq: {pairs} frequencies rotate {2 * pairs} dims, but x has only {dim}")
    if table == "official":
        angle32 = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)
        unit = torch.polar(torch.ones_like(angle32), angle32)
        cos, sin = unit.real.to(F64), unit.imag.to(F64)
        if inverse:
            sin = -sin
    else:
        angle = positions.to(F64)[:, None] * inv_freq
        if inverse:
            angle = -angle
        cos, sin = angle.cos(), angle.sin()
    shape = (x.shape[0], *[1] * (x.dim() - 2), pairs)
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    rot = x[..., dim - 2 * pairs :].unflatten(-1, (pairs, 2))
    x0, x1 = rot[..., 0], rot[..., 1]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return torch.cat((x[..., : dim - 2 * pairs], rotated), dim=-1)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: ``x * rsqrt(mean(x^2) + eps) * weight``."""
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """The twin of :func:`dsv4rs.ops.rms_norm` in float64: ``x * rsqrt(mean(x^2) + eps) * weight``
    over the last dim (no weight: none)."""
    x = _float("x", x)
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return y if weight is None else y * _float("weight", weight)


# ---------------------------------------------------------------------------------------------
# Compressor (docs/model.md section 3)

_QUANT_DIM: dict[str, int | None] = {"none": None, "fp8": ENTRY_DIM, "fp4": INDEX_DIM}


def _compressor_args(
    ape: torch.Tensor, norm_weight: torch.Tensor, ratio: int, inv_freq: torch.Tensor, quant: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Checks the arguments prefill and step share; returns ``ape``, ``norm_weight``,
    ``inv_freq`` in float64 and ``coff`` (2 for the overlapping CSA form, ratio 4, else 1)."""
    ratio = _int("ratio", ratio, 1)
    coff = 2 if ratio == 4 else 1
    norm_weight = _float("norm_weight", norm_weight)
    _check_shape("norm_weight", norm_weight, "D")
    dim = norm_weight.shape[0]
    ape = _float("ape", ape)
    _check_shape("ape", ape, ratio, coff * dim)
    inv_freq = _float("inv_freq", inv_freq)
    _check_shape("inv_freq", inv_freq, "R")
    if 2 * inv_freq.shape[0] > dim:
        raise ValueError(f"inv_freq: {inv_freq.shape[0]} frequencies rotate more than D = {dim} dims")
    if quant not in _QUANT_DIM:
        raise ValueError(f'quant: expected "none", "fp8" or "fp4", got {quant!r}')
    if _QUANT_DIM[quant] not in (None, dim):
        raise ValueError(f'quant: "{quant}" needs D = {_QUANT_DIM[quant]}, got D = {dim}')
    return ape, norm_weight, inv_freq, coff


def _pool(kv: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per channel, the softmax over the candidates (dim -2) of ``logits`` weighting ``kv``."""
    return (torch.softmax(logits, dim=-2) * kv).sum(-2)


def _finish_entries(
    pooled: torch.Tensor, first_positions: torch.Tensor, norm_weight: torch.Tensor, inv_freq: torch.Tensor,
    eps: float, quant: str, table: str = "exact",
) -> torch.Tensor:
    """RMSNorm, RoPE at the first position of each entry's own block, then ``quant``."""
    entries = apply_rope(_rms_norm(pooled, norm_weight, eps), first_positions, inv_freq, table=table)
    if quant == "fp8":
        return entry_quant_dequant(entries)
    if quant == "fp4":
        return fp4_quant_dequant(hadamard128(entries))
    return entries


def compressor_prefill(
    kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor, ratio: int,
    inv_freq: torch.Tensor, eps: float = 1e-6, quant: Quant = "none", position_offset: int = 0, table: str = "exact",
) -> torch.Tensor:
    """Compressed entries of ``S`` tokens at once: ``float64 [S // ratio, D]`` (docs/model.md section 3).

    ``kv``, ``score``: ``[S, coff * D]``, the projections ``W_kv x`` and ``W_gate x``; ``ape``:
    ``[ratio, coff * D]``; ``norm_weight``: ``[D]``. ``coff`` is 2 for ratio 4 (CSA, overlapping
    entries) and 1 for any other ratio (HCA form). Only complete blocks give entries.

    Entry ``i`` pools, per channel, with one softmax over the candidates' logits:
    - no overlap: tokens ``j`` of block ``i`` (``r i <= j < r i + r``), ``(kv_j, score_j + ape[j - r i])``;
    - overlap: ``kv_j = [b | a]`` (first D dims "b" feed the next entry, last D dims "a" the own
      entry), likewise ``score`` and ``ape``; candidates are the own block's ``(a_j, s^a_j + ape^a)``
      and the previous block's ``(b_j, s^b_j + ape^b)``, whose logits are ``-inf`` for entry 0.
    Then RMSNorm over D with ``norm_weight`` (docs/model.md's bf16 cast before the norm is left out),
    RoPE (:func:`apply_rope` with ``table``) at position ``position_offset + r i`` (the tokens
    being positions ``position_offset ..``, a multiple of ``r``), and ``quant``: ``"none"``, ``"fp8"``
    (:func:`entry_quant_dequant`, D = 512) or ``"fp4"`` (:func:`hadamard128` then
    :func:`fp4_quant_dequant`, D = 128).
    """
    ape, norm_weight, inv_freq, coff = _compressor_args(ape, norm_weight, ratio, inv_freq, quant)
    dim = norm_weight.shape[0]
    kv, score = _float("kv", kv), _float("score", score)
    _check_shape("kv", kv, "S", coff * dim)
    _check_shape("score", score, kv.shape[0], coff * dim)
    n = kv.shape[0] // ratio
    blocks = kv[: n * ratio].unflatten(0, (n, ratio))
    logits = score[: n * ratio].unflatten(0, (n, ratio)) + ape
    if coff == 2:
        prev_kv = torch.cat((torch.zeros_like(blocks[:1, :, :dim]), blocks[:-1, :, :dim]))
        prev_logits = torch.cat((torch.full_like(logits[:1, :, :dim], -INF), logits[:-1, :, :dim]))
        blocks = torch.cat((prev_kv, blocks[..., dim:]), dim=1)
        logits = torch.cat((prev_logits, logits[..., dim:]), dim=1)
    offset = _int("position_offset", position_offset, 0)
    if offset % ratio:
        raise ValueError(f"position_offset: must be a multiple of ratio = {ratio}, got {offset}")
    first_positions = offset + ratio * torch.arange(n)
    return _finish_entries(_pool(blocks, logits), first_positions, norm_weight, inv_freq, eps, quant, table)


def compressor_state_init(ratio: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty decode state of a compressor (docs/model.md section 3): ``(kv_state, score_state)``, both
    ``float64 [coff * ratio, coff * dim]``, kv zeros and scores ``-inf``."""
    ratio, dim = _int("ratio", ratio, 1), _int("dim", dim, 1)
    coff = 2 if ratio == 4 else 1
    shape = (coff * ratio, coff * dim)
    return torch.zeros(shape, dtype=F64), torch.full(shape, -INF, dtype=F64)


def compressor_step(
    kv_state: torch.Tensor, score_state: torch.Tensor, kv_t: torch.Tensor, score_t: torch.Tensor, position: int,
    ape: torch.Tensor, norm_weight: torch.Tensor, ratio: int, inv_freq: torch.Tensor, eps: float = 1e-6,
    quant: Quant = "none",
) -> torch.Tensor | None:
    """Feeds token ``position`` to a compressor; returns the entry it completes (``float64 [D]``)
    or ``None`` (docs/model.md section 3, decode state).

    ``kv_state``, ``score_state``: the float64 state of :func:`compressor_state_init`, updated in
    place; the score state holds ``score + ape``. ``kv_t``, ``score_t``: ``[coff * D]``.
    No overlap: the token writes slot ``p mod r``; when ``(p + 1) mod r == 0`` the slots are pooled
    into entry ``p // r``. Overlap (ratio 4): the token writes slot ``4 + p mod 4``; when
    ``(p + 1) mod 4 == 0`` the candidates ``cat(state[0:4, :D], state[4:8, D:])`` are pooled into
    entry ``p // 4``, then ``state[0:4] <- state[4:8]``. Norm, RoPE and quant as in
    :func:`compressor_prefill`, which this matches token by token.
    """
    ape, norm_weight, inv_freq, coff = _compressor_args(ape, norm_weight, ratio, inv_freq, quant)
    dim = norm_weight.shape[0]
    for name, state in (("kv_state", kv_state), ("score_state", score_state)):
        if _tensor(name, state).dtype != F64:
            raise TypeError(f"{name}: expected a float64 tensor (see compressor_state_init), got {state.dtype}")
        _check_shape(name, state, coff * ratio, coff * dim)
    kv_t, score_t = _float("kv_t", kv_t), _float("score_t", score_t)
    _check_shape("kv_t", kv_t, coff * dim)
    _check_shape("score_t", score_t, coff * dim)
    position = _int("position", position, 0)

    slot = position % ratio
    row = slot + (ratio if coff == 2 else 0)
    kv_state[row] = kv_t
    score_state[row] = score_t + ape[slot]
    if (position + 1) % ratio:
        return None
    if coff == 2:
        kv = torch.cat((kv_state[:ratio, :dim], kv_state[ratio:, dim:]))
        logits = torch.cat((score_state[:ratio, :dim], score_state[ratio:, dim:]))
        kv_state[:ratio] = kv_state[ratio:]
        score_state[:ratio] = score_state[ratio:]
    else:
        kv, logits = kv_state, score_state
    first_position = torch.tensor([position - slot])
    return _finish_entries(_pool(kv, logits)[None], first_position, norm_weight, inv_freq, eps, quant)[0]


def compressed_visible(positions: torch.Tensor, ratio: int) -> torch.Tensor:
    """Number of compressed entries visible to the query at each position (docs/model.md section 3):
    entry ``i`` is visible to ``t`` iff ``r i + r - 1 <= t``, so the count is ``(t + 1) // r``."""
    positions = _index("positions", positions)
    ratio = _int("ratio", ratio, 1)
    if (positions < 0).any():
        raise ValueError("positions: must be >= 0")
    return (positions + 1) // ratio


# ---------------------------------------------------------------------------------------------
# Lightning indexer (docs/model.md section 4)


def indexer_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Indexer scores ``float64 [T, N]`` (docs/model.md section 4): ``I_ts = sum_h w_th ReLU(q_th . k_s)``.

    ``q``: ``[T, H, Dk]`` indexer queries; ``weights``: ``[T, H]``; ``keys``: ``[N, Dk]``.
    """
    q, weights, keys = _float("q", q), _float("weights", weights), _float("keys", keys)
    _check_shape("q", q, "T", "H", "Dk")
    _check_shape("weights", weights, q.shape[0], q.shape[1])
    _check_shape("keys", keys, "N", q.shape[2])
    return (weights[:, :, None] * torch.relu(q @ keys.T)).sum(1)


def indexer_topk(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The indexer's selection (docs/model.md section 4): ``(indices int64 [T, k], scores float64 [T, k])``.

    Query ``t`` ranks keys ``s < visible[t]`` (``int [T]``, each in ``[0, N]``) by
    :func:`indexer_scores` and keeps the top ``min(k, visible[t])``, score descending, ties to the
    lower index first; the remaining slots hold index ``-1`` and score ``-inf``.
    """
    scores = indexer_scores(q, weights, keys)
    num_queries, num_keys = scores.shape
    visible = _index("visible", visible)
    _check_shape("visible", visible, num_queries)
    if ((visible < 0) | (visible > num_keys)).any():
        raise ValueError(f"visible: values must lie in [0, {num_keys}] (the number of keys)")
    k = _int("k", k, 1)
    hidden = torch.arange(num_keys) >= visible[:, None]
    # A stable sort keeps ties in index order; hidden keys sort after every visible one.
    ranked = torch.sort(scores.masked_fill(hidden, -INF), dim=1, descending=True, stable=True)
    kept = min(k, num_keys)
    indices = torch.full((num_queries, k), -1, dtype=torch.int64)
    top = torch.full((num_queries, k), -INF, dtype=F64)
    indices[:, :kept], top[:, :kept] = ranked.indices[:, :kept], ranked.values[:, :kept]
    beyond = torch.arange(k) >= visible[:, None]
    return indices.masked_fill(beyond, -1), top.masked_fill(beyond, -INF)


# ---------------------------------------------------------------------------------------------
# Core attention (docs/model.md section 2)


def sparse_attention(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sink: torch.Tensor, scale: float = 512**-0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with a sink over a candidate set per query (docs/model.md section 2):
    ``(out float64 [T, H, D], lse float64 [T, H])``.

    ``q``: ``[T, H, D]``; ``kv``: ``[N, D]`` entries, each both key and value; ``indices``:
    integer ``[T, K]`` rows of ``kv``, ``-1`` = masked (ignored), a repeated row counts each time;
    ``sink``: ``[H]``, unscaled. With ``z_hj = (q_th . kv_j) * scale``,
    ``out_th = sum_j exp(z_hj) kv_j / (sum_j exp(z_hj) + exp(sink_h))``, computed stably;
    ``lse_th = log(sum_j exp(z_hj))`` over the valid candidates (the sink excluded), ``-inf`` when
    there are none, and then ``out`` is 0.
    """
    q, kv, sink = _float("q", q), _float("kv", kv), _float("sink", sink)
    indices = _index("indices", indices)
    _check_shape("q", q, "T", "H", "D")
    _check_shape("kv", kv, "N", q.shape[2])
    _check_shape("indices", indices, q.shape[0], "K")
    _check_shape("sink", sink, q.shape[1])
    if ((indices < -1) | (indices >= kv.shape[0])).any():
        raise ValueError(f"indices: values must lie in [-1, {kv.shape[0]}) (-1 = masked, else a row of kv)")
    rows = kv[indices.clamp(min=0)]
    z = torch.einsum("thd,tkd->thk", q, rows) * scale
    z = z.masked_fill((indices < 0)[:, None, :], -INF)
    lse = torch.logsumexp(z, dim=-1)
    shift = torch.maximum(lse, sink)
    shift = shift.where(shift.isfinite(), 0.0)
    num = torch.einsum("thk,tkd->thd", (z - shift[..., None]).exp(), rows)
    den = ((lse - shift).exp() + (sink - shift).exp())[..., None]
    out = torch.where(den > 0, num / den, 0.0)
    return out, lse


def window_indices(positions: torch.Tensor, window: int = 128) -> torch.Tensor:
    """Sliding-window candidates (docs/model.md section 2): ``int64 [T, window]``, for the query at
    position ``t`` the positions ``max(0, t - window + 1) .. t`` ascending, then ``-1`` padding."""
    positions = _index("positions", positions)
    _check_shape("positions", positions, "T")
    window = _int("window", window, 1)
    if (positions < 0).any():
        raise ValueError("positions: must be >= 0")
    idx = (positions - window + 1).clamp(min=0)[:, None] + torch.arange(window)
    return idx.masked_fill(idx > positions[:, None], -1)


# ---------------------------------------------------------------------------------------------
# Quantizers (docs/model.md section 5), bit-identical to rust/core/src/quant.rs


def _f32_values(name: str, x: object) -> torch.Tensor:
    """``x`` rounded to float32 (the kernels' input type) and held in float64; must be finite."""
    t = _tensor(name, x)
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    t = t.to(torch.float32)
    if not t.isfinite().all():
        raise ValueError(f"{name}: values must be finite as float32")
    return t.to(F64)


def _exponents(name: str, e: object, like: torch.Tensor) -> torch.Tensor:
    """Scale exponents (an int or an integer tensor) in the UE8M0 range, broadcast to ``like``."""
    if isinstance(e, int) and not isinstance(e, bool):
        e = torch.tensor(e)
    e = _index(name, e)
    if ((e < -127) | (e > 127)).any():
        raise ValueError(f"{name}: exponents must lie in [-127, 127] (UE8M0 scales)")
    try:
        return e.expand_as(like)
    except RuntimeError:
        raise ValueError(f"{name}: shape {list(e.shape)} does not broadcast to {list(like.shape)}") from None


def ue8m0_exponent(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """UE8M0 scale exponents, elementwise (docs/model.md section 5): ``int64``, the smallest integer
    ``e`` with ``max(amax, floor) <= qmax * 2^e`` (``amax`` and the floor as float32); the floor is
    :data:`AMAX_FLOOR` (1e-4) for FP8 and :data:`FP4_AMAX_FLOOR` (6 * 2^-126) for FP4
    (``qmax`` 6)."""
    a = _f32_values("amax", amax).clamp(min=FP4_AMAX_FLOOR if qmax == FP4_MAX else AMAX_FLOOR)
    q = float(torch.tensor(qmax, dtype=torch.float32)) if isinstance(qmax, (int, float)) else math.nan
    if not 0 < q < INF:
        raise ValueError(f"qmax: expected a positive number, finite as float32, got {qmax!r}")
    # a and q carry 24-bit mantissas, so a <= q 2^k exactly when the float64 quotient a / q <= 2^k;
    # with a / q = m 2^p (m in [0.5, 1)) the smallest such k is p, or p - 1 when m = 0.5.
    mantissa, power = torch.frexp(a / q)
    return torch.where(mantissa == 0.5, power - 1, power).to(torch.int64)


def _minifloat_encode(
    x: torch.Tensor, e: torch.Tensor, qmax: float, man: int, bias: int, sign_bit: int
) -> torch.Tensor:
    """Code of ``x * 2^-e`` on a minifloat grid with ``man`` mantissa bits and exponent bias
    ``bias`` (no infinities): magnitude saturated at ``qmax``, rounded to nearest even, sign bit
    from ``x``."""
    a = (x.abs() * _exp2(-e)).clamp(max=qmax)
    min_binade = 1 - bias
    binade = (torch.frexp(a).exponent.to(torch.int64) - 1).where(a > 0, min_binade).clamp(min=min_binade)
    mantissa = torch.round(a * _exp2(man - binade)).to(torch.int64)
    code = ((binade - min_binade) << man) + mantissa
    return (code + torch.signbit(x) * sign_bit).to(torch.uint8)


def _minifloat_decode(codes: torch.Tensor, man: int, bias: int, sign_bit: int) -> torch.Tensor:
    """Value of minifloat codes (inverse of :func:`_minifloat_encode` at ``e = 0``)."""
    c = codes.to(torch.int64)
    magnitude = c & (sign_bit - 1)
    exponent, mantissa = magnitude >> man, magnitude & ((1 << man) - 1)
    subnormal = mantissa * _exp2(torch.full_like(c, 1 - bias - man))
    normal = (1 + mantissa / 2**man) * _exp2(exponent - bias)
    value = torch.where(exponent == 0, subnormal, normal)
    return torch.where(c & sign_bit != 0, -value, value)


def _codes(name: str, codes: object, largest: int) -> torch.Tensor:
    t = _tensor(name, codes)
    if t.dtype != torch.uint8:
        raise TypeError(f"{name}: expected a uint8 tensor, got {t.dtype}")
    if (t > largest).any():
        raise ValueError(f"{name}: codes must lie in [0, {largest}]")
    return t


def fp8_e4m3_encode(x: torch.Tensor, e: torch.Tensor | int) -> torch.Tensor:
    """FP8 e4m3fn codes (``uint8``, shape of ``x``) of ``x * 2^-e`` (docs/model.md section 5): round to
    nearest even on the e4m3 grid (subnormal step 2^-9), saturated at 448, sign bit from ``x``
    (so -0.0 and tiny negatives give 0x80). ``e``: an int or integer tensor broadcast to ``x``."""
    x = _f32_values("x", x)
    return _minifloat_encode(x, _exponents("e", e, x), FP8_MAX, 3, 7, 0x80)


def fp8_e4m3_decode(codes: torch.Tensor) -> torch.Tensor:
    """Values (``float64``) of FP8 e4m3fn codes; 0x7F and 0xFF are NaN (never encoded)."""
    codes = _codes("codes", codes, 0xFF)
    return _minifloat_decode(codes, 3, 7, 0x80).masked_fill(codes & 0x7F == 0x7F, math.nan)


def fp4_e2m1_encode(x: torch.Tensor, e: torch.Tensor | int) -> torch.Tensor:
    """FP4 e2m1 nibbles (``uint8`` in 0..15, sign bit 8) of ``x * 2^-e`` (docs/model.md section 5):
    round to nearest even on the grid {0, 0.5, 1, 1.5, 2, 3, 4, 6}, saturated at 6, sign bit from
    ``x``. ``e``: an int or integer tensor broadcast to ``x``."""
    x = _f32_values("x", x)
    return _minifloat_encode(x, _exponents("e", e, x), FP4_MAX, 1, 1, 0x8)


def fp4_e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """Values (``float64``) of FP4 e2m1 nibbles (``uint8`` in 0..15)."""
    return _minifloat_decode(_codes("codes", codes, 0xF), 1, 1, 0x8)


_GRIDS: dict[str, tuple[float, Callable[..., torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "fp8": (FP8_MAX, fp8_e4m3_encode, fp8_e4m3_decode),
    "fp4": (FP4_MAX, fp4_e2m1_encode, fp4_e2m1_decode),
}


def _quantize(x: torch.Tensor, block: int, grid: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[..., D]`` and scale exponents ``[..., D // block]`` of ``x`` (float32 values),
    one UE8M0 scale per ``block`` consecutive values of the last dim."""
    qmax, encode, _ = _GRIDS[grid]
    blocks = x.unflatten(-1, (-1, block))
    e = ue8m0_exponent(blocks.abs().amax(-1), qmax)
    return encode(blocks, e[..., None]).flatten(-2), e


def _dequantize(codes: torch.Tensor, e: torch.Tensor, block: int, grid: str) -> torch.Tensor:
    decode = _GRIDS[grid][2]
    return (decode(codes).unflatten(-1, (-1, block)) * _exp2(e)[..., None]).flatten(-2)


def _quant_dequant(name: str, x: object, dim: int, block: int, grid: str) -> torch.Tensor:
    x = _f32_values(name, x)
    _check_last_dim(name, x, dim)
    return _dequantize(*_quantize(x, block, grid), block, grid)


def entry_quant_dequant(x: torch.Tensor) -> torch.Tensor:
    """What a KV entry reads back from the cache (docs/model.md section 5): ``x`` ``[..., 512]`` ->
    float64; dims 0:448 FP8 e4m3 with one UE8M0 scale per 64 dims, dims 448:512 rounded to BF16
    (nearest even)."""
    x = _f32_values("x", x)
    _check_last_dim("x", x, ENTRY_DIM)
    nope = _quant_dequant("x", x[..., :NOPE_DIM], NOPE_DIM, FP8_BLOCK, "fp8")
    return torch.cat((nope, x[..., NOPE_DIM:].to(torch.bfloat16).to(F64)), dim=-1)


def fp4_quant_dequant(x: torch.Tensor) -> torch.Tensor:
    """FP4 e2m1 quant-dequant of indexer keys or queries (docs/model.md sections 3-5): ``x``
    ``[..., 128]`` -> float64, one UE8M0 scale per 32 values."""
    return _quant_dequant("x", x, INDEX_DIM, FP4_BLOCK, "fp4")


def fp8_key_quant_dequant(x: torch.Tensor) -> torch.Tensor:
    """FP8 e4m3 quant-dequant of indexer keys in the FP8 alternative format (docs/model.md section 5):
    ``x`` ``[..., 128]`` -> float64, one power-of-two scale per key."""
    return _quant_dequant("x", x, INDEX_DIM, INDEX_DIM, "fp8")


def _hadamard_matrix() -> torch.Tensor:
    i = torch.arange(INDEX_DIM)
    both = i[:, None] & i[None, :]
    parity = sum((both >> bit) & 1 for bit in range(INDEX_DIM.bit_length() - 1)) % 2
    return (1 - 2 * parity).to(F64) * INDEX_DIM**-0.5


_HADAMARD = _hadamard_matrix()


def hadamard128(x: torch.Tensor) -> torch.Tensor:
    """Normalized Walsh-Hadamard transform of the last dim (docs/model.md sections 3-4): ``x``
    ``[..., 128]`` -> ``x @ H.T`` in float64, ``H[i][j] = (-1)^popcount(i & j) / sqrt(128)``
    (Sylvester order; ``H`` is symmetric and its own inverse)."""
    x = _float("x", x)
    _check_last_dim("x", x, INDEX_DIM)
    return x @ _HADAMARD.T


# ---------------------------------------------------------------------------------------------
# Cache bytes (docs/model.md section 5), the exact bytes of rust/core/src/quant.rs


def _le_bytes(values: torch.Tensor, width: int) -> torch.Tensor:
    """Little-endian bytes ``uint8 [..., width]`` of non-negative integers."""
    return torch.stack([(values >> (8 * i)) & 0xFF for i in range(width)], dim=-1).to(torch.uint8)


def encode_main_entries(x: torch.Tensor) -> torch.Tensor:
    """584-byte rows of KV entries ``x`` ``[N, 512]`` -> ``uint8 [N, 584]`` (docs/model.md section 5):
    448 FP8 e4m3 codes, 64 BF16 values little-endian (128 bytes), 7 UE8M0 scale bytes
    (``e + 127``, one per 64 FP8 values), 1 zero pad byte."""
    x = _f32_values("x", x)
    _check_shape("x", x, "N", ENTRY_DIM)
    codes, e = _quantize(x[:, :NOPE_DIM], FP8_BLOCK, "fp8")
    bf16_bits = x[:, NOPE_DIM:].to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
    scales = torch.cat((e + 127, torch.zeros(x.shape[0], 1, dtype=torch.int64)), dim=1).to(torch.uint8)
    return torch.cat((codes, _le_bytes(bf16_bits, 2).flatten(1), scales), dim=1)


def encode_index_keys(x: torch.Tensor, fmt: IndexKeyFormat = "fp4") -> torch.Tensor:
    """Indexer-key rows (docs/model.md section 5) of ``x`` ``[N, 128]``. ``"fp4"`` -> ``uint8 [N, 68]``:
    64 bytes of e2m1 nibbles (byte ``j`` = ``code[2j] | code[2j+1] << 4``), then 4 UE8M0 scale
    bytes (one per 32 values). ``"fp8"`` -> ``uint8 [N, 132]``: 128 e4m3 codes, then the scale
    ``2^e`` as a little-endian float32."""
    x = _f32_values("x", x)
    _check_shape("x", x, "N", INDEX_DIM)
    if fmt == "fp4":
        codes, e = _quantize(x, FP4_BLOCK, "fp4")
        return torch.cat((codes[:, 0::2] | (codes[:, 1::2] << 4), (e + 127).to(torch.uint8)), dim=1)
    if fmt == "fp8":
        codes, e = _quantize(x, INDEX_DIM, "fp8")
        float32_bits = (e + 127) << 23
        return torch.cat((codes, _le_bytes(float32_bits, 4).flatten(1)), dim=1)
    raise ValueError(f'fmt: expected "fp4" or "fp8", got {fmt!r}')


def pack_pages(rows_bytes: torch.Tensor, data_bytes: int) -> torch.Tensor:
    """FlashMLA page layout (docs/model.md section 5): ``uint8 [N, row_bytes]`` rows ->
    ``uint8 [ceil(N / 64), 64 * row_bytes]``. Each page holds 64 rows: first every row's leading
    ``data_bytes`` bytes, then every row's remaining (scale) bytes; rows beyond N are zero."""
    rows = _tensor("rows_bytes", rows_bytes)
    if rows.dtype != torch.uint8:
        raise TypeError(f"rows_bytes: expected a uint8 tensor, got {rows.dtype}")
    _check_shape("rows_bytes", rows, "N", "row_bytes")
    n, row_bytes = rows.shape
    data_bytes = _int("data_bytes", data_bytes, 0)
    if data_bytes > row_bytes:
        raise ValueError(f"data_bytes: must be <= row_bytes = {row_bytes}, got {data_bytes}")
    pages = -(-n // PAGE_ROWS)
    padded = torch.zeros(pages * PAGE_ROWS, row_bytes, dtype=torch.uint8)
    padded[:n] = rows
    padded = padded.unflatten(0, (pages, PAGE_ROWS))
    return torch.cat((padded[..., :data_bytes].flatten(1), padded[..., data_bytes:].flatten(1)), dim=1)


_DATA_BYTES = {
    NOPE_DIM + 2 * (ENTRY_DIM - NOPE_DIM) + 8: NOPE_DIM + 2 * (ENTRY_DIM - NOPE_DIM),  # main entry: 576 + 8
    INDEX_DIM // 2 + INDEX_DIM // FP4_BLOCK: INDEX_DIM // 2,  # FP4 key: 64 + 4
    INDEX_DIM + 4: INDEX_DIM,  # FP8 key: 128 + a float32 scale
}
"""Row bytes -> data bytes of the packed formats (:func:`encode_main_entries`, :func:`encode_index_keys`)."""


def _row_parts(cache: torch.Tensor) -> list[torch.Tensor]:
    """Views ``[pages, 64, bytes]`` of each part of every row: the data and the scales of a packed
    ``uint8`` cache (:func:`pack_pages`: a page holds its 64 rows' data, then their scales), the
    whole row of a plain ``[pages, 64, D]`` one."""
    flat = cache.view(torch.uint8).reshape(cache.shape[0], -1)
    if cache.dtype != torch.uint8:
        return [flat.unflatten(1, (PAGE_ROWS, -1))]
    data = _DATA_BYTES[cache.shape[1] // PAGE_ROWS]
    split = PAGE_ROWS * data
    return [flat[:, :split].unflatten(1, (PAGE_ROWS, data)), flat[:, split:].unflatten(1, (PAGE_ROWS, -1))]


def copy_rows(dst: torch.Tensor, dst_rows: torch.Tensor, src: torch.Tensor, src_rows: torch.Tensor) -> torch.Tensor:
    """The bytes ``dst`` holds after its rows ``dst_rows[i]`` take the bytes of ``src``'s rows
    ``src_rows[i]`` (a pair with ``-1`` on either side is skipped), in plain torch indexing:
    ``uint8``, the shape of ``dst`` viewed as bytes. Caches are paged: a 584-byte main entry
    (576 data bytes, 8 scale bytes), a 68-byte FP4 or 132-byte FP8 indexer key, or a plain row."""
    out = _tensor("dst", dst).clone()
    src_rows, dst_rows = _index("src_rows", src_rows), _index("dst_rows", dst_rows)
    keep = (dst_rows >= 0) & (src_rows >= 0)
    d, s = dst_rows[keep], src_rows[keep]
    for o, i in zip(_row_parts(out), _row_parts(_tensor("src", src))):
        o[d // PAGE_ROWS, d % PAGE_ROWS] = i[s // PAGE_ROWS, s % PAGE_ROWS]
    return out.view(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Quantized weights: the block-scaled FP8 / MXFP4 linear and the fused MoE (dsv4rs.ops.quant)

ACT_BLOCK = 128
"""Activation values sharing one UE8M0 scale when activations are quantized to FP8."""
FP8_WEIGHT_BLOCK = 128
"""Rows and columns of an FP8 weight sharing one float32 scale."""
MX_BLOCK = 32
"""Values of an MXFP4 weight sharing one UE8M0 code; the reduced dimension of a quantized weight is
a multiple of it."""

Act = Literal["fp8", "bf16"]


def _act(act: object) -> str:
    if not isinstance(act, str):
        raise TypeError(f"act: expected a str, got {type(act).__name__}")
    if act not in ("fp8", "bf16"):
        raise ValueError(f'act: expected "fp8" or "bf16", got {act!r}')
    return act


def quantize_activations(x: torch.Tensor, act: Act = "fp8") -> torch.Tensor:
    """``A(x)``, what the quantized ops multiply (float64, the shape of ``x``): ``x`` is first rounded to
    float32 (the kernels' type), then

    - ``act="fp8"``: the last dim is cut into blocks of 128 (the last one may be shorter); per block
      ``e = ue8m0_exponent(amax, 448)`` (amax floored at 1e-4) and each value ``v`` becomes
      ``fp8_e4m3_decode(fp8_e4m3_encode(v, e)) * 2^e`` (nearest even, saturating at 448). A block
      holding a non-finite value becomes NaN.
    - ``act="bf16"``: each value is rounded to bfloat16 (nearest even).
    """
    t = _tensor("x", x)
    if not t.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {t.dtype}")
    if t.dim() < 1:
        raise ValueError("x: expected at least one dim")
    t = t.to(torch.float32)
    if _act(act) == "bf16":
        return t.to(torch.bfloat16).to(F64)
    k = t.shape[-1]
    blocks = torch.nn.functional.pad(t.to(F64), (0, -k % ACT_BLOCK)).unflatten(-1, (-1, ACT_BLOCK))
    finite = blocks.isfinite()
    clean = blocks.where(finite, 0.0)
    e = ue8m0_exponent(clean.abs().amax(-1), FP8_MAX)
    values = fp8_e4m3_decode(fp8_e4m3_encode(clean, e[..., None])) * _exp2(e)[..., None]
    values = values.masked_fill(~finite.all(-1, keepdim=True), math.nan)
    return values.flatten(-2)[..., :k]


def _reduced_dim(name: str, cols: int, fp4: bool) -> int:
    k = 2 * cols if fp4 else cols
    if k == 0 or k % MX_BLOCK:
        raise ValueError(f"{name}: the reduced dimension K = {k} must be a positive multiple of {MX_BLOCK}")
    return k


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The values (``float64 [..., R, K]``) of a weight stored as DeepSeek ships it:

    - ``weight`` ``float8_e4m3fn [..., R, K]`` with ``scale`` ``float32 [..., ceil(R/128), ceil(K/128)]``:
      each code's value times the scale of its 128 x 128 block (the last blocks may be partial);
    - ``weight`` ``uint8 [..., R, K/2]`` (MXFP4, two e2m1 codes per byte, even index in the low nibble)
      with ``scale`` ``uint8 [..., R, K/32]`` UE8M0 codes: each value times ``2^(code - 127)``, code
      255 being NaN.

    ``K`` must be a positive multiple of 32.
    """
    w, s = _tensor("weight", weight), _tensor("scale", scale)
    if w.dtype not in (torch.float8_e4m3fn, torch.uint8):
        raise TypeError(f"weight: expected float8_e4m3fn (FP8) or uint8 (MXFP4), got {w.dtype}")
    fp4 = w.dtype == torch.uint8
    want_dtype = torch.uint8 if fp4 else torch.float32
    if s.dtype != want_dtype:
        raise TypeError(f"scale: expected {want_dtype} for a {w.dtype} weight, got {s.dtype}")
    if w.dim() < 2:
        raise ValueError(f"weight: expected [..., R, K], got {list(w.shape)}")
    *lead, rows, cols = w.shape
    k = _reduced_dim("weight", cols, fp4)
    if fp4:
        want = (*lead, rows, k // MX_BLOCK)
    else:
        want = (*lead, -(-rows // FP8_WEIGHT_BLOCK), -(-k // FP8_WEIGHT_BLOCK))
    if tuple(s.shape) != want:
        raise ValueError(f"scale: expected shape {list(want)} for a weight of shape {list(w.shape)}, got {list(s.shape)}")
    if fp4:
        values = fp4_e2m1_decode(torch.stack((w & 0xF, w >> 4), -1).flatten(-2))
        factors = _exp2(s.to(torch.int64) - 127).masked_fill(s == 255, math.nan)
        return values * factors.repeat_interleave(MX_BLOCK, -1)
    factors = s.to(F64).repeat_interleave(FP8_WEIGHT_BLOCK, -2)[..., :rows, :]
    return fp8_e4m3_decode(w.view(torch.uint8)) * factors.repeat_interleave(FP8_WEIGHT_BLOCK, -1)[..., :k]


def quant_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, groups: int = 1, act: Act = "fp8"
                 ) -> torch.Tensor:
    """``A(x) W^T`` in float64 (:func:`quantize_activations`, :func:`dequantize_weight`), the twin of
    ``dsv4rs.ops.quant_linear``: ``x [..., K]`` -> ``[..., R]`` for ``groups == 1``; for ``groups = g``
    (dividing ``R``, ``N = R / g``), ``x [..., g, K]``, group ``i`` meeting rows ``[i N, (i + 1) N)``
    -> ``[..., g N]`` (group-major columns). Only the activation rounding is modelled: the products
    and their sum are exact float64."""
    w = dequantize_weight(weight, scale)
    if w.dim() != 2:
        raise ValueError(f"weight: expected [R, K], got {list(w.shape)}")
    rows, k = w.shape
    groups = _int("groups", groups, 1)
    if rows % groups:
        raise ValueError(f"groups: must divide the {rows} rows of weight, got {groups}")
    want = (k,) if groups == 1 else (groups, k)
    xt = _tensor("x", x)
    if xt.dim() < len(want) or tuple(xt.shape[-len(want):]) != want:
        raise ValueError(f"x: expected shape [..., {', '.join(map(str, want))}], got {list(xt.shape)}")
    a = quantize_activations(xt, act)
    if groups == 1:
        return a @ w.T
    return torch.einsum("...gk,gnk->...gn", a, w.view(groups, rows // groups, k)).flatten(-2)


def moe_experts(
    x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, gate_up_scale: torch.Tensor,
    down: torch.Tensor, down_scale: torch.Tensor, limit: float, act: Act = "fp8",
) -> torch.Tensor:
    """The routed experts in float64, the twin of ``dsv4rs.ops.moe_experts``: for each token ``t`` and
    choice ``j``, ``e = idx[t, j]``, ``g, u = A(x_t) W_gate[e]^T, A(x_t) W_up[e]^T`` (``gate_up`` rows
    ``0..I`` and ``I..2I``), ``h = silu(min(g, limit)) * clamp(u, -limit, limit)``,
    ``y = A(h) W_down[e]^T``, and ``out[t] = sum_j weights[t, j] y`` (``float64 [T, d]``).

    ``A`` is :func:`quantize_activations` (``h`` rounded to float32 first, as the kernels hold it);
    where ``x`` is bfloat16, ``y`` is rounded to bfloat16 (through float32), as the op holds it;
    the weights are :func:`dequantize_weight`'s; everything else is exact float64. ``idx``
    (``[T, k]``, any integer dtype) must lie in ``[0, E)``; ``limit > 0`` (``math.inf``: no clamp).
    """
    wgu, wd = dequantize_weight(gate_up, gate_up_scale), dequantize_weight(down, down_scale)
    if wgu.dim() != 3 or wgu.shape[1] % 2:
        raise ValueError(f"gate_up: expected [E, 2I, d] values, got {list(wgu.shape)}")
    experts, inter, dim = wgu.shape[0], wgu.shape[1] // 2, wgu.shape[2]
    if tuple(wd.shape) != (experts, dim, inter):
        raise ValueError(f"down: expected [E, d, I] = {[experts, dim, inter]} values, got {list(wd.shape)}")
    xt = _tensor("x", x)
    _check_shape("x", xt, "T", dim)
    ids = _index("idx", idx)
    _check_shape("idx", ids, xt.shape[0], "k")
    if ((ids < 0) | (ids >= experts)).any():
        raise ValueError(f"idx: expert ids must lie in [0, {experts})")
    w = _float("weights", weights)
    _check_shape("weights", w, *ids.shape)
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise TypeError(f"limit: expected a number, got {type(limit).__name__}")
    if math.isnan(limit) or limit <= 0:
        raise ValueError(f"limit: must be > 0, got {limit}")
    a = quantize_activations(xt, act)
    y = torch.zeros(*ids.shape, dim, dtype=F64)
    for e in ids.unique().tolist():
        t, j = (ids == e).nonzero(as_tuple=True)
        gu = a[t] @ wgu[e].T
        g, u = gu[:, :inter].clamp(max=limit), gu[:, inter:].clamp(-limit, limit)
        y[t, j] = quantize_activations(g / (1 + torch.exp(-g)) * u, act) @ wd[e].T
    if xt.dtype == torch.bfloat16:
        y = y.float().bfloat16().double()
    return (w[..., None] * y).sum(1)


def moe_route(logits: torch.Tensor, k: int, scale: float = 1.0, bias: torch.Tensor | None = None,
              table: torch.Tensor | None = None, ids: torch.Tensor | None = None, norm: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The twin of ``dsv4rs.ops.moe_route`` in float64 (docs/model.md section 7):
    ``a = sqrt(softplus(logits))`` (``x`` itself above 20, as torch's); the ``k`` experts of
    largest ``a + bias`` (descending, ties to the lower expert) or ``table[ids]``; weights
    ``a[idx]``, divided by their sum ``+ 1e-20`` when ``norm``, times ``scale``. Returns
    ``(idx int64 [T, k], w float64 [T, k])``. Logits must be finite; ids must index ``table``'s
    rows and its entries lie in ``[0, E)``."""
    x = _float("logits", logits)
    _check_shape("logits", x, "T", "E")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("logits: must be finite")
    experts = x.shape[1]
    k = _int("k", k, 1)
    if k > experts:
        raise ValueError(f"k: must be <= {experts} (the experts), got {k}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale!r}")
    a = torch.where(x > 20, x, torch.log1p(torch.exp(x))).sqrt()
    if (bias is None) == (table is None) or (table is None) != (ids is None):
        raise ValueError("bias: give either bias (a learned layer) or table and ids (a hash layer)")
    if bias is not None:
        b = _float("bias", bias)
        _check_shape("bias", b, experts)
        s = (a + b).tolist()
        idx = torch.tensor([sorted(range(experts), key=lambda e, r=r: (-r[e], e))[:k] for r in s], dtype=torch.int64)
        idx = idx.view(x.shape[0], k)
    else:
        tab, tok = _index("table", table), _index("ids", ids)
        _check_shape("table", tab, "V", k)
        _check_shape("ids", tok, x.shape[0])
        if ((tok < 0) | (tok >= tab.shape[0])).any():
            raise ValueError(f"ids: must lie in [0, {tab.shape[0]}) (the table's rows)")
        if ((tab < 0) | (tab >= experts)).any():
            raise ValueError(f"table: entries must lie in [0, {experts})")
        idx = tab[tok]
    w = a.gather(1, idx)
    if norm:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return idx, w * scale


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float = math.inf) -> torch.Tensor:
    """The twin of ``dsv4rs.ops.swiglu`` in float64: ``silu(min(gate, limit)) * clamp(up, -limit,
    limit)`` with ``silu(x) = x / (1 + e^-x)``."""
    g, u = _float("gate", gate), _float("up", up)
    if g.shape != u.shape:
        raise ValueError(f"up: expected shape {list(g.shape)}, got {list(u.shape)}")
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or math.isnan(limit) or limit <= 0:
        raise ValueError(f"limit: expected a number > 0, got {limit!r}")
    g, u = g.clamp(max=limit), u.clamp(-limit, limit)
    return g / (1 + torch.exp(-g)) * u


def step_rows(positions: torch.Tensor, token_seq: torch.Tensor, origins: torch.Tensor,
              window_table: torch.Tensor | None = None, window: int = 0, hca_table: torch.Tensor | None = None,
              hca_ratio: int = 1, hca_width: int = 0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The twin of ``dsv4rs.ops.step_rows`` in torch's int64 tensor ops (the form the runtime's
    planner ran before the op): a decode step's window rows in the ring and HCA rows, ``-1`` where
    a token sees none or its batch row is outside ``[0, B)``. Runs on the inputs' device."""
    pos, seq, orig = _index("positions", positions), _index("token_seq", token_seq), _index("origins", origins)
    _check_shape("positions", pos, "T")
    _check_shape("token_seq", seq, pos.shape[0])
    _check_shape("origins", orig, "B")
    batch, page = orig.shape[0], PAGE_ROWS
    known = (seq >= 0) & (seq < batch)
    b = seq.clamp(0, max(batch - 1, 0))
    rows = hca = None
    if window_table is not None:
        window = _int("window", window, 1)
        table = _index("window_table", window_table)
        _check_shape("window_table", table, batch, "P")
        if table.shape[1] * page < window:
            raise ValueError(f"window_table: {table.shape[1]} pages hold fewer than the window's {window} rows")
        p = pos[:, None] - window + 1 + torch.arange(window, device=pos.device)
        if batch:
            valid = known[:, None] & (p >= orig[b][:, None])
            r = p.clamp(min=0) % window
            rows = torch.where(valid, table[b[:, None], r // page] * page + r % page, -1)
        else:
            rows = torch.full_like(p, -1)
    if hca_table is not None:
        ratio, width = _int("hca_ratio", hca_ratio, 1), _int("hca_width", hca_width, 0)
        table = _index("hca_table", hca_table)
        _check_shape("hca_table", table, batch, "P")
        if table.shape[1] < 1:
            raise ValueError("hca_table: expected at least one page a sequence, got 0")
        if width > table.shape[1] * page:
            raise ValueError(f"hca_width: expected at most the table's {table.shape[1] * page} rows, got {width}")
        k = torch.arange(width, device=pos.device)
        if batch:
            found = table[b[:, None], k // page] * page + k % page
            hca = torch.where(known[:, None] & (k < ((pos + 1) // ratio)[:, None]), found, -1)
        else:
            hca = torch.full((pos.shape[0], width), -1, dtype=torch.int64, device=pos.device)
    return rows, hca
