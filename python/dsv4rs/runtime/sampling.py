"""Sampling next tokens on the device, without a host synchronization (docs/model.md has no
part in this: it is the runtime's).

Each row has its own temperature, top-k, top-p and seed. Randomness is counter-based: row ``b``
draws its Gumbel noise from a hash of ``(seed[b], step[b], token id)``, so a sequence's tokens
depend on its seed and position only, never on which other sequences share the batch, and the
whole sampler is a fixed sequence of tensor ops (it can run inside a CUDA graph).
"""

from __future__ import annotations

import torch

_MASK32 = (1 << 32) - 1


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (lowbias32), elementwise on int64 holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniform(seeds: torch.Tensor, steps: torch.Tensor, width: int) -> torch.Tensor:
    """``float32 [B, width]`` in (0, 1): a function of ``(seeds[b], steps[b], column)`` alone."""
    col = torch.arange(width, device=seeds.device, dtype=torch.int64)
    row = _mix32((seeds & _MASK32) ^ _mix32(((seeds >> 32) & _MASK32) ^ _mix32(steps & _MASK32)))
    bits = _mix32(_mix32(row[:, None] ^ col[None, :]) ^ (col[None, :] * 0x9E3779B9 & _MASK32))
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Next tokens ``int64 [B]`` from ``logits [B, V]`` (float32).

    Args:
        temperature: ``float32 [B]``; ``0`` samples greedily (the arg max, lowest id on ties).
        top_k: ``int64 [B]``; keep the ``top_k`` most likely tokens (``0``: all).
        top_p: ``float32 [B]``; then keep the smallest set of most likely tokens whose
            probability, renormalized over the top-k, reaches ``top_p`` (``1``: all); the most
            likely token is always kept (top-k before top-p, as transformers and vLLM do).
        seeds, steps: ``int64 [B]``: the row's seed and a counter (e.g. its position), the only
            inputs of its random numbers.
    """
    b, v = logits.shape
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    rank = torch.arange(v, device=logits.device)[None, :]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    before = probs.cumsum(-1) - probs  # probability of the tokens ranked above
    keep &= (before < top_p[:, None]) | (rank == 0)
    gumbel = -torch.log(-torch.log(uniform(seeds, steps, v)))
    pick = torch.where(keep, sorted_logits + gumbel.gather(1, order), float("-inf")).argmax(-1)
    return torch.where(greedy, order[:, 0], order.gather(1, pick[:, None])[:, 0])
