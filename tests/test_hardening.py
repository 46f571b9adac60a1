"""Bad input never kills the process: each class of malformed call found by the audit of the
ops and the cache API gets a Python exception naming the argument (or, for byte arithmetic,
the exact answer)."""

from __future__ import annotations

import pytest
import torch

import dsv4rs
from dsv4rs import ops
from dsv4rs import reference as ref
from dsv4rs.cache import CacheConfig, KVCacheManager

PAGES = dict(window=10, csa=10, hca=10, state=10)


# -- the cache API: sizes, arithmetic, the binding boundary ------------------------------------


def test_byte_arithmetic_is_exact_at_any_length() -> None:
    assert CacheConfig.v4_pro().bytes_per_token(2**62) == 5031.4375
    assert CacheConfig.v4_flash().bytes_per_token(2**62) == 3514.25
    assert CacheConfig.v4_pro().footprint(2**64 - 1).compressed == 2**62 * 652 * 30 + 2**57 * 584 * 31
    longest = CacheConfig((4,)).longest_context(2**64 - 1)  # used to loop forever
    assert 2**56 < longest < 2**63
    assert all(p >= 1 for p in CacheConfig.v4_pro().pages_for_budget(2**64 - 1, 1).values())


@pytest.mark.parametrize(("call", "name"), [
    (lambda m, c: m.page_tables([m.add_sequence()[0]], "csa", width=2**40), "width"),
    (lambda m, c: m.page_tables([m.add_sequence()[0]], "csa", width=2**61), "width"),
    (lambda m, c: KVCacheManager(c, dict(PAGES, window=2**32 - 1)), "window"),
    (lambda m, c: KVCacheManager.from_budget(c, 1 << 50, 3), "pages"),
    (lambda m, c: CacheConfig((4,), window=2**40), "window"),
    (lambda m, c: CacheConfig((4,), window=2**63), "window"),
    (lambda m, c: CacheConfig((4,) * 5000), "compress_ratios"),
])
def test_sizes_are_checked_before_anything_is_allocated(call, name: str) -> None:
    c = CacheConfig.v4_flash()
    with pytest.raises(ValueError, match=name):
        call(KVCacheManager(c, PAGES), c)


@pytest.mark.parametrize(("call", "name", "error"), [
    (lambda m, c: m.add_sequence([-1]), "prompt", ValueError),
    (lambda m, c: m.add_sequence([2**40]), "prompt", ValueError),
    (lambda m, c: m.add_sequence([1.5]), "prompt", TypeError),
    (lambda m, c: m.add_sequence("abc"), "prompt", TypeError),
    (lambda m, c: m.lookup_prefix([True]), "prompt", TypeError),
    # Ids are ints or a 1-d integer tensor on the CPU: bools, floats and 2-d tensors are refused,
    # not truncated or flattened (the rules of the engine's token ids).
    (lambda m, c: m.add_sequence([1, True]), "prompt", TypeError),
    (lambda m, c: m.add_sequence(torch.ones(2, 2, dtype=torch.int64)), "prompt", TypeError),
    (lambda m, c: m.add_sequence(torch.tensor(3)), "prompt", TypeError),
    (lambda m, c: m.add_sequence(torch.tensor([True, False])), "prompt", TypeError),
    (lambda m, c: m.add_sequence(torch.zeros(2, dtype=torch.int64, device="meta")), "prompt", TypeError),
    (lambda m, c: m.add_sequence(None), "prompt", TypeError),
    (lambda m, c: m.append([m.add_sequence()[0]], [torch.tensor([1.0])]), r"tokens\[0\]", TypeError),
    (lambda m, c: m.append([m.add_sequence()[0]], [[1, None]]), r"tokens\[0\]", TypeError),
    (lambda m, c: m.page_tables(torch.zeros(1, 1, dtype=torch.int64), "csa"), "seq_ids", TypeError),
    (lambda m, c: m.append([-1], [[1]]), "seq_ids", ValueError),
    (lambda m, c: m.append([0], [[1], [2]]), "tokens", ValueError),
    (lambda m, c: m.append([m.add_sequence()[0]], [[-5]]), r"tokens\[0\]", ValueError),
    (lambda m, c: m.length(-3), "seq_id", ValueError),
    (lambda m, c: m.fork(2**70), "seq_id", ValueError),
    (lambda m, c: m.release(1.5), "seq_id", TypeError),
    (lambda m, c: m.sequence_footprint(None), "seq_id", TypeError),
    (lambda m, c: m.page_tables([-1], "csa"), "seq_ids", ValueError),
    (lambda m, c: m.page_tables([0], "csa", width=-1), "width", ValueError),
    (lambda m, c: c.footprint(-1), "seq_len", ValueError),
    (lambda m, c: c.bytes_per_token(2**70), "seq_len", ValueError),
    (lambda m, c: c.sequences_that_fit(100, -5), "budget_bytes", ValueError),
    (lambda m, c: c.longest_context("1G"), "budget_bytes", TypeError),
    (lambda m, c: KVCacheManager(c, dict(PAGES, csa=-1)), "csa", ValueError),
    (lambda m, c: KVCacheManager(c, [1, 2, 3, 4]), "pages", TypeError),
])
def test_malformed_calls_name_the_argument(call, name: str, error: type) -> None:
    c = CacheConfig.v4_flash()
    with pytest.raises(error, match=name):
        call(KVCacheManager(c, PAGES), c)


def _i64(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int64)


@pytest.mark.parametrize(("call", "name", "error"), [
    # Ints past int64 are named by the op, not by the op schema's conversion.
    (lambda: ops.step_rows(_i64(2), _i64(2), _i64(1), hca_table=torch.zeros(1, 1, dtype=torch.int32),
                           hca_ratio=2**64 + 1, hca_width=4), "hca_ratio", ValueError),
    (lambda: ops.compressor_state(2**63, 64), "ratio", ValueError),
    (lambda: ops.compress(torch.zeros(1, 1024), torch.zeros(1, 1024), torch.zeros(4, 1024), torch.ones(512),
                          torch.ones(32), *ops.compressor_state(4, 512), 2**63, 4), "start_pos", ValueError),
    # Flags are bools, not truthy values.
    (lambda: ops.rope(torch.zeros(2, 64), _i64(2), torch.ones(32), inverse="yes"), "inverse", TypeError),
    (lambda: ops.indexer_topk(torch.zeros(1, 4, 128), torch.zeros(1, 4), ops.new_index_key_cache(1),
                              torch.zeros(1, 1, dtype=torch.int32), _i64(1), torch.ones(1, dtype=torch.int64), 4,
                              physical=1), "physical", TypeError),
    (lambda: ops.indexer_topk(torch.zeros(1, 4, 128), torch.zeros(1, 4), ops.new_index_key_cache(1),
                              torch.zeros(1, 1, dtype=torch.int32), _i64(1), torch.ones(1, dtype=torch.int64), 4,
                              return_scores="no"), "return_scores", TypeError),
    # Empty weights have no tiles.
    (lambda: ops.weight_tiles(torch.zeros(0, 64, dtype=torch.uint8)), "weight", ValueError),
    (lambda: ops.weight_rows(torch.zeros(2, 64, 0).to(torch.float8_e4m3fn)), "weight", ValueError),
    (lambda: ops.quant_linear(torch.zeros(3, 64), torch.zeros(0, 64).to(torch.float8_e4m3fn), torch.ones(0, 1)),
     "weight", ValueError),
    # Score rows are at most the keys the table maps, or 4,096 where that is more.
    (lambda: ops.indexer_scores(torch.zeros(1, 4, 128), torch.zeros(1, 4), ops.new_index_key_cache(1),
                                torch.zeros(1, 1, dtype=torch.int32), _i64(1), torch.ones(1, dtype=torch.int64),
                                width=2**31), "width", ValueError),
    # An HCA list is at most as wide as its table: refused before the output is allocated.
    (lambda: ops.step_rows(_i64(2), _i64(2), _i64(1), hca_table=torch.zeros(1, 1, dtype=torch.int32), hca_ratio=4,
                           hca_width=2**40), "hca_width", ValueError),
    (lambda: ops.step_rows(_i64(2), _i64(2), _i64(1), torch.zeros(1, 1, dtype=torch.int32), 2**40), "window_table",
     ValueError),
])
def test_malformed_op_scalars_name_the_argument(call, name: str, error: type) -> None:
    with pytest.raises(error, match=f"^{name}: "):
        call()


@pytest.mark.parametrize("ids", [[], [0], [3, 1, 2], [-1], [5, 7], [2**63 - 1], [2**63], [-(2**63) - 1], [1, True],
                                 [1, 2.0], [True]])
def test_id_lists_take_the_same_checks_as_tensors(ids: list) -> None:
    """A list of plain ints is checked without building a tensor (a decode step's ids); the result
    and the error are those of the general path, which a tuple of the same values takes."""
    from dsv4rs.cache import _ids

    def outcome(x):
        try:
            return _ids("x", x, high=8)
        except (TypeError, ValueError) as e:
            return type(e), str(e)

    assert outcome(ids) == outcome(tuple(ids))
    if all(type(v) is int and -(2**63) <= v < 2**63 for v in ids):  # what an int64 tensor can hold
        assert outcome(ids) == outcome(torch.tensor(ids, dtype=torch.int64))


def test_ids_as_a_tensor_or_array_equal_the_list() -> None:
    """The allocator takes a 1-d integer tensor (any integer dtype) or array as the list of its
    values: the same sequence, pages and prefix hits."""
    import numpy as np

    c = CacheConfig.v4_flash()
    m = KVCacheManager(c, PAGES)
    prompt = list(range(3, 3 + 600))
    first, _ = m.add_sequence()
    m.append([first], [prompt])
    want = m.lookup_prefix(prompt)
    assert want.cached_tokens > 0
    for form in (tuple(prompt), torch.tensor(prompt, dtype=torch.int32), np.array(prompt, dtype=np.int64)):
        assert m.lookup_prefix(form) == want
        seq, hit = m.add_sequence(form)
        assert hit == want
        m.append([seq], [form[hit.recompute_from:]])
        assert m.length(seq) == len(prompt)
        m.release(seq)


# -- the ops: devices, aliasing, partial arguments, corrupted bytes, no GPU -----------------------


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


META_CALLS = {
    "kv_write": lambda: ops.kv_write(_meta(ops.new_kv_cache(1)), torch.zeros(1, dtype=torch.int64), torch.zeros(1, 512)),
    "kv_read": lambda: ops.kv_read(ops.new_kv_cache(1), _meta(torch.zeros(1, dtype=torch.int64))),
    "index_key_write": lambda: ops.index_key_write(ops.new_index_key_cache(1), torch.zeros(1, dtype=torch.int64),
                                                   _meta(torch.zeros(1, 128))),
    "hadamard128": lambda: ops.hadamard128(_meta(torch.zeros(2, 128))),
    "rope": lambda: ops.rope(_meta(torch.zeros(2, 64)), torch.zeros(2, dtype=torch.int64), torch.ones(32)),
    "mhc_weights": lambda: ops.mhc_weights(_meta(torch.zeros(2, 24)), torch.ones(3), torch.zeros(24)),
    "mhc_collapse": lambda: ops.mhc_collapse(_meta(torch.zeros(2, 4, 8)), torch.ones(2, 4)),
    "mhc_combine": lambda: ops.mhc_combine(torch.zeros(2, 4, 8), _meta(torch.zeros(2, 8)), torch.ones(2, 4),
                                           torch.ones(2, 4, 4)),
    "rms_norm": lambda: ops.rms_norm(_meta(torch.zeros(2, 8))),
    "mhc_mix": lambda: ops.mhc_mix(torch.zeros(2, 4, 8), _meta(torch.zeros(24, 32))),
    "mhc_pre": lambda: ops.mhc_pre(torch.zeros(2, 4, 8), _meta(torch.zeros(24, 32)), torch.ones(3), torch.zeros(24)),
    "copy_rows": lambda: ops.copy_rows(_meta(ops.new_kv_cache(1)), torch.zeros(1, dtype=torch.int64),
                                       ops.new_kv_cache(1), torch.zeros(1, dtype=torch.int64)),
    "sparse_attention": lambda: ops.sparse_attention(_meta(torch.zeros(1, 4, 512)), ops.new_kv_cache(1),
                                                     torch.zeros(1, 2, dtype=torch.int64), torch.zeros(4)),
    "indexer_topk": lambda: ops.indexer_topk(torch.zeros(1, 4, 128), torch.zeros(1, 4), _meta(ops.new_index_key_cache(1)),
                                             torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, dtype=torch.int64),
                                             torch.ones(1, dtype=torch.int64), 4),
    "indexer_scores": lambda: ops.indexer_scores(torch.zeros(1, 4, 128), torch.zeros(1, 4),
                                                 _meta(ops.new_index_key_cache(1)), torch.zeros(1, 1, dtype=torch.int32),
                                                 torch.zeros(1, dtype=torch.int64), torch.ones(1, dtype=torch.int64)),
    "compress": lambda: ops.compress(_meta(torch.zeros(4, 1024)), torch.zeros(4, 1024), torch.zeros(4, 1024),
                                     torch.ones(512), torch.ones(32), *ops.compressor_state(4, 512), 0, 4),
    "quant_linear": lambda: ops.quant_linear(torch.zeros(2, 32), _meta(torch.zeros(4, 32, dtype=torch.float8_e4m3fn)),
                                             torch.ones(1, 1)),
    "moe_experts": lambda: ops.moe_experts(torch.zeros(2, 32), torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1),
                                           _meta(torch.zeros(2, 64, 16, dtype=torch.uint8)),
                                           torch.full((2, 64, 1), 127, dtype=torch.uint8),
                                           torch.zeros(2, 32, 16, dtype=torch.uint8),
                                           torch.full((2, 32, 1), 127, dtype=torch.uint8), 1.0),
}


@pytest.mark.parametrize("op", sorted(META_CALLS))
def test_meta_tensors_are_refused(op: str) -> None:
    """A meta tensor would reach the op's fake implementation: in-place ops would do nothing and
    the others return uninitialized memory."""
    with pytest.raises(ValueError, match="meta"):
        META_CALLS[op]()


def test_arguments_written_in_place_must_not_share_memory() -> None:
    cache = ops.new_kv_cache(1)
    entries = cache.view(-1)[: 2 * 512 * 4].view(torch.float32).view(2, 512)  # a view of the cache
    with pytest.raises(ValueError, match="cache, entries"):
        ops.kv_write(cache, torch.tensor([0, 1]), entries)
    keys_cache = ops.new_index_key_cache(1)
    keys = keys_cache.view(-1)[8 : 8 + 4 * 128].view(torch.float32).view(1, 128)
    with pytest.raises(ValueError, match="cache, keys"):
        ops.index_key_write(keys_cache, torch.tensor([0]), keys)
    state = torch.zeros(16, 1024)
    args = (torch.zeros(4, 1024), torch.zeros(4, 1024), torch.zeros(4, 1024), torch.ones(512), torch.ones(32))
    with pytest.raises(ValueError, match="kv_state, score_state"):
        ops.compress(*args, state[0:8], state[4:12], 0, 4)  # partly overlapping states
    kv_state, score_state = ops.compressor_state(4, 512)
    with pytest.raises(ValueError, match="kv_state, kv"):
        ops.compress(kv_state[:4], *args[1:], kv_state, score_state, 0, 4)
    pool = torch.zeros(2, 2, 8, 1024)
    with pytest.raises(ValueError, match="state, kv"):
        ops.compress_batch(pool[0, 0, :4], pool[0, 0, 4:], *args[2:], pool, torch.tensor([1]), torch.tensor([0]),
                           torch.tensor([0, 4]), 4)


def test_derotate_needs_both_tensors() -> None:
    q, cache = torch.zeros(1, 4, 512), ops.quantize_entries(torch.randn(4, 512))
    for bad in ((torch.zeros(1, dtype=torch.int64), None), (None, torch.ones(32)), (torch.zeros(1),), "yes"):
        with pytest.raises(ValueError, match="derotate"):
            ops.sparse_attention(q, cache, torch.zeros(1, 2, dtype=torch.int64), torch.zeros(4), derotate=bad)


def test_fp8_nan_codes_read_as_nan_and_are_refused(gen: torch.Generator) -> None:
    """0x7F and 0xFF are NaN in e4m3fn; a cache holding them is corrupted and the readers that
    check rows refuse it instead of reading 480."""
    assert torch.isnan(ref.fp8_e4m3_decode(torch.tensor([0x7F, 0xFF], dtype=torch.uint8))).all()
    cache = ops.quantize_entries(torch.randn(4, 512, generator=gen))
    cache[0, 576 * 2 + 5] = 0x7F  # row 2's byte 5 (a page holds its rows' 576 data bytes one after another)
    assert torch.isnan(ops.kv_read(cache, torch.tensor([2]))).any()
    q, sink = torch.randn(1, 4, 512, generator=gen), torch.zeros(4)
    with pytest.raises(ValueError, match="non-finite"):
        ops.sparse_attention(q, cache, torch.tensor([[0, 1, 2]]), sink)
    keys = ops.quantize_index_keys(torch.randn(64, 128, generator=gen), "fp8")
    keys[0, 132 * 3 + 7] = 0xFF
    with pytest.raises(ValueError, match="non-finite"):
        ops.indexer_topk(torch.randn(1, 4, 128, generator=gen), torch.rand(1, 4, generator=gen), keys,
                         torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, dtype=torch.int64),
                         torch.full((1,), 64), 8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
def test_gpu_queries_without_a_gpu_raise_cuda_error() -> None:
    with pytest.raises(dsv4rs.CudaError):
        ops.warm_up("cuda")
    with pytest.raises(dsv4rs.CudaError):
        ops.attention_kernel("cuda")
