"""The child process of tests/test_fuzz.py: makes seeded malformed calls of the public ops
(dsv4rs.ops), the drop-in entry points (dsv4rs.compat), the cache manager (dsv4rs.cache) and the
checkpoint loader, and reports each.

    python tests/_fuzz_child.py SEED BATCH START COUNT WORKDIR [--only CASE_INDEX] [--include-known]
                                [--seconds S]

Case ``i`` of batch ``BATCH`` is a pure function of ``(SEED, BATCH, i)``. Before each call the child
prints ``START i <description>``; after it, ``OK i``, ``RAISED i <type>: <message>`` (an exception
the API may raise) or ``DEFECT i <class>: <type>: <message>`` (anything else: another exception
type, a panic turned RuntimeError, an allocation the caller did not ask for). A crash or a hang
leaves a ``START`` line without its outcome. Cases of a known crashing defect class
(``KNOWN_CRASHES`` of tests/_fuzz_known.py, being fixed elsewhere) are printed ``KNOWN i <class>``
and not run, unless ``--include-known``.

With ``--seconds``, cases after that much time are printed ``BUDGET i`` and not run. The address
space is capped (RLIMIT_AS) after the imports at what they use plus
:data:`MEMORY_BOUND`, so an oversized allocation fails instead of taking the machine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import resource
import shutil
import sys
import traceback

MEMORY_BOUND = 3 << 30
"""Bytes of address space a child may add after its imports."""

import numpy as np  # noqa: E402
import torch  # noqa: E402

import dsv4rs  # noqa: E402
from dsv4rs import cache as dcache  # noqa: E402
from dsv4rs import ops  # noqa: E402
from dsv4rs.model.loader import CheckpointError  # noqa: E402

from _fuzz_known import KNOWN_CRASHES  # noqa: E402  (tests/, this script's folder)

ALLOWED = (TypeError, ValueError, IndexError, RuntimeError, dsv4rs.OutOfPagesError, dsv4rs.CacheStateError,
           dsv4rs.CudaError, CheckpointError)
"""What a malformed call may raise (the exceptions the API documents)."""

PAGE = ops.PAGE_ROWS

def known_class(tags: set[str]) -> str | None:
    """The known crashing defect class a case belongs to (by its input features), or None."""
    for cls, (need, _) in KNOWN_CRASHES.items():
        if need <= tags:
            return cls
    return None


# -- random values ------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.complex64]
HUGE_INTS = [-1, -(2**31), 2**31, 2**32 + 5, 2**62, 2**63 - 1, 2**63, 2**64 + 1, -(2**70)]
STRINGS = ["", "fp16", "FP4", "none ", "window\x00", "\u00e9", "csa" * 1000]


class Gen:
    """Random malformed values for one case."""

    def __init__(self, seed: str) -> None:
        self.r = random.Random(seed)
        self.g = torch.Generator().manual_seed(self.r.getrandbits(63))
        self.tags: set[str] = set()

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g)

    def chance(self, p: float) -> bool:
        return self.r.random() < p

    def bad_int(self, valid: int) -> object:
        kind = self.r.choice(["huge", "huge", "neg", "zero", "type", "off"])
        if kind == "huge":
            v = self.r.choice(HUGE_INTS)
            self.tags.add("int-negative" if v < 0 else "int-huge")
            return v
        if kind == "neg":
            self.tags.add("int-negative")
            return -self.r.randint(1, 1000)
        if kind == "zero":
            self.tags.add("int-zero")
            return 0
        if kind == "type":
            self.tags.add("int-type")
            clipped = max(min(valid, 2**62), -(2**62))
            return self.r.choice([True, 1.5, float("nan"), "3", None, [valid], np.int64(clipped), torch.tensor(clipped)])
        self.tags.add("int-off")
        return valid + self.r.choice([-1, 1, 63, 64, 65])

    def bad_str(self, valid: str) -> object:
        self.tags.add("str")
        return self.r.choice([*STRINGS, valid.upper(), None, 4, b"fp4"])

    def bad_tensor(self, t: torch.Tensor, index: bool = False) -> object:
        """A mutation of ``t``: dtype, shape, layout, values, device or type."""
        kinds = ["dtype", "shape", "noncontig", "empty", "expand", "meta", "type", "values"]
        kind = self.r.choice(kinds)
        if t.is_meta:  # mutated once already
            return t
        self.tags.add(f"tensor-{kind}")
        if kind == "dtype":
            dt = self.r.choice([d for d in DTYPES if d != t.dtype])
            return t.to(dt) if dt != torch.float8_e4m3fn or t.is_floating_point() else t.float().to(dt)
        if kind == "shape":
            how = self.r.choice(["drop", "add", "grow", "shrink", "flat"])
            if how == "drop" and t.dim() > 0:
                return t.reshape(-1)[: max(1, t.numel() // 2)].clone() if t.dim() == 1 else t[0].clone()
            if how == "add":
                return t.unsqueeze(self.r.randint(0, t.dim())).clone()
            if how == "grow" and t.dim() > 0:
                d = self.r.randrange(t.dim())
                return torch.cat([t, t.narrow(d, 0, min(1, t.shape[d]))], dim=d) if t.shape[d] else t.clone()
            if how == "shrink" and t.dim() > 0 and t.shape[-1] > 1:
                return t[..., :-1].clone()
            return t.reshape(-1).clone()
        if kind == "noncontig":
            if t.dim() >= 2 and t.shape[0] > 1:
                return t.transpose(0, 1).contiguous().transpose(0, 1)
            if t.dim() >= 1:
                return torch.stack([t, t], -1)[..., 0]
            return t
        if kind == "empty":
            return t[:0].clone() if t.dim() else t.reshape(1)[:0]
        if kind == "expand":
            if t.dim() >= 1 and t.shape[0] > 0:
                return t[:1].expand(t.shape)  # stride 0: every row the same memory
            return t
        if kind == "meta":
            return t.to("meta")
        if kind == "type":
            return self.r.choice([t.tolist(), t.numpy() if t.dtype not in (torch.bfloat16, torch.float8_e4m3fn) else 3,
                                  None, 7, "tensor", object()])
        # values
        if t.is_floating_point():
            t = t.float().contiguous().clone()
            flat = t.view(-1)
            if flat.numel():
                flat[self.r.randrange(flat.numel())] = self.r.choice([float("nan"), float("inf"), -float("inf"), 1e38])
            self.tags.add("nan")
            return t.to(dtype=torch.float32)
        if t.dtype == torch.uint8:  # cache bytes
            self.tags.add("cache-bytes")
            return torch.randint(0, 256, t.shape, generator=self.g, dtype=torch.uint8)
        t = t.contiguous().clone()
        flat = t.view(-1)
        if flat.numel() and t.dtype in (torch.int64, torch.int32):
            info = torch.iinfo(t.dtype)
            v = self.r.choice([-1, -2, -(2**20), info.max, info.min, 2**20, PAGE * 1000])
            flat[self.r.randrange(flat.numel())] = v
            self.tags.add("index-range")
        return t


# -- the ops ---------------------------------------------------------------------------------------


def _kv_cache(g: Gen, pages: int = 2, rows: int = 100) -> torch.Tensor:
    return ops.quantize_entries(g.randn(rows, 512)) if pages == 2 else ops.new_kv_cache(pages)


def op_cases(g: Gen):
    """Baseline valid arguments of every public op: ``(name, function, kwargs)``."""
    n = g.r.randint(1, 8)
    fmt = g.r.choice(["fp4", "fp8"])
    keycache = ops.quantize_index_keys(g.randn(100, 128), fmt)
    kv = _kv_cache(g)
    ratio = g.r.choice([4, 128, 2])
    coff = 2 if ratio == 4 else 1
    d = 64
    s = g.r.randint(1, 9)
    state = ops.compressor_state(ratio, d)
    t = g.r.randint(1, 4)
    yield "kv_write", ops.kv_write, dict(cache=ops.new_kv_cache(2), slots=torch.randperm(128, generator=g.g)[:n],
                                         entries=g.randn(n, 512))
    yield "kv_read", ops.kv_read, dict(cache=kv, rows=torch.randint(-1, 128, (n,), generator=g.g))
    yield "index_key_write", ops.index_key_write, dict(cache=ops.new_index_key_cache(2, fmt),
                                                       slots=torch.randperm(128, generator=g.g)[:n],
                                                       keys=g.randn(n, 128), fmt=fmt)
    yield "index_key_read", ops.index_key_read, dict(cache=keycache, rows=torch.randint(-1, 128, (n,), generator=g.g),
                                                     fmt=fmt)
    yield "index_key_round_trip", ops.index_key_round_trip, dict(keys=g.randn(n, 128), fmt=fmt)
    yield "copy_rows", ops.copy_rows, dict(dst=ops.new_kv_cache(2), dst_rows=torch.randperm(128, generator=g.g)[:n],
                                           src=kv, src_rows=torch.randint(0, 128, (n,), generator=g.g))
    yield "hadamard128", ops.hadamard128, dict(x=g.randn(n, 128))
    yield "quantize_entries", ops.quantize_entries, dict(entries=g.randn(n, 512))
    yield "quantize_index_keys", ops.quantize_index_keys, dict(keys=g.randn(n, 128), fmt=fmt)
    yield "new_kv_cache", ops.new_kv_cache, dict(num_pages=n)
    yield "new_index_key_cache", ops.new_index_key_cache, dict(num_pages=n, fmt=fmt)
    yield "rope", ops.rope, dict(x=g.randn(t, 2, 64), positions=torch.arange(t), inv_freq=torch.rand(16, generator=g.g),
                                 inverse=g.chance(0.5))
    yield "mhc_weights", ops.mhc_weights, dict(mix=g.randn(t, 24), scale=g.randn(3), base=g.randn(24),
                                               iters=g.r.randint(1, 5), eps=1e-6)
    yield "rms_norm", ops.rms_norm, dict(x=g.randn(t, 2, 64), weight=g.randn(64), eps=1e-6,
                                         out_dtype=g.r.choice([torch.float32, torch.bfloat16]))
    yield "rms_norm_rope", ops.rms_norm_rope, dict(x=g.randn(t, 2, 64), weight=g.randn(64), eps=1e-6,
                                                   positions=torch.arange(t), inv_freq=torch.rand(16, generator=g.g),
                                                   norm_dtype=g.r.choice([torch.float32, torch.bfloat16]))
    streams = g.randn(t, 4, 64)
    yield "mhc_collapse", ops.mhc_collapse, dict(x=streams, pre=g.randn(t, 4))
    yield "mhc_pre", ops.mhc_pre, dict(x=streams, proj=g.randn(24, 256), scale=g.randn(3), base=g.randn(24),
                                       iters=g.r.randint(1, 5), eps=1e-6, norm_eps=1e-6)
    yield "mhc_mix", ops.mhc_mix, dict(x=streams, proj=g.randn(g.r.choice([4, 24, 80]), 256), norm_eps=1e-6)
    yield "mhc_combine", ops.mhc_combine, dict(x=streams, f=g.randn(t, 64), post=g.randn(t, 4), comb=g.randn(t, 4, 4))
    yield "compressor_state", ops.compressor_state, dict(ratio=ratio, dim=d)
    yield "compress", ops.compress, dict(kv=g.randn(s, coff * d), score=g.randn(s, coff * d),
                                         ape=g.randn(ratio, coff * d), norm_weight=torch.ones(d),
                                         inv_freq=torch.rand(16, generator=g.g), kv_state=state[0],
                                         score_state=state[1], start_pos=g.r.randint(0, 9), ratio=ratio)
    b = g.r.randint(1, 3)
    counts = [g.r.randint(0, 4) for _ in range(b)]
    cu = torch.tensor([0, *np.cumsum(counts).tolist()], dtype=torch.int64)
    pool = torch.stack([torch.stack(ops.compressor_state(ratio, d)) for _ in range(b + 1)])
    yield "compress_batch", ops.compress_batch, dict(
        kv=g.randn(int(cu[-1]), coff * d), score=g.randn(int(cu[-1]), coff * d), ape=g.randn(ratio, coff * d),
        norm_weight=torch.ones(d), inv_freq=torch.rand(16, generator=g.g), state=pool,
        state_slots=torch.randperm(b + 1, generator=g.g)[:b], starts=torch.zeros(b, dtype=torch.int64), cu_tokens=cu,
        ratio=ratio)
    yield "indexer_topk", ops.indexer_topk, dict(
        q=g.randn(t, 4, 128), weights=g.randn(t, 4), key_cache=keycache,
        block_table=torch.tensor([[0, 1]], dtype=torch.int32), seq_ids=torch.zeros(t, dtype=torch.int64),
        visible=torch.full((t,), g.r.randint(0, 128), dtype=torch.int64), k=g.r.randint(1, 16),
        return_scores=g.chance(0.5), physical=g.chance(0.5))
    k = g.r.randint(1, 8)
    yield "sparse_attention", ops.sparse_attention, dict(
        q=g.randn(t, 2, 512), cache=kv, indices=torch.randint(-1, 100, (t, k), generator=g.g), sink=torch.zeros(2),
        lengths=torch.full((t,), k, dtype=torch.int32) if g.chance(0.3) else None,
        extra_cache=kv if g.chance(0.3) else None, extra_indices=None, extra_lengths=None,
        derotate=(torch.arange(t), torch.rand(16, generator=g.g)) if g.chance(0.3) else None)
    e, inter, d = 4, 32, 64
    yield "quant_linear", ops.quant_linear, dict(
        x=g.randn(t, 2, 64), weight=(g.randn(96, 64) * 64).clamp(-448, 448).to(torch.float8_e4m3fn),
        scale=torch.rand(1, 1, generator=g.g) + 0.5, groups=2, act=g.r.choice(["fp8", "bf16"]))
    yield "moe_experts", ops.moe_experts, dict(
        x=g.randn(t, d), idx=torch.randint(0, e, (t, 2), generator=g.g), weights=torch.rand(t, 2, generator=g.g),
        gate_up=torch.randint(0, 256, (e, 2 * inter, d // 2), generator=g.g, dtype=torch.uint8),
        gate_up_scale=torch.randint(118, 122, (e, 2 * inter, d // 32), generator=g.g, dtype=torch.uint8),
        down=torch.randint(0, 256, (e, d, inter // 2), generator=g.g, dtype=torch.uint8),
        down_scale=torch.randint(118, 122, (e, d, inter // 32), generator=g.g, dtype=torch.uint8),
        limit=1.0, act=g.r.choice(["fp8", "bf16"]))
    yield "quant_linear", ops.quant_linear, dict(
        x=g.randn(t, 128), weight=ops.weight_tiles((g.randn(64, 128) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)),
        scale=torch.rand(1, 1, generator=g.g) + 0.5, layout="tiles", act=g.r.choice(["fp8", "bf16"]))
    yield "indexer_scores", ops.indexer_scores, dict(
        q=g.randn(t, 4, 128), weights=g.randn(t, 4), key_cache=keycache,
        block_table=torch.tensor([[0, 1]], dtype=torch.int32), seq_ids=torch.zeros(t, dtype=torch.int64),
        visible=torch.full((t,), g.r.randint(0, 128), dtype=torch.int64), width=g.r.choice([None, 128, 200]))
    experts = g.r.randint(2, 9)
    yield "moe_route", ops.moe_route, dict(
        logits=g.randn(t, experts), k=g.r.randint(1, 2), scale=g.r.choice([1.0, 2.5]), bias=g.randn(experts),
        norm=g.chance(0.5))
    yield "moe_route", ops.moe_route, dict(
        logits=g.randn(t, experts), k=2, scale=1.0, table=torch.randint(0, experts, (11, 2), generator=g.g),
        ids=torch.randint(0, 11, (t,), generator=g.g), norm=g.chance(0.5))
    yield "linear_rows", ops.linear_rows, dict(x=g.randn(min(t, ops.MAX_LINEAR_ROWS), 64), weight=g.randn(24, 64),
                                               out_dtype=g.r.choice([None, torch.float32, torch.bfloat16]))
    yield "swiglu", ops.swiglu, dict(gate=g.randn(t, 48), up=g.randn(t, 48), limit=g.r.choice([7.0, math.inf]))
    b = g.r.randint(1, 3)
    yield "step_rows", ops.step_rows, dict(
        positions=torch.randint(0, 300, (t,), generator=g.g), token_seq=torch.randint(0, b, (t,), generator=g.g),
        origins=torch.zeros(b, dtype=torch.int64), window_table=torch.randint(0, 4, (b, 2), generator=g.g,
                                                                              dtype=torch.int32),
        window=g.r.choice([8, 128]), hca_table=torch.randint(0, 4, (b, 1), generator=g.g, dtype=torch.int32),
        hca_ratio=g.r.choice([4, 128]), hca_width=g.r.choice([0, 3, 64]))
    yield "sample_gumbel", ops.sample_gumbel, dict(
        logits=g.randn(b, 33), temperature=torch.rand(b, generator=g.g),
        seeds=torch.randint(0, 1 << 40, (b,), generator=g.g), steps=torch.randint(0, 100, (b,), generator=g.g))
    fp4 = torch.randint(0, 256, (64, 64), generator=g.g, dtype=torch.uint8)
    yield "weight_tiles", ops.weight_tiles, dict(weight=fp4)
    yield "weight_rows", ops.weight_rows, dict(weight=fp4)
    yield "attention_kernel", ops.attention_kernel, dict(device="cuda")
    yield "warm_up", ops.warm_up, dict(device="cuda")


def mutate(g: Gen, kw: dict) -> None:
    """One or two arguments of ``kw`` replaced by malformed values, in place."""
    for _ in range(g.r.choice([1, 1, 1, 2])):
        key = g.r.choice(list(kw))
        v = kw[key]
        if key == "derotate" and v is not None and g.chance(0.5):
            pos, inv = v
            kw[key] = g.r.choice([(pos, None), (None, inv), (g.bad_tensor(pos), inv), (pos, g.bad_tensor(inv)), pos])
            g.tags.add("derotate-none" if None in kw[key] else "derotate")
        elif isinstance(v, torch.Tensor):
            kw[key] = g.bad_tensor(v)
        elif isinstance(v, bool):
            kw[key] = g.r.choice([None, 2, "yes"])
            g.tags.add("bool")
        elif isinstance(v, int):
            kw[key] = g.bad_int(v)
        elif isinstance(v, str):
            kw[key] = g.bad_str(v) if key != "device" else g.r.choice(["cpu", "meta", 0, -1, 99, "cuda:7", None, "x"])
        elif isinstance(v, float):
            kw[key] = g.r.choice([float("nan"), -1.0, float("inf"), 0.0, "x"])
            g.tags.add("float")
        elif v is None:
            kw[key] = g.bad_tensor(g.randn(3))


def op_case(g: Gen):
    cases = list(op_cases(g))
    name, fn, kw = cases[g.r.randrange(len(cases))]
    if name == "sparse_attention" and kw["extra_cache"] is not None:
        kw["extra_indices"] = torch.randint(-1, 100, kw["indices"].shape, generator=g.g)
    mutate(g, kw)
    if g.chance(0.15):  # aliasing: an in-place op's destination shared with an input
        if name == "copy_rows":
            kw["src"] = kw["dst"]
            g.tags.add("alias")
        elif name == "compress" and isinstance(kw.get("kv_state"), torch.Tensor) and kw["kv_state"].numel() > 0:
            kw["score_state"] = kw["kv_state"][...]  # a view of the same memory
            g.tags.add("alias")
        elif (name == "kv_write" and isinstance(kw.get("cache"), torch.Tensor) and kw["cache"].dtype == torch.uint8
              and kw["cache"].is_contiguous() and kw["cache"].numel() >= 8 * 2048):
            rows = min(kw["entries"].shape[0] if isinstance(kw["entries"], torch.Tensor) and kw["entries"].dim() else 1, 8)
            rows = max(rows, 1)  # no bytes, no alias
            kw["entries"] = kw["cache"].view(-1)[: rows * 2048].view(torch.float32).view(rows, 512)
            g.tags.add("alias")
    if name == "sparse_attention" and g.chance(0.15):
        t_ = kw["q"].shape[0] if isinstance(kw["q"], torch.Tensor) and kw["q"].dim() else 1
        kw["derotate"] = g.r.choice([(torch.arange(t_), None), (None, torch.rand(16, generator=g.g))])
        g.tags.add("derotate-none")
    g.tags.add(f"op:{name}")
    tensors = [v for v in kw.values() if isinstance(v, torch.Tensor)]
    tensors += [x for v in kw.values() if isinstance(v, tuple) for x in v if isinstance(x, torch.Tensor)]
    if any(t.is_meta for t in tensors) and not all(t.is_meta for t in tensors):
        g.tags.add("meta-mixed")
    return f"ops.{name}({describe(kw)})", lambda: fn(**kw), name


# -- the drop-in entry points (dsv4rs.compat) -------------------------------------------------------


def compat_cases(g: Gen):
    """Baseline valid arguments of every entry point of :mod:`dsv4rs.compat`, in FlashMLA's and
    DeepGEMM's layouts: ``(name, function, kwargs)``."""
    from dsv4rs.compat import deep_gemm, flash_mla

    b, s_q, h, topk = g.r.randint(1, 2), g.r.randint(1, 2), g.r.choice([1, 2, 16]), g.r.randint(1, 8)
    pages = 2
    cache = _kv_cache(g).view(pages, PAGE, 1, -1)  # FlashMLA's V4 layout: [blocks, page, 1, 584]
    lengths = torch.randint(0, topk + 2, (b,), generator=g.g, dtype=torch.int32)
    yield "get_mla_metadata", flash_mla.get_mla_metadata, dict(cache_seqlens=lengths, num_q_tokens_per_head_k=s_q * h)
    extra = g.chance(0.3)
    yield "flash_mla_with_kvcache", flash_mla.flash_mla_with_kvcache, dict(
        q=g.randn(b, s_q, h, 512).bfloat16(), k_cache=cache, block_table=None, cache_seqlens=None, head_dim_v=512,
        tile_scheduler_metadata=flash_mla.get_mla_metadata()[0], num_splits=None,
        softmax_scale=g.r.choice([None, 0.04]), causal=False, is_fp8_kvcache=True,
        indices=torch.randint(-1, pages * PAGE, (b, s_q, topk), generator=g.g, dtype=torch.int32),
        attn_sink=g.randn(h) if g.chance(0.5) else None, extra_k_cache=cache if extra else None,
        extra_indices_in_kvcache=torch.randint(-1, pages * PAGE, (b, s_q, 3), generator=g.g, dtype=torch.int32)
        if extra else None, topk_length=lengths if g.chance(0.5) else None,
        extra_topk_length=torch.randint(0, 4, (b,), generator=g.g, dtype=torch.int32) if extra else None)
    s_kv = g.r.randint(1, 100)
    yield "flash_mla_sparse_fwd", flash_mla.flash_mla_sparse_fwd, dict(
        q=g.randn(s_q, h, 512).bfloat16(), kv=g.randn(s_kv, 1, 512).bfloat16(),
        indices=torch.randint(-1, s_kv, (s_q, 1, topk), generator=g.g, dtype=torch.int32), sm_scale=0.04, d_v=512,
        attn_sink=g.randn(h) if g.chance(0.5) else None,
        topk_length=torch.randint(0, topk + 1, (s_q,), generator=g.g, dtype=torch.int32) if g.chance(0.5) else None)
    next_n, heads = g.r.randint(1, 2), g.r.choice([1, 4])
    fmt = g.r.choice(["fp8", "fp4"])
    keys = ops.quantize_index_keys(g.randn(pages * PAGE, 128), fmt).view(pages, PAGE, 1, -1)
    fp8_keys = ops.quantize_index_keys(g.randn(pages * PAGE, 128), "fp8").view(pages, PAGE, 1, -1)
    ctx = (torch.randint(0, pages * PAGE + 1, (b, next_n), generator=g.g, dtype=torch.int32) if g.chance(0.5)
           else torch.randint(next_n, pages * PAGE + 1, (b,), generator=g.g, dtype=torch.int32))
    table = torch.randint(0, pages, (b, pages), generator=g.g, dtype=torch.int32)
    q8 = g.randn(b, next_n, heads, 128).to(torch.float8_e4m3fn)
    weights = g.randn(b * next_n, heads)
    yield "get_paged_mqa_logits_metadata", deep_gemm.get_paged_mqa_logits_metadata, dict(
        context_lens=ctx, block_kv=PAGE, num_sms=g.r.choice([1, 132]))
    yield "fp8_paged_mqa_logits", deep_gemm.fp8_paged_mqa_logits, dict(
        q=q8, kv_cache=fp8_keys, weights=weights, context_lens=ctx, block_table=table,
        schedule_meta=torch.zeros(133, 2, dtype=torch.int32), max_context_len=pages * PAGE,
        clean_logits=g.chance(0.5), indices=None)
    yield "paged_indexer_topk", deep_gemm.paged_indexer_topk, dict(
        q=q8 if fmt == "fp8" and g.chance(0.5) else q8.float(), kv_cache=keys, weights=weights, context_lens=ctx,
        block_table=table, topk=g.r.randint(1, 16), return_scores=g.chance(0.5), physical=g.chance(0.5))


class UnnamedError(Exception):
    """A drop-in entry point's error whose message does not start with an argument's name."""


class HandleError(Exception):
    """A FlashMLA scheduling handle that a refused call left set up (a later, valid call of other
    shapes would then be refused)."""


def compat_case(g: Gen):
    cases = list(compat_cases(g))
    name, fn, kw = cases[g.r.randrange(len(cases))]
    if name == "flash_mla_with_kvcache" and g.chance(0.1):  # a handle set up by calls of other shapes
        used = kw["tile_scheduler_metadata"]
        used.have_initialized = True
        used.config = type(used).Config(b=99, s_q=1, h_q=1, page_block_size=PAGE, h_k=1, causal=False,
                                        is_fp8_kvcache=True, topk=1, extra_page_block_size=None, extra_topk=None)
        g.tags.add("handle-used")
    else:
        mutate(g, kw)
    g.tags.add(f"op:{name}")
    meta = kw.get("tile_scheduler_metadata")
    fresh = getattr(meta, "have_initialized", None) is False

    def call():
        try:
            return fn(**kw)
        except Exception as e:
            if fresh and meta.have_initialized:
                raise HandleError(f"{name} was refused but set up tile_scheduler_metadata") from None
            first = re.match(r"\w*", str(e)).group(0)
            if isinstance(e, (ValueError, RuntimeError)) and first not in kw:
                raise UnnamedError(f"{type(e).__name__}: {e}") from None
            raise

    return f"compat.{name}({describe(kw)})", call, name


def check_result(result: object, tags: set[str]) -> str | None:
    """The defect class of a call that returned ``result`` without an error, or None: a silent
    success where the call cannot have done what it was asked, or NaN out of finite input."""
    if "meta-mixed" in tags:  # meta and real tensors in one call: nothing was computed or written
        return "meta-mixed-silent"
    if "derotate-none" in tags and "derotate" not in tags:
        return "derotate-half-silent"
    if "alias" in tags and tags & {"op:kv_write", "op:compress"}:
        return "alias-silent"
    outs = result if isinstance(result, tuple) else (result,)
    if not tags & {"nan", "tensor-dtype", "meta-mixed"}:
        for t in outs:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_meta and torch.isnan(t).any():
                op = next((x.removeprefix("op:") for x in sorted(tags) if x.startswith("op:")), "other")
                if "cache-bytes" in tags:  # random bytes: BF16 NaNs, FP8 NaN codes, UE8M0 scale codes 0xff
                    if op in ("kv_read", "index_key_read"):
                        continue  # the decoders give what the bytes hold (the consumers refuse such rows)
                    return "corrupt-cache-rows"
                return f"nan-output:{op}"
    if isinstance(result, dcache.Footprint) and "wrap-check" in tags:
        return None  # checked by the case itself
    return None


def describe(kw: dict) -> str:
    def one(v):
        if isinstance(v, torch.Tensor):
            return (f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)}"
                    f"{'@meta' if v.is_meta else ''}{'' if v.is_contiguous() else ' noncontig'}")
        if isinstance(v, tuple):
            return "(" + ", ".join(one(x) for x in v) + ")"
        r = repr(v)
        return r if len(r) < 60 else r[:57] + "..."

    return ", ".join(f"{k}={one(v)}" for k, v in kw.items())


# -- the cache manager ---------------------------------------------------------------------------------


def cache_case(g: Gen):
    ratios = [0, 4, 128, 4, 0]
    pages = {"window": 8, "csa": 8, "hca": 8, "state": 4}
    what = g.r.choice(["config", "manager", "calls", "calls", "calls", "layout"])
    if what == "config":
        kw = dict(compress_ratios=ratios, window=128, index_format="fp4", main_format="fp8")
        key = g.r.choice(list(kw))
        if key == "compress_ratios":
            kw[key] = g.r.choice([[], [g.bad_int(4)], [0, 4, "x"], 5, [1.5], [4] * g.r.choice([1, 10_000]), None])
            g.tags.add("config-ratios")
        elif key == "window":
            kw[key] = g.bad_int(128)
        else:
            kw[key] = g.bad_str(kw[key])
        g.tags.add("cache:config")
        return f"CacheConfig({describe(kw)})", lambda: dcache.CacheConfig(**kw).footprint(1000), "config"
    if what == "layout":
        cfg = dcache.CacheConfig(ratios, window=g.r.choice([1, 128, 1000, 2**40, 2**62]))
        if cfg.window > 1000:
            g.tags.add("huge-window")
        method = g.r.choice(["footprint", "bytes_per_token", "sequences_that_fit", "longest_context",
                             "pages_for_budget", "from_budget"])
        a, b = g.bad_int(1000), g.bad_int(1 << 30)
        g.tags.add(f"cache:{method}")
        def footprint():
            f = cfg.footprint(a)
            if isinstance(a, int) and a >= 2:  # more tokens never hold fewer bytes: no wrapped arithmetic
                half = cfg.footprint(a // 2)
                if any(x < y for x, y in zip(dataclasses.astuple(f), dataclasses.astuple(half))):
                    raise WrapError(f"footprint({a}) = {f} holds less than footprint({a // 2}) = {half}")
            return f

        calls = {
            "footprint": footprint, "bytes_per_token": lambda: cfg.bytes_per_token(a),
            "sequences_that_fit": lambda: cfg.sequences_that_fit(a, b), "longest_context": lambda: cfg.longest_context(b),
            "pages_for_budget": lambda: cfg.pages_for_budget(b, a),
            "from_budget": lambda: dcache.KVCacheManager.from_budget(cfg, b, a).pool_footprint(),
        }
        return f"CacheConfig(window={cfg.window}).{method}({a!r}, {b!r})", calls[method], method
    cfg = dcache.CacheConfig(ratios)
    if what == "manager":
        bad = dict(pages)
        key = g.r.choice([*pages, "extra"])
        bad[key] = g.bad_int(pages.get(key, 1))
        if key != "extra" and isinstance(bad[key], int) and bad[key] >= 2**31:
            g.tags.add("huge-pages")
        g.tags.add("cache:manager")
        return f"KVCacheManager(pages={bad})", lambda: dcache.KVCacheManager(cfg, bad).check(), "manager"
    # a valid history, then one malformed call
    m = dcache.KVCacheManager(cfg, pages)
    seqs = [m.add_sequence()[0] for _ in range(g.r.randint(1, 3))]
    m.append(seqs, [[g.r.randrange(1000) for _ in range(g.r.randint(1, 70))] for _ in seqs])
    s = g.r.choice(seqs)
    method = g.r.choice(["add_sequence", "lookup_prefix", "append", "fork", "release", "length", "page_tables",
                         "physical_rows", "sequence_footprint", "refcounts"])
    g.tags.add(f"cache:{method}")
    bad_seq = g.bad_int(s)
    family = g.r.choice(["window", "csa", "hca", "state"])
    if method in ("add_sequence", "lookup_prefix"):
        prompt = g.r.choice([[g.bad_int(5)], [1, 2, g.bad_int(3)], torch.tensor([1.5, 2.0]), "abc", 5, None,
                             np.array([-1, 2])])
        g.tags.add("prompt")
        return f"m.{method}({prompt!r:.60})", lambda: getattr(m, method)(prompt), method
    if method == "append":
        choice = g.r.randrange(5)
        if choice == 0:
            args = ([bad_seq], [[1, 2]])
        elif choice == 1:
            args = ([s], [[g.bad_int(1)]])
            g.tags.add("token")
        elif choice == 2:
            args = ([s, s], [[1], [2]])
            g.tags.add("repeat")
        elif choice == 3:
            args = ([s], [[1], [2]])
        else:
            args = (s, [1, 2])
            g.tags.add("int-type")
        return f"m.append{args!r:.80}", lambda: m.append(*args), method
    if method in ("fork", "release", "length", "sequence_footprint"):
        return f"m.{method}({bad_seq!r})", lambda: getattr(m, method)(bad_seq), method
    if method == "refcounts":
        fam = g.bad_str(family)
        return f"m.refcounts({fam!r})", lambda: m.refcounts(fam), method
    if method == "page_tables":
        choice = g.r.randrange(3)
        if choice == 0:
            width = g.bad_int(4)
            g.tags.add("width")
            return f"m.page_tables([{s}], {family!r}, width={width!r})", lambda: m.page_tables([s], family, width), method
        if choice == 1:
            return f"m.page_tables([{bad_seq!r}], {family!r})", lambda: m.page_tables([bad_seq], family), method
        fam = g.bad_str(family)
        return f"m.page_tables([{s}], {fam!r})", lambda: m.page_tables([s], fam), method
    logical = torch.randint(-5, 200, (2, 3), generator=g.g)
    choice = g.r.randrange(3)
    if choice == 0:
        logical = g.bad_tensor(logical)
        ids = [s, s]
    elif choice == 1:
        ids = [s, bad_seq]
    else:
        ids = [s]
        g.tags.add("shape")
    fam = family if family != "state" else "csa"
    return (f"m.physical_rows({ids!r}, {fam!r}, {describe({'logical': logical})})",
            lambda: m.physical_rows(ids, fam, logical), method)


# -- the loader ------------------------------------------------------------------------------------


def tiny_checkpoint(path: str) -> None:
    from safetensors.torch import save_file

    from dsv4rs.model import DeepseekV4, V4Config, init_random
    from dsv4rs.model.config import CSA, HCA, SWA

    cfg = V4Config.tiny(vocab_size=64, hidden_size=32, num_hidden_layers=3, layer_types=(SWA, CSA, HCA),
                        mlp_layer_types=("hash_moe", "moe", "moe"), num_attention_heads=2, o_groups=1,
                        q_lora_rank=16, o_lora_rank=16, moe_intermediate_size=32, n_routed_experts=4,
                        index_n_heads=2, index_topk=4)
    model = init_random(DeepseekV4(cfg), seed=0)
    os.makedirs(path)
    tensors = {k: v.detach().contiguous() for k, v in model.checkpoint_tensors().items()}
    half = sorted(tensors)
    save_file({k: tensors[k] for k in half[: len(half) // 2]}, os.path.join(path, "a.safetensors"))
    save_file({k: tensors[k] for k in half[len(half) // 2 :]}, os.path.join(path, "b.safetensors"))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {k: "a.safetensors" if i < len(half) // 2 else "b.safetensors"
                                  for i, k in enumerate(half)}}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf_dict() | {"model_type": "deepseek_v4"}, f)


def loader_case(g: Gen, base: str, work: str):
    from safetensors.torch import load_file, save_file

    from dsv4rs.model.loader import load_checkpoint

    path = os.path.join(work, "ckpt")
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(base, path)
    shard = os.path.join(path, g.r.choice(["a.safetensors", "b.safetensors"]))
    what = g.r.choice(["tensor", "tensor", "tensor", "rename", "scale", "config", "index", "bytes"])
    g.tags.add(f"loader:{what}")
    desc = what
    if what in ("tensor", "rename", "scale"):
        tensors = load_file(shard)
        key = g.r.choice(sorted(tensors))
        if what == "tensor":
            v = g.bad_tensor(tensors[key])
            if isinstance(v, torch.Tensor) and not v.is_meta:
                tensors[key] = v.contiguous().clone()
            else:
                del tensors[key]
            desc = f"{key} -> {describe({'t': v})}"
        elif what == "rename":
            new = g.r.choice([key.replace("self_attn", "attn"), key.replace("model.", ""), key + "x",
                              key.replace("mlp", "ffn"), "layers.0.ffn.experts.1.w1.weight", "mtp.0.norm.weight"])
            tensors[new] = tensors[key].clone() if g.chance(0.5) else tensors.pop(key)
            desc = f"{key} -> also/instead {new}"
        else:
            sk = key.removesuffix("weight") + "scale" if key.endswith("weight") else key + "_scale_inv"
            tensors[sk] = g.bad_tensor(torch.ones(2, 2)) if g.chance(0.5) else torch.ones(1, dtype=torch.int32)
            if not isinstance(tensors[sk], torch.Tensor) or tensors[sk].is_meta:
                tensors[sk] = torch.zeros(1)
            tensors[sk] = tensors[sk].contiguous().clone()
            if g.chance(0.5):
                tensors[key] = tensors[key].float().to(torch.float8_e4m3fn) if tensors[key].is_floating_point() else tensors[key]
            desc = f"scale {sk} for {key}"
        save_file(tensors, shard)
    elif what == "config":
        with open(os.path.join(path, "config.json")) as f:
            d = json.load(f)
        key = g.r.choice(sorted(d))
        v = g.r.choice([g.bad_int(1), None, "x", [], {}, [1] * 5, -1.5, float("nan"), 1e300])
        d[key] = v if isinstance(v, (int, float, str, list, dict, type(None))) else str(v)
        desc = f"config {key} = {d[key]!r:.40}"
        with open(os.path.join(path, "config.json"), "w") as f:
            f.write(json.dumps(d))
    elif what == "index":
        with open(os.path.join(path, "model.safetensors.index.json")) as f:
            d = json.load(f)
        key = g.r.choice(sorted(d["weight_map"]))
        d["weight_map"][key] = g.r.choice(["b.safetensors", "a.safetensors", "c.safetensors", "", None, 5, "../x"])
        desc = f"index {key} -> {d['weight_map'][key]!r}"
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            f.write(json.dumps(d))
    else:
        data = bytearray(open(shard, "rb").read())
        for _ in range(g.r.randint(1, 8)):
            i = g.r.randrange(min(len(data), 4096)) if g.chance(0.7) else g.r.randrange(len(data))
            data[i] = g.r.randrange(256)
        if g.chance(0.3):
            data = data[: g.r.randrange(len(data))]
        with open(shard, "wb") as f:
            f.write(data)
        desc = f"bytes of {os.path.basename(shard)}"
    return f"load_checkpoint({desc})", lambda: load_checkpoint(path, progress=False), "loader"


# -- running -------------------------------------------------------------------------------------------


def make_case(seed: int, batch: int, i: int, base: str, work: str):
    """Case ``i``: a description, the call and its tags. A mutation the generator cannot apply
    (say, a second one to an argument the first made a list) draws the case again."""
    for attempt in range(20):
        g = Gen(f"{seed}-{batch}-{i}-{attempt}")
        kind = g.r.choices(["op", "cache", "loader", "compat"], weights=[6, 3, 1, 2])[0]
        try:
            if kind == "op":
                desc, call, _ = op_case(g)
            elif kind == "compat":
                desc, call, _ = compat_case(g)
            elif kind == "cache":
                desc, call, _ = cache_case(g)
            else:
                desc, call, _ = loader_case(g, base, work)
        except (TypeError, ValueError, IndexError, RuntimeError, OverflowError, AttributeError):
            if attempt == 19:
                raise
            continue
        return desc, call, g.tags
    raise AssertionError("unreachable")


class WrapError(Exception):
    """A cache-geometry result that can only come from wrapped integer arithmetic."""


def classify(e: BaseException, tags: set[str]) -> str | None:
    """The defect class of an exception, or None when the API may raise it."""
    msg = str(e)
    if isinstance(e, WrapError):
        return "cache-arithmetic-wrap"
    if isinstance(e, HandleError):
        return "compat-handle-set-on-error"
    if isinstance(e, UnnamedError):
        return "compat-error-names-no-argument"
    if "internal error" in msg:
        return "panic"
    if isinstance(e, MemoryError) and not isinstance(e, dsv4rs.OutOfPagesError):
        return "allocation"
    if isinstance(e, RuntimeError) and ("can't allocate memory" in msg or "out of memory" in msg.lower()):
        constructors = {"op:new_kv_cache", "op:new_index_key_cache", "op:compressor_state"}
        ops_ = sorted(t.removeprefix("op:") for t in tags if t.startswith("op:"))
        return None if tags & constructors else f"allocation:{ops_[0] if ops_ else 'other'}"
    if isinstance(e, OverflowError):
        return "binding-conversion"
    if not isinstance(e, ALLOWED):
        return f"exception-type-{type(e).__name__}"
    if any(t.startswith("loader:") for t in tags) and not isinstance(e, (CheckpointError, FileNotFoundError)):
        return "loader-exception-type"
    return None


def main() -> int:
    seed, batch, start, count, work = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    only = int(sys.argv[sys.argv.index("--only") + 1]) if "--only" in sys.argv else None
    include_known = "--include-known" in sys.argv
    seconds = float(sys.argv[sys.argv.index("--seconds") + 1]) if "--seconds" in sys.argv else float("inf")
    import time

    stop = time.monotonic() + seconds
    base = os.path.join(work, "base")
    if not os.path.exists(base):
        tiny_checkpoint(base)
    torch.set_num_threads(1)
    used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + MEMORY_BOUND, used + MEMORY_BOUND))
    for i in range(start, start + count) if only is None else [only]:
        if time.monotonic() > stop:  # out of the parent's time budget
            print(f"BUDGET {i}", flush=True)
            continue
        try:
            desc, call, tags = make_case(seed, batch, i, base, work)
        except Exception as e:  # the generator itself failed: a bug of this test
            print(f"GENERATOR {i} {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
            return 3
        cls = known_class(tags)
        if cls is not None and not include_known:
            print(f"KNOWN {i} {cls}", flush=True)
            continue
        print(f"START {i} [{' '.join(sorted(tags))}] {desc}", flush=True)
        try:
            result = call()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001  (PanicException is a BaseException)
            defect = classify(e, tags)
            line = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            print(f"DEFECT {i} {defect}: {line}" if defect else f"RAISED {i} {line}", flush=True)
            continue
        defect = check_result(result, tags)
        if defect:
            print(f"DEFECT {i} {defect}: returned {type(result).__name__} without an error", flush=True)
            continue
        print(f"OK {i}", flush=True)
    print(f"MAXRSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
