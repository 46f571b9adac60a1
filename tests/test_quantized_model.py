"""``load_checkpoint(quantized=True)`` (the default): a checkpoint in DeepSeek's layout
(``export_deepseek``: FP8 e4m3 attention and shared-expert linears with UE8M0 128x128 block scales,
MXFP4 routed experts) loads with its weights kept as stored, runs through ``ops.quant_linear`` and
``ops.moe_experts``, and computes what its dequantized twin computes up to the rounding of the
activations; the weights take the checkpoint's bytes; bad tensors are refused naming them."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsv4rs.model import DeepseekV4, V4Config, init_random
from dsv4rs.model.config import CSA
from dsv4rs.model.layers.moe import Experts
from dsv4rs.model.layers.quant import QuantLinear
from dsv4rs.model.loader import CheckpointError, canonical_name, load_checkpoint
from dsv4rs.model.model import SHIPPED_FP8, empty_model, set_dtype
from dsv4rs.reference import ops as reference
from dsv4rs.reference.export import _FP8_LINEARS, _quantize_fp8, export_deepseek
from dsv4rs.runtime import Engine
from dsv4rs.runtime.memory import stored_bytes

CFG = V4Config.tiny()
I, D = CFG.moe_intermediate_size, CFG.hidden_size


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[str, DeepseekV4]:
    """The checkpoint (several shards and an index) and its dequantized twin."""
    path = tmp_path_factory.mktemp("deepseek")
    twin = export_deepseek(init_random(DeepseekV4(CFG), seed=41), path, shard_bytes=1 << 19, progress=False)
    return str(path), twin


@pytest.fixture(scope="module")
def quantized(exported) -> DeepseekV4:
    return load_checkpoint(exported[0], progress=False)


def file_tensors(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def prefill(model: DeepseekV4, ids: torch.Tensor) -> torch.Tensor:
    eng = Engine(model, max_sequences=1, max_len=ids.numel())
    seq, _ = eng.add_sequence()
    return eng.step([seq], [ids], all_logits=True)[0]


# -- the activation rounding of the ops, emulated in float64 with the reference quantizers -----------


def round_fp8(x: torch.Tensor) -> torch.Tensor:
    """``x [..., K]`` as the ops round activations for FP8: blocks of 128 along K (the last one
    partial), one UE8M0 scale per block (amax floored at 1e-4), each value to FP8 e4m3 (RNE)."""
    k = x.shape[-1]
    blocks = F.pad(x.float(), (0, -k % 128)).unflatten(-1, (-1, 128))
    e = reference.ue8m0_exponent(blocks.abs().amax(-1), reference.FP8_MAX)
    v = reference.fp8_e4m3_decode(reference.fp8_e4m3_encode(blocks, e[..., None])) * torch.exp2(e.double())[..., None]
    return v.flatten(-2)[..., :k].to(x.dtype)


def round_act(x: torch.Tensor, act: str) -> torch.Tensor:
    return round_fp8(x) if act == "fp8" else x.to(torch.bfloat16).to(x.dtype)


def rounding_bound(x: torch.Tensor, act: str) -> torch.Tensor:
    """An upper bound of ``|round_act(x) - x|`` per value. FP8 e4m3 has 4 significant bits, so
    round-to-nearest moves a normal value by at most 2^-4 of itself; in the subnormal range of
    the block (below 2^-6 of its scale 2^e) the step is 2^-9 2^e, so at most 2^-10 2^e. The scale
    is chosen so that the block's amax fits 448 2^e: nothing saturates. bfloat16 has 8
    significant bits: at most 2^-8 of the value."""
    if act == "bf16":
        return x.abs().double() * 2.0**-8
    k = x.shape[-1]
    blocks = F.pad(x.double(), (0, -k % 128)).unflatten(-1, (-1, 128))
    e = reference.ue8m0_exponent(blocks.float().abs().amax(-1), reference.FP8_MAX)
    sub = torch.exp2(e.double() - 10)[..., None].expand_as(blocks).flatten(-2)[..., :k]
    return torch.maximum(x.abs().double() * 2.0**-4, sub)


def emulate(twin: DeepseekV4, model: DeepseekV4, act: str) -> list:
    """Makes the dense twin round its activations where ``model``'s quantized layers do (the
    input of every QuantLinear; the input and the SwiGLU output of the quantized experts);
    returns the hooks to remove."""
    hooks = []
    mods = dict(twin.named_modules())
    round_first = lambda m, args: (round_act(args[0], act), *args[1:])  # noqa: E731
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear) or (isinstance(mod, Experts) and mod.quantized):
            hooks.append(mods[name].register_forward_pre_hook(round_first))
        if isinstance(mod, Experts) and mod.quantized:
            dense = mods[name]
            swiglu = type(dense)._swiglu
            dense._swiglu = lambda gate_up, dense=dense, swiglu=swiglu: round_act(swiglu(dense, gate_up), act)
            hooks.append(dense)
    return hooks


def unhook(hooks: list) -> None:
    for h in hooks:
        if isinstance(h, Experts):
            del h._swiglu
        else:
            h.remove()


# -- the weights as stored ----------------------------------------------------------------------------


def test_weights_stay_as_stored(exported, quantized: DeepseekV4) -> None:
    """Every FP8 linear is a QuantLinear holding the file's codes (uint8) and its UE8M0 block
    scales as float32 multipliers, every MoE layer's experts the file's MXFP4 bytes and scale
    codes stacked (w1 rows, then w3, then w2 in ``down``); the values they decode to are the
    twin's, and no dequantized copy is held."""
    path, twin = exported
    files = file_tensors(path)
    modules = dict(quantized.named_modules())
    fp8 = [k for k in files if _FP8_LINEARS.search(k)]
    # attention (5) and shared expert (3) of every layer and the MTP block, the CSA layers' indexer
    assert len(fp8) == 8 * (CFG.num_hidden_layers + 1) + CFG.layer_types.count(CSA)
    twin_params = dict(twin.named_parameters())
    for key in fp8:
        name = canonical_name(key).removesuffix(".weight")
        q = modules[name]
        assert isinstance(q, QuantLinear) and q.fmt == "fp8" and q.act == "fp8", name
        assert q.groups == (CFG.o_groups if name.endswith("o_a_proj") else 1), name
        assert q.weight.dtype == torch.uint8 and torch.equal(q.weight, files[key].view(torch.uint8)), name
        scale = files[key.removesuffix("weight") + "scale"]
        assert q.scale.dtype == torch.float32 and torch.equal(q.scale, torch.exp2(scale.view(torch.uint8).float() - 127))
        assert not list(q.parameters())
        assert torch.equal(q.dequantized(), twin_params[f"{name}.weight"]), name
    layers = [*quantized.model.layers, *quantized.mtp]
    for i, layer in enumerate(layers):
        ex, dense = layer.mlp.experts, [*twin.model.layers, *twin.mtp][i].mlp.experts
        prefix = f"layers.{i}" if i < CFG.num_hidden_layers else "mtp.0"
        assert ex.quantized and not list(ex.parameters())
        assert [ex.gate_up.shape, ex.gate_up_scale.shape, ex.down.shape, ex.down_scale.shape] == [
            (8, 2 * I, D // 2), (8, 2 * I, D // 32), (8, D, I // 2), (8, D, I // 32)]
        for e in range(8):
            w = {p: files[f"{prefix}.ffn.experts.{e}.{p}.weight"].view(torch.uint8) for p in ("w1", "w2", "w3")}
            s = {p: files[f"{prefix}.ffn.experts.{e}.{p}.scale"].view(torch.uint8) for p in ("w1", "w2", "w3")}
            assert torch.equal(ex.gate_up[e], torch.cat([w["w1"], w["w3"]])) and torch.equal(ex.down[e], w["w2"])
            assert torch.equal(ex.gate_up_scale[e], torch.cat([s["w1"], s["w3"]])) and torch.equal(ex.down_scale[e], s["w2"])
            gate_up = QuantLinear(D, 2 * I, "fp4")
            gate_up.weight, gate_up.scale = ex.gate_up[e], ex.gate_up_scale[e]
            assert torch.equal(gate_up.dequantized(), dense.gate_up_proj[e])
    # The rest as the twin holds it (the dtype was float32); nothing beside the stored forms.
    names = {n for n, _ in quantized.named_parameters()}
    assert not any(n.endswith(("gate_up_proj", "down_proj")) and ".experts." in n for n in names)
    quant = {f"{n}.weight" for n, m in modules.items() if isinstance(m, QuantLinear)}
    assert names == set(twin_params) - quant - {n for n in twin_params if ".mlp.experts." in n}
    for n in names:
        assert torch.equal(dict(quantized.named_parameters())[n], twin_params[n]), n


def test_dtype_conversions_leave_the_weights_as_stored(exported, quantized: DeepseekV4) -> None:
    """``module.to(bfloat16)``, ``half()`` and ``set_dtype`` convert the floating-point
    parameters, never the codes or the float32 block scales; the quantized layers follow the
    model's dtype (what they compute in). ``load_checkpoint(dtype=bfloat16)`` keeps the same
    bytes."""
    model = copy.deepcopy(quantized)
    stored = [f"{n}.{b}" for n, m in model.named_modules() for b in m._buffers
              if isinstance(m, QuantLinear) or (isinstance(m, Experts) and m.quantized)]
    before = {n: b.clone() for n, b in model.named_buffers() if n in stored}
    assert len(before) > 100 and any(b.dtype == torch.float32 for b in before.values())
    for convert in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: set_dtype(m, torch.bfloat16)):
        convert(model)
        now = dict(model.named_buffers())
        for n, b in before.items():
            assert now[n].dtype == b.dtype and torch.equal(now[n], b), n
    q = model.model.layers[0].self_attn.q_a_proj
    assert q.dtype == torch.bfloat16 and q.scale.dtype == torch.float32 and q.weight.dtype == torch.uint8
    bf16 = load_checkpoint(exported[0], dtype=torch.bfloat16, progress=False)
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16 and bf16.model.layers[0].self_attn.q_a_proj.dtype == torch.bfloat16
    for n, b in quantized.named_buffers():
        if n.endswith((".weight", ".scale", "gate_up", "down")) and b.dtype in (torch.uint8, torch.float32):
            assert torch.equal(dict(bf16.named_buffers())[n], b), n
    ids = torch.randint(0, CFG.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(prefill(bf16, ids)).all()


def test_float_scales_give_the_same_multipliers(exported, quantized: DeepseekV4, tmp_path) -> None:
    """transformers' layout, float32 ``weight_scale_inv`` blocks (here in a shard of their own),
    loads as the UE8M0 scales do."""
    src, _ = exported
    tensors = file_tensors(src)
    moved = {}
    for key in [k for k in tensors if k.endswith(".scale") and ".experts." not in k]:
        moved[key.removesuffix("scale") + "weight_scale_inv"] = torch.exp2(tensors.pop(key).view(torch.uint8).float() - 127)
    save_file(tensors, tmp_path / "weights.safetensors")
    save_file(moved, tmp_path / "scales.safetensors")
    shutil.copy(os.path.join(src, "config.json"), tmp_path / "config.json")
    loaded = load_checkpoint(tmp_path, progress=False)
    want, got = quantized.state_dict(), loaded.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items())


# -- what they compute -----------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["fp8", "bf16"])
def test_each_linear_is_within_the_rounding_of_its_activations(exported, quantized: DeepseekV4, act: str,
                                                               gen: torch.Generator) -> None:
    """Each QuantLinear (and an MXFP4 one over an expert's bytes) against the float64 product
    with the twin's weight, inputs of mixed magnitudes: the error is at most
    ``sum_k |w_k| r_k + (K + 1) 2^-24 sum_k |w_k a_k|``, where ``r_k`` bounds the rounding of
    activation ``k`` (:func:`rounding_bound`: 2^-4 of the value for FP8 normals, 2^-10 of the
    block's scale below them; 2^-8 for bfloat16) and the second term the float32 products and
    sums of the rounded activations ``a``. The weights' values are exact (powers of two times
    FP8/FP4 codes)."""
    _, twin = exported
    model = copy.deepcopy(quantized).set_activation_quant(act)
    dense = dict(twin.named_modules())
    cases = [(n, m, dense[n].weight) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    ex, ex_dense = model.model.layers[2].mlp.experts, twin.model.layers[2].mlp.experts
    fp4 = QuantLinear(D, 2 * I, "fp4", act=act)
    fp4.weight, fp4.scale = ex.gate_up[3], ex.gate_up_scale[3]
    cases.append(("experts.3.gate_up", fp4, ex_dense.gate_up_proj[3]))
    worst = 0.0
    for name, q, w in cases:
        k = q.in_features
        shape = (6, q.groups, k) if q.groups > 1 else (6, k)
        x = torch.randn(shape, generator=gen) * torch.exp2(torch.randint(-12, 4, shape, generator=gen).float())
        y = q(x)
        assert y.dtype == torch.float32 and y.shape == (6, q.out_features)
        wg = w.detach().double().view(q.groups, -1, k)
        ref = torch.einsum("...gk,gnk->...gn", x.double().view(6, q.groups, k), wg).flatten(1)
        a = round_act(x, act).double().view(6, q.groups, k)
        err = rounding_bound(x, act).view(6, q.groups, k)
        bound = (torch.einsum("...gk,gnk->...gn", err, wg.abs())
                 + (k + 1) * 2.0**-24 * torch.einsum("...gk,gnk->...gn", a.abs(), wg.abs())).flatten(1)
        assert ((y.double() - ref).abs() <= bound).all(), name
        worst = max(worst, float(((y.double() - ref).abs() / bound).max()))
    assert worst > 0.01  # the bound is not vacuous: the rounding shows


@pytest.mark.parametrize("act", ["fp8", "bf16"])
def test_moe_is_within_the_rounding_of_its_activations(exported, quantized: DeepseekV4, act: str,
                                                       gen: torch.Generator) -> None:
    """The fused MoE over a layer's MXFP4 experts against the float64 math of the twin's experts
    (same routing), per output value within a bound carried through each step. With
    ``r(v)`` the rounding bound of :func:`rounding_bound` and ``y = (K + 1) 2^-24`` the float32
    dot product's bound:

    - ``a = A(x)``; ``g, u`` off the exact ``g*, u*`` by ``dg = |W_g| r(x) + y |W_g| |a|`` (``du``
      likewise);
    - ``h = silu(min(g, l)) clamp(u, -l, l)``: ``|silu'| <= 1.1``, so ``h`` is off ``h*`` by
      ``dh = 1.1 dg min(|u*| + du, l) + |silu(min(g*, l))| du`` plus its own float32 roundings
      (exp, add, divide, multiply: 2^-20 of ``|h|`` allowed);
    - ``b = A(h)``: off ``h*`` by ``r(|h*| + dh) + dh`` (the block scale of ``h`` is at most that of
      ``|h*| + dh``);
    - ``y_j = b W_d^T`` off ``y*_j`` by ``|W_d| (r + dh) + y |W_d| |b|``, and the output
      ``sum_j w_j y_j`` by ``sum_j w_j dy_j`` plus the float32 sum of ``k`` terms."""
    _, twin = exported
    ex = copy.deepcopy(quantized.model.layers[2].mlp.experts)
    ex.act = act
    dense = twin.model.layers[2].mlp.experts
    t, k, lim = 40, CFG.num_experts_per_tok, CFG.swiglu_limit
    x = torch.randn(t, D, generator=gen) * torch.exp2(torch.randint(-6, 2, (t, D), generator=gen).float())
    idx = torch.stack([torch.randperm(8, generator=gen)[:k] for _ in range(t)])
    idx[0] = idx[1] = 5  # a token whose choices are one expert, and two tokens on it
    w = torch.rand(t, k, generator=gen)
    got = ex(x, idx, w).double()

    gate_up, down = dense.gate_up_proj.detach().double()[idx], dense.down_proj.detach().double()[idx]  # [t, k, ...]
    wg, wu = gate_up[:, :, :I], gate_up[:, :, I:]
    x64 = x.double()[:, None, :, None]
    g_, u_ = (wg @ x64)[..., 0], (wu @ x64)[..., 0]  # exact, [t, k, I]
    h_ = F.silu(g_.clamp(max=lim)) * u_.clamp(-lim, lim)
    y_ = (down @ h_[..., None])[..., 0]  # [t, k, D]
    want = (w.double()[..., None] * y_).sum(1)

    def dot_err(wt: torch.Tensor, err: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
        n = wt.shape[-1]
        return (wt.abs() @ err[..., None])[..., 0] + (n + 1) * 2.0**-24 * (wt.abs() @ mag[..., None])[..., 0]

    r_x = rounding_bound(x, act)[:, None, :].expand(t, k, D)
    a = round_act(x, act).double().abs()[:, None, :].expand(t, k, D)
    dg, du = dot_err(wg, r_x, a), dot_err(wu, r_x, a)
    dh = 1.1 * dg * torch.minimum(u_.abs() + du, torch.tensor(lim)) + F.silu(g_.clamp(max=lim)).abs() * du
    dh = dh + 2.0**-20 * (h_.abs() + dh)
    beta = rounding_bound((h_.abs() + dh).float(), act).double() + dh
    dy = dot_err(down, beta, h_.abs() + beta)
    bound = (w.double()[..., None] * dy).sum(1) + (k + 1) * 2.0**-24 * (w.double()[..., None] * (y_.abs() + dy)).sum(1)
    assert ((got - want).abs() <= bound).all()
    assert float(((got - want).abs() / bound).max()) > 0.01  # the bound is not vacuous


def test_logits_are_as_far_from_the_twin_as_the_activation_rounding(exported, quantized: DeepseekV4,
                                                                  gen: torch.Generator) -> None:
    """The quantized model's prefill logits (300 tokens) against the dequantized twin's (float32,
    exact activations). The weights decode to the twin's exactly and the products are float32 in
    both: rounding the activations is the only difference in the math, its effect measured by
    running the twin with the same rounding emulated where the ops round (:func:`emulate`).

    The quantized model and that emulation differ in the order of float32 sums only, and each
    layer of it is within the bounds derived above; but in this small random model such noise
    flips discrete choices now and then (a routed expert whose scores nearly tie, an indexer
    selection among near-equal scores, a value at a rounding midpoint), and the flipped choice
    travels through the compressed cache to later tokens: token-by-token equality with the
    emulation cannot be asked for (measured over 4 inputs: the median token off by up to 2/3 of
    the bfloat16 rounding's effect). Both are the same rounding of the same math, though, and must
    be equally far from the twin: per token, the largest logit difference from the twin has the
    same median (measured: within 2 %; 20 % allowed) and the same maximum (measured: within
    20 %; a factor 2 allowed) as the emulation's. With bfloat16 activations the model is so within
    bfloat16 rounding of the twin; with FP8 ones (DeepSeek's W8A8) it differs from the twin by what
    FP8 activations differ from none. FP8 rounds a value by up to 2^-4 of it, bfloat16 by 2^-8:
    the FP8 distance is the larger.
    """
    _, twin = exported
    ids = torch.randint(0, CFG.vocab_size, (300,), generator=gen)
    exact = prefill(twin, ids)
    medians = {}
    for act in ("fp8", "bf16"):
        model = copy.deepcopy(quantized).set_activation_quant(act)
        got = (prefill(model, ids) - exact).abs().amax(-1)
        hooks = emulate(twin, model, act)
        try:
            emulated = (prefill(twin, ids) - exact).abs().amax(-1)
        finally:
            unhook(hooks)
        medians[act] = float(emulated.median())
        assert medians[act] > 0
        assert 0.8 <= float(got.median()) / medians[act] <= 1.25, (act, got.median(), emulated.median())
        assert 0.5 <= float(got.max()) / float(emulated.max()) <= 2, (act, got.max(), emulated.max())
    assert medians["fp8"] > medians["bf16"]


def test_w8a8_logits_are_deepseeks_fp8_numerics_token_by_token(exported, quantized: DeepseekV4,
                                                              gen: torch.Generator) -> None:
    """DeepSeek's reference W8A8 (its ``act_quant``: FP8 e4m3 per 1x128 block, scale
    ``2^ceil(log2(max(amax, 1e-4) / 448))``, for the FP8 linears and the FP4 experts alike; then
    block-scaled products summed in float32) is emulated on the dequantized twin (:func:`emulate`;
    its scale exponent is the same number as DeepSeek's ``amax * (1/448)`` in float32 gives,
    checked below next to several powers of two). Token by token, over 6 prompts of 300 tokens, the quantized
    model's logits sit at a median distance from that emulation far below the FP8 effect itself
    (the emulation's distance from the exact twin). Measured on these 6: median 6e-8 (most tokens
    agree to the last bits) against an effect of 0.030; the third of the tokens that differ by
    more than 1e-4 follow a discrete choice
    flipped by the order of float32 sums (a routed expert, an indexer selection, a value at an
    FP8 rounding midpoint), which then travels through the cache (over 10 other prompts: a
    quarter of the tokens, most of them in 2 of the 10)."""
    _, twin = exported
    model = copy.deepcopy(quantized).set_activation_quant("fp8")
    apart, effect = [], []
    for _ in range(6):
        ids = torch.randint(0, CFG.vocab_size, (300,), generator=gen)
        logits, exact = prefill(model, ids), prefill(twin, ids)
        hooks = emulate(twin, model, "fp8")
        try:
            emulated = prefill(twin, ids)
        finally:
            unhook(hooks)
        apart.append((logits - emulated).abs().amax(-1))
        effect.append((emulated - exact).abs().amax(-1))
    apart, effect = torch.cat(apart), torch.cat(effect)
    assert float(effect.median()) > 0.01
    assert float(apart.median()) <= 0.01 * float(effect.median()), (apart.median(), effect.median())
    # DeepSeek's scale exponent, ceil(log2(amax * fl32(1/448))) in float32, is the emulation's
    # smallest e with amax <= 448 2^e: every float32 amax within 4096 ulps of 448 2^k.
    for k in (-20, -3, 0, 5):
        bits = torch.tensor(448.0 * 2.0**k, dtype=torch.float32).view(torch.int32)
        amax = torch.arange(int(bits) - 4096, int(bits) + 4096, dtype=torch.int32).view(torch.float32)
        product = amax * torch.tensor(1 / 448, dtype=torch.float32)
        mantissa, power = torch.frexp(product.double())
        deepseek = torch.where(mantissa == 0.5, power - 1, power)
        assert torch.equal(reference.ue8m0_exponent(amax, reference.FP8_MAX), deepseek.to(torch.int64))


def test_activation_mode_is_checked(quantized: DeepseekV4) -> None:
    with pytest.raises(ValueError, match=r"^act: expected one of \('fp8', 'bf16'\), got 'int8'"):
        copy.deepcopy(quantized).set_activation_quant("int8")
    model = copy.deepcopy(quantized).set_activation_quant("bf16")
    mods = [m for m in model.modules() if isinstance(m, QuantLinear) or (isinstance(m, Experts) and m.quantized)]
    assert len(mods) > 40 and all(m.act == "bf16" for m in mods)


# -- memory --------------------------------------------------------------------------------------------


def quantized_bytes(model: DeepseekV4) -> tuple[int, int]:
    """Bytes of the model's quantized tensors (codes and scales), and its FP8 block count."""
    total = blocks = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += nbytes(m.weight) + nbytes(m.scale)
            blocks += m.scale.numel() if m.fmt == "fp8" else 0
        elif isinstance(m, Experts) and m.quantized:
            total += sum(nbytes(getattr(m, n)) for n in Experts.QUANTIZED)
    return total, blocks


def checkpoint_bytes(path: str) -> tuple[int, int]:
    """Bytes of every tensor of the checkpoint, and of its quantized ones (weights with a scale
    companion, and the scales)."""
    sizes = {}
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as h:
                sizes.update({k: nbytes(h.get_tensor(k)) for k in h.keys()})
    quant = sum(n for k, n in sizes.items() if k.endswith(".scale") or k.removesuffix("weight") + "scale" in sizes)
    return sum(sizes.values()), quant


def test_memory_is_the_checkpoints_bytes(exported) -> None:
    """On the CPU, with the parameters' and buffers' bytes: the quantized tensors take the
    checkpoint's bytes plus 3 bytes per FP8 block (the one growth: a UE8M0 scale code of 1 byte
    becomes a float32 multiplier of 4), within 2 %; the whole model in bfloat16 too (the norms,
    bfloat16 on disk, are held in float32)."""
    path, _ = exported
    total, quant = checkpoint_bytes(path)
    model = load_checkpoint(path, dtype=torch.bfloat16, progress=False)
    held, blocks = quantized_bytes(model)
    assert held == quant + 3 * blocks and held <= 1.02 * quant
    assert abs(stored_bytes(model) - total) <= 0.02 * total


GPU_CFG = V4Config.tiny(hidden_size=512, moe_intermediate_size=256, n_routed_experts=16, vocab_size=4096)
"""Large enough (some 30 MB) that the caching allocator's rounding of small tensors (to 512 bytes)
is well under 1 %."""


@pytest.mark.gpu
def test_device_memory_is_the_checkpoints_bytes(tmp_path) -> None:
    """The bytes the caching allocator was asked for grow by the checkpoint's bytes (within 2 %)
    over a quantized bfloat16 load, and their peak during the load stays within 2 % of them too:
    no tensor is ever held on the device in a wider form than the final one. (Requested bytes,
    not ``memory_allocated``: that counts whole allocator blocks, and a block carved from a
    segment left by earlier tests may keep an unsplit remainder of up to 1 MiB, which made the
    measure depend on what ran before.)"""
    export_deepseek(init_random(DeepseekV4(GPU_CFG), seed=3), tmp_path, progress=False)
    total, quant = checkpoint_bytes(str(tmp_path))
    torch.cuda.synchronize()
    torch.cuda.empty_cache()

    def requested(kind: str) -> int:
        return torch.cuda.memory_stats()[f"requested_bytes.all.{kind}"]

    before = requested("current")
    torch.cuda.reset_peak_memory_stats()
    model = load_checkpoint(tmp_path, device="cuda", dtype=torch.bfloat16, progress=False)
    torch.cuda.synchronize()
    grown, peak = requested("current") - before, requested("peak") - before
    held, blocks = quantized_bytes(model)
    assert held == quant + 3 * blocks
    assert abs(grown - total) <= 0.02 * total, (grown, total)
    assert peak <= 1.02 * total, (peak, total)
    ids = torch.randint(0, GPU_CFG.vocab_size, (64,), device="cuda")
    assert torch.isfinite(prefill(model, ids)).all()


# -- bad input ----------------------------------------------------------------------------------------------


def copy_checkpoint(src: str, dst) -> str:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return str(dst)


def edit(path: str, fn) -> None:
    """Applies ``fn`` to every shard's tensors (dict, edited in place) and rewrites the index."""
    weight_map = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            tensors = load_file(os.path.join(path, f))
            fn(tensors)
            save_file(tensors, os.path.join(path, f))
            weight_map.update(dict.fromkeys(tensors, f))
    index = os.path.join(path, "model.safetensors.index.json")
    with open(index, "w") as fh:
        json.dump({"weight_map": weight_map}, fh)


def set_if(key: str, fn):
    def apply(t: dict) -> None:
        if key in t:
            t[key] = fn(t[key])
    return apply


@pytest.mark.parametrize("quant", [True, False])
def test_nan_fp8_codes(exported, tmp_path, quant: bool) -> None:
    """e4m3's 0x7F and 0xFF are NaN: refused in the codes kept as stored, as in the values
    dequantized."""
    path = copy_checkpoint(exported[0], tmp_path)
    key = "layers.1.attn.wo_b.weight"

    def poison(w: torch.Tensor) -> torch.Tensor:
        w = w.view(torch.uint8).clone()
        w[3, 5], w[7, 1] = 0xFF, 0x7F
        return w.view(torch.float8_e4m3fn)

    edit(path, set_if(key, poison))
    message = r"NaN FP8 code 0xFF at \[3, 5\] \(e4m3 0x7F and 0xFF are NaN\)" if quant else "non-finite values"
    with pytest.raises(CheckpointError, match=rf"^{re.escape(key)}: {message}"):
        load_checkpoint(path, progress=False, quantized=quant)


@pytest.mark.parametrize("quant", [True, False])
@pytest.mark.parametrize(("key", "change", "message"), [
    ("layers.0.attn.wkv.scale", lambda s: s.view(torch.uint8).clone().fill_(255).view(s.dtype),
     r"layers\.0\.attn\.wkv\.weight: NaN scale \(UE8M0 code 255\)"),
    ("layers.2.ffn.experts.4.w2.scale", lambda s: s.view(torch.uint8).clone().fill_(255).view(s.dtype),
     r"layers\.2\.ffn\.experts\.4\.w2\.weight: NaN scale \(UE8M0 code 255\)"),
    ("layers.0.attn.wkv.scale", lambda s: torch.cat([s, s], 1),
     r"layers\.0\.attn\.wkv\.weight: FP8 scale has shape \[4, 2\], expected \[4, 1\]"),
    ("layers.2.ffn.experts.4.w1.scale", lambda s: s[:-1].contiguous(),
     r"layers\.2\.ffn\.experts\.4\.w1\.weight: FP4 scale has shape \[31, 2\], expected \[32, 2\]"),
    ("layers.3.ffn.experts.0.w2.weight", lambda w: w[:, :-1].contiguous(),
     r"layers\.3\.ffn\.experts\.0\.w2\.weight: shape \[64, 15\] \(an odd number of bytes per row\), expected \[64, 16\]"),
    ("layers.1.ffn.gate.tid2eid", lambda t: t.clone().fill_(CFG.n_routed_experts),
     rf"layers\.1\.ffn\.gate\.tid2eid: expert ids must lie in \[0, {CFG.n_routed_experts}\)"),
])
def test_bad_tensors_are_named(exported, tmp_path, quant: bool, key: str, change, message: str) -> None:
    """Kept quantized or dequantized, the same refusals naming the tensor: a NaN UE8M0 scale
    code (FP8 and MXFP4), scales of the wrong shape, a packed FP4 tensor of odd width, a routing
    table with an expert id out of range."""
    path = copy_checkpoint(exported[0], tmp_path)
    edit(path, set_if(key, change))
    with pytest.raises(CheckpointError, match=f"^{message}"):
        load_checkpoint(path, progress=False, quantized=quant)


def test_weight_rows_must_hold_whole_scale_blocks(exported, tmp_path) -> None:
    """An MXFP4 weight whose rows do not hold a multiple of 32 values (``moe_intermediate_size``
    48 for ``w2``) is refused naming it, before anything is read."""
    path = copy_checkpoint(exported[0], tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["moe_intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))

    def grow(t: dict) -> None:  # w1 and w3 of layer 0 with 48 rows, so that w2 is checked first
        for k in [k for k in t if re.match(r"layers\.0\.ffn\.experts\.\d+\.w[13]\.(weight|scale)$", k)]:
            t[k] = torch.cat([t[k], t[k][:16]])

    edit(path, grow)
    with pytest.raises(CheckpointError, match=r"^layers\.0\.ffn\.experts\.0\.w2\.weight: MXFP4 scales blocks of 32 "
                                              r"values, but the parameter's rows have 48 values"):
        load_checkpoint(path, progress=False)


def test_what_the_kernels_cannot_run_is_refused_kept_quantized(tmp_path) -> None:
    """Quantized weights the kernels cannot run as stored are refused naming them, with the way
    out (``quantized=False``, which dequantizes and loads): an FP8 linear whose reduced
    dimension is not a multiple of 32, MXFP4 experts with float scales, FP8 routed experts."""
    cfg = V4Config.tiny(q_lora_rank=48)
    twin = export_deepseek(init_random(DeepseekV4(cfg), seed=2), tmp_path / "k48", progress=False)
    with pytest.raises(CheckpointError, match=r"^layers\.0\.attn\.wq_b\.weight: its reduced dimension 48 is not a "
                                              r"multiple of 32, .*quantized=False"):
        load_checkpoint(tmp_path / "k48", progress=False)
    loaded = load_checkpoint(tmp_path / "k48", progress=False, quantized=False)
    assert torch.equal(loaded.model.layers[0].self_attn.q_b_proj.weight, twin.model.layers[0].self_attn.q_b_proj.weight)

    src = tmp_path / "src"
    twin = export_deepseek(init_random(DeepseekV4(CFG), seed=2), src, progress=False)
    for case, fn, message in [
        ("float_fp4_scales", set_if("layers.1.ffn.experts.2.w3.scale", lambda s: torch.exp2(s.view(torch.uint8).float() - 127)),
         r"^layers\.1\.ffn\.experts\.2\.w3\.scale: float32 scales of an MXFP4 weight; .*quantized=False"),
        ("fp8_experts", lambda t: fp8_expert(t, twin), r"^layers\.1\.ffn\.experts\.2\.w1\.weight: FP8 beside MXFP4 routed "
                                                       r"experts; .*quantized=False"),
    ]:
        path = tmp_path / case
        path.mkdir()
        copy_checkpoint(str(src), path)
        edit(str(path), fn)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path, progress=False)
        loaded = load_checkpoint(path, progress=False, quantized=False)
        assert torch.equal(loaded.model.layers[1].mlp.experts.gate_up_proj, twin.model.layers[1].mlp.experts.gate_up_proj)


def fp8_expert(t: dict, twin: DeepseekV4) -> None:
    """Expert 2's w1 of layer 1 in FP8 (the values it had in MXFP4, exact in FP8)."""
    key = "layers.1.ffn.experts.2.w1"
    if f"{key}.weight" in t:
        codes, scale, deq = _quantize_fp8(twin.model.layers[1].mlp.experts.gate_up_proj.detach()[2, :I])
        assert torch.equal(deq, twin.model.layers[1].mlp.experts.gate_up_proj[2, :I])
        t[f"{key}.weight"], t[f"{key}.scale"] = codes, scale


@pytest.mark.parametrize("flag", ["quantized", "progress", "strict"])
def test_loader_flags_must_be_bools(exported, flag: str) -> None:
    with pytest.raises(ValueError, match=rf"^{flag}: expected True or False, got 'yes'"):
        load_checkpoint(exported[0], **({"progress": False} | {flag: "yes"}))


# -- the shipped layout without a checkpoint (benchmarks) ----------------------------------------------


def test_shipped_layout_is_what_a_deepseek_checkpoint_loads_as(quantized: DeepseekV4) -> None:
    """empty_model(shipped=True) (the model bench's --weights shipped) holds the same quantized
    layers, buffers of the same dtypes and shapes, as a DeepSeek checkpoint loaded by default."""
    built = empty_model(quantized.config, "cpu", torch.float32, shipped=True)

    def layout(model: DeepseekV4) -> dict[str, tuple]:
        out = {}
        for name, mod in model.named_modules():
            if isinstance(mod, QuantLinear) or (isinstance(mod, Experts) and mod.quantized):
                out[name] = tuple((b, t.dtype, tuple(t.shape)) for b, t in sorted(mod.named_buffers()))
        return out

    want = layout(quantized)
    assert want and layout(built) == want
    assert {n for n in want if not n.endswith(".experts")} == {
        n for n, _ in quantized.named_modules() if SHIPPED_FP8.search(n)}


def test_weights_in_tiles_keep_checkpoint_tensors_as_stored(tmp_path) -> None:
    """A loaded model whose MXFP4 experts and quantized linears are held in tiles (``tile()``,
    what an ``Engine`` on a GPU does) still gives the checkpoint's rows from
    ``checkpoint_tensors`` and ``state_dict`` (what exports and the loader read), and the same MoE
    outputs."""
    cfg = V4Config.tiny(hidden_size=256, moe_intermediate_size=128)
    export_deepseek(init_random(DeepseekV4(cfg), seed=5), tmp_path, progress=False)
    model = load_checkpoint(str(tmp_path), progress=False)
    before = {k: v.detach().clone() for k, v in model.checkpoint_tensors().items()}
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    assert experts and all(m.quantized for m in experts)
    x = torch.randn(3, 256)
    idx = torch.randint(0, cfg.n_routed_experts, (3, cfg.num_experts_per_tok))
    w = torch.rand(3, cfg.num_experts_per_tok)
    want = [m(x, idx, w) for m in experts]
    assert all(m.tile() for m in experts)
    linears = [m for m in model.modules() if isinstance(m, QuantLinear) and m.groups == 1]
    xs = [torch.randn(2, m.in_features) for m in linears]
    ys = [m(v) for m, v in zip(linears, xs)]
    assert sum(m.tile() for m in linears) > 0
    assert all(torch.equal(m(v), y) for m, v, y in zip(linears, xs, ys))
    after = model.checkpoint_tensors()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items() if k in state)
    assert any(not torch.equal(m.gate_up, before[n + ".gate_up"]) for n, m in model.named_modules() if isinstance(m, Experts))
    assert all(torch.equal(m(x, idx, w), y) for m, y in zip(experts, want))


@pytest.mark.gpu
def test_gpu_engine_with_weights_in_tiles_gives_the_rows_logits(tmp_path) -> None:
    """An Engine on a GPU holds the model's quantized weights in tiles (``weight_tiles=True``, the
    default): the logits of a prefill and two decode steps are those of the same weights left in
    rows, bit for bit (eager steps)."""
    export_deepseek(init_random(DeepseekV4(GPU_CFG), seed=9), tmp_path, progress=False)
    model = load_checkpoint(tmp_path, device="cuda", dtype=torch.bfloat16, progress=False)
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(0, GPU_CFG.vocab_size, (48,), generator=gen).cuda()
    nxt = torch.randint(0, GPU_CFG.vocab_size, (2, 1), generator=gen).cuda()

    def run(tiles: bool) -> list[torch.Tensor]:
        eng = Engine(model, max_sequences=1, max_len=64, cuda_graphs=False, weight_tiles=tiles)
        seq, _ = eng.add_sequence()
        out = [eng.step([seq], [ids], all_logits=True)[0]]
        out += [eng.step([seq], [t])[0] for t in nxt]
        return out

    rows = run(False)
    held = [m for m in model.modules() if isinstance(m, (Experts, QuantLinear))]
    assert all(m.layout == "rows" for m in held)
    tiles = run(True)
    assert any(isinstance(m, Experts) and m.layout == "tiles" for m in held)
    assert any(isinstance(m, QuantLinear) and m.layout == "tiles" for m in held)
    assert all(torch.equal(a, b) for a, b in zip(tiles, rows))



def shipped_gpu_decode(path, seed: int) -> tuple[DeepseekV4, torch.Tensor, Callable[[bool], list[torch.Tensor]]]:
    """A checkpoint of ``GPU_CFG`` in DeepSeek's layout loaded on the GPU (bfloat16), token ids
    ``[2, 40]``, and ``decode(graphs)``: the logits of a fresh engine's prefill of two sequences
    (40 and 33 tokens) and 6 decode steps, eager or replayed from CUDA graphs."""
    export_deepseek(init_random(DeepseekV4(GPU_CFG), seed=seed), path, progress=False)
    model = load_checkpoint(path, device="cuda", dtype=torch.bfloat16, progress=False)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, GPU_CFG.vocab_size, (2, 40), generator=gen).cuda()
    nxt = torch.randint(0, GPU_CFG.vocab_size, (6, 2, 1), generator=gen).cuda()

    def decode(graphs: bool) -> list[torch.Tensor]:
        eng = Engine(model, max_sequences=2, max_len=64, cuda_graphs=graphs)
        seqs = [eng.add_sequence()[0] for _ in range(2)]
        out = [eng.step(seqs, [ids[0], ids[1, :33]])]
        out += [eng.step(seqs, list(t)) for t in nxt]
        torch.cuda.synchronize()
        return [o.clone() for o in out]

    return model, ids, decode


@pytest.mark.gpu
def test_gpu_dependent_launches_change_no_logit(tmp_path, monkeypatch) -> None:
    """Kernels launched as programmatic dependents (each may start while the one before it
    finishes, waiting in ``grid_begin``; the dense decode GEMMs first ask the L2 for their
    weights) give the logits of kernels launched one after the other, bit for bit: a prefill and
    decode steps of a batch of two, eager and replayed from CUDA graphs, with the shipped FP8 and
    MXFP4 weights held in tiles."""
    model, ids, decode = shipped_gpu_decode(tmp_path, seed=11)

    def run(pdl: str, graphs: bool) -> list[torch.Tensor]:
        monkeypatch.setenv("DSV4RS_PDL", pdl)
        return decode(graphs)

    for graphs in (False, True):
        on, off = run("on", graphs), run("off", graphs)
        assert all(torch.equal(a, b) for a, b in zip(on, off)), graphs
        assert all(bool(torch.isfinite(a).all()) for a in on)
    eng = Engine(model, max_sequences=1, max_len=64, cuda_graphs=False)
    seq, _ = eng.add_sequence()
    monkeypatch.setenv("DSV4RS_PDL", "sometimes")
    with pytest.raises(ValueError, match="DSV4RS_PDL"):
        eng.step([seq], [ids[0]])


@pytest.mark.gpu
def test_gpu_side_streams_change_no_logit(tmp_path, monkeypatch) -> None:
    """The layers' side chains on a second stream (the shared expert beside the routed experts;
    the entry's path and the compressors beside the query's; ``streams.ENABLED``) give the logits
    of one stream, bit for bit: a prefill and decode steps of a batch of two, eager and replayed
    from CUDA graphs (which capture the forks and joins), shipped weights in tiles."""
    from dsv4rs.model.layers import streams

    _, _, decode = shipped_gpu_decode(tmp_path, seed=12)

    def run(side: bool, graphs: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(streams, "ENABLED", side)
        return decode(graphs)

    for graphs in (False, True):
        two, one = run(True, graphs), run(False, graphs)
        assert all(torch.equal(a, b) for a, b in zip(two, one)), graphs
        assert all(bool(torch.isfinite(a).all()) for a in two)


def test_engine_weight_tiles_must_be_a_bool(quantized: DeepseekV4) -> None:
    with pytest.raises(ValueError, match="^weight_tiles: "):
        Engine(quantized, max_sequences=1, max_len=16, weight_tiles="yes")
