"""dsv4rs.compat against the float64 reference in FlashMLA's and DeepGEMM's own tensor layouts and
conventions: the V4 cache viewed ``[pages, page_size, 1, 584]`` with any page size and padded
pages, invalid ids, per-batch top-k lengths, a second cache with its own page size, the sink
(+-inf included), the LSE convention (natural log, sink excluded, +inf for no candidate,
``[batch, heads, seq_q]``), the indexer's logits and its fused top-k; head counts and top-k values
FlashMLA and DeepGEMM refuse; the signatures; bad inputs. Each correctness test runs on the CPU
and (marked ``gpu``) on a CUDA GPU.

The engines' caches are built here from the reference's bytes (``reference.encode_main_entries``)
laid out as FlashMLA's ``tests/quant.py`` describes its MODEL1 layout (per page: every row's 576
data bytes, then every row's 8 scale bytes) and as DeepGEMM's ``tests/test_attention.py`` lays
out its FP8 key cache (per page: every key's 128 FP8 bytes, then every key's float32 scale, the
scale ``amax / 448``, not a power of two).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import numpy as np
import pytest
import torch

from dsv4rs import ops
from dsv4rs import reference as ref
from dsv4rs.compat import CompatAssertionError, CompatRuntimeError, deep_gemm, flash_mla
from dsv4rs.compat import _common

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
INF = math.inf
# FlashMLA's own set of invalid ids (tests/lib.py), s_kv added per case.
INVALID_IDS = [-2147483648, -123456, -1, 114514, 2147483647]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


def tol(device: str) -> dict[str, float]:
    """Output tolerance: the output is bfloat16 (2^-9 relative); the GPU also rounds the softmax
    weights to bfloat16 in its tensor-core products (about 1e-3 relative, docs/kernels/attention.md)."""
    return {"rtol": 5e-3, "atol": 2e-4} if device == "cpu" else {"rtol": 5e-2, "atol": 2e-2}


def check_out(got: torch.Tensor, want: torch.Tensor, device: str) -> None:
    """Outputs against the float64 reference: elementwise on the CPU; on the GPU as the GPU op
    tests hold the kernels (relative error of the whole tensor), plus a loose elementwise bound."""
    got = got.cpu().double()
    torch.testing.assert_close(got, want, **tol(device))
    if device != "cpu":
        assert ((got - want).norm() / want.norm().clamp_min(1e-30)).item() < 5e-3


def lse_tol(device: str) -> dict[str, float]:
    return {"rtol": 1e-5, "atol": 1e-5} if device == "cpu" else {"rtol": 1e-3, "atol": 1e-3}


# ---------------------------------------------------------------------------------------------
# FlashMLA's V4 cache, built from the reference's bytes


@functools.cache
def entry_bank() -> tuple[torch.Tensor, torch.Tensor]:
    """1024 random entries of varied magnitudes as ``(uint8 [1024, 584] rows from
    reference.encode_main_entries, float64 [1024, 512] values they hold)``, made once (the
    float64 encoder takes a while)."""
    g = torch.Generator().manual_seed(2024)
    x = torch.randn(1024, 512, generator=g) * (1 + 3 * torch.rand(1024, 1, generator=g))
    return ref.encode_main_entries(x), ref.entry_quant_dequant(x)


def flashmla_cache(gen: torch.Generator, n_rows: int, page: int, pad: int, device: str):
    """``(cache [pages, page, 1, 584] float8_e4m3fn, rows float64 [pages * page, 512])``: random
    entries in FlashMLA's V4 page layout, each page ``page * 584 + pad`` bytes apart (vLLM pads a
    page to a multiple of 576 bytes), and the values the cache holds."""
    pages = max(1, -(-n_rows // page))
    bank_bytes, bank_values = entry_bank()
    pick = torch.randint(0, bank_bytes.shape[0], (pages * page,), generator=gen)
    enc = bank_bytes[pick].view(pages, page, 584)
    stride = page * 584 + pad
    buf = torch.zeros(pages * stride, dtype=torch.uint8)
    by_page = buf.view(pages, stride)
    by_page[:, : page * 576] = enc[..., :576].reshape(pages, -1)
    by_page[:, page * 576 : page * 584] = enc[..., 576:].reshape(pages, -1)
    buf = buf.to(device)
    cache = buf.as_strided((pages, page, 1, 584), (stride, 584, 584, 1)).view(torch.float8_e4m3fn)
    return cache, bank_values[pick]


def random_ids(gen: torch.Generator, shape: tuple[int, ...], rows: int, invalid: float = 0.2) -> torch.Tensor:
    """int32 rows with repeats, about ``invalid`` of them -1."""
    ids = torch.randint(0, rows, shape, generator=gen)
    return ids.masked_fill(torch.rand(shape, generator=gen) < invalid, -1).to(torch.int32)


def sink_with_infs(gen: torch.Generator, heads: int) -> torch.Tensor:
    """FlashMLA's test sinks: random, some -inf (no effect), some +inf (zero output)."""
    sink = torch.randn(heads, generator=gen)
    mask = torch.randn(heads, generator=gen)
    return sink.masked_fill(mask < -0.8, -INF).masked_fill(mask > 0.8, INF)


def reference_decode(q, lists, sink, scale):
    """FlashMLA's decode result in float64: ``(out [b, s_q, h, 512], lse [b, h, s_q])``, from
    ``reference.sparse_attention`` over the concatenated candidate lists ``[(rows, ids [b, s_q,
    K], lengths [b] or None)]``; ``+inf`` sinks zero their heads' output."""
    b, s_q, h, _ = q.shape
    kv, cols, offset = [], [], 0
    for rows, ids, lengths in lists:
        i = ids.reshape(b * s_q, -1).long().cpu()
        if lengths is not None:
            i = i.masked_fill(torch.arange(i.shape[1]) >= lengths.cpu().long().repeat_interleave(s_q)[:, None], -1)
        cols.append(torch.where((i >= 0) & (i < rows.shape[0]), i + offset, -1))
        kv.append(rows)
        offset += rows.shape[0]
    sink = torch.full((h,), -INF) if sink is None else sink.cpu()
    out, lse = ref.sparse_attention(q.reshape(b * s_q, h, 512).cpu(), torch.cat(kv), torch.cat(cols, dim=1),
                                    sink.masked_fill(sink == INF, -INF), scale)
    out[:, sink == INF] = 0
    lse = lse.masked_fill(lse == -INF, INF)
    return out.view(b, s_q, h, 512), lse.view(b, s_q, h).transpose(1, 2)


# (heads, seq_q, topk, page, pad, extra (topk, page, pad) or None). The first two are FlashMLA's
# own shapes (its production V4 config: a 256-row compressed cache plus a 64-row window cache);
# the others use head counts, top-k and page sizes FlashMLA refuses.
DECODE_CASES = [
    (64, 1, 64, 64, 0, None),
    (128, 2, 128, 256, 0, (64, 64, 64)),
    (16, 1, 100, 61, 0, (33, 2, 0)),
    (40, 2, 100, 64, 8, (128, 69, 0)),
    (96, 1, 7, 2, 0, (128, 64, 0)),
]


@pytest.mark.parametrize("heads,s_q,topk,page,pad,extra", DECODE_CASES)
@pytest.mark.parametrize("lengths", [False, True])
def test_flash_mla_decode_matches_reference(gen, device, heads, s_q, topk, page, pad, extra, lengths) -> None:
    b = 3
    cache, rows = flashmla_cache(gen, 300, page, pad, device)
    q = torch.randn(b, s_q, heads, 512, generator=gen).bfloat16()
    ids = random_ids(gen, (b, s_q, topk), rows.shape[0])
    ids[0, 0] = -1  # a query without candidates
    ids[1, -1, : topk // 2] = torch.tensor(INVALID_IDS + [rows.shape[0]]).repeat(topk)[: topk // 2].int()
    topk_length = torch.tensor([topk, 0, topk // 2 + 1], dtype=torch.int32) if lengths else None
    sink = sink_with_infs(gen, heads)
    kwargs = {"topk_length": None if topk_length is None else topk_length.to(device)}
    lists = [(rows, ids, topk_length)]
    if extra is not None:
        e_topk, e_page, e_pad = extra
        e_cache, e_rows = flashmla_cache(gen, 200, e_page, e_pad, device)
        e_ids = random_ids(gen, (b, s_q, e_topk), e_rows.shape[0])
        e_ids[0, 0] = -1
        e_len = torch.tensor([1, e_topk, e_topk + 5], dtype=torch.int32) if lengths else None
        kwargs.update(extra_k_cache=e_cache, extra_indices_in_kvcache=e_ids.to(device),
                      extra_topk_length=None if e_len is None else e_len.to(device))
        lists.append((e_rows, e_ids, e_len))
    meta, none = flash_mla.get_mla_metadata()
    assert none is None
    out, lse = flash_mla.flash_mla_with_kvcache(q.to(device), cache, None, None, 512, meta, softmax_scale=0.05,
                                                is_fp8_kvcache=True, indices=ids.to(device),
                                                attn_sink=sink.to(device), **kwargs)
    want_out, want_lse = reference_decode(q.float(), lists, sink, 0.05)
    assert out.dtype == torch.bfloat16 and out.shape == (b, s_q, heads, 512) and out.device.type == device
    assert lse.dtype == torch.float32 and lse.shape == (b, heads, s_q)
    assert lse.stride() == (s_q * heads, 1, heads)  # a transposed view of [b, s_q, h], as FlashMLA's
    check_out(out, want_out, device)
    torch.testing.assert_close(lse.cpu().double(), want_lse, **lse_tol(device))
    assert torch.isposinf(lse[0, :, 0]).all() and (out[0, 0] == 0).all()


def test_flash_mla_lse_convention(gen, device) -> None:
    """The LSE is the natural log of the sum of exp(scale * q.k) over the valid candidates, the
    sink left out: a sink changes the output, not the LSE; +inf where there is no candidate."""
    cache, rows = flashmla_cache(gen, 64, 64, 0, device)
    q = torch.randn(1, 2, 8, 512, generator=gen).bfloat16()
    ids = torch.tensor([[[3, 5, -1], [-1, -1, -1]]], dtype=torch.int32)
    meta = flash_mla.get_mla_metadata()[0]
    call = lambda sink: flash_mla.flash_mla_with_kvcache(  # noqa: E731
        q.to(device), cache, None, None, 512, meta, is_fp8_kvcache=True, indices=ids.to(device), attn_sink=sink)
    out0, lse0 = call(None)
    out1, lse1 = call(torch.full((8,), 3.0, device=device))
    logits = torch.einsum("hd,kd->hk", q[0, 0].double(), rows[[3, 5]]) * 512**-0.5
    torch.testing.assert_close(lse0[0, :, 0].cpu().double(), torch.logsumexp(logits, dim=-1), **lse_tol(device))
    assert torch.equal(lse0, lse1)
    assert torch.isposinf(lse0[0, :, 1]).all() and (out0[0, 1] == 0).all() and (out1[0, 1] == 0).all()
    scale = torch.exp(lse0[0, :, 0].double()) / (torch.exp(lse0[0, :, 0].double()) + math.exp(3.0))
    # Both outputs are rounded to bfloat16: twice the tolerance.
    torch.testing.assert_close(out1[0, 0].cpu().double(), out0[0, 0].cpu().double() * scale[:, None].cpu(),
                               rtol=2 * tol(device)["rtol"], atol=2 * tol(device)["atol"])


def test_flash_mla_decode_reads_native_caches_in_place(gen, device, monkeypatch) -> None:
    """64-row pages packed back to back are read as they are (no gather); padded pages or other
    page sizes are gathered, and agree."""
    dense, rows = flashmla_cache(gen, 200, 64, 0, device)
    q = torch.randn(2, 1, 16, 512, generator=gen).bfloat16().to(device)
    ids = random_ids(gen, (2, 1, 50), rows.shape[0]).to(device)
    meta = lambda: flash_mla.get_mla_metadata()[0]  # noqa: E731
    gathered = []
    real_gather = _common.PagedCache.gather
    monkeypatch.setattr(_common.PagedCache, "gather", lambda self, r: gathered.append(r) or real_gather(self, r))
    a, la = flash_mla.flash_mla_with_kvcache(q, dense, None, None, 512, meta(), is_fp8_kvcache=True, indices=ids)
    assert not gathered
    # The same rows with every page padded by 64 bytes: gathered, same result.
    padded = torch.zeros(dense.shape[0], 64 * 584 + 64, dtype=torch.uint8, device=device)
    padded[:, : 64 * 584] = dense.view(torch.uint8).reshape(dense.shape[0], -1)
    padded = padded.as_strided(dense.shape, (64 * 584 + 64, 584, 584, 1))
    b, lb = flash_mla.flash_mla_with_kvcache(q, padded, None, None, 512, meta(), is_fp8_kvcache=True, indices=ids)
    assert gathered
    same(a, b, la, lb)


def same(out_a, out_b, lse_a, lse_b) -> None:
    """Two runs over the same candidates in the same order. The kernels may split a query's
    candidates differently for a different number of queries (the CPU among its threads, the GPU
    among its blocks), so the float32 sums can differ in the last bits, and a bfloat16 output by
    one step."""
    torch.testing.assert_close(out_a.float(), out_b.float(), rtol=2**-7, atol=1e-5)
    torch.testing.assert_close(lse_a, lse_b, rtol=1e-5, atol=1e-5)


def test_flash_mla_decode_in_chunks(gen, device, monkeypatch) -> None:
    """A gathered call larger than the temporary budget runs in chunks of queries, same result."""
    cache, rows = flashmla_cache(gen, 300, 32, 0, device)
    q = torch.randn(5, 2, 4, 512, generator=gen).bfloat16().to(device)
    ids = random_ids(gen, (5, 2, 40), rows.shape[0]).to(device)
    args = (q, cache, None, None, 512)
    whole = flash_mla.flash_mla_with_kvcache(*args, flash_mla.get_mla_metadata()[0], is_fp8_kvcache=True, indices=ids)
    monkeypatch.setattr("dsv4rs.compat.flash_mla.GATHER_BUDGET_BYTES", 3 * 40 * 584)
    chunked = flash_mla.flash_mla_with_kvcache(*args, flash_mla.get_mla_metadata()[0], is_fp8_kvcache=True, indices=ids)
    same(whole[0], chunked[0], whole[1], chunked[1])


def test_flash_mla_metadata_reuse_and_asserts(gen) -> None:
    cache, _ = flashmla_cache(gen, 64, 64, 0, "cpu")
    q = torch.randn(2, 1, 8, 512, generator=gen).bfloat16()
    ids = torch.zeros(2, 1, 4, dtype=torch.int32)
    meta, _ = flash_mla.get_mla_metadata(torch.zeros(2, dtype=torch.int32), 8, 1)  # old-style arguments
    assert isinstance(meta, flash_mla.FlashMLASchedMeta) and not meta.have_initialized
    run = lambda **kw: flash_mla.flash_mla_with_kvcache(  # noqa: E731
        kw.pop("q", q), cache, None, None, 512, kw.pop("meta", meta), is_fp8_kvcache=True,
        indices=kw.pop("indices", ids), **kw)
    run()
    assert meta.have_initialized and meta.config.topk == 4 and meta.config.h_q == 8 and meta.config.page_block_size == 64
    run()  # the same shapes: fine
    with pytest.raises(AssertionError, match="topk"):
        run(indices=torch.zeros(2, 1, 5, dtype=torch.int32))
    with pytest.raises(CompatAssertionError, match="h_q"):
        run(q=q[:, :, :4])
    with pytest.raises(AssertionError, match="tile_scheduler_metadata"):
        run(meta=None)
    with pytest.raises(AssertionError, match="num_splits"):
        run(meta=flash_mla.get_mla_metadata()[0], num_splits=torch.zeros(1))
    with pytest.raises(AssertionError, match="causal"):
        run(meta=flash_mla.get_mla_metadata()[0], causal=True)
    with pytest.raises(AssertionError, match="is_fp8_kvcache"):
        flash_mla.flash_mla_with_kvcache(q, cache, None, None, 512, flash_mla.get_mla_metadata()[0], indices=ids)


def test_flash_mla_decode_rejects_bad_inputs(gen) -> None:
    cache, _ = flashmla_cache(gen, 128, 64, 0, "cpu")
    q = torch.randn(2, 1, 8, 512, generator=gen).bfloat16()
    ids = torch.zeros(2, 1, 4, dtype=torch.int32)

    def run(**kw):
        args = {"q": q, "k_cache": cache, "block_table": None, "cache_seqlens": None, "head_dim_v": 512,
                "tile_scheduler_metadata": flash_mla.get_mla_metadata()[0], "is_fp8_kvcache": True, "indices": ids}
        args.update(kw)
        return flash_mla.flash_mla_with_kvcache(**args)

    # Where FlashMLA's TORCH_CHECK raises: a RuntimeError (and a ValueError), naming the argument.
    runtime = [
        ({"q": q.float()}, "q"),
        ({"indices": ids.long()}, "indices"),
        ({"k_cache": cache.view(torch.uint8)[..., :580]}, "k_cache"),
        ({"k_cache": cache.view(torch.uint8).expand(-1, -1, 2, -1)}, "num_heads_k"),
        ({"head_dim_v": 448}, "head_dim_v"),
        ({"indices": torch.zeros(2, 1, 0, dtype=torch.int32)}, "topk"),
        ({"indices": torch.zeros(2, 2, 4, dtype=torch.int32)}, "indices"),
        ({"topk_length": torch.zeros(3, dtype=torch.int32)}, "topk_length"),
        ({"topk_length": torch.zeros(2)}, "topk_length"),
        ({"attn_sink": torch.zeros(8, dtype=torch.float64)}, "attn_sink"),
        ({"attn_sink": torch.zeros(7)}, "attn_sink"),
        ({"extra_indices_in_kvcache": ids}, "extra_indices_in_kvcache"),
        ({"extra_k_cache": cache}, "extra_indices_in_kvcache"),
        ({"extra_k_cache": cache, "extra_indices_in_kvcache": ids, "extra_topk_length": torch.zeros(2)},
         "extra_topk_length"),
        ({"q": torch.randn(2, 1, 8, 300).bfloat16()}, "head_size_k"),
        ({"q": q[:0]}, "batch"),
        ({"q": q[0]}, "q"),
        # Optional tensors that are not tensors, or of the wrong rank: named, not an AttributeError.
        ({"attn_sink": np.zeros(8, dtype=np.float32)}, "attn_sink"),
        ({"topk_length": [4, 4]}, "topk_length"),
        ({"extra_k_cache": cache, "extra_indices_in_kvcache": object()}, "extra_indices_in_kvcache"),
        ({"extra_k_cache": "cache", "extra_indices_in_kvcache": ids}, "extra_k_cache"),
        ({"extra_k_cache": cache[0], "extra_indices_in_kvcache": ids}, "extra_k_cache"),
        ({"indices": torch.tensor(3, dtype=torch.int32)}, "indices"),
    ]
    for kw, name in runtime:
        with pytest.raises(CompatRuntimeError, match=name) as info:
            run(**kw)
        assert isinstance(info.value, RuntimeError) and isinstance(info.value, ValueError)
    # Where FlashMLA accepts but dsv4rs does not implement: ValueError naming the argument.
    for kw, name in [({"q": torch.randn(2, 1, 8, 576).bfloat16()}, "q: head dim 576"),
                     ({"indices": None}, "indices"),
                     ({"softmax_scale": math.nan}, "softmax_scale"), ({"softmax_scale": "0.1"}, "softmax_scale"),
                     ({"softmax_scale": 10**400}, "softmax_scale"),
                     ({"k_cache": cache.view(torch.uint8).as_strided((2, 64, 1, 584), (1000, 584, 584, 1))}, "overlap")]:
        with pytest.raises(ValueError, match=name) as info:
            run(**kw)
        assert not isinstance(info.value, RuntimeError)


def test_flash_mla_refused_call_leaves_the_handle_fresh(gen) -> None:
    """The scheduling handle records the shapes of the first call that runs: a call refused for
    bad input does not set it up, so the corrected call (of any shapes) runs with it."""
    cache, _ = flashmla_cache(gen, 128, 64, 0, "cpu")
    q = torch.randn(2, 1, 8, 512, generator=gen).bfloat16()
    ids = torch.zeros(2, 1, 4, dtype=torch.int32)
    meta, _ = flash_mla.get_mla_metadata()
    corrupt = cache.clone()
    corrupt.view(torch.uint8)[0, 0, 0, :8] = 0x7F  # FP8 NaN codes in row 0, which ids name
    for bad in ({"q": q.float()}, {"indices": ids.long()}, {"softmax_scale": math.inf},
                {"attn_sink": torch.zeros(7)}, {"k_cache": corrupt}):
        args = {"q": q, "k_cache": cache, "indices": ids} | bad
        with pytest.raises(ValueError):
            flash_mla.flash_mla_with_kvcache(args.pop("q"), args.pop("k_cache"), None, None, 512, meta,
                                             is_fp8_kvcache=True, **args)
        assert not meta.have_initialized and meta.config is None
    ids5 = torch.zeros(2, 1, 5, dtype=torch.int32)
    out, _ = flash_mla.flash_mla_with_kvcache(q, cache, None, None, 512, meta, is_fp8_kvcache=True, indices=ids5)
    assert out.shape == (2, 1, 8, 512) and meta.config.topk == 5


@pytest.mark.parametrize("page,pad", [(64, 0), (61, 8)])
def test_flash_mla_value_errors_name_flash_mlas_arguments(gen, page, pad) -> None:
    """On the CPU the attention refuses non-finite inputs; the error names FlashMLA's argument
    and the engine cache's row (``page * page_block_size + offset``), whether the cache is read
    in place (64-row pages) or its rows are gathered first (any other page)."""
    cache, _ = flashmla_cache(gen, 3 * page, page, pad, "cpu")
    stride = page * 584 + pad
    q = torch.randn(2, 1, 4, 512, generator=gen).bfloat16()
    row = page + 7  # page 1, offset 7
    ids = torch.tensor([[[0, 1, 2]], [[3, row, 5]]], dtype=torch.int32)

    def run(**kw):
        args = {"q": q, "k_cache": cache, "indices": ids} | kw
        return flash_mla.flash_mla_with_kvcache(args.pop("q"), args.pop("k_cache"), None, None, 512,
                                                flash_mla.get_mla_metadata()[0], is_fp8_kvcache=True, **args)

    run()
    bad = cache.clone()  # (a clone is packed: pages page * 584 bytes apart)
    raw = torch.empty(0, dtype=torch.uint8).set_(bad.untyped_storage())
    raw[1 * page * 584 + 7 * 576 + 3] = 0x7F  # an FP8 NaN code in the row's data part
    with pytest.raises(ValueError, match=rf"^k_cache: row {row} holds a non-finite value"):
        run(k_cache=bad)
    with pytest.raises(ValueError, match=rf"^extra_k_cache: row {row} holds a non-finite value"):
        run(extra_k_cache=bad, extra_indices_in_kvcache=ids)
    assert stride == bad.stride(0) + pad
    nan_q = q.clone()
    nan_q[1, 0, 2, 9] = math.nan
    with pytest.raises(ValueError, match=rf"^q: .*flat index {4 * 512 + 2 * 512 + 9}\b"):
        run(q=nan_q)
    with pytest.raises(ValueError, match="^attn_sink: NaN at index 1"):
        run(attn_sink=torch.tensor([0.0, math.nan, INF, -INF]))


# (heads, s_kv, topk): FlashMLA's shapes (64/128 heads, its irregular s_kv) and ones it refuses.
PREFILL_CASES = [(64, 128, 128), (128, 95, 128), (16, 200, 100), (40, 64, 64), (96, 153, 256), (1, 70, 3)]


@pytest.mark.parametrize("heads,s_kv,topk", PREFILL_CASES)
@pytest.mark.parametrize("lengths", [False, True])
def test_flash_mla_sparse_fwd_matches_reference(gen, device, heads, s_kv, topk, lengths) -> None:
    s_q = 5
    q = torch.randn(s_q, heads, 512, generator=gen).bfloat16()
    kv = torch.randn(s_kv, 1, 512, generator=gen).bfloat16()
    ids = random_ids(gen, (s_q, 1, topk), s_kv)
    ids[1, 0, ::2] = torch.tensor(INVALID_IDS + [s_kv]).repeat(topk)[: (topk + 1) // 2].int()
    ids[2] = -1  # no candidate
    topk_length = torch.tensor([topk, 3, 0, topk // 2, topk + 9], dtype=torch.int32) if lengths else None
    sink = sink_with_infs(gen, heads)
    out, max_logits, lse = flash_mla.flash_mla_sparse_fwd(
        q.to(device), kv.to(device), ids.to(device), 0.07, attn_sink=sink.to(device),
        topk_length=None if topk_length is None else topk_length.to(device))
    want_out, want_lse = prefill_reference(q, kv, ids, topk_length, sink, 0.07)
    assert out.dtype == torch.bfloat16 and out.shape == (s_q, heads, 512)
    assert max_logits.shape == lse.shape == (s_q, heads) and lse.dtype == max_logits.dtype == torch.float32
    check_out(out, want_out.reshape(s_q, heads, 512), device)
    torch.testing.assert_close(lse.cpu().double(), want_lse.reshape(heads, s_q).T, **lse_tol(device))
    # max_logits: the largest scaled logit of the valid candidates, -inf without one.
    keep = (ids[:, 0].long() >= 0) & (ids[:, 0].long() < s_kv)
    if topk_length is not None:
        keep &= torch.arange(topk) < topk_length[:, None]
    z = torch.einsum("thd,tkd->thk", q.double(), kv[:, 0].double()[ids[:, 0].long().clamp(0, s_kv - 1)]) * 0.07
    want_max = z.masked_fill(~keep[:, None, :], -INF).amax(dim=-1)
    torch.testing.assert_close(max_logits.cpu().double(), want_max, rtol=1e-5, atol=1e-5)
    assert torch.isneginf(max_logits[2]).all() and torch.isposinf(lse[2]).all() and (out[2] == 0).all()


def prefill_reference(q, kv, ids, topk_length, sink, scale):
    """The prefill result in float64 (per-query lengths ``[s_q]``, as FlashMLA's prefill takes
    them), through :func:`reference_decode` with the queries as one batch."""
    s_q, topk = ids.shape[0], ids.shape[2]
    masked = ids[:, 0].long()
    if topk_length is not None:
        masked = masked.masked_fill(torch.arange(topk) >= topk_length[:, None].long(), -1)
    return reference_decode(q[None].float(), [(kv[:, 0].double(), masked.view(1, s_q, topk).int(), None)], sink, scale)


def test_flash_mla_sparse_fwd_rejects_bad_inputs(gen) -> None:
    q = torch.randn(3, 8, 512, generator=gen).bfloat16()
    kv = torch.randn(64, 1, 512, generator=gen).bfloat16()
    ids = torch.zeros(3, 1, 4, dtype=torch.int32)
    for kw, name in [({"q": q.float()}, "q"), ({"kv": kv.float()}, "kv"), ({"indices": ids.long()}, "indices"),
                     ({"d_v": 448}, "d_v"), ({"attn_sink": torch.zeros(7)}, "attn_sink"),
                     ({"topk_length": torch.zeros(2, dtype=torch.int32)}, "topk_length"),
                     ({"indices": torch.zeros(3, 4, dtype=torch.int32)}, "indices"),
                     ({"q": torch.randn(3, 8, 100).bfloat16()}, "d_qk"),
                     ({"attn_sink": np.zeros(8, dtype=np.float32)}, "attn_sink"),
                     ({"topk_length": [1, 2, 3]}, "topk_length")]:
        args = {"q": q, "kv": kv, "indices": ids, "sm_scale": 0.1} | kw
        with pytest.raises(CompatRuntimeError, match=name):
            flash_mla.flash_mla_sparse_fwd(**args)
    for kw, name in [({"q": torch.randn(3, 8, 576).bfloat16(), "kv": torch.randn(64, 1, 576).bfloat16()}, "q: d_qk 576"),
                     ({"kv": kv.expand(-1, 2, -1), "indices": torch.zeros(3, 2, 4, dtype=torch.int32)}, "kv: .* one KV head"),
                     ({"sm_scale": float("nan")}, "sm_scale"), ({"sm_scale": 10**400}, "sm_scale"),
                     ({"sm_scale": None}, "sm_scale")]:
        args = {"q": q, "kv": kv, "indices": ids, "sm_scale": 0.1} | kw
        with pytest.raises(ValueError, match=name):
            flash_mla.flash_mla_sparse_fwd(**args)
    # Non-finite values (refused on the CPU) are named by FlashMLA's arguments and kv's row.
    bad_kv = kv.clone()
    bad_kv[11, 0, 3] = math.inf
    for kw, name in [({"kv": bad_kv, "indices": torch.full((3, 1, 4), 11, dtype=torch.int32)},
                      "^kv: row 11 holds a non-finite value"),
                     ({"attn_sink": torch.tensor([0.0] * 7 + [math.nan])}, "^attn_sink: NaN at index 7")]:
        args = {"q": q, "kv": kv, "indices": ids, "sm_scale": 0.1} | kw
        with pytest.raises(ValueError, match=name):
            flash_mla.flash_mla_sparse_fwd(**args)


# ---------------------------------------------------------------------------------------------
# DeepGEMM's paged FP8 key cache


def deepgemm_key_cache(gen: torch.Generator, n_keys: int, block_kv: int, pad: int, device: str):
    """``(cache uint8 [blocks, block_kv, 1, 132], keys float64 [blocks * block_kv, 128])`` as
    DeepGEMM's test casts a key cache to FP8: one float32 scale ``amax / 448`` per key, the codes
    ``x / scale`` in e4m3; per page every key's 128 codes, then every key's scale, pages
    ``block_kv * 132 + pad`` bytes apart."""
    blocks = max(1, -(-n_keys // block_kv))
    x = torch.randn(blocks * block_kv, 128, generator=gen) * (1 + 5 * torch.rand(blocks * block_kv, 1, generator=gen))
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-4) / 448.0
    codes = (x / scale).to(torch.float8_e4m3fn)
    keys = codes.double() * scale.double()
    stride = block_kv * 132 + pad
    buf = torch.zeros(blocks, stride, dtype=torch.uint8)
    buf[:, : block_kv * 128] = codes.view(torch.uint8).view(blocks, -1)
    buf[:, block_kv * 128 : block_kv * 132] = scale.float().view(torch.uint8).view(blocks, -1)
    buf = buf.to(device)
    return buf.as_strided((blocks, block_kv, 1, 132), (stride, 132, 132, 1)), keys


def logits_case(gen, batch, next_n, heads, block_kv, pad, ctx_2d, device, max_len=300):
    cache, keys = deepgemm_key_cache(gen, batch * max_len + 3 * block_kv, block_kv, pad, device)
    blocks = -(-max_len // block_kv)
    table = torch.randperm(cache.shape[0], generator=gen)[: batch * blocks].view(batch, blocks).int()
    ctx = torch.randint(1, max_len + 1, (batch,), generator=gen).int()
    ctx[0] = max_len
    if ctx_2d:
        ctx = torch.stack([torch.randint(0, int(c) + 1, (next_n,), generator=gen) for c in ctx]).int()
        ctx[:, -1] = ctx.amax(dim=1)
    longest = ctx.view(batch, -1).amax(dim=1)
    for b in range(batch):  # an engine pads its block table: entries past a sequence's pages are -1
        table[b, -(-int(longest[b]) // block_kv) :] = -1
    q = (torch.randn(batch, next_n, heads, 128, generator=gen) * 2).to(torch.float8_e4m3fn)
    w = torch.randn(batch * next_n, heads, generator=gen)
    return q, cache, w, ctx, table, keys


def reference_logits(q, w, ctx, table, keys, block_kv, max_len):
    batch, next_n = q.shape[:2]
    out = torch.full((batch * next_n, max_len), -INF, dtype=torch.float64)
    for b in range(batch):
        for j in range(next_n):
            v = int(ctx[b, j]) if ctx.dim() == 2 else int(ctx[b]) - next_n + j + 1
            v = max(0, min(v, max_len))
            s = torch.arange(v)
            rows = table[b, s // block_kv].long() * block_kv + s % block_kv
            r = b * next_n + j
            out[r, :v] = ref.indexer_scores(q[b, j][None].float(), w[r][None], keys[rows])[0]
    return out


# (batch, next_n, heads, block_kv, pad, 2-d context_lens): DeepGEMM's sm_90 shape first; then a
# padded page stride with its older 1-d context lengths; then head counts and pages it refuses.
LOGITS_CASES = [(3, 1, 64, 64, 0, True), (2, 2, 32, 64, 256, False), (3, 2, 7, 32, 0, True), (1, 3, 16, 64, 0, False),
                (2, 1, 40, 17, 12, True)]


@pytest.mark.parametrize("batch,next_n,heads,block_kv,pad,ctx_2d", LOGITS_CASES)
def test_fp8_paged_mqa_logits_matches_reference(gen, device, batch, next_n, heads, block_kv, pad, ctx_2d) -> None:
    q, cache, w, ctx, table, keys = logits_case(gen, batch, next_n, heads, block_kv, pad, ctx_2d, device)
    max_len = 320
    d = lambda t: t.to(device)  # noqa: E731
    meta = deep_gemm.get_paged_mqa_logits_metadata(d(ctx), block_kv, 132)
    assert meta.shape == (133, 2) and meta.dtype == torch.int32 and meta.device.type == device
    logits = deep_gemm.fp8_paged_mqa_logits(d(q), cache, d(w), d(ctx), d(table), meta, max_len, clean_logits=False)
    assert logits.shape == (batch * next_n, max_len) and logits.dtype == torch.float32
    want = reference_logits(q, w, ctx, table, keys, block_kv, max_len)
    got = logits.cpu().double()
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    scale = float((w.abs().sum(1).max() * keys.abs().max() * q.float().abs().max()).item()) * 128
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6 * scale if device == "cpu" else 1e-5 * scale)


def test_fp8_paged_mqa_logits_on_a_dsv4rs_key_cache(gen, device) -> None:
    """A key cache written by ops.index_key_write is DeepGEMM's layout as it is (a view)."""
    keys = torch.randn(256, 128, generator=gen)
    cache = ops.quantize_index_keys(keys, "fp8").to(device)
    q = torch.randn(1, 1, 8, 128, generator=gen).to(torch.float8_e4m3fn)
    w = torch.rand(1, 8, generator=gen)
    table = torch.tensor([[3, 1, 0, 2]], dtype=torch.int32)
    ctx = torch.tensor([[200]], dtype=torch.int32)
    logits = deep_gemm.fp8_paged_mqa_logits(q.to(device), cache.view(4, 64, 1, 132), w.to(device), ctx.to(device),
                                            table.to(device), torch.zeros(2, 2, dtype=torch.int32, device=device), 256)
    want = reference_logits(q, w, ctx, table, ref.fp8_key_quant_dequant(keys), 64, 256)
    torch.testing.assert_close(logits.cpu().double(), want, rtol=1e-5, atol=1e-4)


def test_indexer_sums_that_overflow_are_refused_in_deep_gemms_names(gen) -> None:
    """Finite keys whose float32 dot products overflow: on the CPU both entry points refuse
    them, naming DeepGEMM's arguments, rather than return inf or NaN logits."""
    cache = ops.quantize_index_keys(torch.randn(128, 128, generator=gen) * 1e37, "fp8").view(2, 64, 1, 132)
    q = (torch.randn(1, 1, 4, 128, generator=gen) * 10).to(torch.float8_e4m3fn)
    w, table = torch.tensor([[1.0, -1.0, 1.0, -1.0]]), torch.tensor([[0, 1]], dtype=torch.int32)
    ctx = torch.tensor([128], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^q, weights, kv_cache: the float32 sums overflow"):
        deep_gemm.fp8_paged_mqa_logits(q, cache, w, ctx, table, torch.zeros(2, 2, dtype=torch.int32), 128)
    with pytest.raises(ValueError, match=r"^q, weights, kv_cache: the float32 sums overflow"):
        deep_gemm.paged_indexer_topk(q, cache, w, ctx, table, 8)


@pytest.mark.parametrize("batch,next_n,heads,block_kv,pad,ctx_2d", LOGITS_CASES)
@pytest.mark.parametrize("topk", [64, 100])
def test_paged_indexer_topk_selects_the_logits_top_k(gen, device, batch, next_n, heads, block_kv, pad, ctx_2d, topk):
    q, cache, w, ctx, table, keys = logits_case(gen, batch, next_n, heads, block_kv, pad, ctx_2d, device)
    d = lambda t: t.to(device)  # noqa: E731
    idx, scores = deep_gemm.paged_indexer_topk(d(q), cache, d(w), d(ctx), d(table), topk, return_scores=True)
    phys = deep_gemm.paged_indexer_topk(d(q), cache, d(w), d(ctx), d(table), topk, physical=True)
    assert idx.dtype == torch.int32 and idx.shape == scores.shape == (batch * next_n, topk)
    want = reference_logits(q, w, ctx, table, keys, block_kv, 320)
    idx, scores, phys = idx.cpu().long(), scores.cpu().double(), phys.cpu().long()
    for r in range(batch * next_n):
        visible = int((~torch.isneginf(want[r])).sum())
        n = min(topk, visible)
        assert (idx[r, n:] == -1).all() and torch.isneginf(scores[r, n:]).all() and (phys[r, n:] == -1).all()
        got = idx[r, :n]
        assert len(set(got.tolist())) == n and (got < visible).all() and (got >= 0).all()
        t = 1e-5 * float(want[r, :visible].abs().max()) if visible else 0.0
        torch.testing.assert_close(scores[r, :n], want[r, got], rtol=0, atol=t)
        if n:  # a top-k set of the reference's scores
            assert float(want[r, got].min()) >= float(want[r, :visible].topk(n).values[-1]) - t
        b = r // next_n
        assert torch.equal(phys[r, :n], table[b, got // block_kv].long() * block_kv + got % block_kv)


def test_deep_gemm_rejects_bad_inputs(gen) -> None:
    q, cache, w, ctx, table, _ = logits_case(gen, 2, 1, 8, 64, 0, True, "cpu", max_len=100)
    meta = deep_gemm.get_paged_mqa_logits_metadata(ctx, 64, 4)

    def run(**kw):
        args = {"q": q, "kv_cache": cache, "weights": w, "context_lens": ctx, "block_table": table,
                "schedule_meta": meta, "max_context_len": 128} | kw
        return deep_gemm.fp8_paged_mqa_logits(**args)

    for kw, name in [({"q": q.float()}, "q"), ({"q": q[:, :, :, :64]}, "q"), ({"kv_cache": cache[..., :130]}, "kv_cache"),
                     ({"weights": w[:, :4]}, "weights"), ({"weights": w.double()}, "weights"),
                     ({"context_lens": ctx.long()}, "context_lens"), ({"context_lens": ctx[:1]}, "context_lens"),
                     ({"block_table": table.long()}, "block_table"), ({"block_table": table[:1]}, "block_table"),
                     ({"schedule_meta": meta[:, :1]}, "schedule_meta"),
                     ({"indices": torch.zeros(3, dtype=torch.int32)}, "indices")]:
        with pytest.raises(CompatRuntimeError, match=name):
            run(**kw)
    with pytest.raises(ValueError, match="q: dsv4rs's indexer keys have 128 dims"):
        run(q=torch.zeros(2, 1, 8, 64).to(torch.float8_e4m3fn), kv_cache=torch.zeros(4, 64, 1, 68, dtype=torch.uint8))
    with pytest.raises(ValueError, match="max_context_len"):
        run(max_context_len=-1)
    with pytest.raises(ValueError, match="max_context_len"):  # past the int32 context lengths
        run(max_context_len=2**64 + 1)
    with pytest.raises(ValueError, match="num_sms"):  # not a GPU's SM count: no huge handle allocated
        deep_gemm.get_paged_mqa_logits_metadata(ctx, 64, 2**31)
    with pytest.raises(ValueError, match="block_kv"):
        deep_gemm.get_paged_mqa_logits_metadata(ctx, 2**40, 4)
    # A corrupt key (an FP8 NaN code) the call reads is refused on the CPU, as ops.indexer_topk
    # refuses it, rather than turned into NaN logits.
    bad = cache.clone()
    page, row = int(table[0, 0]), 5
    bad[page, row, 0, 7] = 0x7F
    with pytest.raises(ValueError, match=f"kv_cache: row {page * 64 + row} holds a non-finite value"):
        run(kv_cache=bad)
    with pytest.raises(CompatRuntimeError, match="context_lens"):
        deep_gemm.get_paged_mqa_logits_metadata(ctx.long(), 64, 4)
    with pytest.raises(ValueError, match="num_sms"):
        deep_gemm.get_paged_mqa_logits_metadata(ctx, 64, 0)
    with pytest.raises(CompatRuntimeError, match="next_n"):
        deep_gemm.get_paged_mqa_logits_metadata(torch.zeros(2, 2, dtype=torch.int32), 64, 4,
                                                indices=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="topk"):
        deep_gemm.paged_indexer_topk(q, cache, w, ctx, table, 0)


@pytest.mark.parametrize("block_kv,pad", [(64, 0), (17, 12)])
def test_deep_gemm_value_errors_name_deep_gemms_arguments(gen, block_kv, pad) -> None:
    """A corrupt key is refused on the CPU by both entry points, naming ``kv_cache`` and the
    engine cache's row (``block * block_kv + offset``), whether read in place or gathered."""
    q, cache, w, ctx, table, _ = logits_case(gen, 2, 1, 4, block_kv, pad, True, "cpu", max_len=100)
    page, offset = int(table[1, 0]), 3  # key 3 of batch 1, which its queries see
    ctx[1] = ctx[1].clamp(min=offset + 1)
    bad = cache.clone()
    raw = torch.empty(0, dtype=torch.uint8).set_(bad.untyped_storage())
    raw[page * block_kv * 132 + offset * 128 + 5] = 0x7F  # an FP8 NaN code in the key's bytes
    row = page * block_kv + offset
    meta = deep_gemm.get_paged_mqa_logits_metadata(ctx, block_kv, 4)
    with pytest.raises(ValueError, match=rf"^kv_cache: row {row} holds a non-finite value"):
        deep_gemm.fp8_paged_mqa_logits(q, bad, w, ctx, table, meta, 128)
    with pytest.raises(ValueError, match=rf"^kv_cache: row {row} holds a non-finite value"):
        deep_gemm.paged_indexer_topk(q, bad, w, ctx, table, 8)
    nan_w = w.clone()
    nan_w[1, 2] = math.nan
    with pytest.raises(ValueError, match="^weights: "):
        deep_gemm.paged_indexer_topk(q, cache, nan_w, ctx, table, 8)


# ---------------------------------------------------------------------------------------------
# Signatures: FlashMLA's flash_mla/flash_mla_interface.py and DeepGEMM's csrc/apis/attention.hpp
# (its pybind11 py::arg list), written out here.

EMPTY = inspect.Parameter.empty
SIGNATURES = {
    (flash_mla, "get_mla_metadata"): [("args", "VAR_POSITIONAL", EMPTY), ("kwargs", "VAR_KEYWORD", EMPTY)],
    (flash_mla, "flash_mla_with_kvcache"): [
        ("q", EMPTY), ("k_cache", EMPTY), ("block_table", EMPTY), ("cache_seqlens", EMPTY), ("head_dim_v", EMPTY),
        ("tile_scheduler_metadata", EMPTY), ("num_splits", None), ("softmax_scale", None), ("causal", False),
        ("is_fp8_kvcache", False), ("indices", None), ("attn_sink", None), ("extra_k_cache", None),
        ("extra_indices_in_kvcache", None), ("topk_length", None), ("extra_topk_length", None)],
    (flash_mla, "flash_mla_sparse_fwd"): [
        ("q", EMPTY), ("kv", EMPTY), ("indices", EMPTY), ("sm_scale", EMPTY), ("d_v", 512), ("attn_sink", None),
        ("topk_length", None)],
    (deep_gemm, "get_paged_mqa_logits_metadata"): [
        ("context_lens", EMPTY), ("block_kv", EMPTY), ("num_sms", EMPTY), ("indices", None)],
    (deep_gemm, "fp8_paged_mqa_logits"): [
        ("q", EMPTY), ("kv_cache", EMPTY), ("weights", EMPTY), ("context_lens", EMPTY), ("block_table", EMPTY),
        ("schedule_meta", EMPTY), ("max_context_len", EMPTY), ("clean_logits", False), ("indices", None)],
}


@pytest.mark.parametrize("key", list(SIGNATURES), ids=lambda k: k[1])
def test_signatures_match_the_engines(key) -> None:
    module, name = key
    params = list(inspect.signature(getattr(module, name)).parameters.values())
    got = []
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            got.append((p.name, p.kind.name, EMPTY))
        else:
            assert p.kind == p.POSITIONAL_OR_KEYWORD, p
            got.append((p.name, p.default))
    assert got == SIGNATURES[key]


def test_sched_meta_has_flash_mlas_fields() -> None:
    meta = flash_mla.FlashMLASchedMeta()
    assert [f.name for f in dataclasses.fields(meta)] == [
        "have_initialized", "config", "tile_scheduler_metadata", "num_splits"]
    assert [f.name for f in dataclasses.fields(flash_mla.FlashMLASchedMeta.Config)] == [
        "b", "s_q", "h_q", "page_block_size", "h_k", "causal", "is_fp8_kvcache", "topk", "extra_page_block_size",
        "extra_topk"]


# ---------------------------------------------------------------------------------------------
# GPU only: CUDA-graph capture of the compat calls (no synchronization, fixed shapes)


@pytest.mark.gpu
def test_compat_calls_capture_in_cuda_graphs(gen) -> None:
    ops.warm_up("cuda")
    cache, rows = flashmla_cache(gen, 600, 256, 0, "cuda")
    e_cache, e_rows = flashmla_cache(gen, 300, 64, 64, "cuda")
    q = torch.randn(4, 1, 64, 512, generator=gen).bfloat16().cuda()
    ids = random_ids(gen, (4, 1, 512), rows.shape[0]).cuda()
    e_ids = random_ids(gen, (4, 1, 128), e_rows.shape[0]).cuda()
    lengths = torch.tensor([512, 100, 0, 7], dtype=torch.int32, device="cuda")
    sink = torch.randn(64, generator=gen).cuda()
    kq, kcache, kw, kctx, ktable, _ = logits_case(gen, 4, 1, 64, 64, 0, True, "cuda")
    kq, kw, kctx, ktable = kq.cuda(), kw.cuda(), kctx.cuda(), ktable.cuda()
    meta = flash_mla.get_mla_metadata()[0]

    def step():
        out, lse = flash_mla.flash_mla_with_kvcache(q, cache, None, None, 512, meta, is_fp8_kvcache=True, indices=ids,
                                                    attn_sink=sink, extra_k_cache=e_cache,
                                                    extra_indices_in_kvcache=e_ids, topk_length=lengths)
        sched = deep_gemm.get_paged_mqa_logits_metadata(kctx, 64, 132)
        logits = deep_gemm.fp8_paged_mqa_logits(kq, kcache, kw, kctx, ktable, sched, 320)
        top = deep_gemm.paged_indexer_topk(kq, kcache, kw, kctx, ktable, 64)
        return out, lse, logits, top

    eager = step()
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        if a.is_floating_point():  # the same kernels; cuBLAS may pick another algorithm under capture
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# docs/embedding.md


def test_embedding_guide_example_runs() -> None:
    """The worked example of docs/embedding.md runs as written (it checks itself against the ops)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "embedding.md").read_text(encoding="utf-8")
    section = text.split("## Worked example", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "docs/embedding.md", "exec"), {"__name__": "embedding_example"})
