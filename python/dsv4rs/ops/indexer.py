"""The Lightning Indexer over a paged key cache (docs/model.md section 4), CPU and GPU: its top-k
(fused, or ``torch.topk`` over the dense scores) and its dense scores."""

from __future__ import annotations

from typing import Literal

import torch

from dsv4rs import _core
from dsv4rs._tensor import as_tensor, spec, stream
from dsv4rs.ops._checks import choice, flag, ndim, positive
from dsv4rs.ops.formats import PAGE_ROWS

TieBreak = Literal["lower", "torch"]
TIE_BREAKS: tuple[str, ...] = ("lower", "torch")
"""How :func:`indexer_topk` orders exactly equal scores (docs/model.md section 4)."""


@torch.library.custom_op("dsv4rs::indexer_topk", mutates_args=())
def _indexer_topk(
    q: torch.Tensor, weights: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor,
    seq_ids: torch.Tensor, visible: torch.Tensor, k: int, physical: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    indices = torch.empty((q.shape[0], k), dtype=torch.int32, device=q.device)
    scores = torch.empty((q.shape[0], k), dtype=torch.float32, device=q.device)
    workspace = None
    if q.device.type == "cuda" and q.dim() == 3 and block_table.dim() == 2:
        size = _core.indexer_workspace_bytes(q.shape[0], block_table.shape[1] * PAGE_ROWS, k)
        workspace = torch.empty(size, dtype=torch.uint8, device=q.device)
    _core.indexer_topk(
        spec("q", q), spec("weights", weights), spec("key_cache", key_cache), spec("block_table", block_table),
        spec("seq_ids", seq_ids), spec("visible", visible), spec("indices", indices), spec("scores", scores),
        k, physical, None if workspace is None else spec("workspace", workspace), stream(q),
    )
    return indices, scores


@_indexer_topk.register_fake
def _(
    q: torch.Tensor, weights: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor,
    seq_ids: torch.Tensor, visible: torch.Tensor, k: int, physical: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return q.new_empty((q.shape[0], k), dtype=torch.int32), q.new_empty((q.shape[0], k), dtype=torch.float32)


@torch.library.custom_op("dsv4rs::indexer_scores", mutates_args=())
def _indexer_scores(
    q: torch.Tensor, weights: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor,
    seq_ids: torch.Tensor, visible: torch.Tensor, width: int,
) -> torch.Tensor:
    scores = torch.empty((q.shape[0], width), dtype=torch.float32, device=q.device)
    _core.indexer_scores(
        spec("q", q), spec("weights", weights), spec("key_cache", key_cache), spec("block_table", block_table),
        spec("seq_ids", seq_ids), spec("visible", visible), spec("scores", scores), stream(q),
    )
    return scores


@_indexer_scores.register_fake
def _(
    q: torch.Tensor, weights: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor,
    seq_ids: torch.Tensor, visible: torch.Tensor, width: int,
) -> torch.Tensor:
    return q.new_empty((q.shape[0], width), dtype=torch.float32)


def indexer_scores(
    q: torch.Tensor, weights: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor,
    seq_ids: torch.Tensor, visible: torch.Tensor, width: int | None = None,
) -> torch.Tensor:
    """The Lightning Indexer's scores ``I_ts = sum_h w_th ReLU(q_th . k_s)`` (docs/model.md
    section 4), dense: what :func:`indexer_topk` ranks, for a caller that selects itself (e.g.
    with ``torch.topk``, as transformers and DeepSeek's reference do). Memory ``O(T * width)``.

    Arguments as :func:`indexer_topk`, and ``width``: the row width, an int ``>= 1``, default
    ``block_table.shape[1] * 64`` (every key the block table maps), at most that or 4,096 (the
    most keys a selection takes, ``_core.MAX_TOPK``), whichever is larger: columns past the
    mapped keys are ``-inf`` padding, there for a top-k wider than the table. Every visible key
    must fit: ``visible[t] <= width`` (on the CPU a larger value raises ValueError naming ``visible``; a
    GPU does not check, and leaves keys past ``width`` unscored). Scores that overflow float32
    raise on the CPU as in :func:`indexer_topk`.

    Returns:
        ``float32 [T, width]``: row ``t`` holds the score of each key ``s < visible[t]`` of
        query ``t``'s sequence, bit for bit the score :func:`indexer_topk` computes for it on the
        same device, and ``-inf`` for ``s >= visible[t]`` (on a GPU also for keys on pages
        outside the cache, which the GPU skips).
    """
    q = as_tensor("q", q)
    ndim("q", q, 3)
    block_table = as_tensor("block_table", block_table)
    ndim("block_table", block_table, 2)
    mapped = block_table.shape[1] * PAGE_ROWS
    width = mapped if width is None else positive("width", width, max(mapped, _core.MAX_TOPK))
    return _indexer_scores(
        q, as_tensor("weights", weights), as_tensor("key_cache", key_cache), block_table,
        as_tensor("seq_ids", seq_ids), as_tensor("visible", visible), width,
    )


def _select_with_torch(
    scores: torch.Tensor, k: int, block_table: torch.Tensor, seq_ids: torch.Tensor, physical: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk`` of each row of dense ``scores``, in :func:`indexer_topk`'s layout."""
    kept = min(k, scores.shape[1])
    top = torch.topk(scores, kept, dim=1)
    # Every key a query does not see scores -inf, and every key it sees a finite score: the -inf
    # picks are exactly the slots past min(k, visible[t]).
    unseen = torch.isneginf(top.values)
    indices = torch.full((scores.shape[0], k), -1, dtype=torch.int32, device=scores.device)
    values = torch.full((scores.shape[0], k), float("-inf"), dtype=torch.float32, device=scores.device)
    keys = top.indices.masked_fill(unseen, 0)
    if physical:
        pages = block_table[seq_ids.long()[:, None], keys // PAGE_ROWS].long()
        keys = pages * PAGE_ROWS + keys % PAGE_ROWS
    indices[:, :kept] = keys.masked_fill(unseen, -1).int()
    values[:, :kept] = top.values
    return indices, values


def indexer_topk(
    q: torch.Tensor, weights: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor,
    seq_ids: torch.Tensor, visible: torch.Tensor, k: int, return_scores: bool = False, physical: bool = False,
    tie_break: TieBreak = "lower",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The Lightning Indexer's selection (docs/model.md section 4): the top ``k`` keys of each
    query by ``I_ts = sum_h w_th ReLU(q_th . k_s)``.

    On CUDA tensors the scores come from a ``wgmma`` kernel on compute capability 9.0 (H100,
    H200) and an ``mma.sync`` one on other GPUs; ``DSV4RS_INDEXER_KERNEL`` (``auto``, ``wgmma``
    or ``mma``) forces one, forcing one the GPU cannot run raising ``ValueError``. Their scores
    agree to float32 summation order, and :func:`indexer_scores` takes the same kernel as this
    op (docs/kernels/indexer.md).

    Out of range: on the CPU, a score that is not finite (finite queries, weights and keys whose
    float32 sums overflowed) raises ValueError naming ``q, weights, key_cache``; a GPU does not
    look (that would synchronize the host) and ranks such scores as they come. A key that is
    not finite raises ValueError naming ``key_cache`` on the CPU.

    Args:
        q: ``float32``/``bfloat16 [T, H, 128]`` indexer queries (any ``H >= 1``).
        weights: ``float32 [T, H]`` head weights ``w_t``.
        key_cache: paged indexer keys, 64 rows a page: ``uint8 [P, 64 * 68]`` (FP4, see
            :func:`new_index_key_cache`), ``uint8 [P, 64 * 132]`` (FP8), or plain
            ``bfloat16``/``float32 [P, 64, 128]``.
        block_table: ``int32 [B, max_pages]``: key ``s`` of sequence ``b`` is row ``s % 64`` of
            page ``block_table[b, s // 64]``.
        seq_ids: ``int32``/``int64 [T]``, the sequence of each query.
        visible: ``int32``/``int64 [T]``, how many keys of its sequence each query sees
            (at most ``max_pages * 64``).
        k: keys to select, at most 4096 (``_core.MAX_TOPK``; V4 selects 512 or 1024).
        return_scores: also return the selected scores.
        physical: return cache rows (``page * 64 + offset``) instead of key numbers.
        tie_break: the order among exactly equal scores. ``"lower"`` (the default): the lower
            key first, fused: scores are computed a key tile at a time and never stored for all
            keys, memory ``O(T * k)`` whatever the context. ``"torch"``: ``torch.topk`` over the
            rows of :func:`indexer_scores` (``block_table.shape[1] * 64`` wide), as transformers
            and DeepSeek's reference select, whose order among ties is torch's own (it depends
            on the device and the row width); memory ``O(T * max_pages * 64)``. Outside exact
            ties both select the same keys in the same order, with the same scores.

    Returns:
        ``int32 [T, k]``: the top ``min(k, visible[t])`` keys by score, descending, then ``-1``;
        with ``return_scores``, also ``float32 [T, k]`` (``-inf`` padding).
    """
    k = positive("k", k, _core.MAX_TOPK)
    return_scores, physical = flag("return_scores", return_scores), flag("physical", physical)
    tie_break = choice("tie_break", tie_break, TIE_BREAKS)
    q = as_tensor("q", q)
    ndim("q", q, 3)
    args = (q, as_tensor("weights", weights), as_tensor("key_cache", key_cache), as_tensor("block_table", block_table),
            as_tensor("seq_ids", seq_ids), as_tensor("visible", visible))
    if tie_break == "lower":
        indices, scores = _indexer_topk(*args, k, physical)
    else:
        indices, scores = _select_with_torch(indexer_scores(*args), k, args[3], args[4], physical)
    return (indices, scores) if return_scores else indices
