"""The quantized-weight ops, ``ops.quant_linear`` (FP8 block-scaled or MXFP4 weights) and
``ops.moe_experts`` (the fused MoE over MXFP4 experts), against their float64 reference on the CPU
and (marked ``gpu``) on the GPU, plus bad input, CUDA-graph capture and the absence of host syncs.

Where the two sides round differently, and the bounds the comparisons use:

- Both sides quantize the activations ``A(x)`` of the same float32 (or bfloat16) input with the
  same rule, and the weights' values (an FP8 or e2m1 code times its scale) are exact in float32
  products; so for the linear only the sum differs: a float32 sum of ``K`` products, in any
  order, lies within ``(K - 1) u * sum |a w|`` of the exact one (``u = 2^-24``); ``gamma`` adds a
  few roundings of slack (a non-power-of-two FP8 scale applied to a partial sum). A bfloat16
  output adds its own rounding, ``2^-8`` relative.
- In the MoE, ``h`` is computed from float32 ``g`` and ``u``, which differ from the float64 ones
  by the bound above; ``A(h)`` can then land one FP8 (or bf16) step away where ``h`` sits near a
  rounding boundary, or take the neighbouring block scale where the block's amax sits near a power
  of two. ``moe_bound`` propagates the bound on ``g`` and ``u`` to a bound ``dh`` on ``h`` and allows,
  per element, exactly the spread of ``A`` over ``[h - dh, h + dh]`` (zero for almost every element),
  then the float32 sums of the down projection (where ``x`` is bfloat16, ``y`` is rounded to
  bfloat16 on both sides, each by up to half a bfloat16 step) and of the combine.
- On GPUs of compute capability 8.9 and later the decode form of ``act="fp8"`` sums each 32-wide
  K slice of exact products with one FP8 ``mma`` instruction; where it is native (sm_89, sm_120)
  the FP8 accumulator keeps fewer bits than float32 (about 13 fraction bits, truncating:
  DeepSeek-V3's report, section 3.3.2; on sm_90 and sm_100 the compiler makes it f16 products
  summed in float32). A sum of 32 terms with a unit roundoff of ``2^-13`` lies within
  ``gamma_31(2^-13)`` times the sum of their magnitudes of the exact one (also if every product is
  first truncated at the slice's largest exponent), so those tests add ``SLICE`` times the same
  magnitudes to the bound, and run again with ``DSV4RS_QGEMM_KERNEL=bf16`` under the float32
  bound alone.
- On compute capability 9.0 the tiled form of ``act="fp8"`` over FP8 weights (many rows per
  weight) runs on the FP8 tensor cores too: each 128-wide K step's exact products are summed by
  four such instructions into one partial (33 operands each past the first, each truncated below
  the largest operand's 13th fraction bit), which is then scaled and added in float32, as
  DeepSeek's FP8 GEMMs promote theirs. That partial lies within ``STEP = gamma_131(2^-13)`` times
  its products' magnitudes of the exact sum, so the tests of FP8 weights there add ``STEP``
  times the magnitudes (MXFP4 weights keep ``SLICE``: their tiled form sums in float32).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from dsv4rs import _core, ops
from dsv4rs import reference as ref
from profiled import kernel_launches, launched_kernels

U = 2.0**-24
"""float32's unit roundoff."""
BF16_U = 2.0**-8
"""bfloat16's unit roundoff: a bfloat16 rounding moves a value by at most this fraction of it."""


SLICE = 31 * 2.0**-13 / (1 - 31 * 2.0**-13)
"""Bound on one 32-product slice summed by an FP8 tensor core, relative to the sum of their magnitudes."""


STEP = 131 * 2.0**-13 / (1 - 131 * 2.0**-13)
"""Bound on one 128-product K step summed by four chained FP8 tensor-core instructions (the Hopper
tiled form), relative to the sum of their magnitudes."""


def gamma(n: int) -> float:
    """Bound on a float32 sum of ``n`` products, relative to the sum of their magnitudes."""
    return (n + 4) * U


def assert_within(got: torch.Tensor, want: torch.Tensor, tol: torch.Tensor, what: str = "") -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    err = (got.detach().double().cpu() - want).abs()
    bad = ~(err <= tol)
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        worst = float(((err - tol) / tol.clamp_min(1e-300)).max())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} values out of bound; first at flat index {i}: "
            f"got {float(got.flatten()[i])}, want {float(want.flatten()[i])}, bound {float(tol.flatten()[i])} "
            f"(worst excess {worst:.3g} x bound)")


# ---------------------------------------------------------------------------------------------
# Inputs


def fp8_weight(gen: torch.Generator, rows: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 codes of a normal spread and float32 block scales that are not powers of two (as
    ``weight_scale_inv`` scales can be)."""
    w = (torch.randn(rows, k, generator=gen) * 32).clamp(-448, 448).to(torch.float8_e4m3fn)
    shape = (-(-rows // 128), -(-k // 128))
    scale = torch.exp2(torch.randint(-10, -4, shape, generator=gen).float()) * (1 + torch.rand(shape, generator=gen))
    return w, scale


def fp4_weight(gen: torch.Generator, *shape: int, low: int = 118, high: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 bytes (every byte value) for values ``shape = [..., rows, k]`` and UE8M0 codes in
    ``[low, high)``."""
    *lead, rows, k = shape
    data = torch.randint(0, 256, (*lead, rows, k // 2), dtype=torch.uint8, generator=gen)
    scale = torch.randint(low, high, (*lead, rows, k // 32), dtype=torch.uint8, generator=gen)
    return data, scale


def activations(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32, decades: float = 4.0
                ) -> torch.Tensor:
    """Normal values whose magnitude changes by up to ``decades`` powers of ten from one run of 32
    values to the next: each 128-block's scale is set by its largest run, and a wrong block size
    would pick other scales for the small values."""
    k = shape[-1]
    x = torch.randn(*shape, generator=gen)
    mag = 10 ** (torch.rand(*shape[:-1], -(-k // 32), generator=gen) * decades - decades / 2)
    return (x * mag.repeat_interleave(32, -1)[..., :k]).to(dtype)


# ---------------------------------------------------------------------------------------------
# Bounds


def linear_bound(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, groups: int, act: str,
                 slice_: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 reference and the bound on ``|op - reference|`` of ``quant_linear`` (``slice_``: the
    relative bound of a tensor-core slice sum, module docstring)."""
    want = ref.quant_linear(x, weight, scale, groups, act)
    a = ref.quantize_activations(x, act).abs()
    w = ref.dequantize_weight(weight, scale).abs()
    rows, k = w.shape
    if groups == 1:
        mag = a @ w.T
    else:
        mag = torch.einsum("...gk,gnk->...gn", a, w.view(groups, rows // groups, k)).flatten(-2)
    if slice_ == STEP and (weight.dtype == torch.uint8 or not takes_tiled_form(a.numel() // (groups * k), k)):
        slice_ = SLICE  # MXFP4 weights have no FP8 tiled form, and a decode form runs this call
    elif slice_ == STEP and not fp8_tiled_rows(rows, groups):
        slice_ = 0.0  # the tiled form on bf16 tensor cores runs this call: float32 sums
    tol = (gamma(k) + slice_) * mag
    if x.dtype == torch.bfloat16:
        tol = tol * (1 + BF16_U) + BF16_U * want.abs()
    return want, tol


def takes_tiled_form(m: int, k: int) -> bool:
    """Whether a dense call of ``m`` rows per weight takes a tiled form (rust/core/src/gpu/qgemm.rs
    ``plan_linear``: the decode forms take up to 16 rows, and up to 64 for K of 2048 or more)."""
    return m > 64 or (m > 16 and k < 2048)


def fp8_tiled_rows(rows: int, groups: int) -> bool:
    """Whether FP8 weights of ``rows`` rows in ``groups`` groups may take the Hopper tiled form on
    FP8 tensor cores (rust/core/src/gpu/qgemm.rs ``tiled_form``: one group, or groups of a multiple
    of 64 rows); other tiled calls run it on bf16 tensor cores."""
    return groups == 1 or (rows // groups) % 64 == 0


def act_spread(h: torch.Tensor, dh: torch.Tensor, act: str) -> torch.Tensor:
    """The largest ``|A(h') - A(h)|`` over float32 vectors ``h'`` with ``|h' - h| <= dh`` elementwise
    (``[..., I]``). ``A`` is monotone in each value for a fixed block scale, and the scale exponent is
    monotone in the block's amax, so the extremes lie at ``h -+ dh`` under one of the exponents from
    that of the smallest amax to that of the largest (almost always one or two)."""
    center = ref.quantize_activations(h, act)
    if act == "bf16":
        ends = [ref.quantize_activations(h - dh, act), ref.quantize_activations(h + dh, act)]
        return torch.stack([(e - center).abs() for e in ends]).amax(0)
    k = h.shape[-1]

    def blocks(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, -k % 128)).unflatten(-1, (-1, 128))

    lo = ref.ue8m0_exponent(blocks((h.abs() - dh).clamp(min=0)).amax(-1), ref.FP8_MAX)
    hi = ref.ue8m0_exponent(blocks(h.abs() + dh).amax(-1), ref.FP8_MAX)
    spread = torch.zeros_like(h)
    for step in range(int((hi - lo).max()) + 1 if h.numel() else 0):
        e = (lo + step).clamp(max=hi)
        for v in (h - dh, h + dh):
            q = ref.fp8_e4m3_decode(ref.fp8_e4m3_encode(blocks(v), e[..., None])) * torch.exp2(e.double())[..., None]
            spread = torch.maximum(spread, (q.flatten(-2)[..., :k] - center).abs())
    return spread


def moe_bound(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
              gate_up_scale: torch.Tensor, down: torch.Tensor, down_scale: torch.Tensor, limit: float, act: str,
              slice_: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 reference and the bound on ``|op - reference|`` of ``moe_experts`` (module docstring)."""
    want = ref.moe_experts(x, idx, weights, gate_up, gate_up_scale, down, down_scale, limit, act)
    if slice_ == STEP:
        slice_ = SLICE  # MXFP4 experts: no FP8 tiled form (module docstring)
    a = ref.quantize_activations(x, act)
    wgu, wd = ref.dequantize_weight(gate_up, gate_up_scale), ref.dequantize_weight(down, down_scale)
    inter, dim = wgu.shape[1] // 2, wgu.shape[2]
    ids = idx.long()
    y_tol = torch.zeros(*ids.shape, dim, dtype=torch.float64)
    y_mag, y_mid = torch.zeros_like(y_tol), torch.zeros_like(y_tol)
    for e in ids.unique().tolist():
        t, j = (ids == e).nonzero(as_tuple=True)
        gu = a[t] @ wgu[e].T
        dgu = (gamma(dim) + slice_) * (a[t].abs() @ wgu[e].abs().T)
        g, u = gu[:, :inter].clamp(max=limit), gu[:, inter:].clamp(-limit, limit)
        dg, du = dgu[:, :inter], dgu[:, inter:]
        s = g / (1 + torch.exp(-g))
        h = s * u
        # silu' lies in [-0.1, 1.1]; min and clamp move nothing more than their input moved; the
        # float32 evaluation of silu and of the product adds a few roundings (2^-16 relative also
        # covers a fast-math exp on the GPU).
        dh = 1.1 * dg * (u.abs() + du) + s.abs() * du + 2.0**-16 * h.abs() + 1e-30
        spread = act_spread(h, dh, act)
        mag = (ref.quantize_activations(h, act).abs() + spread) @ wd[e].abs().T
        y_mag[t, j] = mag
        y_tol[t, j] = spread @ wd[e].abs().T + (gamma(inter) + slice_) * mag
        y_mid[t, j] = ref.quantize_activations(h, act) @ wd[e].T
    if x.dtype == torch.bfloat16:
        # y rounded to bfloat16 on both sides, each rounding by at most half a step at |y| + y_tol:
        # the two lie within y_tol plus one step. (Allowing only the roundings of y -+ y_tol
        # would take y_tol as exact, which the tensor cores' sums, truncated rather than rounded,
        # need not keep: that failed on one value in 358,400.)
        step = torch.exp2(torch.floor(torch.log2(y_mid.abs() + y_tol)) - 7)
        y_tol = y_tol + step
        y_mag = y_mid.abs() + y_tol
    w = weights.double().abs()[..., None]
    tol = (w * y_tol).sum(1) + gamma(ids.shape[1]) * (w * y_mag).sum(1)
    if x.dtype == torch.bfloat16:
        tol = tol * (1 + BF16_U) + BF16_U * want.abs()
    return want, tol


# ---------------------------------------------------------------------------------------------
# quant_linear on the CPU

# (fp4, leading dims of x, R, K, groups)
LINEAR_CASES = [
    (False, (3,), 130, 160, 1),  # R and K one past a 128-block: partial blocks both ways
    (False, (2, 5), 256, 96, 1),  # K < 128, two leading dims
    (False, (4,), 260, 224, 2),  # groups: the boundary at row 130 lies inside scale block 1
    (True, (3,), 37, 224, 1),
    (True, (1,), 12, 32, 3),  # K = 32: one MXFP4 block per row
    (True, (2, 3), 64, 288, 4),
    # More than 16 rows: the GPU's tiled form (up to 16, its decode form); on Hopper, K a multiple
    # of 128 takes its wgmma form: row tiles of 128 (the last partial), weight rows past a 128-row
    # block (and, grouped, a group boundary inside one).
    (False, (40,), 130, 160, 1),
    (True, (20,), 64, 288, 2),
    (False, (150,), 200, 384, 1),
    (False, (40,), 260, 256, 2),
    (True, (130,), 64, 384, 2),
]


def linear_inputs(gen: torch.Generator, case: tuple, dtype: torch.dtype):
    fp4, lead, rows, k, groups = case
    weight, scale = fp4_weight(gen, rows, k) if fp4 else fp8_weight(gen, rows, k)
    x = activations(gen, *lead, *((groups,) if groups > 1 else ()), k, dtype=dtype)
    return x, weight, scale, groups


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: f"{'fp4' if c[0] else 'fp8'}-{c[2]}x{c[3]}-g{c[4]}")
@pytest.mark.parametrize("act", ["fp8", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_quant_linear_matches_reference(gen: torch.Generator, case: tuple, act: str, dtype: torch.dtype) -> None:
    x, weight, scale, groups = linear_inputs(gen, case, dtype)
    got = ops.quant_linear(x, weight, scale, groups=groups, act=act)
    lead = x.shape[:-1] if groups == 1 else x.shape[:-2]
    assert got.dtype == dtype and got.shape == (*lead, case[2])
    want, tol = linear_bound(x, weight, scale, groups, act)
    assert_within(got, want, tol, "cpu")
    if dtype == torch.float32:
        # The bound is tight: far below the activation rounding itself (2^-5 relative for FP8).
        assert float(tol.mean()) < 1e-3 * float(want.abs().mean())


def test_quant_linear_rounds_activations_per_128_block() -> None:
    """Scales are per 128-block: 0.013 next to 300 (scale 2^0) falls among the FP8 subnormals and
    becomes 7 * 2^-9; in the next block, its own amax, it gets scale 2^-15 and becomes 416 * 2^-15."""
    k = 160
    w = torch.zeros(2, k)
    w[0, 100] = 1.0
    w[1, 129] = 1.0
    scale = torch.ones(1, 2)
    x = torch.zeros(1, k)
    x[0, 0], x[0, 100], x[0, 129] = 300.0, 0.013, 0.013
    got = ops.quant_linear(x, w.to(torch.float8_e4m3fn), scale)
    assert got.tolist() == [[7 * 2**-9, 416 * 2**-15]]
    assert torch.equal(got, ref.quant_linear(x, w.to(torch.float8_e4m3fn), scale).float())
    got = ops.quant_linear(x, w.to(torch.float8_e4m3fn), scale, act="bf16")
    assert torch.equal(got, torch.tensor([[0.013, 0.013]]).bfloat16().float())


def test_quant_linear_without_tokens(gen: torch.Generator) -> None:
    weight, scale = fp4_weight(gen, 64, 96)
    assert ops.quant_linear(torch.zeros(0, 96), weight, scale).shape == (0, 64)
    assert ops.quant_linear(torch.zeros(2, 0, 4, 96, dtype=torch.bfloat16), weight, scale, groups=4).shape == (2, 0, 64)


def test_quant_linear_opcheck(gen: torch.Generator) -> None:
    x, weight, scale, _ = linear_inputs(gen, LINEAR_CASES[3], torch.float32)
    torch.library.opcheck(torch.ops.dsv4rs.quant_linear.default, (x, weight, scale, 1, "fp8", False))
    x, weight, scale, _ = linear_inputs(gen, LINEAR_CASES[2], torch.bfloat16)
    # test_schema compares inputs before and after with allclose, which torch lacks for float8.
    torch.library.opcheck(torch.ops.dsv4rs.quant_linear.default, (x, weight, scale, 2, "bf16", False),
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


# ---------------------------------------------------------------------------------------------
# moe_experts on the CPU

# name: (T, k, E, I, d, routing, limit); routing: "some" draws ids below E - 1 (the last expert
# holds no token), "one" puts every pair on expert 1, "all" draws from every expert.
MOE_CASES = {
    "idle-expert": (9, 2, 4, 64, 96, "some", 1.0),
    "one-expert": (11, 1, 3, 32, 64, "one", 0.5),
    "top3-partial-blocks": (6, 3, 5, 160, 160, "all", math.inf),  # I and d one block past 128, no clamp
    "k1": (5, 1, 2, 32, 32, "all", 2.0),
}


def moe_grid(fn):
    """Parametrizes a MoE test (CPU and GPU alike) over the cases, both activation roundings, the
    dtype of x and the dtype of the ids."""
    for mark in (pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32], ids=["i64", "i32"]),
                 pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"]),
                 pytest.mark.parametrize("act", ["fp8", "bf16"]),
                 pytest.mark.parametrize("case", sorted(MOE_CASES))):
        fn = mark(fn)
    return fn


def moe_inputs(gen: torch.Generator, case: str, dtype: torch.dtype, idx_dtype: torch.dtype):
    t, k, e, inter, d, routing, limit = MOE_CASES[case]
    x = activations(gen, t, d, dtype=dtype, decades=2.0)
    if routing == "one":
        idx = torch.ones(t, k, dtype=idx_dtype)
    else:
        idx = torch.randint(0, e - 1 if routing == "some" else e, (t, k), generator=gen).to(idx_dtype)
    weights = torch.rand(t, k, generator=gen) + 0.1
    # Scales 2^-13 .. 2^-4 keep g and u near the clamps, on both sides of them.
    gate_up, gate_up_scale = fp4_weight(gen, e, 2 * inter, d, low=114, high=124)
    down, down_scale = fp4_weight(gen, e, d, inter, low=114, high=124)
    return (x, idx, weights, gate_up, gate_up_scale, down, down_scale), limit


@moe_grid
def test_moe_experts_matches_reference(gen: torch.Generator, case: str, act: str, dtype: torch.dtype,
                                       idx_dtype: torch.dtype) -> None:
    args, limit = moe_inputs(gen, case, dtype, idx_dtype)
    got = ops.moe_experts(*args, limit, act=act)
    assert got.dtype == dtype and got.shape == args[0].shape
    want, tol = moe_bound(*args, limit, act)
    assert_within(got, want, tol, "cpu")
    if dtype == torch.float32:
        # Worst-case float32 sums flag a few percent of h as near a rounding boundary; the bound
        # still stays well below moving every value of A(h) by one FP8 step (2^-4 relative).
        assert float(tol.mean()) < 2**-5 * float(want.abs().mean())


def test_moe_experts_clamps_and_weighs_as_stated(gen: torch.Generator) -> None:
    """Exact small case: one expert whose gate and up rows pick single inputs, so that the clamped
    SwiGLU and the weighted combine can be checked by hand."""
    e, inter, d = 2, 32, 32
    # code 2 = 1.0 in the low nibble (even index); UE8M0 127 = 1.
    gate_up = torch.zeros(e, 2 * inter, d // 2, dtype=torch.uint8)
    gate_up[1, 0, 0] = 0x02  # g_0 = x_0
    gate_up[1, inter, 0] = 0x20  # u_0 = x_1
    down = torch.zeros(e, d, inter // 2, dtype=torch.uint8)
    down[1, 5, 0] = 0x02  # y_5 = h_0
    ones = torch.full((e, 2 * inter, 1), 127, dtype=torch.uint8), torch.full((e, d, 1), 127, dtype=torch.uint8)
    x = torch.zeros(2, d)
    x[0, :2] = torch.tensor([3.0, -5.0])  # g clamped to 2, u to -2
    x[1, :2] = torch.tensor([-1.0, 0.5])  # neither clamped
    idx = torch.tensor([[1, 1], [1, 0]])
    weights = torch.tensor([[0.25, 0.5], [2.0, 7.0]])
    out = ops.moe_experts(x, idx, weights, gate_up, ones[0], down, ones[1], 2.0, act="bf16")
    silu = lambda v: v / (1 + math.exp(-v))  # noqa: E731
    h0 = torch.tensor(silu(2.0) * -2.0).bfloat16().item()
    h1 = torch.tensor(silu(-1.0) * 0.5).bfloat16().item()
    want = torch.zeros(2, d)
    want[0, 5], want[1, 5] = 0.75 * h0, 2.0 * h1
    torch.testing.assert_close(out, want, rtol=2e-7, atol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_moe_experts_round_y_to_bfloat16_where_x_is(device: str, dtype: torch.dtype) -> None:
    """Exact case: two experts with the same h (one gate and one up row picking single inputs),
    whose down rows give ``y_5 = h (1 + 2^-9)`` (two scale blocks: 1 on ``h_0``, 2^-9 on ``h_32``,
    the same value) and ``y_5 = -h``. A token on both, weights 1: ``out_5 = h 2^-9`` with ``y`` in
    float32, but 0 once each ``y`` is rounded to bfloat16 (``h (1 + 2^-9)`` rounds to ``h``), which
    the op does where ``x`` is bfloat16, on every device."""
    e, inter, d = 2, 64, 32
    gate_up = torch.zeros(e, 2 * inter, d // 2, dtype=torch.uint8)
    gate_up[:, 0, 0] = gate_up[:, 32, 0] = 0x02  # g_0 = g_32 = x_0 (code 2 = 1.0, low nibble: even index)
    gate_up[:, inter, 0] = gate_up[:, inter + 32, 0] = 0x20  # u_0 = u_32 = x_1
    down = torch.zeros(e, d, inter // 2, dtype=torch.uint8)
    down[0, 5, 0], down[0, 5, 16] = 0x02, 0x02  # y_5 = h_0 + h_32 2^-9 (its second block's scale)
    down[1, 5, 0] = 0x0A  # y_5 = -h_0 (code 10 = -1.0)
    down_scale = torch.full((e, d, 2), 127, dtype=torch.uint8)
    down_scale[0, 5, 1] = 127 - 9
    x = torch.zeros(1, d, dtype=dtype)
    x[0, :2] = torch.tensor([1.5, 0.75])
    idx, weights = torch.tensor([[0, 1]]), torch.ones(1, 2)
    args = [x, idx, weights, gate_up, torch.full((e, 2 * inter, 1), 127, dtype=torch.uint8), down, down_scale]
    out = ops.moe_experts(*[a.to(device) for a in args], math.inf, act="bf16").cpu()
    h = torch.tensor(1.5 / (1 + math.exp(-1.5)) * 0.75).bfloat16().item()
    want = torch.zeros(1, d, dtype=dtype)
    want[0, 5] = 0.0 if dtype == torch.bfloat16 else h * 2.0**-9
    assert out.dtype == dtype
    torch.testing.assert_close(out, want, rtol=2e-6, atol=0)


@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_moe_experts_pairs_of_no_expert_add_nothing(gen: torch.Generator, idx_dtype: torch.dtype) -> None:
    """An id of -1 is no expert (an expert-parallel rank's pairs for experts it does not hold): the
    call equals the same call with those pairs pointed at an expert and weighted zero, bit for bit,
    and a token with no expert gets zeros."""
    (x, idx, weights, *w), limit = moe_inputs(gen, "idle-expert", torch.float32, idx_dtype)
    none = torch.zeros(idx.shape, dtype=torch.bool)
    none[[0, 3, 5], [1, 0, 1]] = True
    none[8] = True
    got = ops.moe_experts(x, idx.masked_fill(none, -1), weights, *w, limit)
    want = ops.moe_experts(x, idx.masked_fill(none, 0), weights.masked_fill(none, 0.0), *w, limit)
    assert torch.equal(got, want)
    assert torch.equal(got[8], torch.zeros(x.shape[1]))


def test_moe_experts_without_tokens(gen: torch.Generator) -> None:
    (x, idx, weights, *w), limit = moe_inputs(gen, "idle-expert", torch.float32, torch.int64)
    out = ops.moe_experts(x[:0], idx[:0], weights[:0], *w, limit)
    assert out.shape == (0, x.shape[1]) and out.dtype == torch.float32


def test_moe_experts_opcheck(gen: torch.Generator) -> None:
    args, limit = moe_inputs(gen, "idle-expert", torch.float32, torch.int32)
    torch.library.opcheck(torch.ops.dsv4rs.moe_experts.default, (*args, limit, "fp8", False))
    args, _ = moe_inputs(gen, "k1", torch.bfloat16, torch.int64)
    torch.library.opcheck(torch.ops.dsv4rs.moe_experts.default, (*args, math.inf, "bf16", False))


@pytest.mark.parametrize("shape,fp8", [((128, 64), False), ((3, 128, 128), False), ((2, 192, 256), False),
                                       ((128, 128), True), ((2, 64, 512), True)])
def test_weight_tiles_place_each_byte_as_stated_and_weight_rows_inverts(gen: torch.Generator, shape: tuple,
                                                                        fp8: bool) -> None:
    """Byte ``b`` of row ``n`` lies at ``(n // 64) 64 W + (b // S) 64 S + (n % 64) S + b % S`` of its
    expert's tiles (``S`` 64 bytes MXFP4, 128 FP8; ``W`` a row's bytes: the kernels' ``w_row``), for
    every byte; ``weight_rows`` gives the rows back, dtype and all."""
    w = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    if fp8:
        w = w.view(torch.float8_e4m3fn)
    t = ops.weight_tiles(w)
    assert t.shape == w.shape and t.dtype == w.dtype and t.is_contiguous()
    rows, width, step = shape[-2], shape[-1], 128 if fp8 else 64
    n = torch.arange(rows).view(-1, 1)
    b = torch.arange(width).view(1, -1)
    at = (n // 64) * 64 * width + (b // step) * 64 * step + (n % 64) * step + b % step
    flat_w, flat_t = w.view(torch.uint8).reshape(-1, rows * width), t.view(torch.uint8).reshape(-1, rows * width)
    assert torch.equal(flat_t[:, at.flatten()], flat_w)
    back = ops.weight_rows(t)
    assert back.dtype == w.dtype and torch.equal(back.view(torch.uint8), w.view(torch.uint8))
    assert torch.equal(flat_t, flat_w) == (width == step)  # one K step: the tiles are the rows


@pytest.mark.parametrize("shape,error", [((96, 64), ValueError), ((128, 96), ValueError), ((128,), TypeError)])
def test_weight_tiles_refuse_partial_tiles(shape: tuple, error: type) -> None:
    with pytest.raises(error, match="^weight: "):
        ops.weight_tiles(torch.zeros(shape, dtype=torch.uint8))
    with pytest.raises(TypeError, match="^weight: "):
        ops.weight_tiles(torch.zeros(128, 64))
    with pytest.raises(ValueError, match="^weight: "):  # FP8: K 64, half a step
        ops.weight_tiles(torch.zeros(128, 64).to(torch.float8_e4m3fn))


@pytest.mark.parametrize("fp4,groups", [(False, 1), (False, 2), (True, 1)])
def test_quant_linear_in_tiles_equals_rows_on_the_cpu(gen: torch.Generator, fp4: bool, groups: int) -> None:
    rows, k = 128, 256
    weight, scale = fp4_weight(gen, rows, k) if fp4 else fp8_weight(gen, rows, k)
    x = torch.randn(3, groups, k, generator=gen).squeeze(1) if groups == 1 else torch.randn(3, groups, k, generator=gen)
    want = ops.quant_linear(x, weight, scale, groups)
    assert torch.equal(ops.quant_linear(x, ops.weight_tiles(weight), scale, groups, layout="tiles"), want)
    with pytest.raises(ValueError, match="^layout: "):
        ops.quant_linear(x, weight, scale, groups, layout="columns")


@pytest.mark.parametrize("t", [1, 5, 40])
def test_moe_experts_in_tiles_equal_rows_on_the_cpu(gen: torch.Generator, t: int) -> None:
    x, idx, weights, gu, gus, dn, dns = expert_args(gen, t, 2, 4, 128, 256, torch.float32, idle_last=False)
    want = ops.moe_experts(x, idx, weights, gu, gus, dn, dns, 1.0)
    got = ops.moe_experts(x, idx, weights, ops.weight_tiles(gu), gus, ops.weight_tiles(dn), dns, 1.0, layout="tiles")
    assert torch.equal(got, want)


def test_moe_experts_refuse_a_bad_layout(gen: torch.Generator) -> None:
    x, idx, weights, gu, gus, dn, dns = expert_args(gen, 2, 2, 4, 128, 256, torch.float32, idle_last=False)
    with pytest.raises(ValueError, match="^layout: "):
        ops.moe_experts(x, idx, weights, gu, gus, dn, dns, 1.0, layout="cols")
    # I = 96: the down projection's K is no whole number of 128-value steps.
    x, idx, weights, gu, gus, dn, dns = expert_args(gen, 2, 2, 4, 96, 256, torch.float32, idle_last=False)
    with pytest.raises(ValueError, match="^down: "):
        ops.moe_experts(x, idx, weights, gu, gus, dn, dns, 1.0, layout="tiles")


# ---------------------------------------------------------------------------------------------
# Bad input: each error names the argument


def _linear_args() -> dict:
    return dict(x=torch.randn(2, 64), weight=torch.randn(40, 64).to(torch.float8_e4m3fn), scale=torch.ones(1, 1))


def _fp4_args() -> dict:
    return dict(x=torch.randn(2, 64), weight=torch.zeros(40, 32, dtype=torch.uint8),
                scale=torch.full((40, 2), 127, dtype=torch.uint8))


LINEAR_BAD = [
    ("x float64", lambda a: a.update(x=a["x"].double()), TypeError, "x"),
    ("x int", lambda a: a.update(x=torch.ones(2, 64, dtype=torch.int32)), TypeError, "x"),
    ("x width", lambda a: a.update(x=torch.randn(2, 63)), ValueError, "x"),
    ("x nan", lambda a: a["x"].__setitem__((1, 7), math.nan), ValueError, "x"),
    ("x meta", lambda a: a.update(x=torch.empty(2, 64, device="meta")), ValueError, "x"),
    ("weight float32", lambda a: a.update(weight=torch.randn(40, 64)), TypeError, "weight"),
    ("weight K % 32", lambda a: a.update(weight=torch.zeros(40, 48).to(torch.float8_e4m3fn), x=torch.randn(2, 48)),
     ValueError, "weight"),
    ("weight 1-d", lambda a: a.update(weight=a["weight"][0]), ValueError, "weight"),
    ("weight strided", lambda a: a.update(weight=torch.zeros(64, 40).to(torch.float8_e4m3fn).T), ValueError, "weight"),
    ("scale uint8", lambda a: a.update(scale=torch.ones(1, 1, dtype=torch.uint8)), TypeError, "scale"),
    ("scale shape", lambda a: a.update(scale=torch.ones(1, 2)), ValueError, "scale"),
    ("scale 1-d", lambda a: a.update(scale=torch.ones(1)), ValueError, "scale"),
    ("groups not dividing R", lambda a: a.update(groups=3, x=torch.randn(2, 3, 64)), ValueError, "groups"),
    ("groups 0", lambda a: a.update(groups=0), ValueError, "groups"),
    ("groups x shape", lambda a: a.update(groups=4), ValueError, "x"),
    ("act", lambda a: a.update(act="fp4"), ValueError, "act"),
    ("act type", lambda a: a.update(act=None), TypeError, "act"),
]

FP4_BAD = [
    ("odd packed width", lambda a: a.update(weight=torch.zeros(40, 7, dtype=torch.uint8), x=torch.randn(2, 14)),
     ValueError, "weight"),
    ("packed K % 32", lambda a: a.update(weight=torch.zeros(40, 24, dtype=torch.uint8), x=torch.randn(2, 48)),
     ValueError, "weight"),
    ("scale float32", lambda a: a.update(scale=torch.ones(40, 2)), TypeError, "scale"),
    ("scale columns", lambda a: a.update(scale=torch.full((40, 4), 127, dtype=torch.uint8)), ValueError, "scale"),
    ("scale rows", lambda a: a.update(scale=torch.full((39, 2), 127, dtype=torch.uint8)), ValueError, "scale"),
]


@pytest.mark.parametrize("what,mutate,error,name", LINEAR_BAD, ids=[c[0] for c in LINEAR_BAD])
def test_quant_linear_refuses_bad_fp8_input(what: str, mutate, error: type, name: str) -> None:
    args = _linear_args()
    mutate(args)
    with pytest.raises(error, match=f"^{name}:"):
        ops.quant_linear(**args)


@pytest.mark.parametrize("what,mutate,error,name", FP4_BAD, ids=[c[0] for c in FP4_BAD])
def test_quant_linear_refuses_bad_fp4_input(what: str, mutate, error: type, name: str) -> None:
    args = _fp4_args()
    ops.quant_linear(**args)  # the unchanged arguments are fine
    mutate(args)
    with pytest.raises(error, match=f"^{name}:"):
        ops.quant_linear(**args)


def _moe_args() -> dict:
    e, inter, d = 2, 32, 64
    u8 = torch.uint8
    return dict(x=torch.randn(3, d), idx=torch.tensor([[0, 1], [1, 1], [0, 0]]), weights=torch.rand(3, 2),
                gate_up=torch.zeros(e, 2 * inter, d // 2, dtype=u8),
                gate_up_scale=torch.full((e, 2 * inter, d // 32), 127, dtype=u8),
                down=torch.zeros(e, d, inter // 2, dtype=u8), down_scale=torch.full((e, d, inter // 32), 127, dtype=u8),
                limit=1.0)


MOE_BAD = [
    ("idx = E", lambda a: a["idx"].__setitem__((1, 0), 2), ValueError, "idx"),
    ("idx < -1", lambda a: a["idx"].__setitem__((2, 1), -2), ValueError, "idx"),
    ("idx int32 out of range", lambda a: a.update(idx=torch.tensor([[0, 1], [1, 7], [0, 0]], dtype=torch.int32)),
     ValueError, "idx"),
    ("idx float", lambda a: a.update(idx=a["idx"].float()), TypeError, "idx"),
    ("idx 1-d", lambda a: a.update(idx=a["idx"][:, 0]), ValueError, "idx"),
    ("idx rows", lambda a: a.update(idx=a["idx"][:2]), ValueError, "idx"),
    ("idx no choice", lambda a: a.update(idx=a["idx"][:, :0], weights=a["weights"][:, :0]), ValueError, "idx"),
    ("weights float64", lambda a: a.update(weights=a["weights"].double()), TypeError, "weights"),
    ("weights shape", lambda a: a.update(weights=torch.rand(3, 3)), ValueError, "weights"),
    ("weights nan", lambda a: a["weights"].__setitem__((0, 0), math.nan), ValueError, "weights"),
    ("x nan", lambda a: a["x"].__setitem__((2, 3), math.inf), ValueError, "x"),
    ("x width", lambda a: a.update(x=torch.randn(3, 32)), ValueError, "x"),
    ("x 1-d", lambda a: a.update(x=torch.randn(64)), ValueError, "x"),
    ("x float64", lambda a: a.update(x=a["x"].double()), TypeError, "x"),
    ("gate_up float8", lambda a: a.update(gate_up=a["gate_up"].to(torch.float8_e4m3fn)), TypeError, "gate_up"),
    ("gate_up odd packed width", lambda a: a.update(gate_up=torch.zeros(2, 64, 7, dtype=torch.uint8)), ValueError,
     "gate_up"),
    ("gate_up odd rows", lambda a: a.update(gate_up=torch.zeros(2, 63, 32, dtype=torch.uint8)), ValueError, "gate_up"),
    ("gate_up 2-d", lambda a: a.update(gate_up=a["gate_up"][0]), ValueError, "gate_up"),
    ("gate_up_scale shape", lambda a: a.update(gate_up_scale=a["gate_up_scale"][:, :, :1].contiguous()), ValueError,
     "gate_up_scale"),
    ("gate_up_scale float32", lambda a: a.update(gate_up_scale=a["gate_up_scale"].float()), TypeError,
     "gate_up_scale"),
    ("down I % 32", lambda a: a.update(down=torch.zeros(2, 64, 8, dtype=torch.uint8)), ValueError, "down"),
    ("down I mismatch", lambda a: a.update(down=torch.zeros(2, 64, 32, dtype=torch.uint8)), ValueError, "down"),
    ("down experts", lambda a: a.update(down=torch.zeros(3, 64, 16, dtype=torch.uint8)), ValueError, "down"),
    ("down_scale shape", lambda a: a.update(down_scale=torch.full((2, 64, 2), 127, dtype=torch.uint8)), ValueError,
     "down_scale"),
    ("limit nan", lambda a: a.update(limit=math.nan), ValueError, "limit"),
    ("limit 0", lambda a: a.update(limit=0.0), ValueError, "limit"),
    ("limit negative", lambda a: a.update(limit=-1.0), ValueError, "limit"),
    ("limit str", lambda a: a.update(limit="1"), TypeError, "limit"),
    ("act", lambda a: a.update(act="e4m3"), ValueError, "act"),
]


@pytest.mark.parametrize("what,mutate,error,name", MOE_BAD, ids=[c[0] for c in MOE_BAD])
def test_moe_experts_refuses_bad_input(what: str, mutate, error: type, name: str) -> None:
    args = _moe_args()
    ops.moe_experts(**args)  # the unchanged arguments are fine
    mutate(args)
    with pytest.raises(error, match=f"^{name}:"):
        ops.moe_experts(**args)


# ---------------------------------------------------------------------------------------------
# The GPU: against the float64 reference and the CPU op, ids out of range, graphs, no host sync


def cuda(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.cuda() for t in ts]


@pytest.fixture(params=["auto", "mma-decode", "bf16-cores", "portable"])
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> float:
    """Runs a test with the GPU's own choice of forms (the decode form on FP8 tensor cores where the
    GPU has them, on ``wgmma`` on Hopper; the tiled form on ``wgmma`` and FP8 tensor cores on
    Hopper), with the FP8 decode form on ``mma.sync`` (what sm_89 and sm_120 GPUs run; elsewhere
    the GPU's own choice), on bf16 tensor cores only (``DSV4RS_QGEMM_KERNEL=bf16``: the bf16
    decode form, the tiled form on bf16 ``wgmma`` on Hopper), and with the portable ones forced
    (the bf16 decode form, the ``mma.sync`` tiled form); the relative slice bound the comparisons
    then add."""
    portable = request.param == "portable"
    bf16 = portable or request.param == "bf16-cores"
    monkeypatch.setenv("DSV4RS_QGEMM_KERNEL", "bf16" if bf16 else "auto")
    monkeypatch.setenv("DSV4RS_QGEMM_TILED", "mma" if portable else "auto")
    monkeypatch.setenv("DSV4RS_QGEMM_DECODE", "mma" if request.param == "mma-decode" else "auto")
    monkeypatch.setenv("DSV4RS_QGEMM_FUSED", "auto")
    monkeypatch.setenv("DSV4RS_QGEMM_WIDE", "auto")
    return slice_bound()


def slice_bound() -> float:
    """``STEP`` where the tiled form over FP8 weights may run on FP8 ``wgmma`` (compute capability
    9.0, the GPU's own choice; the bounds take ``SLICE`` for MXFP4 weights), ``SLICE`` where only
    the decode form may run on FP8 ``mma``, else 0."""
    fp8_cores = torch.cuda.get_device_capability() >= (8, 9)
    if not (fp8_cores and os.environ.get("DSV4RS_QGEMM_KERNEL", "auto") in ("auto", "fp8")):
        return 0.0
    hopper_tiled = torch.cuda.get_device_capability() == (9, 0) and os.environ.get("DSV4RS_QGEMM_TILED") != "mma"
    return STEP if hopper_tiled else SLICE


def linear_call(gen: torch.Generator, fp4: bool, m: int, k: int = 256) -> tuple:
    """A GPU ``quant_linear`` call of ``m`` rows on a 64 x ``k`` weight (MXFP4 or FP8), and a
    function giving the names of the kernels one such call launches."""
    weight, scale = fp4_weight(gen, 64, k) if fp4 else fp8_weight(gen, 64, k)
    x, weight, scale = cuda(activations(gen, m, k), weight, scale)

    def call() -> torch.Tensor:
        return ops.quant_linear(x, weight, scale)

    return call, lambda: launched_kernels(call)


@pytest.mark.profiler
@pytest.mark.gpu
@pytest.mark.parametrize("fp4", [False, True], ids=["fp8", "fp4"])
def test_gpu_qgemm_kernel_switch_takes_effect(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch, fp4: bool) -> None:
    """The decode form that runs is the one asked for (seen by the profiler): the FP8 one by default
    on GPUs with FP8 tensor cores (sm_89+; on ``wgmma`` on compute capability 9.0 for K of at least
    2048, there as the one fused kernel unless ``DSV4RS_QGEMM_FUSED=off``, and for 17 to 64 rows of
    FP8 weights and K of 8192 in one wide row tile unless ``DSV4RS_QGEMM_WIDE=off``; on ``mma.sync`` elsewhere,
    for a shorter K or with ``DSV4RS_QGEMM_DECODE=mma``), the bf16 one with
    ``DSV4RS_QGEMM_KERNEL=bf16``; forcing ``wgmma`` off Hopper, or an unknown name, is an error
    naming the variable."""
    call, launched = linear_call(gen, fp4, 2, k=2048)

    fmt = "fp4" if fp4 else "fp8"
    monkeypatch.setenv("DSV4RS_QGEMM_DECODE", "auto")
    monkeypatch.setenv("DSV4RS_QGEMM_FUSED", "auto")
    monkeypatch.setenv("DSV4RS_QGEMM_WIDE", "auto")
    monkeypatch.setenv("DSV4RS_QGEMM_KERNEL", "bf16")
    names = launched()
    assert f"dsv4_qgemv_{fmt}_n8" in names and not any("_f8" in n or "_wg_" in n for n in names), names
    monkeypatch.setenv("DSV4RS_QGEMM_KERNEL", "auto")
    names = launched()
    fp8_cores = torch.cuda.get_device_capability() >= (8, 9)
    hopper = torch.cuda.get_device_capability() == (9, 0)
    assert (names == {f"dsv4_qgemv_wg_fused_{fmt}_n8"}) == hopper, names
    assert (f"dsv4_qgemv_f8_{fmt}_n8" in names) == (fp8_cores and not hopper), names
    assert ("dsv4_act_quant_f8" in names) == (fp8_cores and not hopper), names
    monkeypatch.setenv("DSV4RS_QGEMM_FUSED", "off")
    names = launched()
    assert ({f"dsv4_qgemv_wg_{fmt}_n8", "dsv4_act_quant_f8", "dsv4_splitk_reduce"} <= names) == hopper, names
    # 40 rows: three 16-row tiles: three kernels by default, one with DSV4RS_QGEMM_FUSED=on.
    wide = linear_call(gen, fp4, 40, k=2048)[1]
    monkeypatch.setenv("DSV4RS_QGEMM_FUSED", "auto")
    assert ("dsv4_act_quant_f8" in wide()) == fp8_cores
    monkeypatch.setenv("DSV4RS_QGEMM_FUSED", "on")
    assert (wide() == {f"dsv4_qgemv_wg_fused_{fmt}_n16"}) == hopper
    # With K of 8192, on Hopper FP8 weights take one 64-row tile (never fused), or 32 rows one
    # 32-row tile, unless DSV4RS_QGEMM_WIDE=off; MXFP4 weights keep 16-row tiles.
    long_k = linear_call(gen, fp4, 40, k=8192)[1]
    names = long_k()
    assert ("dsv4_qgemv_wg_fp8_n64" in names) == (hopper and not fp4), names
    assert ("dsv4_qgemv_wg_fp8_n32" in linear_call(gen, fp4, 24, k=8192)[1]()) == (hopper and not fp4)
    monkeypatch.setenv("DSV4RS_QGEMM_WIDE", "off")
    assert not any("_n64" in n or "_n32" in n for n in long_k())
    # A shorter K takes the wide tiles only with DSV4RS_QGEMM_WIDE=on.
    monkeypatch.setenv("DSV4RS_QGEMM_WIDE", "auto")
    monkeypatch.setenv("DSV4RS_QGEMM_FUSED", "auto")
    short_k = linear_call(gen, fp4, 40, k=1024)[1]
    assert not any("_n64" in n or "_n32" in n for n in wide() | short_k())
    monkeypatch.setenv("DSV4RS_QGEMM_WIDE", "on")
    assert ("dsv4_qgemv_wg_fp8_n64" in wide()) == (hopper and not fp4)
    assert ("dsv4_qgemv_wg_fp8_n64" in short_k()) == (hopper and not fp4)
    if hopper:
        for var, fn in (("DSV4RS_QGEMM_FUSED", call), ("DSV4RS_QGEMM_WIDE", wide)):
            monkeypatch.setenv(var, "always")
            with pytest.raises(ValueError, match=var):
                fn()
            monkeypatch.setenv(var, "auto")
    monkeypatch.setenv("DSV4RS_QGEMM_WIDE", "auto")
    monkeypatch.setenv("DSV4RS_QGEMM_FUSED", "auto")
    short_k = linear_call(gen, fp4, 2, k=1024)[1]()
    assert (f"dsv4_qgemv_f8_{fmt}_n8" in short_k) == fp8_cores and not any("_wg_" in n for n in short_k), short_k
    monkeypatch.setenv("DSV4RS_QGEMM_DECODE", "mma")
    names = launched()
    assert (f"dsv4_qgemv_f8_{fmt}_n8" in names) == fp8_cores and not any("_wg_" in n for n in names), names
    monkeypatch.setenv("DSV4RS_QGEMM_DECODE", "wgmma")
    if hopper:
        assert f"dsv4_qgemv_wg_fused_{fmt}_n8" in launched()
    elif fp8_cores:
        with pytest.raises(ValueError, match="DSV4RS_QGEMM_DECODE"):
            call()
    monkeypatch.setenv("DSV4RS_QGEMM_DECODE", "fastest")
    if fp8_cores:
        with pytest.raises(ValueError, match="DSV4RS_QGEMM_DECODE"):
            call()
    monkeypatch.setenv("DSV4RS_QGEMM_DECODE", "auto")
    monkeypatch.setenv("DSV4RS_QGEMM_KERNEL", "fastest")
    with pytest.raises(ValueError, match="DSV4RS_QGEMM_KERNEL"):
        call()


@pytest.mark.profiler
@pytest.mark.gpu
@pytest.mark.parametrize("fp4", [False, True], ids=["fp8", "fp4"])
def test_gpu_qgemm_tiled_kernel_switch_takes_effect(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch, fp4: bool) -> None:
    """The tiled form that runs (seen by the profiler) is the ``wgmma`` one by default on compute
    capability 9.0, for FP8 weights on FP8 tensor cores (``_wgf8``) unless
    ``DSV4RS_QGEMM_KERNEL=bf16`` keeps bf16 ones (``_wgmma``, which MXFP4 weights always take),
    and the ``mma.sync`` one with ``DSV4RS_QGEMM_TILED=mma``; forcing ``wgmma`` elsewhere, or an
    unknown name, is an error naming the variable."""
    call, launched = linear_call(gen, fp4, 200)

    fmt = "fp4" if fp4 else "fp8"
    monkeypatch.setenv("DSV4RS_QGEMM_KERNEL", "auto")
    monkeypatch.setenv("DSV4RS_QGEMM_TILED", "mma")
    names = launched()
    assert f"dsv4_qgemm_{fmt}_m64" in names and not any("wg" in n for n in names), names
    hopper = torch.cuda.get_device_capability() == (9, 0)
    monkeypatch.setenv("DSV4RS_QGEMM_TILED", "auto")
    names = launched()
    hopper_form = f"dsv4_qgemm_{fmt}_wgmma" if fp4 else "dsv4_qgemm_fp8_wgf8"
    assert (hopper_form in names) == hopper and (f"dsv4_qgemm_{fmt}_m64" in names) != hopper, names
    monkeypatch.setenv("DSV4RS_QGEMM_KERNEL", "bf16")
    names = launched()
    assert (f"dsv4_qgemm_{fmt}_wgmma" in names) == hopper and not any("wgf8" in n for n in names), names
    monkeypatch.setenv("DSV4RS_QGEMM_KERNEL", "auto")
    monkeypatch.setenv("DSV4RS_QGEMM_TILED", "wgmma")
    if hopper:
        assert hopper_form in launched()
    else:
        with pytest.raises(ValueError, match="DSV4RS_QGEMM_TILED"):
            call()
    monkeypatch.setenv("DSV4RS_QGEMM_TILED", "fastest")
    with pytest.raises(ValueError, match="DSV4RS_QGEMM_TILED"):
        call()


@pytest.mark.profiler
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="the tiled form on FP8 tensor cores runs on compute capability 9.0")
@pytest.mark.parametrize("rows,groups,form", [(256, 1, "wgf8"), (200, 1, "wgf8"), (2 * 192, 2, "wgf8"),
                                              (2 * 130, 2, "wgmma")])
def test_gpu_fp8_tiled_form_takes_groups_of_64_rows(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch, rows: int,
                                                    groups: int, form: str) -> None:
    """The tiled form on FP8 tensor cores takes one group of any rows, or groups of a multiple of
    64 rows (it loads each warpgroup's 64 rows as one box under one 128-row scale block); other
    groups keep the tiled form on bf16 tensor cores (rust/core/src/gpu/qgemm.rs ``tiled_form``)."""
    monkeypatch.setenv("DSV4RS_QGEMM_KERNEL", "auto")
    monkeypatch.setenv("DSV4RS_QGEMM_TILED", "auto")
    weight, scale = fp8_weight(gen, rows, 256)
    x, weight, scale = cuda(activations(gen, 200, groups, 256).squeeze(1), weight, scale)
    names = launched_kernels(lambda: ops.quant_linear(x, weight, scale, groups))
    assert f"dsv4_qgemm_fp8_{form}" in names and not any("m64" in n for n in names), names


@pytest.mark.gpu
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: f"{'fp4' if c[0] else 'fp8'}-{c[2]}x{c[3]}-g{c[4]}")
@pytest.mark.parametrize("act", ["fp8", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_gpu_quant_linear_matches_reference_and_cpu(gen: torch.Generator, case: tuple, act: str,
                                                    dtype: torch.dtype, kernel: float) -> None:
    x, weight, scale, groups = linear_inputs(gen, case, dtype)
    got = ops.quant_linear(*cuda(x, weight, scale), groups=groups, act=act)
    assert got.device.type == "cuda" and got.dtype == dtype
    want, tol = linear_bound(x, weight, scale, groups, act, kernel if act == "fp8" else 0.0)
    assert_within(got, want, tol, "gpu vs reference")
    cpu = ops.quant_linear(x, weight, scale, groups=groups, act=act)
    # Each side lies within tol of the reference.
    assert_within(got, cpu.double(), 2 * tol, "gpu vs cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("fp4,m,rows,k", [(False, 300, 1536, 4096), (True, 300, 1024, 4096), (True, 1, 1024, 4096),
                                           (False, 1, 1536, 4096), (False, 12, 1536, 4096), (False, 1, 8200, 1024),
                                           (True, 1, 8200, 1024), (False, 12, 8200, 1024), (True, 5, 8200, 1024),
                                           (False, 64, 1536, 4096), (True, 33, 1024, 4096), (False, 17, 8200, 1024)])
def test_gpu_quant_linear_at_model_widths(gen: torch.Generator, fp4: bool, m: int, rows: int, k: int,
                                          kernel: float) -> None:
    """Widths of V4-Flash's projections (K 4096, R 1024 and 1536), decode and prefill row counts
    (few weight rows and a long K: the decode form splits K over blocks), and 8,200 weight rows at
    decode (the last grid column of 16 rows partial); 17 to 64 rows and K of at least 2048 run the
    FP8 decode form in several row tiles where the GPU has it (the last one partial at 33), and the
    tiled form otherwise."""
    weight, scale = fp4_weight(gen, rows, k) if fp4 else fp8_weight(gen, rows, k)
    x = activations(gen, m, k, dtype=torch.bfloat16)
    got = ops.quant_linear(*cuda(x, weight, scale))
    want, tol = linear_bound(x, weight, scale, 1, "fp8", kernel)
    assert_within(got, want, tol, "gpu vs reference")


# Dense decode calls that Hopper runs as one fused kernel: (fp4, m, rows, k, groups, dtype).
FUSED_CASES = [
    (False, 1, 1024, 4096, 1, torch.bfloat16),  # V4-Flash's q_a: 8 K splits, one cluster a column
    (False, 1, 512, 4096, 1, torch.bfloat16),  # kv
    (False, 2, 1024, 4096, 8, torch.bfloat16),  # o_a: 8 groups
    (False, 3, 256, 8192, 1, torch.float32),  # float32 activations, 8 K steps a split
    (True, 9, 200, 2048, 1, torch.bfloat16),  # 16-row tile, the last weight column partial
    (False, 40, 1536, 4096, 1, torch.bfloat16),  # three 16-row tiles, the last partial
    (False, 5, 4096, 2432, 1, torch.bfloat16),  # 19 K steps: 7 splits, the last of one step
    (True, 1, 64, 2048, 1, torch.float32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", FUSED_CASES,
                         ids=lambda c: f"{'fp4' if c[0] else 'fp8'}-m{c[1]}-{c[2]}x{c[3]}-g{c[4]}-{str(c[5])[6:]}")
def test_gpu_quant_linear_fused_equals_its_three_kernels(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch,
                                                   case: tuple) -> None:
    """On compute capability 9.0 a dense decode call can run as one kernel (each block quantizes its
    own activations; a grid column's K splits, one cluster, are added by its first block; forced
    here with ``DSV4RS_QGEMM_FUSED=on``, by default only small grids take it) and gives bit for
    bit what the three kernels it replaces give (``DSV4RS_QGEMM_FUSED=off``: the activation
    quantization, the GEMM, the split-K sum): the same codes and scales, the same float32 sums in
    the same order (that ``on`` runs the one kernel: the kernel switch test). A row with an infinity (its block's scale infinite: the row's outputs are
    non-finite, NaN included, which the bfloat16 cast keeps), an all-zero block, -0 and a value
    far below its block's scale are among the inputs; the result also lies within the
    reference's bound."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the fused kernels run on compute capability 9.0")
    fp4, m, rows, k, groups, dtype = case
    w_cpu, s_cpu = fp4_weight(gen, rows, k) if fp4 else fp8_weight(gen, rows, k)
    x = activations(gen, m, *((groups,) if groups > 1 else ()), k, dtype=dtype)
    xs, weight, scale = cuda(x, w_cpu, s_cpu)
    for env in ("DSV4RS_QGEMM_KERNEL", "DSV4RS_QGEMM_DECODE", "DSV4RS_QGEMM_TILED"):
        monkeypatch.setenv(env, "auto")
    monkeypatch.setenv("DSV4RS_QGEMM_FUSED", "on")
    fused = ops.quant_linear(xs, weight, scale, groups=groups)
    want, tol = linear_bound(x, w_cpu, s_cpu, groups, "fp8", SLICE)
    assert_within(fused, want, tol, "fused vs reference")
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    x_odd = x.clone()
    x_odd[0, ..., 5] = float("inf")
    x_odd[-1, ..., 128:256] = 0.0
    x_odd[-1, ..., 300] = -0.0
    x_odd[-1, ..., 301] = 1e-30  # far below its block's scale: code 0
    for inputs in (xs, x_odd.cuda()):
        monkeypatch.setenv("DSV4RS_QGEMM_FUSED", "on")
        one = ops.quant_linear(inputs, weight, scale, groups=groups)
        monkeypatch.setenv("DSV4RS_QGEMM_FUSED", "off")
        three = ops.quant_linear(inputs, weight, scale, groups=groups)
        assert torch.equal(one.view(bits), three.view(bits))
    assert not torch.isfinite(one[0]).any() and torch.isfinite(one[1:]).all()


# Dense calls of 17 to 64 rows that Hopper runs in one wide row tile: (m, rows, k, groups, dtype).
WIDE_CASES = [
    (64, 4096, 8192, 1, torch.bfloat16),  # V4-Flash's o_b at batch 64: 7 K splits
    (33, 1024, 4096, 8, torch.bfloat16),  # o_a (8 groups), the 64-row tile partial
    (17, 8200, 1024, 1, torch.float32),  # a 32-row tile, K below 2048, the last weight column partial
    (32, 512, 4096, 1, torch.bfloat16),  # kv at batch 32
    (48, 200, 2048, 1, torch.bfloat16),  # a partial weight column in every split
]


@pytest.mark.profiler
@pytest.mark.gpu
@pytest.mark.parametrize("case", WIDE_CASES, ids=lambda c: f"m{c[0]}-{c[1]}x{c[2]}-g{c[3]}-{str(c[4])[6:]}")
def test_gpu_quant_linear_wide_tiles_match_reference(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch,
                                                     case: tuple) -> None:
    """On compute capability 9.0, 17 to 64 rows of a call on FP8 weights run in one row tile of 32
    or 64 (``dsv4_qgemv_wg_fp8_n32`` / ``_n64``: each weight read once; forced here with
    ``DSV4RS_QGEMM_WIDE=on``, which also takes K below 8192): the result lies within the
    reference's bound, and within twice it of the 16-row tiles' (``DSV4RS_QGEMM_WIDE=off``); a
    row with an infinity is non-finite and leaves the other rows finite."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wide tiles run on compute capability 9.0")
    m, rows, k, groups, dtype = case
    w_cpu, s_cpu = fp8_weight(gen, rows, k)
    x = activations(gen, m, *((groups,) if groups > 1 else ()), k, dtype=dtype)
    xs, weight, scale = cuda(x, w_cpu, s_cpu)
    for env in ("DSV4RS_QGEMM_KERNEL", "DSV4RS_QGEMM_DECODE", "DSV4RS_QGEMM_TILED", "DSV4RS_QGEMM_FUSED"):
        monkeypatch.setenv(env, "auto")
    monkeypatch.setenv("DSV4RS_QGEMM_WIDE", "on")
    names = launched_kernels(lambda: ops.quant_linear(xs, weight, scale, groups=groups))
    assert f"dsv4_qgemv_wg_fp8_n{32 if m <= 32 else 64}" in names, names
    got = ops.quant_linear(xs, weight, scale, groups=groups)
    want, tol = linear_bound(x, w_cpu, s_cpu, groups, "fp8", SLICE)
    assert_within(got, want, tol, "wide tiles vs reference")
    monkeypatch.setenv("DSV4RS_QGEMM_WIDE", "off")
    narrow = ops.quant_linear(xs, weight, scale, groups=groups)
    assert_within(got, narrow.double().cpu(), 2 * tol, "wide vs narrow tiles")
    monkeypatch.setenv("DSV4RS_QGEMM_WIDE", "on")
    x_odd = xs.clone()
    x_odd[m // 2, ..., 7] = float("inf")
    odd = ops.quant_linear(x_odd, weight, scale, groups=groups)
    rest = torch.ones(m, dtype=torch.bool)
    rest[m // 2] = False
    assert not torch.isfinite(odd[m // 2]).any() and torch.equal(odd[rest], got[rest])


@pytest.mark.profiler
@pytest.mark.gpu
def test_gpu_quant_linear_wide_tiles_equal_narrow_ones_bit_for_bit(gen: torch.Generator,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Where both take the same K splits (here none: 32,768 weight rows, 512 grid columns), the
    wide tiles give the 16-row tiles' bits: each output the same four FP8 slice sums, scaled and
    added in the same order."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wide tiles run on compute capability 9.0")
    rows, k = 32768, 2048
    weight = (torch.randn(rows, k, device="cuda") * 32).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(rows // 128, k // 128, device="cuda") * 2**-6 + 2**-8
    for env in ("DSV4RS_QGEMM_KERNEL", "DSV4RS_QGEMM_DECODE", "DSV4RS_QGEMM_TILED", "DSV4RS_QGEMM_FUSED"):
        monkeypatch.setenv(env, "auto")
    for m in (20, 40, 64):
        x = activations(gen, m, k, dtype=torch.bfloat16).cuda()
        monkeypatch.setenv("DSV4RS_QGEMM_WIDE", "on")
        names = launched_kernels(lambda: ops.quant_linear(x, weight, scale))
        assert "dsv4_splitk_reduce" not in names and any("_wg_fp8_n" in n for n in names), names
        wide = ops.quant_linear(x, weight, scale)
        monkeypatch.setenv("DSV4RS_QGEMM_WIDE", "off")
        names = launched_kernels(lambda: ops.quant_linear(x, weight, scale))
        assert "dsv4_splitk_reduce" not in names and "dsv4_qgemv_wg_fp8_n16" in names, names
        narrow = ops.quant_linear(x, weight, scale)
        assert torch.equal(wide.view(torch.int16), narrow.view(torch.int16)), m


@pytest.mark.gpu
@pytest.mark.parametrize("fp4", [False, True], ids=["fp8", "fp4"])
@pytest.mark.parametrize("m,rows,k,groups", [(300, 256, 512, 1), (130, 200, 1024, 1), (150, 2 * 128, 384, 2),
                                             (200, 2 * 192, 640, 2)])
def test_gpu_quant_linear_is_exact_on_small_integers(gen: torch.Generator, fp4: bool, m: int, rows: int, k: int,
                                                     groups: int, kernel: float) -> None:
    """Integer activations in [-3, 3] (exact FP8 codes under any block scale they get) times small
    weights (FP8 codes of -4 .. 4 with power-of-two block scales; MXFP4 values 0, 1, 2, 3, 4, 6 of
    either sign at scales 1/2 and 1 mixed within each 128-wide step) have sums that every form adds
    exactly, FP8 tensor cores included (below 2^12 in a step, multiples of 1/2 in float32): the
    result equals the float64 reference bit for bit. Any misplaced K value, row, scale or step would
    change some integer (many rows a weight: the tiled forms; grouped ``wo_a`` too, groups of 128
    rows, whose 192-row blocks of the FP8 tensor-core form hold rows of the next group or past the
    end, and groups of 192, a block each)."""
    x = torch.randint(-3, 4, (m, groups, k) if groups > 1 else (m, k), generator=gen).float()
    if fp4:
        mags = torch.tensor([0, 2, 4, 5, 6, 7], dtype=torch.uint8)  # e2m1 codes of 0, 1, 2, 3, 4, 6
        nib = mags[torch.randint(0, 6, (rows, k), generator=gen)] | (torch.randint(0, 2, (rows, k), generator=gen,
                                                                              dtype=torch.uint8) << 3)
        weight = nib[:, 0::2] | (nib[:, 1::2] << 4)
        scale = torch.randint(126, 128, (rows, k // 32), dtype=torch.uint8, generator=gen)
    else:
        weight = torch.randint(-4, 5, (rows, k), generator=gen).float().to(torch.float8_e4m3fn)
        scale = torch.exp2(torch.randint(-1, 2, (-(-rows // 128), k // 128), generator=gen).float())
    got = ops.quant_linear(*cuda(x, weight, scale), groups=groups)
    want = ref.quant_linear(x, weight, scale, groups, "fp8")
    assert want.abs().max() < 2.0**20 and torch.equal(2 * want, (2 * want).round())
    assert torch.equal(got.double().cpu(), want)


@pytest.mark.gpu
@pytest.mark.parametrize("fp4", [False, True], ids=["fp8", "fp4"])
@pytest.mark.parametrize("m", [1, 9, 40, 200])
def test_gpu_quant_linear_slices_of_unequal_products_stay_within_bound(gen: torch.Generator, fp4: bool, m: int,
                                                                       kernel: float) -> None:
    """Each 32-wide K run (a tensor-core slice) holds one activation of about 400 and 31 of about 0.01:
    the small products lie some 2^15 below the large one, past an FP8 accumulator's bits, and the
    result still lies within the stated bound (and within float32's with the bf16 form). K is 2048,
    so that Hopper's FP8 decode form is the native ``wgmma`` one (1 to 40 rows), and 200 rows take
    its tiled form on FP8 tensor cores."""
    rows, k = 48, 2048
    weight, scale = fp4_weight(gen, rows, k) if fp4 else fp8_weight(gen, rows, k)
    x = torch.randn(m, k, generator=gen) * 0.01
    x[:, ::32] = 400 * torch.randn(m, k // 32, generator=gen).sign()
    got = ops.quant_linear(*cuda(x, weight, scale))
    want, tol = linear_bound(x, weight, scale, 1, "fp8", kernel)
    assert_within(got, want, tol, "gpu vs reference")


@pytest.mark.gpu
@moe_grid
def test_gpu_moe_experts_matches_reference_and_cpu(gen: torch.Generator, case: str, act: str, dtype: torch.dtype,
                                                   idx_dtype: torch.dtype, kernel: float) -> None:
    args, limit = moe_inputs(gen, case, dtype, idx_dtype)
    got = ops.moe_experts(*cuda(*args), limit, act=act)
    assert got.device.type == "cuda" and got.dtype == dtype and got.shape == args[0].shape
    want, tol = moe_bound(*args, limit, act, kernel if act == "fp8" else 0.0)
    assert_within(got, want, tol, "gpu vs reference")
    cpu = ops.moe_experts(*args, limit, act=act)
    assert_within(got, cpu.double(), 2 * tol, "gpu vs cpu")


def expert_args(gen: torch.Generator, t: int, k: int, e: int, inter: int, d: int, dtype: torch.dtype,
                idle_last: bool) -> tuple:
    """``moe_experts`` inputs: ``t`` tokens of ``d`` values spanning two decades, ``k`` choices
    each drawn with repeats (from all ``e`` experts, or all but the last), random weights, MXFP4
    experts of intermediate width ``inter`` with scales 2^-15 to 2^-6."""
    x = activations(gen, t, d, dtype=dtype, decades=2.0)
    idx = torch.randint(0, e - 1 if idle_last else e, (t, k), generator=gen)
    weights = torch.rand(t, k, generator=gen)
    gate_up, gate_up_scale = fp4_weight(gen, e, 2 * inter, d, low=112, high=122)
    down, down_scale = fp4_weight(gen, e, d, inter, low=112, high=122)
    return x, idx, weights, gate_up, gate_up_scale, down, down_scale


@pytest.mark.gpu
@pytest.mark.parametrize("t,k,e,inter,d", [(1, 6, 8, 256, 512), (2, 6, 8, 256, 512), (20, 6, 8, 256, 512),
                                           (32, 6, 8, 256, 512), (700, 2, 8, 256, 512), (1, 6, 64, 512, 1024),
                                           (20, 6, 64, 512, 1024), (40, 6, 64, 512, 1024)])
def test_gpu_moe_experts_many_tokens_per_expert(gen: torch.Generator, t: int, k: int, e: int, inter: int, d: int,
                                                kernel: float) -> None:
    """Decode-like and prefill-like token counts (ids drawn with repeats, the last expert left idle).
    Over 8 experts: the decode form with 8-row tiles (T=1, 2), with 16-row tiles and experts
    holding more rows than one tile (T=20), and the tiled form (T=32, 700). Over 64 experts: plans
    of up to 94 row tiles, 8-row tiles at T=1 and 20, and at 40 16-row tiles on the bf16 decode
    form but 8-row ones on the FP8 form (which keeps them up to 4 rows an expert)."""
    args = expert_args(gen, t, k, e, inter, d, torch.bfloat16, idle_last=True)
    got = ops.moe_experts(*cuda(*args), 1.0)
    want, tol = moe_bound(*args, 1.0, "fp8", kernel)
    assert_within(got, want, tol, "gpu vs reference")


@pytest.mark.gpu
@pytest.mark.parametrize("fp4", [False, True], ids=["fp8", "fp4"])
@pytest.mark.parametrize("m,rows,k,groups", [(1, 1024, 4096, 1), (300, 256, 4096, 1), (257, 256, 640, 1),
                                             (2 * 150, 2 * 128, 512, 2)])
@pytest.mark.parametrize("act", ["fp8", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_gpu_wide_activation_quantization_gives_the_same_bits(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch,
                                                              fp4: bool, m: int, rows: int, k: int, groups: int,
                                                              act: str, dtype: torch.dtype, kernel: float) -> None:
    """The wide quantization kernels (a half warp a 128-block, two passes a warp; a prefill's
    many rows) and the narrow ones (a warp a block; a decode step's) give every form the same
    activations: the outputs equal bit for bit, decode and tiled forms, grouped ``wo_a``, K of 5
    blocks (a warp's second pass past the row), a zero block, -0, tiny and huge values."""
    weight, scale = fp4_weight(gen, rows, k) if fp4 else fp8_weight(gen, rows, k)
    x = activations(gen, m, groups * k) if groups > 1 else activations(gen, m, k)
    x[0, :128] = 0.0
    x[-1, 128:131] = torch.tensor([-0.0, 1e-30, 3e30])
    x, weight, scale = cuda(x.to(dtype), weight, scale)
    x = x.view(m, groups, k) if groups > 1 else x
    outs = []
    for mode in ("narrow", "wide"):
        monkeypatch.setenv("DSV4RS_ACT_QUANT", mode)
        outs.append(ops.quant_linear(x, weight, scale, groups, act=act))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.gpu
@pytest.mark.parametrize("t,e,inter,d", [(3, 8, 256, 512), (300, 16, 384, 256), (700, 4, 128, 640)])
@pytest.mark.parametrize("act", ["fp8", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_gpu_moe_wide_activation_quantization_gives_the_same_bits(gen: torch.Generator,
                                                                  monkeypatch: pytest.MonkeyPatch, t: int, e: int,
                                                                  inter: int, d: int, act: str, dtype: torch.dtype,
                                                                  kernel: float) -> None:
    """As above for the MoE: its tokens gathered in the plan's order (rows past the count zeroed)
    and its intermediate activations, quantized wide or narrow, give the same output bits."""
    args = cuda(*expert_args(gen, t, 6, e, inter, d, dtype, idle_last=True))
    outs = []
    for mode in ("narrow", "wide"):
        monkeypatch.setenv("DSV4RS_ACT_QUANT", mode)
        outs.append(ops.moe_experts(*args, 1.0, act=act))
    assert torch.equal(outs[0], outs[1])


def bf16_round_odd(x: torch.Tensor) -> torch.Tensor:
    """float32 ``x`` rounded to bfloat16 by round-to-odd (truncated, the last kept bit set when any
    dropped bit was), as float32: cuda/include/quant.cuh ``bf16_round_odd`` for finite values."""
    bits = x.view(torch.int32)
    sticky = (bits & 0xFFFF) != 0
    return ((bits & ~0xFFFF) | (sticky.to(torch.int32) << 16)).view(torch.float32)


def test_fp8_quantization_of_h_rounded_to_odd_equals_float32(gen: torch.Generator) -> None:
    """The arithmetic the MoE's Hopper tiled form relies on when its gate-up GEMM stores h as
    bfloat16 rounded to odd: quantizing those values to FP8 per 1x128 block gives exactly what the
    float32 h gives (the same scales, every value), while plain bfloat16 rounding (nearest even)
    does not (a value that lands on an FP8 midpoint is rounded twice)."""
    for decades in (0.0, 2.0, 6.0):
        h = activations(gen, 256, 2048, decades=decades)
        h[0, :128] = h[0, :128].clamp(-1e-6, 1e-6)  # a block under the 1e-4 amax floor
        h[1, 5] = 448.0 * 2.0**-3  # an amax on a scale boundary
        want = ref.quantize_activations(h)
        assert torch.equal(ref.quantize_activations(bf16_round_odd(h)), want)
        if decades == 2.0:
            assert not torch.equal(ref.quantize_activations(h.bfloat16().float()), want)


@pytest.mark.gpu
@pytest.mark.profiler
@pytest.mark.parametrize("t,e,inter,d", [(300, 16, 384, 256), (700, 4, 128, 512), (600, 8, 2048, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_gpu_moe_h_rounded_to_odd_gives_the_float32_bits(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch,
                                                         t: int, e: int, inter: int, d: int,
                                                         dtype: torch.dtype) -> None:
    """On the Hopper tiled form (compute capability 9.0, FP8 activations) the gate-up GEMM stores h
    as bfloat16 rounded to odd for its FP8 quantization (``DSV4RS_MOE_H_ODD``, on by default): the
    output is the float32 h's, bit for bit, with an infinity, zeros and -0 among the tokens and
    limits that clamp; another value of the variable is an error naming it."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper tiled form runs on compute capability 9.0")
    for env in ("DSV4RS_QGEMM_KERNEL", "DSV4RS_QGEMM_TILED", "DSV4RS_ACT_QUANT"):
        monkeypatch.setenv(env, "auto")
    x, idx, weights, gu, gus, dn, dns = cuda(*expert_args(gen, t, 6, e, inter, d, dtype, idle_last=True))
    x[0, 7] = float("inf")
    x[-1, :128] = 0.0
    x[-1, 200] = -0.0
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    for limit in (1.0, 0.05):
        def call() -> torch.Tensor:
            return ops.moe_experts(x, idx, weights, gu, gus, dn, dns, limit)

        monkeypatch.setenv("DSV4RS_MOE_H_ODD", "auto")
        assert "dsv4_qgemm_fp4_wgmma" in launched_kernels(call)
        odd = call()
        monkeypatch.setenv("DSV4RS_MOE_H_ODD", "off")
        f32 = call()
        assert torch.equal(odd.view(bits), f32.view(bits))
        assert torch.isfinite(odd[1:]).all()
    monkeypatch.setenv("DSV4RS_MOE_H_ODD", "even")
    with pytest.raises(ValueError, match="DSV4RS_MOE_H_ODD"):
        ops.moe_experts(x, idx, weights, gu, gus, dn, dns, 1.0)


@pytest.mark.gpu
@pytest.mark.profiler
def test_gpu_activation_quantization_variable_picks_the_kernels(gen: torch.Generator,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``DSV4RS_ACT_QUANT``: ``auto`` quantizes with the wide kernels from 256 rows on, ``wide``
    and ``narrow`` on every call that quantizes in a kernel of its own (a decode call whose GEMM
    quantizes its own activations, or one whose bfloat16 activations need no rounding, reads
    nothing); any other value raises there, naming the variable."""
    weight, scale = cuda(*fp8_weight(gen, 256, 4096))
    experts = cuda(*expert_args(gen, 300, 6, 8, 256, 512, torch.float32, idle_last=False))

    def quantizers(call) -> set[str]:
        return {n for n in launched_kernels(call) if n.startswith("dsv4_act_quant")}

    for m, mode, wide in ((300, "auto", True), (200, "auto", False), (300, "narrow", False), (200, "wide", True)):
        x = activations(gen, m, 4096).cuda()
        monkeypatch.setenv("DSV4RS_ACT_QUANT", mode)
        quant = quantizers(lambda: ops.quant_linear(x, weight, scale))
        assert quant and all(n.endswith("_wide") == wide for n in quant), (m, mode, quant)
    for mode, wide in (("auto", True), ("narrow", False)):
        monkeypatch.setenv("DSV4RS_ACT_QUANT", mode)
        quant = quantizers(lambda: ops.moe_experts(*experts, 1.0))
        assert quant and all(n.endswith("_wide") == wide for n in quant), (mode, quant)
    monkeypatch.setenv("DSV4RS_ACT_QUANT", "sideways")
    with pytest.raises(ValueError, match="DSV4RS_ACT_QUANT"):
        ops.quant_linear(activations(gen, 300, 4096).cuda(), weight, scale)


@pytest.mark.gpu
@pytest.mark.parametrize("t,e,inter,d", [(40, 8, 256, 256), (300, 16, 384, 256), (700, 4, 128, 512)])
@pytest.mark.parametrize("act", ["fp8", "bf16"])
def test_gpu_moe_experts_tiled_forms(gen: torch.Generator, t: int, e: int, inter: int, d: int, act: str,
                                     kernel: float) -> None:
    """Prefill-like token counts (top-6; the tiled forms) with both activation roundings: with
    bf16 activations the gate-up GEMM writes h straight in the order the down GEMM reads (the
    Hopper form's own order there); expert rows past one 128-row tile, a last expert left idle."""
    args = expert_args(gen, t, 6, e, inter, d, torch.float32, idle_last=True)
    got = ops.moe_experts(*cuda(*args), 1.0, act=act)
    want, tol = moe_bound(*args, 1.0, act, kernel if act == "fp8" else 0.0)
    assert_within(got, want, tol, "gpu vs reference")


@pytest.mark.gpu
@pytest.mark.parametrize("fp4", [False, True], ids=["fp8", "fp4"])
@pytest.mark.parametrize("m,rows,k,groups", [(1, 1024, 4096, 1), (8, 512, 4096, 1), (1, 1024, 1024, 1),
                                             (64, 256, 2048, 1), (300, 192, 512, 1), (1, 8 * 128, 4096, 8),
                                             (16, 8 * 128, 4096, 8), (200, 2 * 192, 640, 2), (200, 2 * 128, 512, 2)])
def test_gpu_quant_linear_in_tiles_equals_rows_bit_for_bit(gen: torch.Generator, fp4: bool, m: int, rows: int, k: int,
                                                            groups: int, kernel: float) -> None:
    """A weight in ``weight_tiles``'s layout gives the rows' result, bit for bit, on every form the
    call takes (decode forms, the fused Hopper kernel and its split K, the tiled forms; grouped
    ``wo_a``; groups of two tiles, so that a block of three tiles of the FP8 tensor-core form
    reaches into the next group or past the end, and of three): only where the kernels read a
    weight byte moves."""
    weight, scale = fp4_weight(gen, rows, k) if fp4 else fp8_weight(gen, rows, k)
    x = torch.randn(m, groups, k, generator=gen) if groups > 1 else torch.randn(m, k, generator=gen)
    x, weight, scale = cuda(x.bfloat16(), weight, scale)
    want = ops.quant_linear(x, weight, scale, groups)
    got = ops.quant_linear(x, ops.weight_tiles(weight), scale, groups, layout="tiles")
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("t,e,inter,d", [(1, 8, 256, 512), (20, 8, 256, 512), (40, 64, 512, 1024), (700, 8, 256, 512),
                                         (3, 8, 2048, 4096)])
@pytest.mark.parametrize("act", ["fp8", "bf16"])
def test_gpu_moe_experts_in_tiles_equal_rows_bit_for_bit(gen: torch.Generator, t: int, e: int, inter: int, d: int,
                                                         act: str, kernel: float) -> None:
    """Experts in ``weight_tiles``'s layout give the rows' result, bit for bit, on every form (decode
    with 8- and 16-row tiles, the tiled forms; the GPU's own choice, the FP8 decode form on
    ``mma.sync``, the portable forms): only where the kernels read a weight byte moves. The last
    case has V4-Flash's expert width (K 4,096 and 2,048)."""
    x, idx, weights, gu, gus, dn, dns = cuda(*expert_args(gen, t, 6, e, inter, d, torch.bfloat16, idle_last=True))
    want = ops.moe_experts(x, idx, weights, gu, gus, dn, dns, 1.0, act=act)
    got = ops.moe_experts(x, idx, weights, ops.weight_tiles(gu), gus, ops.weight_tiles(dn), dns, 1.0, act=act, layout="tiles")
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.profiler
@pytest.mark.parametrize("t,d,dtype", [(1, 4096, torch.bfloat16), (3, 512, torch.float32), (8, 4096, torch.bfloat16),
                                       (9, 4096, torch.bfloat16)])
def test_gpu_moe_plan_quantizes_few_tokens_bit_for_bit(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch, t: int,
                                                       d: int, dtype: torch.dtype) -> None:
    """On the FP8 decode forms, up to 256 blocks of 128 activations (8 tokens at V4-Flash's width)
    are quantized by the MoE plan's block itself, one launch fewer, and give what the separate
    ``dsv4_act_quant_f8`` gives (``DSV4RS_MOE_PLAN_QUANT=off``) bit for bit, an infinity, zeros and
    -0 among the inputs; 9 tokens keep the separate kernel. Where the plan could quantize, another
    value of the variable is an error naming it."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("the FP8 decode forms run on compute capability 8.9 and later")
    for env in ("DSV4RS_QGEMM_KERNEL", "DSV4RS_QGEMM_DECODE", "DSV4RS_QGEMM_TILED"):
        monkeypatch.setenv(env, "auto")
    x, idx, weights, gu, gus, dn, dns = cuda(*expert_args(gen, t, 6, 16, 256, d, dtype, idle_last=True))
    x[0, 7] = float("inf")
    x[-1, 128:256] = 0.0
    x[-1, 300] = -0.0

    def call() -> torch.Tensor:
        return ops.moe_experts(x, idx, weights, gu, gus, dn, dns, 1.0)

    monkeypatch.setenv("DSV4RS_MOE_PLAN_QUANT", "auto")
    fused, launches = call(), kernel_launches(call)
    # The quantization of h between the two GEMMs stays a kernel of its own.
    assert launches.get("dsv4_act_quant_f8") == (1 if t * d // 128 <= 256 else 2), launches
    monkeypatch.setenv("DSV4RS_MOE_PLAN_QUANT", "off")
    assert kernel_launches(call).get("dsv4_act_quant_f8") == 2
    apart = call()
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(fused.view(bits), apart.view(bits))
    assert torch.isfinite(fused[1:]).all()
    if t * d // 128 <= 256:  # (asked only where the plan could quantize)
        monkeypatch.setenv("DSV4RS_MOE_PLAN_QUANT", "always")
        with pytest.raises(ValueError, match="DSV4RS_MOE_PLAN_QUANT"):
            call()


@pytest.mark.gpu
def test_gpu_moe_decode_spread_over_the_sms_changes_no_bit(gen: torch.Generator,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """On compute capability 9.0 a MoE decode GEMM whose grid is under the GPU's blocks at full
    occupancy asks for enough shared memory that its blocks spread evenly over the SMs
    (``DSV4RS_MOE_SPREAD``, on by default): only where the blocks run changes, so the result is
    the same bits with it ``off``; another value is an error naming the variable."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper decode form runs on compute capability 9.0")
    for env in ("DSV4RS_QGEMM_KERNEL", "DSV4RS_QGEMM_DECODE", "DSV4RS_QGEMM_TILED", "DSV4RS_MOE_PLAN_QUANT"):
        monkeypatch.setenv(env, "auto")
    x, idx, weights, gu, gus, dn, dns = cuda(*expert_args(gen, 1, 6, 16, 2048, 4096, torch.bfloat16, idle_last=True))

    def call() -> torch.Tensor:
        return ops.moe_experts(x, idx, weights, gu, gus, dn, dns, 1.0)

    results = []
    for value in ("auto", "off", "on"):
        monkeypatch.setenv("DSV4RS_MOE_SPREAD", value)
        results.append(call())
    assert all(torch.equal(r.view(torch.int16), results[0].view(torch.int16)) for r in results[1:])
    monkeypatch.setenv("DSV4RS_MOE_SPREAD", "even")
    with pytest.raises(ValueError, match="DSV4RS_MOE_SPREAD"):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("t,e,inter,d", [(1, 16, 2048, 4096), (5, 16, 256, 512), (16, 16, 256, 512)])
@pytest.mark.parametrize("layout", ["rows", "tiles"])
def test_gpu_moe_down_started_early_changes_no_bit(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch, t: int,
                                                   e: int, inter: int, d: int, layout: str) -> None:
    """On compute capability 9.0 the MoE's down GEMM on the Hopper decode form starts as a
    programmatic dependent and issues its first weight copies before it waits
    (``DSV4RS_MOE_DOWN_EARLY``, on by default): only when its copies go out changes, so the result
    is the same bits with it ``off`` (8- and 16-row tiles, an idle expert, a pair of no expert),
    also called twice in a row; another value is an error naming the variable."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper decode form runs on compute capability 9.0")
    for env in ("DSV4RS_QGEMM_KERNEL", "DSV4RS_QGEMM_DECODE", "DSV4RS_QGEMM_TILED", "DSV4RS_MOE_PLAN_QUANT",
                "DSV4RS_MOE_SPREAD"):
        monkeypatch.setenv(env, "auto")
    x, idx, weights, gu, gus, dn, dns = cuda(*expert_args(gen, t, 6, e, inter, d, torch.bfloat16, idle_last=True))
    idx[0, 1] = -1
    if layout == "tiles":
        gu, dn = ops.weight_tiles(gu), ops.weight_tiles(dn)

    def call() -> torch.Tensor:
        return ops.moe_experts(x, idx, weights, gu, gus, dn, dns, 1.0, layout=layout).view(torch.int16)

    monkeypatch.setenv("DSV4RS_MOE_DOWN_EARLY", "off")
    want = call()
    monkeypatch.setenv("DSV4RS_MOE_DOWN_EARLY", "auto")
    assert torch.equal(call(), want) and torch.equal(call(), want)
    monkeypatch.setenv("DSV4RS_MOE_DOWN_EARLY", "soon")
    with pytest.raises(ValueError, match="DSV4RS_MOE_DOWN_EARLY"):
        call()


def test_moe_passes_bound_the_workspace() -> None:
    """A GPU MoE pass holds enough tokens for experts to average 384 rows, between 4,096 and
    16,384 tokens; longer calls reuse one pass's workspace."""
    assert _core.moe_pass_tokens(6, 256) == 16384 and _core.moe_pass_tokens(6, 384) == 16384
    assert _core.moe_pass_tokens(2, 8) == 4096 and _core.moe_pass_tokens(8, 128) == 6144
    one = _core.moe_workspace_bytes(16384, 6, 256, 2048, 4096)
    assert 2.7e9 < one < 2.9e9  # about 170 KB a token at V4-Flash width
    assert _core.moe_workspace_bytes(100_000, 6, 256, 2048, 4096) == one
    assert _core.moe_workspace_bytes(4096, 6, 256, 2048, 4096) < one / 3.9


@pytest.mark.gpu
def test_gpu_moe_experts_in_several_passes(gen: torch.Generator, kernel: float) -> None:
    """More tokens than one pass of the fused MoE holds (``moe_pass_tokens``): the passes reuse
    one workspace and each writes its own tokens' rows."""
    t = _core.moe_pass_tokens(6, 8) + 37
    args = expert_args(gen, t, 6, 8, 128, 256, torch.bfloat16, idle_last=False)
    got = ops.moe_experts(*cuda(*args), 1.0)
    want, tol = moe_bound(*args, 1.0, "fp8", kernel)
    assert_within(got, want, tol, "gpu vs reference")


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 12, 40])
def test_gpu_mxfp4_scales_above_one(gen: torch.Generator, m: int, kernel: float) -> None:
    """UE8M0 codes up to 2^6: a scale above 2 takes the decoder's second multiply (decode and tiled
    forms), and the result still matches the reference and the CPU twin."""
    weight, scale = fp4_weight(gen, 96, 256, low=124, high=134)
    x = activations(gen, m, 256, dtype=torch.bfloat16)
    got = ops.quant_linear(*cuda(x, weight, scale))
    want, tol = linear_bound(x, weight, scale, 1, "fp8", kernel)
    assert_within(got, want, tol, "gpu vs reference")
    assert_within(got, ops.quant_linear(x, weight, scale).double(), 2 * tol, "gpu vs cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 12, 40])
def test_gpu_mxfp4_extreme_scale_codes(gen: torch.Generator, m: int, kernel: float) -> None:
    """UE8M0 codes 0 (2^-127) and 245-252 (up to 2^125, where 6 times the scale is still a finite
    float32) beside each other, with activations small enough that the sums stay finite: the FP8
    decode form's shortcut (a code plus 6 as a float exponent) would overflow past 248, and those
    steps take its slow path."""
    weight, scale = fp4_weight(gen, 96, 512, low=245, high=253)
    scale[torch.rand(scale.shape, generator=gen) < 0.1] = 0
    x = activations(gen, m, 512, dtype=torch.bfloat16, decades=1.0) * 1e-9
    got = ops.quant_linear(*cuda(x, weight, scale))
    want, tol = linear_bound(x, weight, scale, 1, "fp8", kernel)
    assert torch.isfinite(want).all() and want.abs().max() > 1e30
    assert_within(got, want, tol, "gpu vs reference")
    assert_within(got, ops.quant_linear(x, weight, scale).double(), 2 * tol, "gpu vs cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("idx_dtype,far", [(torch.int64, 2**40), (torch.int32, 2**31 - 1)], ids=["i64", "i32"])
def test_gpu_moe_pairs_with_ids_out_of_range_contribute_zero(gen: torch.Generator, idx_dtype: torch.dtype,
                                                             far: int) -> None:
    (x, idx, weights, *w), limit = moe_inputs(gen, "idle-expert", torch.float32, idx_dtype)
    experts = w[0].shape[0]
    bad = torch.zeros(idx.shape, dtype=torch.bool)
    bad[[0, 3, 5], [1, 0, 1]] = True
    bad[8] = True  # a token all of whose choices are out of range
    idx[0, 1], idx[3, 0], idx[5, 1] = experts, -1, far
    idx[8] = torch.tensor([experts, -(2**31)], dtype=idx_dtype)
    got = ops.moe_experts(*cuda(x, idx, weights, *w), limit)
    # The same call with those pairs pointed at a valid expert and weighted zero.
    want, tol = moe_bound(x, idx.masked_fill(bad, 0), weights.masked_fill(bad, 0.0), *w, limit, "fp8", slice_bound())
    assert_within(got, want, tol, "gpu vs reference")
    assert torch.equal(got[8].cpu(), torch.zeros(x.shape[1]))


@pytest.mark.gpu
def test_gpu_quant_ops_without_tokens(gen: torch.Generator) -> None:
    (x, idx, weights, *w), limit = moe_inputs(gen, "idle-expert", torch.bfloat16, torch.int32)
    out = ops.moe_experts(*cuda(x[:0], idx[:0], weights[:0], *w), limit)
    assert out.shape == (0, x.shape[1]) and out.device.type == "cuda" and out.dtype == torch.bfloat16
    weight, scale = fp8_weight(gen, 130, 160)
    out = ops.quant_linear(*cuda(torch.zeros(0, 160), weight, scale))
    assert out.shape == (0, 130) and out.device.type == "cuda"


def odd_address_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the GPU, contiguous but starting one byte past an allocation's aligned start."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")
    out = buf[1:].view(t.shape)
    out.copy_(t.cuda())
    return out


@pytest.mark.gpu
def test_gpu_quant_ops_refuse_misaligned_mxfp4_scales(gen: torch.Generator) -> None:
    """MXFP4 scale codes are copied four bytes at a time on the GPU: a scale tensor at an odd
    address is refused with an error naming it (rather than faulting the GPU), and the same values
    aligned then give the reference result."""
    weight, scale = fp4_weight(gen, 64, 256)
    x = activations(gen, 40, 256)
    with pytest.raises(ValueError, match="^scale: .*4-byte aligned"):
        ops.quant_linear(*cuda(x, weight), odd_address_copy(scale))
    got = ops.quant_linear(*cuda(x, weight), odd_address_copy(scale).clone())
    want, tol = linear_bound(x, weight, scale, 1, "fp8", slice_bound())
    assert_within(got, want, tol, "gpu vs reference")
    (xm, idx, weights, gate_up, gate_up_scale, down, down_scale), limit = moe_inputs(
        gen, "idle-expert", torch.float32, torch.int64)
    with pytest.raises(ValueError, match="^down_scale: .*4-byte aligned"):
        ops.moe_experts(*cuda(xm, idx, weights, gate_up, gate_up_scale, down), odd_address_copy(down_scale), limit)
    with pytest.raises(ValueError, match="^gate_up_scale: .*4-byte aligned"):
        ops.moe_experts(*cuda(xm, idx, weights, gate_up), odd_address_copy(gate_up_scale), *cuda(down, down_scale), limit)


@pytest.mark.gpu
def test_gpu_quant_ops_refuse_tensors_on_two_devices(gen: torch.Generator) -> None:
    x, weight, scale, _ = linear_inputs(gen, LINEAR_CASES[0], torch.float32)
    with pytest.raises(ValueError, match="^weight:"):
        ops.quant_linear(x, weight.cuda(), scale.cuda())
    with pytest.raises(ValueError, match="^scale:"):
        ops.quant_linear(x.cuda(), weight.cuda(), scale)
    (x, idx, weights, *w), limit = moe_inputs(gen, "k1", torch.float32, torch.int64)
    with pytest.raises(ValueError, match="^idx:"):
        ops.moe_experts(x.cuda(), idx, *cuda(weights, *w), limit)
    with pytest.raises(ValueError, match="^down:"):
        ops.moe_experts(*cuda(x, idx, weights, w[0], w[1]), w[2], w[3].cuda(), limit)


@pytest.mark.gpu
def test_gpu_quant_ops_capture_and_replay_in_cuda_graphs(gen: torch.Generator) -> None:
    """Both ops captured in one graph: replays equal eager calls, also after new inputs (a new routing
    among them: every pair on one expert) are copied into the captured tensors. The kernels sum in
    a fixed order (the combine over j in order), so equal means bit for bit."""
    ops.warm_up("cuda")
    x, weight, scale, _ = linear_inputs(gen, LINEAR_CASES[0], torch.bfloat16)
    x, weight, scale = cuda(x, weight, scale)
    # A decode call with a long K (on Hopper the fused kernel, its K splits a cluster).
    xd, wd, sd, _ = linear_inputs(gen, (False, (1,), 512, 4096, 1), torch.bfloat16)
    xd, wd, sd = cuda(xd, wd, sd)
    (xm, idx, weights, *w), limit = moe_inputs(gen, "idle-expert", torch.bfloat16, torch.int32)
    xm, idx, weights, *w = cuda(xm, idx, weights, *w)
    eager = (ops.quant_linear(x, weight, scale), ops.moe_experts(xm, idx, weights, *w, limit),
             ops.quant_linear(xd, wd, sd))
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        lin = ops.quant_linear(x, weight, scale)
        moe = ops.moe_experts(xm, idx, weights, *w, limit)
        dec = ops.quant_linear(xd, wd, sd)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(lin, eager[0]) and torch.equal(moe, eager[1]) and torch.equal(dec, eager[2])
    x.copy_(activations(gen, *x.shape, dtype=x.dtype).cuda())
    xd.copy_(activations(gen, *xd.shape, dtype=xd.dtype).cuda())
    xm.copy_(activations(gen, *xm.shape, dtype=xm.dtype, decades=2.0).cuda())
    idx.fill_(2)
    weights.copy_(torch.rand(weights.shape, generator=gen).cuda())
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(lin, ops.quant_linear(x, weight, scale))
    assert torch.equal(dec, ops.quant_linear(xd, wd, sd))
    assert torch.equal(moe, ops.moe_experts(xm, idx, weights, *w, limit))
    want, tol = moe_bound(xm.cpu(), idx.cpu(), weights.cpu(), *(t.cpu() for t in w), limit, "fp8", slice_bound())
    assert_within(moe, want, tol, "replayed graph vs reference")


@pytest.mark.gpu
def test_gpu_quant_ops_never_synchronize_the_host(gen: torch.Generator) -> None:
    """With torch's sync debug mode at "error", any synchronizing torch call (``.item()``,
    ``.tolist()``, a copy to the host, ``nonzero``) inside the ops would raise."""
    (x, idx, weights, *w), limit = moe_inputs(gen, "top3-partial-blocks", torch.float32, torch.int64)
    args = cuda(x, idx, weights, *w)
    lin_args = cuda(*linear_inputs(gen, LINEAR_CASES[3], torch.float32)[:3])
    ops.moe_experts(*args, limit)  # kernels loaded before the check
    ops.quant_linear(*lin_args)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ops.moe_experts(*args, limit)
        lin = ops.quant_linear(*lin_args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    want, tol = moe_bound(x, idx, weights, *w, limit, "fp8", slice_bound())
    assert_within(out, want, tol, "gpu vs reference")
    assert lin.shape == (3, LINEAR_CASES[3][2])


def test_experts_in_tiles_run_and_save_as_rows(gen: torch.Generator) -> None:
    """``Experts.tile()`` holds the MXFP4 experts in tiles: the same outputs, and the state dict
    (what exports write) and ``load_state_dict`` still speak DeepSeek's rows."""
    from dsv4rs.model.config import V4Config
    from dsv4rs.model.layers.moe import Experts

    cfg = V4Config.tiny(hidden_size=256, moe_intermediate_size=128, n_routed_experts=4, num_experts_per_tok=2)
    ex = Experts(cfg, quantized=True)
    for name in ("gate_up", "down"):
        getattr(ex, name).copy_(torch.randint(0, 256, getattr(ex, name).shape, dtype=torch.uint8, generator=gen))
    for name in ("gate_up_scale", "down_scale"):
        getattr(ex, name).fill_(120)
    rows = {k: v.clone() for k, v in ex.state_dict().items()}
    x = torch.randn(5, 256, generator=gen)
    idx = torch.randint(0, 4, (5, 2), generator=gen)
    w = torch.rand(5, 2, generator=gen)
    want = ex(x, idx, w)
    assert ex.tile() and ex.layout == "tiles" and ex.tile()
    assert not torch.equal(ex.gate_up, rows["gate_up"])
    assert torch.equal(ex(x, idx, w), want)
    saved = ex.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in rows.items())
    ex.load_state_dict(rows)
    assert torch.equal(ex.gate_up, ops.weight_tiles(rows["gate_up"])) and torch.equal(ex(x, idx, w), want)


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_quant_linear_module_in_tiles_runs_saves_and_narrows_as_rows(gen: torch.Generator, fmt: str) -> None:
    """``QuantLinear.tile()``: the same outputs and dequantized values; the state dict (and what
    ``load_state_dict`` takes) stays in DeepSeek's rows; ``narrow_`` cuts the stored rows."""
    from dsv4rs.model.layers.quant import QuantLinear

    layer = QuantLinear(256, 256, fmt=fmt)
    weight, scale = fp4_weight(gen, 256, 256) if fmt == "fp4" else fp8_weight(gen, 256, 256)
    layer.weight.copy_(weight.view(torch.uint8))
    layer.scale.copy_(scale)
    rows = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 256, generator=gen)
    want, values = layer(x), layer.dequantized()
    assert layer.tile() and layer.layout == "tiles" and not torch.equal(layer.weight, rows["weight"])
    assert torch.equal(layer(x), want) and torch.equal(layer.dequantized(), values)
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in rows.items())
    layer.load_state_dict(rows)
    assert torch.equal(layer(x), want)
    layer.narrow_(0, range(128, 256))  # (FP8: on its 128-row scale blocks)
    assert layer.layout == "tiles" and torch.equal(layer.dequantized(), values[128:])
    assert QuantLinear(256, 96, fmt=fmt).tile() is False  # 96 rows: no whole tiles


@pytest.mark.parametrize("shape,fp8", [((3, 256, 128), False), ((320, 256), True)])
def test_retile_in_place_a_few_rows_at_a_time_is_weight_tiles(gen: torch.Generator, shape: tuple, fp8: bool) -> None:
    from dsv4rs.model.layers.quant import retile_

    w = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    typed = w.view(torch.float8_e4m3fn) if fp8 else w
    want = ops.weight_tiles(typed).view(torch.uint8)
    x = w.clone()
    ptr = x.data_ptr()
    retile_(x, fp8, True, rows_at_once=64)
    assert x.data_ptr() == ptr and torch.equal(x, want)
    retile_(x, fp8, False, rows_at_once=128)
    assert torch.equal(x, w)
