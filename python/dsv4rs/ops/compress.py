"""The CSA/HCA compressor (docs/model.md section 3), CPU and GPU: one op for prefill and decode."""

from __future__ import annotations

from typing import Literal

import torch

from dsv4rs import _core
from dsv4rs._tensor import as_tensor, spec, stream
from dsv4rs.ops._checks import ndim, positive

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
) -> torch.Tensor:
    n = _entries_completed(start_pos, kv.shape[0], ratio)
    out = torch.empty((n, norm_weight.shape[0]), dtype=torch.float32, device=kv.device)
    _core.compress(
        spec("kv", kv), spec("score", score), spec("ape", ape), spec("norm_weight", norm_weight),
        spec("inv_freq", inv_freq), spec("kv_state", kv_state), spec("score_state", score_state), spec("out", out),
        start_pos, ratio, eps, quant, stream(kv),
    )
    return out


@_compress.register_fake
def _(
    kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor, inv_freq: torch.Tensor,
    kv_state: torch.Tensor, score_state: torch.Tensor, start_pos: int, ratio: int, eps: float, quant: str,
) -> torch.Tensor:
    n = _entries_completed(start_pos, kv.shape[0], ratio)
    return kv.new_empty((n, norm_weight.shape[0]), dtype=torch.float32)


def compress(
    kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor, inv_freq: torch.Tensor,
    kv_state: torch.Tensor, score_state: torch.Tensor, start_pos: int, ratio: int, eps: float = 1e-6,
    quant: Quant = "none",
) -> torch.Tensor:
    """Feeds tokens ``start_pos .. start_pos + S - 1`` to a compressor (docs/model.md section 3) and
    returns the entries they complete. One form serves prefill (all tokens at once) and decode
    (one token a call): any split of a sequence into calls gives the same entries, bit for bit.

    Args:
        kv, score: ``float32 [S, coff * D]``, the projections ``W_kv x`` and ``W_gate x``
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

    Returns:
        ``float32 [E, D]``: entries ``start_pos // ratio ..``, one for each position ``p`` of
        the call with ``(p + 1) % ratio == 0``, pooled, RMS-normalized (in float32, without
        the bf16 cast docs/model.md section 3 puts before the norm, as ``reference.compressor_prefill``),
        rotated and quantized. Scores may hold ``-inf`` (a token without a
        vote); other non-finite inputs raise before the state changes.
    """
    ratio = positive("ratio", ratio)
    if isinstance(start_pos, bool) or not isinstance(start_pos, int) or start_pos < 0:
        raise ValueError(f"start_pos: expected an int >= 0, got {start_pos!r}")
    if quant not in ("none", "fp8", "fp4"):
        raise ValueError(f'quant: expected "none", "fp8" or "fp4", got {quant!r}')
    args = [as_tensor(n, t) for n, t in (("kv", kv), ("score", score), ("ape", ape), ("norm_weight", norm_weight),
                                         ("inv_freq", inv_freq), ("kv_state", kv_state), ("score_state", score_state))]
    ndim("kv", args[0], 2)
    ndim("norm_weight", args[3], 1)
    if args[5].data_ptr() == args[6].data_ptr() and args[5].numel() > 0:
        raise ValueError("kv_state, score_state: must be distinct tensors")
    return _compress(*args, start_pos, ratio, float(eps), quant)
