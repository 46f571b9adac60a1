"""The reference forward pass: one whole sequence at a time, no cache, in float64, with every
attention op from :mod:`dsv4rs.reference.ops` and the mHC weights from
:mod:`dsv4rs.reference.mhc` (docs/model.md sections 2-8). Slow and simple; it is what the runtime
and ``dsv4rs demo`` are checked against. The model supplies the weights and the plain torch
parts (projections, norms, routing, experts)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from dsv4rs.model.config import CSA, ROPE_DIM, SWA
from dsv4rs.model.layers.attention import Attention
from dsv4rs.model.layers.mhc import HyperConnection, collapse, combine
from dsv4rs.model.model import DecoderLayer, DeepseekV4
from dsv4rs.reference import ops as ref
from dsv4rs.reference.mhc import mhc_weights


def float64_copy(model: DeepseekV4) -> DeepseekV4:
    """A float64 copy of the weights (on the CPU), for :func:`dense_forward`."""
    return copy.deepcopy(model).to(device="cpu", dtype=torch.float64)


def _hyper(hc: HyperConnection, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(post, comb, collapsed)`` of a sublayer's mHC in float64."""
    pre, post, comb = mhc_weights(hc.mix(x), hc.scale, hc.base, hc.iters, hc.eps)
    return post, comb, collapse(x, pre)


@dataclass(frozen=True)
class _Rope:
    """Where the sequence sits (its first token's position) and how the angles are computed
    (:data:`dsv4rs.reference.ops.ROPE_TABLES`)."""

    offset: int = 0
    table: str = "exact"

    def inv_freq(self, model: DeepseekV4, attn: Attention) -> torch.Tensor:
        if self.table == "exact":
            return attn.rotary.inv_freq.double()
        cfg = model.config
        if attn.layer_type == SWA:
            return ref.official_inv_freq(ROPE_DIM, cfg.rope_theta)
        y = cfg.yarn
        if y is None:
            return ref.official_inv_freq(ROPE_DIM, cfg.compress_rope_theta)
        return ref.official_inv_freq(ROPE_DIM, cfg.compress_rope_theta, y.factor, y.original_max_position_embeddings,
                                     y.beta_fast, y.beta_slow)


def _block(model: DeepseekV4, layer: DecoderLayer, x: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor, quant: bool,
           row_dtype: torch.dtype | None, rope: _Rope = _Rope()) -> torch.Tensor:
    post, comb, y = _hyper(layer.attn_hc, x)
    x = combine(x, _attention(model, layer.self_attn, layer.input_layernorm(y), pos, quant, row_dtype, rope), post, comb)
    post, comb, y = _hyper(layer.ffn_hc, x)
    return combine(x, layer.mlp(layer.post_attention_layernorm(y), ids), post, comb)


@torch.no_grad()
def dense_forward(model: DeepseekV4, ids: torch.Tensor, quant: bool = False, mtp_ids: torch.Tensor | None = None,
                  row_dtype: torch.dtype | None = None, position_offset: int = 0,
                  rope_table: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Logits ``float64 [S, vocab]`` of the sequence ``ids [S]`` (positions 0..S-1).

    ``position_offset`` (a multiple of 128, so that the compressed blocks stay aligned) places
    the sequence at positions ``offset .. offset + S - 1`` for RoPE only: what the sequence sees
    is unchanged, so with exact angles the logits are the same at any offset, and the difference
    measures how a table's angle errors grow with position. ``rope_table``: ``"exact"`` (float64
    angles) or ``"official"`` (DeepSeek's float32 table, :func:`dsv4rs.reference.ops.apply_rope`;
    its inverse frequencies from :func:`dsv4rs.reference.ops.official_inv_freq`); by default the
    model's own (:attr:`DeepseekV4.rope_table`, ``"official"`` unless set), so the reference
    computes the angles the runtime does.

    ``model`` should be a :func:`float64_copy`. ``quant`` applies the production round trips
    (FP8 entries, Hadamard + FP4 indexer keys and queries). With ``mtp_ids [S]`` (token
    ``t + 1`` for each position ``t``), also returns the MTP block's logits for tokens ``t + 2``.
    ``row_dtype`` (without ``quant``) rounds the stored rows (KV entries, indexer keys) to it,
    as the runtime's bfloat16 rows on the GPU.
    """
    ids = torch.as_tensor(ids, dtype=torch.int64).cpu()
    if isinstance(position_offset, bool) or not isinstance(position_offset, int) or position_offset < 0 \
            or position_offset % 128:
        raise ValueError(f"position_offset: expected a multiple of 128 >= 0, got {position_offset!r}")
    if rope_table is None:
        rope_table = model.rope_table
    if rope_table not in ref.ROPE_TABLES:
        raise ValueError(f"rope_table: expected one of {ref.ROPE_TABLES}, got {rope_table!r}")
    rope = _Rope(position_offset, rope_table)
    pos = torch.arange(ids.numel())
    x = model.embed(ids).double()
    for layer in model.model.layers:
        x = _block(model, layer, x, ids, pos, quant, row_dtype, rope)
    logits = model.head(x)
    if mtp_ids is None:
        return logits
    mtp = model.mtp[0]
    next_ids = torch.as_tensor(mtp_ids).cpu()
    h = _block(model, mtp, mtp.inputs(x, model.model.embed_tokens(next_ids).double()), ids, pos, quant, row_dtype, rope)
    return logits, model.head(h, mtp.hc_head, mtp.norm)


def _attention(model: DeepseekV4, attn: Attention, x: torch.Tensor, pos: torch.Tensor, quant: bool,
               row_dtype: torch.dtype | None, rope: _Rope = _Rope()) -> torch.Tensor:
    """``pos``: the tokens' places in the sequence (what each sees); RoPE takes
    ``pos + rope.offset``."""
    cfg = model.config

    def stored(t: torch.Tensor) -> torch.Tensor:
        return t if quant or row_dtype is None else t.to(row_dtype).to(t.dtype)

    inv = rope.inv_freq(model, attn)
    at = pos + rope.offset

    def rotate(t: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        return ref.apply_rope(t, at, inv, inverse=inverse, table=rope.table)

    cq, q, e = attn.projections(x)
    q, e = rotate(q), rotate(e)
    if quant:
        e = ref.entry_quant_dequant(e)
    e = stored(e)
    rows, idx = e, ref.window_indices(pos, cfg.sliding_window)
    comp = attn.compressor
    if comp is not None:
        kv, score = comp.project(x)
        entries = ref.compressor_prefill(kv, score, comp.position_bias, comp.kv_norm.weight, comp.ratio, inv,
                                         cfg.rms_norm_eps, "fp8" if quant else "none", rope.offset, rope.table)
        entries = stored(entries)
        visible = ref.compressed_visible(pos, comp.ratio)
        if attn.layer_type == CSA:
            ix = comp.indexer
            ikv, iscore = ix.project(x)
            keys = ref.compressor_prefill(ikv, iscore, ix.position_bias, ix.kv_norm.weight, ix.ratio, inv,
                                          cfg.rms_norm_eps, "fp4" if quant else "none", rope.offset, rope.table)
            keys = stored(keys)
            qi = rotate(ix.queries(cq))
            if quant:
                qi = ref.fp4_quant_dequant(ref.hadamard128(qi))
            chosen, _ = ref.indexer_topk(qi, ix.head_weights(x), keys, visible, cfg.index_topk)
        else:
            k = torch.arange(max(1, entries.shape[0]))
            chosen = torch.where(k < visible[:, None], k, -1)
        rows = torch.cat([e, entries])
        idx = torch.cat([idx, torch.where(chosen >= 0, chosen + e.shape[0], -1)], dim=1)
    o, _ = ref.sparse_attention(q, rows, idx, attn.sinks)
    return attn.output(rotate(o, inverse=True))
