"""The attention ops on the CPU against the float64 reference (docs/model.md sections 2-5).

Quantized paths are compared with the reference fed the same dequantized rows, so only
arithmetic differs; float32 paths agree to about 1e-5 relative. Inputs are fresh random tensors
from the per-test generator.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from dsv4rs import ops
from dsv4rs import reference as ref

INV_FREQ = ref.rope_inv_freq(64, 160000.0, yarn_factor=16.0)


def inv_freq(dim: int) -> torch.Tensor:
    """CSA/HCA RoPE frequencies on the last min(64, dim) dims."""
    return ref.rope_inv_freq(min(64, dim), 160000.0, yarn_factor=16.0)


def randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# RoPE


@pytest.mark.parametrize("shape", [(7, 64), (5, 3, 512), (4, 2, 3, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("table", ops.ROPE_TABLES)
def test_rope_matches_reference(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype, inverse: bool,
                                table: str) -> None:
    x = randn(gen, *shape).to(dtype)
    positions = torch.randint(0, 1 << 20, (shape[0],), generator=gen)
    positions[0] = 0
    got = ops.rope(x, positions, INV_FREQ, inverse=inverse, table=table)
    assert got.dtype == torch.float32 and got.shape == x.shape
    close(got, ref.apply_rope(x, positions, INV_FREQ, inverse=inverse, table=table), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("table", ops.ROPE_TABLES)
def test_rope_accepts_float32_frequencies_and_round_trips(gen: torch.Generator, table: str) -> None:
    x = randn(gen, 6, 4, 512)
    positions = torch.arange(6) * 200_000
    f32 = INV_FREQ.float()
    there = ops.rope(x, positions, f32, table=table)
    close(there, ref.apply_rope(x, positions, f32, table=table))
    close(ops.rope(there, positions, f32, inverse=True, table=table), x)


def test_rope_tables_are_the_official_float32_table_and_exact_angles() -> None:
    """On unit pairs the op returns each angle's cosine and sine: the default table's are
    DeepSeek's (float32 position times float32 frequency, rounded to float32; cosine and sine
    within a float32 ulp of torch's float32 ones), "exact"'s the float64 ones. The two differ by
    the float32 angle's error, which grows with the position."""
    positions = torch.tensor([0, 1, 4095, 32768, 131071, (1 << 20) - 1])
    x = torch.zeros(len(positions), 64)
    x[:, 0::2] = 1.0
    f32 = INV_FREQ.float()
    official = ops.rope(x, positions, INV_FREQ)
    angle32 = positions.float()[:, None] * f32
    torch.testing.assert_close(official[:, 0::2], angle32.cos(), rtol=0, atol=2.0**-23)
    torch.testing.assert_close(official[:, 1::2], angle32.sin(), rtol=0, atol=2.0**-23)
    assert torch.equal(official, ops.rope(x, positions, INV_FREQ, table="official"))
    exact = ops.rope(x, positions, INV_FREQ, table="exact")
    angle = positions.double()[:, None] * INV_FREQ.double()
    torch.testing.assert_close(exact[:, 0::2].double(), angle.cos(), rtol=0, atol=2.0**-24)
    torch.testing.assert_close(exact[:, 1::2].double(), angle.sin(), rtol=0, atol=2.0**-24)
    # The tables differ by what the float32 angle is off, and no more.
    err = (angle32.double() - angle).abs().repeat_interleave(2, -1)
    gap = (official - exact).abs().double()
    assert (gap <= err + 2.0**-22).all()
    assert gap[0].max() == 0 and gap[1].max() < 1e-6 and gap[-1].max() > 1e-3, gap.amax(-1)
    with pytest.raises(ValueError, match="table"):
        ops.rope(x, positions, INV_FREQ, table="float32")


def test_rope_rejects_bad_inputs() -> None:
    x = torch.zeros(3, 64)
    with pytest.raises(ValueError, match="positions"):
        ops.rope(x, torch.zeros(4, dtype=torch.int64), INV_FREQ)
    with pytest.raises(ValueError, match="inv_freq"):
        ops.rope(torch.zeros(3, 32), torch.zeros(3, dtype=torch.int64), INV_FREQ)
    with pytest.raises(TypeError, match="x"):
        ops.rope(x.int(), torch.zeros(3, dtype=torch.int64), INV_FREQ)
    with pytest.raises(ValueError, match="x: contains a non-finite"):
        ops.rope(torch.full((3, 64), float("nan")), torch.zeros(3, dtype=torch.int64), INV_FREQ)


# ---------------------------------------------------------------------------------------------
# Compressor

COMPRESSORS = [(4, 512, "fp8"), (4, 128, "fp4"), (128, 512, "fp8"), (128, 64, "none"), (4, 64, "none"), (1, 32, "none"), (3, 48, "none")]


def compressor_inputs(gen: torch.Generator, ratio: int, dim: int, tokens: int) -> dict[str, torch.Tensor]:
    coff = 2 if ratio == 4 else 1
    return {
        "kv": randn(gen, tokens, coff * dim),
        "score": 2 * randn(gen, tokens, coff * dim),
        "ape": randn(gen, ratio, coff * dim),
        "norm_weight": 0.5 + torch.rand(dim, generator=gen),
    }


def run_compress(inp: dict[str, torch.Tensor], ratio: int, quant: str, chunks: list[int]) -> tuple[torch.Tensor, tuple]:
    """Feeds the tokens in chunks of the given sizes; returns the entries and the final state."""
    state = ops.compressor_state(ratio, inp["norm_weight"].shape[0])
    out, start = [], 0
    for n in chunks:
        sl = slice(start, start + n)
        out.append(ops.compress(inp["kv"][sl], inp["score"][sl], inp["ape"], inp["norm_weight"],
                                inv_freq(inp["norm_weight"].shape[0]), *state,
                                start_pos=start, ratio=ratio, quant=quant))
        start += n
    return torch.cat(out), state


@pytest.mark.parametrize("ratio,dim,quant", COMPRESSORS)
@pytest.mark.parametrize("extra", [0, 1])
def test_compress_prefill_matches_reference(gen: torch.Generator, ratio: int, dim: int, quant: str, extra: int) -> None:
    tokens = ratio * 3 + extra * (ratio // 2 + 1)
    inp = compressor_inputs(gen, ratio, dim, tokens)
    plain, _ = run_compress(inp, ratio, "none", [tokens])
    want = ref.compressor_prefill(inp["kv"], inp["score"], inp["ape"], inp["norm_weight"], ratio, inv_freq(dim))
    assert plain.shape == want.shape == (tokens // ratio, dim)
    close(plain, want)
    got, _ = run_compress(inp, ratio, quant, [tokens])
    # Quantization is the exact quant.rs round trip of the float32 entry.
    if quant == "fp8":
        assert torch.equal(got, ref.entry_quant_dequant(plain).float())
    elif quant == "fp4":
        assert torch.equal(got, ref.fp4_quant_dequant(ops.hadamard128(plain)).float())


@pytest.mark.parametrize("ratio", [4, 128])
@pytest.mark.parametrize("table", ops.ROPE_TABLES)
def test_compress_far_along_uses_the_table(gen: torch.Generator, ratio: int, table: str) -> None:
    """A sequence fed from position P with a fresh state is the reference's sequence placed at P
    (the first block has no predecessor either way): at P near 2^20 the two tables differ by far
    more than the float32 noise, and each op matches its own table."""
    far, dim = (1 << 20) - 256, 128
    inp = compressor_inputs(gen, ratio, dim, 2 * ratio)
    args = (inp["kv"], inp["score"], inp["ape"], inp["norm_weight"], ratio, INV_FREQ)
    got = ops.compress(*args[:4], INV_FREQ, *ops.compressor_state(ratio, dim), start_pos=far, ratio=ratio,
                       rope_table=table)
    close(got, ref.compressor_prefill(*args, position_offset=far, table=table))
    other = ref.compressor_prefill(*args, position_offset=far, table=({*ops.ROPE_TABLES} - {table}).pop())
    assert (got.double() - other).abs().max() > 1e-3


@pytest.mark.parametrize("ratio,dim,quant", COMPRESSORS)
def test_compress_in_any_chunks_is_bit_identical(gen: torch.Generator, ratio: int, dim: int, quant: str) -> None:
    tokens = 3 * ratio + ratio // 2 + 1
    inp = compressor_inputs(gen, ratio, dim, tokens)
    whole, state = run_compress(inp, ratio, quant, [tokens])
    singles, single_state = run_compress(inp, ratio, quant, [1] * tokens)
    sizes, left = [], tokens
    while left:
        sizes.append(min(left, int(torch.randint(1, 2 * ratio + 2, (1,), generator=gen))))
        left -= sizes[-1]
    chunked, chunked_state = run_compress(inp, ratio, quant, sizes)
    assert torch.equal(whole, singles) and torch.equal(whole, chunked)
    for a, b, c in zip(state, single_state, chunked_state):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("ratio,dim", [(4, 64), (8, 32)])
def test_compress_decode_state_matches_reference_step(gen: torch.Generator, ratio: int, dim: int) -> None:
    tokens = 3 * ratio + 2
    inp = compressor_inputs(gen, ratio, dim, tokens)
    ref_state = ref.compressor_state_init(ratio, dim)
    state = ops.compressor_state(ratio, dim)
    for p in range(tokens):
        want = ref.compressor_step(*ref_state, inp["kv"][p], inp["score"][p], p, inp["ape"], inp["norm_weight"],
                                   ratio, inv_freq(dim))
        got = ops.compress(inp["kv"][p : p + 1], inp["score"][p : p + 1], inp["ape"], inp["norm_weight"],
                           inv_freq(dim), *state, start_pos=p, ratio=ratio)
        assert got.shape[0] == (want is not None)
        if want is not None:
            close(got[0], want)
        assert torch.equal(state[0].double(), ref_state[0])
        close(state[1], ref_state[1], rtol=1e-6, atol=1e-6)


def test_compress_fewer_tokens_than_ratio_emits_nothing(gen: torch.Generator) -> None:
    inp = compressor_inputs(gen, 128, 64, 100)
    out, (kv_state, _) = run_compress(inp, 128, "none", [100])
    assert out.shape == (0, 64)
    assert torch.equal(kv_state[:100], inp["kv"])


def test_compress_rejects_bad_inputs(gen: torch.Generator) -> None:
    inp = compressor_inputs(gen, 4, 64, 8)
    state = ops.compressor_state(4, 64)
    args = (inp["ape"], inp["norm_weight"], INV_FREQ)
    bad = inp["kv"].clone()
    bad[6, 3] = float("inf")
    before = [s.clone() for s in state]
    with pytest.raises(ValueError, match="kv"):
        ops.compress(bad, inp["score"], *args, *state, start_pos=0, ratio=4)
    assert all(torch.equal(a, b) for a, b in zip(state, before))
    with pytest.raises(ValueError, match="score"):
        ops.compress(inp["kv"], inp["score"][:7], *args, *state, start_pos=0, ratio=4)
    with pytest.raises(ValueError, match="quant"):
        ops.compress(inp["kv"], inp["score"], *args, *state, start_pos=0, ratio=4, quant="fp8")
    with pytest.raises(ValueError, match="rope_table"):
        ops.compress(inp["kv"], inp["score"], *args, *state, start_pos=0, ratio=4, rope_table="float32")
    assert all(torch.equal(a, b) for a, b in zip(state, before))
    with pytest.raises(ValueError, match="ratio"):
        ops.compress(inp["kv"], inp["score"], *args, *state, start_pos=0, ratio=0)
    with pytest.raises(ValueError, match="kv_state"):
        ops.compress(inp["kv"], inp["score"], *args, *ops.compressor_state(128, 64), start_pos=0, ratio=4)
    with pytest.raises(TypeError, match="ape"):
        ops.compress(inp["kv"], inp["score"], inp["ape"].double(), *args[1:], *state, start_pos=0, ratio=4)


# ---------------------------------------------------------------------------------------------
# Indexer top-k

KEY_FORMATS = ["fp4", "fp8", "bfloat16", "float32"]


def paged_keys(gen: torch.Generator, keys: list[torch.Tensor], fmt: str) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Writes each sequence's keys into shuffled pages of one cache; returns the cache, the block
    table and each sequence's keys as the cache holds them (dequantized)."""
    pages_of = [-(-k.shape[0] // 64) for k in keys]
    max_pages = max(pages_of) + 1
    perm = torch.randperm(sum(pages_of) + 2, generator=gen).to(torch.int32)
    table = torch.full((len(keys), max_pages), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages_of):
        table[b, :n] = perm[used : used + n]
        used += n
    slots = [(table[b, torch.arange(k.shape[0]) // 64].long() * 64 + torch.arange(k.shape[0]) % 64) for b, k in enumerate(keys)]
    num_pages = len(perm)
    if fmt in ("fp4", "fp8"):
        cache = ops.new_index_key_cache(num_pages, fmt)
        for k, s in zip(keys, slots):
            ops.index_key_write(cache, s, k, fmt)
        stored = [ops.index_key_read(cache, s, fmt) for s in slots]
    else:
        dtype = getattr(torch, fmt)
        cache = torch.zeros(num_pages * 64, 128, dtype=dtype)
        for k, s in zip(keys, slots):
            cache[s] = k.to(dtype)
        stored = [cache[s].float() for s in slots]
        cache = cache.view(num_pages, 64, 128)
    return cache, table, stored


def check_topk(idx, scores, q, w, stored, seq_ids, visible, k) -> int:
    """Checks the selection against the float64 reference; returns how many queries selected
    exactly the reference's index set. Where two scores lie closer than float32 arithmetic can order
    (``tol``, relative to the magnitude of the score's terms), either order is accepted; the
    selection must still be a top-k set of the reference's scores."""
    exact = 0
    for t in range(q.shape[0]):
        keys, vis = stored[int(seq_ids[t])], int(visible[t])
        n = min(k, vis)
        assert (idx[t, n:] == -1).all() and torch.isneginf(scores[t, n:]).all()
        want_idx, _ = ref.indexer_topk(q[t : t + 1], w[t : t + 1], keys, visible[t : t + 1], k)
        if n == 0:
            continue
        full = ref.indexer_scores(q[t : t + 1], w[t : t + 1], keys[:vis])[0]
        terms = (w[t].double().abs()[:, None] * (q[t].double() @ keys[:vis].double().T).abs()).sum(0)
        tol = 1e-5 * float(terms.max()) + 1e-6
        got = idx[t, :n].long()
        assert len(set(got.tolist())) == n and got.min() >= 0 and got.max() < vis
        close(scores[t, :n], full[got], rtol=0, atol=tol)
        unselected = torch.ones(vis, dtype=torch.bool)
        unselected[got] = False
        assert (full[unselected] <= full[got].min() + tol).all()
        assert (scores[t, 1:n] <= scores[t, : n - 1]).all()
        assert (full[got][1:] <= full[got][:-1] + tol).all()
        exact += int(torch.equal(got.sort().values, want_idx[0, :n].sort().values))
    return exact


@pytest.mark.parametrize("fmt", KEY_FORMATS)
@pytest.mark.parametrize("heads,k", [(64, 512), (1, 7), (3, 100), (128, 64)])
def test_indexer_matches_reference(gen: torch.Generator, fmt: str, heads: int, k: int) -> None:
    lengths = [700, 1500, 90]
    keys = [randn(gen, n, 128) for n in lengths]
    cache, table, stored = paged_keys(gen, keys, fmt)
    seq_ids = torch.tensor([0, 0, 1, 1, 1, 2, 0, 1, 2], dtype=torch.int32)
    visible = torch.tensor([0, 700, 1, 1499, 1500, 90, 513, 64, 5])
    q = randn(gen, len(seq_ids), heads, 128)
    w = randn(gen, len(seq_ids), heads)
    idx, scores = ops.indexer_topk(q, w, cache, table, seq_ids, visible, k, return_scores=True)
    assert idx.dtype == torch.int32 and idx.shape == (len(seq_ids), k)
    assert check_topk(idx, scores, q, w, stored, seq_ids, visible, k) >= len(seq_ids) - 1


def test_indexer_long_prefill_block(gen: torch.Generator) -> None:
    """Many queries of one sequence (query blocks sharing key tiles), causal visibility, bf16 q."""
    keys = [randn(gen, 2000, 128)]
    cache, table, stored = paged_keys(gen, keys, "fp4")
    positions = torch.arange(7000, 8000, 37)
    visible = ref.compressed_visible(positions, 4)
    q = randn(gen, len(positions), 64, 128).bfloat16()
    w = randn(gen, len(positions), 64)
    seq_ids = torch.zeros(len(positions), dtype=torch.int64)
    idx, scores = ops.indexer_topk(q, w, cache, table, seq_ids, visible, 512, return_scores=True)
    assert check_topk(idx, scores, q.float(), w, stored, seq_ids, visible, 512) >= len(positions) // 2


def test_indexer_exact_ties_go_to_the_lower_key(gen: torch.Generator) -> None:
    base = randn(gen, 10, 128)
    keys = [base[torch.randint(0, 10, (300,), generator=gen)]]
    cache, table, stored = paged_keys(gen, keys, "float32")
    q, w = randn(gen, 2, 4, 128), randn(gen, 2, 4)
    visible = torch.tensor([300, 257])
    idx, scores = ops.indexer_topk(q, w, cache, table, torch.zeros(2, dtype=torch.int32), visible, 100, return_scores=True)
    assert check_topk(idx, scores, q, w, stored, torch.zeros(2), visible, 100) == 2
    for t in range(2):
        tied = scores[t, 1:] == scores[t, :-1]
        assert tied.sum() > 50
        assert (idx[t, 1:][tied] > idx[t, :-1][tied]).all()


def test_indexer_large_magnitudes_and_physical_rows(gen: torch.Generator) -> None:
    keys = [randn(gen, 600, 128), randn(gen, 300, 128)]
    cache, table, stored = paged_keys(gen, keys, "fp8")
    seq_ids = torch.tensor([1, 0])
    visible = torch.tensor([300, 577])
    q, w = 100 * randn(gen, 2, 16, 128), 100 * randn(gen, 2, 16)
    logical, scores = ops.indexer_topk(q, w, cache, table, seq_ids, visible, 256, return_scores=True)
    check_topk(logical, scores, q, w, stored, seq_ids, visible, 256)
    physical = ops.indexer_topk(q, w, cache, table, seq_ids, visible, 256, physical=True)
    for t in range(2):
        want = torch.where(logical[t] >= 0, table[seq_ids[t], logical[t] // 64] * 64 + logical[t] % 64, -1)
        assert torch.equal(physical[t], want.int())


def test_indexer_rejects_bad_inputs(gen: torch.Generator) -> None:
    keys = [randn(gen, 100, 128)]
    cache, table, _ = paged_keys(gen, keys, "fp4")
    q, w = randn(gen, 2, 4, 128), randn(gen, 2, 4)
    seq, vis = torch.zeros(2, dtype=torch.int32), torch.tensor([10, 100])
    with pytest.raises(ValueError, match="visible"):
        ops.indexer_topk(q, w, cache, table, seq, torch.tensor([10, table.shape[1] * 64 + 1]), 8)
    with pytest.raises(IndexError, match="seq_ids"):
        ops.indexer_topk(q, w, cache, table, torch.tensor([0, 1]), vis, 8)
    bad_table = table.clone()
    bad_table[0, 1] = cache.shape[0]
    with pytest.raises(IndexError, match="block_table"):
        ops.indexer_topk(q, w, cache, bad_table, seq, vis, 8)
    with pytest.raises(ValueError, match="key_cache"):
        ops.indexer_topk(q, w, cache[:, :100], table, seq, vis, 8)
    with pytest.raises(TypeError, match="q"):
        ops.indexer_topk(q.double(), w, cache, table, seq, vis, 8)
    with pytest.raises(ValueError, match="weights"):
        ops.indexer_topk(q, w[:, :3], cache, table, seq, vis, 8)
    with pytest.raises(ValueError, match="q: contains a non-finite"):
        ops.indexer_topk(q.index_fill(0, torch.tensor([1]), float("nan")), w, cache, table, seq, vis, 8)
    with pytest.raises(ValueError, match="k"):
        ops.indexer_topk(q, w, cache, table, seq, vis, 0)
    with pytest.raises(ValueError, match="contiguous"):
        ops.indexer_topk(q.transpose(0, 1).contiguous().transpose(0, 1), w, cache, table, seq, vis, 8)


def reference_rows(q, w, stored, seq_ids, visible, width) -> torch.Tensor:
    """The float64 reference's dense scores: ``[T, width]``, ``-inf`` past ``visible[t]``."""
    rows = torch.full((q.shape[0], width), float("-inf"), dtype=torch.float64)
    for t in range(q.shape[0]):
        vis = int(visible[t])
        rows[t, :vis] = ref.indexer_scores(q[t : t + 1], w[t : t + 1], stored[int(seq_ids[t])][:vis])[0]
    return rows


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


def indexer_case(gen: torch.Generator, fmt: str, heads: int):
    """Three sequences in one paged cache and nine queries seeing 0, 1, ..., all of their keys."""
    keys = [randn(gen, n, 128) for n in (700, 1500, 90)]
    cache, table, stored = paged_keys(gen, keys, fmt)
    seq_ids = torch.tensor([0, 0, 1, 1, 1, 2, 0, 1, 2], dtype=torch.int32)
    visible = torch.tensor([0, 700, 1, 1499, 1500, 90, 513, 64, 5])
    q, w = randn(gen, len(seq_ids), heads, 128), randn(gen, len(seq_ids), heads)
    return (q, w, cache, table, seq_ids, visible), stored


@pytest.mark.parametrize("fmt", KEY_FORMATS)
@pytest.mark.parametrize("heads", [1, 7, 64])
def test_indexer_scores_match_reference(gen: torch.Generator, fmt: str, heads: int) -> None:
    args, stored = indexer_case(gen, fmt, heads)
    q, w, _, table, seq_ids, visible = args
    scores = ops.indexer_scores(*args)
    assert scores.dtype == torch.float32 and scores.shape == (len(seq_ids), table.shape[1] * 64)
    want = reference_rows(q, w, stored, seq_ids, visible, scores.shape[1])
    assert torch.equal(torch.isneginf(scores), torch.isneginf(want))
    terms = (w.double().abs()[:, :, None] * (q.double() @ torch.cat(stored).double().T).abs()).sum(1).amax()
    seen = torch.isfinite(want)
    close(scores[seen], want[seen], rtol=0, atol=1e-5 * float(terms) + 1e-6)
    narrow = ops.indexer_scores(*args, width=1500)
    assert narrow.shape == (len(seq_ids), 1500) and torch.equal(bits(narrow), bits(scores[:, :1500]))
    wide = ops.indexer_scores(*args, width=scores.shape[1] + 70)
    assert torch.equal(bits(wide[:, : scores.shape[1]]), bits(scores)) and torch.isneginf(wide[:, scores.shape[1] :]).all()


@pytest.mark.parametrize("fmt", KEY_FORMATS)
@pytest.mark.parametrize("heads,k", [(1, 7), (7, 100), (64, 2000)])
def test_indexer_scores_are_the_selection_scores_bit_for_bit(gen: torch.Generator, fmt: str, heads: int, k: int) -> None:
    args, _ = indexer_case(gen, fmt, heads)
    idx, top = ops.indexer_topk(*args, k, return_scores=True)
    scores = ops.indexer_scores(*args)
    picked = scores.gather(1, idx.long().clamp_min(0))
    assert torch.equal(bits(picked[idx >= 0]), bits(top[idx >= 0]))


@pytest.mark.parametrize("fmt", ["fp4", "float32"])
@pytest.mark.parametrize("heads,k", [(40, 100), (64, 2000)])
def test_indexer_torch_tie_break_without_ties_is_the_fused_selection(gen: torch.Generator, fmt: str, heads: int,
                                                                      k: int) -> None:
    args, _ = indexer_case(gen, fmt, heads)
    for row in ops.indexer_scores(*args):  # many heads: no key scores 0 (every head in the ReLU), no ties
        seen = row[torch.isfinite(row)]
        assert seen.unique().numel() == seen.numel()
    for physical in (False, True):
        fused = ops.indexer_topk(*args, k, return_scores=True, physical=physical)
        dense = ops.indexer_topk(*args, k, return_scores=True, physical=physical, tie_break="torch")
        assert torch.equal(fused[0], dense[0]) and torch.equal(bits(fused[1]), bits(dense[1]))


def test_indexer_torch_tie_break_on_exact_ties(gen: torch.Generator) -> None:
    """Keys whose every dot product with the queries is negative all score exactly 0, and
    repeated keys score alike: "torch" selects as torch.topk does over the dense rows, "lower"
    the lowest keys of each tied score."""
    base = randn(gen, 10, 128).abs()
    keys = base[torch.randint(0, 10, (900,), generator=gen)]
    keys[torch.rand(900, generator=gen) < 0.6] *= -1
    cache, table, _ = paged_keys(gen, [keys], "float32")
    q, w = randn(gen, 3, 4, 128).abs(), torch.rand(3, 4, generator=gen)
    seq_ids, visible, k = torch.zeros(3, dtype=torch.int32), torch.tensor([900, 517, 60]), 400
    scores = ops.indexer_scores(q, w, cache, table, seq_ids, visible)
    assert (scores == 0).sum() > 500
    idx, top = ops.indexer_topk(q, w, cache, table, seq_ids, visible, k, return_scores=True, tie_break="torch")
    want = torch.topk(scores, k)
    for t in range(3):
        n = min(k, int(visible[t]))
        assert torch.equal(idx[t, :n], want.indices[t, :n].int()) and torch.equal(top[t, :n], want.values[t, :n])
        assert (idx[t, n:] == -1).all() and torch.isneginf(top[t, n:]).all()
    lower, lower_top = ops.indexer_topk(q, w, cache, table, seq_ids, visible, k, return_scores=True)
    assert torch.equal(lower_top, top)
    for t in range(3):
        n = min(k, int(visible[t]))
        for s in lower_top[t, :n].unique():
            tied = (scores[t, : visible[t]] == s).nonzero()[:, 0].int()
            assert torch.equal(lower[t, :n][lower_top[t, :n] == s], tied[: int((lower_top[t, :n] == s).sum())])


def test_indexer_scores_and_tie_break_reject_bad_inputs(gen: torch.Generator) -> None:
    cache, table, _ = paged_keys(gen, [randn(gen, 100, 128)], "fp4")
    q, w = randn(gen, 2, 4, 128), randn(gen, 2, 4)
    seq, vis = torch.zeros(2, dtype=torch.int32), torch.tensor([10, 100])
    with pytest.raises(ValueError, match="tie_break"):
        ops.indexer_topk(q, w, cache, table, seq, vis, 8, tie_break="upper")
    with pytest.raises(ValueError, match="width"):
        ops.indexer_scores(q, w, cache, table, seq, vis, width=0)
    with pytest.raises(TypeError, match="width"):
        ops.indexer_scores(q, w, cache, table, seq, vis, width=64.0)
    with pytest.raises(ValueError, match=r"visible: value 100 .*\(width\)"):
        ops.indexer_scores(q, w, cache, table, seq, vis, width=99)
    with pytest.raises(ValueError, match="visible"):
        ops.indexer_scores(q, w, cache, table, seq, torch.tensor([10, table.shape[1] * 64 + 1]), width=4096)
    with pytest.raises(IndexError, match="seq_ids"):
        ops.indexer_scores(q, w, cache, table, torch.tensor([0, 1]), vis)
    with pytest.raises(ValueError, match="key_cache"):
        ops.indexer_scores(q, w, cache[:, :100], table, seq, vis)
    with pytest.raises(ValueError, match="weights"):
        ops.indexer_topk(q, w[:, :3], cache, table, seq, vis, 8, tie_break="torch")
    with pytest.raises(ValueError, match="block_table"):
        ops.indexer_scores(q, w, cache, table[0], seq, vis)


MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys, torch
    from dsv4rs import ops

    def status_kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    T, H, k, n = 16, 64, 512, int(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    pages = -(-n // 64)
    cache = torch.randint(0, 256, (pages, 64 * 68), dtype=torch.uint8, generator=g)
    cache[:, 64 * 64:] = 127  # scales 2^0
    table = torch.arange(pages, dtype=torch.int32)[None]
    q, w = torch.randn(T, H, 128, generator=g), torch.randn(T, H, generator=g)
    seq = torch.zeros(T, dtype=torch.int32)
    ops.indexer_topk(q, w, cache, table, seq, torch.full((T,), 64), k)  # threads and code warm
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak-RSS mark to the current RSS
    before = status_kib("VmRSS")
    ops.indexer_topk(q, w, cache, table, seq, torch.full((T,), n), k)
    print(json.dumps({"peak_growth_kib": status_kib("VmHWM") - before}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_indexer_memory_grows_with_k_not_with_context() -> None:
    """Peak RSS growth of one call, in a fresh process: 16 queries x 64 heads, k = 512, over 16K and
    256K keys. Materialized scores would need 16 x 256K x 4 B = 16 MiB (x 64 heads unfused: 1 GiB);
    the fused kernel's workspace is the same at both sizes, well under either."""
    growth = {}
    for n in (16384, 262144):
        res = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(n)], capture_output=True, text=True, check=True)
        growth[n] = json.loads(res.stdout)["peak_growth_kib"]
    print(f"indexer peak RSS growth: {growth}")
    # Both about 0.2-0.5 MiB (the spread: whether a worker thread's buffers were already warm).
    assert max(growth.values()) < 2048, growth


# ---------------------------------------------------------------------------------------------
# Sparse attention


def entry_cache(gen: torch.Generator, n: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache of n random entries in ``fmt`` and the rows as it holds them."""
    entries = randn(gen, n, 512)
    if fmt == "fp8":
        cache = ops.quantize_entries(entries)
        return cache, ops.kv_read(cache, torch.arange(n))
    dtype = getattr(torch, fmt)
    pages = -(-n // 64)
    rows = torch.zeros(pages * 64, 512, dtype=dtype)
    rows[:n] = entries.to(dtype)
    return rows.view(pages, 64, 512), rows[:n].float()


def random_indices(gen: torch.Generator, t: int, k: int, n: int) -> torch.Tensor:
    """Rows with duplicates and about 20 % masked."""
    idx = torch.randint(0, n, (t, k), generator=gen)
    return idx.masked_fill(torch.rand(t, k, generator=gen) < 0.2, -1)


def reference_attention(q, sink, lists, scale=512**-0.5):
    """The reference over the concatenated candidate lists ``[(rows, indices, lengths)]``."""
    kv = torch.cat([rows for rows, _, _ in lists])
    cols, offset = [], 0
    for rows, idx, lengths in lists:
        idx = idx.long()
        if lengths is not None:
            idx = idx.masked_fill(torch.arange(idx.shape[1]) >= lengths[:, None], -1)
        cols.append(torch.where(idx >= 0, idx + offset, -1))
        offset += rows.shape[0]
    return ref.sparse_attention(q, kv, torch.cat(cols, dim=1), sink, scale)


@pytest.mark.parametrize("fmt", ["fp8", "bfloat16", "float32"])
@pytest.mark.parametrize("t,heads,k", [(3, 64, 200), (5, 1, 5), (2, 128, 77), (9, 3, 1), (1, 64, 700)])
def test_attention_matches_reference(gen: torch.Generator, fmt: str, t: int, heads: int, k: int) -> None:
    cache, rows = entry_cache(gen, 300, fmt)
    q = randn(gen, t, heads, 512)
    idx = random_indices(gen, t, k, 300).to(torch.int32)
    sink = randn(gen, heads)
    out, lse = ops.sparse_attention(q, cache, idx, sink)
    want_out, want_lse = reference_attention(q, sink, [(rows, idx, None)])
    close(out, want_out)
    close(lse, want_lse)


@pytest.mark.parametrize("table", ops.ROPE_TABLES)
def test_attention_two_caches_lengths_and_derotation(gen: torch.Generator, table: str) -> None:
    compressed, c_rows = entry_cache(gen, 500, "fp8")
    window, w_rows = entry_cache(gen, 200, "bfloat16")
    t, heads = 6, 16
    q = randn(gen, t, heads, 512).bfloat16()
    idx, widx = random_indices(gen, t, 96, 500), random_indices(gen, t, 128, 200)
    lengths = torch.tensor([96, 0, 50, 1, 95, 64], dtype=torch.int32)
    wlengths = torch.tensor([128, 128, 0, 7, 100, 0], dtype=torch.int32)
    sink = randn(gen, heads)
    positions = torch.randint(0, 1 << 20, (t,), generator=gen)
    out, lse = ops.sparse_attention(q, compressed, idx, sink, scale=0.03, lengths=lengths, extra_cache=window,
                                    extra_indices=widx, extra_lengths=wlengths, derotate=(positions, INV_FREQ),
                                    rope_table=table)
    want_out, want_lse = reference_attention(q.float(), sink, [(c_rows, idx, lengths), (w_rows, widx, wlengths)], 0.03)
    close(lse, want_lse)
    close(out, ref.apply_rope(want_out, positions, INV_FREQ, inverse=True, table=table))


def test_attention_edge_cases(gen: torch.Generator) -> None:
    cache, rows = entry_cache(gen, 64, "float32")
    heads = 8
    q = randn(gen, 4, heads, 512) * torch.tensor([1.0, 100.0, 1.0, 1.0])[:, None, None]
    idx = torch.tensor([[-1, -1, -1], [3, 3, 9], [5, -1, -1], [1, 2, 3]])
    sink = torch.zeros(heads)
    sink[:4] = 80.0  # dominates every logit of query 3 for heads 0-3
    out, lse = ops.sparse_attention(q, cache, idx, sink)
    want_out, want_lse = reference_attention(q, sink, [(rows, idx, None)])
    assert torch.equal(out[0], torch.zeros(heads, 512)) and torch.isneginf(lse[0]).all()
    close(out[[0, 2, 3]], want_out[[0, 2, 3]])
    close(lse[[0, 2, 3]], want_lse[[0, 2, 3]])
    # Query 1's logits are in the hundreds: float32 rounding (~1e-7 relative) of its dot products
    # is ~1e-5 absolute in the logits, and so in the softmax weights.
    close(out[1], want_out[1], rtol=0, atol=2e-4)
    close(lse[1], want_lse[1], rtol=0, atol=1e-3)
    assert out[3, :4].abs().max() < 1e-20


def test_attention_parallel_splits_agree(gen: torch.Generator) -> None:
    """One query with many candidates is split among threads; many queries are not: same result."""
    cache, rows = entry_cache(gen, 2000, "fp8")
    q = randn(gen, 1, 64, 512)
    idx = random_indices(gen, 1, 1500, 2000)
    sink = randn(gen, 64)
    alone, lse = ops.sparse_attention(q, cache, idx, sink)
    many, many_lse = ops.sparse_attention(q.expand(40, -1, -1).contiguous(), cache, idx.expand(40, -1).contiguous(), sink)
    close(alone, many[:1], rtol=1e-6, atol=1e-6)
    close(lse, many_lse[:1], rtol=1e-6, atol=1e-6)
    close(alone, reference_attention(q, sink, [(rows, idx, None)])[0])


def test_attention_bfloat16_output_is_the_float32_output_rounded(gen: torch.Generator) -> None:
    """out_dtype=torch.bfloat16 stores the float32 output rounded to nearest even: the bits of
    ``out.to(torch.bfloat16)``, for one query split among threads and for many, with two lists,
    lengths and the de-rotation; other dtypes are refused, naming the argument."""
    compressed, _ = entry_cache(gen, 500, "fp8")
    window, _ = entry_cache(gen, 200, "bfloat16")
    for t in (1, 6):
        q = randn(gen, t, 16, 512).bfloat16()
        idx, widx = random_indices(gen, t, 900, 500), random_indices(gen, t, 128, 200)
        lengths = torch.randint(0, 901, (t,), generator=gen).int()
        args = dict(lengths=lengths, extra_cache=window, extra_indices=widx,
                    derotate=(torch.randint(0, 1 << 20, (t,), generator=gen), INV_FREQ))
        sink = randn(gen, 16)
        out, lse = ops.sparse_attention(q, compressed, idx, sink, **args)
        out16, lse16 = ops.sparse_attention(q, compressed, idx, sink, out_dtype=torch.bfloat16, **args)
        assert out.dtype == torch.float32 and out16.dtype == torch.bfloat16
        assert torch.equal(out16.view(torch.int16), out.bfloat16().view(torch.int16))
        assert torch.equal(lse16, lse)
    with pytest.raises(ValueError, match="out_dtype"):
        ops.sparse_attention(q, compressed, idx, sink, out_dtype=torch.float16)


def test_attention_rejects_bad_inputs(gen: torch.Generator) -> None:
    cache, _ = entry_cache(gen, 64, "fp8")
    q, sink = randn(gen, 2, 4, 512), randn(gen, 4)
    idx = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(IndexError, match="indices"):
        ops.sparse_attention(q, cache, torch.tensor([[0, 64, 1], [0, 0, 0]]), sink)
    with pytest.raises(IndexError, match="indices"):
        ops.sparse_attention(q, cache, torch.tensor([[0, -2, 1], [0, 0, 0]]), sink)
    with pytest.raises(ValueError, match="lengths"):
        ops.sparse_attention(q, cache, idx, sink, lengths=torch.tensor([3, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="sink"):
        ops.sparse_attention(q, cache, idx, sink[:3])
    with pytest.raises(ValueError, match="cache"):
        ops.sparse_attention(q, cache[:, :-1], idx, sink)
    with pytest.raises(ValueError, match="extra_cache"):
        ops.sparse_attention(q, cache, idx, sink, extra_indices=idx)
    with pytest.raises(TypeError, match="q"):
        ops.sparse_attention(q.half(), cache, idx, sink)
    with pytest.raises(ValueError, match="q"):
        ops.sparse_attention(q[:, :, :128].contiguous(), cache, idx, sink)
    with pytest.raises(ValueError, match="cache: row 0 holds a non-finite"):
        ops.sparse_attention(q, torch.full((1, 64, 512), float("inf")), idx, sink)
    corrupt = cache.clone()
    corrupt[0, 64 * 576] = 255  # row 0's first scale byte: 2^128
    with pytest.raises(ValueError, match="cache: row 0 holds a non-finite"):
        ops.sparse_attention(q, corrupt, idx, sink)
    with pytest.raises(ValueError, match="rope_table"):
        ops.sparse_attention(q, cache, idx, sink, derotate=(torch.arange(2), INV_FREQ), rope_table=None)
    # The registered ops check the table's name in the core too (a caller bypassing the wrappers).
    with pytest.raises(ValueError, match='table: expected "official" or "exact", got "fp32"'):
        torch.ops.dsv4rs.rope.default(q, torch.arange(2), INV_FREQ, False, "fp32")
    with pytest.raises(ValueError, match="rope_table"):
        torch.ops.dsv4rs.sparse_attention.default(q, cache, idx, sink, 0.05, None, None, None, None, None, None, "")


# ---------------------------------------------------------------------------------------------
# torch.library registration


def test_opcheck(gen: torch.Generator) -> None:
    x, pos = randn(gen, 3, 2, 64), torch.arange(3)
    for table in ops.ROPE_TABLES:
        torch.library.opcheck(torch.ops.dsv4rs.rope.default, (x, pos, INV_FREQ, False, table))
    inp = compressor_inputs(gen, 4, 64, 9)
    state = ops.compressor_state(4, 64)
    torch.library.opcheck(torch.ops.dsv4rs.compress.default,
                          (inp["kv"], inp["score"], inp["ape"], inp["norm_weight"], INV_FREQ, *state, 0, 4, 1e-6, "none", "official"))
    cache, table, _ = paged_keys(gen, [randn(gen, 100, 128)], "fp4")
    torch.library.opcheck(torch.ops.dsv4rs.indexer_topk.default,
                          (randn(gen, 2, 4, 128), randn(gen, 2, 4), cache, table, torch.zeros(2, dtype=torch.int32),
                           torch.tensor([50, 100]), 16, False))
    torch.library.opcheck(torch.ops.dsv4rs.indexer_scores.default,
                          (randn(gen, 2, 4, 128), randn(gen, 2, 4), cache, table, torch.zeros(2, dtype=torch.int32),
                           torch.tensor([50, 100]), 130))
    kv, _ = entry_cache(gen, 64, "fp8")
    idx = random_indices(gen, 2, 10, 64)
    torch.library.opcheck(torch.ops.dsv4rs.sparse_attention.default,
                          (randn(gen, 2, 4, 512), kv, idx, randn(gen, 4), 0.05, None, None, None, None, None, None,
                           "official"))
    torch.library.opcheck(torch.ops.dsv4rs.sparse_attention.default,
                          (randn(gen, 2, 4, 512), kv, idx, randn(gen, 4), 0.05, torch.tensor([3, 10], dtype=torch.int32),
                           kv, idx, None, pos[:2], INV_FREQ, "exact"))
    torch.library.opcheck(torch.ops.dsv4rs.sparse_attention.default,
                          (randn(gen, 2, 4, 512), kv, idx, randn(gen, 4), 0.05, None, None, None, None, None, None,
                           "official", True))


# ---------------------------------------------------------------------------------- mHC weights


@pytest.mark.parametrize("n,t,iters", [(4, 7, 20), (4, 0, 20), (1, 3, 1), (2, 5, 3), (8, 33, 20)])
def test_mhc_weights_match_reference(gen: torch.Generator, n: int, t: int, iters: int) -> None:
    width = (2 + n) * n
    mix = torch.randn(t, width, generator=gen) * 3
    scale, base = torch.rand(3, generator=gen) + 0.5, torch.randn(width, generator=gen)
    got = ops.mhc_weights(mix, scale, base, iters, 1e-6)
    want = ref.mhc_weights(mix, scale, base, iters, 1e-6)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)
    if t:
        assert torch.allclose(got[2].sum(-2), torch.ones(t, n), atol=1e-5)  # columns end normalized


# Rounding once: float32 results within float32 arithmetic error, bfloat16 within half an ulp of
# the float64 value (2^-9 relative) plus that; the bound below is 2^-8.
TOL = {torch.float32: dict(rtol=2e-5, atol=1e-6), torch.bfloat16: dict(rtol=2**-8, atol=1e-6)}


@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 512), (1, 16384), (4, 7), (0, 32), (3, 1), (2, 3, 4096),
                                   (2, 40000), (1, 131075)])
@pytest.mark.parametrize("x_dtype,w_dtype,out_dtype", [
    (torch.bfloat16, torch.float32, torch.bfloat16), (torch.bfloat16, None, torch.float32),
    (torch.float32, torch.float32, torch.float32), (torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, None, None)])
def test_rms_norm_matches_reference(gen: torch.Generator, shape: tuple[int, ...], x_dtype: torch.dtype,
                                    w_dtype: torch.dtype | None, out_dtype: torch.dtype | None) -> None:
    x = (randn(gen, *shape) * 3).to(x_dtype)
    w = None if w_dtype is None else (torch.rand(shape[-1], generator=gen) * 2).to(w_dtype)
    got = ops.rms_norm(x, w, 1e-6, out_dtype)
    want_dtype = out_dtype or x_dtype
    assert got.dtype == want_dtype and got.shape == x.shape
    close(got, ref.rms_norm(x, w, 1e-6), **TOL[want_dtype])


def test_row_stride_names_rows_one_stride_apart() -> None:
    """What the GPU forms of rms_norm, rms_norm_rope and swiglu read in place: rows of adjacent
    values one stride apart (-1: copied first)."""
    from dsv4rs._tensor import row_stride

    y = torch.zeros(6, 10)
    y3 = torch.zeros(2, 3, 8)
    cases = [(y, 10), (y[:, 2:7], 10), (y[1:4, :5], 10), (y[::2, :4], 20), (y3[..., :4], 8), (y3[:, 1:, :4], -1),
             (y3[:, :1, 2:], 24), (y.t(), -1), (y[:, :4].unsqueeze(0).expand(3, 6, 4), -1),
             (torch.zeros(1, 10)[:, 3:5], 2), (torch.zeros(()), 1), (torch.zeros(3, 0), 0),
             (y[:, 2:7].unsqueeze(1), 10), (y[:, ::2], -1)]
    for t, want in cases:
        assert row_stride(t) == want, (t.shape, t.stride())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_column_ranges_on_the_cpu(gen: torch.Generator, dtype: torch.dtype) -> None:
    """The ops that read a GPU matrix's column range in place take one on the CPU too (copied)."""
    y = (randn(gen, 7, 40) * 3).to(dtype)
    x, u = y[:, 4:20], y[:, 20:36]
    assert torch.equal(ops.rms_norm(x, None, 1e-6), ops.rms_norm(x.contiguous(), None, 1e-6))
    assert torch.equal(ops.swiglu(x, u, 7.0), ops.swiglu(x.contiguous(), u.contiguous(), 7.0))


def test_rms_norm_zero_rows_and_eps(gen: torch.Generator) -> None:
    x = torch.zeros(2, 64)
    x[1] = 1e-4
    got = ops.rms_norm(x, None, 1e-2)
    close(got, ref.rms_norm(x, None, 1e-2))
    assert torch.equal(got[0], torch.zeros(64))
    assert torch.equal(ops.rms_norm(torch.zeros(0, 8)), torch.zeros(0, 8))


def test_rms_norm_rejects_bad_input() -> None:
    x = torch.ones(2, 8)
    with pytest.raises(TypeError, match="x: expected dtype"):
        ops.rms_norm(x.double())
    with pytest.raises(ValueError, match="weight: expected shape"):
        ops.rms_norm(x, torch.ones(7))
    with pytest.raises(TypeError, match="weight: expected dtype"):
        ops.rms_norm(x, torch.ones(8, dtype=torch.int32))
    with pytest.raises(ValueError, match="eps"):
        ops.rms_norm(x, None, 0.0)
    with pytest.raises(ValueError, match="eps"):
        ops.rms_norm(x, None, float("nan"))
    with pytest.raises(TypeError, match="eps"):
        ops.rms_norm(x, None, "1e-6")
    with pytest.raises(TypeError, match="out_dtype"):
        ops.rms_norm(x, None, 1e-6, torch.float16)
    with pytest.raises(ValueError, match="x: expected shape"):
        ops.rms_norm(torch.ones(3, 0))
    with pytest.raises(ValueError, match="x: expected shape"):
        ops.rms_norm(torch.tensor(1.0))
    with pytest.raises(ValueError, match="x: contains a non-finite value at flat index 9"):
        ops.rms_norm(torch.cat([x.flatten()[:9], torch.tensor([float("inf")]), x.flatten()[10:]]).view(2, 8))
    with pytest.raises(ValueError, match="weight: contains a non-finite"):
        ops.rms_norm(x, torch.full((8,), float("nan")))


@pytest.mark.parametrize("t,n,d", [(3, 4, 64), (1, 4, 4096), (0, 4, 8), (5, 1, 7), (2, 8, 33), (4, 3, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mhc_collapse_and_combine_match_reference(gen: torch.Generator, t: int, n: int, d: int,
                                                  dtype: torch.dtype) -> None:
    x = (randn(gen, t, n, d) * 2).to(dtype)
    pre, post = torch.rand(t, n, generator=gen) + 0.1, torch.rand(t, n, generator=gen) * 2
    comb = torch.softmax(randn(gen, t, n, n), -1)
    got = ops.mhc_collapse(x, pre)
    assert got.dtype == dtype and got.shape == (t, d)
    # A sum of positive weights times values of either sign: cancellation makes the relative
    # bound loose near zero, so the absolute one scales with the inputs.
    tol = dict(TOL[dtype], atol=1e-5 if dtype == torch.float32 else 2**-8)
    close(got, ref.mhc_collapse(x, pre), **tol)
    for f_dtype in (dtype, torch.float32):
        f = randn(gen, t, d).to(f_dtype)
        y = ops.mhc_combine(x, f, post, comb)
        assert y.dtype == dtype and y.shape == x.shape
        close(y, ref.mhc_combine(x, f, post, comb), **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mhc_combine_of_two_outputs_is_combine_of_their_sum(gen: torch.Generator, dtype: torch.dtype) -> None:
    """f2: the sublayer's output is f + f2 as torch adds them (rounded to their dtype): the same
    bits as combining that sum; the two must share a dtype and shape."""
    for t, n, d in ((3, 4, 64), (1, 4, 4096), (0, 4, 8), (2, 3, 33)):
        x = (randn(gen, t, n, d) * 2).to(dtype)
        post, comb = torch.rand(t, n, generator=gen) * 2, torch.softmax(randn(gen, t, n, n), -1)
        f, f2 = randn(gen, t, d).to(dtype), randn(gen, t, d).to(dtype)
        assert torch.equal(ops.mhc_combine(x, f, post, comb, f2), ops.mhc_combine(x, f + f2, post, comb))
    with pytest.raises(TypeError, match="f2: expected dtype"):
        ops.mhc_combine(x, f, post, comb, f2.double())
    with pytest.raises(ValueError, match="f2: expected shape"):
        ops.mhc_combine(x, f, post, comb, f2[:, :-1].contiguous())


def test_mhc_collapse_is_torchs_sum_in_float32(gen: torch.Generator) -> None:
    x, pre = randn(gen, 5, 4, 96), torch.rand(5, 4, generator=gen)
    assert torch.equal(ops.mhc_collapse(x, pre), (pre.unsqueeze(-1) * x).sum(-2))


def mhc_pre_inputs(gen: torch.Generator, t: int, n: int, d: int, dtype: torch.dtype):
    x = (randn(gen, t, n, d) * 2).to(dtype)
    proj = randn(gen, (2 + n) * n, n * d) * 0.02
    return x, proj, torch.rand(3, generator=gen) + 0.5, randn(gen, (2 + n) * n)


def mhc_pre_reference(x, proj, scale, base, iters, eps, norm_eps):
    """The composition the op replaces, in float64: the norm, the projection, the weights, the
    collapse."""
    mix = ref.rms_norm(x.flatten(-2), None, norm_eps) @ proj.double().T
    pre, post, comb = ref.mhc_weights(mix, scale, base, iters, eps)
    return post, comb, ref.mhc_collapse(x, pre)


@pytest.mark.parametrize("t,n,d", [(1, 4, 256), (3, 4, 300), (0, 4, 64), (2, 1, 5), (5, 8, 130), (2, 3, 1024)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mhc_pre_matches_reference(gen: torch.Generator, t: int, n: int, d: int, dtype: torch.dtype) -> None:
    args = mhc_pre_inputs(gen, t, n, d, dtype)
    post, comb, y = ops.mhc_pre(*args, iters=20, eps=1e-6, norm_eps=1e-6)
    want_post, want_comb, want_y = mhc_pre_reference(*args, 20, 1e-6, 1e-6)
    assert post.dtype == comb.dtype == torch.float32 and y.dtype == dtype and y.shape == (t, d)
    close(post, want_post, rtol=1e-5, atol=1e-6)
    close(comb, want_comb, rtol=1e-5, atol=1e-6)
    close(y, want_y, **dict(TOL[dtype], atol=1e-5 if dtype == torch.float32 else 2**-8))


def test_mhc_pre_rejects_bad_input(gen: torch.Generator) -> None:
    x, proj, scale, base = mhc_pre_inputs(gen, 2, 4, 8, torch.float32)
    with pytest.raises(ValueError, match="proj: expected shape"):
        ops.mhc_pre(x, proj[:, :31].contiguous(), scale, base)
    with pytest.raises(ValueError, match="base: expected shape"):
        ops.mhc_pre(x, proj, scale, base[:23])
    with pytest.raises(TypeError, match="proj: expected dtype"):
        ops.mhc_pre(x, proj.bfloat16(), scale, base)
    with pytest.raises(ValueError, match="norm_eps"):
        ops.mhc_pre(x, proj, scale, base, norm_eps=0.0)
    with pytest.raises(ValueError, match="iters"):
        ops.mhc_pre(x, proj, scale, base, iters=0)
    with pytest.raises(ValueError, match="x: expected 1..=8 streams"):
        ops.mhc_pre(torch.ones(2, 9, 8), torch.ones(99, 72), torch.ones(3), torch.ones(99))
    with pytest.raises(ValueError, match="proj: contains a non-finite"):
        ops.mhc_pre(x, torch.full_like(proj, float("nan")), scale, base)


@pytest.mark.parametrize("t,n,d,m", [(1, 4, 256, 24), (3, 4, 300, 4), (0, 4, 64, 24), (2, 1, 5, 3), (5, 8, 130, 80),
                                     (2, 3, 1024, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mhc_mix_matches_reference(gen: torch.Generator, t: int, n: int, d: int, m: int, dtype: torch.dtype) -> None:
    x, proj = (randn(gen, t, n, d) * 2).to(dtype), randn(gen, m, n * d) * 0.02
    mix = ops.mhc_mix(x, proj, norm_eps=1e-5)
    assert mix.dtype == torch.float32 and mix.shape == (t, m)
    close(mix, ref.mhc_mix(x, proj, 1e-5), rtol=1e-5, atol=1e-6)
    close(ref.mhc_mix(x, proj, 1e-5), ref.rms_norm(x.flatten(-2), None, 1e-5) @ proj.double().T, rtol=1e-12, atol=0)


def test_mhc_mix_rejects_bad_input(gen: torch.Generator) -> None:
    x, proj = randn(gen, 2, 4, 8), randn(gen, 24, 32)
    with pytest.raises(ValueError, match="proj: expected shape"):
        ops.mhc_mix(x, proj[:, :31].contiguous())
    with pytest.raises(ValueError, match="proj: expected 1..=80 rows"):
        ops.mhc_mix(x, torch.ones(81, 32))
    with pytest.raises(ValueError, match="proj: expected 1..=80 rows"):
        ops.mhc_mix(x, torch.ones(0, 32))
    with pytest.raises(TypeError, match="proj: expected dtype"):
        ops.mhc_mix(x, proj.bfloat16())
    with pytest.raises(TypeError, match="x: expected dtype"):
        ops.mhc_mix(x.half(), proj)
    with pytest.raises(ValueError, match="norm_eps"):
        ops.mhc_mix(x, proj, norm_eps=float("nan"))
    with pytest.raises(ValueError, match="x: expected 1..=8 streams"):
        ops.mhc_mix(torch.ones(2, 9, 8), torch.ones(4, 72))
    with pytest.raises(ValueError, match="proj: contains a non-finite"):
        ops.mhc_mix(x, torch.full_like(proj, float("inf")))
    with pytest.raises(ValueError, match="proj"):
        ops.mhc_mix(x, torch.tensor(1.0))


def test_mhc_collapse_and_combine_reject_bad_input() -> None:
    x, pre, f, comb = torch.ones(2, 4, 8), torch.ones(2, 4), torch.ones(2, 8), torch.ones(2, 4, 4)
    with pytest.raises(ValueError, match="x: expected a 3-d tensor"):
        ops.mhc_collapse(torch.ones(2, 32), pre)
    with pytest.raises(ValueError, match="x: expected 1..=8 streams"):
        ops.mhc_collapse(torch.ones(2, 9, 8), torch.ones(2, 9))
    with pytest.raises(ValueError, match="x: expected 1 to 2"):
        ops.mhc_collapse(torch.ones(2, 4, 0), pre)
    with pytest.raises(ValueError, match="pre: expected shape"):
        ops.mhc_collapse(x, torch.ones(2, 3))
    with pytest.raises(TypeError, match="pre: expected dtype"):
        ops.mhc_collapse(x, pre.bfloat16())
    with pytest.raises(TypeError, match="x: expected dtype"):
        ops.mhc_collapse(x.double(), pre)
    with pytest.raises(ValueError, match="pre: contains a non-finite value at flat index 0"):
        ops.mhc_collapse(x, torch.full((2, 4), float("nan")))
    with pytest.raises(ValueError, match="f: expected shape"):
        ops.mhc_combine(x, torch.ones(2, 7), pre, comb)
    with pytest.raises(ValueError, match="comb: expected shape"):
        ops.mhc_combine(x, f, pre, torch.ones(2, 4, 3))
    with pytest.raises(ValueError, match="post: expected shape"):
        ops.mhc_combine(x, f, torch.ones(3, 4), comb)
    with pytest.raises(TypeError, match="f: expected dtype"):
        ops.mhc_combine(x, f.half(), pre, comb)
    with pytest.raises(ValueError, match="x: contains a non-finite"):
        ops.mhc_combine(torch.full((2, 4, 8), float("inf")), f, pre, comb)
    with pytest.raises(ValueError, match="comb: contains a non-finite"):
        ops.mhc_combine(x, f, pre, torch.full((2, 4, 4), float("nan")))


def test_mhc_weights_reject_bad_input() -> None:
    mix, scale, base = torch.zeros(2, 24), torch.ones(3), torch.zeros(24)
    with pytest.raises(ValueError, match="mix: expected .* columns"):
        ops.mhc_weights(torch.zeros(2, 23), scale, base)
    with pytest.raises(ValueError, match="base"):
        ops.mhc_weights(mix, scale, torch.zeros(23))
    with pytest.raises(ValueError, match="scale"):
        ops.mhc_weights(mix, torch.ones(2), base)
    with pytest.raises(TypeError, match="mix"):
        ops.mhc_weights(mix.double(), scale, base)
    with pytest.raises(ValueError, match="iters"):
        ops.mhc_weights(mix, scale, base, iters=0)
    with pytest.raises(ValueError, match="mix: values must be finite"):
        ops.mhc_weights(torch.full((2, 24), float("nan")), scale, base)
