"""The V4 model (python/dsv4rs/model): config, parity with transformers' DeepseekV4ForCausalLM,
prefill = chunked prefill = decode through the paged cache, batches, forks, prefix reuse, MTP,
the quantization switch, the checkpoint loader and its errors, and ``dsv4rs demo``."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dsv4rs.model import DeepseekV4, V4Config, init_random
from dsv4rs.model.config import CSA, HCA, SWA
from dsv4rs.model.layers.compressor import Indexer
from dsv4rs.model.loader import CheckpointError, canonical_name, load_checkpoint
from dsv4rs.reference.dense import dense_forward, float64_copy
from dsv4rs.reference.export import export_deepseek
from dsv4rs.runtime import Engine


def _transformers():
    """transformers is a test dependency (scripts/env.sh); the GPU machine may lack it."""
    return pytest.importorskip("transformers")

# Long enough that every HCA layer closes 4 blocks and the indexer keeps 16 of up to 150 entries.
LONG = 600
TOL = 1e-5  # logits are O(1); float32 against float32/float64

CONFIGS = {
    "flash-like": V4Config.tiny(),
    "pro-like": V4Config.tiny(layer_types=(HCA, HCA, CSA, HCA), index_topk=40, num_attention_heads=8, o_groups=4,
                              mlp_layer_types=("hash_moe", "moe", "moe", "moe"), num_nextn_predict_layers=0),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request: pytest.FixtureRequest) -> DeepseekV4:
    return init_random(DeepseekV4(CONFIGS[request.param]), seed=7)


@pytest.fixture(scope="module")
def tiny() -> DeepseekV4:
    return init_random(DeepseekV4(V4Config.tiny()), seed=3)


def ids_for(cfg: V4Config, n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (n,), generator=gen)


def hf_model(model: DeepseekV4):
    transformers = _transformers()
    cfg = transformers.DeepseekV4Config(**model.config.to_hf_dict())
    cfg._attn_implementation = "eager"
    hf = transformers.DeepseekV4ForCausalLM(cfg).eval()
    hf.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")})
    return hf


def prefill(model: DeepseekV4, ids: torch.Tensor, **kw) -> torch.Tensor:
    eng = Engine(model, max_sequences=1, max_len=ids.numel(), **kw)
    seq, _ = eng.add_sequence()
    return eng.step([seq], [ids], all_logits=True)[0]


# -- config ------------------------------------------------------------------------------------------


def test_presets_match_spec() -> None:
    pro, flash = V4Config.v4_pro(), V4Config.v4_flash()
    assert pro.compress_ratios == (128, 128) + tuple(4 if i % 2 == 0 else 128 for i in range(2, 61)) + (0,)
    assert flash.compress_ratios == (0, 0) + tuple(4 if i % 2 == 0 else 128 for i in range(2, 43)) + (0,)
    assert (pro.layer_types.count(CSA), pro.layer_types.count(HCA)) == (30, 31)
    assert (flash.layer_types.count(CSA), flash.layer_types.count(HCA), flash.layer_types.count(SWA)) == (21, 20, 2)
    # The compressed layers' YaRN ramp of docs/model.md section 2: (j - 15) / 10.
    inv = torch.tensor(flash.inv_freq(True), dtype=torch.float64)
    base = 160000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    ramp = ((torch.arange(32) - 15) / 10).clamp(0, 1).double()
    torch.testing.assert_close(inv, (base * (1 - ramp) + base / 16 * ramp).float().double())


def test_config_reads_both_spellings(tmp_path) -> None:
    cfg = V4Config.tiny()
    hf = _transformers().DeepseekV4Config(**cfg.to_hf_dict())
    hf.save_pretrained(tmp_path)
    assert V4Config.from_pretrained(tmp_path) == cfg
    deepseek = {k: v for k, v in cfg.to_hf_dict().items()
                if k not in ("layer_types", "mlp_layer_types", "rope_parameters", "partial_rotary_factor")}
    deepseek.update(compress_ratios=list(cfg.compress_ratios), num_hash_layers=2, qk_rope_head_dim=64,
                    rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                                  "beta_fast": 32, "beta_slow": 1})
    assert V4Config.from_dict(deepseek) == cfg


def _inference_dict(cfg: V4Config, **yarn) -> dict:
    """``cfg`` in DeepSeek's inference/config.json spelling (its ModelArgs fields)."""
    return {"vocab_size": cfg.vocab_size, "dim": cfg.hidden_size, "moe_inter_dim": cfg.moe_intermediate_size,
            "n_layers": cfg.num_hidden_layers, "n_hash_layers": cfg.hash_layers,
            "n_mtp_layers": cfg.num_nextn_predict_layers, "n_heads": cfg.num_attention_heads,
            "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": 1, "n_activated_experts": cfg.num_experts_per_tok,
            "score_func": "sqrtsoftplus", "route_scale": cfg.routed_scaling_factor, "swiglu_limit": cfg.swiglu_limit,
            "q_lora_rank": cfg.q_lora_rank, "head_dim": 512, "rope_head_dim": 64, "norm_eps": cfg.rms_norm_eps,
            "o_groups": cfg.o_groups, "o_lora_rank": cfg.o_lora_rank, "window_size": cfg.sliding_window,
            "compress_ratios": list(cfg.compress_ratios), "compress_rope_theta": cfg.compress_rope_theta,
            "rope_theta": cfg.rope_theta, "index_n_heads": cfg.index_n_heads, "index_head_dim": 128,
            "index_topk": cfg.index_topk, "hc_mult": cfg.hc_mult, "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters,
            "hc_eps": cfg.hc_eps, "max_batch_size": 4, "max_seq_len": 4096, "dtype": "fp8", "scale_fmt": "ue8m0",
            "expert_dtype": "fp4", **yarn}


_YARN = {"original_seq_len": 65536, "rope_factor": 16, "beta_fast": 32, "beta_slow": 1}


def test_config_reads_deepseeks_inference_spelling(tmp_path) -> None:
    """DeepSeek's inference/config.json spelling loads to the same config as transformers'; a
    folder with only inference/config.json is read from there."""
    for cfg in (V4Config.tiny(), V4Config.v4_flash(), V4Config.v4_pro()):
        assert V4Config.from_dict(_inference_dict(cfg, **_YARN)) == cfg
        assert V4Config.from_dict(cfg.to_hf_dict()) == cfg
    # original_seq_len 0 (ModelArgs' default): no YaRN, as precompute_freqs_cis does.
    plain = V4Config.from_dict(_inference_dict(V4Config.tiny()))
    assert plain.yarn is None and plain == dataclasses.replace(V4Config.tiny(), yarn=None)
    (tmp_path / "inference").mkdir()
    (tmp_path / "inference" / "config.json").write_text(json.dumps(_inference_dict(V4Config.v4_flash(), **_YARN)))
    assert V4Config.from_pretrained(tmp_path) == V4Config.v4_flash()
    (tmp_path / "config.json").write_text(json.dumps(V4Config.tiny().to_hf_dict()))  # the hub's file comes first
    assert V4Config.from_pretrained(tmp_path) == V4Config.tiny()


@pytest.mark.parametrize(("change", "message"), [
    ({"dim": None}, r"config dim: missing"),
    ({"compress_ratios": None}, r"config compress_ratios: missing"),
    ({"compress_ratios": [0, 4]}, r"config compress_ratios: 2 entries for n_layers = 4"),
    ({"n_shared_experts": 2}, r"config n_shared_experts: V4 has exactly 1 shared expert"),
    ({"n_shared_experts": 0}, r"config n_shared_experts"),
    ({"swiglu_limit": None}, r"config swiglu_limit: must be a finite number > 0, got 0"),  # ModelArgs' default 0
    ({"original_seq_len": -1}, r"config original_seq_len"),
    ({"rope_factor": "x"}, r"config rope_parameters: factor"),
    ({"n_heads": 5}, r"config o_groups"),
])
def test_inference_spelling_errors_name_the_key(change: dict, message: str) -> None:
    d = {k: v for k, v in (_inference_dict(V4Config.tiny(), **_YARN) | change).items() if v is not None}
    with pytest.raises(ValueError, match=message):
        V4Config.from_dict(d)


def test_every_transformers_config_key_is_read_or_refused_or_known_irrelevant() -> None:
    """Each field of transformers' DeepseekV4Config is a V4Config field, one from_dict translates
    or checks, or listed in IGNORED_KEYS; each checked one, set to a value V4 does not have, is
    refused naming it."""
    from dsv4rs.model.config import IGNORED_KEYS

    hf_fields = set(vars(_transformers().DeepseekV4Config)["__annotations__"]) - {"model_type", "base_config_key"}
    assert {"vocab_size", "attention_bias", "rope_parameters"} <= hf_fields
    ours = {f.name for f in dataclasses.fields(V4Config)}
    translated = {"compress_rates", "rope_parameters", "partial_rotary_factor", "num_key_value_heads",
                  "hidden_act", "attention_bias", "mlp_bias"}
    unknown = sorted(k for k in hf_fields if k not in ours | translated | set(IGNORED_KEYS)
                     and not k.startswith("_") and k.islower())
    assert not unknown, f"transformers' DeepseekV4Config keys dsv4rs neither reads nor lists: {unknown}"
    base = V4Config.tiny().to_hf_dict()
    for key, value in [("num_key_value_heads", 2), ("hidden_act", "gelu"), ("attention_bias", True),
                       ("mlp_bias", True), ("partial_rotary_factor", 0.25),
                       ("compress_rates", {CSA: 8, HCA: 128}), ("n_shared_experts", 2)]:
        with pytest.raises(ValueError, match=key if key != "partial_rotary_factor" else "qk_rope_head_dim"):
            V4Config.from_dict(base | {key: value})


def test_config_refuses_other_shared_expert_counts() -> None:
    for n in (0, 2):
        with pytest.raises(ValueError, match="n_shared_experts"):
            V4Config.tiny(n_shared_experts=n)
        with pytest.raises(ValueError, match="n_shared_experts"):
            V4Config.from_dict(V4Config.tiny().to_hf_dict() | {"n_shared_experts": n})


def test_rope_frequencies_and_official_table_are_transformers_bit_for_bit() -> None:
    """The model's inverse frequencies (float32 arithmetic) are transformers' and DeepSeek's
    (the reference's official_inv_freq, written from inference/model.py) bit for bit, and the
    reference's "official" table gives transformers' float32 cos/sin up to 1M positions."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

    from dsv4rs.model.layers.rotary import inv_freq
    from dsv4rs.reference import ops as ref

    pos = torch.tensor([0, 7, 4096, 131071, (1 << 20) - 1])
    for cfg in (V4Config.tiny(), V4Config.v4_flash(), V4Config.v4_pro()):
        rot = DeepseekV4RotaryEmbedding(_transformers().DeepseekV4Config(**cfg.to_hf_dict()))
        for compressed, kind in ((False, "main"), (True, "compress")):
            ours = inv_freq(cfg, compressed)
            assert torch.equal(ours, getattr(rot, f"{kind}_inv_freq")), (cfg.hidden_size, kind)
            y = cfg.yarn
            official = (ref.official_inv_freq(64, cfg.compress_rope_theta, y.factor, y.original_max_position_embeddings,
                                              y.beta_fast, y.beta_slow) if compressed
                        else ref.official_inv_freq(64, cfg.rope_theta))
            assert torch.equal(ours, official)
            cos, sin = rot(torch.zeros(1), pos[None], layer_type=kind)
            unit = torch.zeros(len(pos), 64, dtype=torch.float64)
            unit[:, 0::2] = 1.0
            got = ref.apply_rope(unit, pos, official, table="official")
            torch.testing.assert_close(got[:, 0::2], cos[0].double(), rtol=0, atol=2**-22)
            torch.testing.assert_close(got[:, 1::2], sin[0].double(), rtol=0, atol=2**-22)
            exact = ref.apply_rope(unit, pos, official.double())  # exact angles drift from it at 1M
            assert float((exact[-1, 0::2] - cos[0, -1].double()).abs().max()) > 1e-4


def test_exact_rope_is_relative_and_the_table_drifts(model: DeepseekV4) -> None:
    """The reference at a position offset: exact angles give the same logits at any offset (what
    a sequence sees is unchanged); DeepSeek's float32 table moves them, more at 1M than at 4K."""
    m = float64_copy(model)
    ids = torch.randint(0, m.config.vocab_size, (140,), generator=torch.Generator().manual_seed(4))
    base = dense_forward(m, ids, rope_table="exact")
    torch.testing.assert_close(dense_forward(m, ids, position_offset=4096, rope_table="exact"), base, rtol=0, atol=1e-11)
    near = (dense_forward(m, ids, position_offset=4096, rope_table="official") - base).abs().max()
    far = (dense_forward(m, ids, position_offset=(1 << 20) - 256, rope_table="official") - base).abs().max()
    assert 0 < near < far
    for kwargs, name in ((dict(position_offset=100), "position_offset"), (dict(position_offset=-128), "position_offset"),
                         (dict(rope_table="fp16"), "rope_table")):
        with pytest.raises(ValueError, match=name):
            dense_forward(m, ids[:8], **kwargs)


def test_rope_table_reaches_every_op(tiny: DeepseekV4, gen: torch.Generator, monkeypatch) -> None:
    """set_rope_table's choice is what every rotating op of every layer is called with (the
    queries and entries, the compressors, the output's de-rotation), and the engine's logits
    match the reference computed with the same table."""
    from dsv4rs import ops

    seen: dict[str, set] = {}
    for name, key in (("rope", "table"), ("compress_batch", "rope_table"), ("sparse_attention", "rope_table")):
        def spy(*args, _op=getattr(ops, name), _name=name, _key=key, **kw):
            seen.setdefault(_name, set()).add(kw.get(_key))
            return _op(*args, **kw)
        monkeypatch.setattr(ops, name, spy)
    ids = ids_for(tiny.config, 140, gen)
    try:
        for table in ops.ROPE_TABLES:
            seen.clear()
            got = prefill(tiny.set_rope_table(table), ids)
            assert tiny.rope_table == table
            assert seen == {"rope": {table}, "compress_batch": {table}, "sparse_attention": {table}}
            want = dense_forward(float64_copy(tiny), ids, rope_table=table)
            torch.testing.assert_close(got.double(), want, atol=TOL, rtol=0)
            # The reference's default is the model's own table.
            torch.testing.assert_close(dense_forward(float64_copy(tiny), ids), want, atol=0, rtol=0)
    finally:
        tiny.set_rope_table("official")
    with pytest.raises(ValueError, match="table"):
        tiny.set_rope_table("float64")


@pytest.mark.parametrize(("change", "names"), [
    ({"head_dim": 256}, "head_dim"),
    ({"layer_types": [SWA] * 3}, "layer_types"),
    ({"layer_types": ["full_attention"] * 4}, "layer_types"),
    ({"num_attention_heads": 6, "o_groups": 4}, "o_groups"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"model_type": "llama"}, "model_type"),
    ({"vocab_size": None}, "vocab_size"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 16}}, "rope_parameters"),
    ({"rope_theta": 10**400}, "rope_theta"),  # an int past a float's range
    ({"swiglu_limit": -(2**1100)}, "swiglu_limit"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 10**400, "original_max_position_embeddings": 64}},
     "rope_parameters: factor"),
])
def test_config_errors_name_the_key(change: dict, names: str) -> None:
    d = V4Config.tiny().to_hf_dict() | {"model_type": "deepseek_v4"}
    d.update(change)
    d = {k: v for k, v in d.items() if v is not None}
    with pytest.raises(ValueError, match=f"^config {names}"):
        V4Config.from_dict(d)


def test_config_holds_numbers_as_floats(gen: torch.Generator) -> None:
    """Ints where the config takes a number (a JSON ``10000``, or one past int64) are held as
    floats, and a model built from them runs."""
    d = V4Config.tiny().to_hf_dict() | {"rope_theta": 2**64 + 1, "swiglu_limit": 7, "hc_eps": 1}
    d["rope_parameters"] = d["rope_parameters"] | {"factor": 2**64 + 1}
    cfg = V4Config.from_dict(d)
    assert (cfg.rope_theta, cfg.swiglu_limit, cfg.hc_eps, cfg.yarn.factor) == (2.0**64, 7.0, 1.0, 2.0**64)
    assert all(type(getattr(cfg, f.name)) is float for f in dataclasses.fields(cfg) if f.type == "float")
    logits = prefill(init_random(DeepseekV4(cfg), seed=1), ids_for(cfg, 40, gen))
    assert logits.isfinite().all()


@pytest.mark.parametrize(("kw", "error", "name"), [
    ({"seed": "x"}, ValueError, "seed"), ({"seed": 2**70}, ValueError, "seed"), ({"seed": -1}, ValueError, "seed"),
    ({"seed": True}, ValueError, "seed"), ({"std": math.nan}, ValueError, "std"), ({"model": None}, TypeError, "model"),
])
def test_init_random_names_its_arguments(kw: dict, error: type, name: str) -> None:
    with pytest.raises(error, match=f"^{name}: "):
        init_random(**({"model": DeepseekV4(V4Config.tiny()), "seed": 0} | kw))


# -- parity with transformers -------------------------------------------------------------------------


def test_matches_transformers(model: DeepseekV4, gen: torch.Generator, tmp_path) -> None:
    """A checkpoint saved by transformers loads, and the engine's prefill logits equal
    DeepseekV4ForCausalLM's, with every layer type compressing several blocks and the indexer
    dropping candidates."""
    cfg = model.config
    hf = hf_model(model)
    hf.save_pretrained(tmp_path, max_shard_size="300KB")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    loaded = load_checkpoint(tmp_path, progress=False)
    ids = ids_for(cfg, LONG, gen)
    assert LONG // 128 >= 4 and LONG // 4 > cfg.index_topk
    with torch.no_grad():
        want = hf(input_ids=ids[None], use_cache=True).logits[0]
    got = prefill(loaded, ids)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    torch.testing.assert_close(dense_forward(float64_copy(loaded), ids).float(), want, atol=TOL, rtol=0)


def test_transformers_decode_matches_engine_decode(tiny: DeepseekV4, gen: torch.Generator) -> None:
    """transformers' own cache, token by token past a prompt, against the engine's decode."""
    ids = ids_for(tiny.config, 300, gen)
    hf = hf_model(tiny)
    eng = Engine(tiny, max_sequences=1, max_len=300)
    seq, _ = eng.add_sequence()
    with torch.no_grad():
        out = hf(input_ids=ids[None, :260], use_cache=True)
        cache, want = out.cache, [out.logits[0, -1]]
        for t in range(260, 300):
            out = hf(input_ids=ids[None, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            want.append(out.logits[0, -1])
    got = [eng.step([seq], [ids[:260]])[0]] + [eng.step([seq], [ids[t : t + 1]])[0] for t in range(260, 300)]
    torch.testing.assert_close(torch.stack(got), torch.stack(want), atol=TOL, rtol=0)


# -- the engine -------------------------------------------------------------------------------------


def test_decode_and_chunks_equal_one_prefill(model: DeepseekV4, gen: torch.Generator) -> None:
    cfg = model.config
    ids = ids_for(cfg, LONG, gen)
    whole = prefill(model, ids)
    want = dense_forward(float64_copy(model), ids)  # with the model's table, as the engine
    torch.testing.assert_close(whole.double(), want, atol=TOL, rtol=0)
    eng = Engine(model, max_sequences=2, max_len=LONG)
    a, _ = eng.add_sequence()
    b, _ = eng.add_sequence()
    cuts = sorted(torch.randperm(LONG - 1, generator=gen)[:6].add(1).tolist())
    chunked = [eng.step([a], [ids[x:y]], all_logits=True)[0] for x, y in zip([0, *cuts], [*cuts, LONG])]
    torch.testing.assert_close(torch.cat(chunked), whole, atol=TOL, rtol=0)
    stepped = [eng.step([b], [ids[t : t + 1]])[0] for t in range(LONG)]
    torch.testing.assert_close(torch.stack(stepped), whole, atol=TOL, rtol=0)


def test_batch_of_different_lengths_fork_and_release(tiny: DeepseekV4, gen: torch.Generator) -> None:
    cfg = tiny.config
    ids = [ids_for(cfg, n, gen) for n in (420, 131, 7)]
    refs = [dense_forward(float64_copy(tiny), x).float() for x in ids]
    eng = Engine(tiny, max_sequences=4, max_len=512)
    seqs = [eng.add_sequence()[0] for _ in ids]
    firsts = (300, 100, 3)
    outs = eng.step(seqs, [x[:n] for x, n in zip(ids, firsts)], all_logits=True)
    for o, r, n in zip(outs, refs, firsts):
        torch.testing.assert_close(o, r[:n], atol=TOL, rtol=0)
    # Fork the middle sequence; parent and child continue differently, both exact.
    child = eng.fork(seqs[1])
    other = ids_for(cfg, 31, gen)
    out_parent, out_child = eng.step([seqs[1], child], [ids[1][100:131], other], all_logits=True)
    torch.testing.assert_close(out_parent, refs[1][100:131], atol=TOL, rtol=0)
    want_child = dense_forward(float64_copy(tiny), torch.cat([ids[1][:100], other])).float()[100:]
    torch.testing.assert_close(out_child, want_child, atol=TOL, rtol=0)
    eng.release(seqs[1])
    # The others continue, decoding together, after the release.
    outs = [eng.step([seqs[0], seqs[2]], [ids[0][t : t + 1], ids[2][t - 297 : t - 296]]) for t in range(300, 304)]
    torch.testing.assert_close(torch.stack([o[0] for o in outs]), refs[0][300:304], atol=TOL, rtol=0)
    torch.testing.assert_close(torch.stack([o[1] for o in outs]), refs[2][3:7], atol=TOL, rtol=0)
    eng.manager.check()


def test_prefix_reuse(tiny: DeepseekV4, gen: torch.Generator) -> None:
    """A second sequence sharing a cached prefix re-runs only the rebuild span, and its logits
    from the cached point on equal the reference."""
    cfg = tiny.config
    ids = ids_for(cfg, 1100, gen)
    ref = dense_forward(float64_copy(tiny), ids).float()
    eng = Engine(tiny, max_sequences=3, max_len=1200)
    a, _ = eng.add_sequence(ids[:1000])
    eng.step([a], [ids[:1000]])
    used = eng.manager.used_pages()
    b, hit = eng.add_sequence(ids)
    assert hit.cached_tokens == 768 and hit.recompute_from == 768 - eng.cache_config.rebuild_tokens
    out = eng.step([b], [ids[hit.recompute_from :]], all_logits=True)[0]
    skip = hit.cached_tokens - hit.recompute_from
    torch.testing.assert_close(out[skip:], ref[hit.cached_tokens :], atol=TOL, rtol=0)
    # The compressed rows of the first 768 tokens are shared, not copied.
    grown = {f: eng.manager.used_pages()[f] - used[f] for f in ("csa", "hca")}
    assert grown["csa"] < -(-(1100 // 4) // 64) and grown["hca"] < -(-(1100 // 128) // 64) + 1


def test_mtp_draft(tiny: DeepseekV4, gen: torch.Generator) -> None:
    ids = ids_for(tiny.config, 301, gen)
    _, want = dense_forward(float64_copy(tiny), ids[:300], mtp_ids=ids[1:301])
    eng = Engine(tiny, max_sequences=1, max_len=302)
    seq, _ = eng.add_sequence()
    eng.step([seq], [ids[:250]])
    got = [eng.draft([int(ids[250])])[0]]
    for t in range(250, 300):
        eng.step([seq], [ids[t : t + 1]])
        got.append(eng.draft([int(ids[t + 1])])[0])
    torch.testing.assert_close(torch.stack(got).double(), want[249:300], atol=TOL, rtol=0)
    eng.step([seq], [ids[300:301]])
    eng.step([seq], [ids[300:301]])
    with pytest.raises(ValueError, match="missed tokens"):
        eng.draft([1])


def test_quantization_switch(tiny: DeepseekV4, gen: torch.Generator) -> None:
    """With FP8 entries and FP4 indexer keys and queries the engine follows the reference with the
    same round trips. Exact agreement is not possible: float32 and float64 values that straddle an
    FP8/FP4 rounding boundary round apart, and the gap grows through the layers (a 1e-7 nudge of the
    reference's own weights moves it as much). So: the engine must sit far closer to the quantized
    reference than the quantized and unquantized references sit to each other."""
    ids = ids_for(tiny.config, LONG, gen)
    m64 = float64_copy(tiny)
    ref_q, ref = dense_forward(m64, ids, quant=True), dense_forward(m64, ids)
    got = prefill(tiny, ids, quant=True).double()
    err = (got - ref_q).abs().amax(-1)
    effect = (ref - ref_q).abs().amax(-1)
    assert float(err.median()) < 0.25 * float(effect.median())
    assert float(effect.median()) > 1e-3  # the round trips are really applied
    for fmt in ("fp4", "fp8"):
        eng = Engine(tiny, max_sequences=1, max_len=LONG, quant=True, index_format=fmt)
        assert eng.cache.csa_keys.dtype == torch.uint8 and eng.cache.window.shape[-1] == 64 * 584


def test_indexer_tie_break_switch(tiny: DeepseekV4, gen: torch.Generator) -> None:
    """``torch.topk`` over the dense scores selects what the fused top-k selects when no scores
    tie exactly (random weights), so the logits are the same."""
    ids = ids_for(tiny.config, 160, gen)  # up to 40 compressed entries, of which the indexer keeps 16
    model = copy.deepcopy(tiny)
    assert model.set_indexer_tie_break("torch") is model
    assert {m.tie_break for m in model.modules() if isinstance(m, Indexer)} == {"torch"}
    assert torch.equal(prefill(model, ids), prefill(tiny, ids))
    with pytest.raises(ValueError, match="tie_break"):
        model.set_indexer_tie_break("higher")


def test_engine_rejects_bad_input(tiny: DeepseekV4) -> None:
    eng = Engine(tiny, max_sequences=1, max_len=16)
    seq, _ = eng.add_sequence()
    with pytest.raises(ValueError, match=r"chunks\[0\]: token ids"):
        eng.step([seq], [[tiny.config.vocab_size]])
    with pytest.raises(ValueError, match="at least one token"):
        eng.step([seq], [[]])
    with pytest.raises(ValueError, match="unknown sequence"):
        eng.step([seq + 5], [[1]])
    with pytest.raises(ValueError, match="max_len"):
        eng.step([seq], [list(range(17))])
    with pytest.raises(ValueError, match="appears twice"):
        eng.step([seq, seq], [[1], [2]])
    # Token ids are ints: floats and bools are refused, not truncated; a 2-d tensor, not flattened.
    for bad in ([1.5], [True], torch.tensor([1.0]), torch.tensor([[1, 2]]), 3, "ab", [None]):
        with pytest.raises(TypeError, match=r"^chunks\[0\]: "):
            eng.step([seq], [bad])
        with pytest.raises(TypeError, match="^prompt: "):
            eng.add_sequence(bad)
    with pytest.raises(ValueError, match=r"^chunks\[0\]: token ids must lie in \[0, 2\^63\)"):
        eng.step([seq], [[2**63]])
    # The batch's other arguments are checked before anything runs: ``last`` holds ints (a bool
    # passed the range check, appended the chunk and then failed in the LM head), ``seq_ids``
    # ints, ``chunks`` a sequence.
    for kw, error, name in [({"last": [True]}, TypeError, "last"), ({"last": 3}, TypeError, "last"),
                            ({"last": [1.0]}, TypeError, "last"), ({"last": [4]}, ValueError, "last"),
                            ({"seq_ids": seq}, TypeError, "seq_ids"), ({"seq_ids": [float(seq)]}, TypeError, "seq_ids"),
                            ({"seq_ids": [seq == 0]}, TypeError, "seq_ids"), ({"chunks": 7}, TypeError, "chunks")]:
        args = {"seq_ids": [seq], "chunks": [[1, 2, 3]]} | kw
        with pytest.raises(error, match=f"^{name}: "):
            eng.step(**args)
    for kw, name in [({"seq_ids": seq}, "seq_ids"), ({"temperature": np.float32(math.nan)}, "temperature")]:
        args = {"seq_ids": [seq], "logits": torch.zeros(1, tiny.config.vocab_size)} | kw
        with pytest.raises((TypeError, ValueError), match=f"^{name}: "):
            eng.sample(**args)
    assert eng.manager.length(seq) == 0 and eng.manager.sequence_ids() == [seq]
    with pytest.raises(ValueError, match="call step first"):
        eng.draft([1])
    assert eng.manager.length(seq) == 0  # nothing was appended by the failed calls
    eng.step([seq], [[1, 2, 3]])
    assert eng.manager.length(seq) == 3
    with pytest.raises(ValueError, match="max_sequences"):
        Engine(tiny, max_sequences=0)
    # The constructor's other arguments, each named; sizes past what a pool holds name the two
    # that set them, before anything is allocated.
    for kw, name in [({"quant": "yes"}, "quant"), ({"cuda_graphs": 1}, "cuda_graphs"),
                     ({"graph_buckets": [-1]}, "graph_buckets"), ({"graph_buckets": "ab"}, "graph_buckets"),
                     ({"graph_buckets": [2.0]}, "graph_buckets"), ({"memory_fraction": "x"}, "memory_fraction"),
                     ({"memory_fraction": True}, "memory_fraction"),
                     ({"max_sequences": 10**9, "max_len": 256}, "max_sequences, max_len"),
                     ({"max_sequences": 2, "max_len": 10**12}, "max_sequences, max_len"),
                     ({"max_sequences": 2**62, "max_len": 2**62}, "max_sequences, max_len")]:
        with pytest.raises(ValueError, match=f"^{name}: "):
            Engine(tiny, **({"max_sequences": 1, "max_len": 16} | kw))
    # NumPy scalars are numbers; a tensor of sequence ids is a batch.
    eng.sample([seq], torch.zeros(1, tiny.config.vocab_size), temperature=np.float32(0.5), seed=np.int64(3))
    assert eng.step(torch.tensor([seq]), [[1, 2, 3]], last=[2])[0].shape == (2, tiny.config.vocab_size)
    assert eng.step([seq], torch.tensor([[4, 5]])).shape == (1, tiny.config.vocab_size)  # a 2-d tensor: its rows
    with pytest.raises(TypeError, match=r"^chunks\[0\]: "):
        eng.step([seq], torch.tensor([[4.0]]))
    eng.release(seq)  # a sequence of the last step released: no draft for that step
    with pytest.raises(ValueError, match=f"^draft: sequence {seq} of the last step was released"):
        eng.draft([1])


# -- checkpoints --------------------------------------------------------------------------------------


def test_deepseek_format_loads_as_its_dequantized_twin(tiny: DeepseekV4, gen: torch.Generator, tmp_path) -> None:
    twin = export_deepseek(tiny, tmp_path, shard_bytes=1 << 19, progress=False)
    files = os.listdir(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "layers.0.attn.wq_a.scale" in index and "layers.1.ffn.experts.3.w2.scale" in index
    assert "mtp.0.e_proj.weight" in index and "embed.weight" in index and len(files) > 3
    from safetensors import safe_open

    shard = tmp_path / index["layers.2.ffn.experts.0.w1.weight"]
    with safe_open(shard, "pt") as f:
        assert f.get_tensor("layers.2.ffn.experts.0.w1.weight").dtype == torch.int8
    with safe_open(tmp_path / index["layers.0.attn.wq_b.weight"], "pt") as f:
        assert f.get_tensor("layers.0.attn.wq_b.weight").dtype == torch.float8_e4m3fn
    loaded = load_checkpoint(tmp_path, progress=False, quantized=False)  # (kept quantized: test_quantized_model.py)
    for name, t in twin.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    # The quantization is real: the twin differs from the original.
    assert not torch.equal(twin.model.layers[0].mlp.experts.down_proj, tiny.model.layers[0].mlp.experts.down_proj)
    ids = ids_for(tiny.config, 300, gen)
    torch.testing.assert_close(prefill(loaded, ids), prefill(twin, ids), atol=0, rtol=0)


def test_transformers_reads_the_deepseek_format_as_the_loader_does(tiny: DeepseekV4, gen: torch.Generator,
                                                                  tmp_path) -> None:
    """transformers' own reader of DeepSeek's files (its FP8 quantizer with ``dequantize=True``:
    ``.scale`` companions, 128x128 FP8 blocks, MXFP4 experts as ``int8`` with UE8M0 scales per 32)
    decodes the export to the loader's weights bit for bit, experts included, so both read the FP4
    nibbles in the same order; and its logits equal the engine's."""
    transformers = _transformers()
    pytest.importorskip("accelerate", reason="transformers' FP8 quantizer imports it")
    export_deepseek(tiny, tmp_path, shard_bytes=1 << 19, progress=False)
    loaded = load_checkpoint(tmp_path, progress=False, quantized=False)
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(
        tmp_path, quantization_config=transformers.FineGrainedFP8Config(dequantize=True), dtype=torch.float32,
        attn_implementation="eager").eval()
    ours, theirs = loaded.state_dict(), hf.state_dict()
    assert set(theirs) == {k for k in ours if not k.startswith("mtp.")}  # transformers drops the MTP block
    for name, t in theirs.items():
        assert t.dtype == ours[name].dtype and torch.equal(t, ours[name]), name
    assert any(".experts." in k for k in theirs) and any(".wq_b." in k or ".q_b_proj." in k for k in theirs)
    ids = ids_for(tiny.config, 300, gen)
    with torch.no_grad():
        want = hf(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(prefill(loaded, ids), want, atol=TOL, rtol=0)


def test_fp4_and_fp8_decoding() -> None:
    """The decoders against hand-made codes: FP4 low nibble first, UE8M0 2^(code - 127)."""
    from dsv4rs.model.loader import dequantize_fp4, dequantize_fp8

    packed = torch.tensor([[0x21, 0xF9] + [0] * 14], dtype=torch.uint8).view(torch.int8)  # 32 values
    scale = torch.tensor([[128]], dtype=torch.uint8).view(torch.float8_e8m0fnu)  # 2.0
    out = dequantize_fp4(packed, scale, "w")
    assert out[0, :4].tolist() == [1.0, 2.0, -1.0, -12.0] and out[0, 4:].abs().sum() == 0
    w = torch.full((130, 3), 1.5).to(torch.float8_e4m3fn)
    s = torch.tensor([[126], [129]], dtype=torch.uint8).view(torch.float8_e8m0fnu)  # 0.5, 4
    out = dequantize_fp8(w, s, "w")
    assert out[:128].eq(0.75).all() and out[128:].eq(6.0).all()


def _save_hf(model: DeepseekV4, path) -> None:
    hf_model(model).save_pretrained(path)


def _edit(path, key: str, fn) -> None:
    from safetensors.torch import load_file, save_file

    shard = path / "model.safetensors"
    tensors = load_file(shard)
    fn(tensors, key)
    save_file(tensors, shard)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t, k: t.__setitem__(k, t[k][:, :-1].contiguous()), "model.layers.0.attn.wq_a.weight: shape"),
    (lambda t, k: t.__setitem__(k, t[k].clone().fill_(float("nan"))), "model.layers.0.attn.wq_a.weight: non-finite"),
    (lambda t, k: t.pop(k), "model.layers.0.self_attn.q_a_proj.weight: missing"),
    (lambda t, k: t.__setitem__("model.layers.0.attn.extra.weight", t[k].clone()), "model.layers.0.attn.extra.weight: unexpected"),
    (lambda t, k: t.__setitem__("model.layers.0.ffn.gate.tid2eid", t["model.layers.0.ffn.gate.tid2eid"] + 100),
     "tid2eid: expert ids"),
])
def test_bad_checkpoints_are_refused(tiny: DeepseekV4, tmp_path, edit, message: str) -> None:
    _save_hf(tiny, tmp_path)
    _edit(tmp_path, "model.layers.0.attn.wq_a.weight", edit)
    with pytest.raises(CheckpointError, match=message.replace(".", r"\.").replace("[", r"\[")):
        load_checkpoint(tmp_path, progress=False)


def test_corrupt_files_are_refused(tiny: DeepseekV4, tmp_path) -> None:
    _save_hf(tiny, tmp_path)
    shard = tmp_path / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_checkpoint(tmp_path, progress=False)
    shard.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(tmp_path, progress=False)
    os.remove(shard)
    with pytest.raises(CheckpointError, match="no .safetensors files"):
        load_checkpoint(tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path / "nowhere", progress=False)


def test_fp8_scale_mismatch_is_refused(tiny: DeepseekV4, tmp_path) -> None:
    export_deepseek(tiny, tmp_path, progress=False)
    from safetensors.torch import load_file, save_file

    (shard,) = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    tensors = load_file(tmp_path / shard)
    tensors["layers.0.attn.wq_b.scale"] = torch.cat([tensors["layers.0.attn.wq_b.scale"]] * 2)
    save_file(tensors, tmp_path / shard)
    with pytest.raises(CheckpointError, match=r"layers\.0\.attn\.wq_b\.weight: FP8 scale has shape"):
        load_checkpoint(tmp_path, progress=False)


def test_name_mapping() -> None:
    pairs = {
        "layers.3.attn.indexer.compressor.norm.weight": "model.layers.3.self_attn.compressor.indexer.kv_norm.weight",
        "layers.3.attn.compressor.ape": "model.layers.3.self_attn.compressor.position_bias",
        "layers.3.attn.kv_norm.weight": "model.layers.3.self_attn.kv_norm.weight",
        "model.layers.3.attn.norm.weight": "model.layers.3.self_attn.kv_norm.weight",
        "layers.3.ffn.gate.bias": "model.layers.3.mlp.gate.e_score_correction_bias",
        "layers.3.hc_ffn_fn": "model.layers.3.ffn_hc.fn",
        "hc_head_scale": "model.hc_head.hc_scale",
        "head.weight": "lm_head.weight",
        "embed.weight": "model.embed_tokens.weight",
        "mtp.0.norm.weight": "mtp.0.norm.weight",
        "mtp.0.hc_head_fn": "mtp.0.hc_head.hc_fn",
        "mtp.0.attn_norm.weight": "mtp.0.input_layernorm.weight",
        "model.layers.3.self_attn.compressor.indexer.scorer.weights_proj.weight":
            "model.layers.3.self_attn.compressor.indexer.scorer.weights_proj.weight",
    }
    for src, want in pairs.items():
        assert canonical_name(src) == want, src


# -- the demo ------------------------------------------------------------------------------------------


def test_demo_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "dsv4rs.cli", "demo", "--device", "cpu", "--prompt-len", "300",
                          "--new-tokens", "4"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "tokens/s" in out.stdout and "B/token" in out.stdout and "MFLOP" in out.stdout
    assert out.stdout.strip().endswith("OK")


# -- GPU -----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("quant", [False, True])
def test_gpu_engine(tiny: DeepseekV4, gen: torch.Generator, quant: bool) -> None:
    """On the GPU (bfloat16 or FP8/FP4 rows): prefill and decode against the reference storing rows
    the same way."""
    import copy

    ids = ids_for(tiny.config, LONG, gen)
    gpu = copy.deepcopy(tiny).cuda()
    eng = Engine(gpu, max_sequences=2, max_len=LONG, quant=quant)
    a, _ = eng.add_sequence()
    b, _ = eng.add_sequence()
    whole = eng.step([a], [ids], all_logits=True)[0].cpu().double()
    stepped = [eng.step([b], [ids[:500]])[0]] + [eng.step([b], [ids[t : t + 1]])[0] for t in range(500, LONG)]
    stepped = torch.stack(stepped).cpu().double()
    m64 = float64_copy(tiny)
    ref = dense_forward(m64, ids, quant=quant, row_dtype=torch.bfloat16)
    other = dense_forward(m64, ids, quant=not quant, row_dtype=torch.bfloat16)
    effect = float((ref - other).abs().amax(-1).median())
    # The GPU kernels multiply in bfloat16 (queries, indexer scores, probabilities): besides the
    # rounding, a near-tie in the indexer's top-k or the expert routing can go the other way, so
    # the agreement is judged on the median position, against the size of the quantization effect
    # (with FP8/FP4 storage the bfloat16 products also move values across rounding boundaries).
    for got, want in ((whole, ref), (stepped, ref[499:])):
        err = (got - want).abs().amax(-1)
        assert float(err.median()) < (0.5 if quant else 0.1) * effect, (float(err.median()), effect)


@pytest.mark.gpu
def test_gpu_demo() -> None:
    out = subprocess.run([sys.executable, "-m", "dsv4rs.cli", "demo", "--device", "cuda"], capture_output=True,
                         text=True, timeout=600)
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "device: cuda" in out.stdout and out.stdout.strip().endswith("OK")



def test_fp8_scales_as_float32_and_in_another_shard(tiny: DeepseekV4, gen: torch.Generator, tmp_path) -> None:
    """FP8 weights with float32 ``weight_scale_inv`` blocks (transformers' FP8 layout) and scales
    stored in a different shard than their weights load as the same dequantized twin."""
    from safetensors.torch import load_file, save_file

    twin = export_deepseek(tiny, tmp_path, progress=False)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    (shard,) = set(index["weight_map"].values())
    tensors = load_file(tmp_path / shard)
    moved = {}
    for key in [k for k in tensors if k.endswith(".scale") and ".experts." not in k]:
        scale = tensors.pop(key)
        moved[key[: -len("scale")] + "weight_scale_inv"] = torch.exp2(scale.view(torch.uint8).float() - 127)
    assert len(moved) > 10
    save_file(tensors, tmp_path / shard)
    save_file(moved, tmp_path / "scales.safetensors")
    index["weight_map"] = {k: shard for k in tensors} | dict.fromkeys(moved, "scales.safetensors")
    index_path.write_text(json.dumps(index))
    loaded = load_checkpoint(tmp_path, progress=False, quantized=False)
    for name, t in twin.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_bf16_weights(tiny: DeepseekV4, gen: torch.Generator, tmp_path) -> None:
    """Loading dequantized in bfloat16 keeps mHC, norms, sinks and positional biases in float32
    and runs; the logits stay within bfloat16 rounding of the float32 model's."""
    export_deepseek(tiny, tmp_path, progress=False)
    f32 = load_checkpoint(tmp_path, progress=False, quantized=False)
    bf16 = load_checkpoint(tmp_path, dtype=torch.bfloat16, progress=False, quantized=False)
    assert bf16.model.layers[0].self_attn.q_a_proj.weight.dtype == torch.bfloat16
    assert bf16.model.layers[0].attn_hc.fn.dtype == torch.float32
    assert bf16.model.layers[1].self_attn.compressor.position_bias.dtype == torch.float32
    ids = ids_for(tiny.config, 300, gen)
    err = (prefill(bf16, ids) - prefill(f32, ids)).abs().amax(-1)
    assert float(err.median()) < 2e-2 and torch.isfinite(err).all()


def test_tied_embeddings(gen: torch.Generator, tmp_path) -> None:
    """tie_word_embeddings: one matrix for the embedding and the LM head, saved once by
    transformers and loaded as such; logits still match."""
    model = init_random(DeepseekV4(V4Config.tiny(tie_word_embeddings=True)), seed=5)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    hf = hf_model(model)
    hf.save_pretrained(tmp_path)
    loaded = load_checkpoint(tmp_path, progress=False)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = ids_for(model.config, 200, gen)
    with torch.no_grad():
        want = hf(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(prefill(loaded, ids), want, atol=TOL, rtol=0)
