"""The compressors' and the Lightning Indexer's weights (docs/model.md sections 3 and 4).

A compressor turns every ``ratio`` tokens into one ``dim``-dim entry: CSA (ratio 4, overlapping
blocks, ``coff`` = 2) for the main rows and the indexer keys, HCA (ratio 128) for the main rows.
:func:`compress_tokens` feeds every sequence's tokens to its decode state in one
:func:`dsv4rs.ops.compress_batch`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from dsv4rs import ops
from dsv4rs.model.config import INDEX_DIM, V4Config
from dsv4rs.model.layers.norm import RMSNorm, linear
from dsv4rs.ops.indexer import TieBreak

if TYPE_CHECKING:
    from dsv4rs.model.layers.attention import AttentionMetadata
    from dsv4rs.model.layers.rotary import RotaryEmbedding


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
    projection from ``cQ`` and the per-head weights; ``tie_break`` is how its top-k orders equal
    scores (:func:`dsv4rs.ops.indexer_topk`)."""

    def __init__(self, cfg: V4Config) -> None:
        super().__init__(cfg, cfg.compress_rates[0], INDEX_DIM)
        self.heads, self.topk = cfg.index_n_heads, cfg.index_topk
        self.tie_break: TieBreak = "lower"
        self.q_b_proj = linear(cfg.q_lora_rank, cfg.index_n_heads * INDEX_DIM)
        self.scorer = IndexerScorer(cfg)

    def queries(self, cq: torch.Tensor) -> torch.Tensor:
        """``[T, heads, 128]`` before RoPE."""
        return self.q_b_proj(cq).unflatten(-1, (self.heads, INDEX_DIM))

    def head_weights(self, x: torch.Tensor) -> torch.Tensor:
        """``w_t = W_w x_t * 128^-0.5 * heads^-0.5``, float32 (float64 stays float64)."""
        return self.weigh(self.scorer.weights_proj(x))

    def weigh(self, raw: torch.Tensor) -> torch.Tensor:
        """:meth:`head_weights` from ``W_w x`` already computed."""
        dtype = torch.promote_types(raw.dtype, torch.float32)
        return raw.to(dtype) * (INDEX_DIM**-0.5 * self.heads**-0.5)


class CSACompressor(Compressor):
    def __init__(self, cfg: V4Config) -> None:
        super().__init__(cfg, cfg.compress_rates[0], cfg.head_dim)
        self.indexer = Indexer(cfg)


class HCACompressor(Compressor):
    def __init__(self, cfg: V4Config) -> None:
        super().__init__(cfg, cfg.compress_rates[1], cfg.head_dim)


def _input(t: torch.Tensor) -> torch.Tensor:
    """A projection as :func:`dsv4rs.ops.compress_batch` takes it: float32 or bfloat16 (read
    exactly either way), contiguous."""
    return (t if t.dtype in (torch.float32, torch.bfloat16) else t.float()).contiguous()


def compress_tokens(comp: Compressor, kv: torch.Tensor, score: torch.Tensor, state: torch.Tensor,
                    rotary: RotaryEmbedding, meta: AttentionMetadata) -> torch.Tensor:
    """Feeds each sequence's tokens (rows ``meta.cu_tokens[b] ..`` of the projections ``kv`` and
    ``score`` of the layer's input, :meth:`Compressor.project`, from position ``meta.starts[b]``)
    to its decode state ``state[meta.state_slots[b]]`` (``[2, coff r, coff D]``: kv then scores),
    all sequences in one :func:`dsv4rs.ops.compress_batch`; row ``t`` of the result is the entry
    token ``t`` completes (zeros where it completes none), rotated by ``rotary``'s frequencies and
    table."""
    return ops.compress_batch(_input(kv), _input(score), comp.position_bias.float(),
                              comp.kv_norm.weight.float(), rotary.inv_freq, state, meta.state_slots, meta.starts,
                              meta.cu_tokens, comp.ratio, comp.eps, rope_table=rotary.table)
