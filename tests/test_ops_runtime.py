"""The format constants the Rust core exports, and the ops rope (CPU and GPU) and
index_key_round_trip against the CPU op and the float64 reference. GPU tests carry the `gpu`
marker."""

from __future__ import annotations

import pytest
import torch

from dsv4rs import _core, ops
from dsv4rs import reference as ref

gpu = pytest.mark.gpu


# ---------------------------------------------------------------------------------------------
# Format constants


def test_format_constants_come_from_the_core() -> None:
    want = {"PAGE_ROWS": 64, "ENTRY_DIM": 512, "NOPE_DIM": 448, "ROPE_DIM": 64, "INDEX_DIM": 128,
            "MAIN_ENTRY_BYTES": 584, "MAIN_DATA_BYTES": 576, "FP8_BLOCK": 64, "FP4_BLOCK": 32}
    for name, value in want.items():
        assert getattr(_core, name) == value and getattr(ops, name) == value, name
        assert type(getattr(ops, name)) is int, name
    assert _core.INDEX_KEY_BYTES == ops.INDEX_KEY_BYTES == {"fp4": 68, "fp8": 132}
    for name in ("PAGE_ROWS", "ENTRY_DIM", "NOPE_DIM", "INDEX_DIM", "FP8_BLOCK", "FP4_BLOCK"):
        assert getattr(ref, name) == getattr(ops, name), name
    assert ops.NOPE_DIM + ops.ROPE_DIM == ops.ENTRY_DIM
    assert ops.MAIN_DATA_BYTES == ops.NOPE_DIM + 2 * ops.ROPE_DIM
    assert ops.new_kv_cache(2).shape == (2, ops.PAGE_ROWS * ops.MAIN_ENTRY_BYTES)
    for fmt, row in ops.INDEX_KEY_BYTES.items():
        assert ops.new_index_key_cache(1, fmt).shape == (1, ops.PAGE_ROWS * row)


# ---------------------------------------------------------------------------------------------
# RoPE on the GPU: the CPU op's math (float64 angles, sines, cosines and rotation) in CUDA

INV_FREQ = ref.rope_inv_freq(64, 160000.0, yarn_factor=16.0)


def rope_inputs(gen: torch.Generator, shape: tuple[int, ...], pairs: int, pos_dtype: torch.dtype,
                freq_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(*shape, generator=gen)
    positions = torch.randint(-(1 << 20), 1 << 20, (shape[0],), generator=gen).to(pos_dtype)
    if shape[0]:
        positions[0] = 0
    if shape[0] > 1:
        positions[1] = 1 << 20  # the longest context
    freqs = ref.rope_inv_freq(max(2, 2 * pairs), 10000.0)[:pairs] if pairs != 32 else INV_FREQ
    return x, positions, freqs.to(freq_dtype)


def assert_rope_gpu(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, inverse: bool) -> None:
    """The GPU op against the CPU op (float32 rounding apart) and the float64 reference."""
    got = ops.rope(x.cuda(), positions.cuda(), freqs.cuda(), inverse=inverse)
    assert got.device.type == "cuda" and got.dtype == torch.float32 and got.shape == x.shape
    got = got.cpu().double()
    cpu = ops.rope(x, positions, freqs, inverse=inverse).double()
    assert ((got - cpu).abs() <= 1e-6 * cpu.abs().clamp_min(1.0)).all(), (got - cpu).abs().max()
    want = ref.apply_rope(x, positions, freqs, inverse=inverse)
    assert ((got - want).abs() <= 2.0**-23 * want.abs() + 1e-8).all(), (got - want).abs().max()


@gpu
@pytest.mark.parametrize("shape,pairs", [((7, 64), 32), ((5, 3, 512), 32), ((4, 2, 3, 130), 32), ((9, 2, 65), 32),
                                         ((3, 8), 4), ((6, 4, 10), 1), ((2, 1, 16), 0), ((300, 128), 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inverse", [False, True])
def test_rope_gpu_matches_cpu_and_reference(gen: torch.Generator, shape: tuple[int, ...], pairs: int,
                                            dtype: torch.dtype, inverse: bool) -> None:
    x, positions, freqs = rope_inputs(gen, shape, pairs, torch.int64, torch.float64)
    assert_rope_gpu(x.to(dtype), positions, freqs, inverse)


@gpu
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("freq_dtype", [torch.float32, torch.float64])
def test_rope_gpu_index_and_frequency_dtypes(gen: torch.Generator, pos_dtype: torch.dtype,
                                             freq_dtype: torch.dtype) -> None:
    x, positions, freqs = rope_inputs(gen, (33, 2, 512), 32, pos_dtype, freq_dtype)
    assert_rope_gpu(x, positions, freqs, False)


@gpu
def test_rope_gpu_edge_cases(gen: torch.Generator) -> None:
    # No tokens, no values per token, position 0 (identity), and a round trip.
    for shape in [(0, 64), (4, 0, 64), (3, 2, 0)]:
        x = torch.zeros(shape)
        got = ops.rope(x.cuda(), torch.zeros(shape[0], dtype=torch.int64, device="cuda"),
                       INV_FREQ[: shape[-1] // 2].cuda())
        assert got.shape == x.shape and got.device.type == "cuda"
    x = torch.randn(5, 64, generator=gen).cuda()
    zero = torch.zeros(5, dtype=torch.int64, device="cuda")
    assert torch.equal(ops.rope(x, zero, INV_FREQ.cuda()), x)
    pos = torch.arange(5, device="cuda") * 200_000
    back = ops.rope(ops.rope(x, pos, INV_FREQ.cuda()), pos, INV_FREQ.cuda(), inverse=True)
    torch.testing.assert_close(back, x, rtol=1e-6, atol=1e-6)


@gpu
def test_rope_gpu_rejects_bad_inputs() -> None:
    x, pos, f = torch.zeros(3, 64, device="cuda"), torch.zeros(3, dtype=torch.int64, device="cuda"), INV_FREQ.cuda()
    with pytest.raises(ValueError, match="positions"):
        ops.rope(x, pos[:2], f)
    with pytest.raises(ValueError, match="inv_freq"):
        ops.rope(x[:, :32], pos, f)
    with pytest.raises(TypeError, match="x"):
        ops.rope(x.int(), pos, f)
    with pytest.raises(TypeError, match="positions"):
        ops.rope(x, pos.float(), f)
    with pytest.raises(TypeError, match="inv_freq"):
        ops.rope(x, pos, f.half())
    with pytest.raises(ValueError, match="inv_freq"):
        ops.rope(x, pos, f.cpu())
    with pytest.raises(ValueError, match="x"):
        ops.rope(torch.zeros(64, device="cuda"), pos[:1], f)


def test_rope_rejects_mixed_devices_and_bad_dtypes_on_the_cpu() -> None:
    x, pos = torch.zeros(3, 64), torch.zeros(3, dtype=torch.int64)
    with pytest.raises(TypeError, match="positions"):
        ops.rope(x, pos.float(), INV_FREQ)
    with pytest.raises(TypeError, match="inv_freq"):
        ops.rope(x, pos, INV_FREQ.half())
    with pytest.raises(ValueError, match="inv_freq: contains a non-finite"):
        ops.rope(x, pos, torch.full((32,), float("inf")))
    # int32 positions reach the CPU op as they are.
    got = ops.rope(torch.ones(2, 8), torch.tensor([0, 3], dtype=torch.int32), INV_FREQ[:4])
    torch.testing.assert_close(got.double(), ref.apply_rope(torch.ones(2, 8), torch.tensor([0, 3]), INV_FREQ[:4]))


# ---------------------------------------------------------------------------------------------
# index_key_round_trip: index_key_write then index_key_read, without a cache


def key_values(gen: torch.Generator, n: int) -> torch.Tensor:
    """Keys whose magnitudes span 1e-6 .. 1e6 across rows, with zero, tie and tiny edge rows."""
    x = torch.randn(n, 128, generator=gen) * torch.logspace(-6, 6, max(n, 1))[:n, None]
    if n >= 4:
        x[0] = 0.0
        x[1, :8] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 6.0, 5.0, 0.75, -0.25])
        x[2] = 1e-5  # below the amax floor
        x[3, 0] = 1e38  # near the top of float32 (2^128 would decode to inf)
    return x


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [0, 1, 4, 65, 300])
def test_index_key_round_trip_is_write_then_read(gen: torch.Generator, fmt: str, dtype: torch.dtype, n: int) -> None:
    x = key_values(gen, n).to(dtype)
    got = ops.index_key_round_trip(x, fmt)
    assert got.dtype == torch.float32 and got.shape == (n, 128)
    read = ops.index_key_read(ops.quantize_index_keys(x, fmt), torch.arange(n), fmt)
    assert torch.equal(bits(got), bits(read))
    twin = ref.fp4_quant_dequant(x) if fmt == "fp4" else ref.fp8_key_quant_dequant(x)
    assert torch.equal(got.double(), twin)


def test_index_key_round_trip_rejects_bad_inputs() -> None:
    x = torch.zeros(3, 128)
    with pytest.raises(ValueError, match='fmt: expected "fp4" or "fp8"'):
        ops.index_key_round_trip(x, "bf16")
    with pytest.raises(ValueError, match="keys"):
        ops.index_key_round_trip(torch.zeros(3, 127))
    with pytest.raises(ValueError, match="keys"):
        ops.index_key_round_trip(torch.zeros(128))
    with pytest.raises(TypeError, match="keys"):
        ops.index_key_round_trip(x.double())
    with pytest.raises(TypeError, match="keys"):
        ops.index_key_round_trip("keys")
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[2, 5] = bad
        with pytest.raises(ValueError, match="keys: contains a non-finite value"):
            ops.index_key_round_trip(y, "fp8")


def test_new_ops_opcheck(gen: torch.Generator) -> None:
    torch.library.opcheck(torch.ops.dsv4rs.index_key_round_trip.default, (torch.randn(5, 128, generator=gen), "fp4"))


# ---------------------------------------------------------------------------------------------
# index_key_round_trip on the GPU


@gpu
@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [0, 1, 4, 300, 5000])
def test_index_key_round_trip_gpu(gen: torch.Generator, fmt: str, dtype: torch.dtype, n: int) -> None:
    x = key_values(gen, n).to(dtype)
    got = ops.index_key_round_trip(x.cuda(), fmt)
    assert got.device.type == "cuda"
    read = ops.index_key_read(ops.quantize_index_keys(x.cuda(), fmt), torch.arange(n, device="cuda"), fmt)
    assert torch.equal(bits(got), bits(read)), "the write kernel then the read kernel"
    assert torch.equal(bits(got.cpu()), bits(ops.index_key_round_trip(x, fmt))), "the CPU op"
    twin = ref.fp4_quant_dequant(x) if fmt == "fp4" else ref.fp8_key_quant_dequant(x)
    assert torch.equal(got.cpu().double(), twin)


@gpu
@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_index_key_round_trip_gpu_non_finite_as_the_write_kernel(gen: torch.Generator, fmt: str) -> None:
    x = torch.randn(6, 128, generator=gen)
    x[1, 3], x[2, 40], x[3, :] = float("nan"), float("inf"), float("-inf")
    got = ops.index_key_round_trip(x.cuda(), fmt)
    read = ops.index_key_read(ops.quantize_index_keys(x.cuda(), fmt), torch.arange(6, device="cuda"), fmt)
    assert torch.equal(bits(got), bits(read))

