"""The cost model: FLOPs of one decode token and KV-cache bytes of one sequence at a context
length, for DeepSeek-V4 (docs/model.md sections 1-5) and the baselines it is compared against.

FLOPs count a multiply-add as 2, whatever the dtype, for a decode token at position
``t = L - 1`` of a context of ``L`` tokens (the token itself included). They are reported by
component; every model has the same keys (zero where a part does not exist):

- ``projections``: the attention linears (queries, the K=V entry, outputs), 2 per weight.
- ``experts``: the routed experts a token uses, the shared expert, the router.
- ``indexer``: indexer projections plus ``2 * heads * head_dim`` per scored key (docs/model.md
  section 4); ReLU and the head weighting are not counted.
- ``attention``: core attention, per candidate and query head a dot product over the key and a
  weighted sum over the value.
- ``compressor``: the compressors' ``wkv``/``wgate`` linears plus pooling (docs/model.md section 3).
- ``mhc``: the mHC mappings and stream mixing (docs/model.md section 6).
- ``lm_head``: the output projection over the vocabulary.

Weights-only components are ``2 x`` the active parameters of :meth:`V4Model.active_params`.
Choices: the embedding is a lookup (its parameters are not active); the MTP layer is left out
(it drafts tokens, it is not part of a token's forward pass); norms, RoPE, softmax, sinks,
Sinkhorn iterations on 4x4 matrices and quantization are not counted (each is below 0.1 %).

A V4 model is a :class:`dsv4rs.model.config.V4Config` (the presets are its own); its KV bytes are
what the Rust cache layout reserves for it (``dsv4rs._core.CacheLayout``, the same accounting as
:class:`dsv4rs.cache.CacheConfig`): 64-row pages, the MTP layer's window included, window and
compressor state per sequence. Baselines are counted per token, without paging. Nothing here
imports torch, so ``dsv4rs cost`` starts fast.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Mapping
from typing import Any

from dsv4rs import _core
from dsv4rs.model.config import CSA, HCA, V4Config

MAIN_FORMATS = ("fp8", "bf16")
"""Main-entry formats the cache layout accepts (docs/model.md section 5)."""
INDEX_FORMATS = ("fp4", "fp8", "bf16")
"""Indexer-key formats the cache layout accepts (docs/model.md section 5)."""
CONTEXTS = (4096, 65536, 131072, 1 << 20)
"""The context lengths of the ``dsv4rs cost`` table: 4K, 64K, 128K and 1M tokens."""
PAPER_FLOPS_VS_V3_2 = {"v4-pro": 0.27, "v4-flash": 0.10}
"""The paper's per-token "equivalent FP8 FLOPs" at 1M context relative to V3.2 (docs/model.md section 5)."""
FLOP_COMPONENTS = ("projections", "experts", "indexer", "attention", "compressor", "mhc", "lm_head")
FAMILIES = ("window", "csa_main", "csa_index", "hca", "state")
"""The parts of a V4 sequence's cache, as :class:`dsv4rs.cache.Footprint` names them."""


def _check_context(context: int) -> int:
    if isinstance(context, bool) or not isinstance(context, int) or not 1 <= context < 1 << 63:
        raise ValueError(f"context: expected a positive number of tokens (below 2^63), got {context!r}")
    return context


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {sorted(choices)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Cost:
    """One model at one context length.

    Attributes:
        model: the model's name.
        context: tokens in the context, the decoded token included.
        flops: FLOPs of one decode token by component (keys :data:`FLOP_COMPONENTS`).
        kv_bytes: bytes the sequence's cache holds, by family.
        compressed_bytes: the part of ``kv_bytes`` that grows with context (for baselines: all).
    """

    model: str
    context: int
    flops: dict[str, int]
    kv_bytes: dict[str, int]
    compressed_bytes: int

    @property
    def total_flops(self) -> int:
        """FLOPs of one decode token, every component summed."""
        return sum(self.flops.values())

    @property
    def total_kv_bytes(self) -> int:
        """Bytes a sequence of this context holds in its cache, every part summed."""
        return sum(self.kv_bytes.values())

    @property
    def kv_bytes_per_token(self) -> float:
        """Everything the sequence holds (window and compressor state included) per token."""
        return self.total_kv_bytes / self.context

    @property
    def compressed_bytes_per_token(self) -> float:
        """The amortized figure of docs/model.md section 5 (for V4: ``CacheConfig.bytes_per_token``)."""
        return self.compressed_bytes / self.context

    def as_dict(self) -> dict[str, Any]:
        """The fields and the totals as plain values (a row of :func:`compare` adds the ratios)."""
        return {
            "model": self.model,
            "context": self.context,
            "flops": self.flops,
            "total_flops": self.total_flops,
            "kv_bytes": self.kv_bytes,
            "total_kv_bytes": self.total_kv_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "compressed_bytes_per_token": self.compressed_bytes_per_token,
        }


def _flops(params: Mapping[str, int], extra: Mapping[str, int]) -> dict[str, int]:
    """2 per active weight plus the FLOPs that do not come from weights, by component."""
    return {c: 2 * params.get(c, 0) + extra.get(c, 0) for c in FLOP_COMPONENTS}


@dataclasses.dataclass(frozen=True)
class V4Model:
    """The cost of a DeepSeek-V4 model: its config and its cache formats (``main_format``
    ``"fp8"`` or ``"bf16"``, ``index_format`` ``"fp4"``, ``"fp8"`` or ``"bf16"``)."""

    name: str
    config: V4Config
    main_format: str = "fp8"
    index_format: str = "fp4"
    _layout: Any = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _choice("main_format", self.main_format, MAIN_FORMATS)
        _choice("index_format", self.index_format, INDEX_FORMATS)
        cfg = self.config
        layout = _core.CacheLayout(list(cfg.compress_ratios), cfg.sliding_window, self.main_format, self.index_format)
        object.__setattr__(self, "_layout", layout)

    @classmethod
    def pro(cls, **formats: str) -> V4Model:
        """DeepSeek-V4-Pro (:meth:`V4Config.v4_pro`)."""
        return cls("v4-pro", V4Config.v4_pro(), **formats)

    @classmethod
    def flash(cls, **formats: str) -> V4Model:
        """DeepSeek-V4-Flash (:meth:`V4Config.v4_flash`)."""
        return cls("v4-flash", V4Config.v4_flash(), **formats)

    @property
    def layer_ratios(self) -> tuple[int, ...]:
        """Compress ratios of the layers a token's forward pass runs (the MTP layer left out)."""
        return self.config.compress_ratios[: self.config.num_hidden_layers]

    def compressors(self, ratios: tuple[int, ...]) -> list[tuple[int, int, int]]:
        """``(ratio, coff, D)`` of every compressor of layers with ``ratios`` (docs/model.md
        section 3): per CSA layer the main one (4, 2, 512) and the indexer's (4, 2, 128), per
        HCA layer one (128, 1, 512)."""
        cfg = self.config
        csa, hca = cfg.compress_rates
        per_layer = {
            0: [],
            csa: [(csa, 2, cfg.head_dim), (csa, 2, cfg.index_head_dim)],
            hca: [(hca, 1, cfg.head_dim)],
        }
        return [c for ratio in ratios for c in per_layer[ratio]]

    def active_params(self) -> dict[str, int]:
        """Weights one token multiplies by, by component (docs/model.md sections 2-7).

        Per layer: ``W_qa [d_c, d]``, ``W_qb [n_h c, d_c]``, ``W_kv [c, d]``, ``W_oa`` (``g``
        groups of ``n_h c / g -> o_lora_rank``), ``W_ob [d, g o_lora_rank]``; on CSA layers the
        indexer's ``W_iqb [64 x 128, d_c]`` and ``W_w [64, d]``; per compressor ``wkv`` and
        ``wgate`` ``[coff D, d]``; 6 routed + 1 shared SwiGLU experts (3 matrices of
        ``d x moe_intermediate``), the router ``[n_experts, d]`` outside the hash layers; mHC
        ``Phi [(m^2 + 2m), m d]`` per sublayer (2 per layer) and ``[m, m d]`` for the head.
        Plus the LM head ``[vocab, d]``. 48.8 B for V4-Pro and 13.3 B for V4-Flash (49.8 B and
        13.8 B with the embedding; the published figures are 49 B and 13 B)."""
        cfg = self.config
        d, m, layers = cfg.hidden_size, cfg.hc_mult, cfg.num_hidden_layers
        heads, c = cfg.num_attention_heads, cfg.head_dim
        attention = (
            d * cfg.q_lora_rank
            + cfg.q_lora_rank * heads * c
            + d * c
            + heads * c * cfg.o_lora_rank
            + cfg.o_groups * cfg.o_lora_rank * d
        )
        indexer = cfg.q_lora_rank * cfg.index_n_heads * cfg.index_head_dim + d * cfg.index_n_heads
        experts = (cfg.num_experts_per_tok + cfg.n_shared_experts) * 3 * d * cfg.moe_intermediate_size
        routed_layers = max(layers - cfg.hash_layers, 0)
        return {
            "projections": layers * attention,
            "experts": layers * experts + routed_layers * cfg.n_routed_experts * d,
            "indexer": cfg.layer_types.count(CSA) * indexer,
            "compressor": sum(2 * coff * dim * d for _, coff, dim in self.compressors(self.layer_ratios)),
            "mhc": 2 * layers * (m * m + 2 * m) * m * d + m * m * d,
            "lm_head": cfg.vocab_size * d,
        }

    def candidates(self, layer_type: str, context: int) -> int:
        """``|K_t|``: the window plus, on CSA layers, the top-k compressed entries, on HCA
        layers all visible ones (docs/model.md sections 2 and 4)."""
        cfg = self.config
        window = min(context, cfg.sliding_window)
        if layer_type == CSA:
            return window + min(cfg.index_topk, context // cfg.compress_rates[0])
        if layer_type == HCA:
            return window + context // cfg.compress_rates[1]
        return window

    def flops(self, context: int) -> dict[str, int]:
        """FLOPs of one decode token at ``context`` by component (see the module docstring):
        indexer ``2 * 64 * 128 * floor(L / 4)`` per CSA layer; core attention
        ``4 * n_h * 512 * |K_t|`` per layer; compressor pooling ``2 * coff * D`` per token and
        compressor; mHC mixing ``2 m d`` (the pre-sum) ``+ 2 (m^2 + m) d`` (residual and post)
        per sublayer and ``2 m d`` for the head."""
        context = _check_context(context)
        cfg = self.config
        d, m, types = cfg.hidden_size, cfg.hc_mult, cfg.layer_types
        extra = {
            "indexer": types.count(CSA) * 2 * cfg.index_n_heads * cfg.index_head_dim
            * (context // cfg.compress_rates[0]),
            "attention": sum(4 * cfg.num_attention_heads * cfg.head_dim * self.candidates(t, context) for t in types),
            "compressor": sum(2 * coff * dim for _, coff, dim in self.compressors(self.layer_ratios)),
            "mhc": 2 * len(types) * (2 * m * d + 2 * (m * m + m) * d) + 2 * m * d,
        }
        return _flops(self.active_params(), extra)

    def kv_bytes(self, context: int) -> dict[str, int]:
        """Bytes a sequence of ``context`` tokens holds, by family (:data:`FAMILIES`), as the
        allocator reserves them (docs/model.md section 5)."""
        return dict(zip(FAMILIES, self._layout.footprint(_check_context(context))))

    def cost(self, context: int) -> Cost:
        """FLOPs of a decode token and cache bytes at ``context`` tokens."""
        kv = self.kv_bytes(context)
        return Cost(self.name, context, self.flops(context), kv, kv["csa_main"] + kv["csa_index"] + kv["hca"])


@dataclasses.dataclass(frozen=True)
class BaselineModel:
    """A comparison model: the DeepSeek-V3 backbone (61 layers, ``d = 7168``, 128 query heads,
    ``q_lora_rank`` 1536, 3 dense SwiGLU layers of 18432 then 58 MoE layers of 8 routed of 256 +
    1 shared experts of 2048, vocab 129280; the public ``config.json``) with one of three
    attention variants (see :meth:`v3_2`, :meth:`mla`, :meth:`gqa8`).

    Attributes:
        name: the model's name.
        attention_params: attention linears per layer.
        flops_per_candidate: core-attention FLOPs per candidate key per layer (all heads).
        entry_bytes: cache bytes per token and layer.
        index_topk: the DSA indexer's top-k; ``None`` for dense attention over all tokens.
        index_key_bytes: indexer-key bytes per token and layer.
    """

    name: str
    attention_params: int
    flops_per_candidate: int
    entry_bytes: int
    index_topk: int | None = None
    index_key_bytes: int = 0

    num_layers = 61
    hidden = 7168
    heads = 128
    vocab = 129280
    index_heads = 64
    index_head_dim = 128

    @classmethod
    def v3_2(cls) -> BaselineModel:
        """DeepSeek-V3.2: MLA with DSA. 656-byte FP8 latent entries (512 FP8 + 4 fp32 scales
        + 64 BF16 RoPE dims) and 132-byte FP8 indexer keys per token and layer; the indexer
        scores every previous token and attention takes the top 2048 (docs/model.md section 5)."""
        return dataclasses.replace(cls.mla(), name="v3.2", index_topk=2048, index_key_bytes=132)

    @classmethod
    def mla(cls) -> BaselineModel:
        """DeepSeek-V3: dense MLA over all tokens, 656-byte FP8 entries. Projections
        ``q_a [1536, d]``, ``q_b [128 x 192, 1536]``, ``kv_a [576, d]``, ``kv_b [128 x 256, 512]``,
        ``o [d, 128 x 128]``; decode in absorbed form: per head and candidate a 576-d dot
        product and a 512-d weighted sum."""
        d = cls.hidden
        params = d * 1536 + 1536 * cls.heads * 192 + d * 576 + 512 * cls.heads * 256 + cls.heads * 128 * d
        return cls("v3-mla", params, 2 * (576 + 512) * cls.heads, 656)

    @classmethod
    def gqa8(cls) -> BaselineModel:
        """GQA with 8 KV heads of dim 128 in BF16 (4096 B per token and layer) on the V3
        backbone: 61 layers, 128 query heads of dim 128, dense attention over all tokens."""
        d, qd, kvd = cls.hidden, cls.heads * 128, 8 * 128
        return cls("gqa-8", d * qd + 2 * d * kvd + qd * d, 4 * cls.heads * 128, 2 * 2 * kvd)

    def active_params(self) -> dict[str, int]:
        """Attention linears, experts (3 dense layers; 58 MoE layers with 8 routed + 1 shared
        experts and a router over 256), the indexer's ``wq_b [64 x 128, 1536]``, ``wk [128, d]``
        and ``weights_proj [64, d]`` when there is one, and the LM head: 36.6 B for V3 (37.5 B
        with the embedding; published: 37 B)."""
        d, layers = self.hidden, self.num_layers
        indexer = 1536 * self.index_heads * self.index_head_dim + d * self.index_head_dim + d * self.index_heads
        return {
            "projections": layers * self.attention_params,
            "experts": 3 * 3 * d * 18432 + (layers - 3) * ((8 + 1) * 3 * d * 2048 + 256 * d),
            "indexer": layers * indexer if self.index_topk else 0,
            "lm_head": self.vocab * d,
        }

    def flops(self, context: int) -> dict[str, int]:
        """FLOPs of one decode token at ``context``: the indexer scores all ``L`` tokens
        (``2 * 64 * 128 * L`` per layer), attention covers ``min(top-k, L)`` candidates, or all
        ``L`` without an indexer."""
        context = _check_context(context)
        candidates = min(self.index_topk, context) if self.index_topk else context
        scored = context if self.index_topk else 0
        extra = {
            "indexer": self.num_layers * 2 * self.index_heads * self.index_head_dim * scored,
            "attention": self.num_layers * self.flops_per_candidate * candidates,
        }
        return _flops(self.active_params(), extra)

    def kv_bytes(self, context: int) -> dict[str, int]:
        """``entry_bytes`` and ``index_key_bytes`` per token and layer, without paging."""
        context = _check_context(context)
        return {
            "entries": self.num_layers * self.entry_bytes * context,
            "index_keys": self.num_layers * self.index_key_bytes * context,
        }

    def cost(self, context: int) -> Cost:
        """FLOPs of a decode token and cache bytes at ``context`` tokens."""
        kv = self.kv_bytes(context)
        return Cost(self.name, context, self.flops(context), kv, sum(kv.values()))


def models(main_format: str = "fp8", index_format: str = "fp4") -> list[V4Model | BaselineModel]:
    """V4-Pro and V4-Flash with the given cache formats, then the baselines V3.2, V3 (dense MLA)
    and GQA-8."""
    formats = dict(main_format=main_format, index_format=index_format)
    baselines = [BaselineModel.v3_2(), BaselineModel.mla(), BaselineModel.gqa8()]
    return [V4Model.pro(**formats), V4Model.flash(**formats), *baselines]


def compare(
    contexts: tuple[int, ...] = CONTEXTS, main_format: str = "fp8", index_format: str = "fp4"
) -> list[dict[str, Any]]:
    """One row per model (see :func:`models`) and context: :meth:`Cost.as_dict` plus
    ``flops_vs_v3.2``, ``flops_vs_gqa-8``, ``kv_bytes_vs_v3.2`` and ``kv_bytes_vs_gqa-8``, the
    ratios of total FLOPs and of all bytes held to those of the baselines at the same context."""
    if not contexts:
        raise ValueError("contexts: expected at least one context length, got none")
    contexts = tuple(_check_context(c) for c in contexts)
    every = models(main_format, index_format)
    costs = {(m.name, c): m.cost(c) for m in every for c in contexts}
    rows = []
    for m in every:
        for c in contexts:
            cost, row = costs[m.name, c], costs[m.name, c].as_dict()
            for base in ("v3.2", "gqa-8"):
                row[f"flops_vs_{base}"] = cost.total_flops / costs[base, c].total_flops
                row[f"kv_bytes_vs_{base}"] = cost.total_kv_bytes / costs[base, c].total_kv_bytes
            rows.append(row)
    return rows


PLOT_INSTALL = "pip install 'dsv4rs[plot]' (or pip install matplotlib)"
"""How to get what :func:`plot` needs."""


def plot_formats() -> tuple[str, ...]:
    """The file extensions :func:`plot` can write (matplotlib's Agg formats); ImportError
    without matplotlib."""
    import matplotlib  # noqa: F401  (first: a missing matplotlib raises here)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return tuple(FigureCanvasAgg.get_supported_filetypes())


def plot(path: str, main_format: str = "fp8", index_format: str = "fp4") -> None:
    """Draws FLOPs per decode token and KV bytes per token of every model against context
    length (1K to 1M tokens, log scales) into the image file ``path``, in the format its
    extension names (``.png``, ``.svg``, ``.pdf``, ...; PNG without one; needs matplotlib:
    :data:`PLOT_INSTALL`). The image is rendered in memory and then written, so a failed write (a full disk) raises
    ``OSError``; an unknown extension raises ``ValueError`` naming ``path``."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path, got {type(path).__name__}")
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    try:
        import matplotlib
    except ImportError:
        raise ImportError(f"dsv4rs.cost.plot needs matplotlib: {PLOT_INSTALL}") from None
    if ext not in plot_formats():
        raise ValueError(f"path: {path!r} names no image format matplotlib writes (one of {', '.join(plot_formats())})")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = tuple(round(2 ** (10 + i / 4)) for i in range(41))
    fig, (ax_flops, ax_bytes) = plt.subplots(1, 2, figsize=(12, 5))
    for m in models(main_format, index_format):
        costs = [m.cost(c) for c in contexts]
        ax_flops.plot(contexts, [c.total_flops / 1e9 for c in costs], label=m.name)
        ax_bytes.plot(contexts, [c.kv_bytes_per_token for c in costs], label=m.name)
    for ax, ylabel in ((ax_flops, "GFLOP per decode token"), (ax_bytes, "KV-cache bytes per token (all held)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.4)
        ax.legend()
    ax_flops.set_title("Decode FLOPs per token")
    ax_bytes.set_title(f"KV cache per token (V4: {main_format} entries, {index_format} indexer keys)")
    fig.suptitle("DeepSeek-V4 cost against context length, with V3.2, V3 (dense MLA) and GQA-8")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format=ext, dpi=120)
    plt.close(fig)
    with open(path, "wb") as f:
        f.write(image.getvalue())
