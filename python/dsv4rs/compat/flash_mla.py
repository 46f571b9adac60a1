"""FlashMLA's calling convention for DeepSeek-V4 ("MODEL1") sparse attention, on dsv4rs's ops.

Drop-in for the three entry points an inference stack calls (``import dsv4rs.compat.flash_mla as
flash_mla``): :func:`get_mla_metadata`, :func:`flash_mla_with_kvcache` (the sparse FP8 decode
path) and :func:`flash_mla_sparse_fwd` (sparse prefill over BF16 rows), with FlashMLA's argument
names, order, defaults, shapes, dtypes and return conventions (FlashMLA's
``flash_mla/flash_mla_interface.py``, ``csrc/api/sparse_decode.h``, ``csrc/api/sparse_fwd.h`` and
the references in ``tests/ref.py``):

- the KV cache is FlashMLA's V4 layout, ``[num_blocks, page_block_size, 1, 584]`` of
  float8_e4m3fn, int8 or uint8: per page, every row's 576 data bytes (448 FP8 e4m3 + 64 BF16),
  then every row's 8 scale bytes (7 UE8M0 + a pad byte), the layout of docs/model.md section 5;
- ``indices`` are rows of that cache, ``page * page_block_size + offset``; -1 (or any id outside
  the cache) is masked;
- ``topk_length`` / ``extra_topk_length`` (``int32 [batch]``): only the first columns of each
  batch's indices count;
- ``attn_sink`` (``float32 [heads]``) joins the softmax denominator (the output is scaled by
  ``exp(lse) / (exp(lse) + exp(sink))``); ``-inf`` is no sink, ``+inf`` zeroes the output;
- out is bfloat16; the log-sum-exp is the natural-log LSE of the scaled logits **without** the
  sink, ``+inf`` for a query with no valid candidate (whose output is 0). The decode LSE is
  ``[batch, heads, seq_q]`` (a transposed view of a ``[batch, seq_q, heads]`` tensor, as
  FlashMLA returns it); the prefill LSE and ``max_logits`` are ``[s_q, heads]``.

Where FlashMLA refuses, dsv4rs accepts: any number of query heads (FlashMLA: 64 or 128), any
top-k (FlashMLA's kernels work in blocks of 64 indices), any page size (both caches), every GPU
from sm_80 (FlashMLA: sm_90a and sm_100f) and the CPU. It refuses what it does not implement,
with a ValueError naming the argument: the V3.2 layout (head dim 576, 656-byte rows), dense MLA
decoding (``indices=None``) and several KV heads. Arguments FlashMLA rejects raise
:class:`~dsv4rs.compat.CompatRuntimeError` (a RuntimeError, like FlashMLA's ``TORCH_CHECK``) or
:class:`~dsv4rs.compat.CompatAssertionError` (an AssertionError, like its Python asserts); both
are also ValueErrors. On the GPU, tensor values are never checked (no synchronization).

Costs beyond :func:`dsv4rs.ops.sparse_attention` itself:

- a page size other than 64, or pages padded beyond ``64 * 584`` bytes (vLLM pads a page to a
  multiple of 576 bytes), cannot be viewed as dsv4rs's 64-row pages: the rows a call attends
  are gathered into a temporary cache (``584`` bytes per (query, candidate), in chunks of at most
  :data:`~dsv4rs.compat._common.GATHER_BUDGET_BYTES`), which adds about twice the bytes the
  attention reads. Caches of 64-row pages packed back to back (``stride(0) == 64 * 584``) are read
  in place;
- the float32 output is rounded to bfloat16 (one pass over the output), and the LSE's ``-inf``
  becomes ``+inf`` (in place);
- a query tensor or index tensor that is not contiguous is copied; ``topk_length`` is expanded to
  one length per query;
- :func:`flash_mla_sparse_fwd` also returns ``max_logits``, which the attention op does not
  produce: it is computed apart (the scores of every candidate once more, in float32), about
  the cost of the attention's first matmul; and a ``kv`` whose rows are not a multiple of 64 or
  not contiguous is copied into 64-row pages.

All of it runs on the caller's stream, allocates through torch and never synchronizes, so calls
can be captured in CUDA graphs (see docs/embedding.md).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import torch

from dsv4rs import ops
from dsv4rs.compat._common import (
    GATHER_BUDGET_BYTES,
    MAIN_ENTRY,
    PagedCache,
    check_contiguous,
    check_device,
    check_dtype,
    check_last_dim_contiguous,
    check_ndim,
    check_shape,
    finite_float,
    finite_sink,
    flag,
    integer,
    optional_tensor,
    py_assert,
    renamed,
    tensor,
    torch_check,
    valid_ids,
)

__all__ = ["FlashMLASchedMeta", "flash_mla_sparse_fwd", "flash_mla_with_kvcache", "get_mla_metadata"]

HEAD_DIM = ops.ENTRY_DIM
"""Query / entry dim of V4 (FlashMLA's ``d_qk`` for MODEL1) and the value dim ``d_v``."""
V32_HEAD_DIM = 576
"""FlashMLA's ``d_qk`` of DeepSeek-V3.2 (656-byte rows), which dsv4rs does not implement."""
_CACHE_DTYPES = (torch.float8_e4m3fn, torch.int8, torch.uint8)


@dataclasses.dataclass
class FlashMLASchedMeta:
    """The scheduling handle of :func:`flash_mla_with_kvcache` (FlashMLA's class of the same name
    and fields). dsv4rs needs no schedule: the handle only records the first call's shapes, and
    later calls with the same handle must match them, as FlashMLA requires."""

    @dataclasses.dataclass
    class Config:
        b: int
        s_q: int
        h_q: int
        page_block_size: int
        h_k: int

        causal: bool
        is_fp8_kvcache: bool
        topk: Optional[int]

        extra_page_block_size: Optional[int]
        extra_topk: Optional[int]

    have_initialized: bool = False
    config: Optional[Config] = None
    tile_scheduler_metadata: Optional[torch.Tensor] = None
    """Always ``None`` (FlashMLA keeps its tile schedule here)."""
    num_splits: Optional[torch.Tensor] = None
    """Always ``None``."""


def get_mla_metadata(*args, **kwargs) -> Tuple[FlashMLASchedMeta, None]:
    """A fresh :class:`FlashMLASchedMeta` and ``None``, as FlashMLA returns them; arguments are
    accepted and ignored (FlashMLA keeps them for its older interface)."""
    return FlashMLASchedMeta(), None


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: Optional[torch.Tensor],
    cache_seqlens: Optional[torch.Tensor],
    head_dim_v: int,
    tile_scheduler_metadata: FlashMLASchedMeta,
    num_splits: None = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: Optional[torch.Tensor] = None,
    attn_sink: Optional[torch.Tensor] = None,
    extra_k_cache: Optional[torch.Tensor] = None,
    extra_indices_in_kvcache: Optional[torch.Tensor] = None,
    topk_length: Optional[torch.Tensor] = None,
    extra_topk_length: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention of decode (or any) queries over FP8 KV caches, FlashMLA's sparse path.

    Args:
        q: ``bfloat16 [batch, seq_q, heads, 512]`` (any ``heads >= 1``).
        k_cache: ``[num_blocks, page_block_size, 1, 584]`` float8_e4m3fn/int8/uint8 in FlashMLA's
            V4 layout (any page size; ``stride(1)`` must be 584).
        block_table, cache_seqlens: unused by the sparse path (FlashMLA ignores them too).
        head_dim_v: must be 512.
        tile_scheduler_metadata: from :func:`get_mla_metadata`; reusable while the shapes stay.
        num_splits: must be ``None``.
        softmax_scale: logit scale, default ``q.shape[-1] ** -0.5``.
        causal: must be False (sparse attention).
        is_fp8_kvcache: must be True (sparse attention).
        indices: ``int32 [batch, seq_q, topk]`` rows of ``k_cache``
            (``page * page_block_size + offset``), -1 masked; any ``topk >= 1``.
        attn_sink: ``float32 [heads]`` or ``None``.
        extra_k_cache, extra_indices_in_kvcache: a second cache (its own page size) and
            ``int32 [batch, seq_q, extra_topk]`` rows of it, joining the same softmax.
        topk_length, extra_topk_length: ``int32 [batch]``: only the first ``topk_length[b]``
            columns of batch ``b``'s indices count (values past the width count all).

    Returns:
        ``(out bfloat16 [batch, seq_q, heads, 512], lse float32 [batch, heads, seq_q])``: ``lse``
        is the natural-log log-sum-exp of the scaled logits without the sink, ``+inf`` (and
        the output 0) for a query without valid candidates.
    """
    causal, is_fp8_kvcache = flag("causal", causal), flag("is_fp8_kvcache", is_fp8_kvcache)
    sched_meta = tile_scheduler_metadata
    py_assert(isinstance(sched_meta, FlashMLASchedMeta),
              "tile_scheduler_metadata must be a FlashMLASchedMeta (from dsv4rs.compat.flash_mla.get_mla_metadata)")
    py_assert(num_splits is None, "num_splits must be None")
    q, k_cache = tensor("q", q), tensor("k_cache", k_cache)
    indices, attn_sink = optional_tensor("indices", indices), optional_tensor("attn_sink", attn_sink)
    extra_k_cache = optional_tensor("extra_k_cache", extra_k_cache)
    extra_indices_in_kvcache = optional_tensor("extra_indices_in_kvcache", extra_indices_in_kvcache)
    topk_length = optional_tensor("topk_length", topk_length)
    extra_topk_length = optional_tensor("extra_topk_length", extra_topk_length)
    check_ndim("q", q, 4)
    check_ndim("k_cache", k_cache, 4)
    check_ndim("indices", indices, 3)
    check_ndim("extra_k_cache", extra_k_cache, 4)
    check_ndim("extra_indices_in_kvcache", extra_indices_in_kvcache, 3)
    topk = indices.shape[-1] if indices is not None else None
    extra_page_block_size = extra_k_cache.shape[1] if extra_k_cache is not None else None
    extra_topk = extra_indices_in_kvcache.shape[-1] if extra_indices_in_kvcache is not None else None
    config = FlashMLASchedMeta.Config(q.shape[0], q.shape[1], q.shape[2], k_cache.shape[1], k_cache.shape[2],
                                      causal, is_fp8_kvcache, topk, extra_page_block_size, extra_topk)
    if not sched_meta.have_initialized:
        py_assert(indices is None or not causal, "causal must be False when indices is given (sparse attention)")
    else:
        py_assert(sched_meta.config is not None, "tile_scheduler_metadata has no config")
        for field in dataclasses.fields(config):
            want, got = getattr(sched_meta.config, field.name), getattr(config, field.name)
            py_assert(want == got, f"tile_scheduler_metadata was set up with {field.name} = {want}, this call has "
                      f"{got}: reuse a handle only for calls of the same shapes and flags (get_mla_metadata "
                      "gives a fresh one)")

    if indices is None:
        raise ValueError("indices: dsv4rs implements FlashMLA's sparse FP8 path (indices given); dense MLA "
                         "decoding over a block table is not part of dsv4rs")
    py_assert(not causal, "causal must be False when sparse attention is enabled")
    py_assert(is_fp8_kvcache, "is_fp8_kvcache must be True when sparse attention is enabled")
    _check_decode(q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices_in_kvcache,
                  extra_topk_length, head_dim_v)
    scale = HEAD_DIM ** -0.5 if softmax_scale is None else finite_float("softmax_scale", softmax_scale)

    b, s_q, h_q, _ = q.shape
    t = b * s_q
    lists = [_List("k_cache", PagedCache("k_cache", k_cache, MAIN_ENTRY), indices.reshape(t, -1),
                   _per_query(topk_length, s_q, topk))]
    if extra_k_cache is not None and extra_topk:
        lists.append(_List("extra_k_cache", PagedCache("extra_k_cache", extra_k_cache, MAIN_ENTRY),
                           extra_indices_in_kvcache.reshape(t, -1), _per_query(extra_topk_length, s_q, extra_topk)))
    sink = finite_sink(attn_sink, h_q, q.device)
    out = torch.empty((b, s_q, h_q, HEAD_DIM), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, s_q, h_q), dtype=torch.float32, device=q.device)
    _attend(q.reshape(t, h_q, HEAD_DIM), lists, sink, scale, out.view(t, h_q, HEAD_DIM), lse.view(t, h_q))
    lse.masked_fill_(lse == -math.inf, math.inf)
    # Set up by the first call that runs (a refused call leaves a fresh handle fresh).
    sched_meta.have_initialized, sched_meta.config = True, config
    return out, lse.transpose(1, 2)


def _check_decode(q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices, extra_topk_length,
                  head_dim_v) -> None:
    """FlashMLA's checks of the sparse decode path (``sparse_attn_decode_interface``), then the
    ones dsv4rs adds."""
    check_ndim("indices", indices, 3)
    b, s_q, h_q, d_qk = q.shape
    num_blocks, page_block_size, h_kv, _ = k_cache.shape
    topk = indices.shape[2]
    torch_check(b > 0, "q: batch must be > 0")
    torch_check(s_q > 0, "q: seq_len_q must be > 0")
    torch_check(h_q > 0, "q: num_heads_q must be > 0")
    torch_check(h_kv == 1, "k_cache: only MQA (num_heads_k == 1) is supported for sparse decoding")
    torch_check(d_qk in (HEAD_DIM, V32_HEAD_DIM), f"q: only head_size_k 576 or 512 is supported, got {d_qk}")
    torch_check(integer("head_dim_v", head_dim_v, 0) == HEAD_DIM,
                f"head_dim_v: only 512 is supported, got {head_dim_v}")
    torch_check(topk > 0, "indices: topk (the last dim) must be > 0")
    if extra_k_cache is not None:
        torch_check(extra_indices is not None, "extra_indices_in_kvcache must be given with extra_k_cache")
    else:
        torch_check(extra_indices is None, "extra_indices_in_kvcache must not be given without extra_k_cache")
        torch_check(extra_topk_length is None, "extra_topk_length must not be given without extra_k_cache")
    named = [("indices", indices), ("topk_length", topk_length), ("attn_sink", attn_sink),
             ("extra_k_cache", extra_k_cache), ("extra_indices_in_kvcache", extra_indices),
             ("extra_topk_length", extra_topk_length), ("k_cache", k_cache)]
    for name, t in named:
        check_device(name, t, q.device)
    check_dtype("q", q, torch.bfloat16)
    check_dtype("k_cache", k_cache, *_CACHE_DTYPES)
    check_dtype("extra_k_cache", extra_k_cache, *_CACHE_DTYPES)
    for name, t in (("indices", indices), ("topk_length", topk_length), ("extra_indices_in_kvcache", extra_indices),
                    ("extra_topk_length", extra_topk_length)):
        check_dtype(name, t, torch.int32)
    check_dtype("attn_sink", attn_sink, torch.float32)
    for name, t in (("q", q), ("k_cache", k_cache), ("indices", indices), ("extra_k_cache", extra_k_cache),
                    ("extra_indices_in_kvcache", extra_indices)):
        check_last_dim_contiguous(name, t)
    for name, t in (("topk_length", topk_length), ("attn_sink", attn_sink), ("extra_topk_length", extra_topk_length)):
        check_contiguous(name, t)
    if d_qk == V32_HEAD_DIM:
        raise ValueError("q: head dim 576 is DeepSeek-V3.2's layout (656-byte rows), which dsv4rs does not "
                         "implement; dsv4rs is DeepSeek-V4's (head dim 512, 584-byte rows)")
    row = MAIN_ENTRY.row_bytes
    check_shape("k_cache", k_cache, num_blocks, page_block_size, h_kv, row)
    torch_check(page_block_size < 2 or k_cache.stride(1) == row,
                f"k_cache: a page's rows must be contiguous (stride(1) == {row}), got {k_cache.stride(1)}")
    if extra_k_cache is not None:
        check_ndim("extra_k_cache", extra_k_cache, 4)
        e_blocks, e_page, e_h, _ = extra_k_cache.shape
        check_shape("extra_k_cache", extra_k_cache, e_blocks, e_page, h_kv, row)
        torch_check(e_page < 2 or extra_k_cache.stride(1) == row,
                    f"extra_k_cache: a page's rows must be contiguous (stride(1) == {row}), got {extra_k_cache.stride(1)}")
        PagedCache.check("extra_k_cache", extra_k_cache, MAIN_ENTRY)
    PagedCache.check("k_cache", k_cache, MAIN_ENTRY)
    check_shape("indices", indices, b, s_q, topk)
    check_shape("topk_length", topk_length, b)
    check_shape("attn_sink", attn_sink, h_q)
    if extra_indices is not None:
        check_ndim("extra_indices_in_kvcache", extra_indices, 3)
        check_shape("extra_indices_in_kvcache", extra_indices, b, s_q, extra_indices.shape[-1])
    check_shape("extra_topk_length", extra_topk_length, b)


def _per_query(lengths: torch.Tensor | None, s_q: int, width: int) -> torch.Tensor | None:
    """FlashMLA's per-batch lengths as one length per query, clamped to ``[0, width]``."""
    if lengths is None:
        return None
    lengths = lengths.clamp(0, width)
    return lengths if s_q == 1 else lengths.repeat_interleave(s_q)


@dataclasses.dataclass
class _List:
    """One candidate list: an engine cache, ``[T, K]`` row ids and optional ``[T]`` lengths."""

    name: str
    cache: PagedCache
    ids: torch.Tensor
    lengths: torch.Tensor | None


def _attend(q: torch.Tensor, lists: list[_List], sink: torch.Tensor, scale: float, out: torch.Tensor,
            lse: torch.Tensor) -> None:
    """``ops.sparse_attention`` of ``q`` (``[T, H, 512]``) over one or two candidate lists,
    written into ``out`` (``[T, H, 512]``, any float dtype) and ``lse`` (``float32 [T, H]``).
    Caches in dsv4rs's layout are read in place (one call); otherwise the queries go in chunks,
    each over a temporary cache of the rows its candidates name."""
    native = [lst.cache.native() for lst in lists]
    gathered = [n is None for n in native]
    width = sum(lst.ids.shape[1] for lst, g in zip(lists, gathered) if g)
    t_all = q.shape[0]
    step = t_all if not width else max(1, GATHER_BUDGET_BYTES // (width * MAIN_ENTRY.row_bytes))
    names = {"q": "q", "sink": "attn_sink", "cache": lists[0].name}
    if len(lists) > 1:
        names["extra_cache"] = lists[1].name
    for t0 in range(0, t_all, step):
        t1 = min(t_all, t0 + step)
        args, origins = [], {}
        for lst, view, op_name in zip(lists, native, ("cache", "extra_cache")):
            ids = lst.ids[t0:t1]
            lengths = None if lst.lengths is None else lst.lengths[t0:t1]
            if view is not None:
                if ids.device.type == "cpu":  # the GPU kernels mask ids outside the cache themselves
                    ids = torch.where(valid_ids(ids, lst.cache.rows), ids, -1)
                args.append((view, ids.contiguous(), lengths))
                continue
            ok = valid_ids(ids, lst.cache.rows, lengths)
            origins[op_name] = torch.where(ok, ids, 0).reshape(-1).long()  # engine row of each gathered row
            cache = lst.cache.gather(origins[op_name])
            local = torch.arange(ids.numel(), dtype=torch.int32, device=ids.device).view(ids.shape)
            args.append((cache, torch.where(ok, local, -1), lengths))
        (cache, ids, lengths), extra = args[0], (args[1] if len(args) > 1 else (None, None, None))
        try:
            o, l = ops.sparse_attention(q[t0:t1].contiguous(), cache, ids, sink, scale=scale, lengths=lengths,
                                        extra_cache=extra[0], extra_indices=extra[1], extra_lengths=extra[2],
                                        out_dtype=torch.bfloat16 if out.dtype == torch.bfloat16 else torch.float32)
        except ValueError as e:  # (the CPU's value checks) in FlashMLA's argument names
            raise renamed(e, names, origins, {"q": t0 * q[0].numel()}) from None
        out[t0:t1].copy_(o)
        lse[t0:t1].copy_(l)


def flash_mla_sparse_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    attn_sink: Optional[torch.Tensor] = None,
    topk_length: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse attention over BF16 rows (FlashMLA's sparse prefill kernel).

    Args:
        q: ``bfloat16 [s_q, heads, 512]`` (any ``heads >= 1``).
        kv: ``bfloat16 [s_kv, 1, 512]`` rows (K = V).
        indices: ``int32 [s_q, 1, topk]`` rows of ``kv``; -1, any negative value or any value
            ``>= s_kv`` is masked; any ``topk``.
        sm_scale: logit scale.
        d_v: must be 512.
        attn_sink: ``float32 [heads]`` or ``None`` (``-inf``: no effect, ``+inf``: zero output).
        topk_length: ``int32 [s_q]``: query ``i`` attends ``indices[i, :, :topk_length[i]]``.

    Returns:
        ``(out bfloat16 [s_q, heads, 512], max_logits float32 [s_q, heads], lse float32 [s_q,
        heads])``: ``max_logits`` is the largest scaled logit of the valid candidates (``-inf``
        when there is none), ``lse`` the natural-log log-sum-exp of the scaled logits without
        the sink (``+inf`` when there is none, and then the output is 0).
    """
    q, kv, indices = tensor("q", q), tensor("kv", kv), tensor("indices", indices)
    attn_sink, topk_length = optional_tensor("attn_sink", attn_sink), optional_tensor("topk_length", topk_length)
    check_ndim("q", q, 3)
    check_ndim("kv", kv, 3)
    check_ndim("indices", indices, 3)
    check_ndim("attn_sink", attn_sink, 1)
    check_ndim("topk_length", topk_length, 1)
    s_q, h_q, d_qk = q.shape
    s_kv, h_kv, _ = kv.shape
    topk = indices.shape[2]
    torch_check(d_qk in (HEAD_DIM, V32_HEAD_DIM), f"q: invalid d_qk {d_qk} (576 or 512)")
    torch_check(integer("d_v", d_v, 0) == HEAD_DIM, f"d_v: invalid {d_v} (only 512)")
    for name, t in (("kv", kv), ("indices", indices), ("attn_sink", attn_sink), ("topk_length", topk_length)):
        check_device(name, t, q.device)
    check_dtype("q", q, torch.bfloat16)
    check_dtype("kv", kv, torch.bfloat16)
    check_dtype("indices", indices, torch.int32)
    check_dtype("attn_sink", attn_sink, torch.float32)
    check_dtype("topk_length", topk_length, torch.int32)
    check_shape("q", q, s_q, h_q, d_qk)
    check_shape("kv", kv, s_kv, h_kv, d_qk)
    check_shape("indices", indices, s_q, h_kv, topk)
    check_shape("attn_sink", attn_sink, h_q)
    check_shape("topk_length", topk_length, s_q)
    for name, t in (("q", q), ("kv", kv), ("indices", indices), ("attn_sink", attn_sink), ("topk_length", topk_length)):
        check_last_dim_contiguous(name, t)
    if d_qk == V32_HEAD_DIM:
        raise ValueError("q: d_qk 576 is DeepSeek-V3.2's (K has 576 dims, V the first 512), which dsv4rs does not "
                         "implement; dsv4rs is DeepSeek-V4's (K = V, 512 dims)")
    if h_kv != 1:
        raise ValueError(f"kv: dsv4rs's sparse attention has one KV head (MQA), got h_kv = {h_kv}")
    sm_scale = finite_float("sm_scale", sm_scale)

    dev = q.device
    if s_q == 0 or topk == 0 or h_q == 0:  # no candidates anywhere
        return (torch.zeros((s_q, h_q, HEAD_DIM), dtype=torch.bfloat16, device=dev),
                torch.full((s_q, h_q), -math.inf, dtype=torch.float32, device=dev),
                torch.full((s_q, h_q), math.inf, dtype=torch.float32, device=dev))
    rows = kv[:, 0, :]
    pages = max(1, -(-s_kv // ops.PAGE_ROWS))
    if s_kv % ops.PAGE_ROWS == 0 and s_kv and rows.is_contiguous():
        cache = rows.view(pages, ops.PAGE_ROWS, HEAD_DIM)
    else:  # 64-row pages need the rows padded: one copy of kv
        cache = torch.zeros((pages * ops.PAGE_ROWS, HEAD_DIM), dtype=kv.dtype, device=dev)
        cache[:s_kv] = rows
        cache = cache.view(pages, ops.PAGE_ROWS, HEAD_DIM)
    ids = indices[:, 0, :]
    lengths = None if topk_length is None else topk_length.clamp(0, topk)
    ok = valid_ids(ids, s_kv, lengths)
    ids = torch.where(ok, ids, -1)
    qc = q.contiguous()
    try:
        out, lse = ops.sparse_attention(qc, cache, ids, finite_sink(attn_sink, h_q, dev), scale=sm_scale,
                                        out_dtype=torch.bfloat16)
    except ValueError as e:  # the cache's rows are kv's rows
        raise renamed(e, {"q": "q", "sink": "attn_sink", "cache": "kv"}) from None
    lse.masked_fill_(lse == -math.inf, math.inf)
    max_logits = torch.full((s_q, h_q), -math.inf, dtype=torch.float32, device=dev)
    _max_logits(qc, rows, ids, ok, sm_scale, max_logits)
    return out, max_logits, lse


def _max_logits(q: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, ok: torch.Tensor, scale: float,
                out: torch.Tensor) -> None:
    """``out[t, h]`` = the largest ``scale * q[t, h] . rows[ids[t, j]]`` over the ``j`` with
    ``ok[t, j]`` (``-inf`` if none), in float32, in chunks of queries."""
    t_all, heads, dim = q.shape
    k = ids.shape[1]
    if rows.shape[0] == 0:
        return
    step = max(1, GATHER_BUDGET_BYTES // (4 * k * (dim + heads)))
    for t0 in range(0, t_all, step):
        t1 = min(t_all, t0 + step)
        keys = rows[ids[t0:t1].clamp(min=0).long()].float()  # [t, K, 512]
        z = torch.matmul(q[t0:t1].float(), keys.transpose(1, 2)) * scale  # [t, H, K]
        z.masked_fill_(~ok[t0:t1, None, :], -math.inf)
        out[t0:t1] = z.amax(dim=-1)
