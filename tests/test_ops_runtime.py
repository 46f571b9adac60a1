"""The format constants the Rust core exports, and the ops rope (CPU and GPU), copy_rows and
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


def assert_rope_gpu(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, inverse: bool, table: str) -> None:
    """The GPU op against the CPU op (float32 rounding apart) and the float64 reference. With
    exact angles the reference is the float64 result; the official table's reference takes its
    float32 sines and cosines from torch, within a float32 ulp of the ops' (correctly rounded)."""
    got = ops.rope(x.cuda(), positions.cuda(), freqs.cuda(), inverse=inverse, table=table)
    assert got.device.type == "cuda" and got.dtype == torch.float32 and got.shape == x.shape
    got = got.cpu().double()
    cpu = ops.rope(x, positions, freqs, inverse=inverse, table=table).double()
    assert ((got - cpu).abs() <= 1e-6 * cpu.abs().clamp_min(1.0)).all(), (got - cpu).abs().max()
    want = ref.apply_rope(x, positions, freqs, inverse=inverse, table=table)
    slack = 0 if table == "exact" else 2.0**-22 * x.double().abs().amax()
    assert ((got - want).abs() <= 2.0**-23 * want.abs() + 1e-8 + slack).all(), (got - want).abs().max()


@gpu
@pytest.mark.parametrize("shape,pairs", [((7, 64), 32), ((5, 3, 512), 32), ((4, 2, 3, 130), 32), ((9, 2, 65), 32),
                                         ((3, 8), 4), ((6, 4, 10), 1), ((2, 1, 16), 0), ((300, 128), 64),
                                         ((1000, 3, 130), 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("table", ops.ROPE_TABLES)
def test_rope_gpu_matches_cpu_and_reference(gen: torch.Generator, shape: tuple[int, ...], pairs: int,
                                            dtype: torch.dtype, inverse: bool, table: str) -> None:
    x, positions, freqs = rope_inputs(gen, shape, pairs, torch.int64, torch.float64)
    assert_rope_gpu(x.to(dtype), positions, freqs, inverse, table)


@gpu
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("freq_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("table", ops.ROPE_TABLES)
def test_rope_gpu_index_and_frequency_dtypes(gen: torch.Generator, pos_dtype: torch.dtype,
                                             freq_dtype: torch.dtype, table: str) -> None:
    x, positions, freqs = rope_inputs(gen, (33, 2, 512), 32, pos_dtype, freq_dtype)
    assert_rope_gpu(x, positions, freqs, False, table)


@gpu
@pytest.mark.profiler
@pytest.mark.parametrize("shape,kernel", [((1, 64, 128), "dsv4_rope_one"), ((1048, 2, 128), "dsv4_rope_one"),
                                          ((1049, 2, 128), "dsv4_rope"), ((2048, 16, 64), "dsv4_rope")])
def test_rope_gpu_takes_a_value_a_thread_where_eight_would_leave_the_gpu_idle(
        gen: torch.Generator, shape: tuple[int, ...], kernel: str) -> None:
    # A call that fills fewer than 132 blocks of 256 threads x 8 values (at most 268,288 values)
    # takes one value a thread: the first shape is a decode step's 64 indexer heads.
    from profiled import launched_kernels

    x, positions, freqs = rope_inputs(gen, shape, 32, torch.int64, torch.float64)
    xg, pg, fg = x.cuda(), positions.cuda(), freqs.cuda()
    assert launched_kernels(lambda: ops.rope(xg, pg, fg)) == {kernel}
    assert_rope_gpu(x, positions, freqs, False, "exact")


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
        ops.rope(x[:, :32].contiguous(), pos, f)  # 32 frequencies rotate 64 dims
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
    want = ref.apply_rope(torch.ones(2, 8), torch.tensor([0, 3]), INV_FREQ[:4], table="official")
    torch.testing.assert_close(got.double(), want)


# ---------------------------------------------------------------------------------------------
# copy_rows: cache rows byte for byte between caches of one format

def _random_bytes(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Random bits of any dtype (NaN payloads included: the copy must keep every byte)."""
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * size), generator=gen, dtype=torch.uint8)
    return raw.view(dtype)


# name -> make(num_pages, gen): a cache of random bytes in each format copy_rows takes.
CACHE_FORMATS = {
    "entries": lambda p, g: _random_bytes(g, (p, ops.PAGE_ROWS * ops.MAIN_ENTRY_BYTES), torch.uint8),
    "fp4 keys": lambda p, g: _random_bytes(g, (p, ops.PAGE_ROWS * ops.INDEX_KEY_BYTES["fp4"]), torch.uint8),
    "fp8 keys": lambda p, g: _random_bytes(g, (p, ops.PAGE_ROWS * ops.INDEX_KEY_BYTES["fp8"]), torch.uint8),
    "bf16 rows": lambda p, g: _random_bytes(g, (p, ops.PAGE_ROWS, 512), torch.bfloat16),
    "f32 rows": lambda p, g: _random_bytes(g, (p, ops.PAGE_ROWS, 130), torch.float32),
    "bf16 rows of 3": lambda p, g: _random_bytes(g, (p, ops.PAGE_ROWS, 3), torch.bfloat16),
    "f32 rows of 1": lambda p, g: _random_bytes(g, (p, ops.PAGE_ROWS, 1), torch.float32),
}
def row_pairs(gen: torch.Generator, n: int, dst_pages: int, src_pages: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n pairs: distinct destination rows, any source rows, a few -1 on either side."""
    dst_rows = torch.randperm(dst_pages * ops.PAGE_ROWS, generator=gen)[:n]
    src_rows = torch.randint(0, src_pages * ops.PAGE_ROWS, (len(dst_rows),), generator=gen)
    if len(dst_rows) > 4:
        dst_rows[1], src_rows[2] = -1, -1
    return dst_rows, src_rows


@pytest.mark.parametrize("fmt", list(CACHE_FORMATS))
@pytest.mark.parametrize("n,dst_pages,src_pages", [(0, 1, 1), (1, 1, 1), (50, 1, 3), (64, 2, 1), (700, 12, 5)])
def test_copy_rows_matches_the_twin(gen: torch.Generator, fmt: str, n: int, dst_pages: int, src_pages: int) -> None:
    dst, src = CACHE_FORMATS[fmt](dst_pages, gen), CACHE_FORMATS[fmt](src_pages, gen)
    dst_rows, src_rows = row_pairs(gen, n, dst_pages, src_pages)
    want = ref.copy_rows(dst, dst_rows, src, src_rows)
    src_before = src.clone()
    ops.copy_rows(dst, dst_rows, src, src_rows)
    assert torch.equal(dst.view(torch.uint8), want)
    assert torch.equal(src.view(torch.uint8), src_before.view(torch.uint8)), "src is read only"


def test_copy_rows_moves_what_kv_and_key_writes_stored(gen: torch.Generator) -> None:
    entries, keys = torch.randn(100, 512, generator=gen), torch.randn(100, 128, generator=gen)
    rows = torch.randperm(128, generator=gen)[:100]
    for make, write, read, x in [(ops.new_kv_cache, ops.kv_write, ops.kv_read, entries),
                                 (lambda p: ops.new_index_key_cache(p, "fp8"),
                                  lambda c, s, v: ops.index_key_write(c, s, v, "fp8"),
                                  lambda c, r: ops.index_key_read(c, r, "fp8"), keys)]:
        src, dst = make(2), make(3)
        write(src, torch.arange(100), x)
        ops.copy_rows(dst, rows + 64, src, torch.arange(100))
        assert torch.equal(read(dst, rows + 64), read(src, torch.arange(100)))
        assert torch.equal(read(dst, torch.arange(64)), torch.zeros(64, x.shape[1])), "rows not named stay"


def test_copy_rows_between_disjoint_views_of_one_buffer(gen: torch.Generator) -> None:
    big = CACHE_FORMATS["entries"](4, gen)
    dst, src = big[:2], big[2:]
    dst_rows, src_rows = row_pairs(gen, 30, 2, 2)
    want = ref.copy_rows(dst, dst_rows, src, src_rows)
    ops.copy_rows(dst, dst_rows, src, src_rows)
    assert torch.equal(dst, want)


def test_copy_rows_duplicates_and_skips(gen: torch.Generator) -> None:
    dst, src = CACHE_FORMATS["fp4 keys"](1, gen), CACHE_FORMATS["fp4 keys"](1, gen)
    # A destination named twice, once by a skipped pair: one copy, no error.
    dst_rows, src_rows = torch.tensor([5, 5, -1, 7]), torch.tensor([-1, 9, 3, -1])
    want = ref.copy_rows(dst, dst_rows, src, src_rows)
    ops.copy_rows(dst, dst_rows, src, src_rows)
    assert torch.equal(dst, want)
    with pytest.raises(ValueError, match="dst_rows: row 5 is the destination of more than one"):
        ops.copy_rows(dst, torch.tensor([5, 6, 5]), src, torch.tensor([1, 2, 3]))


def test_copy_rows_rejects_bad_inputs(gen: torch.Generator) -> None:
    entries, keys = CACHE_FORMATS["entries"](2, gen), CACHE_FORMATS["fp4 keys"](2, gen)
    rows, one = torch.arange(3), torch.zeros(3, dtype=torch.int64)
    with pytest.raises(IndexError, match="dst_rows"):
        ops.copy_rows(entries, torch.tensor([0, 128, 1]), entries.clone(), one)
    with pytest.raises(IndexError, match="src_rows"):
        ops.copy_rows(entries, rows, entries.clone(), torch.tensor([0, -2, 1]))
    with pytest.raises(ValueError, match="src: must have the format of dst"):
        ops.copy_rows(entries, rows, keys, rows)
    bf16 = CACHE_FORMATS["bf16 rows"](1, gen)
    with pytest.raises(ValueError, match="src: must have the format of dst"):
        ops.copy_rows(bf16, rows, bf16.float(), rows)
    with pytest.raises(ValueError, match="src: must have the format of dst"):
        ops.copy_rows(bf16, rows, bf16[:, :, :256].contiguous(), rows)
    with pytest.raises(ValueError, match="dst: expected uint8"):
        ops.copy_rows(torch.zeros(2, 1000, dtype=torch.uint8), rows, entries, rows)
    with pytest.raises(ValueError, match="dst: expected shape"):
        ops.copy_rows(torch.zeros(2, 32, 512), rows, entries, rows)
    with pytest.raises(TypeError, match="dst"):
        ops.copy_rows(torch.zeros(2, 64, 8, dtype=torch.int32), rows, entries, rows)
    with pytest.raises(TypeError, match="dst_rows"):
        ops.copy_rows(entries, rows.int(), entries.clone(), rows)
    with pytest.raises(ValueError, match="src_rows"):
        ops.copy_rows(entries, rows, entries.clone(), rows[:2])
    with pytest.raises(ValueError, match="dst, src: must not overlap"):
        ops.copy_rows(entries, rows, entries, rows + 64)
    big = CACHE_FORMATS["entries"](3, gen)
    with pytest.raises(ValueError, match="dst, src: must not overlap"):
        ops.copy_rows(big[:2], rows, big[1:], rows)
    with pytest.raises(ValueError, match="dst"):
        ops.copy_rows(entries.t(), rows, entries.clone(), rows)
    with pytest.raises(TypeError, match="src"):
        ops.copy_rows(entries, rows, [1, 2, 3], rows)


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
    dst, src = CACHE_FORMATS["fp8 keys"](1, gen), CACHE_FORMATS["fp8 keys"](2, gen)
    dst_rows, src_rows = row_pairs(gen, 20, 1, 2)
    torch.library.opcheck(torch.ops.dsv4rs.copy_rows.default, (dst, dst_rows, src, src_rows))


# ---------------------------------------------------------------------------------------------
# copy_rows and index_key_round_trip on the GPU


@gpu
@pytest.mark.parametrize("fmt", list(CACHE_FORMATS))
@pytest.mark.parametrize("n,dst_pages,src_pages", [(0, 1, 1), (1, 1, 1), (64, 2, 1), (700, 12, 5), (5000, 100, 80)])
def test_copy_rows_gpu_matches_cpu(gen: torch.Generator, fmt: str, n: int, dst_pages: int, src_pages: int) -> None:
    dst, src = CACHE_FORMATS[fmt](dst_pages, gen), CACHE_FORMATS[fmt](src_pages, gen)
    dst_rows, src_rows = row_pairs(gen, n, dst_pages, src_pages)
    dev = dst.cuda()
    ops.copy_rows(dev, dst_rows.cuda(), src.cuda(), src_rows.cuda())
    ops.copy_rows(dst, dst_rows, src, src_rows)
    assert torch.equal(dev.cpu().view(torch.uint8), dst.view(torch.uint8))


@gpu
@pytest.mark.parametrize("dtype,dim", [(torch.bfloat16, 1), (torch.bfloat16, 3), (torch.float32, 3), (torch.bfloat16, 512)])
def test_copy_rows_gpu_unaligned_rows(gen: torch.Generator, dtype: torch.dtype, dim: int) -> None:
    # Caches whose rows start 2 or 4 bytes off a 16-byte boundary take the narrower copies.
    def offset_cache(flat: torch.Tensor, pages: int) -> torch.Tensor:
        return flat[1:].view(pages, ops.PAGE_ROWS, dim)
    dst_flat, src_flat = (_random_bytes(gen, (p * ops.PAGE_ROWS * dim + 1,), dtype) for p in (3, 2))
    dst_rows, src_rows = row_pairs(gen, 150, 3, 2)
    want = ref.copy_rows(offset_cache(dst_flat, 3), dst_rows, offset_cache(src_flat, 2), src_rows)
    dev = offset_cache(dst_flat.cuda(), 3)
    ops.copy_rows(dev, dst_rows.cuda(), offset_cache(src_flat.cuda(), 2), src_rows.cuda())
    assert torch.equal(dev.cpu().view(torch.uint8), want)


@gpu
def test_copy_rows_gpu_skips_ids_outside_the_caches(gen: torch.Generator) -> None:
    dst, src = CACHE_FORMATS["entries"](2, gen), CACHE_FORMATS["entries"](1, gen)
    dst_rows = torch.tensor([3, 128, -7, 10**12, 9, 11])
    src_rows = torch.tensor([1, 2, 3, 4, 64, -5])
    dev = dst.cuda()
    ops.copy_rows(dev, dst_rows.cuda(), src.cuda(), src_rows.cuda())
    ops.copy_rows(dst, torch.tensor([3, -1, -1, -1, -1, -1]), src, torch.tensor([1, -1, -1, -1, -1, -1]))
    assert torch.equal(dev.cpu(), dst), "only the pair inside both caches is copied"


@gpu
def test_copy_rows_gpu_rejects_bad_inputs(gen: torch.Generator) -> None:
    dst, src = CACHE_FORMATS["entries"](2, gen).cuda(), CACHE_FORMATS["entries"](2, gen).cuda()
    rows = torch.arange(3, device="cuda")
    with pytest.raises(ValueError, match="src"):
        ops.copy_rows(dst, rows, src.cpu(), rows)
    with pytest.raises(ValueError, match="dst, src: must not overlap"):
        ops.copy_rows(dst, rows, dst, rows)
    with pytest.raises(ValueError, match="src: must have the format of dst"):
        ops.copy_rows(dst, rows, CACHE_FORMATS["fp8 keys"](2, gen).cuda(), rows)
    with pytest.raises(TypeError, match="src_rows"):
        ops.copy_rows(dst, rows, src, rows.int())


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
    x[1, 3], x[3, :], x[4, 100] = float("nan"), float("nan"), float("inf")
    got = ops.index_key_round_trip(x.cuda(), fmt)
    read = ops.index_key_read(ops.quantize_index_keys(x.cuda(), fmt), torch.arange(6, device="cuda"), fmt)
    assert torch.equal(bits(got), bits(read))
    # A block holding an infinity gets the NaN scale: its key reads back non-finite.
    assert not bool(got[4].isfinite().all()) and bool(got[5].isfinite().all())


@gpu
def test_gpu_writes_of_infinite_entries_end_and_read_back_non_finite(gen: torch.Generator) -> None:
    """The CPU refuses non-finite entries; the GPU cannot raise, so it must at least finish and
    mark the row (a NaN scale), leaving the other rows intact."""
    x = torch.randn(4, 512, generator=gen)
    x[2, 7] = float("-inf")
    cache = ops.new_kv_cache(1, "cuda")
    ops.kv_write(cache, torch.arange(4, device="cuda"), x.cuda())
    back = ops.kv_read(cache, torch.arange(4, device="cuda")).cpu()
    assert not bool(back[2].isfinite().all())
    torch.testing.assert_close(back[[0, 1, 3]], ref.entry_quant_dequant(x[[0, 1, 3]]).float(), rtol=0, atol=0)


@gpu
def test_new_ops_gpu_run_on_the_current_stream_and_in_graphs(gen: torch.Generator) -> None:
    x, pos, keys = torch.randn(40, 4, 64, generator=gen), torch.arange(40) * 9_000, key_values(gen, 40)
    dst, src = CACHE_FORMATS["entries"](2, gen), CACHE_FORMATS["entries"](2, gen)
    dst_rows, src_rows = row_pairs(gen, 90, 2, 2)
    want = (ops.rope(x, pos, INV_FREQ), ops.index_key_round_trip(keys, "fp8"), ref.copy_rows(dst, dst_rows, src, src_rows))
    x, pos, keys, f = x.cuda(), pos.cuda(), keys.cuda(), INV_FREQ.cuda()
    src, dst_rows, src_rows = src.cuda(), dst_rows.cuda(), src_rows.cuda()

    def run(dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ops.copy_rows(dst, dst_rows, src, src_rows)
        return ops.rope(x, pos, f), ops.index_key_round_trip(keys, "fp8")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = dst.cuda()
        r, k = run(on_side)
    side.synchronize()
    torch.testing.assert_close(r.cpu(), want[0], rtol=0, atol=1e-6)
    assert torch.equal(k.cpu(), want[1]) and torch.equal(on_side.cpu(), want[2])

    ops.warm_up("cuda")
    in_graph = dst.cuda()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        r, k = run(in_graph)
    in_graph.copy_(dst.cuda())
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(r.cpu(), want[0], rtol=0, atol=1e-6)
    assert torch.equal(k.cpu(), want[1]) and torch.equal(in_graph.cpu(), want[2])
