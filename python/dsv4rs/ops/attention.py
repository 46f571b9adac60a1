"""Sparse attention with a sink over candidate rows of paged caches (docs/model.md section 2),
CPU and GPU, and which GPU kernel runs it."""

from __future__ import annotations

import torch

from dsv4rs import _core
from dsv4rs._tensor import as_tensor, spec, stream
from dsv4rs.ops._checks import choice, cuda_index, ndim
from dsv4rs.ops.rope import ROPE_TABLES, RopeTable

ENTRY_SCALE = 512**-0.5
"""Default attention logit scale, ``head_dim ** -0.5``."""


def attention_kernel(device: torch.device | str | int = "cuda") -> str:
    """The kernel :func:`sparse_attention` launches on ``device``: ``"wgmma"`` (Hopper, compute
    capability 9.0), ``"mma"`` (the 64-head mma.sync kernel, where 220 KiB of shared memory per
    block fit) or ``"portable"`` (every sm_80+ GPU). The environment variable
    ``DSV4RS_ATTENTION_KERNEL`` (``auto``, ``wgmma``, ``mma`` or ``portable``) forces one; forcing
    one the GPU cannot run raises ValueError. The wgmma kernel runs a call of two splits that fills
    the GPU as thread-block clusters that fold the splits on chip (the same bits);
    ``DSV4RS_ATTENTION_CLUSTER`` (``auto``, ``on``: wherever a call has 2 to 8 splits, ``off``)
    chooses."""
    return _core.attention_kernel(cuda_index(device))


@torch.library.custom_op("dsv4rs::sparse_attention", mutates_args=())
def _sparse_attention(
    q: torch.Tensor, cache: torch.Tensor, indices: torch.Tensor, sink: torch.Tensor, scale: float,
    lengths: torch.Tensor | None, extra_cache: torch.Tensor | None, extra_indices: torch.Tensor | None,
    extra_lengths: torch.Tensor | None, derotate_positions: torch.Tensor | None,
    derotate_inv_freq: torch.Tensor | None, rope_table: str, out_bf16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    opt = lambda name, t: None if t is None else spec(name, t)  # noqa: E731
    workspace, direct = None, False
    if q.device.type == "cuda" and q.dim() == 3 and indices.dim() == 2:
        width = indices.shape[1] + (extra_indices.shape[1] if extra_indices is not None and extra_indices.dim() == 2 else 0)
        size = _core.attention_workspace_bytes(q.shape[0], q.shape[1], width)
        workspace = torch.empty(max(size, 16), dtype=torch.uint8, device=q.device)
        # A bfloat16 output is stored rounded by the split combine (candidates in several
        # splits) or by the wgmma kernel's bfloat16 build; other calls cast the float32 output,
        # the same bits.
        direct = out_bf16 and _core.attention_stores_bf16(cuda_index(q.device), q.shape[0], q.shape[1], width)
    out = torch.empty(q.shape, dtype=torch.bfloat16 if direct else torch.float32, device=q.device)
    _core.sparse_attention(
        spec("q", q), spec("cache", cache), spec("indices", indices), opt("lengths", lengths),
        opt("extra_cache", extra_cache), opt("extra_indices", extra_indices), opt("extra_lengths", extra_lengths),
        spec("sink", sink), scale, opt("derotate positions", derotate_positions),
        opt("derotate inv_freq", derotate_inv_freq), rope_table, spec("out", out), spec("lse", lse), opt("workspace", workspace),
        stream(q),
    )
    return (out.to(torch.bfloat16) if out_bf16 and not direct else out), lse


@_sparse_attention.register_fake
def _(
    q: torch.Tensor, cache: torch.Tensor, indices: torch.Tensor, sink: torch.Tensor, scale: float,
    lengths: torch.Tensor | None, extra_cache: torch.Tensor | None, extra_indices: torch.Tensor | None,
    extra_lengths: torch.Tensor | None, derotate_positions: torch.Tensor | None,
    derotate_inv_freq: torch.Tensor | None, rope_table: str, out_bf16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    out = q.new_empty(q.shape, dtype=torch.bfloat16 if out_bf16 else torch.float32)
    return out, q.new_empty(q.shape[:2], dtype=torch.float32)


def sparse_attention(
    q: torch.Tensor, cache: torch.Tensor, indices: torch.Tensor, sink: torch.Tensor, scale: float | None = None,
    lengths: torch.Tensor | None = None, extra_cache: torch.Tensor | None = None,
    extra_indices: torch.Tensor | None = None, extra_lengths: torch.Tensor | None = None,
    derotate: tuple[torch.Tensor, torch.Tensor] | None = None, rope_table: RopeTable = "official",
    out_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with a sink over per-query candidate rows (docs/model.md section 2), K = V = the row.

    ``out_th = sum_j exp(z_hj) e_j / (sum_j exp(z_hj) + exp(sink_h))`` with
    ``z_hj = scale * q_th . e_j``, one softmax over the valid candidates of both lists. Rows are
    decoded once per query and shared by all heads; the softmax is computed online.

    Args:
        q: ``float32``/``bfloat16 [T, H, 512]`` (any ``H >= 1``).
        cache: the rows: ``uint8 [P, 37376]`` (584-byte FP8 entries, :func:`new_kv_cache`) or
            plain ``bfloat16``/``float32 [P, 64, 512]``.
        indices: ``int32``/``int64 [T, K]`` cache rows (``page * 64 + offset``), ``-1`` masked;
            a repeated row counts each time; other rows outside the cache raise IndexError.
        sink: ``float32 [H]``, unscaled.
        scale: logit scale, default ``512 ** -0.5``.
        lengths: ``int32 [T]``: only the first ``lengths[t]`` columns of ``indices`` count.
        extra_cache, extra_indices, extra_lengths: a second candidate list in its own cache
            (e.g. the sliding window beside the compressed rows), joining the same softmax.
        derotate: ``(positions int64 [T], inv_freq)``: inverse RoPE of each head's output at
            the query position (the last ``2 * len(inv_freq)`` dims).
        rope_table: how that rotation's angles are computed (:data:`dsv4rs.ops.rope.ROPE_TABLES`).
        out_dtype: ``torch.float32`` or ``torch.bfloat16``: the output as computed (float32), or
            rounded to nearest even, the same bits as ``out.to(torch.bfloat16)``. On a GPU a call
            whose candidates go in several splits (few queries) has the split combine store it so,
            and on the wgmma kernel (Hopper) every call stores it so, without the float32 tensor
            and the cast; other calls cast.

    Returns:
        ``(out [T, H, 512] of out_dtype, lse float32 [T, H])``: ``lse`` is the log-sum-exp of the
        candidates' logits without the sink; a query without candidates gets ``-inf`` and a zero
        output.
    """
    q = as_tensor("q", q)
    ndim("q", q, 3)
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"out_dtype: expected torch.float32 or torch.bfloat16, got {out_dtype!r}")
    if (extra_cache is None) != (extra_indices is None):
        raise ValueError("extra_cache, extra_indices: give both or neither")
    if extra_lengths is not None and extra_indices is None:
        raise ValueError("extra_lengths: needs extra_cache and extra_indices")
    opt = lambda name, t: None if t is None else as_tensor(name, t)  # noqa: E731
    if derotate is not None and (not isinstance(derotate, (tuple, list)) or len(derotate) != 2
                                 or any(t is None for t in derotate)):
        raise ValueError("derotate: expected (positions, inv_freq), both tensors, or None")
    positions, inv_freq = (None, None) if derotate is None else derotate
    rope_table = choice("rope_table", rope_table, ROPE_TABLES)
    return _sparse_attention(
        q, as_tensor("cache", cache), as_tensor("indices", indices), as_tensor("sink", sink),
        ENTRY_SCALE if scale is None else float(scale), opt("lengths", lengths), opt("extra_cache", extra_cache),
        opt("extra_indices", extra_indices), opt("extra_lengths", extra_lengths), opt("positions", positions),
        opt("inv_freq", inv_freq), rope_table, out_dtype == torch.bfloat16,
    )
