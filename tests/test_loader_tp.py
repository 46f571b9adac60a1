"""``load_checkpoint(tp=(rank, world))``: a rank's share of every attention layer under
tensor-parallel attention. With ``experts=pc.experts`` and after ``parallel.attach`` the result
equals ``parallel.shard(full model, pc)`` parameter by parameter; of ``q_b_proj``, the sinks,
``o_a_proj`` and ``o_b_proj`` only the rank's rows (columns of ``o_b_proj``) are read, FP8 weights
with the block scales covering them (counted per tensor by wrapping the reader's read methods);
bad ``tp`` values raise ``ValueError`` naming ``tp``. Checkpoints: transformers' names (plain
float32) and DeepSeek's quantized layout (FP8 attention projections with UE8M0 block scales),
loaded dequantized (``quantized=False``: the parts split 128x128 blocks) and, with an
``o_lora_rank`` of 128 so that every part starts and ends on the blocks, kept quantized."""

from __future__ import annotations

import copy
import math
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoints import write_hf
from dsv4rs import parallel
from dsv4rs.model import DeepseekV4, V4Config, init_random
from dsv4rs.model.layers.attention import Attention
from dsv4rs.model.layers.quant import QuantLinear
from dsv4rs.model.loader import FP8_BLOCK, CheckpointError, load_checkpoint
from dsv4rs.reference.export import export_deepseek

CFG = V4Config.tiny(num_attention_heads=8, o_groups=4)
ALIGNED = V4Config.tiny(num_attention_heads=8, o_groups=4, o_lora_rank=128)
"""Every tensor-parallel part of its FP8 weights starts and ends on a 128x128 block."""
LOADS = {"stacked": ("stacked", False), "per_expert": ("per_expert", False), "quantized": ("aligned", True)}
"""The loads compared: (checkpoint, ``quantized``)."""

# The four split tensors of an attention layer, in both spellings, with the dimension split.
_SPLIT = [(re.compile(r"\.(self_attn\.q_b_proj|attn\.wq_b)\.(weight|scale|weight_scale_inv)$"), 0),
          (re.compile(r"\.(self_attn\.sinks|attn\.attn_sink)$"), 0),
          (re.compile(r"\.(self_attn\.o_a_proj|attn\.wo_a)\.(weight|scale|weight_scale_inv)$"), 0),
          (re.compile(r"\.(self_attn\.o_b_proj|attn\.wo_b)\.(weight|scale|weight_scale_inv)$"), 1)]
_QO = re.compile(r"\.(self_attn\.(q_b_proj|o_a_proj)|attn\.(wq_b|wo_a))\.weight$")
_PER_EXPERT = re.compile(r"\.experts\.(\d+)\.w[123]\.(weight|scale|weight_scale_inv)$")
_STACKED = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    model = init_random(DeepseekV4(CFG), seed=31)
    stacked = tmp_path_factory.mktemp("tp_stacked")
    write_hf(model, stacked)
    per_expert = tmp_path_factory.mktemp("tp_per_expert")
    export_deepseek(model, per_expert, shard_bytes=1 << 19, progress=False)
    aligned = tmp_path_factory.mktemp("tp_aligned")
    export_deepseek(init_random(DeepseekV4(ALIGNED), seed=32), aligned, shard_bytes=1 << 19, progress=False)
    return {"stacked": str(stacked), "per_expert": str(per_expert), "aligned": str(aligned)}


@pytest.fixture(scope="module")
def full(checkpoints) -> dict[str, DeepseekV4]:
    return {load: load_checkpoint(checkpoints[layout], progress=False, quantized=q)
            for load, (layout, q) in LOADS.items()}


def headers(path: str) -> dict[str, tuple[int, list[int]]]:
    """Every tensor of the checkpoint: (bytes, shape), from the headers."""
    out = {}
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as h:
                for k in h.keys():
                    shape = h.get_slice(k).get_shape()
                    itemsize = h.get_tensor(k).element_size()
                    out[k] = (math.prod(shape) * itemsize, shape)
    return out


def share(n: int, rank: int, world: int) -> range:
    return range(n * rank // world, n * (rank + 1) // world)


def expected_reads(path: str, pc: parallel.ParallelConfig) -> dict[str, int]:
    """What a tensor-parallel rank must read: its share of the four split tensors (an FP8
    weight's scale: the blocks covering the weight's share), its experts (as under expert
    parallelism), every other tensor whole."""
    head = headers(path)
    want = {}
    for k, (nbytes, shape) in head.items():
        split = [dim for pattern, dim in _SPLIT if pattern.search(k)]
        if split:
            (dim,) = split
            if k.endswith(("scale", "scale_inv")):
                weight = re.sub(r"\.(scale|weight_scale_inv)$", ".weight", k)
                r = share(head[weight][1][dim], pc.rank, pc.world)
                blocks = -(-r.stop // FP8_BLOCK) - r.start // FP8_BLOCK
                want[k] = nbytes // shape[dim] * blocks
            else:
                assert nbytes % (shape[dim] * pc.world) == 0
                want[k] = nbytes // shape[dim] * len(share(shape[dim], pc.rank, pc.world))
        elif m := _PER_EXPERT.search(k):
            if int(m.group(1)) in pc.experts:
                want[k] = nbytes
        elif _STACKED.search(k):
            want[k] = nbytes // shape[0] * len(pc.experts)
        else:
            want[k] = nbytes
    return want


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("load", LOADS)
def test_tp_load_equals_shard_and_reads_its_share(checkpoints, full, reads, load: str, world: int) -> None:
    layout, kept = LOADS[load]
    path = checkpoints[layout]
    quantized = layout != "stacked"  # the checkpoint holds FP8 weights
    for rank in range(world):
        pc = parallel.ParallelConfig.even(CFG, world, rank, mode="tp")
        reads.clear()
        loaded = load_checkpoint(path, progress=False, experts=pc.experts, tp=(rank, world), quantized=kept)
        got = parallel.attach(loaded, pc).state_dict()
        ref = parallel.shard(copy.deepcopy(full[load]), pc).state_dict()
        assert got.keys() == ref.keys()
        for n, t in ref.items():
            assert got[n].shape == t.shape and got[n].dtype == t.dtype, n
            assert torch.equal(got[n], t), n
        attn = [m for m in loaded.modules() if isinstance(m, Attention)]
        assert len(attn) == CFG.num_hidden_layers + CFG.num_nextn_predict_layers
        for a in attn:
            assert (a.heads, a.groups, a.o_a_proj.groups) == (8 // world, 4 // world, 4 // world)
            for proj in (a.q_b_proj, a.o_a_proj, a.o_b_proj):
                assert isinstance(proj, QuantLinear) == kept
            held = [a.q_b_proj.weight, a.sinks, a.o_a_proj.weight, a.o_b_proj.weight]
            if kept:
                held += [a.q_b_proj.scale, a.o_a_proj.scale, a.o_b_proj.scale]
                assert a.o_a_proj.weight.dtype == torch.uint8 and a.o_a_proj.scale.dtype == torch.float32
            for p in held:
                # owns its share, not a view of the whole tensor or of the file
                assert p.is_contiguous() and p.untyped_storage().nbytes() == p.numel() * p.element_size()

        # bytes read: the share of the split tensors, exactly
        assert reads == expected_reads(path, pc)
        head = headers(path)
        qo = [k for k in head if _QO.search(k)]
        assert len(qo) == 2 * len(attn)
        for k in qo:  # 1/world of q_b_proj's and o_a_proj's rows, FP8 or not
            assert reads[k] * world == head[k][0], k
        scales = [k for k in reads if k.endswith("scale") and any(p.search(k) for p, _ in _SPLIT)]
        assert bool(scales) == quantized


@pytest.mark.parametrize("bad", [(0, 0), (2, 2), (-1, 2), (0, 3), (0, -1), [0, 2], (0, 2, 1), (True, 2), (0.0, 2),
                                 "0,2", 2])
def test_bad_tp_is_refused(checkpoints, reads, bad) -> None:
    with pytest.raises(ValueError, match=r"^tp: ") as e:
        load_checkpoint(checkpoints["stacked"], progress=False, tp=bad)
    assert not isinstance(e.value, CheckpointError)
    assert not reads  # refused before reading any tensor


def test_o_groups_not_divisible_names_o_groups(checkpoints) -> None:
    with pytest.raises(ValueError, match=r"^tp: .*4 output groups \(o_groups\).*world = 3"):
        load_checkpoint(checkpoints["stacked"], progress=False, tp=(1, 3))


def test_headers_are_checked_against_the_full_model(checkpoints, tmp_path) -> None:
    """Another rank's part of a split tensor of the wrong shape is refused as in the full load."""
    src = checkpoints["stacked"]
    with safe_open(os.path.join(src, "model.safetensors"), "pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    key = "model.layers.1.self_attn.o_b_proj.weight"
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, tmp_path / "model.safetensors")
    with open(os.path.join(src, "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    for tp in (None, (0, 2), (3, 4)):
        with pytest.raises(CheckpointError, match=rf"^{re.escape(key)}: shape"):
            load_checkpoint(tmp_path, progress=False, tp=tp)


def test_quantized_parts_must_cut_on_the_fp8_blocks(checkpoints, reads) -> None:
    """Kept quantized, a part of an FP8 weight holds the block scales covering it, so it must
    start and end on the 128x128 blocks: with ``o_lora_rank`` 32 a rank's rows of ``o_a_proj``
    split a block, which ``load_checkpoint`` and ``parallel.shard`` refuse (naming ``tp``,
    ``pc``) before reading a tensor or cutting a weight; dequantized they load."""
    with pytest.raises(ValueError, match=r"^tp: \(0, 2\) cuts model\.layers\.0\.self_attn\.o_a_proj\.weight: rank 0 of "
                                         r"2 holds rows \[0, 64\) .* 128-value scale blocks; pass quantized=False"):
        load_checkpoint(checkpoints["per_expert"], progress=False, tp=(0, 2))
    assert not reads
    model = load_checkpoint(checkpoints["per_expert"], progress=False)
    reads.clear()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    pc = parallel.ParallelConfig.even(CFG, 2, 1, mode="tp")
    with pytest.raises(ValueError, match=r"^pc: .*o_a_proj\.weight: rank 1 of 2 holds rows \[64, 128\) .*quantized=False"):
        parallel.shard(model, pc)
    after = model.state_dict()  # nothing was cut
    assert after.keys() == before.keys() and all(torch.equal(after[n], t) for n, t in before.items())
    # dequantized, the same split loads (the test above checks its values)
    load_checkpoint(checkpoints["per_expert"], progress=False, tp=(1, 2), experts=pc.experts, quantized=False)
