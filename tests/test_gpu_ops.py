"""The attention ops on the GPU against the CPU ops and the float64 reference: compressor,
indexer top-k, sparse attention; plus CUDA-graph capture and replay of each."""

from __future__ import annotations

import pytest
import torch

from dsv4rs import ops, reference
from profiled import launched_kernels

pytestmark = pytest.mark.gpu


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def bf16_exact(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).bfloat16().float()


# ----------------------------------------------------------------------------------- compressor


def compressor_inputs(gen: torch.Generator, ratio: int, dim: int, tokens: int):
    coff = 2 if ratio == 4 else 1
    kv = torch.randn(tokens, coff * dim, generator=gen)
    score = torch.randn(tokens, coff * dim, generator=gen) * 2
    ape = torch.randn(ratio, coff * dim, generator=gen)
    norm = torch.rand(dim, generator=gen) + 0.5
    inv_freq = reference.rope_inv_freq(64, 160000.0, yarn_factor=16).float()
    return kv, score, ape, norm, inv_freq


def run_compress(device: str, chunks: list[int], ratio: int, dim: int, quant: str, inputs) -> tuple:
    kv, score, ape, norm, inv_freq = (t.to(device) for t in inputs)
    kv_state, score_state = ops.compressor_state(ratio, dim, device)
    out, start = [], 0
    for n in chunks:
        out.append(ops.compress(kv[start : start + n], score[start : start + n], ape, norm, inv_freq,
                                kv_state, score_state, start, ratio, quant=quant))
        start += n
    return torch.cat(out).cpu(), kv_state.cpu(), score_state.cpu()


# Entries of the device against the CPU's: exp/rsqrt rounding, and a quantized entry may land one
# FP8/FP4 step apart near a rounding boundary.
ENTRY_TOL = {"none": 1e-6, "fp8": 3e-2, "fp4": 2e-1}


def assert_long_calls_match(gen: torch.Generator, ratio: int, dim: int, quant: str, long_chunks: list[int],
                            short_chunks: list[int]) -> None:
    """The calls of ``long_chunks`` give the entries and states of ``short_chunks`` bit for bit (the
    same tokens, other kernels), and the CPU's."""
    inputs = compressor_inputs(gen, ratio, dim, sum(long_chunks))
    assert sum(short_chunks) == sum(long_chunks)
    dev, kv_d, sc_d = run_compress("cuda", long_chunks, ratio, dim, quant, inputs)
    short, kv_s, sc_s = run_compress("cuda", short_chunks, ratio, dim, quant, inputs)
    assert torch.equal(dev, short) and torch.equal(kv_d, kv_s) and torch.equal(sc_d, sc_s)
    cpu, kv_c, sc_c = run_compress("cpu", long_chunks, ratio, dim, quant, inputs)
    assert torch.equal(kv_d, kv_c) and torch.equal(sc_d, sc_c)
    assert rel_err(dev, cpu) < ENTRY_TOL[quant]


@pytest.mark.parametrize("ratio,dim,quant", [(4, 512, "fp8"), (4, 128, "fp4"), (128, 512, "fp8"), (4, 512, "none"), (128, 256, "none")])
@pytest.mark.parametrize("chunks", [[517], [3, 1, 1, 250, 7, 256], [1] * 9 + [130]])
def test_compress_matches_cpu(gen: torch.Generator, ratio: int, dim: int, quant: str, chunks: list[int]) -> None:
    inputs = compressor_inputs(gen, ratio, dim, sum(chunks))
    cpu, kv_c, sc_c = run_compress("cpu", chunks, ratio, dim, quant, inputs)
    dev, kv_d, sc_d = run_compress("cuda", chunks, ratio, dim, quant, inputs)
    assert dev.shape == cpu.shape == (sum(chunks) // ratio, dim)
    # The state holds copies and sums of the inputs: identical. Entries within ENTRY_TOL.
    assert torch.equal(kv_d, kv_c) and torch.equal(sc_d, sc_c)
    if cpu.numel():
        assert rel_err(dev, cpu) < ENTRY_TOL[quant]
    ref = reference.compressor_prefill(*(t.double() for t in inputs[:4]), ratio, inputs[4].double(), quant="none",
                                       table="official")
    if quant == "none" and cpu.numel():
        assert rel_err(dev, ref) < 1e-5


@pytest.mark.parametrize("dim,quant", [(512, "fp8"), (128, "fp4"), (512, "none")])
def test_compress_long_calls_pool_in_the_finish_kernel(gen: torch.Generator, dim: int, quant: str) -> None:
    """Calls of 4,096 entries or more (ratio 4) pool each entry in the finish kernel, a warp an
    entry, instead of in the pool kernel: the same entries and states bit for bit as shorter calls
    (which take the pool kernel), from a fresh state and from one mid-block, and the CPU's."""
    assert_long_calls_match(gen, 4, dim, quant, [16386, 5, 16387], [4000, 3999, 4000, 4000, 387, 5, 8000, 8387])


@pytest.mark.parametrize("dim,quant", [(512, "fp8"), (256, "none")])
def test_compress_long_calls_of_ratio_128_pool_and_finish_a_block_an_entry(gen: torch.Generator, dim: int,
                                                                          quant: str) -> None:
    """Calls of 256 entries or more without overlap (ratio 128) pool and finish an entry a block in
    one kernel (dsv4_compress_entry), with the state blocks in the same launch from a block start
    and in a launch after it from mid-block: the same entries and states bit for bit as shorter
    calls (the pool and finish kernels), and the CPU's."""
    long_chunks = [32768 + 3 * 128, 100, 32868]  # 259 entries from 0; 100 tokens; 257 from mid-block
    assert_long_calls_match(gen, 128, dim, quant, long_chunks, [4000] * 16 + [2120])


@pytest.mark.profiler
def test_compress_takes_the_entry_kernel_only_for_long_calls_of_ratio_128(gen: torch.Generator) -> None:
    for ratio, tokens, entry in ((128, 256 * 128, True), (128, 255 * 128, False), (4, 4 * 4096, False)):
        kv, score, ape, norm, inv_freq = (t.cuda() for t in compressor_inputs(gen, ratio, 512, tokens))
        state = ops.compressor_state(ratio, 512, "cuda")
        names = launched_kernels(lambda: ops.compress(kv, score, ape, norm, inv_freq, *state, 0, ratio, quant="fp8"))
        assert ("dsv4_compress_entry" in names) == entry, (ratio, tokens, names)


@pytest.mark.parametrize("ratio", [4, 128])
@pytest.mark.parametrize("table", ops.ROPE_TABLES)
def test_compress_far_along_matches_cpu_and_reference(gen: torch.Generator, ratio: int, table: str) -> None:
    """Entries of a sequence fed from a position near 2^20 (fresh state): the GPU's RoPE angles
    are the CPU's and the reference's for each table, and the tables differ there."""
    far, dim = (1 << 20) - 256, 512
    kv, score, ape, norm, inv_freq = compressor_inputs(gen, ratio, dim, 2 * ratio)
    got = {}
    for device in ("cpu", "cuda"):
        state = ops.compressor_state(ratio, dim, device)
        args = (t.to(device) for t in (kv, score, ape, norm, inv_freq))
        got[device] = ops.compress(*args, *state, far, ratio, rope_table=table).cpu()
    assert rel_err(got["cuda"], got["cpu"]) < 1e-6
    want = reference.compressor_prefill(*(t.double() for t in (kv, score, ape, norm)), ratio, inv_freq.double(),
                                        position_offset=far, table=table)
    assert rel_err(got["cuda"], want) < 1e-5
    other = reference.compressor_prefill(*(t.double() for t in (kv, score, ape, norm)), ratio, inv_freq.double(),
                                         position_offset=far, table="exact" if table == "official" else "official")
    assert rel_err(got["cuda"], other) > 1e-4


# -------------------------------------------------------------------------------------- indexer


def paged_keys(gen: torch.Generator, seqs: int, max_pages: int, fmt: str, device: str):
    """A shuffled page pool holding `seqs` sequences of `max_pages * 64` keys each."""
    n_pages = seqs * max_pages + 3
    table = torch.randperm(n_pages, generator=gen)[: seqs * max_pages].view(seqs, max_pages).int()
    keys = torch.randn(n_pages * 64, 128, generator=gen)
    if fmt == "bf16":
        cache = keys.bfloat16().view(n_pages, 64, 128)
    else:
        cache = ops.quantize_index_keys(keys, fmt)
    return cache.to(device), table.to(device)


INDEXER_KERNELS = ["wgmma", "mma"]


def runnable_indexer_kernels() -> list[str]:
    """The indexer score kernels this GPU runs, the default first: wgmma on compute capability
    9.0 only, mma.sync everywhere."""
    return [k for k in INDEXER_KERNELS if k == "mma" or torch.cuda.get_device_capability() == (9, 0)]


@pytest.fixture(params=INDEXER_KERNELS)
def indexer_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with each indexer score kernel the GPU can run (forced through
    DSV4RS_INDEXER_KERNEL); the others are skipped, naming why."""
    if request.param not in runnable_indexer_kernels():
        pytest.skip("the wgmma indexer kernel runs on compute capability 9.0 only")
    monkeypatch.setenv("DSV4RS_INDEXER_KERNEL", request.param)
    return request.param


@pytest.mark.parametrize("fmt", ["fp4", "fp8", "bf16"])
# (64, 16, 1, 40): 10 splits a query, whose 80 peaks give the merge a floor under the 16th key.
@pytest.mark.parametrize("heads,k,seqs,max_pages", [(64, 512, 3, 40), (64, 2048, 1, 300), (7, 100, 5, 3), (1, 1, 2, 1), (33, 777, 2, 50),
                                                    (64, 16, 1, 40)])
def test_indexer_matches_cpu_exactly(gen: torch.Generator, fmt: str, heads: int, k: int, seqs: int, max_pages: int,
                                     indexer_kernel: str) -> None:
    cache, table = paged_keys(gen, seqs, max_pages, fmt, "cpu")
    t = 11
    q = bf16_exact(gen, t, heads, 128)
    w = torch.rand(t, heads, generator=gen)
    seq_ids = torch.randint(0, seqs, (t,), generator=gen)
    visible = torch.randint(0, max_pages * 64 + 1, (t,), generator=gen)
    visible[0], visible[1] = 0, min(k // 2, max_pages * 64)
    cpu_i, cpu_s = ops.indexer_topk(q, w, cache, table, seq_ids, visible, k, return_scores=True)
    dev_i, dev_s = ops.indexer_topk(q.cuda(), w.cuda(), cache.cuda(), table.cuda(), seq_ids.cuda(), visible.cuda(),
                                    k, return_scores=True)
    # Same sets; scores agree to fp32 summation order, so near-ties may swap neighbours.
    for row in range(t):
        assert set(dev_i[row].tolist()) == set(cpu_i[row].tolist()), f"query {row}"
    torch.testing.assert_close(dev_s.cpu(), cpu_s, rtol=1e-5, atol=1e-5)
    phys = ops.indexer_topk(q.cuda(), w.cuda(), cache.cuda(), table.cuda(), seq_ids.cuda(), visible.cuda(), k,
                            physical=True).cpu()
    logical = dev_i.cpu().long()
    expect = torch.where(logical >= 0, table[seq_ids].long().gather(1, (logical // 64).clamp_min(0)) * 64 + logical % 64, -1)
    assert torch.equal(phys.long(), expect)


def topk_on_cpu_and_gpu(gen: torch.Generator, cache: torch.Tensor, table: torch.Tensor, heads: int,
                        signed_weights: bool):
    """9 queries of `heads` heads, top-300 over two sequences of `table` (20 pages each, at least
    300 keys visible), on the CPU and on the GPU: (cpu indices, cpu scores, gpu indices, gpu scores)."""
    t, k = 9, 300
    q = bf16_exact(gen, t, heads, 128)
    w = torch.randn(t, heads, generator=gen) if signed_weights else torch.rand(t, heads, generator=gen)
    seq_ids = torch.randint(0, 2, (t,), generator=gen)
    visible = torch.randint(k, 20 * 64 + 1, (t,), generator=gen)
    cpu_i, cpu_s = ops.indexer_topk(q, w, cache, table, seq_ids, visible, k, return_scores=True)
    dev_i, dev_s = ops.indexer_topk(q.cuda(), w.cuda(), cache.cuda(), table.cuda(), seq_ids.cuda(), visible.cuda(),
                                    k, return_scores=True)
    return cpu_i, cpu_s, dev_i.cpu(), dev_s.cpu()


def assert_same_selection_but_near_ties(cpu_i: torch.Tensor, dev_i: torch.Tensor) -> None:
    for row in range(cpu_i.shape[0]):  # near-ties may swap neighbours; the sets agree but for the boundary
        assert len(set(dev_i[row].tolist()) ^ set(cpu_i[row].tolist())) <= 2, f"query {row}"


@pytest.mark.parametrize("heads", [64, 3])
def test_indexer_any_fp8_scale_and_signed_weights(gen: torch.Generator, heads: int, indexer_kernel: str) -> None:
    """FP8 keys with scales that are not powers of two (DeepGEMM's amax / 448, as the compat
    layer passes its caches through) and weights of either sign: the GPU scores equal the CPU's
    to float32 summation order."""
    cache, table = paged_keys(gen, 2, 20, "fp8", "cpu")
    pages = cache.view(cache.shape[0], -1)
    scales = pages[:, 64 * 128:].contiguous().view(torch.float32)
    scales.mul_(torch.rand(scales.shape, generator=gen) + 0.5)
    pages[:, 64 * 128:] = scales.view(torch.uint8)
    cpu_i, cpu_s, dev_i, dev_s = topk_on_cpu_and_gpu(gen, cache, table, heads, signed_weights=True)
    assert (cpu_s < 0).any(), "the case must have negative scores"
    # Signed weights cancel: the summation-order error scales with the largest score, not each.
    torch.testing.assert_close(dev_s, cpu_s, rtol=0, atol=1e-5 * float(cpu_s.abs().max()))
    assert_same_selection_but_near_ties(cpu_i, dev_i)


def test_indexer_fp4_keys_at_extreme_block_scales(gen: torch.Generator, indexer_kernel: str) -> None:
    """FP4 keys whose block scales lie inside the range the GPU decodes with one multiply (2^-125
    to 2^1) and past both ends of it (the zero byte, 2^-126, 2^2 to 2^12), mixed in every page:
    the GPU scores equal the CPU's to float32 summation order."""
    cache, table = paged_keys(gen, 2, 20, "fp4", "cpu")
    pages = cache.view(cache.shape[0], -1)
    codes = torch.tensor([0, 1, 2, 3, 120, 126, 127, 128, 129, 130, 135, 139], dtype=torch.uint8)
    scale_bytes = pages[:, 64 * 64:]
    scale_bytes.copy_(codes[torch.randint(0, len(codes), scale_bytes.shape, generator=gen)])
    cpu_i, cpu_s, dev_i, dev_s = topk_on_cpu_and_gpu(gen, cache, table, 64, signed_weights=False)
    assert float(cpu_s.max()) > 1e4, "the case must hold keys scaled past 2^1"
    torch.testing.assert_close(dev_s, cpu_s, rtol=1e-5, atol=1e-5 * float(cpu_s.abs().max()))
    assert_same_selection_but_near_ties(cpu_i, dev_i)


def test_indexer_ties_prefer_lower_index(gen: torch.Generator) -> None:
    cache, table = paged_keys(gen, 1, 4, "bf16", "cpu")
    cache.view(-1, 128)[:] = cache.view(-1, 128)[0]
    q = bf16_exact(gen, 2, 8, 128).abs()
    w = torch.ones(2, 8)
    idx = ops.indexer_topk(q.cuda(), w.cuda(), cache.cuda(), table.cuda(), torch.zeros(2, dtype=torch.long).cuda(),
                           torch.tensor([256, 100]).cuda(), 70).cpu()
    assert idx[0].tolist() == list(range(70))
    assert idx[1].tolist() == list(range(70))


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


@pytest.mark.parametrize("fmt", ["fp4", "fp8", "bf16"])
@pytest.mark.parametrize("heads,k,seqs,max_pages", [(64, 512, 3, 40), (7, 100, 5, 3), (1, 1, 2, 1), (33, 777, 2, 50)])
def test_indexer_scores_are_the_selection_scores_bit_for_bit(gen: torch.Generator, fmt: str, heads: int, k: int,
                                                             seqs: int, max_pages: int, indexer_kernel: str) -> None:
    """The dense scores are the fused selection's own on the GPU (one kernel computes both), and
    the CPU's to float32 summation order; -inf exactly past each query's visible keys."""
    cache, table = paged_keys(gen, seqs, max_pages, fmt, "cpu")
    t = 11
    q = bf16_exact(gen, t, heads, 128)
    w = torch.randn(t, heads, generator=gen)
    seq_ids = torch.randint(0, seqs, (t,), generator=gen)
    visible = torch.randint(0, max_pages * 64 + 1, (t,), generator=gen)
    visible[0], visible[1] = 0, min(k // 2, max_pages * 64)
    args = [x.cuda() for x in (q, w, cache, table, seq_ids, visible)]
    dev = ops.indexer_scores(*args)
    assert dev.shape == (t, max_pages * 64) and dev.dtype == torch.float32
    idx, top = ops.indexer_topk(*args, k, return_scores=True)
    picked = dev.gather(1, idx.long().clamp_min(0))
    assert torch.equal(bits(picked[idx >= 0]), bits(top[idx >= 0]))
    cpu = ops.indexer_scores(q, w, cache, table, seq_ids, visible)
    assert torch.equal(torch.isneginf(dev.cpu()), torch.isneginf(cpu))
    assert torch.equal(torch.isneginf(cpu), torch.arange(max_pages * 64) >= visible[:, None])
    seen = torch.isfinite(cpu)
    largest = float(torch.where(seen, cpu, 0).abs().max())
    torch.testing.assert_close(dev.cpu()[seen], cpu[seen], rtol=0, atol=1e-5 * largest)
    for width in (int(visible.max()) + 1, max_pages * 64 + 100):  # narrower and wider rows
        other = ops.indexer_scores(*args, width=width).cpu()
        n = min(width, max_pages * 64)
        assert torch.equal(bits(other[:, :n]), bits(dev.cpu()[:, :n])) and torch.isneginf(other[:, n:]).all()


def test_indexer_scores_skip_pages_outside_the_cache(gen: torch.Generator) -> None:
    """A page id outside the cache is skipped, as the fused selection skips it: -inf there."""
    cache, table = paged_keys(gen, 1, 4, "fp4", "cpu")
    table[0, 1] = cache.shape[0] + 5
    q, w = bf16_exact(gen, 2, 64, 128), torch.rand(2, 64, generator=gen)  # 64 heads: no exact ties
    args = [x.cuda() for x in (q, w, cache, table, torch.zeros(2, dtype=torch.long), torch.tensor([256, 100]))]
    dense = ops.indexer_scores(*args).cpu()
    assert torch.isneginf(dense[:, 64:128]).all() and torch.isfinite(dense[0, :64]).all()
    assert torch.isfinite(dense[0, 128:]).all() and torch.isfinite(dense[1, :64]).all()
    idx = ops.indexer_topk(*args, 256).cpu()
    assert not ((idx >= 64) & (idx < 128)).any()
    assert torch.equal(idx, ops.indexer_topk(*args, 256, tie_break="torch").cpu())


def test_indexer_torch_tie_break_on_gpu(gen: torch.Generator) -> None:
    """Without ties "torch" is the fused selection; with exact ties (identical keys) it is
    torch.topk over the GPU's dense scores, and "lower" keeps the lowest keys."""
    cache, table = paged_keys(gen, 2, 30, "fp8", "cpu")
    q, w = bf16_exact(gen, 6, 64, 128), torch.randn(6, 64, generator=gen)
    seq_ids, visible = torch.tensor([0, 1, 0, 1, 0, 1]), torch.tensor([1920, 1000, 65, 0, 1500, 700])
    args = [x.cuda() for x in (q, w, cache, table, seq_ids, visible)]
    for physical in (False, True):
        fused = ops.indexer_topk(*args, 300, return_scores=True, physical=physical)
        dense = ops.indexer_topk(*args, 300, return_scores=True, physical=physical, tie_break="torch")
        assert torch.equal(fused[0], dense[0]) and torch.equal(bits(fused[1]), bits(dense[1]))
    same, table = paged_keys(gen, 2, 30, "bf16", "cpu")
    same.view(-1, 128)[:] = same.view(-1, 128)[0]
    ties = [x.cuda() for x in (q.abs(), torch.rand(6, 64, generator=gen), same, table, seq_ids, visible)]
    scores = ops.indexer_scores(*ties)
    idx, top = ops.indexer_topk(*ties, 300, return_scores=True, tie_break="torch")
    want = torch.topk(scores, 300)
    for t in range(6):
        n = min(300, int(visible[t]))
        assert torch.equal(idx[t, :n], want.indices[t, :n].int()) and torch.equal(top[t, :n], want.values[t, :n])
        assert (idx[t, n:] == -1).all() and torch.isneginf(top[t, n:]).all()
    lower = ops.indexer_topk(*ties, 300).cpu()
    for t in range(6):
        n = min(300, int(visible[t]))
        assert lower[t, :n].tolist() == list(range(n))


def selection_of(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k key numbers of each row of dense scores (-inf: not visible): score descending,
    the lower key first on equal scores (a stable sort), -1 past the visible keys."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    picked = scores.gather(1, order)
    return torch.where(torch.isneginf(picked), -1, order).int()


@pytest.mark.parametrize("fmt,k", [("fp4", 512), ("fp8", 1024), ("fp4", 4096), ("fp8", 3)])
def test_indexer_long_context_merges_in_stages(gen: torch.Generator, fmt: str, k: int, indexer_kernel: str) -> None:
    """A few queries over 128,000 keys: hundreds of short splits, whose candidates go through
    several merge stages (4096: five). The selection is the exact top-k of the GPU's own dense
    scores (one kernel computes both), ties to the lower key."""
    cache, table = paged_keys(gen, 2, 2000, fmt, "cpu")
    q, w = bf16_exact(gen, 3, 64, 128), torch.randn(3, 64, generator=gen)
    seq_ids, visible = torch.tensor([0, 1, 0]), torch.tensor([128_000, 77_777, 4_000])
    args = [x.cuda() for x in (q, w, cache, table, seq_ids, visible)]
    dense = ops.indexer_scores(*args)
    idx, top = ops.indexer_topk(*args, k, return_scores=True)
    assert torch.equal(idx, selection_of(dense, k))
    picked = dense.gather(1, idx.long().clamp_min(0))
    assert torch.equal(bits(picked[idx >= 0]), bits(top[idx >= 0]))


@pytest.mark.parametrize("case,k", [("random", 512), ("random", 2048), ("clustered", 512), ("ties", 512)])
def test_indexer_one_query_at_1m_context_cuts_below_the_peaks_floor(gen: torch.Generator, case: str, k: int,
                                                                    indexer_kernel: str) -> None:
    """One query over 262,144 keys: 512 splits of 512 keys, whose 4,096 peaks (each half warp's
    largest key) give the first merge stage a floor under the k-th key, and candidates below it
    are not gathered. The selection is still the exact top-k of the GPU's own dense scores, ties to the
    lower key: with random FP4 keys and signed weights (k = 512: most candidates fall below the
    floor; k = 2048: half the peaks are above it), with the best keys packed into a few splits (one
    group keeps more than k above the floor, and selects), and with every key equal (the floor cuts
    nothing)."""
    fmt = "fp4" if case == "random" else "bf16"
    cache, table = paged_keys(gen, 1, 4096, fmt, "cpu")
    q, w = bf16_exact(gen, 1, 64, 128), torch.randn(1, 64, generator=gen)
    if case == "clustered":
        # 1,280 keys (3 splits) of positive dims, four times larger (exact in bf16): with positive
        # queries and weights each scores several times any other key.
        cluster = table[0, 1000:1020].long()
        cache[cluster] = cache[cluster].abs() * 4
        q, w = q.abs(), w.abs()
    elif case == "ties":
        cache.view(-1, 128)[:] = cache.view(-1, 128)[0]
        q, w = q.abs(), w.abs()
    args = [x.cuda() for x in (q, w, cache, table, torch.zeros(1, dtype=torch.long), torch.tensor([262_144]))]
    dense = ops.indexer_scores(*args)
    idx, top = ops.indexer_topk(*args, k, return_scores=True)
    assert torch.equal(idx, selection_of(dense, k))
    assert torch.equal(bits(dense.gather(1, idx.long())), bits(top))
    if case == "clustered":
        assert ((idx >= 1000 * 64) & (idx < 1020 * 64)).all()
    if case == "ties":
        assert idx[0].tolist() == list(range(k))


@pytest.mark.profiler
def test_indexer_kernel_switch_takes_effect(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each forced score kernel is the one that runs for the selection and the dense scores (seen
    by the profiler), the default is wgmma on compute capability 9.0 and mma.sync elsewhere, and
    the two select the same keys with scores equal to float32 summation order; an unknown name is
    an error naming the variable."""
    cache, table = paged_keys(gen, 2, 40, "fp4", "cpu")
    q, w = bf16_exact(gen, 5, 64, 128), torch.rand(5, 64, generator=gen)
    args = [x.cuda() for x in (q, w, cache, table, torch.tensor([0, 1, 0, 1, 1]), torch.tensor([2560, 2000, 999, 64, 1]))]
    names = {"wgmma": "dsv4_indexer_score_wgmma", "mma": "dsv4_indexer_score"}
    runnable = runnable_indexer_kernels()
    monkeypatch.delenv("DSV4RS_INDEXER_KERNEL", raising=False)
    assert names[runnable[0]] in launched_kernels(lambda: ops.indexer_topk(*args, 300))
    out = {}
    for kernel in runnable:
        monkeypatch.setenv("DSV4RS_INDEXER_KERNEL", kernel)
        launched = launched_kernels(lambda: ops.indexer_topk(*args, 300))
        assert names[kernel] in launched and not (set(names.values()) - {names[kernel]}) & launched, launched
        assert names[kernel] + "_dense" in launched_kernels(lambda: ops.indexer_scores(*args))
        out[kernel] = ops.indexer_topk(*args, 300, return_scores=True)
    first_idx, first_top = out[runnable[0]]
    for idx, top in out.values():
        torch.testing.assert_close(top, first_top, rtol=1e-5, atol=1e-5)
        assert_same_selection_but_near_ties(first_idx, idx)
    monkeypatch.setenv("DSV4RS_INDEXER_KERNEL", "fastest")
    with pytest.raises(ValueError, match="DSV4RS_INDEXER_KERNEL"):
        ops.indexer_topk(*args, 300)
    with pytest.raises(ValueError, match="DSV4RS_INDEXER_KERNEL"):
        ops.indexer_scores(*args)


def test_indexer_ties_across_merge_stages(gen: torch.Generator) -> None:
    """Every key scores the same: each split, each merge stage and the final sort keep the lowest
    key numbers, so the selection is 0 .. k - 1 in order."""
    cache, table = paged_keys(gen, 1, 600, "bf16", "cpu")
    cache.view(-1, 128)[:] = cache.view(-1, 128)[0]
    q, w = bf16_exact(gen, 2, 16, 128).abs(), torch.ones(2, 16)
    args = [x.cuda() for x in (q, w, cache, table, torch.zeros(2, dtype=torch.long), torch.tensor([38_400, 20_000]))]
    for k in (1000, 4096):
        idx = ops.indexer_topk(*args, k).cpu()
        assert idx[0].tolist() == list(range(k)) and idx[1].tolist() == list(range(k))


def test_indexer_scores_capture_and_replay_in_a_cuda_graph(gen: torch.Generator) -> None:
    ops.warm_up("cuda")
    kcache, table = paged_keys(gen, 2, 8, "fp4", "cuda")
    q, w = bf16_exact(gen, 8, 64, 128).cuda(), torch.rand(8, 64, generator=gen).cuda()
    seq_ids, visible = torch.tensor([0, 1] * 4).cuda(), torch.tensor([512, 300, 20, 0, 511, 1, 64, 65]).cuda()
    eager = ops.indexer_scores(q, w, kcache, table, seq_ids, visible)
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        got = ops.indexer_scores(q, w, kcache, table, seq_ids, visible)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(bits(got), bits(eager))


# ---------------------------------------------------------------------------------- attention


def attention_case(gen: torch.Generator, t: int, heads: int, n_rows: int, k: int, fmt: str, window: int):
    rows = torch.randn(n_rows, 512, generator=gen)
    if fmt == "fp8":
        cache = ops.quantize_entries(rows)
    else:
        cache = torch.cat([rows, torch.zeros((-n_rows) % 64, 512)]).bfloat16().view(-1, 64, 512)
    q = bf16_exact(gen, t, heads, 512, scale=3.0)
    idx = torch.randint(-1, n_rows, (t, k), generator=gen)
    lengths = torch.randint(0, k + 1, (t,), generator=gen).int()
    win_rows = torch.randn(3 * 64, 512, generator=gen)
    wcache = ops.quantize_entries(win_rows)
    widx = torch.randint(-1, 3 * 64, (t, window), generator=gen)
    sink = torch.randn(heads, generator=gen)
    return q, cache, idx, lengths, wcache, widx, sink


ATTENTION_KERNELS = ["wgmma", "mma", "portable"]


def runnable_kernels() -> list[str]:
    """The attention kernels this GPU runs: wgmma on compute capability 9.0 only, the 64-head
    mma.sync one where 220 KiB of shared memory fit, the portable one everywhere."""
    major, minor = torch.cuda.get_device_capability()
    smem = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    return [k for k in ATTENTION_KERNELS
            if k == "portable" or (k == "mma" and smem >= 224_768) or (k == "wgmma" and (major, minor) == (9, 0))]


@pytest.fixture(params=ATTENTION_KERNELS)
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with each attention kernel the GPU can run (forced through
    DSV4RS_ATTENTION_KERNEL); the others are skipped, naming why."""
    if request.param not in runnable_kernels():
        pytest.skip(f"this GPU does not run the {request.param} attention kernel")
    monkeypatch.setenv("DSV4RS_ATTENTION_KERNEL", request.param)
    return request.param


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
@pytest.mark.parametrize("t,heads,n_rows,k", [(4, 64, 1000, 512), (2, 128, 300, 1024), (3, 1, 70, 5), (64, 16, 4096, 64), (1, 40, 9000, 8192)])
def test_sparse_attention_matches_cpu(gen: torch.Generator, fmt: str, t: int, heads: int, n_rows: int, k: int,
                                      kernel: str) -> None:
    q, cache, idx, lengths, wcache, widx, sink = attention_case(gen, t, heads, n_rows, k, fmt, 128)
    inv_freq = reference.rope_inv_freq(64, 10000.0).float()
    pos = torch.randint(0, 10**6, (t,), generator=gen)
    args = dict(lengths=lengths, extra_cache=wcache, extra_indices=widx, derotate=(pos, inv_freq))
    out_c, lse_c = ops.sparse_attention(q, cache, idx, sink, **args)
    cuda = {k: (tuple(x.cuda() for x in v) if isinstance(v, tuple) else v.cuda()) for k, v in args.items()}
    out_d, lse_d = ops.sparse_attention(q.cuda(), cache.cuda(), idx.cuda(), sink.cuda(), **cuda)
    # bf16 tensor-core products (P rounded to bf16): about 1e-3 relative.
    assert rel_err(out_d, out_c) < 5e-3
    finite = torch.isfinite(lse_c)
    assert torch.equal(torch.isfinite(lse_d.cpu()), finite)
    torch.testing.assert_close(lse_d.cpu()[finite], lse_c[finite], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("table", ops.ROPE_TABLES)
def test_sparse_attention_derotates_with_the_table(gen: torch.Generator, table: str, kernel: str) -> None:
    """The epilogue's inverse RoPE takes the table's angles. One candidate per query and a sink
    far below every logit make each head's output exactly the candidate's row (weight 1), so the
    de-rotated output is the reference's to float32 rounding, while at 2^20 the tables differ by
    thousands of times that."""
    q, cache, _, _, _, _, sink = attention_case(gen, 4, 64, 1000, 512, "fp8", 128)
    idx = torch.full((4, 8), -1, dtype=torch.int32)
    idx[:, 0] = torch.tensor([5, 77, 300, 999])
    sink = torch.full_like(sink, -1e4)
    inv_freq = reference.rope_inv_freq(64, 10000.0).float()
    pos = torch.tensor([0, 4095, 131071, (1 << 20) - 1])
    out, _ = ops.sparse_attention(q.cuda(), cache.cuda(), idx.cuda(), sink.cuda(), derotate=(pos.cuda(), inv_freq.cuda()),
                                  rope_table=table)
    rows = ops.kv_read(cache, idx[:, 0].long())[:, None].expand(-1, q.shape[1], -1).double()
    want = reference.apply_rope(rows, pos, inv_freq, inverse=True, table=table)
    assert rel_err(out, want) < 1e-6
    other = reference.apply_rope(rows, pos, inv_freq, inverse=True, table="exact" if table == "official" else "official")
    assert rel_err(out[-1, :, 448:], other[-1, :, 448:]) > 1e-3


@pytest.mark.profiler
def test_attention_kernel_switch_takes_effect(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each forced kernel is the one that runs (seen by the profiler), the default is the first
    runnable one, and all agree closely (the wgmma and mma.sync kernels add in the same order and
    may agree bit for bit)."""
    q, cache, idx, lengths, wcache, widx, sink = (x.cuda() for x in attention_case(gen, 4, 64, 1000, 512, "fp8", 128))
    args = dict(lengths=lengths, extra_cache=wcache, extra_indices=widx)
    # The portable kernel's 16-head block runs here (4 queries: a small grid).
    names = {"wgmma": "dsv4_sparse_attention_wgmma", "mma": "dsv4_sparse_attention",
             "portable": "dsv4_sparse_attention_portable16"}
    every = set(names.values()) | {"dsv4_sparse_attention_portable", "dsv4_sparse_attention_wgmma_cluster"}
    run = lambda: ops.sparse_attention(q, cache, idx, sink, **args)  # noqa: E731
    monkeypatch.delenv("DSV4RS_ATTENTION_KERNEL", raising=False)  # the default, whatever the caller forced
    default_launched = launched_kernels(run)
    outs = {}
    for kernel in runnable_kernels():
        monkeypatch.setenv("DSV4RS_ATTENTION_KERNEL", kernel)
        launched = launched_kernels(run)
        assert names[kernel] in launched and not (every - {names[kernel]}) & launched, launched
        outs[kernel], _ = run()
    assert names[runnable_kernels()[0]] in default_launched
    monkeypatch.delenv("DSV4RS_ATTENTION_KERNEL")
    assert ops.attention_kernel() == runnable_kernels()[0]
    monkeypatch.setenv("DSV4RS_ATTENTION_KERNEL", "portable")
    assert ops.attention_kernel("cuda:0") == "portable"
    first = outs[runnable_kernels()[0]]
    for kernel, out in outs.items():
        assert rel_err(out, first) < 5e-3, kernel


@pytest.mark.parametrize("t,heads,k,block", [(1, 64, 512, "portable16"), (1, 128, 1024, "portable16"), (2, 16, 512, "portable16"),
                                              (64, 64, 512, "portable"), (8, 128, 1024, "portable"), (300, 40, 64, "portable")])
@pytest.mark.profiler
def test_portable_attention_takes_the_block_its_grid_needs(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch, t: int,
                                                         heads: int, k: int, block: str) -> None:
    """The portable kernel takes its 16-head block for small grids (few queries, or at most 16
    heads) and its 64-head block otherwise; each matches the CPU (one softmax over both lists, the
    sink, the derotation)."""
    monkeypatch.setenv("DSV4RS_ATTENTION_KERNEL", "portable")
    q, cache, idx, lengths, wcache, widx, sink = attention_case(gen, t, heads, 2000, k, "fp8", 128)
    inv_freq = reference.rope_inv_freq(64, 10000.0).float()
    pos = torch.randint(0, 10**6, (t,), generator=gen)
    args = dict(lengths=lengths, extra_cache=wcache, extra_indices=widx, derotate=(pos, inv_freq))
    out_c, lse_c = ops.sparse_attention(q, cache, idx, sink, **args)
    cuda = {k: (tuple(x.cuda() for x in v) if isinstance(v, tuple) else v.cuda()) for k, v in args.items()}
    run = lambda: ops.sparse_attention(q.cuda(), cache.cuda(), idx.cuda(), sink.cuda(), **cuda)  # noqa: E731
    launched = {n for n in launched_kernels(run) if n.startswith("dsv4_sparse_attention")}
    assert launched == {f"dsv4_sparse_attention_{block}"}, launched
    out_d, lse_d = run()
    assert rel_err(out_d, out_c) < 5e-3
    finite = torch.isfinite(lse_c)
    assert torch.equal(torch.isfinite(lse_d.cpu()), finite)
    torch.testing.assert_close(lse_d.cpu()[finite], lse_c[finite], rtol=1e-3, atol=1e-3)


def test_forcing_an_unknown_attention_kernel_is_an_error(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    q, cache, idx, _, _, _, sink = (x.cuda() for x in attention_case(gen, 1, 8, 100, 16, "fp8", 1))
    monkeypatch.setenv("DSV4RS_ATTENTION_KERNEL", "fastest")
    with pytest.raises(ValueError, match="DSV4RS_ATTENTION_KERNEL"):
        ops.sparse_attention(q, cache, idx, sink)
    with pytest.raises(ValueError, match="DSV4RS_ATTENTION_KERNEL"):
        ops.attention_kernel()


def test_sparse_attention_entries_of_any_scale(gen: torch.Generator, kernel: str) -> None:
    """FP8 entries whose 64-dim blocks span scales from 2^-20 to 2^30 (the decoders take a
    one-multiply path while every scale of a row is at most 2^7 and an exact two-step path
    otherwise) match the CPU op."""
    n_rows, t, heads = 300, 4, 64
    rows = torch.randn(n_rows, 512, generator=gen)
    block_scale = 2.0 ** torch.randint(-20, 31, (n_rows, 8), generator=gen).double()
    block_scale[: n_rows // 2] = block_scale[: n_rows // 2].clamp(max=2.0**8)  # half the rows: small scales only
    rows = (rows.double() * block_scale.repeat_interleave(64, dim=1)).float()
    cache = ops.quantize_entries(rows)
    q = bf16_exact(gen, t, heads, 512, scale=2.0**-25)
    idx = torch.randint(-1, n_rows, (t, 96), generator=gen)
    sink = torch.randn(heads, generator=gen)
    out_c, lse_c = ops.sparse_attention(q, cache, idx, sink)
    out_d, lse_d = ops.sparse_attention(q.cuda(), cache.cuda(), idx.cuda(), sink.cuda())
    assert rel_err(out_d, out_c) < 5e-3
    torch.testing.assert_close(lse_d.cpu(), lse_c, rtol=1e-3, atol=1e-3)


def test_sparse_attention_query_layouts(gen: torch.Generator, kernel: str) -> None:
    """bfloat16 queries (copied asynchronously), float32 ones (vector loads) and a float32 view
    that is not 16-byte aligned (scalar loads) give the same result for the same values."""
    q, cache, idx, lengths, wcache, widx, sink = (x.cuda() for x in attention_case(gen, 3, 70, 500, 300, "fp8", 128))
    args = dict(lengths=lengths, extra_cache=wcache, extra_indices=widx)
    ref, _ = ops.sparse_attention(q, cache, idx, sink, **args)
    bf, _ = ops.sparse_attention(q.bfloat16(), cache, idx, sink, **args)
    store = torch.empty(q.numel() + 1, device="cuda")
    shifted = store[1:].view_as(q)
    shifted.copy_(q)
    assert shifted.data_ptr() % 16 != 0
    odd, _ = ops.sparse_attention(shifted, cache, idx, sink, **args)
    assert torch.equal(bf, ref) and torch.equal(odd, ref)


@pytest.mark.parametrize("t,k", [(1, 640), (1, 8192), (200, 96)])
def test_sparse_attention_bfloat16_output_is_the_float32_output_rounded(gen: torch.Generator, t: int, k: int,
                                                                        kernel: str) -> None:
    """out_dtype=torch.bfloat16 gives the bits of the float32 output's ``.to(torch.bfloat16)``,
    de-rotation included, with each kernel: where one query's candidates go in several splits
    the combine stores it (t = 1), where the grid has one split (t = 200) the wgmma kernel's
    bfloat16 build stores it and the other kernels' output is cast; the log-sum-exp is
    unchanged."""
    q, cache, idx, lengths, wcache, widx, sink = (x.cuda() for x in attention_case(gen, t, 64, 3000, k, "fp8", 128))
    inv_freq = reference.rope_inv_freq(64, 10000.0).float().cuda()
    pos = torch.randint(0, 10**6, (t,), generator=gen).cuda()
    args = dict(lengths=lengths, extra_cache=wcache, extra_indices=widx, derotate=(pos, inv_freq))
    out, lse = ops.sparse_attention(q, cache, idx, sink, **args)
    out16, lse16 = ops.sparse_attention(q, cache, idx, sink, out_dtype=torch.bfloat16, **args)
    assert out16.dtype == torch.bfloat16
    assert torch.equal(out16.view(torch.int16), out.bfloat16().view(torch.int16))
    assert torch.equal(lse16, lse)


def wgmma_only() -> None:
    if "wgmma" not in runnable_kernels():
        pytest.skip("this GPU does not run the wgmma attention kernel")


@pytest.mark.parametrize("t,heads,k", [(1, 64, 32), (1, 64, 0), (32, 64, 512), (64, 64, 512), (1, 128, 128),
                                       (2, 70, 200), (3, 16, 1)])
@pytest.mark.profiler
def test_attention_clusters_give_the_combines_bits(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch, t: int,
                                                    heads: int, k: int) -> None:
    """Where a call has 2 to 8 splits, the wgmma kernel can run each query's splits as one cluster
    that folds the partials in shared memory (no combine kernel; DSV4RS_ATTENTION_CLUSTER=on takes
    it for grids of any size), and the output and log-sum-exp are the bits of the same splits
    folded by dsv4_attention_combine (=off), float32 and bfloat16, with the de-rotation; heads
    past the last (70, 16) and queries whose candidates end early (random lengths: empty splits)
    included."""
    wgmma_only()
    monkeypatch.setenv("DSV4RS_ATTENTION_KERNEL", "wgmma")
    q, cache, idx, lengths, wcache, widx, sink = attention_case(gen, t, heads, 3000, max(k, 1), "fp8", 128)
    inv_freq = reference.rope_inv_freq(64, 10000.0).float()
    pos = torch.randint(0, 10**6, (t,), generator=gen)
    args = dict(lengths=lengths, extra_cache=wcache, extra_indices=widx, derotate=(pos, inv_freq))
    if k == 0:
        args["lengths"] = torch.zeros_like(lengths)  # the window alone
    out_c, _ = ops.sparse_attention(q, cache, idx, sink, **args)
    cuda = {n: (tuple(x.cuda() for x in v) if isinstance(v, tuple) else v.cuda()) for n, v in args.items()}
    got = {}
    for mode, kernel in [("on", "dsv4_sparse_attention_wgmma_cluster"), ("off", "dsv4_attention_combine")]:
        monkeypatch.setenv("DSV4RS_ATTENTION_CLUSTER", mode)
        for dtype in (torch.float32, torch.bfloat16):
            def run(dtype: torch.dtype = dtype):
                return ops.sparse_attention(q.cuda(), cache.cuda(), idx.cuda(), sink.cuda(), out_dtype=dtype, **cuda)
            launched = launched_kernels(run)
            other = ({"dsv4_sparse_attention_wgmma_cluster", "dsv4_attention_combine"} - {kernel}).pop()
            assert kernel in launched and other not in launched, launched
            got[mode, dtype] = run()
    for dtype in (torch.float32, torch.bfloat16):
        (out, lse), (want, want_lse) = got["on", dtype], got["off", dtype]
        assert torch.equal(bits(out), bits(want)) and torch.equal(bits(lse), bits(want_lse)), dtype
    assert rel_err(got["on", torch.float32][0], out_c) < 5e-3


@pytest.mark.parametrize("t,heads,k,cluster", [(64, 64, 512, True), (64, 64, 1, True), (32, 128, 1024, True),
                                               (1, 64, 1, False), (1, 64, 512, False), (32, 64, 512, False)])
@pytest.mark.profiler
def test_attention_clusters_by_default_where_two_splits_fill_the_gpu(gen: torch.Generator,
                                                                      monkeypatch: pytest.MonkeyPatch, t: int,
                                                                      heads: int, k: int, cluster: bool) -> None:
    """By default the wgmma kernel takes its cluster form for two splits in a grid of more than 66
    blocks (V4-Flash's layers at batch 64, V4-Pro's CSA at batch 32) and the combine elsewhere."""
    wgmma_only()
    monkeypatch.setenv("DSV4RS_ATTENTION_KERNEL", "wgmma")
    monkeypatch.delenv("DSV4RS_ATTENTION_CLUSTER", raising=False)
    q, cache, idx, lengths, wcache, widx, sink = (x.cuda() for x in attention_case(gen, t, heads, 3000, k, "fp8", 128))
    launched = launched_kernels(lambda: ops.sparse_attention(q, cache, idx, sink, lengths=lengths, extra_cache=wcache,
                                                             extra_indices=widx))
    assert ("dsv4_sparse_attention_wgmma_cluster" in launched) == cluster, launched
    assert ("dsv4_attention_combine" in launched) == (not cluster), launched  # every case here has splits


def test_an_unknown_attention_cluster_setting_is_an_error(gen: torch.Generator,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    q, cache, idx, _, _, _, sink = (x.cuda() for x in attention_case(gen, 1, 8, 100, 16, "fp8", 1))
    monkeypatch.setenv("DSV4RS_ATTENTION_CLUSTER", "sometimes")
    with pytest.raises(ValueError, match="DSV4RS_ATTENTION_CLUSTER"):
        ops.sparse_attention(q, cache, idx, sink)


def test_sparse_attention_edge_cases(gen: torch.Generator, kernel: str) -> None:
    rows = torch.randn(64, 512, generator=gen)
    cache = ops.quantize_entries(rows)
    q = bf16_exact(gen, 5, 8, 512)
    idx = torch.full((5, 40), -1, dtype=torch.long)
    idx[1, 7] = 3                       # one candidate
    idx[2, :] = 5                       # duplicates
    idx[3, :3] = torch.tensor([1, 2, 70000])  # out of range ids are masked on the GPU
    idx[4, :] = torch.arange(40)
    sink = torch.tensor([50.0, -50.0, 0, 0, 0, 0, 0, 100.0])  # dominating and negligible sinks
    q[4] = (q[4] * 40).bfloat16().float()  # very large scores (the GPU takes q as bf16)
    out_d, lse_d = ops.sparse_attention(q.cuda(), cache.cuda(), idx.cuda(), sink.cuda())
    idx[3, 2] = -1
    out_c, lse_c = ops.sparse_attention(q, cache, idx, sink)
    assert (out_d[0] == 0).all() and torch.isinf(lse_d[0]).all()
    assert rel_err(out_d, out_c) < 5e-3
    assert torch.isfinite(out_d).all()


@pytest.mark.parametrize("t,k", [(1, 8192), (8, 2048)])
def test_sparse_attention_masks_rows_in_blocks_of_many_tiles(gen: torch.Generator, t: int, k: int, kernel: str) -> None:
    """Masked candidates (-1, ids past either cache, positions past a query's length) in splits
    of four 32-candidate tiles, so that the kernels' tile buffers are reused within a block: the
    CPU op, given -1 for every id the GPU masks, is the reference."""
    q, cache, idx, lengths, wcache, widx, sink = attention_case(gen, t, 64, 3008, k, "fp8", 128)
    idx[:, ::7] = 3008 + torch.arange(idx[:, ::7].numel()).view(t, -1)  # past the cache
    idx[:, 5::11] = -1
    widx[:, ::5] = 192 + torch.arange(widx[:, ::5].numel()).view(t, -1)  # past the window's cache
    lengths[0] = k - 45  # ends inside a tile
    out_d, lse_d = ops.sparse_attention(q.cuda(), cache.cuda(), idx.cuda(), sink.cuda(), lengths=lengths.cuda(),
                                        extra_cache=wcache.cuda(), extra_indices=widx.cuda())
    out_c, lse_c = ops.sparse_attention(q, cache, idx.masked_fill(idx >= 3008, -1), sink, lengths=lengths,
                                        extra_cache=wcache, extra_indices=widx.masked_fill(widx >= 192, -1))
    assert rel_err(out_d, out_c) < 5e-3
    torch.testing.assert_close(lse_d.cpu(), lse_c, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------- CUDA graphs


def test_ops_capture_and_replay_in_cuda_graphs(gen: torch.Generator) -> None:
    ops.warm_up("cuda")
    q, cache, idx, lengths, wcache, widx, sink = (x.cuda() for x in attention_case(gen, 8, 64, 640, 512, "fp8", 128))
    kcache, table = paged_keys(gen, 2, 8, "fp4", "cuda")
    qi = bf16_exact(gen, 8, 64, 128).cuda()
    wi = torch.rand(8, 64, generator=gen).cuda()
    seq_ids = torch.tensor([0, 1] * 4).cuda()
    visible = torch.tensor([512, 300, 20, 0, 511, 1, 64, 65]).cuda()
    ckv, cscore, cape, cnorm, cfreq = (x.cuda() for x in compressor_inputs(gen, 4, 512, 8))
    kv_state, score_state = ops.compressor_state(4, 512, "cuda")
    eager = (ops.sparse_attention(q, cache, idx, sink, lengths=lengths, extra_cache=wcache, extra_indices=widx),
             ops.indexer_topk(qi, wi, kcache, table, seq_ids, visible, 100))
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        att = ops.sparse_attention(q, cache, idx, sink, lengths=lengths, extra_cache=wcache, extra_indices=widx)
        top = ops.indexer_topk(qi, wi, kcache, table, seq_ids, visible, 100)
        ent = ops.compress(ckv, cscore, cape, cnorm, cfreq, kv_state, score_state, 0, 4, quant="fp8")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(att[0], eager[0][0]) and torch.equal(top, eager[1])
    q.mul_(-1)
    graph.replay()
    torch.cuda.synchronize()
    again = ops.sparse_attention(q, cache, idx, sink, lengths=lengths, extra_cache=wcache, extra_indices=widx)
    assert torch.equal(att[0], again[0])
    assert ent.shape == (2, 512) and torch.isfinite(ent).all()


# ---------------------------------------------------------------------------------- mHC weights


@pytest.mark.parametrize("n,t", [(4, 1), (4, 300), (2, 7), (8, 129)])
def test_mhc_weights_match_cpu(gen: torch.Generator, n: int, t: int) -> None:
    width = (2 + n) * n
    mix = torch.randn(t, width, generator=gen) * 3
    scale, base = torch.rand(3, generator=gen) + 0.5, torch.randn(width, generator=gen)
    cpu = ops.mhc_weights(mix, scale, base, 20, 1e-6)
    gpu = ops.mhc_weights(mix.cuda(), scale.cuda(), base.cuda(), 20, 1e-6)
    for c, g in zip(cpu, gpu):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- RMSNorm, mHC collapse and combine

# As the CPU tests: float32 within float32 arithmetic, bfloat16 rounded once (2^-9) plus that.
TOL = {torch.float32: dict(rtol=2e-5, atol=1e-6), torch.bfloat16: dict(rtol=2**-8, atol=1e-6)}


def unaligned(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``x`` that starts one element past an aligned address (the kernels'
    one-value-a-load path)."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    view = buf[1:].view(x.shape)
    view.copy_(x)
    return view


@pytest.mark.parametrize("shape", [(1, 4096), (64, 512), (3, 16384), (300, 1024), (5, 7), (2, 2048), (0, 64), (129, 1),
                                   (2, 40000), (3, 131072 + 3), (33, 96)])
@pytest.mark.parametrize("x_dtype,w_dtype,out_dtype", [
    (torch.bfloat16, torch.float32, torch.bfloat16), (torch.bfloat16, None, torch.float32),
    (torch.float32, torch.bfloat16, torch.float32), (torch.float32, None, torch.bfloat16)])
def test_rms_norm_matches_reference(gen: torch.Generator, shape: tuple[int, int], x_dtype: torch.dtype,
                                    w_dtype: torch.dtype | None, out_dtype: torch.dtype) -> None:
    x = (torch.randn(*shape, generator=gen) * 3).to(x_dtype)
    w = None if w_dtype is None else (torch.rand(shape[-1], generator=gen) * 2).to(w_dtype)
    want = reference.rms_norm(x, w, 1e-6)
    xg, wg = x.cuda(), None if w is None else w.cuda()
    for xs in (xg, unaligned(xg)):
        got = ops.rms_norm(xs, wg, 1e-6, out_dtype)
        assert got.dtype == out_dtype and got.shape == x.shape
        torch.testing.assert_close(got.double().cpu(), want, **TOL[out_dtype])
    # Both round once from float32 values a few float32 ulps apart: at most one ulp apart (2^-7
    # relative at the bottom of a binade in bfloat16).
    one_ulp = dict(rtol=2**-7, atol=1e-6) if out_dtype == torch.bfloat16 else TOL[out_dtype]
    torch.testing.assert_close(got.cpu().double(), ops.rms_norm(x, w, 1e-6, out_dtype).double(), **one_ulp)


@pytest.mark.profiler
@pytest.mark.parametrize("shape,cols", [((64, 1536), (0, 1024)), ((64, 1536), (1024, 1536)), ((5, 20), (1, 8)),
                                        ((300, 104), (4, 100)), ((3, 8192), (4096, 8192)), ((2, 40008), (3, 40003)),
                                        ((2, 3, 1100), (76, 588)), ((1, 48), (8, 40))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_reads_a_column_range_in_place(gen: torch.Generator, shape: tuple[int, ...], cols: tuple[int, int],
                                                dtype: torch.dtype) -> None:
    """A column range of a matrix (the packed q_a/kv projection's q_a) gives the bits its
    contiguous copy gives, in the one kernel: aligned and not, rows longer than a thread's
    registers hold, leading dimensions flattened."""
    y = (torch.randn(*shape, generator=gen) * 3).to(dtype).cuda()
    x = y[..., cols[0]:cols[1]]
    w = (torch.rand(x.shape[-1], generator=gen) * 2).cuda()
    # The copy loads as many values at a time as the range does (its sum of squares in that order).
    four = cols[0] % 4 == 0 and shape[-1] % 4 == 0 and x.shape[-1] % 4 == 0
    copy = x.contiguous() if four else unaligned(x.contiguous())
    for weight, out_dtype in ((w, dtype), (None, torch.float32)):
        got = ops.rms_norm(x, weight, 1e-6, out_dtype)
        assert got.is_contiguous() and torch.equal(got, ops.rms_norm(copy, weight, 1e-6, out_dtype))
        want = reference.rms_norm(x.double().cpu(), None if weight is None else weight.double().cpu(), 1e-6)
        torch.testing.assert_close(got.double().cpu(), want, **TOL[out_dtype])
        assert launched_kernels(lambda: ops.rms_norm(x, weight, 1e-6, out_dtype)) == {"dsv4_rms_norm"}
    transposed = y.flatten(0, -2)[:, cols[0]:cols[1]].t().contiguous().t()  # columns adjacent: copied first
    torch.testing.assert_close(ops.rms_norm(transposed, w, 1e-6), ops.rms_norm(transposed.contiguous(), w, 1e-6),
                               rtol=0, atol=0)


def test_rms_norm_non_finite_propagates() -> None:
    x = torch.ones(3, 4096, device="cuda")
    x[1, 7] = float("nan")
    y = ops.rms_norm(x, None, 1e-6, torch.bfloat16)
    assert y[1].isnan().all() and torch.isfinite(y[[0, 2]]).all()


@pytest.mark.parametrize("t,n,d", [(1, 4, 4096), (33, 4, 4096), (3, 1, 7), (2, 8, 130), (0, 4, 64), (5, 3, 4)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mhc_collapse_and_combine_match_reference(gen: torch.Generator, t: int, n: int, d: int,
                                                  dtype: torch.dtype) -> None:
    x = (torch.randn(t, n, d, generator=gen) * 2).to(dtype)
    pre, post = torch.rand(t, n, generator=gen) + 0.1, torch.rand(t, n, generator=gen) * 2
    comb = torch.softmax(torch.randn(t, n, n, generator=gen), -1)
    f = torch.randn(t, d, generator=gen).to(dtype)
    tol = dict(TOL[dtype], atol=1e-5 if dtype == torch.float32 else 2**-8)
    want_y, want_x = reference.mhc_collapse(x, pre), reference.mhc_combine(x, f, post, comb)
    cpu_y = ops.mhc_collapse(x, pre)
    for xs, fs in ((x.cuda(), f.cuda()), (unaligned(x.cuda()), unaligned(f.cuda()))):
        y = ops.mhc_collapse(xs, pre.cuda())
        assert y.dtype == dtype and y.shape == (t, d)
        torch.testing.assert_close(y.cpu().double(), want_y, **tol)
        # The same float32 products and sums in the same order as the CPU: the same bits.
        assert torch.equal(y.cpu(), cpu_y)
        out = ops.mhc_combine(xs, fs, post.cuda(), comb.cuda())
        assert out.dtype == dtype and out.shape == x.shape
        torch.testing.assert_close(out.cpu().double(), want_x, **tol)
    f32 = ops.mhc_combine(x.cuda(), f.float().cuda(), post.cuda(), comb.cuda())
    torch.testing.assert_close(f32.cpu().double(), reference.mhc_combine(x, f.float(), post, comb), **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mhc_combine_of_two_outputs_is_combine_of_their_sum(gen: torch.Generator, dtype: torch.dtype) -> None:
    """f2 on the GPU (dsv4_mhc_combine_add): the bits of combining torch's f + f2, aligned (four
    values a thread) and not; and the CPU's to the combine's own tolerance (the GPU's combine is
    not the CPU's bit for bit: test_mhc_collapse_and_combine_match_reference)."""
    tol = dict(TOL[dtype], atol=1e-5 if dtype == torch.float32 else 2**-8)
    for t, n, d in ((1, 4, 4096), (33, 4, 4096), (2, 3, 130), (3, 1, 7)):
        x = (torch.randn(t, n, d, generator=gen) * 2).to(dtype)
        post, comb = torch.rand(t, n, generator=gen) * 2, torch.softmax(torch.randn(t, n, n, generator=gen), -1)
        f, f2 = torch.randn(t, d, generator=gen).to(dtype), torch.randn(t, d, generator=gen).to(dtype)
        cpu = ops.mhc_combine(x, f, post, comb, f2)
        for fs, f2s in ((f.cuda(), f2.cuda()), (unaligned(f.cuda()), unaligned(f2.cuda()))):
            got = ops.mhc_combine(x.cuda(), fs, post.cuda(), comb.cuda(), f2s)
            assert torch.equal(got, ops.mhc_combine(x.cuda(), fs + f2s, post.cuda(), comb.cuda()))
            torch.testing.assert_close(got.cpu(), cpu, **tol)
            torch.testing.assert_close(got.cpu().double(), reference.mhc_combine(x, f + f2, post, comb), **tol)


def captured(run):
    """``run`` warmed up on a side stream, then captured in a CUDA graph: (the graph, its output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph, out


def test_norm_and_mhc_ops_replay_in_a_graph(gen: torch.Generator) -> None:
    x = torch.randn(2, 4, 4096, generator=gen).bfloat16().cuda()
    pre, post = torch.rand(2, 4, device="cuda"), torch.rand(2, 4, device="cuda")
    comb, w = torch.rand(2, 4, 4, device="cuda"), torch.rand(4096, device="cuda")
    run = lambda: ops.mhc_combine(x, ops.rms_norm(ops.mhc_collapse(x, pre), w), post, comb)  # noqa: E731
    eager = run()
    graph, out = captured(run)
    x.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, run()) and not torch.equal(out, eager)


@pytest.mark.parametrize("t,n,d", [(1, 4, 4096), (16, 4, 4096), (3, 4, 300), (2, 1, 5), (5, 8, 130), (0, 4, 64),
                                   (2, 3, 1023), (2, 2, 4100), (1, 2, 4097)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mhc_pre_matches_reference(gen: torch.Generator, t: int, n: int, d: int, dtype: torch.dtype) -> None:
    x = (torch.randn(t, n, d, generator=gen) * 2).to(dtype)
    proj = torch.randn((2 + n) * n, n * d, generator=gen) * 0.02
    scale, base = torch.rand(3, generator=gen) + 0.5, torch.randn((2 + n) * n, generator=gen)
    mix = reference.rms_norm(x.flatten(-2), None, 1e-6) @ proj.double().T
    pre, want_post, want_comb = reference.mhc_weights(mix, scale, base, 20, 1e-6)
    want_y = reference.mhc_collapse(x, pre)
    tol = dict(TOL[dtype], atol=1e-5 if dtype == torch.float32 else 2**-8)
    for xs in (x.cuda(), unaligned(x.cuda())):
        post, comb, y = ops.mhc_pre(xs, proj.cuda(), scale.cuda(), base.cuda(), 20, 1e-6, 1e-6)
        assert y.dtype == dtype and y.shape == (t, d)
        torch.testing.assert_close(post.cpu().double(), want_post, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(comb.cpu().double(), want_comb, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y.cpu().double(), want_y, **tol)


@pytest.mark.parametrize("t,n,d,m", [(1, 4, 4096, 24), (17, 4, 4096, 24), (17, 4, 4096, 4), (300, 2, 130, 8),
                                     (257, 8, 64, 80), (50, 6, 96, 48), (1000, 1, 5, 3), (40, 3, 1023, 15),
                                     (2048, 4, 4096, 24), (4100, 4, 1024, 24), (0, 4, 64, 24)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("form", ["auto", "rows"])
def test_mhc_mix_matches_reference(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch, t: int, n: int, d: int,
                                   m: int, dtype: torch.dtype, form: str) -> None:
    """Both forms (``auto``: the tensor cores for aligned bfloat16 streams of at most 24 rows),
    every row bucket (8, 24, 48, 80 rows), one and two tokens a thread, chunks of 128 to 512
    values and short last chunks, 16-byte copies and value-by-value ones (K of 5, 260 and 3,069
    bfloat16 values; an unaligned view), partial token tiles."""
    monkeypatch.setenv("DSV4RS_MHC_MIX", form)
    x = (torch.randn(t, n, d, generator=gen) * 2).to(dtype)
    proj = torch.randn(m, n * d, generator=gen) * 0.02
    want = reference.mhc_mix(x, proj, 1e-6)
    for xs in (x.cuda(), unaligned(x.cuda())):
        mix = ops.mhc_mix(xs, proj.cuda(), 1e-6)
        assert mix.dtype == torch.float32 and mix.shape == (t, m)
        torch.testing.assert_close(mix.cpu().double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.profiler
def test_mhc_mix_form_follows_the_variable(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """``DSV4RS_MHC_MIX``: the tensor cores by default where they apply (aligned bfloat16, at most
    24 rows), the fused multiply-adds with ``rows`` and wherever they do not; both give the
    reference's mix; any other value raises, naming the variable."""
    x = torch.randn(300, 4, 256, generator=gen).bfloat16().cuda()
    proj = (torch.randn(24, 1024, generator=gen) * 0.02).cuda()
    rows48 = proj[:1].repeat(48, 1)
    cases = [("auto", x, proj, "dsv4_mhc_mix_mma"), ("mma", x, proj, "dsv4_mhc_mix_mma"),
             ("rows", x, proj, "dsv4_mhc_mix_rows"), ("auto", x.float(), proj, "dsv4_mhc_mix_rows"),
             ("auto", unaligned(x), proj, "dsv4_mhc_mix_rows"), ("auto", x, rows48, "dsv4_mhc_mix_rows")]
    for form, xs, p, kernel in cases:
        monkeypatch.setenv("DSV4RS_MHC_MIX", form)
        names = launched_kernels(lambda: ops.mhc_mix(xs, p))
        assert kernel in names and "dsv4_mhc_mix_finish" in names, (form, names)
        torch.testing.assert_close(ops.mhc_mix(xs, p).cpu().double(), reference.mhc_mix(xs.cpu(), p.cpu(), 1e-6),
                                   rtol=2e-5, atol=2e-5)
    monkeypatch.setenv("DSV4RS_MHC_MIX", "sideways")
    with pytest.raises(ValueError, match="DSV4RS_MHC_MIX"):
        ops.mhc_mix(x, proj)


def test_mhc_mix_replays_in_a_graph_and_feeds_the_weights(gen: torch.Generator) -> None:
    x = torch.randn(300, 4, 4096, generator=gen).bfloat16().cuda()
    proj = (torch.randn(24, 16384, generator=gen) * 0.02).cuda()
    scale, base = torch.rand(3, device="cuda") + 0.5, torch.randn(24, device="cuda")
    eager = ops.mhc_mix(x, proj)
    graph, out = captured(lambda: ops.mhc_mix(x, proj))
    x.mul_(-0.5)
    graph.replay()
    torch.cuda.synchronize()
    again = ops.mhc_mix(x, proj)
    assert torch.equal(out, again) and not torch.equal(out, eager)
    # mhc_pre's mix for the same tokens: another order of float32 sums, the same weights within it.
    post, comb, _ = ops.mhc_pre(x[:16], proj, scale, base)
    _, want_post, want_comb = ops.mhc_weights(again[:16], scale, base)
    torch.testing.assert_close(post, want_post, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comb, want_comb, rtol=1e-5, atol=1e-6)


def test_mhc_pre_replays_in_a_graph(gen: torch.Generator) -> None:
    x = torch.randn(2, 4, 4096, generator=gen).bfloat16().cuda()
    proj = (torch.randn(24, 16384, generator=gen) * 0.02).cuda()
    scale, base = torch.rand(3, device="cuda") + 0.5, torch.randn(24, device="cuda")
    run = lambda: ops.mhc_pre(x, proj, scale, base)  # noqa: E731
    eager = run()
    graph, out = captured(run)
    x.mul_(-0.5)
    graph.replay()
    torch.cuda.synchronize()
    again = run()
    assert all(torch.equal(a, b) for a, b in zip(out, again)) and not torch.equal(out[2], eager[2])
