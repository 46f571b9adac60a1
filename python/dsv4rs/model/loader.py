"""Loading safetensors checkpoints of DeepSeek-V4 (:func:`load_checkpoint`).

Names: transformers' (``model.layers.0.self_attn.q_a_proj.weight``; also the names its
``save_pretrained`` writes, ``model.layers.0.attn.wq_a.weight``) and DeepSeek's
(``layers.0.attn.wq_a.weight``, ``embed.weight``, ``mtp.0.*``) are mapped onto
:class:`~dsv4rs.model.DeepseekV4`'s, which are transformers' names.

Weights on disk (docs/model.md section 9): float32/bfloat16 tensors; FP8 e4m3 with a ``.scale`` (UE8M0,
``float8_e8m0fnu``) or ``.weight_scale_inv`` (float32) companion per 128x128 block; MXFP4 experts
(``int8``/``uint8`` holding two e2m1 values per byte, low nibble first, with a UE8M0 scale per 32
values). By default (``quantized=True``) they stay so in memory: a linear layer shipped in FP8
becomes a :class:`~dsv4rs.model.layers.quant.QuantLinear` (the codes as ``uint8``, the block
scales as float32 multipliers) and routed experts shipped in MXFP4 quantized
:class:`~dsv4rs.model.layers.moe.Experts` (their bytes and scale codes stacked), run by
:func:`dsv4rs.ops.quant_linear` and :func:`dsv4rs.ops.moe_experts`; ``quantized=False``
dequantizes every weight to ``dtype`` on load.

Loading is in two passes. The first reads only the shards' headers and checks every tensor's
name, dtype, shape and scale companion against a model built on the meta device (which
allocates nothing), and that every parameter is present once: a checkpoint that does not fit
the config fails before any memory is allocated for the model. The second reads the tensors
one at a time, checks their values (finite weights, FP8 codes not NaN, scales finite and
positive, hash-table entries in range) and allocates each parameter on the target device in its
final form as its data arrives (quantized experts: one expert at a time into buffers allocated
once per layer).

Under expert parallelism a rank loads only its share of the routed experts (``experts``, a
contiguous range of expert ids): the headers are still checked for every expert, but only the
owned experts' bytes are read (per-expert tensors of other experts are skipped; stacked
``[E, ...]`` expert tensors are read for the owned rows only, :meth:`_Shards.rows`).

Under tensor-parallel attention (``tp=(rank, world)``) a rank likewise reads only its share of
each attention layer's heads (:meth:`~dsv4rs.model.layers.attention.Attention.head_share`): rows
of ``q_b_proj`` and ``o_a_proj``, entries of the sinks, columns of ``o_b_proj`` (:meth:`_Shards.cols`);
an FP8 weight's part with the block-scale rows or columns that cover it (kept quantized, the part
must start and end on the 128-value blocks; dequantized, anywhere).
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from collections.abc import Mapping

import torch
from torch import nn
from tqdm import tqdm

from dsv4rs.model.config import SWA, V4Config, read_json
from dsv4rs.model.layers.attention import Attention, GroupedLinear
from dsv4rs.model.layers.moe import Experts, expert_range
from dsv4rs.model.layers.quant import K_MULTIPLE, QuantLinear, scale_shape
from dsv4rs.model.model import DeepseekV4, set_dtype
from dsv4rs.model.layers.rotary import inv_freq as rope_inv_freq

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
    """A checkpoint that does not fit the model: the message names the tensor or file."""


INDEX_LIMIT = 64 << 20
"""The largest ``model.safetensors.index.json`` read (64 MiB; V4-Pro's is some 15 MB)."""

# safetensors header dtypes -> torch dtypes.
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}
_FLOATS = {torch.float64, torch.float32, torch.float16, torch.bfloat16}
_INTS = {torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8}
_RAW_SCALES = {torch.float8_e8m0fnu, torch.uint8, torch.int8}
"""Scale dtypes holding UE8M0 codes (``2^(code - 127)``); float scales are multipliers."""


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


# -- reading ---------------------------------------------------------------------------------------


def _regular_file(file: str, what: str) -> None:
    """Refuses anything but a regular file (a directory, a device such as /dev/zero, a pipe)."""
    try:
        mode = os.stat(file).st_mode
    except OSError as e:
        raise CheckpointError(f"{what}: cannot read {file} ({e.strerror or e})") from None
    if stat.S_ISDIR(mode):
        raise CheckpointError(f"{what}: {file} is a directory, not a safetensors file")
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{what}: {file} is not a regular file")


def _json_type(v: object) -> str:
    return {type(None): "null", list: "an array", dict: "an object", str: "a string", bool: "a boolean"}.get(
        type(v), "a number")


def _shards(path: str) -> tuple[list[str], dict[str, str] | None]:
    """The shard files, and the index's tensor -> shard file map when there is an index."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.lexists(index):
        try:
            data = read_json(index, INDEX_LIMIT)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"model.safetensors.index.json: {str(e).removeprefix('path: ')}") from None
        if not isinstance(data, dict) or "weight_map" not in data:
            raise CheckpointError("model.safetensors.index.json: expected a JSON object with a weight_map, got "
                                  + (_json_type(data) if not isinstance(data, dict) else "no weight_map"))
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"model.safetensors.index.json: weight_map must be an object of tensor name -> "
                                  f"shard file, got {_json_type(weight_map)}")
        for key, shard in weight_map.items():
            if not isinstance(shard, str) or not shard:
                raise CheckpointError(f"model.safetensors.index.json: weight_map[{key!r}] must be a file name, "
                                      f"got {shard!r}")
            norm = os.path.normpath(shard)
            if os.path.isabs(shard) or norm == ".." or norm.startswith(".." + os.sep) or "\0" in shard:
                raise CheckpointError(f"model.safetensors.index.json: weight_map[{key!r}] = {shard!r} is not a file "
                                      f"inside the checkpoint folder")
        files = sorted(set(weight_map.values()))
        missing = [s for s in files if not os.path.lexists(os.path.join(path, s))]
        if missing:
            raise CheckpointError(f"path: the index lists {missing[0]}, which is missing")
        for s in files:
            _regular_file(os.path.join(path, s), s)
        return [os.path.join(path, s) for s in files], {k: os.path.join(path, s) for k, s in weight_map.items()}
    try:
        names = os.listdir(path)
    except OSError as e:
        raise CheckpointError(f"path: cannot list {path} ({e.strerror or e})") from None
    files = sorted(f for f in names if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"path: no .safetensors files in {path}")
    for f in files:
        _regular_file(os.path.join(path, f), f)
    return [os.path.join(path, f) for f in files], None


def _e8m0(scale: torch.Tensor, name: str) -> torch.Tensor:
    """Block scales as float32 multipliers: UE8M0 codes (``float8_e8m0fnu``, or raw ``uint8`` /
    ``int8`` bytes) as powers of two, or floating-point scales, which must be finite and > 0."""
    if scale.dtype in _RAW_SCALES:
        raw = scale.view(torch.uint8)
        if (raw == 255).any():
            raise CheckpointError(f"{name}: NaN scale (UE8M0 code 255)")
        return torch.exp2(raw.to(torch.float32) - 127)
    if scale.dtype not in _FLOATS:
        raise CheckpointError(f"{name}: scale dtype {_dtype_name(scale.dtype)}; expected float8_e8m0fnu, uint8 "
                              f"UE8M0 codes or a floating-point type")
    s = scale.float()
    bad = ~(torch.isfinite(s) & (s > 0))
    if bad.any():
        raise CheckpointError(f"{name}: scales must be finite and > 0, found {float(s[bad][0])!r}")
    return s


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, name: str, at: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """FP8 e4m3 ``[out, in]`` times one scale per 128x128 block ``[ceil(out/128), ceil(in/128)]``.

    ``at``: ``weight`` is the part of a larger weight starting at row ``at[0]``, column ``at[1]``
    (boundaries need not be multiples of 128), and ``scale`` holds the blocks that cover it
    (block rows ``at[0] // 128`` to ``ceil((at[0] + out) / 128)``, likewise the columns): each value
    gets the scale it has in the whole weight, so the result equals the whole weight's dequantized
    values at those rows and columns."""
    if weight.dim() != 2:
        raise CheckpointError(f"{name}: an FP8 weight must be 2-d, got shape {list(weight.shape)}")
    rows, cols = weight.shape
    (r0, c0) = (at[0] % FP8_BLOCK, at[1] % FP8_BLOCK)  # offsets into the first block row / column
    want = (-(-(r0 + rows) // FP8_BLOCK), -(-(c0 + cols) // FP8_BLOCK))
    if tuple(scale.shape) != want:
        raise CheckpointError(f"{name}: FP8 scale has shape {list(scale.shape)}, expected {list(want)}")
    s = _e8m0(scale, name)
    s = s.repeat_interleave(FP8_BLOCK, 0)[r0 : r0 + rows].repeat_interleave(FP8_BLOCK, 1)[:, c0 : c0 + cols]
    return weight.float() * s


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, name: str) -> torch.Tensor:
    """MXFP4 ``[out, in / 2]`` bytes (low nibble first) times one scale per 32 values, float32 on
    ``packed``'s device."""
    if packed.dim() != 2:
        raise CheckpointError(f"{name}: an MXFP4 weight must be 2-d, got shape {list(packed.shape)}")
    rows, half = packed.shape
    cols = 2 * half
    if cols % FP4_BLOCK or tuple(scale.shape) != (rows, cols // FP4_BLOCK):
        raise CheckpointError(f"{name}: FP4 scale has shape {list(scale.shape)}, expected [{rows}, {cols // FP4_BLOCK}]")
    b = packed.view(torch.uint8).to(torch.int64)
    codes = torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)
    values = _FP4_VALUES.to(codes.device)[codes].view(rows, -1, FP4_BLOCK)
    return (values * _e8m0(scale, name)[..., None]).flatten(-2)


@dataclasses.dataclass(frozen=True)
class _Entry:
    """A tensor of a shard as its header describes it."""

    file: str
    dtype: torch.dtype | str  # a header dtype torch does not know stays its string
    shape: tuple[int, ...]


class _Shards:
    """Every tensor of a checkpoint by name, whichever shard holds it: the headers at once,
    the data on request (each shard opened once)."""

    def __init__(self, files: list[str], weight_map: Mapping[str, str] | None = None) -> None:
        from safetensors import SafetensorError, safe_open

        self._open, self._errors, self._handles = safe_open, (SafetensorError, OSError, RuntimeError, ValueError), {}
        self.where: dict[str, str] = {}
        self.entries: dict[str, _Entry] = {}
        for file in files:
            base = os.path.basename(file)
            try:
                with safe_open(file, framework="pt") as f:
                    for k in f.keys():
                        if k in self.where:
                            raise CheckpointError(f"{k}: present in two shards ({os.path.basename(self.where[k])}, "
                                                  f"{base})")
                        sl = f.get_slice(k)
                        dtype = sl.get_dtype()
                        self.where[k] = file
                        self.entries[k] = _Entry(file, _DTYPES.get(dtype, dtype), tuple(sl.get_shape()))
            except self._errors as e:
                raise CheckpointError(f"{base}: not a readable safetensors file ({e})") from None
        for k, file in (weight_map or {}).items():
            if k not in self.where:
                raise CheckpointError(f"{k}: the index places it in {os.path.basename(file)}, which does not hold it")
            if os.path.normpath(file) != os.path.normpath(self.where[k]):
                raise CheckpointError(f"{k}: the index places it in {os.path.basename(file)}, but "
                                      f"{os.path.basename(self.where[k])} holds it")

    def get(self, key: str) -> torch.Tensor:
        file = self.where[key]
        try:
            if file not in self._handles:
                self._handles[file] = self._open(file, framework="pt")
            return self._handles[file].get_tensor(key)
        except self._errors as e:
            raise CheckpointError(f"{key}: cannot be read from {os.path.basename(file)} ({e})") from None

    def rows(self, key: str, rows: range) -> torch.Tensor:
        """Rows ``rows`` (a contiguous range along dim 0) of tensor ``key``: safetensors maps the
        shard, so only those rows' bytes are read (a view of the mapping; the pages of the
        other rows are never touched)."""
        return self._slice(key, (slice(rows.start, rows.stop),))

    def cols(self, key: str, cols: range) -> torch.Tensor:
        """Columns ``cols`` (a contiguous range along dim 1) of 2-d tensor ``key``: a strided view of
        the mapping, those columns' bytes of every row (row-major storage touches every row)."""
        return self._slice(key, (slice(None), slice(cols.start, cols.stop)))

    def part(self, key: str, dim: int, r: range) -> torch.Tensor:
        """``rows`` or ``cols`` of ``key``, by dimension."""
        return self.rows(key, r) if dim == 0 else self.cols(key, r)

    def _slice(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        file = self.where[key]
        try:
            if file not in self._handles:
                self._handles[file] = self._open(file, framework="pt")
            return self._handles[file].get_slice(key)[index]
        except self._errors as e:
            raise CheckpointError(f"{key}: cannot be read from {os.path.basename(file)} ({e})") from None

    def close(self) -> None:
        self._handles.clear()


def _is_scale(key: str, keys: Mapping[str, object]) -> bool:
    return (key.endswith(".scale") and key[: -len("scale")] + "weight" in keys) or (
        key.endswith(".weight_scale_inv") and key[: -len("_scale_inv")] in keys)


def _scale_key(key: str, keys: Mapping[str, object]) -> str | None:
    """The scale companion of weight ``key`` (``.scale`` or ``.weight_scale_inv``), if any."""
    found = [k for k in (key[: -len("weight")] + "scale" if key.endswith(".weight") else None, f"{key}_scale_inv")
             if k is not None and k in keys]
    if len(found) > 1:
        raise CheckpointError(f"{key}: two scale companions ({found[0]}, {found[1]})")
    return found[0] if found else None


# -- the plan: every tensor checked from the headers -------------------------------------------------


@dataclasses.dataclass
class _Item:
    """One checkpoint tensor and where it goes."""

    key: str
    target: str  # the parameter or buffer name
    part: tuple[int, str] | None  # (expert, "w1" | "w2" | "w3") for a per-expert tensor, else None
    shape: tuple[int, ...]  # the shape it must have once dequantized
    fmt: str  # "plain", "fp8" or "fp4"
    scale: str | None


def _expect(cfg: V4Config, p: torch.Tensor, part: tuple[int, str] | None) -> tuple[int, ...]:
    if part is None:
        return tuple(p.shape)
    inner = cfg.moe_intermediate_size
    return (inner, p.shape[2]) if part[1] in ("w1", "w3") else (p.shape[1], inner)


def _format(key: str, e: _Entry, scale: str | None, scale_e: _Entry | None, want: tuple[int, ...], floating: bool,
            strict: bool) -> str:
    """Checks a tensor's dtype and shape (and its scale's) from the headers; returns its format."""
    shape, dtype = list(e.shape), e.dtype
    if scale is not None and scale_e is not None:
        quantized = dtype == torch.float8_e4m3fn or (floating and dtype in (torch.int8, torch.uint8))
        if not quantized:
            if dtype in _FLOATS and not strict:
                return _format(key, e, None, None, want, floating, strict)
            raise CheckpointError(f"{scale}: a scale companion of {key}, which is not quantized "
                                  f"(dtype {_dtype_name(dtype)})")
        if not floating:
            raise CheckpointError(f"{key}: dtype {_dtype_name(dtype)}, expected an integer tensor")
        if scale_e.dtype not in _RAW_SCALES and scale_e.dtype not in _FLOATS:
            raise CheckpointError(f"{scale}: scale dtype {_dtype_name(scale_e.dtype)}; expected float8_e8m0fnu, "
                                  f"uint8 UE8M0 codes or a floating-point type")
        kind = "FP8" if dtype == torch.float8_e4m3fn else "MXFP4"
        if len(shape) != 2:
            raise CheckpointError(f"{key}: an {kind} weight must be 2-d, got shape {shape}")
        if len(want) != 2:
            raise CheckpointError(f"{key}: an {kind} weight, but the parameter has shape {list(want)}")
        rows, cols = want
        if kind == "FP8":
            if tuple(shape) != want:
                raise CheckpointError(f"{key}: shape {shape}, expected {list(want)}")
            blocks = [-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)]
            if list(scale_e.shape) != blocks:
                raise CheckpointError(f"{key}: FP8 scale has shape {list(scale_e.shape)}, expected {blocks}")
            return "fp8"
        if cols % FP4_BLOCK:
            raise CheckpointError(f"{key}: MXFP4 scales blocks of {FP4_BLOCK} values, but the parameter's rows have "
                                  f"{cols} values (shape {list(want)})")
        if shape != [rows, cols // 2]:
            odd = " (an odd number of bytes per row)" if shape[1] % 2 else ""
            raise CheckpointError(f"{key}: shape {shape}{odd}, expected {[rows, cols // 2]} (MXFP4 bytes of {list(want)})")
        if list(scale_e.shape) != [rows, cols // FP4_BLOCK]:
            raise CheckpointError(f"{key}: FP4 scale has shape {list(scale_e.shape)}, "
                                  f"expected {[rows, cols // FP4_BLOCK]}")
        return "fp4"
    if dtype == torch.float8_e4m3fn:
        raise CheckpointError(f"{key}: FP8 weight without a .scale or .weight_scale_inv companion")
    if dtype in (torch.float8_e5m2, torch.float8_e8m0fnu):
        raise CheckpointError(f"{key}: unsupported dtype {_dtype_name(dtype)}")
    if floating and dtype not in _FLOATS:
        raise CheckpointError(f"{key}: dtype {_dtype_name(dtype)}, expected a floating-point tensor")
    if not floating and dtype not in _INTS:
        raise CheckpointError(f"{key}: dtype {_dtype_name(dtype)}, expected an integer tensor")
    if tuple(shape) != want:
        raise CheckpointError(f"{key}: shape {shape}, expected {list(want)}")
    return "plain"


def _plan(reader: _Shards, cfg: V4Config, params: dict[str, torch.Tensor], strict: bool) -> list[_Item]:
    """Every tensor to load, checked from the headers: a known name (under ``strict``), one
    spelling per parameter (or expert slice), the dtype, shape and scale of each."""
    items: list[_Item] = []
    owner: dict[tuple[str, tuple[int, str] | None], str] = {}  # (target, part) -> key
    split: dict[str, str] = {}  # target -> a key holding one expert of it
    for key in sorted(reader.where):
        if _is_scale(key, reader.where):
            continue
        name = canonical_name(key)
        if name.startswith("mtp.") and not cfg.num_nextn_predict_layers:
            continue
        if name.endswith(("rotary_emb.inv_freq", "original_inv_freq")):
            continue
        part = None
        m = _EXPERT.match(name)
        if m:
            prefix, e, w = m.group(1), int(m.group(2)), m.group(3)
            target = f"{prefix}.gate_up_proj" if w in ("w1", "w3") else f"{prefix}.down_proj"
            if target not in params:
                if strict:
                    raise CheckpointError(f"{key}: no such expert tensor in the model ({target})")
                continue
            if e >= params[target].shape[0]:
                raise CheckpointError(f"{key}: expert {e} >= n_routed_experts = {params[target].shape[0]}")
            part = (e, w)
        elif name in params:
            target = name
        else:
            if strict:
                raise CheckpointError(f"{key}: unexpected tensor (no parameter {name} in this model)")
            continue
        other = owner.get((target, part)) or owner.get((target, None)) or (part is None and split.get(target))
        if other:
            what = target if part is None else f"{target}, expert {part[0]} {part[1]}"
            raise CheckpointError(f"{key}: {other} holds the same tensor ({what}) under another spelling")
        if part is not None:
            split.setdefault(target, key)
        owner[(target, part)] = key
        p = params[target]
        want = _expect(cfg, p, part)
        scale = _scale_key(key, reader.where)
        fmt = _format(key, reader.entries[key], scale, reader.entries.get(scale) if scale else None, want,
                      p.is_floating_point(), strict)
        items.append(_Item(key, target, part, want, fmt, scale if fmt != "plain" else None))
    _check_complete(cfg, params, owner)
    return items


def _check_complete(cfg: V4Config, params: dict[str, torch.Tensor], owner: dict) -> None:
    """Every parameter present (an absent MTP block is allowed; a partial one is not)."""
    parts_of = {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}
    parts: dict[str, set[tuple[int, str]]] = {}
    for t, p in owner:
        if p is not None:
            parts.setdefault(t, set()).add(p)

    def absent(name: str) -> str | None:
        """What of ``name`` is missing, or None."""
        if (name, None) in owner:
            return None
        leaf = name.rsplit(".", 1)[-1]
        if ".mlp.experts." in name and leaf in parts_of:
            have = parts.get(name)
            if have:
                for e in range(params[name].shape[0]):
                    for w in parts_of[leaf]:
                        if (e, w) not in have:
                            return f"expert {e} {w}"
                return None
        return "all of it"

    missing = {n: why for n in params if (why := absent(n)) is not None}
    main = [n for n in missing if not n.startswith("mtp.")]
    mtp = [n for n in missing if n.startswith("mtp.")]
    if mtp and len(mtp) < sum(n.startswith("mtp.") for n in params):
        main += mtp  # a partial MTP block is an error; an absent one is allowed
    if main:
        first = main[0]
        detail = "" if missing[first] == "all of it" else f": {missing[first]}"
        raise CheckpointError(f"{first}: missing from the checkpoint{detail} ({len(main)} tensors missing)")


# -- loading ---------------------------------------------------------------------------------------


def _read(reader: _Shards, item: _Item, cfg: V4Config, rows: range | None = None, dim: int = 0) -> torch.Tensor:
    """One tensor (only ``rows`` along dimension ``dim`` of it when given), dequantized, its values
    checked. A part of an FP8 weight is read with the scale blocks that cover it (its boundaries
    need not be multiples of 128); a part of an MXFP4 weight (none that dsv4rs splits today) is
    the whole tensor read, dequantized and sliced."""
    shape = list(reader.entries[item.key].shape)
    whole = rows is None or item.fmt == "fp4"
    if whole:
        t = reader.get(item.key)
    else:
        t = reader.part(item.key, dim, rows)
        shape[dim] = len(rows)
    if list(t.shape) != shape:  # the file changed under us
        raise CheckpointError(f"{item.key}: shape {list(t.shape)} differs from its header")
    if item.fmt == "fp8" and whole:
        t = dequantize_fp8(t, reader.get(item.scale), item.key)
    elif item.fmt == "fp8":
        blocks = range(rows.start // FP8_BLOCK, -(-rows.stop // FP8_BLOCK))
        t = dequantize_fp8(t, reader.part(item.scale, dim, blocks), item.key,
                           (rows.start, 0) if dim == 0 else (0, rows.start))
    elif item.fmt == "fp4":
        t = dequantize_fp4(t, reader.get(item.scale), item.key)
    if rows is not None and whole:
        t = t.narrow(dim, rows.start, len(rows))
    if t.is_floating_point():
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{item.key}: non-finite values")
    elif t.numel() and (int(t.min()) < 0 or int(t.max()) >= cfg.n_routed_experts):
        raise CheckpointError(f"{item.key}: expert ids must lie in [0, {cfg.n_routed_experts})")
    return t


def _owned(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """``t`` on ``dev``, contiguous and owning exactly its bytes (not a view of a shard's mapping
    or of a larger tensor)."""
    t = t.to(dev).contiguous()
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t


def _read_quantized(reader: _Shards, item: _Item, part: range | None = None, dim: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """An FP8 or MXFP4 tensor as stored (only values ``part`` along ``dim`` when given, which
    start and end on its scale blocks, with the scales covering them): ``(codes uint8, scales)``,
    the scales float32 multipliers per 128x128 block for FP8 (UE8M0 codes ``2^(code - 127)``
    exactly, or float scales) and raw UE8M0 codes ``uint8`` for MXFP4. Checked: the shapes, no
    NaN FP8 code (e4m3 0x7F and 0xFF), no NaN scale code (255), float scales finite and > 0."""
    fp8 = item.fmt == "fp8"
    shape = list(reader.entries[item.key].shape)
    if part is None:
        t, s = reader.get(item.key), reader.get(item.scale)
    else:
        if fp8:
            w_part, s_part = part, range(part.start // FP8_BLOCK, -(-part.stop // FP8_BLOCK))
        elif dim == 0:
            w_part = s_part = part
        else:
            w_part, s_part = range(part.start // 2, part.stop // 2), range(part.start // FP4_BLOCK, part.stop // FP4_BLOCK)
        t, s = reader.part(item.key, dim, w_part), reader.part(item.scale, dim, s_part)
        shape[dim] = len(w_part)
    if list(t.shape) != shape:  # the file changed under us
        raise CheckpointError(f"{item.key}: shape {list(t.shape)} differs from its header")
    rows, width = shape
    want = list(scale_shape(item.fmt, rows, width if fp8 else 2 * width))
    if list(s.shape) != want:
        raise CheckpointError(f"{item.key}: {'FP8' if fp8 else 'FP4'} scale has shape {list(s.shape)}, expected {want}")
    codes = t.view(torch.uint8)
    if not fp8:
        raw = s.view(torch.uint8)
        if (raw == 255).any():
            raise CheckpointError(f"{item.key}: NaN scale (UE8M0 code 255)")
        return codes, raw
    nan = (codes & 0x7F) == 0x7F
    if nan.any():
        r, c = nan.nonzero()[0].tolist()
        raise CheckpointError(f"{item.key}: NaN FP8 code 0x{int(codes[r, c]):02X} at [{r}, {c}] "
                              f"(e4m3 0x7F and 0xFF are NaN)")
    return codes, _e8m0(s, item.key)


def _keep_quantized(model: DeepseekV4, items: list[_Item], reader: _Shards, dtype: torch.dtype
                    ) -> tuple[dict[str, QuantLinear], dict[str, Experts]]:
    """``quantized=True``: swaps (on the meta device, before anything is allocated) every layer
    whose weights the checkpoint ships quantized for its quantized form: a linear layer (but the
    LM head) for a :class:`QuantLinear`, routed experts shipped in MXFP4 for quantized
    :class:`Experts`. Returns them by the name of the weight (``...q_a_proj.weight``) and of the
    experts module. Quantized weights of other tensors (the embedding, the router, the LM head)
    are dequantized as with ``quantized=False``. CheckpointError, naming the tensor, where the
    kernels cannot run what is stored: a reduced dimension not a multiple of 32, float scales of
    MXFP4 weights, routed experts in FP8 or partly quantized."""
    by_target: dict[str, list[_Item]] = {}
    for it in items:
        by_target.setdefault(it.target, []).append(it)

    def raw_scales(its: list[_Item]) -> None:
        for it in its:
            if it.fmt == "fp4" and reader.entries[it.scale].dtype not in _RAW_SCALES:
                raise CheckpointError(f"{it.scale}: {_dtype_name(reader.entries[it.scale].dtype)} scales of an MXFP4 "
                                      f"weight; the FP4 kernels take UE8M0 codes (load with quantized=False to "
                                      f"dequantize)")

    linears: dict[str, QuantLinear] = {}
    experts: dict[str, Experts] = {}
    for name, mod in list(model.named_modules()):
        parent, _, leaf = name.rpartition(".")
        if isinstance(mod, (nn.Linear, GroupedLinear)) and name != "lm_head":
            its = by_target.get(f"{name}.weight", [])
            if not its or its[0].fmt == "plain":
                continue
            (it,) = its
            out_features, in_features = mod.weight.shape
            if in_features % K_MULTIPLE:
                raise CheckpointError(f"{it.key}: its reduced dimension {in_features} is not a multiple of {K_MULTIPLE}, "
                                      f"which the quantized kernels need (load with quantized=False to dequantize)")
            raw_scales(its)
            with torch.device("meta"):
                q = QuantLinear(in_features, out_features, it.fmt, getattr(mod, "groups", 1), dtype=dtype)
            setattr(model.get_submodule(parent), leaf, q)
            linears[f"{name}.weight"] = q
        elif isinstance(mod, Experts):
            its = by_target.get(f"{name}.gate_up_proj", []) + by_target.get(f"{name}.down_proj", [])
            fmts = {it.fmt for it in its}
            if fmts <= {"plain"}:
                continue
            if fmts != {"fp4"}:
                odd = next(it for it in its if it.fmt != "fp4")
                raise CheckpointError(f"{odd.key}: {'FP8' if odd.fmt == 'fp8' else 'unquantized'} beside MXFP4 routed "
                                      f"experts; the fused MoE runs MXFP4 experts only (load with quantized=False "
                                      f"to dequantize)")
            raw_scales(its)
            cfg = model.config
            with torch.device("meta"):
                q = Experts(cfg, range(mod.first, mod.first + mod.held), quantized=True)
            setattr(model.get_submodule(parent), leaf, q)
            experts[name] = q
    return linears, experts


def _slots(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, bool]]]:
    """Every place a tensor is held: id(tensor) -> (module, attribute, is_parameter)."""
    slots: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    for mod in model.modules():
        for attr, p in mod._parameters.items():
            if p is not None:
                slots.setdefault(id(p), []).append((mod, attr, True))
        for attr, b in mod._buffers.items():
            if b is not None:
                slots.setdefault(id(b), []).append((mod, attr, False))
    return slots


def _place(slots: dict, meta: torch.Tensor, value: torch.Tensor) -> None:
    """Puts ``value`` wherever the meta tensor ``meta`` is held (a tied weight in both places)."""
    param = nn.Parameter(value, requires_grad=meta.requires_grad) if isinstance(meta, nn.Parameter) else None
    for mod, attr, is_param in slots[id(meta)]:
        if is_param:
            mod._parameters[attr] = param
        else:
            mod._buffers[attr] = value


def _check_target(device: torch.device | str, dtype: torch.dtype) -> torch.device:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
        raise ValueError(f"dtype: expected a floating-point torch.dtype of 16 bits or more, got {dtype!r}")
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        raise ValueError(f"device: cannot allocate tensors on {device!r} ({str(e).splitlines()[0] if str(e) else e})"
                         ) from None
    if dev.type == "meta":
        raise ValueError("device: expected a device that holds data, got meta")
    return dev


def _check_tp(cfg: V4Config, tp: object) -> None:
    if tp is None:
        return
    if (not isinstance(tp, tuple) or len(tp) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in tp)):
        raise ValueError(f"tp: expected (rank, world), a tuple of two ints, got {tp!r}")
    rank, world = tp
    if world < 1:
        raise ValueError(f"tp: world must be >= 1, got {tp!r}")
    if not 0 <= rank < world:
        raise ValueError(f"tp: rank must lie in [0, world), got {tp!r}")
    if cfg.o_groups % world:
        raise ValueError(f"tp: tensor-parallel attention splits the {cfg.o_groups} output groups (o_groups) over "
                         f"the ranks, which world = {world} does not divide")


def load_checkpoint(path: str | os.PathLike[str], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    progress: bool = True, strict: bool = True, experts: range | None = None,
                    tp: tuple[int, int] | None = None, quantized: bool = True) -> DeepseekV4:
    """Loads ``path`` (``config.json`` and safetensors shards) into a :class:`DeepseekV4`.

    First every tensor is checked from the shards' headers against the model (name, dtype,
    shape, scale companion, each parameter present once under one spelling) before anything is
    allocated; then the shards are read one at a time, each tensor's values checked (finite;
    FP8 codes not NaN; scales finite and > 0, UE8M0 code 255 refused; hash tables in range) and
    allocated on ``device`` in its final form. ``strict`` refuses unknown tensors and scale
    companions of unquantized weights (an MTP block the config lacks is skipped, as
    transformers does); missing tensors always raise. Errors are :class:`CheckpointError` naming
    the tensor or file. mHC, sink, norm and positional-bias parameters stay float32 whatever
    ``dtype``.

    ``quantized`` (default True) keeps the weights the checkpoint ships quantized as stored (the
    layer at that place, chosen from the headers, becomes a
    :class:`~dsv4rs.model.layers.quant.QuantLinear` or quantized
    :class:`~dsv4rs.model.layers.moe.Experts`): FP8 e4m3 linears as ``uint8`` codes with their
    block scales as float32 multipliers (UE8M0 ``.scale`` and float ``.weight_scale_inv`` alike),
    MXFP4 routed experts as their bytes and UE8M0 codes, copied one expert at a time into
    stacked buffers allocated on ``device``; no full-precision copy of them is made. ``dtype``
    applies to every other tensor, and is the dtype the quantized layers compute in. Quantized
    tensors that are not a linear layer's weight (the embedding, the router, the LM head) are
    dequantized. ``quantized=False`` dequantizes everything to ``dtype``.

    ``experts`` (a contiguous range of routed-expert ids within ``[0, n_routed_experts)``, possibly
    empty; default all) loads a rank's share under expert parallelism: the model is
    ``DeepseekV4(cfg, experts)``, every MoE layer holding those experts only. The headers are
    still checked for every expert (a checkpoint missing an expert another rank owns is refused),
    but only the owned experts' bytes are read: other experts' per-expert tensors (DeepSeek's
    ``experts.N.w1``) and their scales are skipped, stacked ``[E, ...]`` tensors (transformers'
    ``gate_up_proj``, ``down_proj``) are read for the owned rows only, and the values checked are
    those read. Every other tensor is read as without ``experts``. The result equals the full
    load with the routed-expert tensors sliced to ``[experts.start, experts.stop)``. A bad
    ``experts`` raises :class:`ValueError` naming it.

    ``tp=(rank, world)`` loads a rank's share under tensor-parallel attention
    (:mod:`dsv4rs.parallel`, ``mode="tp"``): every attention layer (the MTP block's too) holds its
    contiguous share of the ``o_groups`` output groups and of the heads they project, as
    :func:`dsv4rs.parallel.shard` keeps it (:meth:`~dsv4rs.model.layers.attention.Attention.head_share`):
    rows of ``q_b_proj``, the sinks' entries, rows of ``o_a_proj``, columns of ``o_b_proj``, and the
    local head and group counts. The headers are still checked against the full model; of those
    four tensors only the rank's part is read (rows or columns of the mapping; an FP8 weight's part
    with the block scales covering it), and the values checked are those read. Dequantized
    (``quantized=False``), a part's boundaries may fall anywhere; kept quantized they must be
    multiples of 128 (the FP8 blocks; a ValueError naming ``tp`` says to pass
    ``quantized=False`` otherwise). Combined with ``experts=pc.experts`` the result, after
    :func:`dsv4rs.parallel.attach`, equals ``shard(full model, pc)``. ``world`` must divide
    ``o_groups``; a bad ``tp`` raises :class:`ValueError` naming it.
    """
    path = os.fspath(path)
    dev = _check_target(device, dtype)
    for name, v in (("quantized", quantized), ("progress", progress), ("strict", strict)):
        if not isinstance(v, bool):
            raise ValueError(f"{name}: expected True or False, got {v!r}")
    try:
        cfg = V4Config.from_pretrained(path)
    except FileNotFoundError:
        raise
    except ValueError as e:
        raise CheckpointError(f"config.json: {str(e).removeprefix('path: ')}") from None
    held = expert_range(cfg, experts)
    _check_tp(cfg, tp)
    with torch.device("meta"):
        full = set_dtype(DeepseekV4(cfg), dtype)  # what the checkpoint must hold: every expert, every head
        model = (set_dtype(DeepseekV4(cfg, held), dtype) if held != range(cfg.n_routed_experts) or tp is not None
                 else full)
    reader = _Shards(*_shards(path))
    items = _plan(reader, cfg, full.checkpoint_tensors(), strict)
    del full
    qlinears, qexperts = _keep_quantized(model, items, reader, dtype) if quantized else ({}, {})
    tp_parts: dict[str, tuple[int, range]] = {}  # parameter -> (dim, range) of it this rank reads
    if tp is not None:
        for name, mod in model.named_modules():
            if isinstance(mod, Attention):
                try:
                    share = mod.keep_heads(*tp)
                except ValueError as e:
                    raise ValueError(f"tp: {tp} cuts {name}.{e}; pass quantized=False to load the weights "
                                     f"dequantized, which split anywhere") from None
                tp_parts.update({f"{name}.{leaf}": part for leaf, part in share.items()})
    params = model.checkpoint_tensors()
    if cfg.num_nextn_predict_layers and not any(it.target.startswith("mtp.") for it in items):
        model.mtp = nn.ModuleList()  # no MTP block in the checkpoint: run without drafts
        params = {n: t for n, t in params.items() if not n.startswith("mtp.")}
    routed = {f"{name}.{leaf}" for name, mod in model.named_modules() if isinstance(mod, Experts)
              for leaf in ("gate_up_proj", "down_proj")}  # the names the plan gives routed-expert tensors
    # Other ranks' experts: neither the tensors nor their scales are read (nor, holding none,
    # any row of a stacked expert tensor).
    items = [it for it in items
             if (it.part[0] in held if it.part is not None else len(held) or it.target not in routed)]

    part_rows = held if held != range(cfg.n_routed_experts) else None  # rows of stacked tensors to read

    slots = _slots(model)
    experts_buf: dict[str, torch.Tensor] = {}  # stacked expert tensors being filled, by name
    by_shard: dict[str, list[_Item]] = {}
    for item in items:
        by_shard.setdefault(reader.where[item.key], []).append(item)
    inner = cfg.moe_intermediate_size
    try:
        with torch.no_grad():
            for file in tqdm(sorted(by_shard), desc="loading shards", unit="shard", disable=not progress):
                for item in by_shard[file]:
                    if item.target in qlinears:
                        dim, part = tp_parts.get(item.target, (0, None))
                        codes, scale = _read_quantized(reader, item, part, dim)
                        q = qlinears[item.target]
                        q.weight, q.scale = _owned(codes, dev), _owned(scale, dev)
                        continue
                    prefix = item.target.rpartition(".")[0]
                    if prefix in qexperts:  # one expert's w1, w3 or w2, copied into the stacked buffers
                        if f"{prefix}.gate_up" not in experts_buf:
                            experts_buf.update({f"{prefix}.{n}": torch.empty(params[f"{prefix}.{n}"].shape,
                                                                             dtype=torch.uint8, device=dev)
                                                for n in Experts.QUANTIZED})
                        codes, scale = _read_quantized(reader, item)
                        e, w = item.part
                        e -= held.start
                        rows = slice(0, inner) if w == "w1" else slice(inner, 2 * inner) if w == "w3" else slice(None)
                        leaf = "gate_up" if w in ("w1", "w3") else "down"
                        experts_buf[f"{prefix}.{leaf}"][e, rows].copy_(codes)
                        experts_buf[f"{prefix}.{leaf}_scale"][e, rows].copy_(scale)
                        continue
                    meta = params[item.target]
                    stacked = item.part is None and item.target in routed
                    dim, part = tp_parts.get(item.target, (0, part_rows if stacked else None))
                    t = _read(reader, item, cfg, part, dim).to(meta.dtype)
                    if t.is_floating_point() and not torch.isfinite(t).all():
                        raise CheckpointError(f"{item.key}: values overflow {_dtype_name(meta.dtype)}")
                    if item.part is None:
                        t = t.to(dev).contiguous()
                        if part is not None and t.untyped_storage().nbytes() != t.numel() * t.element_size():
                            t = t.clone()  # rows of the shard's mapping (or a whole tensor): hold only those
                        _place(slots, meta, t)
                        continue
                    if item.target not in experts_buf:
                        experts_buf[item.target] = torch.empty(meta.shape, dtype=meta.dtype, device=dev)
                    e, w = item.part
                    e -= held.start
                    buf = experts_buf[item.target]
                    (buf[e, :inner] if w == "w1" else buf[e, inner:] if w == "w3" else buf[e]).copy_(t)
    finally:
        reader.close()
    if not len(held):  # a rank holding no experts: its expert tensors are empty
        for name, mod in model.named_modules():
            if isinstance(mod, Experts):
                leaves = Experts.QUANTIZED if mod.quantized else ("gate_up_proj", "down_proj")
                experts_buf.update({f"{name}.{n}": torch.empty(params[f"{name}.{n}"].shape, dtype=params[f"{name}.{n}"].dtype,
                                                               device=dev) for n in leaves if f"{name}.{n}" in params})
    for name, buf in experts_buf.items():
        _place(slots, params[name], buf)
    for attn in [layer.self_attn for layer in [*model.model.layers, *model.mtp]]:
        attn.rotary.inv_freq = rope_inv_freq(cfg, attn.layer_type != SWA).to(dev)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"load_checkpoint: {left[0]} was not loaded (a dsv4rs bug)")
    return model
