"""The checkpoint loader and the config against malformed input: every case raises
``CheckpointError`` (or ``ValueError`` for the config, ``FileNotFoundError`` for a missing one)
naming the file, tensor or key, before the model is allocated, and never reads forever, crashes or
allocates what the checkpoint does not hold. Checkpoints here are written directly (no
transformers), in the model's own (transformers') names or by ``export_deepseek``."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import write_hf
from dsv4rs.model import DeepseekV4, V4Config, init_random
from dsv4rs.model.config import UPPER_BOUNDS
from dsv4rs.model.loader import CheckpointError, load_checkpoint
from dsv4rs.reference.export import export_deepseek

CFG = V4Config.tiny()


@pytest.fixture(scope="module")
def tiny() -> DeepseekV4:
    return init_random(DeepseekV4(CFG), seed=11)


def edit(path, fn, shard: str = "model.safetensors") -> None:
    tensors = load_file(os.path.join(path, shard))
    fn(tensors)
    save_file(tensors, os.path.join(path, shard))


def refused(path, match: str, **kw) -> CheckpointError:
    with pytest.raises(CheckpointError, match=match) as e:
        load_checkpoint(path, progress=False, **kw)
    return e.value


@pytest.fixture
def hf(tiny: DeepseekV4, tmp_path):
    write_hf(tiny, tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def deepseek_files(tiny: DeepseekV4, tmp_path_factory) -> dict[str, bytes]:
    """The DeepSeek layout (FP8 linears with UE8M0 scales, MXFP4 experts), one shard."""
    path = tmp_path_factory.mktemp("deepseek")
    export_deepseek(tiny, path, progress=False)
    return {f: (path / f).read_bytes() for f in os.listdir(path)}


@pytest.fixture
def deepseek(deepseek_files, tmp_path):
    for name, data in deepseek_files.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


def ds_shard(path) -> str:
    (shard,) = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    return shard


# -- files that are not what they claim ------------------------------------------------------------


@pytest.mark.timeout(60)
def test_config_json_that_is_a_device_a_pipe_or_huge(hf) -> None:
    cfg = hf / "config.json"
    os.remove(cfg)
    os.symlink("/dev/zero", cfg)  # read forever before
    refused(hf, r"config\.json: .*config\.json is not a regular file")
    os.remove(cfg)
    os.mkfifo(cfg)  # would block in open()
    refused(hf, r"config\.json: .*config\.json is not a regular file")
    os.remove(cfg)
    with open(cfg, "wb") as f:
        f.truncate(5 << 20)
    refused(hf, r"config\.json: .* has 5,242,880 bytes, more than the 4,194,304")
    cfg.write_text("[1, 2]")
    refused(hf, r"config\.json: config: expected a JSON object of keys, got list")
    cfg.write_text("[" * 100_000)
    refused(hf, r"config\.json: .* is not valid JSON")
    cfg.write_bytes(b"\xff\xfe{}")
    refused(hf, r"config\.json: .* is not valid JSON")


def test_index_must_map_names_to_files_inside_the_checkpoint(hf) -> None:
    index = hf / "model.safetensors.index.json"
    idx = r"model\.safetensors\.index\.json: "
    for weight_map, message in [
        ([], idx + "weight_map must be an object of tensor name -> shard file, got an array"),
        (None, idx + "weight_map must be an object of tensor name -> shard file, got null"),
        ({"x": 5}, idx + r"weight_map\['x'\] must be a file name, got 5"),
        ({"x": "../model.safetensors"}, idx + r"weight_map\['x'\] = '../model.safetensors' is not a file inside"),
        ({"x": "/etc/passwd"}, idx + r"weight_map\['x'\] = '/etc/passwd' is not a file inside"),
        ({"x": "nowhere.safetensors"}, "the index lists nowhere.safetensors, which is missing"),
        ({"model.embed_tokens.weight": "model.safetensors", "ghost.weight": "model.safetensors"},
         "ghost.weight: the index places it in model.safetensors, which does not hold it"),
    ]:
        index.write_text(json.dumps({"weight_map": weight_map}))
        refused(hf, message)
    index.write_text(json.dumps({"metadata": {}}))
    refused(hf, "model.safetensors.index.json: expected a JSON object with a weight_map, got no weight_map")
    index.write_text("null")
    refused(hf, "model.safetensors.index.json: expected a JSON object with a weight_map, got null")
    os.remove(index)
    os.symlink("/dev/zero", index)
    refused(hf, "model.safetensors.index.json: .* is not a regular file")


def test_shard_that_is_a_directory_or_a_device(hf) -> None:
    os.mkdir(hf / "model-00002.safetensors")
    refused(hf, r"model-00002\.safetensors: .* is a directory, not a safetensors file")
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00002.safetensors"}}))
    refused(hf, r"model-00002\.safetensors: .* is a directory")
    os.remove(hf / "model.safetensors.index.json")
    os.rmdir(hf / "model-00002.safetensors")
    os.symlink("/dev/zero", hf / "model-00002.safetensors")
    refused(hf, r"model-00002\.safetensors: .* is not a regular file")


# -- dtypes, shapes and scales ----------------------------------------------------------------------


def test_fp8_weight_must_be_2d(deepseek) -> None:
    key = "layers.0.attn.wq_a.weight"
    edit(deepseek, lambda t: t.__setitem__(key, t[key].flatten()), ds_shard(deepseek))
    refused(deepseek, r"layers\.0\.attn\.wq_a\.weight: an FP8 weight must be 2-d, got shape \[\d+\]")


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.int64, torch.float8_e4m3fn])
def test_scale_dtypes_other_than_ue8m0_or_float_are_refused(deepseek, dtype: torch.dtype) -> None:
    key = "layers.0.attn.wq_a.scale"

    def fn(t):
        t[key] = t[key].view(torch.uint8).to(dtype) if dtype != torch.float8_e4m3fn else torch.ones(t[key].shape).to(dtype)

    edit(deepseek, fn, ds_shard(deepseek))
    refused(deepseek, rf"layers\.0\.attn\.wq_a\.scale: scale dtype {str(dtype).removeprefix('torch.')}; "
                      r"expected float8_e8m0fnu, uint8 UE8M0 codes or a floating-point type")


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_float_scales_must_be_finite_and_positive(deepseek, bad: float) -> None:
    """transformers' FP8 layout: float32 ``weight_scale_inv`` blocks."""
    shard = ds_shard(deepseek)

    def fn(t):
        s = torch.exp2(t.pop("layers.0.attn.wq_b.scale").view(torch.uint8).float() - 127)
        s[0, 0] = bad
        t["layers.0.attn.wq_b.weight_scale_inv"] = s

    edit(deepseek, fn, shard)
    index = json.loads((deepseek / "model.safetensors.index.json").read_text())
    index["weight_map"]["layers.0.attn.wq_b.weight_scale_inv"] = index["weight_map"].pop("layers.0.attn.wq_b.scale")
    (deepseek / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(deepseek, rf"layers\.0\.attn\.wq_b\.weight: scales must be finite and > 0, found {bad!r}")


def test_ue8m0_nan_code_and_scale_shapes(deepseek) -> None:
    shard = ds_shard(deepseek)
    key = "layers.1.ffn.experts.2.w3.scale"
    edit(deepseek, lambda t: t[key].view(torch.uint8).__setitem__((0, 0), 255), shard)
    refused(deepseek, r"layers\.1\.ffn\.experts\.2\.w3\.weight: NaN scale \(UE8M0 code 255\)")
    edit(deepseek, lambda t: t.__setitem__(key, t[key][:, :-1].contiguous()), shard)
    refused(deepseek, r"layers\.1\.ffn\.experts\.2\.w3\.weight: FP4 scale has shape")


def test_scale_beside_an_unquantized_weight(tiny, tmp_path) -> None:
    tensors = write_hf(tiny, tmp_path)
    tensors["model.layers.0.self_attn.q_a_proj.scale"] = torch.ones(1, 1)
    write_hf(tiny, tmp_path, tensors)
    refused(tmp_path, r"model\.layers\.0\.self_attn\.q_a_proj\.scale: a scale companion of "
                      r"model\.layers\.0\.self_attn\.q_a_proj\.weight, which is not quantized \(dtype float32\)")
    loaded = load_checkpoint(tmp_path, progress=False, strict=False)  # ignored when not strict
    assert torch.equal(loaded.model.layers[0].self_attn.q_a_proj.weight, tiny.model.layers[0].self_attn.q_a_proj.weight)


def test_two_scale_companions(deepseek) -> None:
    edit(deepseek, lambda t: t.__setitem__("layers.0.attn.wq_a.weight_scale_inv", torch.ones(1, 1)), ds_shard(deepseek))
    os.remove(deepseek / "model.safetensors.index.json")
    refused(deepseek, r"layers\.0\.attn\.wq_a\.weight: two scale companions")


def test_hash_table_dtype_and_range(hf) -> None:
    key = "model.layers.0.mlp.gate.tid2eid"
    edit(hf, lambda t: t.__setitem__(key, t[key].bool()))
    refused(hf, r"model\.layers\.0\.mlp\.gate\.tid2eid: dtype bool, expected an integer tensor")
    edit(hf, lambda t: t.__setitem__(key, t[key].float()))
    refused(hf, r"tid2eid: dtype float32, expected an integer tensor")
    edit(hf, lambda t: t.__setitem__(key, t[key].to(torch.int32) - 1))
    refused(hf, rf"tid2eid: expert ids must lie in \[0, {CFG.n_routed_experts}\)")


@pytest.mark.parametrize(("dtype", "message"), [
    (torch.int8, "dtype int8, expected a floating-point tensor"),
    (torch.bool, "dtype bool, expected a floating-point tensor"),
    (torch.float8_e4m3fn, "FP8 weight without a .scale or .weight_scale_inv companion"),
    (torch.float8_e5m2, "unsupported dtype float8_e5m2"),
])
def test_weight_dtypes(hf, dtype: torch.dtype, message: str) -> None:
    key = "model.norm.weight"
    edit(hf, lambda t: t.__setitem__(key, t[key].to(dtype)))
    refused(hf, r"model\.norm\.weight: " + message.replace(".", r"\."))


def test_values_that_overflow_the_dtype(hf) -> None:
    key = "model.layers.0.self_attn.q_a_proj.weight"
    edit(hf, lambda t: t.__setitem__(key, t[key].double() * 1e300))
    refused(hf, rf"{key}: values overflow bfloat16".replace(".", r"\."), dtype=torch.bfloat16)


# -- one spelling per tensor, every tensor present -----------------------------------------------


def test_one_weight_under_two_spellings(hf) -> None:
    key = "model.layers.0.self_attn.q_a_proj.weight"
    edit(hf, lambda t: t.__setitem__("model.layers.0.attn.wq_a.weight", t[key] + 1))
    refused(hf, r"model\.layers\.0\.self_attn\.q_a_proj\.weight: model\.layers\.0\.attn\.wq_a\.weight holds the "
                r"same tensor \(model\.layers\.0\.self_attn\.q_a_proj\.weight\) under another spelling")
    # Not even with strict=False: which one would be meant is unknown.
    refused(hf, "under another spelling", strict=False)


def test_one_expert_under_two_spellings(deepseek) -> None:
    """Before: expert 3's w1 twice (DeepSeek's and transformers' spelling) covered for a missing
    expert 5 w1, which loaded as zeros."""
    shard = ds_shard(deepseek)

    def fn(t):
        t["model.layers.1.mlp.experts.3.w1.weight"] = t["layers.1.ffn.experts.5.w1.weight"]
        t["model.layers.1.mlp.experts.3.w1.scale"] = t["layers.1.ffn.experts.5.w1.scale"]
        del t["layers.1.ffn.experts.5.w1.weight"], t["layers.1.ffn.experts.5.w1.scale"]

    edit(deepseek, fn, shard)
    os.remove(deepseek / "model.safetensors.index.json")
    refused(deepseek, r"model\.layers\.1\.mlp\.experts\.3\.w1\.weight: layers\.1\.ffn\.experts\.3\.w1\.weight "
                      r"holds the same tensor \(model\.layers\.1\.mlp\.experts\.gate_up_proj, expert 3 w1\)")


def test_missing_expert_is_named(deepseek) -> None:
    def fn(t):
        del t["layers.1.ffn.experts.5.w1.weight"], t["layers.1.ffn.experts.5.w1.scale"]

    edit(deepseek, fn, ds_shard(deepseek))
    os.remove(deepseek / "model.safetensors.index.json")
    refused(deepseek, r"model\.layers\.1\.mlp\.experts\.gate_up_proj: missing from the checkpoint: expert 5 w1 "
                      r"\(1 tensors missing\)")


def test_stacked_experts_beside_per_expert_ones(tiny, deepseek) -> None:
    stacked = tiny.model.layers[2].mlp.experts.gate_up_proj.detach().clone()
    edit(deepseek, lambda t: t.__setitem__("model.layers.2.mlp.experts.gate_up_proj", stacked), ds_shard(deepseek))
    os.remove(deepseek / "model.safetensors.index.json")
    refused(deepseek, "holds the same tensor .*model\\.layers\\.2\\.mlp\\.experts\\.gate_up_proj.* under another spelling")


def test_expert_index_beyond_the_config(deepseek) -> None:
    shard = ds_shard(deepseek)
    edit(deepseek, lambda t: t.__setitem__("layers.1.ffn.experts.99.w2.weight", t["layers.1.ffn.experts.0.w2.weight"].clone()),
         shard)
    os.remove(deepseek / "model.safetensors.index.json")
    refused(deepseek, rf"layers\.1\.ffn\.experts\.99\.w2\.weight: expert 99 >= n_routed_experts = {CFG.n_routed_experts}")


# -- sizes from the config: errors before any allocation ------------------------------------------


@pytest.mark.parametrize(("key", "value"), [("vocab_size", 10**12), ("hidden_size", 1 << 20), ("index_topk", 10**6),
                                            ("hc_sinkhorn_iters", 10**9), ("sliding_window", 10**9),
                                            ("num_hidden_layers", 10**9)])
def test_absurd_config_values_are_refused(hf, key: str, value: int) -> None:
    d = json.loads((hf / "config.json").read_text())
    d[key] = value
    if key == "num_hidden_layers":
        del d["layer_types"], d["mlp_layer_types"]
    (hf / "config.json").write_text(json.dumps(d))
    most = UPPER_BOUNDS[key][0]
    refused(hf, rf"config\.json: config {key}: must be <= {most:,}")


@pytest.mark.timeout(60)
def test_sizes_that_do_not_match_fail_on_the_first_tensor_before_allocating(hf) -> None:
    """The config is within bounds but describes terabytes: the model is never allocated from the
    config, so the first tensor whose shape differs is named (and nothing large is allocated)."""
    d = json.loads((hf / "config.json").read_text())
    d.update(n_routed_experts=1 << 16, moe_intermediate_size=1 << 17, vocab_size=1 << 24)
    (hf / "config.json").write_text(json.dumps(d))
    refused(hf, rf"lm_head\.weight: shape \[{CFG.vocab_size}, {CFG.hidden_size}\], expected \[16777216, 64\]")
    d.update(vocab_size=CFG.vocab_size)
    (hf / "config.json").write_text(json.dumps(d))
    refused(hf, r"model\.layers\.0\.mlp\.experts\.down_proj: shape \[8, 64, 32\], expected \[65536, 64, 131072\]")


def test_config_errors_name_the_key() -> None:
    base = V4Config.tiny().to_hf_dict() | {"model_type": "deepseek_v4"}
    for change, message in [
        ({"hc_mult": 9}, "config hc_mult: must be <= 8"),
        ({"index_n_heads": 65}, "config index_n_heads: must be <= 64"),
        ({"max_position_embeddings": 0}, "config max_position_embeddings: must be >= 1"),
        ({"tie_word_embeddings": "yes"}, "config tie_word_embeddings: expected true or false"),
        ({"rope_theta": "big"}, "config rope_theta: expected a number"),
        ({"layer_types": "sliding_attention"}, "config layer_types: expected a list"),
        ({"compress_rates": {"compressed_sparse_attention": "4"}}, "config compress_rates: expected an int"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": "x", "original_max_position_embeddings": 10}},
         "config rope_parameters: factor must be a finite number"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": None}},
         "config rope_parameters: original_max_position_embeddings must be a finite number"),
        ({"partial_rotary_factor": "half"}, "config partial_rotary_factor: expected a number"),
    ]:
        with pytest.raises(ValueError, match=message):
            V4Config.from_dict(base | change)
    d = {k: v for k, v in base.items() if k not in ("layer_types", "mlp_layer_types")}
    for change, message in [({"compress_ratios": 5}, "config compress_ratios: expected a list"),
                            ({"compress_ratios": [[4]] * 4}, "config compress_ratios: entries must be"),
                            ({"num_hash_layers": "2"}, "config num_hash_layers: expected an int"),
                            ({"num_hidden_layers": True}, "config num_hidden_layers: expected an int")]:
        with pytest.raises(ValueError, match=message):
            V4Config.from_dict(d | change)
    with pytest.raises(ValueError, match="config: expected a JSON object"):
        V4Config.from_dict([1, 2])  # type: ignore[arg-type]


# -- the load itself ----------------------------------------------------------------------------------


def test_target_device_and_dtype_are_checked(hf) -> None:
    with pytest.raises(ValueError, match="dtype: expected a floating-point torch.dtype"):
        load_checkpoint(hf, dtype=torch.int8, progress=False)
    with pytest.raises(ValueError, match="device: expected a device that holds data, got meta"):
        load_checkpoint(hf, device="meta", progress=False)
    with pytest.raises(ValueError, match="device: cannot allocate tensors on 'nonsense'"):
        load_checkpoint(hf, device="nonsense", progress=False)


def test_parameters_arrive_in_their_final_dtype(tiny, hf, monkeypatch) -> None:
    """Every tensor is allocated once in its final dtype: no float32 copy of a bfloat16 model
    (the float32 parameters of :func:`keeps_float32` excepted), nothing left on the meta device,
    and an absent MTP block is dropped."""
    edit(hf, lambda t: [t.pop(k) for k in [k for k in t if k.startswith("mtp.")]])
    loaded = load_checkpoint(hf, dtype=torch.bfloat16, progress=False)
    from dsv4rs.model.model import keeps_float32

    assert len(loaded.mtp) == 0
    for name, p in [*loaded.named_parameters(), *loaded.named_buffers()]:
        assert p.device.type == "cpu", name
        if p.is_floating_point():
            assert p.dtype == (torch.float32 if keeps_float32(name) or name.endswith("inv_freq") else torch.bfloat16), name
    want = {k: v for k, v in tiny.state_dict().items() if not k.startswith("mtp.")}
    got = loaded.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v.to(got[k].dtype)), k


def test_tied_embedding_stays_one_tensor(tmp_path) -> None:
    model = init_random(DeepseekV4(V4Config.tiny(tie_word_embeddings=True)), seed=2)
    write_hf(model, tmp_path)
    loaded = load_checkpoint(tmp_path, progress=False)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
