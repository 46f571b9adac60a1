"""DeepSeek-V4: the decoder layers, the MTP block and the model, with transformers' parameter
names (docs/model.md sections 2-8). A checkpoint transformers saves loads by name
(:mod:`dsv4rs.model.loader` maps DeepSeek's names onto them). The forward pass runs one step of a
batch through the paged KV cache: the runtime (:mod:`dsv4rs.runtime`) plans the step's
:class:`~dsv4rs.model.layers.attention.AttentionMetadata` and owns the cache tensors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from itertools import chain

import torch
import torch.nn.functional as F
from torch import nn

from dsv4rs import ops
from dsv4rs.model.config import SWA, V4Config
from dsv4rs.model.layers.attention import Attention, AttentionMetadata, LayerCache
from dsv4rs.model.layers.compressor import Indexer
from dsv4rs.model.layers.mhc import HyperConnection, HyperHead, combine
from dsv4rs.model.layers.moe import Experts, MoE, expert_range
from dsv4rs.model.layers.quant import QuantLinear, check_act
from dsv4rs.model.layers.rotary import RotaryEmbedding
from dsv4rs.model.layers.rotary import inv_freq as rope_inv_freq
from dsv4rs.model.layers.norm import RMSNorm, linear
from dsv4rs.ops._checks import choice
from dsv4rs.ops.indexer import TIE_BREAKS, TieBreak


class DecoderLayer(nn.Module):
    def __init__(self, cfg: V4Config, layer_type: str, mlp_type: str, experts: range | None = None) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_type)
        self.mlp = MoE(cfg, mlp_type == "hash_moe", experts)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn_hc = HyperConnection(cfg)
        self.ffn_hc = HyperConnection(cfg)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, meta: AttentionMetadata, cache: LayerCache) -> torch.Tensor:
        """Streams ``[T, hc, d]`` in and out: the attention sublayer, then the MoE sublayer, each
        inside its mHC."""
        post, comb, y = self.attn_hc(x)
        x = combine(x, self.self_attn(self.input_layernorm(y), meta, cache), post, comb)
        post, comb, y = self.ffn_hc(x)
        routed, shared = self.mlp.parts(self.post_attention_layernorm(y), ids)
        return combine(x, routed, post, comb, add=shared)


class MTP(DecoderLayer):
    """The multi-token-prediction block (docs/model.md section 8): from the main model's streams
    ``h_t`` and the embedding of token ``t + 1``, the logits of token ``t + 2``; a SWA-only layer
    with its own ``hc_head`` and norm, sharing the embedding and LM head."""

    def __init__(self, cfg: V4Config, experts: range | None = None) -> None:
        super().__init__(cfg, SWA, "moe", experts)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.e_proj = linear(cfg.hidden_size, cfg.hidden_size)
        self.h_proj = linear(cfg.hidden_size, cfg.hidden_size)
        self.hc_head = HyperHead(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def inputs(self, h: torch.Tensor, next_embed: torch.Tensor) -> torch.Tensor:
        """The block's input streams: ``e_proj(enorm(embed)) + h_proj(hnorm(h))`` per stream."""
        return self.e_proj(self.enorm(next_embed)).unsqueeze(-2) + self.h_proj(self.hnorm(h))


class Backbone(nn.Module):
    def __init__(self, cfg: V4Config, experts: range | None = None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, t, m, experts) for t, m in zip(cfg.layer_types, cfg.mlp_layer_types))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hc_head = HyperHead(cfg)


class DeepseekV4(nn.Module):
    """All weights of a DeepSeek-V4 model, named as transformers' ``DeepseekV4ForCausalLM`` names
    them (plus ``mtp.0.*`` for the MTP block), and its forward pass over the paged cache. Run it
    with :class:`dsv4rs.runtime.Engine`.

    ``experts`` (a contiguous range of routed-expert ids; default all) builds every MoE layer
    with those experts only: a rank's share under expert parallelism (:mod:`dsv4rs.parallel`).
    """

    def __init__(self, cfg: V4Config, experts: range | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.experts = expert_range(cfg, experts)
        self.model = Backbone(cfg, experts)
        self.lm_head = linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp = nn.ModuleList(MTP(cfg, experts) for _ in range(cfg.num_nextn_predict_layers))

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor a checkpoint holds, by name: the parameters (a tied LM head once, under
        the embedding's name) and the persistent buffers (hash tables, routing biases), not the
        RoPE tables computed from the config."""
        persistent = self.state_dict(keep_vars=True).keys()
        tensors = {n: t for n, t in chain(self.named_parameters(), self.named_buffers()) if n in persistent}
        for name, mod in self.named_modules():  # weights held in tiles: as stored, in rows
            if isinstance(mod, Experts) and mod.layout == "tiles":
                for leaf in ("gate_up", "down"):
                    tensors[f"{name}.{leaf}"] = ops.weight_rows(tensors[f"{name}.{leaf}"])
            elif isinstance(mod, QuantLinear) and mod.layout == "tiles" and f"{name}.weight" in tensors:
                tensors[f"{name}.weight"] = mod.stored_weight()
        return tensors

    def set_activation_quant(self, act: str) -> DeepseekV4:
        """How the quantized weights' activations are rounded (a model loaded with
        ``load_checkpoint(quantized=True)``; a dense model has nothing to set): ``"fp8"`` (the
        default, DeepSeek's reference W8A8: FP8 e4m3 with one power-of-two scale per 1x128 block)
        or ``"bf16"`` (each value rounded to bfloat16), for every
        :class:`~dsv4rs.model.layers.quant.QuantLinear` and quantized routed experts. Returns
        the model. ValueError names ``act`` for anything else."""
        check_act(act)
        for m in self.modules():
            if isinstance(m, QuantLinear) or (isinstance(m, Experts) and m.quantized):
                m.act = act
        return self

    @property
    def rope_table(self) -> str:
        """The RoPE table the layers compute their angles with (:meth:`set_rope_table`)."""
        return next(m.table for m in self.modules() if isinstance(m, RotaryEmbedding))

    def set_rope_table(self, table: str) -> DeepseekV4:
        """How every layer computes its RoPE angles (:data:`dsv4rs.ops.ROPE_TABLES`):
        ``"official"`` (the default: DeepSeek's float32 table, as its reference code, transformers,
        vLLM and SGLang compute it) or ``"exact"`` (float64 angles). docs/model.md section 2
        measures the difference. Returns the model; ValueError names ``table`` for anything else."""
        table = choice("table", table, ops.ROPE_TABLES)
        for m in self.modules():
            if isinstance(m, RotaryEmbedding):
                m.table = table
        return self

    def set_indexer_tie_break(self, tie_break: TieBreak) -> DeepseekV4:
        """How every CSA layer's Lightning Indexer orders exactly equal scores
        (docs/model.md section 4): ``"lower"`` (the default: the lower key first, the fused
        selection) or ``"torch"`` (``torch.topk`` over the dense scores, as transformers and
        DeepSeek's reference select; memory ``O(tokens x keys)`` a layer). Returns the model.
        ValueError names ``tie_break`` for anything else."""
        tie_break = choice("tie_break", tie_break, TIE_BREAKS)
        for m in self.modules():
            if isinstance(m, Indexer):
                m.tie_break = tie_break
        return self

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``[T]`` ids -> ``[T, hc, d]``: the embedding copied to every stream."""
        x = self.model.embed_tokens(ids)
        return x.unsqueeze(-2).expand(*x.shape[:-1], self.config.hc_mult, x.shape[-1]).contiguous()

    def forward(self, ids: torch.Tensor, meta: AttentionMetadata, caches: Sequence[LayerCache]) -> torch.Tensor:
        """The streams ``[T, hc, d]`` after the last layer for the step's tokens ``ids [T]``;
        ``caches[i]`` is layer ``i``'s slice of the cache."""
        x = self.embed(ids)
        for layer, cache in zip(self.model.layers, caches):
            x = layer(x, ids, meta, cache)
        return x

    def draft(self, h: torch.Tensor, next_ids: torch.Tensor, meta: AttentionMetadata, cache: LayerCache) -> torch.Tensor:
        """The MTP block's streams for the main model's streams ``h [T, hc, d]`` of the same step
        and the token after each position ``next_ids [T]``; ``cache`` is the MTP layer's."""
        mtp = self.mtp[0]
        return mtp(mtp.inputs(h, self.model.embed_tokens(next_ids)), next_ids, meta, cache)

    def head(self, x: torch.Tensor, hc_head: HyperHead | None = None, norm: RMSNorm | None = None) -> torch.Tensor:
        """Streams ``[T, hc, d]`` -> logits ``[T, vocab]`` in float32 (or float64)."""
        y = (norm or self.model.norm)((hc_head or self.model.hc_head)(x))
        logits = F.linear(y, self.lm_head.weight.to(y.dtype))
        return logits.to(torch.promote_types(logits.dtype, torch.float32))


FLOAT32_PARAMETERS = ("sinks", "position_bias", "norm.weight", "_hc.", "hc_head.", "e_score_correction_bias")
"""Name parts of the parameters that stay float32 whatever the model's dtype: the attention
sinks, the compressors' positional biases, every norm weight, the mHC parameters and the routing
bias (as DeepSeek ships them)."""


def keeps_float32(name: str) -> bool:
    """Whether parameter ``name`` stays float32 in a model of lower precision."""
    return any(k in name for k in FLOAT32_PARAMETERS)


def set_dtype(model: DeepseekV4, dtype: torch.dtype) -> DeepseekV4:
    """Every floating-point parameter in ``dtype``, but those that stay float32
    (:data:`FLOAT32_PARAMETERS`); in place (on the meta device it allocates nothing). Quantized
    weights (:class:`~dsv4rs.model.layers.quant.QuantLinear`, quantized routed experts) stay as
    stored; ``dtype`` becomes the dtype their layers compute in."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not keeps_float32(name):
            p.data = p.data.to(dtype)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.dtype = dtype
    return model


SHIPPED_FP8 = re.compile(r"\.(self_attn\.(q_a_proj|q_b_proj|kv_proj|o_a_proj|o_b_proj|compressor\.indexer\.q_b_proj)"
                         r"|mlp\.shared_experts\.(gate_proj|up_proj|down_proj))$")
"""The linear layers (module names) DeepSeek ships in FP8 with 128x128 block scales (docs/model.md
section 9); its routed experts ship in MXFP4, everything else in bfloat16 or float32."""


def shipped_layout(model: DeepseekV4) -> DeepseekV4:
    """``model`` (on the meta device) with the layers DeepSeek ships quantized in their quantized
    form, as ``load_checkpoint(quantized=True)`` leaves a DeepSeek checkpoint: the linears of
    :data:`SHIPPED_FP8` as FP8 :class:`~dsv4rs.model.layers.quant.QuantLinear`, the routed experts
    as MXFP4 :class:`~dsv4rs.model.layers.moe.Experts`. In place; allocates nothing."""
    dtype = model.model.embed_tokens.weight.dtype
    for name, mod in list(model.named_modules()):
        parent, _, leaf = name.rpartition(".")
        if SHIPPED_FP8.search(name):
            out_features, in_features = mod.weight.shape
            with torch.device("meta"):
                q = QuantLinear(in_features, out_features, "fp8", getattr(mod, "groups", 1), dtype=dtype)
            setattr(model.get_submodule(parent), leaf, q)
        elif isinstance(mod, Experts) and not mod.quantized:
            with torch.device("meta"):
                q = Experts(model.config, range(mod.first, mod.first + mod.held), quantized=True)
            setattr(model.get_submodule(parent), leaf, q)
    return model


def empty_model(cfg: V4Config, device: torch.device | str, dtype: torch.dtype = torch.float32,
                experts: range | None = None, shipped: bool = False) -> DeepseekV4:
    """A model whose weights are allocated on ``device`` in ``dtype`` (see :func:`set_dtype`) but
    not initialized: it is built on the meta device, so no full-size copy is ever made elsewhere;
    the tables computed from the config (RoPE frequencies) are filled. With ``shipped`` the layers
    DeepSeek ships quantized hold FP8 / MXFP4 codes instead (:func:`shipped_layout`). Load or
    initialize the weights next."""
    with torch.device("meta"):
        model = set_dtype(DeepseekV4(cfg, experts), dtype)
        if shipped:
            shipped_layout(model)
    model.to_empty(device=device)
    for attn in [layer.self_attn for layer in [*model.model.layers, *model.mtp]]:
        attn.rotary.inv_freq.copy_(rope_inv_freq(cfg, attn.layer_type != SWA))
    return model


def init_random(model: DeepseekV4, seed: int, std: float = 0.02) -> DeepseekV4:
    """Seeded random weights (as transformers initializes them, with the norms at 1, but random
    sinks, positional biases, mHC parameters and hash tables so every path is exercised).
    ``seed``: an int in ``[0, 2^64)``; ``std``: a finite number >= 0."""
    if not isinstance(model, DeepseekV4):
        raise TypeError(f"model: expected a DeepseekV4, got {type(model).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
        raise ValueError(f"seed: expected an int in [0, 2^64), got {seed!r}")
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not 0 <= std < math.inf:
        raise ValueError(f"std: expected a finite number >= 0, got {std!r}")
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
