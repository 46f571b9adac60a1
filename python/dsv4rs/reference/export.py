"""Writes a model as a checkpoint in DeepSeek's quantized layout and names (:func:`export_deepseek`),
with the quantizers of :mod:`dsv4rs.reference.ops`: the tests' source of FP8 and MXFP4
checkpoints (docs/model.md section 9)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

import torch
from tqdm import tqdm

from dsv4rs.model.loader import FP4_BLOCK, FP8_BLOCK, canonical_name
from dsv4rs.model.model import DeepseekV4
from dsv4rs.reference import ops as reference

_FP8_LINEARS = re.compile(r"\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b)\.weight$|\.indexer\.wq_b\.weight$|\.shared_experts\.w[123]\.weight$")


def _official_names(model: DeepseekV4) -> Iterator[tuple[str, str]]:
    """``(DeepSeek name, model name)`` for every tensor except the routed experts."""
    inverse = {canonical_name(k): k for k in _official_candidates(model)}
    for name in model.checkpoint_tensors():
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
    twin_params = twin.checkpoint_tensors()
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

