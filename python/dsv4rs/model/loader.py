"""Loading safetensors checkpoints of DeepSeek-V4 (:func:`load_checkpoint`).

Names: transformers' (``model.layers.0.self_attn.q_a_proj.weight``; also the names its
``save_pretrained`` writes, ``model.layers.0.attn.wq_a.weight``) and DeepSeek's
(``layers.0.attn.wq_a.weight``, ``embed.weight``, ``mtp.0.*``) are mapped onto
:class:`~dsv4rs.model.DeepseekV4`'s, which are transformers' names.

Weights on disk (docs/model.md section 9): float32/bfloat16 tensors; FP8 e4m3 with a ``.scale`` (UE8M0,
``float8_e8m0fnu``) or ``.weight_scale_inv`` (float32) companion per 128x128 block; MXFP4 experts
(``int8``/``uint8`` holding two e2m1 values per byte, low nibble first, with a UE8M0 scale per 32
values). Quantized weights are dequantized on load (dsv4rs has no FP8 or FP4 matmul).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import torch
from tqdm import tqdm

from dsv4rs.model.config import V4Config
from dsv4rs.model.model import DeepseekV4, set_dtype

FP8_BLOCK = 128
FP4_BLOCK = 32
_FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])

# DeepSeek's names -> transformers', in the order transformers applies them.
_RENAMES: list[tuple[str, str]] = [
    (r"\.attn\.", ".self_attn."),
    (r"\.ffn\.", ".mlp."),
    (r"\.indexer\.compressor\.", ".compressor.indexer."),
    (r"^embed\.weight$", "embed_tokens.weight"),
    (r"^head\.weight$", "lm_head.weight"),
    (r"(^|\.)hc_head_fn$", r"\1hc_head.hc_fn"),
    (r"(^|\.)hc_head_base$", r"\1hc_head.hc_base"),
    (r"(^|\.)hc_head_scale$", r"\1hc_head.hc_scale"),
    (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_(attn|ffn)_(fn|base|scale)$", r".\1_hc.\2"),
    (r"\.attn_sink$", ".sinks"),
    (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
    (r"\.indexer\.wq_b\.", ".compressor.indexer.q_b_proj."),
    (r"\.(self_attn|compressor|indexer)\.norm\.", r".\1.kv_norm."),
    (r"\.ape$", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."),
    (r"\.self_attn\.wq_b\.", ".self_attn.q_b_proj."),
    (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."),
    (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."),
    (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
    (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."),
    (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."),
    (r"\.shared_experts\.w3\.", ".shared_experts.up_proj."),
]
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(w1|w2|w3)\.weight$")
_BACKBONE = ("layers.", "embed_tokens.", "norm.", "hc_head.")


def canonical_name(name: str) -> str:
    """The :class:`DeepseekV4` name of a checkpoint tensor name (either spelling)."""
    for pattern, repl in _RENAMES:
        name = re.sub(pattern, repl, name)
    if name.startswith(_BACKBONE):
        name = "model." + name
    return name


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names the tensor."""


# -- reading ---------------------------------------------------------------------------------------


def _shards(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"path: {index} is not a safetensors index ({e})") from None
        missing = [s for s in files if not os.path.exists(os.path.join(path, s))]
        if missing:
            raise CheckpointError(f"path: the index lists {missing[0]}, which is missing")
        return [os.path.join(path, s) for s in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"path: no .safetensors files in {path}")
    return [os.path.join(path, f) for f in files]


def _e8m0(scale: torch.Tensor, name: str) -> torch.Tensor:
    """UE8M0 scales (``float8_e8m0fnu`` or raw ``uint8``) as float32 powers of two."""
    raw = scale.view(torch.uint8) if scale.dtype in (torch.float8_e8m0fnu, torch.int8) else scale
    if raw.dtype != torch.uint8:
        return scale.float()
    if (raw == 255).any():
        raise CheckpointError(f"{name}: NaN scale (UE8M0 code 255)")
    return torch.exp2(raw.to(torch.float32) - 127)


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, name: str) -> torch.Tensor:
    """FP8 e4m3 ``[out, in]`` times one scale per 128x128 block ``[ceil(out/128), ceil(in/128)]``."""
    rows, cols = weight.shape
    want = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
    if tuple(scale.shape) != want:
        raise CheckpointError(f"{name}: FP8 scale has shape {list(scale.shape)}, expected {list(want)}")
    s = _e8m0(scale, name)
    s = s.repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]
    return weight.float() * s


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, name: str) -> torch.Tensor:
    """MXFP4 ``[out, in / 2]`` bytes (low nibble first) times one scale per 32 values."""
    rows, half = packed.shape
    cols = 2 * half
    if cols % FP4_BLOCK or tuple(scale.shape) != (rows, cols // FP4_BLOCK):
        raise CheckpointError(f"{name}: FP4 scale has shape {list(scale.shape)}, expected [{rows}, {cols // FP4_BLOCK}]")
    b = packed.view(torch.uint8).to(torch.int64)
    codes = torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)
    values = _FP4_VALUES[codes].view(rows, -1, FP4_BLOCK)
    return (values * _e8m0(scale, name)[..., None]).flatten(-2)


class _Shards:
    """Lazy access to every tensor of a checkpoint by name, whichever shard holds it."""

    def __init__(self, files: list[str]) -> None:
        from safetensors import SafetensorError, safe_open

        self._open, self.where = safe_open, {}
        for file in files:
            try:
                with safe_open(file, framework="pt") as f:
                    for k in f.keys():
                        if k in self.where:
                            raise CheckpointError(f"{k}: present in two shards ({os.path.basename(self.where[k])}, "
                                                  f"{os.path.basename(file)})")
                        self.where[k] = file
            except SafetensorError as e:
                raise CheckpointError(f"{os.path.basename(file)}: not a readable safetensors file ({e})") from None

    def get(self, key: str) -> torch.Tensor:
        with self._open(self.where[key], framework="pt") as f:
            return f.get_tensor(key)

    def read(self, key: str, expect: torch.Size) -> torch.Tensor:
        """One tensor, dequantized when it has a scale companion."""
        t = self.get(key)
        base = key[: -len("weight")] if key.endswith("weight") else None
        scale_key = next((k for k in (f"{base}scale" if base else None, f"{key}_scale_inv") if k and k in self.where),
                         None)
        if (t.dtype in (torch.int8, torch.uint8) and scale_key is not None and t.dim() == 2
                and 2 * t.shape[-1] == expect[-1]):
            return dequantize_fp4(t, self.get(scale_key), key)
        if t.dtype == torch.float8_e4m3fn:
            if scale_key is None:
                raise CheckpointError(f"{key}: FP8 weight without a .scale or .weight_scale_inv companion")
            return dequantize_fp8(t, self.get(scale_key), key)
        if t.dtype in (torch.float8_e5m2, torch.float8_e8m0fnu):
            raise CheckpointError(f"{key}: unsupported dtype {t.dtype}")
        return t


def _is_scale(key: str, keys: Mapping[str, str]) -> bool:
    return (key.endswith(".scale") and key[: -len("scale")] + "weight" in keys) or (
        key.endswith(".weight_scale_inv") and key[: -len("_scale_inv")] in keys)


def load_checkpoint(path: str | os.PathLike[str], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    progress: bool = True, strict: bool = True) -> DeepseekV4:
    """Loads ``path`` (``config.json`` and safetensors shards) into a :class:`DeepseekV4`.

    Shards are read one at a time, each tensor checked (name, shape, finite values) and copied
    into place; quantized weights are dequantized. ``strict`` refuses unknown tensors (an MTP
    block the config lacks is skipped, as transformers does) and reports missing ones. Errors are
    :class:`CheckpointError` naming the tensor. mHC, sink, norm and positional-bias parameters stay
    float32 whatever ``dtype``.
    """
    path = os.fspath(path)
    cfg = V4Config.from_pretrained(path)
    model = DeepseekV4(cfg)
    params = model.checkpoint_tensors()
    filled: dict[str, int] = {}
    reader = _Shards(_shards(path))
    by_shard: dict[str, list[str]] = {}
    for key, file in reader.where.items():
        by_shard.setdefault(file, []).append(key)
    for file in tqdm(sorted(by_shard), desc="loading shards", unit="shard", disable=not progress):
        keys = by_shard[file]
        for key in sorted(keys):
            if not _is_scale(key, reader.where):
                _load_one(reader, key, cfg, params, filled, strict)
    missing = [n for n, p in params.items() if filled.get(n, 0) != p.numel() and not n.startswith("mtp.")]
    mtp_missing = [n for n, p in params.items() if n.startswith("mtp.") and filled.get(n, 0) != p.numel()]
    if mtp_missing and len(mtp_missing) < sum(n.startswith("mtp.") for n in params):
        missing += mtp_missing  # a partial MTP block is an error; an absent one is allowed
    elif mtp_missing:
        model.mtp = torch.nn.ModuleList()
    if missing:
        raise CheckpointError(f"{missing[0]}: missing from the checkpoint ({len(missing)} tensors missing)")
    return set_dtype(model, dtype).to(device)


def _load_one(reader: _Shards, key: str, cfg: V4Config, params: dict[str, torch.Tensor], filled: dict[str, int],
              strict: bool) -> None:
    name = canonical_name(key)
    if name.startswith("mtp.") and not cfg.num_nextn_predict_layers:
        return
    if name.endswith(("rotary_emb.inv_freq", "original_inv_freq")):
        return
    m = _EXPERT.match(name)
    if m:
        prefix, e, w = m.group(1), int(m.group(2)), m.group(3)
        target = f"{prefix}.gate_up_proj" if w in ("w1", "w3") else f"{prefix}.down_proj"
        if target not in params:
            raise CheckpointError(f"{key}: no such expert tensor in the model ({target})")
        p = params[target]
        if e >= p.shape[0]:
            raise CheckpointError(f"{key}: expert {e} >= n_routed_experts = {p.shape[0]}")
        inner = cfg.moe_intermediate_size
        view = p.data[e, :inner] if w == "w1" else p.data[e, inner:] if w == "w3" else p.data[e]
        _copy(key, view, reader.read(key, view.shape), cfg)
        filled[target] = filled.get(target, 0) + view.numel()
        return
    if name not in params:
        if strict:
            raise CheckpointError(f"{key}: unexpected tensor (no parameter {name} in this model)")
        return
    p = params[name]
    _copy(key, p.data, reader.read(key, p.shape), cfg)
    filled[name] = p.numel()


def _copy(key: str, dst: torch.Tensor, t: torch.Tensor, cfg: V4Config) -> None:
    if tuple(t.shape) != tuple(dst.shape):
        raise CheckpointError(f"{key}: shape {list(t.shape)}, expected {list(dst.shape)}")
    if dst.is_floating_point():
        if not t.is_floating_point():
            raise CheckpointError(f"{key}: dtype {t.dtype}, expected a floating-point tensor")
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{key}: non-finite values")
    elif t.is_floating_point():
        raise CheckpointError(f"{key}: dtype {t.dtype}, expected an integer tensor")
    elif t.numel() and (int(t.min()) < 0 or int(t.max()) >= cfg.n_routed_experts):
        raise CheckpointError(f"{key}: expert ids must lie in [0, {cfg.n_routed_experts})")
    dst.copy_(t)
