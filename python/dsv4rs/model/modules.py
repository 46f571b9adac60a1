"""The parameters of DeepSeek-V4 and the dense parts of its math (SPEC.md sections 2, 6, 7, 8).

Module and parameter names are transformers' ``DeepseekV4ForCausalLM`` names, so a checkpoint it
saves loads by name (:mod:`dsv4rs.model.loader` maps DeepSeek's names onto them). The attention's
core (window, compressor, indexer, attention over the paged cache) runs in
:mod:`dsv4rs.model.engine` through the dsv4rs ops; the modules here hold its weights and compute
the projections around it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4rs import ops
from dsv4rs.model.config import CSA, HCA, INDEX_DIM, SWA, V4Config


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32 (float64 stays float64); ``weight`` may be
    ``None`` (the per-head query norm and the mHC input norm have none)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    y = x.to(dtype)
    y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps).to(x.dtype)


def _linear(d_in: int, d_out: int) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=False)


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """The mHC projection of ``comb [..., n, n]`` (softmaxed rows, plus ``eps``) towards doubly
    stochastic: columns normalized, then ``iters - 1`` times rows and columns (SPEC.md section 6)."""
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


class HyperConnection(nn.Module):
    """mHC around one sublayer (SPEC.md section 6): from the ``hc`` streams ``X [T, hc, d]``, the
    collapse weights ``pre``, the expansion weights ``post`` and the Sinkhorn-projected mixing
    matrix ``comb``."""

    def __init__(self, cfg: V4Config) -> None:
        super().__init__()
        n = cfg.hc_mult
        self.hc, self.iters, self.eps, self.norm_eps = n, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps
        self.fn = nn.Parameter(torch.zeros((2 + n) * n, n * cfg.hidden_size, dtype=torch.float32))
        self.base = nn.Parameter(torch.zeros((2 + n) * n, dtype=torch.float32))
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(post [T, hc], comb [T, hc, hc], collapsed [T, d])``; the weights in float32 (or
        float64 for float64 streams, computed in torch; float32 goes through
        :func:`dsv4rs.ops.mhc_weights`, one kernel)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        mix = F.linear(rms_norm(x.flatten(-2), None, self.norm_eps), self.fn.to(dtype))
        if dtype == torch.float32 and mix.dim() == 2:
            pre, post, comb = ops.mhc_weights(mix, self.scale.float(), self.base.float(), self.iters, self.eps)
        else:
            pre, post, comb = self.weights(mix)
        collapsed = (pre.unsqueeze(-1) * x).sum(-2).to(x.dtype)
        return post, comb, collapsed

    def weights(self, mix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(pre, post, comb)`` from ``mix`` in torch (the reference of :func:`dsv4rs.ops.mhc_weights`)."""
        n = self.hc
        pre_w, post_w, comb_w = mix.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.to(mix.dtype).split([n, n, n * n])
        s = self.scale.to(mix.dtype)
        pre = torch.sigmoid(pre_w * s[0] + pre_b) + self.eps
        post = 2 * torch.sigmoid(post_w * s[1] + post_b)
        comb = sinkhorn(torch.softmax(comb_w.unflatten(-1, (n, n)) * s[2] + comb_b.view(n, n), dim=-1) + self.eps,
                        self.iters, self.eps)
        return pre, post, comb

    @staticmethod
    def combine(x: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """``X'_k = post_k F + sum_j comb[j, k] X_j``."""
        dtype = x.dtype
        return post.to(dtype).unsqueeze(-1) * out.to(dtype).unsqueeze(-2) + comb.to(dtype).transpose(-1, -2) @ x


class HyperHead(nn.Module):
    """The final collapse of the streams (SPEC.md section 6, ``hc_head``)."""

    def __init__(self, cfg: V4Config) -> None:
        super().__init__()
        n = cfg.hc_mult
        self.eps, self.norm_eps = cfg.hc_eps, cfg.rms_norm_eps
        self.hc_fn = nn.Parameter(torch.zeros(n, n * cfg.hidden_size, dtype=torch.float32))
        self.hc_base = nn.Parameter(torch.zeros(n, dtype=torch.float32))
        self.hc_scale = nn.Parameter(torch.ones(1, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        mix = F.linear(rms_norm(x.flatten(-2), None, self.norm_eps), self.hc_fn.to(dtype))
        pre = torch.sigmoid(mix * self.hc_scale.to(dtype) + self.hc_base.to(dtype)) + self.eps
        return (pre.unsqueeze(-1) * x).sum(-2).to(x.dtype)


class GroupedLinear(nn.Module):
    """``W_oa``: each group of ``heads / g`` heads projected on its own (SPEC.md section 2)."""

    def __init__(self, in_per_group: int, out_features: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(out_features, in_per_group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, g, in]`` -> ``[T, g * out / g]``."""
        w = self.weight.to(x.dtype).view(self.groups, -1, x.shape[-1])
        return torch.einsum("tgi,goi->tgo", x, w).flatten(1)


class Compressor(nn.Module):
    """Weights of a compressor (SPEC.md section 3): ``dim``-dim entries every ``ratio`` tokens;
    ratio 4 overlaps consecutive blocks (``coff`` = 2)."""

    def __init__(self, cfg: V4Config, ratio: int, dim: int) -> None:
        super().__init__()
        self.ratio, self.dim = ratio, dim
        coff = 2 if ratio == 4 else 1
        self.kv_proj = _linear(cfg.hidden_size, coff * dim)
        self.gate_proj = _linear(cfg.hidden_size, coff * dim)
        self.position_bias = nn.Parameter(torch.zeros(ratio, coff * dim, dtype=torch.float32))
        self.kv_norm = RMSNorm(dim, cfg.rms_norm_eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_kv x, W_gate x)``, float32 (float64 stays float64)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        return self.kv_proj(x).to(dtype), self.gate_proj(x).to(dtype)


class IndexerScorer(nn.Module):
    def __init__(self, cfg: V4Config) -> None:
        super().__init__()
        self.weights_proj = _linear(cfg.hidden_size, cfg.index_n_heads)


class Indexer(Compressor):
    """The Lightning Indexer's weights (SPEC.md section 4): its own compressor over 128-dim keys,
    the query projection from ``cQ`` and the per-head weights."""

    def __init__(self, cfg: V4Config) -> None:
        super().__init__(cfg, cfg.compress_rates[0], INDEX_DIM)
        self.heads, self.topk = cfg.index_n_heads, cfg.index_topk
        self.q_b_proj = _linear(cfg.q_lora_rank, cfg.index_n_heads * INDEX_DIM)
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


class Attention(nn.Module):
    """One attention layer's weights and projections (SPEC.md section 2)."""

    def __init__(self, cfg: V4Config, layer_type: str) -> None:
        super().__init__()
        self.layer_type = layer_type
        self.heads, self.head_dim, self.groups, self.eps = cfg.num_attention_heads, cfg.head_dim, cfg.o_groups, cfg.rms_norm_eps
        self.q_a_proj = _linear(cfg.hidden_size, cfg.q_lora_rank)
        self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = _linear(cfg.q_lora_rank, self.heads * self.head_dim)
        self.kv_proj = _linear(cfg.hidden_size, self.head_dim)
        self.kv_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.o_a_proj = GroupedLinear(self.heads * self.head_dim // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, cfg.o_groups)
        self.o_b_proj = _linear(cfg.o_groups * cfg.o_lora_rank, cfg.hidden_size)
        self.sinks = nn.Parameter(torch.zeros(self.heads, dtype=torch.float32))
        self.compressor: Compressor | None = None
        if layer_type == CSA:
            self.compressor = CSACompressor(cfg)
        elif layer_type == HCA:
            self.compressor = HCACompressor(cfg)

    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(cQ [T, q_lora_rank], q [T, H, 512], e [T, 512])`` before RoPE; ``q`` per-head
        RMS-normalized without weight."""
        cq = self.q_a_norm(self.q_a_proj(x))
        q = self.q_b_proj(cq).unflatten(-1, (self.heads, self.head_dim))
        q = rms_norm(q, None, self.eps).to(x.dtype)
        e = self.kv_norm(self.kv_proj(x))
        return cq, q, e

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """Grouped output projection of the de-rotated attention output ``o [T, H, 512]``."""
        grouped = o.reshape(o.shape[0], self.groups, -1).to(self.o_b_proj.weight.dtype)
        return self.o_b_proj(self.o_a_proj(grouped))


class MLP(nn.Module):
    """Clamped SwiGLU (the shared expert): ``down(silu(min(gate x, l)) * clamp(up x, -l, l))``."""

    def __init__(self, cfg: V4Config, inner: int) -> None:
        super().__init__()
        self.limit = cfg.swiglu_limit
        self.gate_proj = _linear(cfg.hidden_size, inner)
        self.up_proj = _linear(cfg.hidden_size, inner)
        self.down_proj = _linear(inner, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x).clamp(max=self.limit)
        up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)
        return self.down_proj(F.silu(gate) * up)


class Experts(nn.Module):
    """Routed experts, stacked: ``gate_up_proj [E, 2 I, d]`` (gate rows first), ``down_proj [E, d, I]``."""

    def __init__(self, cfg: V4Config) -> None:
        super().__init__()
        e, i, d = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.limit = cfg.swiglu_limit
        self.gate_up_proj = nn.Parameter(torch.zeros(e, 2 * i, d))
        self.down_proj = nn.Parameter(torch.zeros(e, d, i))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_k weights[t, k] expert_{idx[t, k]}(x_t)``, one matmul per expert hit."""
        out = torch.zeros_like(x)
        flat = idx.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        tokens = order // idx.shape[1]
        start = 0
        for expert, n in enumerate(counts):
            if n == 0:
                continue
            sel = order[start : start + n]
            t = tokens[start : start + n]
            start += n
            gate, up = F.linear(x[t], self.gate_up_proj[expert].to(x.dtype)).chunk(2, dim=-1)
            h = F.silu(gate.clamp(max=self.limit)) * up.clamp(min=-self.limit, max=self.limit)
            y = F.linear(h, self.down_proj[expert].to(x.dtype)) * weights.flatten()[sel, None].to(x.dtype)
            out.index_add_(0, t, y)
        return out


class Router(nn.Module):
    """Expert choice and weights (SPEC.md section 7): affinity ``sqrt(softplus(x W_g^T))``; hash
    layers take the experts from ``tid2eid[token]``, the others the top-k of affinity plus
    ``e_score_correction_bias``; weights are the chosen affinities, normalized, times the
    routed scaling factor."""

    def __init__(self, cfg: V4Config, hashed: bool) -> None:
        super().__init__()
        self.hashed, self.k, self.scale, self.norm = hashed, cfg.num_experts_per_tok, cfg.routed_scaling_factor, cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size))
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, self.k, dtype=torch.int64))
        else:
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.softplus(F.linear(x, self.weight.to(x.dtype))).sqrt()
        if self.hashed:
            idx = self.tid2eid[ids].long()
        else:
            idx = torch.topk(scores + self.e_score_correction_bias.to(scores.dtype), self.k, dim=-1).indices
        w = scores.gather(1, idx)
        if self.norm:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * self.scale


class MoE(nn.Module):
    def __init__(self, cfg: V4Config, hashed: bool) -> None:
        super().__init__()
        self.gate = Router(cfg, hashed)
        self.experts = Experts(cfg)
        self.shared_experts = MLP(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        idx, w = self.gate(x, ids)
        out = self.experts(x, idx, w)
        return out if self.shared_experts is None else out + self.shared_experts(x)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: V4Config, layer_type: str, mlp_type: str) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_type)
        self.mlp = MoE(cfg, mlp_type == "hash_moe")
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn_hc = HyperConnection(cfg)
        self.ffn_hc = HyperConnection(cfg)

    def ffn(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The MoE sublayer with its mHC: streams in, streams out."""
        post, comb, y = self.ffn_hc(x)
        return HyperConnection.combine(x, self.mlp(self.post_attention_layernorm(y), ids), post, comb)


class MTP(DecoderLayer):
    """The multi-token-prediction block (SPEC.md section 8): from the main model's streams ``h_t``
    and the embedding of token ``t + 1``, the logits of token ``t + 2``; a SWA-only layer with its
    own ``hc_head`` and norm, sharing the embedding and LM head."""

    def __init__(self, cfg: V4Config) -> None:
        super().__init__(cfg, SWA, "moe")
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.e_proj = _linear(cfg.hidden_size, cfg.hidden_size)
        self.h_proj = _linear(cfg.hidden_size, cfg.hidden_size)
        self.hc_head = HyperHead(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def inputs(self, h: torch.Tensor, next_embed: torch.Tensor) -> torch.Tensor:
        """The block's input streams: ``e_proj(enorm(embed)) + h_proj(hnorm(h))`` per stream."""
        return self.e_proj(self.enorm(next_embed)).unsqueeze(-2) + self.h_proj(self.hnorm(h))


class Backbone(nn.Module):
    def __init__(self, cfg: V4Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, t, m) for t, m in zip(cfg.layer_types, cfg.mlp_layer_types))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hc_head = HyperHead(cfg)


class DeepseekV4(nn.Module):
    """All weights of a DeepSeek-V4 model, named as transformers' ``DeepseekV4ForCausalLM`` names
    them (plus ``mtp.0.*`` for the MTP block). Run it with :class:`dsv4rs.model.Engine` (paged
    cache, dsv4rs ops) or :func:`dsv4rs.model.dense_forward` (float64 reference)."""

    def __init__(self, cfg: V4Config) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp = nn.ModuleList(MTP(cfg) for _ in range(cfg.num_nextn_predict_layers))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``[T]`` ids -> ``[T, hc, d]``: the embedding copied to every stream."""
        x = self.model.embed_tokens(ids)
        return x.unsqueeze(-2).expand(*x.shape[:-1], self.config.hc_mult, x.shape[-1]).contiguous()

    def head(self, x: torch.Tensor, hc_head: HyperHead | None = None, norm: RMSNorm | None = None) -> torch.Tensor:
        """Streams ``[T, hc, d]`` -> logits ``[T, vocab]`` in float32 (or float64)."""
        y = (norm or self.model.norm)((hc_head or self.model.hc_head)(x))
        logits = F.linear(y, self.lm_head.weight.to(y.dtype))
        return logits.to(torch.promote_types(logits.dtype, torch.float32))


def init_random(model: DeepseekV4, seed: int, std: float = 0.02) -> DeepseekV4:
    """Seeded random weights (as transformers initializes them, with the norms at 1, but random
    sinks, positional biases, mHC parameters and hash tables so every path is exercised)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif leaf in ("scale", "hc_scale"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif leaf in ("sinks", "base", "hc_base", "position_bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[: cfg.num_experts_per_tok]
                                     for _ in range(cfg.vocab_size)]))
            elif name.endswith("e_score_correction_bias"):
                b.copy_(0.01 * torch.randn(b.shape, generator=g))
    return model
