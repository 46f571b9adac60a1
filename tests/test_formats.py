"""KV-entry formats (docs/model.md section 5) through dsv4rs.ops on the CPU: layout, round-trip error,
and argument checks. Bit-identity with the reference and the GPU lives in test_formats_parity.py
and test_gpu_formats.py."""

from __future__ import annotations

import pytest
import torch

from dsv4rs import ops
from fp8_cases import blocks, rne_codes

MAIN_PAGE = ops.PAGE_ROWS * ops.MAIN_ENTRY_BYTES


def rand(gen: torch.Generator, *shape: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


@pytest.mark.parametrize("n", [1, 63, 64, 65, 200])
def test_entry_round_trip_error_within_fp8_bound(gen: torch.Generator, n: int) -> None:
    x = rand(gen, n, 512) * torch.logspace(-3, 3, n).unsqueeze(1)
    cache = ops.quantize_entries(x)
    assert cache.shape == ((n + 63) // 64, MAIN_PAGE)
    y = ops.kv_read(cache, torch.arange(n))
    nope_x, nope_y = x[:, :448].reshape(n, 7, 64), y[:, :448].reshape(n, 7, 64)
    # e4m3: half an ulp of 3 mantissa bits is 2^-4 relative; below the scale's subnormal range the
    # absolute step is 2^-9 * scale, and scale <= 2 * amax / 448.
    scale = 2 * nope_x.abs().amax(-1, keepdim=True).clamp_min(1e-4) / 448
    assert ((nope_y - nope_x).abs() <= nope_x.abs() / 16 + scale * 2**-10).all()
    assert torch.equal(y[:, 448:], x[:, 448:].bfloat16().float())


def test_entry_layout_rows_then_scales(gen: torch.Generator) -> None:
    x = rand(gen, 70, 512)
    cache = ops.quantize_entries(x)
    page1 = cache[1]
    row = 70 - 64 - 1  # last row, on page 1
    data, scales = page1[row * 576 : (row + 1) * 576], page1[64 * 576 + row * 8 : 64 * 576 + (row + 1) * 8]
    rope = data[448:].view(torch.bfloat16).float()
    assert torch.equal(rope, x[-1, 448:].bfloat16().float())
    amax = x[-1, :448].reshape(7, 64).abs().amax(-1)
    e = scales[:7].long() - 127
    assert (amax <= 448 * torch.exp2(e.double())).all() and (amax > 448 * torch.exp2(e.double() - 1)).all()
    assert scales[7] == 0
    assert (page1[(row + 1) * 576 : 64 * 576] == 0).all(), "unused rows stay zero"


def entry_rows(cache: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(data [n, 576], scales [n, 8])``: the bytes of rows ``0 .. n - 1`` of a KV cache."""
    pages = cache[: (n + 63) // 64]
    data = pages[:, : 64 * 576].reshape(-1, 576)[:n]
    scales = pages[:, 64 * 576 :].reshape(-1, 8)[:n]
    return data, scales


def test_fp8_codes_round_to_nearest_even_at_every_boundary(gen: torch.Generator) -> None:
    """Each e4m3 code's value, each midpoint between neighbours and their float32 neighbours
    (tests/fp8_cases.py), at block scales 2^0, 2^-13 and 2^9: the entry's codes are torch's own
    e4m3 rounding (ties to even), its scale bytes ``e + 127``; the same for FP8 indexer keys. (The
    GPU's bytes are held to these in test_gpu_formats.py.)"""
    x, e = blocks(64, per_row=7)
    entries = torch.cat([x, torch.randn(x.shape[0], 64, generator=gen)], dim=1)
    data, scales = entry_rows(ops.quantize_entries(entries), x.shape[0])
    assert torch.equal(data[:, :448], rne_codes(x, e))
    assert torch.equal(scales[:, :7].long(), (e + 127)[:, None].expand(-1, 7))
    keys, ke = blocks(128)
    cache = ops.quantize_index_keys(keys, "fp8")
    codes = cache[: (keys.shape[0] + 63) // 64, : 64 * 128].reshape(-1, 128)[: keys.shape[0]]
    assert torch.equal(codes, rne_codes(keys, ke))
    assert torch.equal(ops.index_key_read(cache, torch.arange(keys.shape[0]), "fp8"),
                       codes.view(torch.float8_e4m3fn).float() * torch.pow(2.0, ke.float())[:, None])


def test_bf16_input_equals_float32_of_same_values(gen: torch.Generator) -> None:
    x = rand(gen, 33, 512).bfloat16()
    assert torch.equal(ops.quantize_entries(x), ops.quantize_entries(x.float()))


def test_kv_write_scatter_and_skip(gen: torch.Generator) -> None:
    cache = ops.new_kv_cache(3)
    x = rand(gen, 4, 512)
    slots = torch.tensor([130, -1, 5, 64])
    ops.kv_write(cache, slots, x)
    y = ops.kv_read(cache, torch.tensor([130, 5, 64, -1, 0]))
    ref = ops.kv_read(ops.quantize_entries(x), torch.tensor([0, 2, 3]))
    assert torch.equal(y[:3], ref)
    assert (y[3:] == 0).all()


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
@pytest.mark.parametrize("n", [1, 64, 129])
def test_index_key_round_trip(gen: torch.Generator, fmt: str, n: int) -> None:
    x = rand(gen, n, 128)
    cache = ops.quantize_index_keys(x, fmt)
    assert cache.shape == ((n + 63) // 64, 64 * ops.INDEX_KEY_BYTES[fmt])
    y = ops.index_key_read(cache, torch.arange(n), fmt)
    block = 32 if fmt == "fp4" else 128
    xb, yb = x.reshape(n, -1, block), y.reshape(n, -1, block)
    qmax = 6.0 if fmt == "fp4" else 448.0
    e = torch.ceil(torch.log2(xb.abs().amax(-1, keepdim=True).clamp_min(1e-4) / qmax))
    mant = 1 if fmt == "fp4" else 3
    # Half a grid step at the value's binade (at least the subnormal binade of the format).
    min_binade = torch.exp2(e + (0 if fmt == "fp4" else -6))
    binade = torch.maximum(torch.exp2(torch.floor(torch.log2(xb.abs().clamp_min(1e-30)))), min_binade)
    assert ((yb - xb).abs() <= binade * 2.0 ** -(mant + 1) * (1 + 1e-6)).all()


def test_hadamard_orthonormal(gen: torch.Generator) -> None:
    x = rand(gen, 17, 128)
    y = ops.hadamard128(x)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1), rtol=1e-5, atol=0)
    torch.testing.assert_close(ops.hadamard128(y), x, rtol=0, atol=1e-5)
    assert ops.hadamard128(torch.empty(0, 128)).shape == (0, 128)


def test_empty_inputs() -> None:
    cache = ops.new_kv_cache(1)
    ops.kv_write(cache, torch.empty(0, dtype=torch.int64), torch.empty(0, 512))
    assert (cache == 0).all()
    assert ops.kv_read(cache, torch.empty(0, dtype=torch.int64)).shape == (0, 512)
    assert ops.quantize_entries(torch.empty(0, 512)).shape == (0, MAIN_PAGE)


BAD_WRITES = [
    ("entries", dict(entries=torch.zeros(2, 500)), ValueError, "expected shape"),
    ("entries", dict(entries=torch.zeros(2, 512, dtype=torch.float64)), TypeError, "float32 or bfloat16"),
    ("slots", dict(slots=torch.zeros(2, dtype=torch.int32)), TypeError, "int64"),
    ("slots", dict(slots=torch.tensor([0, 64])), IndexError, "outside"),
    ("slots", dict(slots=torch.tensor([0, -2])), IndexError, "outside"),
    ("slots", dict(slots=torch.tensor([3, 3])), ValueError, "more than once"),
    ("slots", dict(slots=torch.tensor([1])), ValueError, "expected shape"),
    ("cache", dict(cache=torch.zeros(1, 100, dtype=torch.uint8)), ValueError, "37376"),
    ("cache", dict(cache=torch.zeros(1, MAIN_PAGE)), TypeError, "uint8"),
    ("entries", dict(entries=torch.full((2, 512), float("nan"))), ValueError, "non-finite"),
    ("entries", dict(entries=torch.zeros(512, 2).t()), ValueError, "contiguous"),
    ("entries", dict(entries=[[0.0] * 512]), TypeError, "torch.Tensor"),
]


@pytest.mark.parametrize("arg,override,exc,msg", BAD_WRITES, ids=[f"{b[0]}-{b[3]}" for b in BAD_WRITES])
def test_kv_write_rejects_bad_input(arg: str, override: dict, exc: type, msg: str) -> None:
    args = dict(cache=ops.new_kv_cache(1), slots=torch.tensor([0, 1]), entries=torch.zeros(2, 512))
    before = args["cache"].clone() if isinstance(args["cache"], torch.Tensor) else None
    args.update(override)
    with pytest.raises(exc, match=msg) as info:
        ops.kv_write(**args)
    assert arg in str(info.value)
    if "cache" not in override:
        assert torch.equal(args["cache"], before), "a rejected write leaves the cache unchanged"


def test_read_and_format_errors_name_the_argument() -> None:
    cache = ops.new_kv_cache(1)
    with pytest.raises(IndexError, match="rows"):
        ops.kv_read(cache, torch.tensor([64]))
    with pytest.raises(ValueError, match="fmt"):
        ops.index_key_write(ops.new_index_key_cache(1), torch.tensor([0]), torch.zeros(1, 128), "int4")
    with pytest.raises(ValueError, match="cache"):
        ops.index_key_read(ops.new_index_key_cache(1, "fp8"), torch.tensor([0]), "fp4")
    with pytest.raises(ValueError, match="num_pages"):
        ops.new_kv_cache(-1)
    with pytest.raises(ValueError, match="x"):
        ops.hadamard128(torch.zeros(3, 64))


def test_unsupported_device_rejected() -> None:
    from dsv4rs._tensor import spec

    with pytest.raises(ValueError, match="entries.*meta"):
        spec("entries", torch.zeros(2, 512, device="meta"))


@pytest.mark.parametrize("op", ["kv_write", "kv_read", "hadamard128"])
def test_opcheck(gen: torch.Generator, op: str) -> None:
    cache = ops.quantize_entries(rand(gen, 5, 512))
    cases = {
        "kv_write": (ops.formats._kv_write, (cache, torch.tensor([7, 2]), rand(gen, 2, 512))),
        "kv_read": (ops.formats._kv_read, (cache, torch.tensor([0, 4, -1]))),
        "hadamard128": (ops.formats._hadamard128, (rand(gen, 3, 128),)),
    }
    fn, args = cases[op]
    torch.library.opcheck(fn, args)
