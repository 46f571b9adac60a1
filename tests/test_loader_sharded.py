"""``load_checkpoint(experts=range)``: a rank's share of the routed experts under expert
parallelism. The result equals the full load with the routed-expert tensors sliced; only the
owned experts' bytes are read (counted per tensor by wrapping the reader's two read methods);
the headers are still checked for every expert; bad ranges raise ``ValueError`` naming
``experts``. Checkpoints: transformers' stacked names (``save_file`` of ``checkpoint_tensors``)
and DeepSeek's quantized per-expert layout (``export_deepseek``, several shards and an index),
loaded kept quantized (MXFP4 expert buffers) and dequantized (``quantized=False``)."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from checkpoints import write_hf
from dsv4rs.model import DeepseekV4, V4Config, init_random
from dsv4rs.model.loader import CheckpointError, load_checkpoint
from dsv4rs.model.layers.moe import Experts
from dsv4rs.reference.export import export_deepseek

CFG = V4Config.tiny()
E = CFG.n_routed_experts
RANGES = [range(0, 3), range(3, 8), range(0, 0), range(0, 8), range(2, 6)]
LOADS = {"stacked": ("stacked", True), "per_expert": ("per_expert", True), "dequantized": ("per_expert", False)}
"""The loads compared: (checkpoint layout, ``quantized``)."""

_PER_EXPERT = re.compile(r"\.experts\.(\d+)\.w[123]\.(weight|scale|weight_scale_inv)$")
_STACKED = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")
_ROUTED = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj|gate_up|gate_up_scale|down|down_scale)$")


@pytest.fixture(scope="module")
def tiny() -> DeepseekV4:
    return init_random(DeepseekV4(CFG), seed=23)


@pytest.fixture(scope="module")
def checkpoints(tiny: DeepseekV4, tmp_path_factory) -> dict[str, str]:
    stacked = tmp_path_factory.mktemp("stacked")
    write_hf(tiny, stacked)
    per_expert = tmp_path_factory.mktemp("per_expert")
    export_deepseek(tiny, per_expert, shard_bytes=1 << 19, progress=False)
    assert len([f for f in os.listdir(per_expert) if f.endswith(".safetensors")]) > 3
    return {"stacked": str(stacked), "per_expert": str(per_expert)}


@pytest.fixture(scope="module")
def full(checkpoints) -> dict[str, dict[str, torch.Tensor]]:
    return {load: load_checkpoint(checkpoints[layout], progress=False, quantized=q).state_dict()
            for load, (layout, q) in LOADS.items()}


def header_bytes(path: str) -> dict[str, tuple[int, int]]:
    """Every tensor of the checkpoint: (bytes, rows along dim 0), from the headers."""
    out = {}
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    shape = sl.get_shape()
                    itemsize = torch.empty(0, dtype=h.get_tensor(k).dtype).element_size()
                    out[k] = (math.prod(shape) * itemsize, shape[0] if shape else 1)
    return out


def expected_reads(path: str, r: range) -> dict[str, int]:
    """What a rank owning ``r`` must read: every non-expert tensor, its owned experts'
    per-expert tensors (with scales), the owned rows of stacked expert tensors."""
    want = {}
    for k, (nbytes, rows) in header_bytes(path).items():
        if m := _PER_EXPERT.search(k):
            if int(m.group(1)) in r:
                want[k] = nbytes
        elif _STACKED.search(k):
            assert rows == E
            if len(r):
                want[k] = nbytes // E * len(r)
        else:
            want[k] = nbytes
    return want


def is_expert(key: str) -> bool:
    return bool(_PER_EXPERT.search(key) or _STACKED.search(key))


# -- the result ------------------------------------------------------------------------------------


@pytest.mark.parametrize("load", LOADS)
@pytest.mark.parametrize("r", RANGES, ids=lambda r: f"{r.start}-{r.stop}")
def test_sharded_load_equals_the_slice_of_the_full_load(checkpoints, full, load: str, r: range) -> None:
    layout, quantized = LOADS[load]
    sharded = load_checkpoint(checkpoints[layout], progress=False, experts=r, quantized=quantized)
    assert sharded.experts == r
    mods = [m for m in sharded.modules() if isinstance(m, Experts)]
    assert len(mods) == CFG.num_hidden_layers + CFG.num_nextn_predict_layers and all(m.first == r.start for m in mods)
    assert all(m.quantized == (load == "per_expert") for m in mods)
    ref, got = full[load], sharded.state_dict()
    assert got.keys() == ref.keys()
    routed = [n for n in ref if _ROUTED.search(n)]
    assert len(routed) == (4 if load == "per_expert" else 2) * len(mods)
    for n, t in ref.items():
        want = t[r.start:r.stop] if n in routed else t
        assert got[n].shape == want.shape and got[n].dtype == want.dtype, n
        assert torch.equal(got[n], want), n
    for n in routed:  # owns its rows, not a view of the whole stacked tensor or of the file
        assert got[n].untyped_storage().nbytes() == got[n].numel() * got[n].element_size(), n
    if len(r):
        ex = sharded.model.layers[0].mlp.experts
        assert (ex.gate_up if ex.quantized else ex.gate_up_proj).abs().sum() > 0


def test_sharded_bfloat16(checkpoints, full) -> None:
    """The dtype applies to a rank's share as to the full load."""
    r = range(2, 5)
    sharded = load_checkpoint(checkpoints["stacked"], dtype=torch.bfloat16, progress=False, experts=r)
    whole = load_checkpoint(checkpoints["stacked"], dtype=torch.bfloat16, progress=False)
    got, ref = sharded.state_dict(), whole.state_dict()
    n = "model.layers.1.mlp.experts.down_proj"
    assert got[n].dtype == torch.bfloat16 and torch.equal(got[n], ref[n][2:5])
    assert torch.equal(got["model.layers.0.self_attn.q_a_proj.weight"], ref["model.layers.0.self_attn.q_a_proj.weight"])


# -- bytes read --------------------------------------------------------------------------------------


@pytest.mark.parametrize("load", LOADS)
@pytest.mark.parametrize("r", [range(0, 4), range(4, 8), range(0, 0), range(0, 8), range(1, 2)],
                         ids=lambda r: f"{r.start}-{r.stop}")
def test_a_rank_reads_only_its_experts(checkpoints, reads, load: str, r: range) -> None:
    layout, quantized = LOADS[load]
    path = checkpoints[layout]
    load_checkpoint(path, progress=False, experts=r, quantized=quantized)
    assert reads == expected_reads(path, r)
    headers = header_bytes(path)
    expert_total = sum(b for k, (b, _) in headers.items() if is_expert(k))
    other_total = sum(b for k, (b, _) in headers.items() if not is_expert(k))
    assert expert_total > 0 and other_total > 0
    expert_read = sum(b for k, b in reads.items() if is_expert(k))
    assert sum(b for k, b in reads.items() if not is_expert(k)) == other_total
    # Experts are the same size, so a rank reads its share of the experts' bytes, exactly.
    assert expert_read * E == expert_total * len(r)
    if not len(r):
        assert not any(is_expert(k) for k in reads)


# -- checks --------------------------------------------------------------------------------------


def test_a_missing_expert_another_rank_owns_is_refused(tiny: DeepseekV4, tmp_path) -> None:
    """Completeness is checked over every expert, from the headers: an expert in a shard file
    that is gone is named, though this rank would not read it."""
    export_deepseek(tiny, tmp_path, progress=False)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    (shard,) = set(index["weight_map"].values())
    tensors = load_file(tmp_path / shard)
    other = {k: tensors.pop(k) for k in list(tensors) if k.startswith("layers.1.ffn.experts.6.")}
    assert len(other) == 6  # w1, w2, w3 and their scales
    save_file(tensors, tmp_path / shard)
    save_file(other, tmp_path / "rank1.safetensors")
    index["weight_map"] = dict.fromkeys(tensors, shard) | dict.fromkeys(other, "rank1.safetensors")
    index_path.write_text(json.dumps(index))
    assert load_checkpoint(tmp_path, progress=False, experts=range(0, 3)).model.layers[1].mlp.experts.first == 0

    os.remove(tmp_path / "rank1.safetensors")
    with pytest.raises(CheckpointError, match=r"the index lists rank1\.safetensors, which is missing"):
        load_checkpoint(tmp_path, progress=False, experts=range(0, 3))
    os.remove(index_path)  # no index: the tensors of the lost shard are missing, named
    with pytest.raises(CheckpointError, match=r"^model\.layers\.1\.mlp\.experts\.(gate_up|down)_proj: missing from "
                                              r"the checkpoint: expert 6 w[123] "):
        load_checkpoint(tmp_path, progress=False, experts=range(0, 3))


def test_a_missing_stacked_expert_tensor_is_refused(tiny: DeepseekV4, tmp_path) -> None:
    tensors = {k: v.detach().contiguous() for k, v in tiny.checkpoint_tensors().items()}
    del tensors["model.layers.2.mlp.experts.down_proj"]
    write_hf(tiny, tmp_path, tensors)
    for r in (range(0, 0), range(0, 3)):
        with pytest.raises(CheckpointError, match=r"^model\.layers\.2\.mlp\.experts\.down_proj: missing from the "
                                                  r"checkpoint \(1 tensors missing\)"):
            load_checkpoint(tmp_path, progress=False, experts=r)


def test_header_checks_cover_experts_a_rank_does_not_read(tiny: DeepseekV4, tmp_path) -> None:
    """A wrong shape of another rank's expert is refused as in the full load."""
    export_deepseek(tiny, tmp_path, progress=False)
    (shard,) = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    tensors = load_file(tmp_path / shard)
    key = "layers.0.ffn.experts.7.w2.weight"
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, tmp_path / shard)
    for r in (None, range(0, 2), range(0, 0)):
        with pytest.raises(CheckpointError, match=rf"^{re.escape(key)}: shape"):
            load_checkpoint(tmp_path, progress=False, experts=r)


def test_values_are_checked_where_read(tiny: DeepseekV4, tmp_path) -> None:
    """A NaN in expert 5's rows of a stacked tensor: the rank owning expert 5 refuses it; a rank
    that never reads those rows loads."""
    tensors = {k: v.detach().clone().contiguous() for k, v in tiny.checkpoint_tensors().items()}
    key = "model.layers.0.mlp.experts.gate_up_proj"
    tensors[key][5, 3, 1] = float("nan")
    write_hf(tiny, tmp_path, tensors)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(key)}: non-finite values"):
        load_checkpoint(tmp_path, progress=False, experts=range(4, 8))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(key)}: non-finite values"):
        load_checkpoint(tmp_path, progress=False)
    loaded = load_checkpoint(tmp_path, progress=False, experts=range(0, 5))
    assert torch.isfinite(loaded.model.layers[0].mlp.experts.gate_up_proj).all()


@pytest.mark.parametrize("bad", [range(0, E + 1), range(0, 8, 2), range(-1, 3), range(5, 3), [0, 1, 2], (0, 4), 3])
def test_bad_experts_are_refused(checkpoints, reads, bad) -> None:
    with pytest.raises(ValueError, match=r"^experts: ") as e:
        load_checkpoint(checkpoints["stacked"], progress=False, experts=bad)
    assert not isinstance(e.value, CheckpointError)
    assert not reads  # refused before reading any tensor
