"""The model's hyper-parameters (docs/model.md section 1), read from a Hugging Face ``config.json``.

Both spellings a user brings are accepted: the one transformers' ``DeepseekV4Config`` saves
(``layer_types``, ``mlp_layer_types``, ``compress_rates``, nested ``rope_parameters``) and the one
DeepSeek ships (``compress_ratios``, ``num_hash_layers``, ``qk_rope_head_dim``, ``rope_scaling``).

This module does not import torch: the cost model (``dsv4rs cost``) and planners use it alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
import struct
import sys
from collections.abc import Mapping
from typing import Any

from dsv4rs import _core

SWA, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
LAYER_TYPES = (SWA, CSA, HCA)
"""Attention layer types, as transformers names them."""
MLP_TYPES = ("hash_moe", "moe")
_RATIO_TO_TYPE = {0: SWA, 4: CSA, 128: HCA}

ENTRY_DIM: int = _core.ENTRY_DIM
"""``head_dim``: the dsv4rs attention ops take 512-dim K = V entries (448 NoPE + 64 RoPE)."""
ROPE_DIM: int = _core.ROPE_DIM
INDEX_DIM: int = _core.INDEX_DIM


UPPER_BOUNDS: dict[str, tuple[int, str]] = {
    "vocab_size": (1 << 24, "16M tokens; V4 has 129,280"),
    "hidden_size": (1 << 16, "V4-Pro has 7,168"),
    "num_hidden_layers": (1024, "V4-Pro has 61"),
    "num_attention_heads": (1024, "V4-Pro has 128"),
    "q_lora_rank": (1 << 16, "V4-Pro has 1,536"),
    "o_lora_rank": (1 << 16, "V4-Pro has 1,024"),
    "o_groups": (1024, "V4-Pro has 16"),
    "moe_intermediate_size": (1 << 17, "V4-Pro has 3,072"),
    "n_routed_experts": (1 << 16, "V4-Pro has 384"),
    "sliding_window": (1 << 16, "V4 has 128"),
    "index_n_heads": (64, "the GPU indexer takes at most 64 heads"),
    "index_topk": (4096, "the GPU indexer selects at most 4096 keys"),
    "hc_mult": (8, "the mHC kernel takes at most 8 streams"),
    "hc_sinkhorn_iters": (1000, "V4 runs 20"),
    "max_position_embeddings": ((1 << 31) - 1, "the kernels address rows with int32 ids"),
}
"""Upper bounds of the integer keys: beyond them a model cannot run here (a kernel limit) or
its size is absurd (and building it would try to allocate terabytes)."""


IGNORED_KEYS: dict[str, str] = {
    "output_router_logits": "training: the router's auxiliary loss",
    "router_aux_loss_coef": "training: the router's auxiliary loss",
    "router_jitter_noise": "training: noise on the router's input",
    "attention_dropout": "training: dropout",
    "initializer_range": "training: random initialization",
    "use_cache": "transformers' generation switch; dsv4rs always decodes from its paged cache",
    "pad_token_id": "a tokenizer id, not the model's",
    "bos_token_id": "a tokenizer id (dsv4rs.LLM reads the tokenizer's)",
    "eos_token_id": "a tokenizer id (dsv4rs.LLM reads it from config.json itself)",
}
"""Keys of transformers' ``DeepseekV4Config`` that do not change the inference model, ignored
(every other key is read, or refused when its value is not V4's)."""


@dataclasses.dataclass(frozen=True)
class YaRN:
    """YaRN parameters of the compressed layers' RoPE (docs/model.md section 2); no mscale."""

    factor: float = 16.0
    original_max_position_embeddings: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclasses.dataclass(frozen=True)
class V4Config:
    """DeepSeek-V4 hyper-parameters. Field names follow transformers' ``DeepseekV4Config``.

    ``layer_types[i]`` is the attention of layer ``i`` (:data:`LAYER_TYPES`) and
    ``mlp_layer_types[i]`` its MoE routing (``"hash_moe"``: experts from the token id,
    ``"moe"``: learned top-k). Build one with :meth:`from_dict`, :meth:`from_pretrained` or a
    preset (:meth:`v4_pro`, :meth:`v4_flash`, :meth:`tiny`); every constructor validates.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    layer_types: tuple[str, ...]
    mlp_layer_types: tuple[str, ...]
    n_shared_experts: int = 1
    head_dim: int = ENTRY_DIM
    qk_rope_head_dim: int = ROPE_DIM
    sliding_window: int = 128
    compress_rates: tuple[int, int] = (4, 128)
    index_n_heads: int = 64
    index_head_dim: int = INDEX_DIM
    index_topk: int = 512
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    yarn: YaRN | None = YaRN()
    num_nextn_predict_layers: int = 1
    max_position_embeddings: int = 1 << 20
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for key in ("layer_types", "mlp_layer_types", "compress_rates"):
            v = getattr(self, key)
            if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
                raise ValueError(f"config {key}: expected a list, got {v!r}")
            object.__setattr__(self, key, tuple(v))
        if len(self.compress_rates) != 2 or not all(isinstance(r, int) and not isinstance(r, bool)
                                                    for r in self.compress_rates):
            raise ValueError(f"config compress_rates: expected two ints, got {self.compress_rates!r}")
        self._validate()

    def _validate(self) -> None:
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ValueError(f"config {key}: {why}")

        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "int":
                need(isinstance(v, int) and not isinstance(v, bool), f.name, f"expected an int, got {v!r}")
            elif f.type == "bool":
                need(isinstance(v, bool), f.name, f"expected true or false, got {v!r}")
            elif f.type == "float":
                need(isinstance(v, (int, float)) and not isinstance(v, bool), f.name, f"expected a number, got {v!r}")
                if isinstance(v, int):  # held as a float, as torch and the kernels take it
                    need(abs(v) <= sys.float_info.max, f.name,
                         f"an int of {v.bit_length()} bits is past a float's range")
                    object.__setattr__(self, f.name, float(v))
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank",
                    "o_groups", "o_lora_rank", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok",
                    "sliding_window", "index_n_heads", "index_topk", "hc_mult", "hc_sinkhorn_iters",
                    "max_position_embeddings"):
            need(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        for key, (most, why) in UPPER_BOUNDS.items():
            need(getattr(self, key) <= most, key, f"must be <= {most:,} ({why}), got {getattr(self, key):,}")
        need(self.head_dim == ENTRY_DIM, "head_dim", f"dsv4rs attends {ENTRY_DIM}-dim entries, got {self.head_dim}")
        need(self.qk_rope_head_dim == ROPE_DIM, "qk_rope_head_dim", f"must be {ROPE_DIM}, got {self.qk_rope_head_dim}")
        need(self.index_head_dim == INDEX_DIM, "index_head_dim", f"must be {INDEX_DIM}, got {self.index_head_dim}")
        need(self.compress_rates == (4, 128), "compress_rates",
             f"dsv4rs implements CSA at 4 and HCA at 128, got {self.compress_rates}")
        need(self.num_attention_heads % self.o_groups == 0, "o_groups",
             f"{self.o_groups} groups do not divide {self.num_attention_heads} heads")
        need(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
             f"{self.num_experts_per_tok} > n_routed_experts = {self.n_routed_experts}")
        need(self.n_shared_experts == 1, "n_shared_experts",
             f"V4 has exactly 1 shared expert (transformers builds one, DeepSeek's code asserts it), "
             f"got {self.n_shared_experts}")
        need(len(self.layer_types) == self.num_hidden_layers, "layer_types",
             f"{len(self.layer_types)} entries for num_hidden_layers = {self.num_hidden_layers}")
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        need(not bad, "layer_types", f"entries must be one of {LAYER_TYPES}, got {bad}")
        need(len(self.mlp_layer_types) == self.num_hidden_layers, "mlp_layer_types",
             f"{len(self.mlp_layer_types)} entries for num_hidden_layers = {self.num_hidden_layers}")
        bad = [t for t in self.mlp_layer_types if t not in MLP_TYPES]
        need(not bad, "mlp_layer_types", f"entries must be one of {MLP_TYPES}, got {bad}")
        need(self.scoring_func == "sqrtsoftplus", "scoring_func", f'dsv4rs routes with "sqrtsoftplus", got {self.scoring_func!r}')
        for key in ("routed_scaling_factor", "swiglu_limit", "rms_norm_eps", "hc_eps", "rope_theta", "compress_rope_theta"):
            v = getattr(self, key)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, key, f"must be a finite number > 0, got {v!r}")
        need(self.rope_theta > 1 and self.compress_rope_theta > 1, "rope_theta", "RoPE bases must be > 1")
        need(self.num_nextn_predict_layers in (0, 1), "num_nextn_predict_layers",
             f"dsv4rs implements 0 or 1 MTP block, got {self.num_nextn_predict_layers}")
        if self.yarn is not None:
            y = self.yarn
            need(y.factor > 0 and y.original_max_position_embeddings > 0 and y.beta_fast > y.beta_slow > 0,
                 "rope_scaling", f"invalid YaRN parameters {y}")

    # -- derived -------------------------------------------------------------------------------

    @property
    def compress_ratios(self) -> tuple[int, ...]:
        """Per layer 0 (SWA), 4 (CSA) or 128 (HCA), then 0 for the MTP block if there is one:
        the list :class:`dsv4rs.cache.CacheConfig` takes."""
        ratio = {SWA: 0, CSA: self.compress_rates[0], HCA: self.compress_rates[1]}
        return tuple(ratio[t] for t in self.layer_types) + (0,) * self.num_nextn_predict_layers

    def inv_freq(self, compressed: bool) -> tuple[float, ...]:
        """The 32 RoPE inverse frequencies (docs/model.md section 2) computed in float64, then
        rounded to float32: plain ``rope_theta`` for SWA-only layers, ``compress_rope_theta``
        with YaRN for CSA/HCA layers and their compressors. The model takes
        :func:`dsv4rs.model.layers.rotary.inv_freq` instead, which computes in float32 as
        transformers and DeepSeek do (the last bit differs in about a third of the entries)."""
        theta = self.compress_rope_theta if compressed else self.rope_theta
        yarn = self.yarn if compressed else None
        return tuple(_float32(f) for f in rope_inv_freq(ROPE_DIM, theta, yarn))

    @property
    def hash_layers(self) -> int:
        """Layers whose experts come from the token id (``num_hash_layers``)."""
        return sum(t == "hash_moe" for t in self.mlp_layer_types)

    # -- constructors --------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> V4Config:
        """From a ``config.json`` dict in any of its spellings: transformers' (``DeepseekV4Config``),
        the hub's legacy keys (``compress_ratios``, ``num_hash_layers``, ``qk_rope_head_dim``,
        ``rope_scaling``) or DeepSeek's ``inference/config.json`` (``dim``, ``n_layers``,
        ``n_heads``, ...: see :func:`from_inference_dict`). Unknown keys are ignored; a missing
        required key or an invalid value raises ``ValueError`` naming it."""
        if not isinstance(d, Mapping):
            raise ValueError(f"config: expected a JSON object of keys, got {type(d).__name__}")
        d = dict(d)
        if "num_hidden_layers" not in d and "n_layers" in d:
            d = from_inference_dict(d)
        mt = d.get("model_type")
        if mt not in (None, "deepseek_v4"):
            raise ValueError(f'config model_type: expected "deepseek_v4", got {mt!r}')
        n = d.get("num_hidden_layers")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"config num_hidden_layers: expected an int >= 1, got {n!r}")
        most = UPPER_BOUNDS["num_hidden_layers"][0]
        if n > most:
            raise ValueError(f"config num_hidden_layers: must be <= {most:,} ({UPPER_BOUNDS['num_hidden_layers'][1]}), "
                             f"got {n:,}")

        rates = d.get("compress_rates") or {}
        if not isinstance(rates, Mapping):
            raise ValueError(f"config compress_rates: expected a mapping, got {rates!r}")
        csa = _int(rates.get(CSA, d.get("compress_rate_csa", 4)), "compress_rates")
        hca = _int(rates.get(HCA, d.get("compress_rate_hca", 128)), "compress_rates")
        layer_types = _list(d.get("layer_types"), "layer_types")
        ratios = _list(d.get("compress_ratios"), "compress_ratios")
        if layer_types is None and ratios is not None:
            by_ratio = {0: SWA, csa: CSA, hca: HCA}
            unknown = [r for r in ratios[:n] if isinstance(r, bool) or not isinstance(r, int) or r not in by_ratio]
            if unknown:
                raise ValueError(f"config compress_ratios: entries must be 0, {csa} or {hca}, got {unknown}")
            layer_types = [by_ratio[r] for r in ratios[:n]]
        if layer_types is None:  # transformers' default: two HCA layers, then CSA/HCA alternating
            layer_types = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
        mlp_types = _list(d.get("mlp_layer_types"), "mlp_layer_types")
        if mlp_types is None:
            hashed = _int(d.get("num_hash_layers", 3), "num_hash_layers")
            if hashed < 0:
                raise ValueError(f"config num_hash_layers: must be >= 0, got {hashed}")
            mlp_types = ["hash_moe"] * min(n, hashed) + ["moe"] * max(0, n - hashed)

        rope_dim = d.get("qk_rope_head_dim")
        head_dim = d.get("head_dim", ENTRY_DIM)
        if rope_dim is None:
            prf = d.get("partial_rotary_factor")
            if prf is not None and (isinstance(prf, bool) or not isinstance(prf, (int, float)) or not math.isfinite(prf)
                                    or not isinstance(head_dim, int)):
                raise ValueError(f"config partial_rotary_factor: expected a number, got {prf!r}")
            rope_dim = ROPE_DIM if prf is None else round(head_dim * prf)
        yarn = _yarn(d)

        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: d[k] for k in known if k in d and k not in ("layer_types", "mlp_layer_types", "compress_rates", "yarn")}
        kwargs.update(layer_types=tuple(layer_types), mlp_layer_types=tuple(mlp_types), compress_rates=(csa, hca),
                      qk_rope_head_dim=rope_dim, yarn=yarn)
        for key in ("vocab_size", "hidden_size", "num_attention_heads", "q_lora_rank", "o_groups", "o_lora_rank",
                    "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok"):
            if key not in kwargs:
                raise ValueError(f"config {key}: missing")
        if d.get("num_key_value_heads", 1) != 1:
            raise ValueError(f"config num_key_value_heads: V4 has one shared K=V head, got {d['num_key_value_heads']}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f'config hidden_act: expected "silu", got {d["hidden_act"]!r}')
        for key in ("attention_bias", "mlp_bias"):
            if d.get(key, False) is not False:
                raise ValueError(f"config {key}: V4's linear layers have no bias, got {d[key]!r}")
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> V4Config:
        """From ``path/config.json`` (or ``path/inference/config.json`` when there is no
        ``config.json``; or a file's path): a regular file of at most :data:`CONFIG_LIMIT` bytes."""
        p = os.fspath(path)
        if os.path.isdir(p):
            hub, inference = os.path.join(p, "config.json"), os.path.join(p, "inference", "config.json")
            p = inference if not os.path.exists(hub) and os.path.isfile(inference) else hub
        try:
            d = read_json(p, CONFIG_LIMIT)
        except FileNotFoundError:
            raise FileNotFoundError(f"path: no config.json at {p}") from None
        return cls.from_dict(d)

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers ``DeepseekV4Config`` keyword arguments of this config."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("yarn", "compress_rates")}
        d["layer_types"], d["mlp_layer_types"] = list(self.layer_types), list(self.mlp_layer_types)
        d["compress_rates"] = {CSA: self.compress_rates[0], HCA: self.compress_rates[1]}
        d["partial_rotary_factor"] = self.qk_rope_head_dim / self.head_dim
        del d["qk_rope_head_dim"]
        if self.yarn is not None:
            d["rope_parameters"] = {"rope_type": "yarn", **dataclasses.asdict(self.yarn)}
        d["num_key_value_heads"] = 1
        return d

    # -- presets ---------------------------------------------------------------------------------

    @classmethod
    def v4_pro(cls) -> V4Config:
        """DeepSeek-V4-Pro (1.6T parameters): 61 layers, HCA x2 then CSA on even ids, HCA on odd."""
        return cls(vocab_size=129280, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
                   q_lora_rank=1536, o_groups=16, o_lora_rank=1024, moe_intermediate_size=3072,
                   n_routed_experts=384, num_experts_per_tok=6, index_topk=1024, routed_scaling_factor=2.5,
                   layer_types=_layer_types(_core.CacheLayout.v4_pro_ratios()),
                   mlp_layer_types=("hash_moe",) * 3 + ("moe",) * 58)

    @classmethod
    def v4_flash(cls) -> V4Config:
        """DeepSeek-V4-Flash (284B parameters): 43 layers, SWA x2 then CSA/HCA alternating."""
        return cls(vocab_size=129280, hidden_size=4096, num_hidden_layers=43, num_attention_heads=64,
                   q_lora_rank=1024, o_groups=8, o_lora_rank=1024, moe_intermediate_size=2048,
                   n_routed_experts=256, num_experts_per_tok=6, index_topk=512, routed_scaling_factor=1.5,
                   layer_types=_layer_types(_core.CacheLayout.v4_flash_ratios()),
                   mlp_layer_types=("hash_moe",) * 3 + ("moe",) * 40)

    @classmethod
    def demo(cls) -> V4Config:
        """The model of ``dsv4rs demo``: V4's structure (SWA, CSA and HCA layers, hash and learned
        routing, mHC, MTP, 512-dim entries, 128-token window, 4x and 128x compression) at a small
        width (27 M parameters)."""
        return cls.tiny(vocab_size=4096, hidden_size=256, num_hidden_layers=6, num_attention_heads=8,
                        q_lora_rank=128, o_groups=4, o_lora_rank=128, moe_intermediate_size=128,
                        n_routed_experts=16, num_experts_per_tok=2, index_n_heads=16, index_topk=32,
                        layer_types=(SWA, CSA, HCA, CSA, HCA, CSA), mlp_layer_types=("hash_moe",) * 2 + ("moe",) * 4)

    @classmethod
    def tiny(cls, **overrides: Any) -> V4Config:
        """A small model with V4's structure: SWA, CSA and HCA layers, two hash-routed MoE
        layers, MTP; 512-dim entries as the real model, everything else small."""
        base: dict[str, Any] = dict(
            vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, q_lora_rank=32,
            o_groups=2, o_lora_rank=32, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
            index_n_heads=16, index_topk=16, layer_types=(SWA, CSA, HCA, CSA),
            mlp_layer_types=("hash_moe", "hash_moe", "moe", "moe"), hc_sinkhorn_iters=20,
        )
        base.update(overrides)
        return cls(**base)


CONFIG_LIMIT = 4 << 20
"""The largest ``config.json`` read (4 MiB; V4's is a few KB)."""


def read_json(path: str, limit: int) -> Any:
    """The JSON value in the regular file ``path`` of at most ``limit`` bytes. A missing file
    raises ``FileNotFoundError``, anything else ``ValueError``, both naming ``path``; a device,
    a pipe or a file that keeps growing is never read past ``limit``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"path: no {os.path.basename(path)} at {path}") from None
    except OSError as e:
        raise ValueError(f"path: cannot read {path} ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"path: {path} is not a regular file")
    if st.st_size > limit:
        raise ValueError(f"path: {path} has {st.st_size:,} bytes, more than the {limit:,} a JSON file here may have")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise ValueError(f"path: cannot read {path} ({e.strerror or e})") from None
    if len(data) > limit:
        raise ValueError(f"path: {path} has more than the {limit:,} bytes a JSON file here may have")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"path: {path} is not valid JSON ({e})") from None


def _int(v: Any, key: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"config {key}: expected an int, got {v!r}")
    return v


def _list(v: Any, key: str) -> list | None:
    """A JSON list, or ``None`` when absent."""
    if v is None:
        return None
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"config {key}: expected a list, got {v!r}")
    return list(v)


def _layer_types(ratios: list[int]) -> tuple[str, ...]:
    """Layer types of a compress-ratio list whose last entry is the MTP layer (the cache layout's
    presets, which hold the released models' layer patterns)."""
    return tuple(_RATIO_TO_TYPE[r] for r in ratios[:-1])


def _float32(x: float) -> float:
    """``x`` rounded to the nearest float32."""
    return struct.unpack("f", struct.pack("f", x))[0]


def rope_inv_freq(rope_dim: int, theta: float, yarn: YaRN | None = None) -> list[float]:
    """RoPE inverse frequencies in float64 (docs/model.md section 2): ``theta^(-2j / rope_dim)``,
    with YaRN blended towards ``1 / factor`` over the correction range without mscale:
    ``low = floor(rope_dim ln(orig / (beta_fast 2 pi)) / (2 ln theta))`` (at least 0),
    ``high = ceil(rope_dim ln(orig / (beta_slow 2 pi)) / (2 ln theta))`` (at most rope_dim - 1),
    ``ramp_j = clamp((j - low) / (high - low), 0, 1)``; for V4's compressed layers the ramp is
    ``(j - 15) / 10``."""
    base = [theta ** (-(2 * j) / rope_dim) for j in range(rope_dim // 2)]
    if yarn is None:
        return base

    low, width = yarn_ramp_bounds(rope_dim, theta, yarn)
    ramps = (min(max((j - low) / width, 0.0), 1.0) for j in range(rope_dim // 2))
    return [f * (1 - r) + f / yarn.factor * r for f, r in zip(base, ramps)]


INFERENCE_KEYS: dict[str, str] = {
    "dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
    "moe_inter_dim": "moe_intermediate_size", "n_activated_experts": "num_experts_per_tok",
    "n_hash_layers": "num_hash_layers", "n_mtp_layers": "num_nextn_predict_layers", "score_func": "scoring_func",
    "route_scale": "routed_scaling_factor", "rope_head_dim": "qk_rope_head_dim", "norm_eps": "rms_norm_eps",
    "window_size": "sliding_window",
    **{k: k for k in ("vocab_size", "n_routed_experts", "n_shared_experts", "swiglu_limit", "q_lora_rank", "head_dim",
                      "o_groups", "o_lora_rank", "compress_ratios", "compress_rope_theta", "rope_theta",
                      "index_n_heads", "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters", "hc_eps")},
}
"""DeepSeek's ``inference/config.json`` keys (its ``ModelArgs`` fields) -> ``V4Config``'s. The
YaRN keys (``original_seq_len``, ``rope_factor``, ``beta_fast``, ``beta_slow``) become
``rope_scaling``; the runtime keys (``max_batch_size``, ``max_seq_len``, ``dtype``, ``scale_fmt``,
``expert_dtype``, ``scale_dtype``) describe DeepSeek's run, not the model, and are ignored."""

INFERENCE_REQUIRED = ("vocab_size", "dim", "n_layers", "n_heads", "moe_inter_dim", "n_routed_experts",
                      "n_activated_experts", "compress_ratios")
"""Keys an ``inference/config.json`` must hold: the model's shape. The others default as
DeepSeek's ``ModelArgs`` does (:data:`INFERENCE_DEFAULTS`)."""

INFERENCE_DEFAULTS: dict[str, Any] = {
    "n_hash_layers": 0, "n_mtp_layers": 1, "n_shared_experts": 1, "score_func": "sqrtsoftplus", "route_scale": 1.0,
    "swiglu_limit": 0.0, "q_lora_rank": 1024, "head_dim": 512, "rope_head_dim": 64, "norm_eps": 1e-6, "o_groups": 8,
    "o_lora_rank": 1024, "window_size": 128, "compress_rope_theta": 40000.0, "original_seq_len": 0,
    "rope_theta": 10000.0, "rope_factor": 40.0, "beta_fast": 32, "beta_slow": 1, "index_n_heads": 64,
    "index_head_dim": 128, "index_topk": 512, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6,
}
"""``ModelArgs``' defaults, which DeepSeek's code uses for a key its ``config.json`` leaves out
(so the same file builds the same model here and there). ``swiglu_limit`` 0 (no clamp) is then
refused by :class:`V4Config`: V4 clamps at 10."""


def from_inference_dict(d: Mapping[str, Any]) -> dict[str, Any]:
    """DeepSeek's ``inference/config.json`` spelling as the hub's: the dict :meth:`V4Config.from_dict`
    reads. YaRN applies to the compressed layers when ``original_seq_len > 0``, as DeepSeek's
    ``precompute_freqs_cis`` does; ``compress_ratios`` has an entry per layer, then the MTP
    layers'. A required key that is missing raises ``ValueError`` naming it."""
    for key in INFERENCE_REQUIRED:
        if d.get(key) is None:
            raise ValueError(f"config {key}: missing (DeepSeek's inference/config.json spelling)")
    full = {**INFERENCE_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
    out = {hub: full[key] for key, hub in INFERENCE_KEYS.items() if key in full}
    n, ratios = full["n_layers"], _list(full["compress_ratios"], "compress_ratios")
    if isinstance(n, int) and not isinstance(n, bool) and len(ratios) < n:
        raise ValueError(f"config compress_ratios: {len(ratios)} entries for n_layers = {n}")
    orig = full["original_seq_len"]
    if isinstance(orig, bool) or not isinstance(orig, (int, float)) or not math.isfinite(orig) or orig < 0:
        raise ValueError(f"config original_seq_len: expected a number >= 0, got {orig!r}")
    if orig > 0:
        out["rope_scaling"] = {"type": "yarn", "factor": full["rope_factor"], "original_max_position_embeddings": orig,
                               "beta_fast": full["beta_fast"], "beta_slow": full["beta_slow"]}
    if "model_type" in d:
        out["model_type"] = d["model_type"]
    return out


def yarn_ramp_bounds(rope_dim: int, theta: float, yarn: YaRN) -> tuple[int, float]:
    """``(low, high - low)`` of YaRN's ramp over the frequency index (``1e-3`` when they meet):
    ``low = floor(rope_dim ln(orig / (beta_fast 2 pi)) / (2 ln theta))`` (at least 0),
    ``high = ceil(rope_dim ln(orig / (beta_slow 2 pi)) / (2 ln theta))`` (at most rope_dim - 1)."""

    def correction_dim(rotations: float) -> float:
        return rope_dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), rope_dim - 1)
    return low, (high - low if high != low else 1e-3)


PRESETS = {"v4-pro": V4Config.v4_pro, "v4-flash": V4Config.v4_flash, "demo": V4Config.demo}
"""The presets by the names the command line takes."""


def preset(name: str) -> V4Config:
    """The config of a preset name (:data:`PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]()


def _yarn(d: Mapping[str, Any]) -> YaRN | None:
    """The compressed layers' YaRN from ``rope_parameters`` (transformers, nested under
    ``"compress"`` or flat) or ``rope_scaling`` (DeepSeek)."""
    rp = d.get("rope_parameters") or d.get("rope_scaling")
    if not rp:
        return None
    if not isinstance(rp, Mapping):
        raise ValueError(f"config rope_parameters: expected a mapping, got {rp!r}")
    if isinstance(rp.get("compress"), Mapping):
        rp = rp["compress"]
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise ValueError(f'config rope_parameters: dsv4rs implements "default" and "yarn" RoPE, got {kind!r}')
    if rp.get("attention_factor", 1.0) != 1.0 or rp.get("mscale") not in (None, 0, 1) and rp.get("mscale_all_dim") != rp.get("mscale"):
        raise ValueError("config rope_parameters: V4 applies no YaRN attention factor (mscale)")
    if rp.get("truncate", True) is not True:
        raise ValueError("config rope_parameters: truncate=False is not supported")
    for key in ("factor", "original_max_position_embeddings"):
        if key not in rp:
            raise ValueError(f"config rope_parameters: yarn needs {key!r}")
    values = {k: rp.get(k) for k in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow")}
    for key, v in values.items():
        required = key in ("factor", "original_max_position_embeddings")
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= sys.float_info.max
        if (v is not None or required) and not number:
            raise ValueError(f"config rope_parameters: {key} must be a finite number, got {v!r:.60}")
    orig = values["original_max_position_embeddings"]
    if orig != int(orig):
        raise ValueError(f"config rope_parameters: original_max_position_embeddings must be an int, got {orig!r}")
    return YaRN(float(values["factor"]), int(orig), float(values["beta_fast"] or 32), float(values["beta_slow"] or 1))
