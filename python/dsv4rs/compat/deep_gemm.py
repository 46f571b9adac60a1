"""DeepGEMM's calling convention for the Lightning Indexer over a paged FP8 key cache, on dsv4rs's
ops; and the fused top-k that makes the logits matrix unnecessary.

Drop-in for the two entry points an inference stack calls around its own top-k (``import
dsv4rs.compat.deep_gemm as deep_gemm``): :func:`get_paged_mqa_logits_metadata` and
:func:`fp8_paged_mqa_logits`, with DeepGEMM's argument names, order and defaults (its legacy
Python API, ``csrc/apis/attention.hpp`` of deepseek-ai/DeepGEMM) and the result its reference
defines (``ref_paged_mqa_logits`` in ``tests/test_attention.py``):

- ``q``: ``float8_e4m3fn [batch, next_n, heads, 128]`` (no query scale: the caller folds it into
  ``weights``); ``weights``: ``float32 [batch * next_n, heads]``;
- ``kv_cache``: ``uint8 [num_blocks, block_kv, 1, 132]``: per page, every key's 128 FP8 e4m3
  bytes, then every key's float32 scale (dsv4rs's 132-byte FP8 indexer keys, docs/model.md
  section 5, are this layout);
- ``context_lens``: ``int32 [batch, next_n]`` (DeepGEMM's current form: query ``(b, j)`` sees
  keys ``s < context_lens[b, j]``) or ``int32 [batch]`` (its earlier form: query ``(b, j)`` sees
  ``s <= context_lens[b] - next_n + j``);
- ``block_table``: ``int32 [batch, max_blocks]``: key ``s`` of batch ``b`` is row
  ``s % block_kv`` of page ``block_table[b, s // block_kv]``;
- result: ``float32 [batch * next_n, max_context_len]``,
  ``logits[b * next_n + j, s] = sum_h weights[., h] * relu(q[b, j, h] . k_s)`` for the visible
  ``s`` and ``-inf`` everywhere else. (DeepGEMM leaves the columns past a query's context
  unwritten unless ``clean_logits``; dsv4rs always writes ``-inf`` there, which is what
  ``clean_logits`` gives, so ``clean_logits`` changes nothing. DeepGEMM's result is a view with
  rows padded to 1024 bytes; dsv4rs's is contiguous.)

Where DeepGEMM refuses, dsv4rs accepts: any number of heads (DeepGEMM: 32 or 64 on sm_90,
8-64 on sm_100), any ``block_kv`` (DeepGEMM: 64 on sm_90, 32 or 64 on sm_100), ``next_n`` of
any size, both forms of ``context_lens`` with any flag, every GPU from sm_80 and the CPU. The key
dim must be 128 (dsv4rs's indexer keys). Arguments DeepGEMM rejects raise
:class:`~dsv4rs.compat.CompatRuntimeError` (a RuntimeError, as DeepGEMM's host asserts surface in
Python; also a ValueError).

:func:`fp8_paged_mqa_logits` is the compatibility path: it materializes what DeepGEMM does, a
``[batch * next_n, max_context_len]`` float32 matrix, from torch ops over the keys
:func:`dsv4rs.ops.index_key_read` decodes (a tile of key positions at a time, at most
:data:`~dsv4rs.compat._common.GATHER_BUDGET_BYTES` of temporaries), on the CPU and the GPU alike.
Its cost is that of any logits path (O(batch x next_n x heads x context) multiply-adds and the
matrix in memory), plus the decoded keys (512 bytes a key a tile). The fast path is
:func:`paged_indexer_topk`: the same scores, selected by dsv4rs's fused kernel
(:func:`dsv4rs.ops.indexer_topk`), which never stores them (memory ``O(queries x k)``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from dsv4rs import ops
from dsv4rs.compat._common import (
    GATHER_BUDGET_BYTES,
    INDEX_KEY_FP4,
    INDEX_KEY_FP8,
    PagedCache,
    RowFormat,
    check_contiguous,
    check_device,
    check_dtype,
    check_ndim,
    flag,
    integer,
    renamed,
    tensor,
    torch_check,
)

__all__ = ["fp8_paged_mqa_logits", "get_paged_mqa_logits_metadata", "paged_indexer_topk"]

HEAD_DIM = ops.INDEX_DIM
"""Width of an indexer query and key."""
_KEY_FORMATS: dict[int, tuple[RowFormat, str]] = {
    INDEX_KEY_FP8.row_bytes: (INDEX_KEY_FP8, "fp8"),
    INDEX_KEY_FP4.row_bytes: (INDEX_KEY_FP4, "fp4"),
}


MAX_SMS = 1 << 16
"""Largest ``num_sms`` taken (a GPU's SM count; the handle has ``num_sms + 1`` rows)."""


def get_paged_mqa_logits_metadata(
    context_lens: torch.Tensor, block_kv: int, num_sms: int, indices: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The schedule handle :func:`fp8_paged_mqa_logits` takes: ``int32 [num_sms + 1, 2]`` on
    ``context_lens``' device, as DeepGEMM returns it. dsv4rs schedules its work itself, so the
    handle holds zeros and is only checked for its shape; computing it costs one small
    allocation (no kernel, no synchronization).

    Args:
        context_lens: ``int32 [batch, next_n]`` or ``int32 [batch]``, contiguous.
        block_kv: rows per page of the key cache (any ``>= 1``).
        num_sms: rows of the handle minus one (DeepGEMM: the GPU's SM count; at most :data:`MAX_SMS`).
        indices: optional ``int32 [batch]`` (DeepGEMM's varlen form, ``next_n == 1``).
    """
    context_lens = tensor("context_lens", context_lens)
    torch_check(context_lens.dim() in (1, 2), f"context_lens: expected a 1-d or 2-d tensor, got shape "
                f"{list(context_lens.shape)}")
    check_dtype("context_lens", context_lens, torch.int32)
    check_contiguous("context_lens", context_lens)
    integer("block_kv", block_kv, 1)
    integer("num_sms", num_sms, 1, MAX_SMS)
    if indices is not None:
        _check_varlen(tensor("indices", indices), context_lens)
    return torch.zeros((num_sms + 1, 2), dtype=torch.int32, device=context_lens.device)


def _check_varlen(indices: torch.Tensor, context_lens: torch.Tensor) -> None:
    batch = context_lens.shape[0]
    next_n = context_lens.shape[1] if context_lens.dim() == 2 else 1
    torch_check(next_n == 1, "indices: the varlen form needs next_n == 1")
    torch_check(indices.dim() == 1 and indices.shape[0] == batch,
                f"indices: expected shape [{batch}], got {list(indices.shape)}")
    check_dtype("indices", indices, torch.int32)
    check_contiguous("indices", indices)
    check_device("indices", indices, context_lens.device)


def fp8_paged_mqa_logits(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    weights: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
    schedule_meta: torch.Tensor,
    max_context_len: int,
    clean_logits: bool = False,
    indices: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The indexer's logits of every visible key, DeepGEMM's ``fp8_paged_mqa_logits``.

    Args:
        q: ``float8_e4m3fn [batch, next_n, heads, 128]``, contiguous (any ``heads``).
        kv_cache: ``uint8 [num_blocks, block_kv, 1, 132]`` FP8 keys (any ``block_kv``;
            ``stride(1) == 132``).
        weights: ``float32 [batch * next_n, heads]``, contiguous.
        context_lens: ``int32 [batch, next_n]`` (keys ``< context_lens[b, j]``) or ``[batch]``
            (keys ``<= context_lens[b] - next_n + j``).
        block_table: ``int32 [batch, max_blocks]``, last dim contiguous.
        schedule_meta: from :func:`get_paged_mqa_logits_metadata` (``int32 [n + 1, 2]``).
        max_context_len: columns of the result (at least the longest context).
        clean_logits: accepted; the columns past a context are always ``-inf``.
        indices: optional ``int32 [batch]`` (varlen form, ``next_n == 1``): the sequence of each
            row; its rows of ``block_table`` are used as given.

    Returns:
        ``float32 [batch * next_n, max_context_len]``: ``sum_h weights[r, h] *
        relu(q[b, j, h] . k_s)`` (row ``r = b * next_n + j``) for the keys query ``(b, j)`` sees,
        ``-inf`` for the others. On the CPU a logit the float32 sums overflow raises ValueError
        naming ``q, weights, kv_cache``, as :func:`dsv4rs.ops.indexer_scores` does (a GPU does
        not look).
    """
    flag("clean_logits", clean_logits)
    q, kv_cache, weights = tensor("q", q), tensor("kv_cache", kv_cache), tensor("weights", weights)
    context_lens, block_table = tensor("context_lens", context_lens), tensor("block_table", block_table)
    schedule_meta = tensor("schedule_meta", schedule_meta)
    check_ndim("q", q, 4)
    check_dtype("q", q, torch.float8_e4m3fn)
    check_contiguous("q", q)
    batch, next_n, heads, dim = q.shape
    fmt, kind = _check_common(q, kv_cache, weights, context_lens, block_table, (INDEX_KEY_FP8.row_bytes,))
    check_ndim("schedule_meta", schedule_meta, 2)
    torch_check(schedule_meta.shape[1] == 2, f"schedule_meta: expected shape [num_sms + 1, 2], got "
                f"{list(schedule_meta.shape)}")
    check_dtype("schedule_meta", schedule_meta, torch.int32)
    check_contiguous("schedule_meta", schedule_meta)
    if indices is not None:
        _check_varlen(tensor("indices", indices), context_lens)
    integer("max_context_len", max_context_len, 0)

    cache = PagedCache("kv_cache", kv_cache, fmt)
    visible = _visible(context_lens, batch, next_n).clamp(max=max_context_len)  # [B * n]
    last = visible.view(batch, next_n).amax(dim=1)  # keys each batch's queries need
    logits = torch.empty((batch * next_n, max_context_len), dtype=torch.float32, device=q.device)
    qf = q.view(batch, next_n * heads, dim).float()
    w = weights.view(batch, next_n, heads, 1)
    native = cache.native()
    per_column = 4 * batch * (next_n * heads + 2 * dim)
    step = max(ops.PAGE_ROWS, GATHER_BUDGET_BYTES // per_column // ops.PAGE_ROWS * ops.PAGE_ROWS)
    for c0 in range(0, max_context_len, step):
        c1 = min(max_context_len, c0 + step)
        pos = torch.arange(c0, c1, device=q.device)
        rows = _key_rows(block_table, pos, cache, last)  # [B, C], -1 where not needed
        keys = _read_keys(cache, native, rows, kind)  # [B, C, 128] float32
        if keys.device.type == "cpu":  # as ops.indexer_topk, refuse corrupt keys (values unchecked on a GPU)
            bad = ~torch.isfinite(keys).all(dim=-1)
            if bad.any():
                raise ValueError(f"kv_cache: row {int(rows[bad][0])} holds a non-finite value")
        scores = torch.bmm(qf, keys.transpose(1, 2)).relu_().view(batch, next_n, heads, c1 - c0)
        tile = (scores * w).sum(dim=2).view(batch * next_n, c1 - c0)
        seen = pos[None, :] < visible[:, None]
        if tile.device.type == "cpu" and (seen & ~tile.isfinite()).any():  # as ops.indexer_scores
            raise ValueError("q, weights, kv_cache: the float32 sums overflow (a logit is not finite): values or "
                             "scales too large")
        logits[:, c0:c1] = tile.masked_fill_(~seen, -math.inf)
    return logits


def _check_common(q, kv_cache, weights, context_lens, block_table, row_bytes: tuple[int, ...]):
    """Checks shared by the logits and the fused top-k; returns the key format and its name."""
    batch, next_n, heads, dim = q.shape
    torch_check(next_n >= 1, "q: next_n must be >= 1")
    torch_check(dim in (32, 64, 128), f"q: head dim must be 32, 64 or 128, got {dim}")
    if dim != HEAD_DIM:
        raise ValueError(f"q: dsv4rs's indexer keys have {HEAD_DIM} dims, got head dim {dim}")
    check_ndim("kv_cache", kv_cache, 4)
    num_blocks, block_kv, heads_kv, key_bytes = kv_cache.shape
    check_dtype("kv_cache", kv_cache, torch.uint8)
    torch_check(heads_kv == 1 and key_bytes in row_bytes,
                f"kv_cache: expected shape [num_blocks, block_kv, 1, {' or '.join(map(str, row_bytes))}], "
                f"got {list(kv_cache.shape)}")
    torch_check((block_kv < 2 or kv_cache.stride(1) == key_bytes) and kv_cache.stride(3) == 1,
                f"kv_cache: a page's rows must be contiguous, got strides {list(kv_cache.stride())}")
    torch_check(num_blocks < 2 or kv_cache.stride(0) % 4 == 0, "kv_cache: stride(0) must be a multiple of 4 bytes")
    if block_kv == 0:
        raise ValueError("kv_cache: block_kv must be >= 1")
    fmt, kind = _KEY_FORMATS[key_bytes]
    PagedCache.check("kv_cache", kv_cache, fmt)
    check_ndim("weights", weights, 2)
    torch_check(tuple(weights.shape) == (batch * next_n, heads),
                f"weights: expected shape [{batch * next_n}, {heads}], got {list(weights.shape)}")
    check_dtype("weights", weights, torch.float32)
    check_contiguous("weights", weights)
    check_ndim("block_table", block_table, 2)
    torch_check(block_table.shape[0] == batch, f"block_table: expected {batch} rows, got {block_table.shape[0]}")
    torch_check(block_table.shape[1] < 2 or block_table.stride(1) == 1, "block_table: the last dim must be contiguous")
    check_dtype("block_table", block_table, torch.int32)
    torch_check(context_lens.dim() in (1, 2), f"context_lens: expected [batch, next_n] or [batch], got shape "
                f"{list(context_lens.shape)}")
    want = (batch, next_n) if context_lens.dim() == 2 else (batch,)
    torch_check(tuple(context_lens.shape) == want, f"context_lens: expected shape {list(want)}, got "
                f"{list(context_lens.shape)}")
    check_dtype("context_lens", context_lens, torch.int32)
    check_contiguous("context_lens", context_lens)
    for name, t in (("kv_cache", kv_cache), ("weights", weights), ("context_lens", context_lens),
                    ("block_table", block_table)):
        check_device(name, t, q.device)
    return fmt, kind


def _visible(context_lens: torch.Tensor, batch: int, next_n: int) -> torch.Tensor:
    """Keys each query sees, ``int64 [batch * next_n]`` (row ``b * next_n + j``), at least 0."""
    if context_lens.dim() == 2:
        v = context_lens.reshape(-1).long()
    else:
        v = (context_lens.long()[:, None] - next_n + 1 + torch.arange(next_n, device=context_lens.device)).reshape(-1)
    return v.clamp(min=0)


def _key_rows(block_table: torch.Tensor, pos: torch.Tensor, cache: PagedCache, last: torch.Tensor) -> torch.Tensor:
    """Cache rows of key positions ``pos`` (``[C]``) of every batch (``[B, C]``), -1 where a batch
    does not need the key (``pos >= last[b]``) or its page is not a page of the cache."""
    blocks = block_table.shape[1]
    if blocks == 0:
        return torch.full((block_table.shape[0], pos.shape[0]), -1, dtype=torch.int64, device=pos.device)
    blk = pos // cache.page_rows
    pages = block_table[:, blk.clamp(max=blocks - 1)].long()
    rows = pages * cache.page_rows + pos % cache.page_rows
    need = (pos[None, :] < last[:, None]) & (blk < blocks)[None, :] & (pages >= 0) & (pages < cache.num_pages)
    return torch.where(need, rows, -1)


def _read_keys(cache: PagedCache, native: torch.Tensor | None, rows: torch.Tensor, kind: str) -> torch.Tensor:
    """The keys at ``rows`` (``[B, C]``, -1 reads zeros) decoded to ``float32 [B, C, 128]`` by
    :func:`dsv4rs.ops.index_key_read`; a cache not in dsv4rs's page layout has the rows gathered
    into one that is first."""
    flat = rows.reshape(-1)
    if native is None:
        native = cache.gather(flat.clamp(min=0))
        flat = torch.where(flat >= 0, torch.arange(flat.numel(), device=flat.device), -1)
    return ops.index_key_read(native, flat, kind).view(*rows.shape, HEAD_DIM)


def paged_indexer_topk(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    weights: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
    topk: int,
    *,
    return_scores: bool = False,
    physical: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The top-k keys by the indexer's score, fused: what a stack computes as
    ``fp8_paged_mqa_logits`` followed by a top-k over its rows, without the logits matrix.

    The inputs are :func:`fp8_paged_mqa_logits`' (the schedule, ``max_context_len`` and the flags
    are not needed). The scores are computed a key tile at a time by
    :func:`dsv4rs.ops.indexer_topk` and never stored for all keys: memory is ``O(batch x next_n
    x topk)`` whatever the context, and the logits' write and read disappear.

    Args:
        q: ``[batch, next_n, heads, 128]``: ``float8_e4m3fn`` (as DeepGEMM takes it; converted
            to bfloat16 exactly), ``bfloat16`` or ``float32``.
        kv_cache: ``uint8 [num_blocks, block_kv, 1, 132]`` (FP8 keys, DeepGEMM's layout) or
            ``[..., 68]`` (dsv4rs's FP4 keys, docs/model.md section 5). Pages of 64 keys packed
            back to back are read in place; any other page size or stride is gathered into
            64-key pages first (a copy of every sequence's keys).
        weights, context_lens, block_table: as :func:`fp8_paged_mqa_logits` takes them.
        topk: keys to select per query (any ``>= 1``).
        return_scores: also return the selected scores.
        physical: return cache rows (``block_table[b, s // block_kv] * block_kv + s % block_kv``,
            what FlashMLA's ``indices`` take when the attention cache shares the key cache's
            pages) instead of key positions ``s``.

    Returns:
        ``int32 [batch * next_n, topk]``: the visible keys of the ``topk`` largest scores, score
        descending, ties to the lower position, ``-1`` past the visible count; with
        ``return_scores``, also ``float32 [batch * next_n, topk]`` (``-inf`` padding).
    """
    return_scores, physical = flag("return_scores", return_scores), flag("physical", physical)
    q, kv_cache, weights = tensor("q", q), tensor("kv_cache", kv_cache), tensor("weights", weights)
    context_lens, block_table = tensor("context_lens", context_lens), tensor("block_table", block_table)
    check_ndim("q", q, 4)
    check_dtype("q", q, torch.float8_e4m3fn, torch.bfloat16, torch.float32)
    fmt, kind = _check_common(q, kv_cache, weights, context_lens, block_table,
                              (INDEX_KEY_FP8.row_bytes, INDEX_KEY_FP4.row_bytes))
    topk = integer("topk", topk, 1)
    batch, next_n, heads, dim = q.shape
    cache = PagedCache("kv_cache", kv_cache, fmt)
    blocks = block_table.shape[1]
    capacity = blocks * cache.page_rows
    visible = _visible(context_lens, batch, next_n).clamp(max=capacity)
    qr = q.reshape(batch * next_n, heads, dim)
    qr = qr.to(torch.bfloat16) if qr.dtype == torch.float8_e4m3fn else qr.contiguous()
    seq_ids = torch.arange(batch, dtype=torch.int32, device=q.device).repeat_interleave(next_n)
    native = cache.native()
    origin = None  # the engine cache's row of each row of a gathered key cache
    if native is not None:
        table, key_cache = block_table.contiguous(), native
    else:
        # Every sequence's keys, gathered into 64-key pages in order: key s of batch b is row
        # b * width + s of the gathered cache.
        width = max(ops.PAGE_ROWS, -(-capacity // ops.PAGE_ROWS) * ops.PAGE_ROWS)
        pos = torch.arange(width, device=q.device)
        rows = _key_rows(block_table, pos, cache, torch.full((batch,), capacity, device=q.device))
        origin = rows.reshape(-1).clamp(min=0)
        key_cache = cache.gather(origin)
        pages = width // ops.PAGE_ROWS
        table = torch.arange(batch * pages, dtype=torch.int32, device=q.device).view(batch, pages)
    try:
        found = ops.indexer_topk(qr, weights, key_cache, table, seq_ids, visible, topk, return_scores=True)
    except ValueError as e:  # (the CPU's value checks) in DeepGEMM's argument names and rows
        raise renamed(e, {"q": "q", "weights": "weights", "key_cache": "kv_cache", "k": "topk"},
                      {"key_cache": origin} if origin is not None else None) from None
    idx, scores = found
    if physical:
        logical = idx.long()
        page = block_table[seq_ids.long()].long().gather(1, (logical // cache.page_rows).clamp(min=0, max=max(blocks - 1, 0)))
        idx = torch.where(logical >= 0, page * cache.page_rows + logical % cache.page_rows, -1).to(torch.int32)
    return (idx, scores) if return_scores else idx
