"""Safetensors checkpoints of DeepSeek-V4: load (:func:`load_checkpoint`) and export in
DeepSeek's quantized layout (:func:`export_deepseek`).

Names: transformers' (``model.layers.0.self_attn.q_a_proj.weight``; also the names its
``save_pretrained`` writes, ``model.layers.0.attn.wq_a.weight``) and DeepSeek's
(``layers.0.attn.wq_a.weight``, ``embed.weight``, ``mtp.0.*``) are mapped onto
:class:`~dsv4rs.model.DeepseekV4`'s, which are transformers' names.

Weights on disk (SPEC.md section 9): float32/bfloat16 tensors; FP8 e4m3 with a ``.scale`` (UE8M0,
``float8_e8m0fnu``) or ``.weight_scale_inv`` (float32) companion per 128x128 block; MXFP4 experts
(``int8``/``uint8`` holding two e2m1 values per byte, low nibble first, with a UE8M0 scale per 32
values). Quantized weights are dequantized on load (dsv4rs has no FP8 or FP4 matmul).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping

import torch
from tqdm import tqdm

from dsv4rs import reference
from dsv4rs.model.config import V4Config
from dsv4rs.model.modules import DeepseekV4

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
    params = dict(model.named_parameters()) | dict(model.named_buffers())
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
    keep_f32 = ("sinks", "position_bias", "norm.weight", "_hc.", "hc_head.", "e_score_correction_bias")
    for name, p in model.named_parameters():
        if p.is_floating_point() and not any(k in name for k in keep_f32):
            p.data = p.data.to(dtype)
    return model.to(device)


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


# -- writing DeepSeek's layout ------------------------------------------------------------------

_FP8_LINEARS = re.compile(r"\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b)\.weight$|\.indexer\.wq_b\.weight$|\.shared_experts\.w[123]\.weight$")


def _official_names(model: DeepseekV4) -> Iterator[tuple[str, str]]:
    """``(DeepSeek name, model name)`` for every tensor except the routed experts."""
    inverse = {canonical_name(k): k for k in _official_candidates(model)}
    for name in list(dict(model.named_parameters())) + [n for n, _ in model.named_buffers()]:
        if ".mlp.experts." in name:
            continue
        if name not in inverse:
            raise AssertionError(f"no DeepSeek name for {name}")
        yield inverse[name], name


def _official_candidates(model: DeepseekV4) -> Iterator[str]:
    """DeepSeek's names, generated from the model's structure."""
    yield from ("embed.weight", "head.weight", "norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale")
    blocks = [(f"layers.{i}", layer) for i, layer in enumerate(model.model.layers)]
    blocks += [(f"mtp.{i}", b) for i, b in enumerate(model.mtp)]
    for prefix, layer in blocks:
        a = f"{prefix}.attn"
        yield from (f"{a}.{w}.weight" for w in ("wq_a", "wq_b", "wkv", "wo_a", "wo_b", "q_norm", "kv_norm"))
        yield from (f"{a}.attn_sink", f"{prefix}.attn_norm.weight", f"{prefix}.ffn_norm.weight")
        yield from (f"{prefix}.hc_{g}_{p}" for g in ("attn", "ffn") for p in ("fn", "base", "scale"))
        yield from (f"{prefix}.ffn.gate.weight", f"{prefix}.ffn.gate.bias", f"{prefix}.ffn.gate.tid2eid")
        yield from (f"{prefix}.ffn.shared_experts.w{i}.weight" for i in (1, 2, 3))
        for c in (f"{a}.compressor", f"{a}.indexer.compressor"):
            yield from (f"{c}.wkv.weight", f"{c}.wgate.weight", f"{c}.ape", f"{c}.norm.weight")
        yield from (f"{a}.indexer.wq_b.weight", f"{a}.indexer.weights_proj.weight")
        if prefix.startswith("mtp."):
            yield from (f"{prefix}.{w}.weight" for w in ("e_proj", "h_proj", "enorm", "hnorm", "norm"))
            yield from (f"{prefix}.hc_head_{p}" for p in ("fn", "base", "scale"))


def _quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes float8_e4m3fn, scales float8_e8m0fnu, dequantized float32)`` with 128x128 blocks."""
    rows, cols = w.shape
    pr, pc = -(-rows // FP8_BLOCK) * FP8_BLOCK, -(-cols // FP8_BLOCK) * FP8_BLOCK
    padded = torch.zeros(pr, pc, dtype=torch.float32)
    padded[:rows, :cols] = w.float()
    blocks = padded.view(pr // FP8_BLOCK, FP8_BLOCK, pc // FP8_BLOCK, FP8_BLOCK)
    e = reference.ue8m0_exponent(blocks.abs().amax(dim=(1, 3)), reference.FP8_MAX)
    full = e.repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]
    codes = reference.fp8_e4m3_encode(w.float(), full)
    deq = reference.fp8_e4m3_decode(codes) * torch.exp2(full.double())
    return codes.view(torch.float8_e4m3fn), (e + 127).to(torch.uint8).view(torch.float8_e8m0fnu), deq.float()


def _quantize_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(packed int8 [out, in/2], scales float8_e8m0fnu [out, in/32], dequantized float32)``."""
    blocks = w.float().unflatten(-1, (-1, FP4_BLOCK))
    e = reference.ue8m0_exponent(blocks.abs().amax(-1), reference.FP4_MAX)
    codes = reference.fp4_e2m1_encode(blocks, e[..., None]).flatten(-2)
    deq = (reference.fp4_e2m1_decode(codes).unflatten(-1, (-1, FP4_BLOCK)) * torch.exp2(e.double())[..., None])
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    return packed, (e + 127).to(torch.uint8).view(torch.float8_e8m0fnu), deq.flatten(-2).float()


def export_deepseek(model: DeepseekV4, path: str | os.PathLike[str], shard_bytes: int = 1 << 30,
                    progress: bool = True) -> DeepseekV4:
    """Writes ``model`` in DeepSeek's checkpoint layout and names: FP8 e4m3 (128x128 UE8M0 blocks)
    for the attention's and shared experts' linears, MXFP4 routed experts, bfloat16 for the
    other matrices, float32 for mHC, sinks and positional biases; plus ``config.json``
    (DeepSeek's keys). Returns the *dequantized twin*: a copy of ``model`` holding exactly the
    values the checkpoint decodes to."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    cfg = model.config
    twin = DeepseekV4(cfg)
    twin.load_state_dict(model.state_dict())
    twin_params = dict(twin.named_parameters()) | dict(twin.named_buffers())
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for official, name in _official_names(model):
            t = twin_params[name].detach().cpu()
            if _FP8_LINEARS.search(official):
                codes, scale, deq = _quantize_fp8(t)
                tensors[official], tensors[official[: -len("weight")] + "scale"] = codes, scale
                twin_params[name].copy_(deq)
            elif t.is_floating_point() and t.dim() == 2 and not re.search(r"hc_|\.ape$", official):
                tensors[official] = t.to(torch.bfloat16)
                twin_params[name].copy_(tensors[official].float())
            elif t.is_floating_point() and re.search(r"norm\.weight$", official):
                tensors[official] = t.to(torch.bfloat16)
                twin_params[name].copy_(tensors[official].float())
            else:
                tensors[official] = t.contiguous()
        blocks = [(f"layers.{i}", layer) for i, layer in enumerate(twin.model.layers)]
        blocks += [(f"mtp.{i}", b) for i, b in enumerate(twin.mtp)]
        inner = cfg.moe_intermediate_size
        for prefix, layer in blocks:
            ex = layer.mlp.experts
            for e in range(ex.gate_up_proj.shape[0]):
                for w, view in (("w1", ex.gate_up_proj.data[e, :inner]), ("w3", ex.gate_up_proj.data[e, inner:]),
                                ("w2", ex.down_proj.data[e])):
                    packed, scale, deq = _quantize_fp4(view.cpu())
                    key = f"{prefix}.ffn.experts.{e}.{w}"
                    tensors[f"{key}.weight"], tensors[f"{key}.scale"] = packed, scale
                    view.copy_(deq)
    _write_shards(tensors, path, shard_bytes, progress)
    d = cfg.to_hf_dict()
    d["compress_ratios"] = list(cfg.compress_ratios)
    d["num_hash_layers"] = sum(t == "hash_moe" for t in cfg.mlp_layer_types)
    d["qk_rope_head_dim"] = cfg.qk_rope_head_dim
    for k in ("layer_types", "mlp_layer_types", "compress_rates", "partial_rotary_factor"):
        d.pop(k)
    if "rope_parameters" in d:
        d["rope_scaling"] = {"type": "yarn", **{k: v for k, v in d.pop("rope_parameters").items() if k != "rope_type"}}
    d["model_type"] = "deepseek_v4"
    d["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                "weight_block_size": [FP8_BLOCK, FP8_BLOCK], "expert_dtype": "fp4"}
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(d, f, indent=2)
    return twin


def _write_shards(tensors: dict[str, torch.Tensor], path: str, shard_bytes: int, progress: bool) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        n = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += n
    weight_map = {}
    for i, shard in enumerate(tqdm(shards, desc="writing shards", unit="shard", disable=not progress)):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fname))
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

