"""CPU benchmarks of the attention ops beside torch eager doing the same computation.

Shapes are V4-Flash's (64 heads, 512-wide entries, 128-wide indexer keys, top-512, 128-token
window), with context scaled for a small CPU: compressed-key counts 2K, 8K and 32K stand for 8K,
32K and 128K tokens of context (CSA, ratio 4). Both sides start from the same cache bytes, so the
torch twins include dequantizing the rows they read. Run:

    pytest benches/bench_ops_cpu.py --benchmark-enable

and read the median of each group, and the speedup table printed at the end.
"""

from __future__ import annotations

import math

import pytest
import torch

from dsv4rs import ops
from dsv4rs import reference as ref

HEADS, TOPK, WINDOW = 64, 512, 128
INV_FREQ = ref.rope_inv_freq(64, 160000.0, yarn_factor=16.0)
MEDIANS: dict[str, dict[str, float]] = {}
"""Median seconds per group and implementation, printed by conftest.py's summary."""


def run(benchmark, group: str, impl: str, fn) -> None:
    benchmark.group = group
    benchmark(fn)
    MEDIANS.setdefault(group, {})[impl] = benchmark.stats.stats.median


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# ---------------------------------------------------------------------------------------------
# Torch eager twins


FP4_VALUES = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


def torch_index_keys(cache: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """FP4 indexer keys at cache rows ``rows`` -> float32 ``[..., 128]``."""
    page, off = (rows // 64)[..., None], (rows % 64)[..., None]
    data = cache[page, off * 64 + torch.arange(64)]
    scales = cache[page, 64 * 64 + off * 4 + torch.arange(4)]
    codes = torch.stack((data & 15, data >> 4), dim=-1).flatten(-2).long()
    return FP4_VALUES[codes] * torch.exp2(scales.float() - 127).repeat_interleave(32, dim=-1)


def torch_entries(cache: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """584-byte FP8 entries at cache rows ``rows`` -> float32 ``[..., 512]``."""
    page, off = (rows // 64)[..., None], (rows % 64)[..., None]
    data = cache[page, off * 576 + torch.arange(576)]
    scales = cache[page, 64 * 576 + off * 8 + torch.arange(7)]
    nope = data[..., :448].view(torch.float8_e4m3fn).float()
    nope = nope * torch.exp2(scales.float() - 127).repeat_interleave(64, dim=-1)
    return torch.cat((nope, data[..., 448:].contiguous().view(torch.bfloat16).float()), dim=-1)


def torch_indexer(q, w, cache, table, seq_ids, visible, k):
    n = int(visible.max())
    logical = torch.arange(n)
    rows = table[seq_ids.long()][:, logical // 64].long() * 64 + logical % 64
    keys = torch_index_keys(cache, rows)
    scores = (torch.einsum("thd,tnd->thn", q, keys).relu() * w[:, :, None]).sum(1)
    scores = scores.masked_fill(logical >= visible[:, None], -math.inf)
    return torch.topk(scores, min(k, n), dim=-1)


def torch_attention(q, cache, indices, sink, scale=512**-0.5):
    rows = torch_entries(cache, indices.clamp(min=0).long())
    z = torch.einsum("thd,tkd->thk", q, rows) * scale
    z = z.masked_fill((indices < 0)[:, None, :], -math.inf)
    p = torch.softmax(torch.cat((z, sink[None, :, None].expand(*z.shape[:2], 1)), dim=-1), dim=-1)[..., :-1]
    return torch.einsum("thk,tkd->thd", p, rows), torch.logsumexp(z, dim=-1)


def torch_rope(x, positions, inv_freq, inverse=False):
    angle = positions.double()[:, None] * inv_freq.double()
    angle = (-angle if inverse else angle).reshape(x.shape[0], *[1] * (x.dim() - 2), -1)
    cos, sin = angle.cos().float(), angle.sin().float()
    x = x.float()
    r = x.shape[-1] - 2 * inv_freq.shape[0]
    x0, x1 = x[..., r::2], x[..., r + 1 :: 2]
    rot = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return torch.cat((x[..., :r], rot), dim=-1)


def torch_fp8_quant_dequant(x: torch.Tensor) -> torch.Tensor:
    """The main-entry round trip: FP8 e4m3 with UE8M0 scales on dims 0:448, BF16 on 448:512."""
    blocks = x[..., :448].unflatten(-1, (7, 64))
    amax = blocks.abs().amax(-1, keepdim=True).clamp(min=1e-4)
    scale = torch.exp2(torch.ceil(torch.log2(amax / 448)))
    nope = (blocks / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
    return torch.cat((nope.flatten(-2), x[..., 448:].bfloat16().float()), dim=-1)


def torch_compress_prefill(kv, score, ape, weight, inv_freq, ratio, eps=1e-6):
    """Prefill compression of whole blocks in torch eager: pooling, RMSNorm, RoPE, FP8."""
    dim = weight.shape[0]
    n = kv.shape[0] // ratio
    blocks = kv[: n * ratio].unflatten(0, (n, ratio))
    logits = score[: n * ratio].unflatten(0, (n, ratio)) + ape
    if ratio == 4:
        prev_kv = torch.cat((torch.zeros_like(blocks[:1, :, :dim]), blocks[:-1, :, :dim]))
        prev_logits = torch.cat((torch.full_like(logits[:1, :, :dim], -math.inf), logits[:-1, :, :dim]))
        blocks = torch.cat((prev_kv, blocks[..., dim:]), dim=1)
        logits = torch.cat((prev_logits, logits[..., dim:]), dim=1)
    pooled = (torch.softmax(logits, dim=1) * blocks).sum(1)
    normed = pooled * torch.rsqrt(pooled.square().mean(-1, keepdim=True) + eps) * weight
    return torch_fp8_quant_dequant(torch_rope(normed, ratio * torch.arange(n), inv_freq))


def torch_compress_step(kv_state, score_state, kv_t, score_t, position, ape, weight, inv_freq, ratio, eps=1e-6):
    """One decode token of the overlapping compressor in torch eager (SPEC.md section 3)."""
    dim, slot = weight.shape[0], position % ratio
    kv_state[ratio + slot] = kv_t
    score_state[ratio + slot] = score_t + ape[slot]
    if (position + 1) % ratio:
        return None
    kv = torch.cat((kv_state[:ratio, :dim], kv_state[ratio:, dim:]))
    logits = torch.cat((score_state[:ratio, :dim], score_state[ratio:, dim:]))
    kv_state[:ratio] = kv_state[ratio:].clone()
    score_state[:ratio] = score_state[ratio:].clone()
    pooled = (torch.softmax(logits, dim=0) * kv).sum(0, keepdim=True)
    normed = pooled * torch.rsqrt(pooled.square().mean(-1, keepdim=True) + eps) * weight
    return torch_fp8_quant_dequant(torch_rope(normed, torch.tensor([position - slot]), inv_freq))


# ---------------------------------------------------------------------------------------------
# Inputs


def indexer_inputs(queries: int, keys: int, sequences: int):
    g = gen()
    pages = -(-keys // 64)
    cache = ops.quantize_index_keys(torch.randn(sequences * pages * 64, 128, generator=g), "fp4")
    table = torch.arange(sequences * pages, dtype=torch.int32).view(sequences, pages)
    seq_ids = torch.arange(queries, dtype=torch.int32) % sequences
    q = ref.fp4_quant_dequant(ops.hadamard128(torch.randn(queries * HEADS, 128, generator=g))).float()
    w = torch.randn(queries, HEADS, generator=g) * 128**-0.5 * HEADS**-0.5
    return q.view(queries, HEADS, 128), w, cache, table, seq_ids, torch.full((queries,), keys)


def attention_inputs(queries: int, candidates: int, rows: int = 65536):
    g = gen()
    cache = ops.quantize_entries(torch.randn(rows, 512, generator=g))
    q = torch.randn(queries, HEADS, 512, generator=g)
    indices = torch.randint(0, rows, (queries, candidates), generator=g)
    return q, cache, indices, torch.randn(HEADS, generator=g)


# ---------------------------------------------------------------------------------------------
# Cases


INDEXER_CASES = [
    ("decode 4 seqs, 8K ctx (2K keys)", 4, 2048, 4),
    ("decode 4 seqs, 32K ctx (8K keys)", 4, 8192, 4),
    ("decode 4 seqs, 128K ctx (32K keys)", 4, 32768, 4),
    ("prefill 64 queries, 32K ctx (8K keys)", 64, 8192, 1),
]


@pytest.mark.parametrize("impl", ["dsv4rs", "torch"])
@pytest.mark.parametrize("case", INDEXER_CASES, ids=[c[0] for c in INDEXER_CASES])
def test_indexer_topk(benchmark, case, impl: str) -> None:
    name, queries, keys, sequences = case
    q, w, cache, table, seq_ids, visible = indexer_inputs(queries, keys, sequences)
    if impl == "dsv4rs":
        fn = lambda: ops.indexer_topk(q, w, cache, table, seq_ids, visible, TOPK)  # noqa: E731
    else:
        fn = lambda: torch_indexer(q, w, cache, table, seq_ids, visible, TOPK)  # noqa: E731
    run(benchmark, f"indexer_topk: {name}", impl, fn)


ATTENTION_CASES = [
    ("decode 4 queries, CSA (512 + 128 window)", 4, TOPK + WINDOW),
    ("decode 4 queries, HCA at 128K (1024 + 128 window)", 4, 1024 + WINDOW),
    ("prefill 64 queries, CSA (512 + 128 window)", 64, TOPK + WINDOW),
]


@pytest.mark.parametrize("impl", ["dsv4rs", "torch"])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
def test_sparse_attention(benchmark, case, impl: str) -> None:
    name, queries, candidates = case
    q, cache, indices, sink = attention_inputs(queries, candidates)
    if impl == "dsv4rs":
        fn = lambda: ops.sparse_attention(q, cache, indices, sink)  # noqa: E731
    else:
        fn = lambda: torch_attention(q, cache, indices, sink)  # noqa: E731
    run(benchmark, f"sparse_attention: {name}", impl, fn)


COMPRESS_CASES = [("CSA main, 4 -> 512 dims", 4, 512), ("HCA, 128 -> 512 dims", 128, 512)]


@pytest.mark.parametrize("impl", ["dsv4rs", "torch"])
@pytest.mark.parametrize("case", COMPRESS_CASES, ids=[c[0] for c in COMPRESS_CASES])
def test_compress_prefill(benchmark, case, impl: str) -> None:
    name, ratio, dim = case
    coff, tokens = (2 if ratio == 4 else 1), 8192
    g = gen()
    kv, score = torch.randn(tokens, coff * dim, generator=g), torch.randn(tokens, coff * dim, generator=g)
    ape, weight = torch.randn(ratio, coff * dim, generator=g), torch.rand(dim, generator=g) + 0.5
    if impl == "dsv4rs":
        def fn():
            return ops.compress(kv, score, ape, weight, INV_FREQ, *ops.compressor_state(ratio, dim), 0, ratio, quant="fp8")
    else:
        def fn():
            return torch_compress_prefill(kv, score, ape, weight, INV_FREQ.float(), ratio)
    run(benchmark, f"compress prefill 8K tokens: {name}", impl, fn)


@pytest.mark.parametrize("impl", ["dsv4rs", "torch"])
def test_compress_decode(benchmark, impl: str) -> None:
    """One token that completes a CSA entry (the costly decode step)."""
    ratio, dim = 4, 512
    g = gen()
    kv, score = torch.randn(1, 2 * dim, generator=g), torch.randn(1, 2 * dim, generator=g)
    ape, weight = torch.randn(ratio, 2 * dim, generator=g), torch.rand(dim, generator=g) + 0.5
    state = [torch.randn(2 * ratio, 2 * dim, generator=g) for _ in range(2)]
    position = 4 * 1000 + 3
    if impl == "dsv4rs":
        def fn():
            return ops.compress(kv, score, ape, weight, INV_FREQ, *state, position, ratio, quant="fp8")
    else:
        f32 = INV_FREQ.float()

        def fn():
            return torch_compress_step(*state, kv[0], score[0], position, ape, weight, f32, ratio)
    run(benchmark, "compress decode: 1 token completing a CSA entry", impl, fn)


@pytest.mark.parametrize("impl", ["dsv4rs", "torch"])
@pytest.mark.parametrize("tokens", [64, 256])
def test_rope(benchmark, tokens: int, impl: str) -> None:
    """RoPE of a prefill chunk of queries (tokens x 64 heads x 512 dims, bf16 in, float32 out).
    At 256 tokens the 32 MiB output is a fresh mapping every call (glibc maps blocks of 32 MiB
    and more directly), and first-touch page faults take most of the time on both sides."""
    g = gen()
    x = torch.randn(tokens, HEADS, 512, generator=g).bfloat16()
    positions = torch.arange(100_000, 100_000 + tokens)
    fn = (lambda: ops.rope(x, positions, INV_FREQ)) if impl == "dsv4rs" else (lambda: torch_rope(x, positions, INV_FREQ))
    run(benchmark, f"rope: {tokens} tokens x 64 heads x 512", impl, fn)


def test_twins_compute_the_same(benchmark) -> None:
    """The torch twins agree with the ops (so the comparison is fair); not timed."""
    benchmark.group = "sanity"
    q, w, cache, table, seq_ids, visible = indexer_inputs(2, 3000, 2)
    mine, _ = ops.indexer_topk(q, w, cache, table, seq_ids, visible, TOPK, return_scores=True)
    theirs = torch_indexer(q, w, cache, table, seq_ids, visible, TOPK).indices
    assert (mine.long().sort(-1).values == theirs.sort(-1).values).float().mean() > 0.99
    q, cache, indices, sink = attention_inputs(3, 300, rows=1000)
    torch.testing.assert_close(ops.sparse_attention(q, cache, indices, sink), torch_attention(q, cache, indices, sink),
                               rtol=1e-4, atol=1e-4)
    g = gen()
    kv, score, ape = torch.randn(64, 1024, generator=g), torch.randn(64, 1024, generator=g), torch.randn(4, 1024, generator=g)
    weight = torch.rand(512, generator=g) + 0.5
    mine = ops.compress(kv, score, ape, weight, INV_FREQ, *ops.compressor_state(4, 512), 0, 4, quant="fp8")
    theirs = torch_compress_prefill(kv, score, ape, weight, INV_FREQ.float(), 4)
    assert ((mine - theirs).abs() <= 0.07 * mine.abs() + 1e-3).float().mean() > 0.999
    x, pos = torch.randn(8, 4, 512, generator=g), torch.arange(8) * 1000
    torch.testing.assert_close(ops.rope(x, pos, INV_FREQ), torch_rope(x, pos, INV_FREQ), rtol=1e-5, atol=1e-5)
    benchmark(lambda: None)
