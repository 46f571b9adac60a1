"""The CSA/HCA compressor (docs/model.md section 3), CPU and GPU: one op for prefill and decode."""

from __future__ import annotations

from typing import Literal

import torch

from dsv4rs import _core
from dsv4rs._tensor import as_tensor, disjoint, spec, stream
from dsv4rs.ops._checks import INT64_MAX, choice, ndim, positive
from dsv4rs.ops.rope import ROPE_TABLES, RopeTable

Quant = Literal["none", "fp8", "fp4"]


def compressor_state(ratio: int, dim: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Empty decode state of a compressor (docs/model.md section 3): ``(kv_state, score_state)``, both
    ``float32 [coff * ratio, coff * dim]`` (``coff`` = 2 for ratio 4, else 1), kv zeros and
    scores ``-inf``. :func:`compress` advances it in place."""
    ratio, dim = positive("ratio", ratio), positive("dim", dim)
    coff = 2 if ratio == 4 else 1
    shape = (coff * ratio, coff * dim)
    return (
        torch.zeros(shape, dtype=torch.float32, device=device),
        torch.full(shape, float("-inf"), dtype=torch.float32, device=device),
    )


def _entries_completed(start_pos: int, tokens: int, ratio: int) -> int:
    return (start_pos + tokens) // ratio - start_pos // ratio


@torch.library.custom_op("dsv4rs::compress", mutates_args=("kv_state", "score_state"))
def _compress(
    kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor, inv_freq: torch.Tensor,
    kv_state: torch.Tensor, score_state: torch.Tensor, start_pos: int, ratio: int, eps: float, quant: str,
    rope_table: str,
) -> torch.Tensor:
    n = _entries_completed(start_pos, kv.shape[0], ratio)
    out = torch.empty((n, norm_weight.shape[0]), dtype=torch.float32, device=kv.device)
    _core.compress(
        spec("kv", kv), spec("score", score), spec("ape", ape), spec("norm_weight", norm_weight),
        spec("inv_freq", inv_freq), spec("kv_state", kv_state), spec("score_state", score_state), spec("out", out),
        start_pos, ratio, eps, quant, rope_table, stream(kv),
    )
    return out


@_compress.register_fake
def _(
    kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor, inv_freq: torch.Tensor,
    kv_state: torch.Tensor, score_state: torch.Tensor, start_pos: int, ratio: int, eps: float, quant: str,
    rope_table: str,
) -> torch.Tensor:
    n = _entries_completed(start_pos, kv.shape[0], ratio)
    return kv.new_empty((n, norm_weight.shape[0]), dtype=torch.float32)


def compress(
    kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor, inv_freq: torch.Tensor,
    kv_state: torch.Tensor, score_state: torch.Tensor, start_pos: int, ratio: int, eps: float = 1e-6,
    quant: Quant = "none", rope_table: RopeTable = "official",
) -> torch.Tensor:
    """Feeds tokens ``start_pos .. start_pos + S - 1`` to a compressor (docs/model.md section 3) and
    returns the entries they complete. One form serves prefill (all tokens at once) and decode
    (one token a call): any split of a sequence into calls gives the same entries, bit for bit.

    Args:
        kv, score: ``float32 [S, coff * D]`` (or both ``bfloat16``: widened exactly as they are
            read, the same entries as their float32 copies), the projections ``W_kv x`` and ``W_gate x``
            (``coff`` = 2 for ratio 4, whose entries overlap, else 1).
        ape: ``float32 [ratio, coff * D]`` positional bias of the logits.
        norm_weight: ``float32 [D]`` RMSNorm weight.
        inv_freq: ``float32``/``float64 [R/2]``, RoPE on the last ``R`` dims at position
            ``ratio * i`` for entry ``i``.
        kv_state, score_state: the sequence's state from :func:`compressor_state`, advanced in
            place; ``start_pos`` must be the number of tokens it has seen.
        start_pos: position of the first token.
        ratio: compression ratio (4: CSA, 128: HCA; any ``>= 1``).
        eps: RMSNorm epsilon.
        quant: ``"none"``; ``"fp8"``, the round trip through the 584-byte cache entry (D = 512);
            or ``"fp4"``, Hadamard-128 then the FP4 indexer-key round trip (D = 128).
        rope_table: how the RoPE angles' sines and cosines are computed
            (:data:`dsv4rs.ops.rope.ROPE_TABLES`).

    Returns:
        ``float32 [E, D]``: entries ``start_pos // ratio ..``, one for each position ``p`` of
        the call with ``(p + 1) % ratio == 0``, pooled, RMS-normalized (in float32, without
        the bf16 cast docs/model.md section 3 puts before the norm, as ``reference.compressor_prefill``),
        rotated and quantized. Scores may hold ``-inf`` (a token without a
        vote); other non-finite inputs raise before the state changes.
    """
    ratio = positive("ratio", ratio)
    if isinstance(start_pos, bool) or not isinstance(start_pos, int) or not 0 <= start_pos <= INT64_MAX:
        raise ValueError(f"start_pos: expected an int in [0, 2^63), got {start_pos!r}")
    if quant not in ("none", "fp8", "fp4"):
        raise ValueError(f'quant: expected "none", "fp8" or "fp4", got {quant!r}')
    args = [as_tensor(n, t) for n, t in (("kv", kv), ("score", score), ("ape", ape), ("norm_weight", norm_weight),
                                         ("inv_freq", inv_freq), ("kv_state", kv_state), ("score_state", score_state))]
    ndim("kv", args[0], 2)
    ndim("norm_weight", args[3], 1)
    named = list(zip(("kv", "score", "ape", "norm_weight", "inv_freq", "kv_state", "score_state"), args))
    disjoint(named[5], *named[:5], named[6])
    disjoint(named[6], *named[:5])
    rope_table = choice("rope_table", rope_table, ROPE_TABLES)
    return _compress(*args, start_pos, ratio, float(eps), quant, rope_table)


@torch.library.custom_op("dsv4rs::compress_batch", mutates_args=("state",))
def _compress_batch(
    kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor, inv_freq: torch.Tensor,
    state: torch.Tensor, state_slots: torch.Tensor, starts: torch.Tensor, cu_tokens: torch.Tensor, ratio: int,
    eps: float, quant: str, rope_table: str,
) -> torch.Tensor:
    out = torch.empty((kv.shape[0], norm_weight.shape[0]), dtype=torch.float32, device=kv.device)
    _core.compress_batch(
        spec("kv", kv), spec("score", score), spec("ape", ape), spec("norm_weight", norm_weight),
        spec("inv_freq", inv_freq), spec("state", state), spec("state_slots", state_slots), spec("starts", starts),
        spec("cu_tokens", cu_tokens), spec("out", out), ratio, eps, quant, rope_table, stream(kv),
    )
    return out


@_compress_batch.register_fake
def _(
    kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor, inv_freq: torch.Tensor,
    state: torch.Tensor, state_slots: torch.Tensor, starts: torch.Tensor, cu_tokens: torch.Tensor, ratio: int,
    eps: float, quant: str, rope_table: str,
) -> torch.Tensor:
    return kv.new_empty((kv.shape[0], norm_weight.shape[0]), dtype=torch.float32)


def compress_batch(
    kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor, inv_freq: torch.Tensor,
    state: torch.Tensor, state_slots: torch.Tensor, starts: torch.Tensor, cu_tokens: torch.Tensor, ratio: int,
    eps: float = 1e-6, quant: Quant = "none", rope_table: RopeTable = "official",
) -> torch.Tensor:
    """:func:`compress` for ``B`` sequences in one call (one launch per kernel on a GPU, and
    capturable in a CUDA graph: no host synchronization, an output shape fixed by the inputs').

    Sequence ``b`` holds rows ``cu_tokens[b] .. cu_tokens[b + 1]`` of ``kv`` and ``score``, at
    positions ``starts[b] ..``, and advances the decode state in slot ``state_slots[b]`` of
    ``state``. Its entries are what ``compress(kv[rows], score[rows], ape, norm_weight, inv_freq,
    state[slot, 0], state[slot, 1], starts[b], ratio, eps, quant, rope_table)`` returns, bit for bit on the
    CPU (and on the GPU, against the GPU ``compress``), each placed at the row of the token that
    completes it.

    Args:
        kv, score: ``float32 [T, coff * D]`` (or both ``bfloat16``, as :func:`compress` takes
            them), the tokens of the ``B`` sequences concatenated.
        ape, norm_weight, inv_freq: as :func:`compress`.
        state: ``float32 [S, 2, coff * ratio, coff * D]``, a pool of decode states: slot ``s``
            holds ``(kv_state, score_state)`` of :func:`compressor_state` as ``state[s, 0]``,
            ``state[s, 1]``; the slots of the batch are advanced in place, no other is touched.
        state_slots: ``int32``/``int64 [B]``, each sequence's slot; ``-1`` marks a padding row
            (e.g. a CUDA-graph bucket larger than the batch): its tokens give zero rows and no
            state is read or written. Live slots must be distinct.
        starts: ``int64``/``int32 [B]``, the position of each sequence's first token (the
            number of tokens its state has seen).
        cu_tokens: ``int32``/``int64 [B + 1]``, row offsets: ``0``, non-decreasing, ``T`` last.
            A sequence may have no tokens.
        ratio, eps, quant, rope_table: as :func:`compress`.

    Returns:
        ``float32 [T, D]``: row ``t`` is the entry token ``t`` completes (the token at position
        ``p`` with ``(p + 1) % ratio == 0``), pooled, normalized, rotated and quantized as
        :func:`compress` gives it; every other row is zero.

    On the CPU, bad slots (out of range: IndexError; repeated: ValueError), negative starts, bad
    ``cu_tokens`` and non-finite inputs raise, before any state changes. On a GPU nothing is
    checked against device data (that would need a synchronization): slots outside ``[0, S)``
    count as padding rows, ``starts`` and ``cu_tokens`` are clamped so that no access leaves its
    tensor, and repeated live slots leave those states undefined.
    """
    ratio = positive("ratio", ratio)
    if quant not in ("none", "fp8", "fp4"):
        raise ValueError(f'quant: expected "none", "fp8" or "fp4", got {quant!r}')
    args = [as_tensor(n, t) for n, t in (("kv", kv), ("score", score), ("ape", ape), ("norm_weight", norm_weight),
                                         ("inv_freq", inv_freq), ("state", state), ("state_slots", state_slots),
                                         ("starts", starts), ("cu_tokens", cu_tokens))]
    ndim("kv", args[0], 2)
    ndim("norm_weight", args[3], 1)
    named = list(zip(("kv", "score", "ape", "norm_weight", "inv_freq", "state", "state_slots", "starts", "cu_tokens"),
                     args))
    disjoint(named[5], *named[:5], *named[6:])
    rope_table = choice("rope_table", rope_table, ROPE_TABLES)
    return _compress_batch(*args, ratio, float(eps), quant, rope_table)
