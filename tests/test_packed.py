"""Packed projections (``dsv4rs.model.layers.packed``): linears over one input moved into one
storage run as one GEMM with the values each computes alone; parameters, state dicts and loading
stay as they were; a group that is not (or no longer) back to back runs one linear each; the
engine packs every group (attention layers, shared experts) and decodes as the unpacked model does."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dsv4rs.model import DeepseekV4, V4Config, init_random
from dsv4rs.model.layers.packed import pack_, packed, project
from dsv4rs.model.layers.quant import QuantLinear
from dsv4rs.model.loader import load_checkpoint
from dsv4rs.reference.export import export_deepseek
from dsv4rs.runtime import Engine

from test_quant_ops import fp8_weight


def linears(gen: torch.Generator, k: int, rows: list[int], dtype: torch.dtype = torch.float32,
            device: str = "cpu") -> list[nn.Linear]:
    mods = [nn.Linear(k, n, bias=False, dtype=dtype, device=device) for n in rows]
    with torch.no_grad():
        for m in mods:
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen).to(dtype))
    return mods


def fp8_linears(gen: torch.Generator, k: int, rows: list[int], device: str = "cpu") -> list[QuantLinear]:
    mods = []
    for n in rows:
        m = QuantLinear(k, n, "fp8", dtype=torch.bfloat16)
        w, s = fp8_weight(gen, n, k)
        m.weight.copy_(w.view(torch.uint8))
        m.scale.copy_(s)
        mods.append(m.to(device))
    return mods


def one_storage(mods: list[nn.Module]) -> bool:
    return len({m.weight.untyped_storage().data_ptr() for m in mods}) == 1


@pytest.mark.parametrize("rows", [[32, 16], [1024, 512], [8, 8, 24, 24, 16]])
@pytest.mark.parametrize("tokens", [1, 5])
def test_packed_linears_compute_what_each_computes(gen: torch.Generator, rows: list[int], tokens: int) -> None:
    mods = linears(gen, 64, rows)
    x = torch.randn(tokens, 64, generator=gen)
    want = [m(x) for m in mods]
    params = [m.weight for m in mods]
    values = [p.detach().clone() for p in params]
    assert packed(mods) is None and pack_(mods) and packed(mods) is not None and one_storage(mods)
    assert all(m.weight is p and torch.equal(p, v) for m, p, v in zip(mods, params, values))
    got = project(x, mods)
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert pack_(mods)  # packing twice changes nothing
    assert all(torch.equal(m.weight, v) for m, v in zip(mods, values))


def test_packed_state_dict_and_loading_stay_per_module(gen: torch.Generator) -> None:
    mods = linears(gen, 64, [16, 32])
    holder = nn.ModuleList(mods)
    before = {k: v.clone() for k, v in holder.state_dict().items()}
    assert pack_(mods)
    assert holder.state_dict().keys() == before.keys()
    assert all(torch.equal(holder.state_dict()[k], v) for k, v in before.items())
    fresh = {k: torch.randn(v.shape, generator=gen) for k, v in before.items()}
    holder.load_state_dict(fresh)  # loads into the views: still packed, the new values
    assert packed(mods) is not None
    x = torch.randn(3, 64, generator=gen)
    for g, k in zip(project(x, mods), ("0.weight", "1.weight")):
        torch.testing.assert_close(g, x @ fresh[k].T, rtol=1e-5, atol=1e-5)


def test_a_group_not_back_to_back_runs_one_linear_each(gen: torch.Generator) -> None:
    mods = linears(gen, 64, [16, 32, 8])
    x = torch.randn(2, 64, generator=gen)
    assert pack_(mods)
    mods[1].weight = nn.Parameter(mods[1].weight.detach().clone() * 2)  # replaced: its own storage now
    assert packed(mods) is None
    got = project(x, mods)
    for g, m in zip(got, mods):
        assert torch.equal(g, m(x))
    # Reordered modules are not the packed order either.
    assert pack_(mods) and packed(mods) is not None and packed([mods[1], mods[0], mods[2]]) is None


def test_a_module_with_hooks_or_its_own_forward_runs_alone(gen: torch.Generator) -> None:
    """Forward hooks (the module's or every module's) and a forward set on the module see their
    calls: the group runs one module each while they are there, packed again after."""
    mods = linears(gen, 64, [16, 32])
    x = torch.randn(2, 64, generator=gen)
    assert pack_(mods)
    calls = []

    def hook(m: nn.Module, args: tuple) -> tuple:
        calls.append(m)
        return (args[0] * 2,)

    for register in (mods[1].register_forward_pre_hook, nn.modules.module.register_module_forward_pre_hook):
        handle = register(hook)
        ptrs = [m.weight.data_ptr() for m in mods]
        assert packed(mods) is None and pack_(mods) and [m.weight.data_ptr() for m in mods] == ptrs  # not copied again
        got = project(x, mods)
        torch.testing.assert_close(got[1], (2 * x) @ mods[1].weight.detach().T)
        assert mods[1] in calls
        handle.remove()
        calls.clear()
        assert packed(mods) is not None
    mods[0].forward = lambda t: torch.zeros(t.shape[0], 16)
    assert packed(mods) is None and torch.equal(project(x, mods)[0], torch.zeros(2, 16))
    del mods[0].forward
    assert packed(mods) is not None


def test_groups_that_one_linear_cannot_run_are_left_alone(gen: torch.Generator) -> None:
    lin = linears(gen, 128, [128])[0]
    fp8 = fp8_linears(gen, 128, [128])[0]
    biased = nn.Linear(64, 8)
    cases = {
        "mixed kinds": [lin, fp8],
        "one module": [lin],
        "a bias": [biased, linears(gen, 64, [8])[0]],
        "two dtypes": [linears(gen, 64, [8])[0], linears(gen, 64, [8], torch.float64)[0]],
        "two input widths": [linears(gen, 64, [8])[0], linears(gen, 32, [8])[0]],
        "an FP8 part off its scale blocks": fp8_linears(gen, 128, [64, 128]),
    }
    for name, mods in cases.items():
        ptrs = [m.weight.data_ptr() for m in mods]
        assert not pack_(mods), name
        assert packed(mods) is None and [m.weight.data_ptr() for m in mods] == ptrs, name


@pytest.mark.parametrize("rows", [[128, 64], [256, 128, 128]])
def test_packed_fp8_linears_compute_what_each_computes(gen: torch.Generator, rows: list[int]) -> None:
    mods = fp8_linears(gen, 256, rows)
    x = torch.randn(3, 256, generator=gen).bfloat16()
    want = [m(x) for m in mods]
    assert pack_(mods) and one_storage(mods) and len({m.scale.untyped_storage().data_ptr() for m in mods}) == 1
    for g, w in zip(project(x, mods), want):
        assert torch.equal(g, w)  # the CPU sums each column in one order, whatever the rows around it


def unpack(model: DeepseekV4) -> None:
    """Gives every packed weight its own storage again (the groups then run one linear each)."""
    for g in groups(model):
        for m in g:
            for name in ("weight", "scale") if isinstance(m, QuantLinear) else ("weight",):
                t = getattr(m, name).detach().clone()
                setattr(m, name, t if isinstance(m, QuantLinear) else nn.Parameter(t, requires_grad=False))
        assert packed(g) is None


def groups(model: nn.Module) -> list[tuple[nn.Module, ...]]:
    return [g for m in model.modules() if hasattr(m, "input_groups") for g in m.input_groups()]


def decode(eng: Engine, prompts: list[torch.Tensor], steps: torch.Tensor) -> list[torch.Tensor]:
    """Logits of a prefill of ``prompts`` and then ``steps [n, B]`` decode tokens."""
    seqs = [eng.add_sequence()[0] for _ in prompts]
    out = [eng.step(seqs, list(prompts))]
    out += [eng.step(seqs, [[int(t)] for t in row]) for row in steps]
    return out


@pytest.mark.parametrize("shipped", [False, True])
def test_engine_packs_every_group_and_decodes_as_the_unpacked_model(
        gen: torch.Generator, tmp_path, shipped: bool) -> None:
    """A float32 model (every group packs), and DeepSeek's layout (FP8 W_qa and the shared
    expert's W_gate of 128 rows pack too): prefill and decode logits as without packing."""
    cfg = V4Config.tiny(q_lora_rank=128, moe_intermediate_size=128)
    model = init_random(DeepseekV4(cfg), seed=5)
    if shipped:
        export_deepseek(model, tmp_path, progress=False)
        model = load_checkpoint(tmp_path, progress=False)
    plain = copy.deepcopy(model)
    eng = Engine(model, max_sequences=2, max_len=300, cuda_graphs=False)
    found = groups(model)
    assert found and all(packed(g) is not None for g in found)
    sizes = {(type(m).__name__, len(g)) for m in model.modules() if hasattr(m, "input_groups")
             for g in m.input_groups()}
    assert sizes == {("Attention", 2), ("Attention", 5), ("MLP", 2)}  # W_qa + W_kv, CSA's five, W_gate + W_up
    assert any(isinstance(g[0], QuantLinear) for g in found) == shipped
    ref = Engine(plain, max_sequences=2, max_len=300, cuda_graphs=False)
    unpack(plain)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen) for n in (150, 9)]
    steps = torch.randint(0, cfg.vocab_size, (6, 2), generator=gen)
    for got, want in zip(decode(eng, prompts, steps), decode(ref, prompts, steps)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("tile_first", [False, True])
def test_gpu_packed_fp8_linears_in_tiles_compute_what_each_computes(gen: torch.Generator, tile_first: bool) -> None:
    """On the GPU (weights in tiles, packed before or after tiling): one GEMV or GEMM over the
    packed rows, within the rounding of a different split of K."""
    mods = fp8_linears(gen, 1024, [1024, 512], device="cuda")
    for tokens in (1, 8, 40, 300):
        x = torch.randn(tokens, 1024, generator=gen).bfloat16().cuda()
        want = [m(x).float() for m in mods]
        if tile_first:
            assert all(m.tile() for m in mods)
        assert pack_(mods)
        if not tile_first:
            assert all(m.tile() for m in mods)
        assert packed(mods) is not None
        for g, w in zip(project(x, mods), want):
            torch.testing.assert_close(g.float(), w, rtol=2e-2, atol=2e-2 * float(w.abs().max()))
        unpack_fp8(mods)


def unpack_fp8(mods: list[QuantLinear]) -> None:
    for m in mods:
        m.weight, m.scale = m.stored_weight().clone(), m.scale.clone()
        m.layout = "rows"


@pytest.mark.gpu
def test_gpu_engine_packed_decodes_as_the_unpacked_model(gen: torch.Generator, tmp_path) -> None:
    """DeepSeek's layout on the GPU (FP8 W_qa and W_kv in tiles, bfloat16 compressor and indexer
    projections): prefill and decode logits, eager and replayed from graphs, within the rounding
    of the packed GEMMs' other splits of K."""
    cfg = V4Config.tiny(q_lora_rank=128, moe_intermediate_size=128, hidden_size=256)
    export_deepseek(init_random(DeepseekV4(cfg), seed=7), tmp_path, progress=False)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).cuda() for n in (70, 9)]
    steps = torch.randint(0, cfg.vocab_size, (6, 2), generator=gen)
    for graphs in (False, True):
        model = load_checkpoint(tmp_path, device="cuda", dtype=torch.bfloat16, progress=False)
        plain = load_checkpoint(tmp_path, device="cuda", dtype=torch.bfloat16, progress=False)
        eng = Engine(model, max_sequences=2, max_len=128, cuda_graphs=graphs)
        assert all(packed(g) is not None for g in groups(model))
        ref = Engine(plain, max_sequences=2, max_len=128, cuda_graphs=graphs)
        unpack(plain)
        for got, want in zip(decode(eng, prompts, steps), decode(ref, prompts, steps)):
            assert bool(torch.isfinite(got).all())
            torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2 * float(want.abs().max()))
