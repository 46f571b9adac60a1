"""Sampling next tokens on the device, without a host synchronization (docs/model.md has no
part in this: it is the runtime's).

Each row has its own temperature, top-k, top-p, min-p, penalties and seed. Randomness is
counter-based: row ``b`` draws its Gumbel noise from a hash of ``(seed[b], step[b], token id)``,
so a sequence's tokens depend on its seed and position only, never on which other sequences share
the batch, and the whole sampler is a fixed sequence of tensor ops (it can run inside a CUDA
graph). Independent draws at one position (speculative decoding's draft, acceptance test and
residual) take separate streams of the same seed (:func:`stream`).

The order, as vLLM and transformers apply them: penalties on the logits (:func:`penalize`), then
temperature, top-k, top-p (over the renormalized top-k), min-p (relative to the most likely
token, so its place in the order does not matter).
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
    """``float32 [B, width]`` in (0, 1): a function of ``(seeds[b], steps[b], column)`` alone,
    ``(k + 1/2) / 2^23`` for a hashed 23-bit ``k`` (exact in float32, so never 0 or 1: a 1 would
    give a token infinite Gumbel noise). ``ops.sample_gumbel`` computes the same values."""
    col = torch.arange(width, device=seeds.device, dtype=torch.int64)
    row = _mix32((seeds & _MASK32) ^ _mix32(((seeds >> 32) & _MASK32) ^ _mix32(steps & _MASK32)))
    bits = _mix32(_mix32(row[:, None] ^ col[None, :]) ^ (col[None, :] * 0x9E3779B9 & _MASK32))
    return ((bits >> 9).float() + 0.5) * (1.0 / (1 << 23))


def gumbel(seeds: torch.Tensor, steps: torch.Tensor, width: int) -> torch.Tensor:
    """``float32 [B, width]`` Gumbel noise ``-log(-log(u))`` of :func:`uniform`'s draws (what
    every sampler here adds before its arg max)."""
    return -torch.log(-torch.log(uniform(seeds, steps, width)))


def stream(seeds: torch.Tensor, k: int) -> torch.Tensor:
    """The seeds of random stream ``k`` (1..127) of each row: draws independent of stream 0's
    (the plain sampler's) at the same steps."""
    return seeds ^ (k << 56)


def penalize(logits: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor, repetition: torch.Tensor,
             presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """Logits after the penalties (float32 ``[B, V]``, a new tensor).

    Args:
        counts: ``float32 [B, V]`` how often each token was generated so far.
        seen: ``bool [B, V]`` tokens of the prompt or the output.
        repetition: ``[B]``, as CTRL and transformers: a seen token's positive logit is divided
            by it, a negative one multiplied (``1``: off); over prompt and output, as vLLM.
        presence, frequency: ``[B]``, as OpenAI: minus ``presence`` for a generated token, minus
            ``frequency`` per time it was generated (``0``: off); over the output only.
    """
    rep = repetition[:, None]
    out = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return out - presence[:, None] * (counts > 0) - frequency[:, None] * counts


def _filtered(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
              min_p: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sorted scaled logits, order, keep)``: the row's logits over temperature, sorted
    descending (stable: lower id first on ties), and which survive top-k, top-p and min-p."""
    v = logits.shape[-1]
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    rank = torch.arange(v, device=logits.device)[None, :]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    before = probs.cumsum(-1) - probs  # probability of the tokens ranked above
    keep &= (before < top_p[:, None]) | (rank == 0)
    if min_p is not None:  # p >= min_p * p_max, i.e. logit >= max + log(min_p)
        keep &= (sorted_logits >= sorted_logits[:, :1] + torch.log(min_p)[:, None]) | (rank == 0)
    return sorted_logits, order, keep


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor, steps: torch.Tensor, min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Next tokens ``int64 [B]`` from ``logits [B, V]`` (float32; apply :func:`penalize` first).

    Args:
        temperature: ``float32 [B]``; ``0`` samples greedily (the arg max, lowest id on ties).
        top_k: ``int64 [B]``; keep the ``top_k`` most likely tokens (``0``: all).
        top_p: ``float32 [B]``; then keep the smallest set of most likely tokens whose
            probability, renormalized over the top-k, reaches ``top_p`` (``1``: all); the most
            likely token is always kept (top-k before top-p, as transformers and vLLM do).
        seeds, steps: ``int64 [B]``: the row's seed and a counter (e.g. its position), the only
            inputs of its random numbers.
        min_p: ``float32 [B]`` or None; keep only tokens at least ``min_p`` times as likely as
            the most likely one (``0``: all).
    """
    greedy = temperature <= 0
    sorted_logits, order, keep = _filtered(logits, temperature, top_k, top_p, min_p)
    noise = gumbel(seeds, steps, logits.shape[-1])
    pick = torch.where(keep, sorted_logits + noise.gather(1, order), float("-inf")).argmax(-1)
    return torch.where(greedy, order[:, 0], order.gather(1, pick[:, None])[:, 0])


def gumbel_max(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor
               ) -> torch.Tensor:
    """:func:`sample` without top-k, top-p or min-p (``top_k = 0``, ``top_p = 1``): the same
    tokens (the arg max of the scaled logits plus the same Gumbel noise, up to exact ties of
    those sums) without sorting the vocabulary."""
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    return torch.where(greedy, logits.argmax(-1), (scaled + gumbel(seeds, steps, logits.shape[-1])).argmax(-1))


def probabilities(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor | None = None) -> torch.Tensor:
    """``float32 [B, V]``: the distribution :func:`sample` draws from (a greedy row: one-hot at
    its arg max), by token id."""
    sorted_logits, order, keep = _filtered(logits, temperature, top_k, top_p, min_p)
    p = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    rank0 = torch.zeros_like(p)
    rank0[:, 0] = 1.0
    p = torch.where((temperature <= 0)[:, None], rank0, p)
    return torch.zeros_like(p).scatter_(1, order, p)


def sample_from(probs: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """``int64 [B]`` drawn from ``probs [B, V]`` (non-negative rows, any positive sum) with the
    counter-based noise (Gumbel max over ``log probs``); a row without mass gives its arg max."""
    pick = (torch.log(probs) + gumbel(seeds, steps, probs.shape[-1])).argmax(-1)
    return torch.where(probs.amax(-1) > 0, pick, probs.argmax(-1))


def top_logprobs(logits: torch.Tensor, tokens: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's log-probabilities (``log_softmax`` of the raw logits, before penalties and
    temperature, as OpenAI reports them): ``(logprob of tokens[b] [B], top-n ids [B, n],
    their logprobs [B, n])``."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top, ids = lp.topk(min(n, lp.shape[-1]), dim=-1) if n > 0 else (lp[:, :0], tokens[:, None][:, :0])
    return lp.gather(1, tokens[:, None])[:, 0], ids, top
