"""Properties of the float64 reference, dsv4rs.reference (docs/model.md sections 2-5)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from dsv4rs import reference as R

F64 = torch.float64
INF = math.inf


def randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64)


def log_uniform(gen: torch.Generator, *shape: int, low: float, high: float) -> torch.Tensor:
    """Float32 values with random signs and magnitudes 2^U(low, high)."""
    mag = torch.exp2(low + (high - low) * torch.rand(*shape, generator=gen))
    sign = torch.where(torch.rand(*shape, generator=gen) < 0.5, -1.0, 1.0)
    return (sign * mag).float()


# ---------------------------------------------------------------------------------------------
# RoPE (docs/model.md section 2)


@pytest.mark.parametrize("shape", [(7, 64), (5, 3, 128), (4, 2, 3, 70)])
@pytest.mark.parametrize("theta,yarn", [(10000.0, None), (160000.0, 16.0)])
def test_inverse_rope_undoes_rope_and_leaves_leading_dims(gen, shape, theta, yarn):
    x = randn(gen, *shape)
    pos = torch.randint(0, 2**20, (shape[0],), generator=gen)
    inv_freq = R.rope_inv_freq(64, theta, yarn)
    y = R.apply_rope(x, pos, inv_freq)
    assert y.dtype == F64 and y.shape == x.shape
    assert torch.equal(y[..., :-64], x[..., :-64])
    assert torch.allclose(R.apply_rope(y, pos, inv_freq, inverse=True), x, rtol=0, atol=1e-12)


def test_rope_rotates_interleaved_pairs_as_complex_numbers(gen):
    x = randn(gen, 6, 4, 96)
    pos = torch.randint(0, 5000, (6,), generator=gen)
    inv_freq = R.rope_inv_freq(64)
    pairs = torch.view_as_complex(x[..., 32:].contiguous().unflatten(-1, (32, 2)))
    turn = torch.polar(torch.ones(6, 1, 32, dtype=F64), pos[:, None, None] * inv_freq)
    want = torch.view_as_real(pairs * turn).flatten(-2)
    assert torch.allclose(R.apply_rope(x, pos, inv_freq)[..., 32:], want, rtol=0, atol=1e-12)


def test_rope_dot_products_depend_on_relative_position_only(gen):
    q, k = randn(gen, 5, 64), randn(gen, 5, 64)
    pos_q, pos_k = torch.randint(0, 10000, (5,), generator=gen), torch.randint(0, 10000, (5,), generator=gen)
    inv_freq = R.rope_inv_freq(64, 160000.0, 16.0)

    def dots(shift: int) -> torch.Tensor:
        return (R.apply_rope(q, pos_q + shift, inv_freq) * R.apply_rope(k, pos_k + shift, inv_freq)).sum(-1)

    assert torch.allclose(dots(0), dots(123457), rtol=0, atol=1e-9)


def test_yarn_ramp_of_compressed_layers():
    j = torch.arange(32, dtype=F64)
    base = R.rope_inv_freq(64, 160000.0)
    assert torch.allclose(base, 160000.0 ** (-2 * j / 64), rtol=1e-15, atol=0)
    ramp = ((j - 15) / 10).clamp(0, 1)
    want = base * (1 - ramp) + base / 16 * ramp
    assert torch.allclose(R.rope_inv_freq(64, 160000.0, 16.0), want, rtol=1e-15, atol=0)


@pytest.mark.parametrize(
    "rope_dim,theta,factor", [(64, 10000.0, 4.0), (64, 160000.0, 16.0), (32, 50000.0, 8.0), (128, 1e6, 40.0)]
)
def test_yarn_keeps_fast_dims_and_interpolates_slow_dims(rope_dim, theta, factor):
    orig = 65536
    base = R.rope_inv_freq(rope_dim, theta)
    ratio = R.rope_inv_freq(rope_dim, theta, factor, orig) / base
    ramp = (1 - ratio) / (1 - 1 / factor)
    rotations = orig * base / (2 * math.pi)  # turns of each pair over the original context
    assert ((ramp >= -1e-15) & (ramp <= 1 + 1e-15)).all()
    assert (ramp.diff() >= -1e-15).all()
    assert torch.allclose(ratio[rotations >= 32], torch.ones((), dtype=F64), rtol=1e-15, atol=0)
    assert torch.allclose(ratio[rotations <= 1], torch.full((), 1 / factor, dtype=F64), rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------------------------
# Compressor (docs/model.md section 3)


def compressor_inputs(gen: torch.Generator, ratio: int, dim: int, length: int) -> dict[str, torch.Tensor]:
    width = (2 if ratio == 4 else 1) * dim
    return {
        "kv": randn(gen, length, width),
        "score": randn(gen, length, width),
        "ape": randn(gen, ratio, width),
        "norm_weight": 1 + 0.2 * randn(gen, dim),
        "inv_freq": R.rope_inv_freq(min(dim, 64), 160000.0, 16.0),
    }


def prefill(args: dict[str, torch.Tensor], ratio: int, quant: str = "none", **changed: torch.Tensor) -> torch.Tensor:
    return R.compressor_prefill(**{**args, **changed}, ratio=ratio, quant=quant)


def run_steps(args: dict[str, torch.Tensor], ratio: int, quant: str) -> torch.Tensor:
    """The entries of feeding the tokens one by one to compressor_step."""
    dim = args["norm_weight"].shape[0]
    kv_state, score_state = R.compressor_state_init(ratio, dim)
    entries = []
    for p in range(args["kv"].shape[0]):
        entry = R.compressor_step(
            kv_state, score_state, args["kv"][p], args["score"][p], p, args["ape"], args["norm_weight"], ratio,
            args["inv_freq"], quant=quant,
        )
        assert (entry is None) == ((p + 1) % ratio != 0)
        if entry is not None:
            entries.append(entry)
    return torch.stack(entries) if entries else torch.zeros(0, dim, dtype=F64)


@pytest.mark.parametrize(
    "ratio,dim,quant,length",
    [
        (4, 64, "none", 0), (4, 64, "none", 3), (4, 64, "none", 4), (4, 64, "none", 27),
        (4, 512, "fp8", 22), (4, 128, "fp4", 17),
        (128, 64, "none", 100), (128, 64, "none", 128), (128, 64, "none", 300),
        (128, 512, "fp8", 257), (128, 128, "fp4", 131),
        (1, 16, "none", 5), (3, 16, "none", 11), (4, 512, "fp8", 0), (8, 128, "fp4", 20),
    ],
)
def test_prefill_equals_token_by_token_steps(gen, ratio, dim, quant, length):
    args = compressor_inputs(gen, ratio, dim, length)
    entries = prefill(args, ratio, quant)
    assert entries.dtype == F64 and entries.shape == (length // ratio, dim)
    assert torch.allclose(run_steps(args, ratio, quant), entries, rtol=0, atol=1e-12)


def entry_by_definition(args: dict[str, torch.Tensor], ratio: int, i: int) -> torch.Tensor:
    """Entry i with quant "none", straight from docs/model.md section 3's candidate lists."""
    kv, score, ape, weight = args["kv"], args["score"], args["ape"], args["norm_weight"]
    dim = weight.shape[0]
    if ratio == 4:
        own = [(kv[j, dim:], score[j, dim:] + ape[j - 4 * i, dim:]) for j in range(4 * i, 4 * i + 4)]
        prev = [(kv[j, :dim], score[j, :dim] + ape[j - 4 * i + 4, :dim]) for j in range(4 * i - 4, 4 * i) if i > 0]
        candidates = own + prev
    else:
        candidates = [(kv[j], score[j] + ape[j - ratio * i]) for j in range(ratio * i, ratio * i + ratio)]
    values = torch.stack([v for v, _ in candidates])
    weights = torch.stack([s for _, s in candidates]).exp()
    pooled = (weights * values).sum(0) / weights.sum(0)
    normed = pooled / pooled.square().mean().add(1e-6).sqrt() * weight
    return R.apply_rope(normed[None], torch.tensor([ratio * i]), args["inv_freq"])[0]


@pytest.mark.parametrize("ratio,length", [(4, 21), (128, 260), (5, 17)])
def test_prefill_follows_the_definition(gen, ratio, length):
    args = compressor_inputs(gen, ratio, 64, length)
    entries = prefill(args, ratio)
    want = torch.stack([entry_by_definition(args, ratio, i) for i in range(length // ratio)])
    assert torch.allclose(entries, want, rtol=0, atol=1e-12)


def changed_entries(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    return torch.nonzero((before != after).any(1)).flatten().tolist()


def test_csa_entry_zero_has_no_previous_block(gen):
    args = compressor_inputs(gen, 4, 64, 12)
    entries = prefill(args, 4)
    # Entry 0 pools only the "a" halves of tokens 0..3; their "b" halves feed entry 1 alone.
    kv, score = args["kv"].clone(), args["score"].clone()
    kv[:4, :64] += randn(gen, 4, 64)
    score[:4, :64] += randn(gen, 4, 64)
    assert changed_entries(entries, prefill(args, 4, kv=kv, score=score)) == [1]


@pytest.mark.parametrize("i", [1, 3, 5])
def test_csa_entries_overlap_by_one_block(gen, i):
    args = compressor_inputs(gen, 4, 64, 24)
    entries = prefill(args, 4)
    for half, owner in ((slice(0, 64), i), (slice(64, 128), i - 1)):
        for name in ("kv", "score"):
            changed = args[name].clone()
            changed[4 * i - 1, half] += 1 + randn(gen, 64).abs()
            assert changed_entries(entries, prefill(args, 4, **{name: changed})) == [owner]


@pytest.mark.parametrize("ratio", [3, 16])
def test_hca_entries_do_not_overlap_and_the_tail_is_unused(gen, ratio):
    length = 3 * ratio + ratio // 2
    args = compressor_inputs(gen, ratio, 64, length)
    entries = prefill(args, ratio)
    for j in torch.randint(0, length, (6,), generator=gen).tolist():
        kv = args["kv"].clone()
        kv[j] += 1 + randn(gen, 64).abs()
        assert changed_entries(entries, prefill(args, ratio, kv=kv)) == ([j // ratio] if j < 3 * ratio else [])


def test_step_state_holds_scores_plus_ape_and_shifts(gen):
    args = compressor_inputs(gen, 4, 32, 8)
    kv_state, score_state = R.compressor_state_init(4, 32)
    assert kv_state.shape == score_state.shape == (8, 64)
    assert (kv_state == 0).all() and (score_state == -INF).all()
    for p in range(7):
        R.compressor_step(
            kv_state, score_state, args["kv"][p], args["score"][p], p, args["ape"], args["norm_weight"], 4,
            args["inv_freq"],
        )
    # Tokens 0..3 went to slots 4..7 and were shifted to slots 0..3 by the entry they completed;
    # tokens 4..6 sit in slots 4..6.
    assert torch.equal(kv_state[:7], args["kv"][:7])
    assert torch.equal(score_state[:7], args["score"][:7] + args["ape"][[0, 1, 2, 3, 0, 1, 2]])


@pytest.mark.parametrize("ratio", [1, 3, 4, 128])
def test_visibility_rule(ratio):
    positions = torch.arange(3 * ratio + 5)
    visible = R.compressed_visible(positions, ratio)
    for t in positions.tolist():
        assert visible[t] == sum(1 for i in range(t + 2) if ratio * i + ratio - 1 <= t)


@pytest.mark.parametrize("ratio", [4, 8])
def test_visible_entries_depend_only_on_past_tokens(gen, ratio):
    length = 5 * ratio + 2
    args = compressor_inputs(gen, ratio, 64, length)
    entries = prefill(args, ratio)
    visible = R.compressed_visible(torch.arange(length), ratio)
    for t in range(length):
        past = {**args, "kv": args["kv"][: t + 1], "score": args["score"][: t + 1]}
        assert torch.allclose(prefill(past, ratio), entries[: visible[t]], rtol=0, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# Lightning indexer (docs/model.md section 4)


def test_indexer_scores_match_the_sum_over_heads(gen):
    q, w, keys = randn(gen, 3, 4, 16), randn(gen, 3, 4), randn(gen, 5, 16)
    scores = R.indexer_scores(q, w, keys)
    assert scores.shape == (3, 5) and scores.dtype == F64
    for t in range(3):
        for s in range(5):
            want = sum(w[t, h] * max(float(q[t, h] @ keys[s]), 0.0) for h in range(4))
            assert abs(float(scores[t, s]) - want) < 1e-12


@pytest.mark.parametrize("k", [1, 3, 9, 20])
def test_topk_matches_a_brute_force_sort(gen, k):
    t, h, n = 12, 3, 9
    # Small integers: many exactly tied scores.
    q = torch.randint(-2, 3, (t, h, 8), generator=gen).double()
    w = torch.randint(0, 3, (t, h), generator=gen).double()
    keys = torch.randint(-2, 3, (n, 8), generator=gen).double()
    visible = torch.randint(0, n + 1, (t,), generator=gen)
    visible[:2] = torch.tensor([0, n])
    indices, top = R.indexer_topk(q, w, keys, visible, k)
    assert indices.shape == top.shape == (t, k) and indices.dtype == torch.int64 and top.dtype == F64
    scores = R.indexer_scores(q, w, keys)
    for row in range(t):
        order = sorted(range(int(visible[row])), key=lambda s: (-float(scores[row, s]), s))[:k]
        pad = k - len(order)
        assert indices[row].tolist() == order + [-1] * pad
        assert top[row].tolist() == [float(scores[row, s]) for s in order] + [-INF] * pad


def test_topk_never_returns_hidden_keys_and_pads(gen):
    n = 40
    q, w, keys = randn(gen, 30, 4, 16), randn(gen, 30, 4), randn(gen, n, 16)
    visible = R.compressed_visible(torch.arange(30) * 5, 4)
    indices, top = R.indexer_topk(q, w, keys, visible, 8)
    valid = indices >= 0
    assert (indices < visible[:, None]).all()
    assert torch.equal(valid.sum(1), visible.clamp(max=8))
    assert torch.equal(top == -INF, ~valid)


def test_topk_breaks_ties_by_lower_index(gen):
    keys = randn(gen, 1, 16).expand(10, 16)
    q, w = randn(gen, 2, 4, 16), randn(gen, 2, 4)
    indices, top = R.indexer_topk(q, w, keys, torch.tensor([10, 7]), 5)
    assert indices.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    assert (top == top[:, :1]).all()


# ---------------------------------------------------------------------------------------------
# Core attention (docs/model.md section 2)


def weights_by_row(q: torch.Tensor, indices: torch.Tensor, sink: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention weight given to each row: with kv the identity, out[t, h, j] is row j's weight."""
    out, _ = R.sparse_attention(q, torch.eye(q.shape[-1], dtype=F64), indices, sink, scale)
    return out


def distinct_indices(gen: torch.Generator, t: int, n: int, k: int) -> torch.Tensor:
    return torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(t)])


@pytest.mark.parametrize("scale", [512**-0.5, 0.3])
def test_sink_lowers_every_weight(gen, scale):
    t, h, d, k = 4, 3, 32, 10
    q, sink = randn(gen, t, h, d), randn(gen, h)
    indices = distinct_indices(gen, t, d, k)
    with_sink = weights_by_row(q, indices, sink, scale)
    plain = weights_by_row(q, indices, torch.full((h,), -INF, dtype=F64), scale)
    chosen = torch.zeros(t, 1, d, dtype=torch.bool).scatter(2, indices[:, None, :], True).expand(t, h, d)
    assert (with_sink[chosen] < plain[chosen]).all()
    assert (with_sink[~chosen] == 0).all() and (plain[~chosen] == 0).all()
    assert torch.allclose(plain.sum(-1), torch.ones((), dtype=F64), rtol=0, atol=1e-14)
    _, lse = R.sparse_attention(q, torch.eye(d, dtype=F64), indices, sink, scale)
    sink_share = torch.sigmoid(sink - lse)
    assert torch.allclose(1 - with_sink.sum(-1), sink_share, rtol=0, atol=1e-14)


def test_without_sink_it_is_softmax_attention(gen):
    t, h, d, n, k = 5, 4, 64, 30, 12
    q, kv = randn(gen, t, h, d), randn(gen, n, d)
    indices = torch.randint(0, n, (t, k), generator=gen)
    out, lse = R.sparse_attention(q, kv, indices, torch.full((h,), -INF), scale=0.2)
    z = torch.einsum("thd,tkd->thk", q, kv[indices]) * 0.2
    assert torch.allclose(out, torch.einsum("thk,tkd->thd", torch.softmax(z, -1), kv[indices]), rtol=0, atol=1e-12)
    assert torch.allclose(lse, torch.logsumexp(z, -1), rtol=0, atol=1e-12)
    # A very low finite sink is the same.
    out_low, _ = R.sparse_attention(q, kv, indices, torch.full((h,), -1e4), scale=0.2)
    assert torch.allclose(out_low, out, rtol=0, atol=1e-12)


def test_masked_candidates_are_ignored_and_order_does_not_matter(gen):
    t, h, d, n, k = 4, 2, 32, 20, 6
    q, kv, sink = randn(gen, t, h, d), randn(gen, n, d), randn(gen, h)
    indices = torch.randint(0, n, (t, k), generator=gen)
    out, lse = R.sparse_attention(q, kv, indices, sink)
    padded = torch.cat((indices, torch.full((t, 5), -1)), 1)[:, torch.randperm(k + 5, generator=gen)]
    out_padded, lse_padded = R.sparse_attention(q, kv, padded, sink)
    assert torch.allclose(out_padded, out, rtol=0, atol=1e-13)
    assert torch.allclose(lse_padded, lse, rtol=0, atol=1e-13)


def test_a_duplicated_candidate_counts_twice(gen):
    h, d = 3, 16
    q, sink = randn(gen, 1, h, d), randn(gen, h)
    weights = weights_by_row(q, torch.tensor([[2, 2, 5, -1]]), sink, 0.5)
    e = (q[0] * 0.5).exp()
    den = 2 * e[:, 2] + e[:, 5] + sink.exp()
    assert torch.allclose(weights[0, :, 2], 2 * e[:, 2] / den, rtol=1e-14, atol=0)
    assert torch.allclose(weights[0, :, 5], e[:, 5] / den, rtol=1e-14, atol=0)


@pytest.mark.parametrize("sink", [0.7, -INF])
@pytest.mark.parametrize("k", [0, 3])
def test_no_valid_candidate_gives_zero_and_minus_inf(gen, sink, k):
    out, lse = R.sparse_attention(randn(gen, 2, 3, 8), randn(gen, 4, 8), torch.full((2, k), -1), torch.full((3,), sink))
    assert out.shape == (2, 3, 8) and torch.equal(out, torch.zeros(2, 3, 8, dtype=F64))
    assert (lse == -INF).all()


def test_attention_is_stable_for_large_logits(gen):
    d = 16
    q = 1e4 * randn(gen, 3, 2, d)
    sink = torch.tensor([5e3, -INF], dtype=F64)
    indices = distinct_indices(gen, 3, d, 8)
    weights = weights_by_row(q, indices, sink, 1.0).gather(2, indices[:, None, :].expand(3, 2, 8))
    _, lse = R.sparse_attention(q, torch.eye(d, dtype=F64), indices, sink, 1.0)
    assert weights.isfinite().all() and lse.isfinite().all()
    # Logits near 1e4 carry absolute rounding errors near 1e-12.
    z = q.gather(2, indices[:, None, :].expand(3, 2, 8))
    assert torch.allclose(lse, torch.logsumexp(z, -1), rtol=1e-15, atol=0)
    assert torch.allclose(weights[:, 1], torch.softmax(z[:, 1], -1), rtol=0, atol=1e-10)
    assert torch.allclose(weights.sum(-1), torch.sigmoid(lse - sink), rtol=0, atol=1e-10)


@pytest.mark.parametrize("window", [1, 4, 128])
def test_window_indices(window):
    positions = torch.tensor([0, 1, 2, 3, 5, 127, 128, 300])
    idx = R.window_indices(positions, window)
    assert idx.shape == (8, window) and idx.dtype == torch.int64
    for row, t in zip(idx.tolist(), positions.tolist()):
        span = list(range(max(0, t - window + 1), t + 1))
        assert row == span + [-1] * (window - len(span))


# ---------------------------------------------------------------------------------------------
# Quantizers (docs/model.md section 5)

ALL_BYTES = torch.arange(256).to(torch.uint8)
FP8_FINITE = ALL_BYTES[ALL_BYTES & 0x7F != 0x7F]
FP4_GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_fp8_decode_matches_torch_float8():
    want = ALL_BYTES.view(torch.float8_e4m3fn).to(F64)
    got = R.fp8_e4m3_decode(ALL_BYTES)
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~got.isnan()
    assert torch.equal(got[finite], want[finite])
    assert torch.equal(got[finite].signbit(), want[finite].signbit())


def test_fp8_encode_rounds_like_torch_float8(gen):
    grid = R.fp8_e4m3_decode(FP8_FINITE[FP8_FINITE < 0x80])
    midpoints = ((grid[:-1] + grid[1:]) / 2).float()
    x = torch.cat((log_uniform(gen, 4000, low=-14, high=10), midpoints, -midpoints))
    for e in (-5, 0, 7):
        scaled = x * 2.0**e
        got = R.fp8_e4m3_decode(R.fp8_e4m3_encode(scaled, e))
        want = x.clamp(-448, 448).to(torch.float8_e4m3fn).to(F64)
        assert torch.equal(got, want)
        assert torch.equal(got.signbit(), x.signbit())


def test_fp4_encode_picks_the_nearest_grid_point_ties_to_even(gen):
    grid = torch.tensor(FP4_GRID, dtype=F64)
    midpoints = (grid[:-1] + grid[1:]) / 2
    x = torch.cat((log_uniform(gen, 2000, low=-4, high=3).double(), midpoints, -midpoints, torch.tensor([7.0, -100.0])))
    codes = R.fp4_e2m1_encode(x, 0)
    assert codes.dtype == torch.uint8 and (codes <= 15).all()
    dist = (x.abs().clamp(max=6)[:, None] - grid).abs()
    nearest = dist == dist.amin(1, keepdim=True)
    # Among equally near grid points (at most two), the even code wins.
    even = torch.arange(8) % 2 == 0
    want_code = torch.where(nearest.sum(1) > 1, (nearest & even).long().argmax(1), nearest.long().argmax(1))
    assert torch.equal((codes & 7).long(), want_code)
    assert torch.equal(codes >= 8, x.signbit())


def test_codes_round_trip_through_decode_and_encode():
    for e in (-20, 0, 20):
        fp8_values = R.fp8_e4m3_decode(FP8_FINITE) * 2.0**e
        assert torch.equal(R.fp8_e4m3_encode(fp8_values, e), FP8_FINITE)
        nibbles = torch.arange(16).to(torch.uint8)
        assert torch.equal(R.fp4_e2m1_encode(R.fp4_e2m1_decode(nibbles) * 2.0**e, e), nibbles)
    assert R.fp4_e2m1_decode(torch.arange(8).to(torch.uint8)).tolist() == FP4_GRID


def test_ties_to_even_saturation_and_signed_zero():
    def fp8(values: list[float], e: int = 0) -> list[float]:
        return R.fp8_e4m3_decode(R.fp8_e4m3_encode(torch.tensor(values), e)).tolist()

    def fp4(values: list[float]) -> list[float]:
        return R.fp4_e2m1_decode(R.fp4_e2m1_encode(torch.tensor(values), 0)).tolist()

    assert fp8([1.0625, 1.1875, 2**-10, 3 * 2**-10, 5 * 2**-10, 464.0]) == [1.0, 1.25, 0.0, 2**-8, 2**-8, 448.0]
    assert fp4([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0]) == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]
    assert R.fp8_e4m3_encode(torch.tensor([1e4, -1e30, 448.0 * 4, 464.0 * 4]), 2).tolist() == [0x7E, 0xFE, 0x7E, 0x7E]
    assert R.fp4_e2m1_encode(torch.tensor([7.0, -1e30]), 0).tolist() == [7, 15]
    assert R.fp8_e4m3_encode(torch.tensor([-0.0, -1e-30, 0.0]), 0).tolist() == [0x80, 0x80, 0x00]
    assert R.fp4_e2m1_encode(torch.tensor([-0.0, -0.1, 0.0]), 0).tolist() == [8, 8, 0]


@pytest.mark.parametrize("qmax", [R.FP8_MAX, R.FP4_MAX])
def test_ue8m0_exponent_is_the_smallest_covering_power(gen, qmax):
    powers = qmax * torch.exp2(torch.arange(-30, 30, dtype=F64))
    ulp = torch.tensor(1 + 2**-23, dtype=F64)
    random = log_uniform(gen, 3000, low=-40, high=40).abs().double()
    amax = torch.cat((random, powers, powers * ulp, powers / ulp, torch.zeros(1, dtype=F64)))
    amax = amax.float().double()
    e = R.ue8m0_exponent(amax, qmax)
    assert e.dtype == torch.int64
    a = amax.clamp(min=R.FP4_AMAX_FLOOR if qmax == R.FP4_MAX else R.AMAX_FLOOR)
    assert (a <= qmax * torch.exp2(e.double())).all()
    assert (a > qmax * torch.exp2(e.double() - 1)).all()


def test_ue8m0_exponent_fixed_cases():
    def e(amax: float, qmax: float) -> int:
        return int(R.ue8m0_exponent(torch.tensor(amax, dtype=torch.float32), qmax))

    assert [e(448.0, 448.0), e(448.00003, 448.0), e(224.0, 448.0), e(6.0, 6.0), e(6.1, 6.0)] == [0, 1, -1, 0, 1]
    # Block maxima below the floor take the floor's scale: 1e-4 for FP8, 6 * 2^-126 for FP4 (as
    # DeepSeek's FP4 quantizer), so tiny FP4 blocks keep their resolution.
    assert e(0.0, 448.0) == e(1e-7, 448.0) == e(1e-4, 448.0) == -22
    assert e(0.0, 6.0) == e(6 * 2**-126, 6.0) == e(1e-40, 6.0) == -126
    assert e(1e-4, 6.0) == -15 and e(1e-7, 6.0) == -25
    assert R.AMAX_FLOOR == float(torch.tensor(1e-4, dtype=torch.float32))


def half_step(x: torch.Tensor, e: torch.Tensor, man: int, min_binade: int) -> torch.Tensor:
    """Half the grid step of a minifloat with ``man`` mantissa bits at the binade of |x| 2^-e."""
    binade = torch.frexp(x.abs() * torch.exp2(-e)).exponent.double() - 1
    return torch.exp2(e + binade.clamp(min=min_binade) - man - 1)


QUANTIZERS: list[tuple[Callable[[torch.Tensor], torch.Tensor], int, int, float, int, int]] = [
    # function of [n, dim] values, dim, block, qmax, mantissa bits, smallest binade
    (R.fp4_quant_dequant, 128, 32, 6.0, 1, 0),
    (R.fp8_key_quant_dequant, 128, 128, 448.0, 3, -6),
    (lambda x: R.entry_quant_dequant(torch.nn.functional.pad(x, (0, 64)))[..., :448], 448, 64, 448.0, 3, -6),
]


@pytest.mark.parametrize("quantizer,dim,block,qmax,man,min_binade", QUANTIZERS)
def test_quant_dequant_error_is_within_half_a_grid_step(gen, quantizer, dim, block, qmax, man, min_binade):
    n = 40
    block_scales = torch.exp2(torch.randint(-20, 20, (n, dim // block), generator=gen)).repeat_interleave(block, 1)
    x = log_uniform(gen, n, dim, low=-8, high=8) * block_scales
    x[0] = 0
    x[1, :block] = 1e-9
    x = x.to(F64)
    y = quantizer(x)
    e = R.ue8m0_exponent(x.abs().unflatten(1, (-1, block)).amax(-1), qmax).double().repeat_interleave(block, 1)
    err = (y - x).abs()
    assert (err <= half_step(x, e, man, min_binade)).all()
    assert (y.abs() <= qmax * torch.exp2(e)).all()
    # The loose forms: FP8 |err| <= |x| 2^-4 + 2^(e-10); FP4 |err| <= |x| 2^-2 + 2^(e-2).
    loose = x.abs() * 2.0 ** -(man + 1) + torch.exp2(e + min_binade - man - 1)
    assert (err <= loose).all()
    assert torch.equal(quantizer(y), y)  # values on the grid stay put


def test_entry_rope_dims_are_rounded_to_bf16(gen):
    x = log_uniform(gen, 20, 512, low=-30, high=30)
    y = R.entry_quant_dequant(x)[:, 448:]
    assert torch.equal(y, x[:, 448:].to(torch.bfloat16).to(F64))
    tail = x[:, 448:].double()
    assert ((y - tail).abs() <= tail.abs() * 2.0**-8).all()


def test_quantizers_round_their_input_to_float32(gen):
    x = randn(gen, 3, 512)
    assert torch.equal(R.entry_quant_dequant(x), R.entry_quant_dequant(x.float()))
    assert torch.equal(R.encode_main_entries(x), R.encode_main_entries(x.float()))
    assert torch.equal(R.fp4_quant_dequant(x[:, :128]), R.fp4_quant_dequant(x[:, :128].float()))


def test_hadamard_is_orthonormal_symmetric_and_an_involution(gen):
    h = R.hadamard128(torch.eye(128))
    assert torch.equal(h, h.T)
    assert torch.equal(h.abs(), torch.full((128, 128), 128**-0.5, dtype=F64))
    assert torch.allclose(h @ h.T, torch.eye(128, dtype=F64), rtol=0, atol=1e-14)
    x = randn(gen, 2, 3, 128)
    assert torch.allclose(R.hadamard128(R.hadamard128(x)), x, rtol=0, atol=1e-13)
    # Sylvester order: the fast butterfly transform gives the same.
    fast = x.clone()
    step = 1
    while step < 128:
        pairs = fast.unflatten(-1, (-1, 2, step))
        fast = torch.stack((pairs[..., 0, :] + pairs[..., 1, :], pairs[..., 0, :] - pairs[..., 1, :]), -2).flatten(-3)
        step *= 2
    assert torch.allclose(R.hadamard128(x), fast * 128**-0.5, rtol=0, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# Cache bytes (docs/model.md section 5)


def from_le_bytes(b: torch.Tensor) -> torch.Tensor:
    return sum(b[..., i].long() << (8 * i) for i in range(b.shape[-1]))


def test_main_entry_bytes_decode_to_quant_dequant(gen):
    x = log_uniform(gen, 9, 512, low=-20, high=20)
    rows = R.encode_main_entries(x)
    assert rows.shape == (9, 584) and rows.dtype == torch.uint8
    scales = rows[:, 576:583].long() - 127
    nope = R.fp8_e4m3_decode(rows[:, :448]) * torch.exp2(scales.double()).repeat_interleave(64, 1)
    rope = from_le_bytes(rows[:, 448:576].unflatten(1, (64, 2))).to(torch.int16).view(torch.bfloat16).to(F64)
    assert torch.equal(torch.cat((nope, rope), 1), R.entry_quant_dequant(x))
    assert (rows[:, 583] == 0).all()


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_index_key_bytes_decode_to_quant_dequant(gen, fmt):
    x = log_uniform(gen, 7, 128, low=-20, high=20)
    rows = R.encode_index_keys(x, fmt)
    if fmt == "fp4":
        assert rows.shape == (7, 68)
        nibbles = torch.stack((rows[:, :64] & 15, rows[:, :64] >> 4), -1).flatten(1)
        scales = torch.exp2(rows[:, 64:].double() - 127).repeat_interleave(32, 1)
        assert torch.equal(R.fp4_e2m1_decode(nibbles) * scales, R.fp4_quant_dequant(x))
    else:
        assert rows.shape == (7, 132)
        scale = from_le_bytes(rows[:, 128:]).to(torch.int32).view(torch.float32).to(F64)
        assert torch.equal(R.fp8_e4m3_decode(rows[:, :128]) * scale[:, None], R.fp8_key_quant_dequant(x))


@pytest.mark.parametrize("n", [0, 1, 64, 65, 130])
@pytest.mark.parametrize("row_bytes,data_bytes", [(584, 576), (68, 64), (132, 128), (5, 0), (5, 5)])
def test_pack_pages_layout(gen, n, row_bytes, data_bytes):
    rows = torch.randint(1, 256, (n, row_bytes), generator=gen).to(torch.uint8)
    pages = R.pack_pages(rows, data_bytes)
    scale_bytes = row_bytes - data_bytes
    assert pages.shape == (-(-n // 64), 64 * row_bytes) and pages.dtype == torch.uint8
    for r in range(pages.shape[0] * 64):
        page, slot = divmod(r, 64)
        data = pages[page, slot * data_bytes : (slot + 1) * data_bytes]
        scales = pages[page, 64 * data_bytes + slot * scale_bytes : 64 * data_bytes + (slot + 1) * scale_bytes]
        if r < n:
            assert torch.equal(data, rows[r, :data_bytes]) and torch.equal(scales, rows[r, data_bytes:])
        else:
            assert (data == 0).all() and (scales == 0).all()


def test_bytes_match_the_rust_cpu_encoders(gen):
    ops = pytest.importorskip("dsv4rs.ops")
    x = log_uniform(gen, 70, 512, low=-24, high=24)
    x[0, :64] = 0
    x[1, :64] = -0.0
    assert torch.equal(R.pack_pages(R.encode_main_entries(x), 576), ops.quantize_entries(x))
    keys = log_uniform(gen, 70, 128, low=-24, high=24)
    for fmt, data_bytes in (("fp4", 64), ("fp8", 128)):
        assert torch.equal(R.pack_pages(R.encode_index_keys(keys, fmt), data_bytes), ops.quantize_index_keys(keys, fmt))


# ---------------------------------------------------------------------------------------------
# Argument checks

Z = torch.zeros
IF = R.rope_inv_freq()
CSA = compressor_inputs(torch.Generator().manual_seed(0), 4, 64, 8)
STATE = R.compressor_state_init(4, 64)


def step(**changed: object) -> object:
    args = {
        "kv_state": STATE[0].clone(), "score_state": STATE[1].clone(), "kv_t": CSA["kv"][0], "score_t": CSA["score"][0],
        "position": 0, "ape": CSA["ape"], "norm_weight": CSA["norm_weight"], "ratio": 4, "inv_freq": CSA["inv_freq"],
    }
    return R.compressor_step(**{**args, **changed})


def csa_prefill(**changed: object) -> object:
    return R.compressor_prefill(**{**CSA, "ratio": 4, **changed})


BAD_CALLS: list[tuple[str, Callable[[], object], type[Exception]]] = [
    ("rope_dim", lambda: R.rope_inv_freq(63), ValueError),
    ("theta", lambda: R.rope_inv_freq(64, 1.0), ValueError),
    ("yarn_factor", lambda: R.rope_inv_freq(64, 1e4, 0.0), ValueError),
    ("beta_fast", lambda: R.rope_inv_freq(64, 1e4, 16.0, beta_fast=1.0, beta_slow=32.0), ValueError),
    ("x", lambda: R.apply_rope([[0.0] * 64] * 3, torch.arange(3), IF), TypeError),
    ("x", lambda: R.apply_rope(Z(64), torch.arange(64), IF), ValueError),
    ("positions", lambda: R.apply_rope(Z(3, 64), torch.arange(4), IF), ValueError),
    ("positions", lambda: R.apply_rope(Z(3, 64), torch.arange(3.0), IF), TypeError),
    ("inv_freq", lambda: R.apply_rope(Z(3, 32), torch.arange(3), IF), ValueError),
    ("ratio", lambda: csa_prefill(ratio=0), ValueError),
    ("ratio", lambda: csa_prefill(ratio=4.0), TypeError),
    ("ape", lambda: csa_prefill(ratio=8), ValueError),
    ("kv", lambda: csa_prefill(kv=Z(8, 64)), ValueError),
    ("score", lambda: csa_prefill(score=Z(7, 128)), ValueError),
    ("norm_weight", lambda: csa_prefill(norm_weight=Z(1, 64)), ValueError),
    ("inv_freq", lambda: csa_prefill(inv_freq=R.rope_inv_freq(128)), ValueError),
    ("quant", lambda: csa_prefill(quant="fp8"), ValueError),
    ("quant", lambda: csa_prefill(quant="int8"), ValueError),
    ("dim", lambda: R.compressor_state_init(4, 0), ValueError),
    ("kv_state", lambda: step(kv_state=STATE[0].float()), TypeError),
    ("score_state", lambda: step(score_state=Z(4, 64, dtype=F64)), ValueError),
    ("kv_t", lambda: step(kv_t=Z(64)), ValueError),
    ("position", lambda: step(position=-1), ValueError),
    ("positions", lambda: R.compressed_visible(torch.tensor([-1]), 4), ValueError),
    ("weights", lambda: R.indexer_scores(Z(2, 4, 16), Z(2, 3), Z(5, 16)), ValueError),
    ("keys", lambda: R.indexer_scores(Z(2, 4, 16), Z(2, 4), Z(5, 8)), ValueError),
    ("visible", lambda: R.indexer_topk(Z(2, 4, 16), Z(2, 4), Z(5, 16), torch.tensor([1, 6]), 2), ValueError),
    ("visible", lambda: R.indexer_topk(Z(2, 4, 16), Z(2, 4), Z(5, 16), torch.tensor([-1, 2]), 2), ValueError),
    ("visible", lambda: R.indexer_topk(Z(2, 4, 16), Z(2, 4), Z(5, 16), torch.tensor([1]), 2), ValueError),
    ("k", lambda: R.indexer_topk(Z(2, 4, 16), Z(2, 4), Z(5, 16), torch.tensor([1, 2]), 0), ValueError),
    ("indices", lambda: R.sparse_attention(Z(2, 4, 8), Z(5, 8), torch.tensor([[0], [5]]), Z(4)), ValueError),
    ("indices", lambda: R.sparse_attention(Z(2, 4, 8), Z(5, 8), torch.tensor([[0], [-2]]), Z(4)), ValueError),
    ("indices", lambda: R.sparse_attention(Z(2, 4, 8), Z(5, 8), Z(2, 1), Z(4)), TypeError),
    ("kv", lambda: R.sparse_attention(Z(2, 4, 8), Z(5, 9), torch.zeros(2, 1, dtype=torch.long), Z(4)), ValueError),
    ("sink", lambda: R.sparse_attention(Z(2, 4, 8), Z(5, 8), torch.zeros(2, 1, dtype=torch.long), Z(3)), ValueError),
    ("window", lambda: R.window_indices(torch.arange(3), 0), ValueError),
    ("positions", lambda: R.window_indices(torch.tensor([-1]), 4), ValueError),
    ("x", lambda: R.entry_quant_dequant(Z(2, 511)), ValueError),
    ("x", lambda: R.entry_quant_dequant(torch.full((1, 512), math.nan)), ValueError),
    ("x", lambda: R.fp4_quant_dequant(Z(2, 512)), ValueError),
    ("x", lambda: R.fp8_e4m3_encode(torch.tensor([1e39], dtype=F64), 0), ValueError),
    ("x", lambda: R.hadamard128(torch.zeros(4, dtype=torch.long)), TypeError),
    ("amax", lambda: R.ue8m0_exponent(torch.tensor([math.inf]), 448.0), ValueError),
    ("qmax", lambda: R.ue8m0_exponent(Z(3), 0.0), ValueError),
    ("e", lambda: R.fp8_e4m3_encode(Z(3), 200), ValueError),
    ("e", lambda: R.fp4_e2m1_encode(Z(3), torch.zeros(2, dtype=torch.long)), ValueError),
    ("e", lambda: R.fp4_e2m1_encode(Z(3), 0.5), TypeError),
    ("codes", lambda: R.fp8_e4m3_decode(torch.arange(3)), TypeError),
    ("codes", lambda: R.fp4_e2m1_decode(torch.tensor([16], dtype=torch.uint8)), ValueError),
    ("x", lambda: R.encode_main_entries(Z(512)), ValueError),
    ("fmt", lambda: R.encode_index_keys(Z(2, 128), "fp16"), ValueError),
    ("rows_bytes", lambda: R.pack_pages(Z(2, 8, dtype=torch.long), 4), TypeError),
    ("data_bytes", lambda: R.pack_pages(Z(2, 8, dtype=torch.uint8), 9), ValueError),
]


@pytest.mark.parametrize("name,call,error", BAD_CALLS, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD_CALLS)])
def test_bad_arguments_raise_naming_the_argument(name, call, error):
    with pytest.raises(error, match=f"^{name}"):
        call()
