"""The compressors' and the Lightning Indexer's weights (docs/model.md sections 3 and 4).

A compressor turns every ``ratio`` tokens into one ``dim``-dim entry: CSA (ratio 4, overlapping
blocks, ``coff`` = 2) for the main rows and the indexer keys, HCA (ratio 128) for the main rows.
:func:`compress_chunks` feeds each sequence's chunk to its decode state through
:func:`dsv4rs.ops.compress`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dsv4rs import ops
from dsv4rs.model.config import INDEX_DIM, V4Config
from dsv4rs.model.layers.norm import RMSNorm, linear


class Compressor(nn.Module):
    """Weights of a compressor: ``dim``-dim entries every ``ratio`` tokens; ratio 4 overlaps
    consecutive blocks (``coff`` = 2)."""

    def __init__(self, cfg: V4Config, ratio: int, dim: int) -> None:
        super().__init__()
        self.ratio, self.dim, self.eps = ratio, dim, cfg.rms_norm_eps
        coff = 2 if ratio == 4 else 1
        self.kv_proj = linear(cfg.hidden_size, coff * dim)
        self.gate_proj = linear(cfg.hidden_size, coff * dim)
        self.position_bias = nn.Parameter(torch.zeros(ratio, coff * dim, dtype=torch.float32))
        self.kv_norm = RMSNorm(dim, cfg.rms_norm_eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_kv x, W_gate x)``, float32 (float64 stays float64)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        return self.kv_proj(x).to(dtype), self.gate_proj(x).to(dtype)


class IndexerScorer(nn.Module):
    def __init__(self, cfg: V4Config) -> None:
        super().__init__()
        self.weights_proj = linear(cfg.hidden_size, cfg.index_n_heads)


class Indexer(Compressor):
    """The Lightning Indexer's weights: its own compressor over 128-dim keys, the query
    projection from ``cQ`` and the per-head weights."""

    def __init__(self, cfg: V4Config) -> None:
        super().__init__(cfg, cfg.compress_rates[0], INDEX_DIM)
        self.heads, self.topk = cfg.index_n_heads, cfg.index_topk
        self.q_b_proj = linear(cfg.q_lora_rank, cfg.index_n_heads * INDEX_DIM)
        self.scorer = IndexerScorer(cfg)

    def queries(self, cq: torch.Tensor) -> torch.Tensor:
        """``[T, heads, 128]`` before RoPE."""
        return self.q_b_proj(cq).unflatten(-1, (self.heads, INDEX_DIM))

    def head_weights(self, x: torch.Tensor) -> torch.Tensor:
        """``w_t = W_w x_t * 128^-0.5 * heads^-0.5``, float32 (float64 stays float64)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        return self.scorer.weights_proj(x).to(dtype) * (INDEX_DIM**-0.5 * self.heads**-0.5)


class CSACompressor(Compressor):
    def __init__(self, cfg: V4Config) -> None:
        super().__init__(cfg, cfg.compress_rates[0], cfg.head_dim)
        self.indexer = Indexer(cfg)


class HCACompressor(Compressor):
    def __init__(self, cfg: V4Config) -> None:
        super().__init__(cfg, cfg.compress_rates[1], cfg.head_dim)


def compress_chunks(comp: Compressor, x: torch.Tensor, state: torch.Tensor, inv_freq: torch.Tensor,
                    starts: Sequence[int], lens: Sequence[int], state_slots: Sequence[int]) -> torch.Tensor:
    """Feeds each sequence's chunk (``lens[i]`` rows of ``x`` from position ``starts[i]``) to its
    decode state ``state[state_slots[i]]`` (``[2, coff r, coff D]``: kv then scores); returns the
    entries the chunks complete, in batch order."""
    kv, score = comp.project(x)
    kv, score = kv.float(), score.float()
    ape, norm = comp.position_bias.float(), comp.kv_norm.weight.float()
    out, at = [], 0
    for start, length, slot in zip(starts, lens, state_slots):
        out.append(ops.compress(kv[at : at + length], score[at : at + length], ape, norm, inv_freq, state[slot, 0],
                                state[slot, 1], start, comp.ratio, comp.eps))
        at += length
    return torch.cat(out)
