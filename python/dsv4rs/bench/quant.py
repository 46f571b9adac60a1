"""Quantized-weight suites of ``dsv4rs bench``: the fused MoE over MXFP4 experts (``moe``) and the
FP8 block-scaled linears (``linear``) at V4-Flash shapes (scaled down on the CPU).

Floors count the bytes a call must read: for the MoE the FP4 weights and UE8M0 scales of the
experts the routing touches (plus activations), for a linear its FP8 weight and scales. The eager
column is torch with bfloat16 weights (the MoE as the model's grouped bf16 path,
``Experts._grouped``; a linear as ``F.linear`` on the dequantized weight). Under the table each
case also names torch's own FP8 kernel where this torch offers it on this GPU
(``torch._scaled_grouped_mm`` with row-wise scales for the MoE, ``torch._scaled_mm`` with 1x128 /
128x128 block scales for a linear), timed on inputs already quantized, or why it could not run.
On a GPU a linear's decode rows (at most ``DECODE_ROWS``) are timed as calls back to back in one
CUDA graph, each on its own copy of the weights (``Bench.per_call_ms``): the cost of a call inside
a captured step, without a graph launch of its own per call and without L2 reuse.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dsv4rs import ops
from dsv4rs.bench.harness import Bench, Case, Row
from dsv4rs.model.config import V4Config
from dsv4rs.model.layers.moe import Experts


def _fp4_experts(b: Bench, e: int, n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 experts ``[e, n, k/2]`` and UE8M0 scales around 2^-6 (values up to ~0.1)."""
    data = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, generator=gen).to(b.device)
    scale = torch.randint(119, 123, (e, n, k // 32), dtype=torch.uint8, generator=gen).to(b.device)
    return data, scale


def _fp4_dequant(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The experts' values (for the bf16 comparison), one expert at a time on the device."""
    from dsv4rs.model.loader import dequantize_fp4

    out = torch.empty(*data.shape[:-1], 2 * data.shape[-1], dtype=dtype, device=data.device)
    for i in range(data.shape[0]):
        out[i] = dequantize_fp4(data[i], scale[i], "bench experts").to(dtype)
    return out


def _scaled_grouped_mm(x: torch.Tensor, idx: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, b: Bench
                       ) -> tuple[float | None, str]:
    """torch's FP8 grouped GEMM (row-wise scales) over the same routing: gate-up then down, on
    inputs quantized beforehand (its time leaves out quantization, sorting and combining)."""
    fn = getattr(torch, "_scaled_grouped_mm", None)
    if fn is None or not b.gpu:
        return None, "torch._scaled_grouped_mm: not in this torch" if fn is None else "torch._scaled_grouped_mm: GPU only"
    try:
        e = gate_up.shape[0]
        flat = idx.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=e).to(torch.int32)
        offs = counts.cumsum(0, dtype=torch.int32)
        rows = x[order // idx.shape[1]]
        a = rows.to(torch.float8_e4m3fn)
        wg = gate_up.to(torch.float8_e4m3fn).transpose(-2, -1)  # [E, d, 2I], column-major per expert
        wd = down.to(torch.float8_e4m3fn).transpose(-2, -1)
        sa = torch.ones(a.shape[0], device=x.device)
        sg = torch.ones(e, gate_up.shape[1], device=x.device)
        sd = torch.ones(e, down.shape[1], device=x.device)
        h = torch.empty(a.shape[0], down.shape[2], dtype=torch.float8_e4m3fn, device=x.device)
        sh = torch.ones(a.shape[0], device=x.device)

        def run(i: int) -> None:
            fn(a, wg, sa, sg, offs=offs, out_dtype=torch.bfloat16)
            fn(h, wd, sh, sd, offs=offs, out_dtype=torch.bfloat16)

        run(0)
        return b.median_ms(run, 1, iters=10), "torch._scaled_grouped_mm (FP8 e4m3 weights, row-wise scales)"
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as err:
        return None, f"torch._scaled_grouped_mm: {str(err).splitlines()[0][:120]}"


def moe(b: Bench) -> Iterator[Case]:
    """The routed experts of one MoE layer, decode batches and prefill, FP8 activations."""
    if b.gpu:
        cfg = V4Config.v4_flash()
        d, inter, e, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    else:
        d, inter, e, k = 256, 128, 16, 2
        cfg = V4Config.tiny(hidden_size=d, moe_intermediate_size=inter, n_routed_experts=e, num_experts_per_tok=k)
    batches = b.pick([1, 8, 32, 64, 128, 512, 4096, 16384], [1, 32, 128], [1, 8])
    state: dict = {}

    def setup() -> dict:
        if not state:
            gen = torch.Generator().manual_seed(0)
            state["gu"] = _fp4_experts(b, e, 2 * inter, d, gen)
            state["dn"] = _fp4_experts(b, e, d, inter, gen)
            dtype = torch.bfloat16 if b.gpu else torch.float32
            with torch.device("meta"):
                ex = Experts(cfg)
            ex.gate_up_proj = nn.Parameter(_fp4_dequant(*state["gu"], dtype), requires_grad=False)
            ex.down_proj = nn.Parameter(_fp4_dequant(*state["dn"], dtype), requires_grad=False)
            state["bf16"] = ex
        return state

    per_expert = 2 * inter * d // 2 + 2 * inter * d // 32 + d * inter // 2 + d * inter // 32
    for batch in batches:

        def run(batch: int = batch) -> Row:
            s = setup()
            (gu, gus), (dn, dns), ex = s["gu"], s["dn"], s["bf16"]
            dtype = torch.bfloat16 if b.gpu else torch.float32
            xs = [b.randn(batch, d, dtype=dtype) for _ in range(2)]
            idx = torch.rand(batch, e, device=b.device).topk(k, dim=-1).indices
            w = torch.rand(batch, k, device=b.device)
            touched = int(torch.unique(idx).numel())
            ms = b.median_ms(lambda i: ops.moe_experts(xs[i], idx, w, gu, gus, dn, dns, cfg.swiglu_limit), 2)
            eager = b.median_ms(lambda i: ex(xs[i], idx, w), 2, iters=10 if b.gpu else 3, warmup=1)
            moved = touched * per_expert + batch * d * 2 * xs[0].element_size()
            flops = 6.0 * batch * k * inter * d
            tms, what = _scaled_grouped_mm(xs[0], idx, ex.gate_up_proj.data, ex.down_proj.data, b)
            other = f"{tms:.3f} ms ({what})" if tms is not None else what
            kind = "decode" if batch <= 128 else "prefill"
            name = f"moe flash {kind} T={batch}" if b.gpu else f"moe {kind} T={batch}"
            return Row(name, ms, moved, flops, eager, note=f"  {name}: {touched} experts touched; beside: {other}")

        def run_tiles(batch: int = batch) -> Row:
            """The same call on the experts in ``ops.weight_tiles``'s layout (the GPU's; the CPU
            converts back to rows each call, so there it measures that)."""
            s = setup()
            if "tiles" not in s:
                s["tiles"] = ops.weight_tiles(s["gu"][0]), ops.weight_tiles(s["dn"][0])
            (gu, gus), (dn, dns), (gut, dnt) = s["gu"], s["dn"], s["tiles"]
            dtype = torch.bfloat16 if b.gpu else torch.float32
            xs = [b.randn(batch, d, dtype=dtype) for _ in range(2)]
            idx = torch.rand(batch, e, device=b.device).topk(k, dim=-1).indices
            w = torch.rand(batch, k, device=b.device)
            touched = int(torch.unique(idx).numel())
            ms = b.median_ms(lambda i: ops.moe_experts(xs[i], idx, w, gut, gus, dnt, dns, cfg.swiglu_limit,
                                                       layout="tiles"), 2)
            rows = b.median_ms(lambda i: ops.moe_experts(xs[i], idx, w, gu, gus, dn, dns, cfg.swiglu_limit), 2)
            moved = touched * per_expert + batch * d * 2 * xs[0].element_size()
            kind = "decode" if batch <= 128 else "prefill"
            name = f"moe flash {kind} T={batch} tiles" if b.gpu else f"moe {kind} T={batch} tiles"
            return Row(name, ms, moved, 6.0 * batch * k * inter * d, rows,
                       note=f"  {name}: {touched} experts touched; beside: the same call on rows")

        def run_route(batch: int = batch) -> Row:
            """The routing of the same tokens from the router's logits (bfloat16, as a bfloat16
            model's router computes them): ``ops.moe_route`` beside the torch form it replaces."""
            dtype = torch.bfloat16 if b.gpu else torch.float32
            logits = [b.randn(batch, e, dtype=dtype) for _ in range(2)]
            bias = b.randn(e) * 0.01
            scale = cfg.routed_scaling_factor

            def torch_form(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                scores = F.softplus(x).sqrt()
                idx = torch.topk(scores + bias.to(scores.dtype), k, dim=-1).indices
                w = scores.gather(1, idx)
                return idx, w / (w.sum(-1, keepdim=True) + 1e-20) * scale

            ms = b.median_ms(lambda i: ops.moe_route(logits[i], k, scale, bias=bias), 2)
            eager = b.median_ms(lambda i: torch_form(logits[i]), 2)
            moved = batch * e * logits[0].element_size() + e * 4 + batch * k * 12
            name = f"moe flash route T={batch}" if b.gpu else f"moe route T={batch}"
            return Row(name, ms, moved, 0.0, eager, note=f"  {name}: beside: the torch form (softplus, sqrt, topk, gather, "
                                                         "normalize), the same graph replay")

        def run_swiglu(batch: int = batch) -> Row:
            """The shared expert's clamped SwiGLU of the same tokens (its gate and up projections'
            outputs): ``ops.swiglu`` beside the torch form it replaces."""
            dtype = torch.bfloat16 if b.gpu else torch.float32
            width = inter * cfg.n_shared_experts
            gates = [b.randn(batch, width, dtype=dtype) * 4 for _ in range(2)]
            ups = [b.randn(batch, width, dtype=dtype) * 4 for _ in range(2)]
            lim = cfg.swiglu_limit

            def torch_form(i: int) -> torch.Tensor:
                return F.silu(gates[i].clamp(max=lim)) * ups[i].clamp(min=-lim, max=lim)

            ms = b.median_ms(lambda i: ops.swiglu(gates[i], ups[i], lim), 2)
            eager = b.median_ms(torch_form, 2)
            moved = 3 * batch * width * gates[0].element_size()
            name = f"moe flash shared swiglu T={batch}" if b.gpu else f"moe shared swiglu T={batch}"
            return Row(name, ms, moved, 0.0, eager, note=f"  {name}: beside: the torch form (two clamps, SiLU, product), "
                                                         "the same graph replay")

        yield Case("moe", f"T={batch}", run)
        if batch <= 128:
            yield Case("moe", f"T={batch} tiles", run_tiles)
            yield Case("moe", f"route T={batch}", run_route)
            yield Case("moe", f"shared swiglu T={batch}", run_swiglu)


def _fp8_weight(b: Bench, rows: int, cols: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    codes = (torch.randn(rows, cols, generator=gen) * 64).clamp(-448, 448).to(torch.float8_e4m3fn).to(b.device)
    scale = torch.exp2(torch.randint(-14, -10, (-(-rows // 128), -(-cols // 128)), generator=gen).float()).to(b.device)
    return codes, scale


def _block_scaled_mm(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, b: Bench) -> tuple[float | None, str]:
    """torch._scaled_mm with 1x128 activation and 128x128 weight block scales (DeepSeek's
    W8A8), on activations quantized beforehand."""
    if not b.gpu:
        return None, "torch._scaled_mm: GPU only"
    try:
        m, kdim = x.shape
        a = x.to(torch.float8_e4m3fn)
        sa = torch.ones(m, kdim // 128, device=x.device).t().contiguous().t()  # column-major, as torch asks
        torch._scaled_mm(a, w.t(), sa, ws, out_dtype=torch.bfloat16)
        ms = b.median_ms(lambda i: torch._scaled_mm(a, w.t(), sa, ws, out_dtype=torch.bfloat16), 1, iters=10)
        return ms, "torch._scaled_mm (1x128 / 128x128 block scales)"
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as err:
        return None, f"torch._scaled_mm block-scaled: {str(err).splitlines()[0][:120]}"


DECODE_ROWS = 64
"""Linear calls of at most this many rows are timed back to back (see :meth:`Bench.per_call_ms`)."""


def copies(weight_bytes: int, total: int = 256 << 20, most: int = 64) -> int:
    """Weight copies for back-to-back decode calls: enough to pass ``total`` bytes (well past an
    H200's 50 MB L2 cache), at least 2 and at most ``most``."""
    return max(2, min(most, -(-total // weight_bytes)))


def linear(b: Bench) -> Iterator[Case]:
    """V4-Flash's FP8 linears (W8A8), decode and prefill rows."""
    if b.gpu:
        shapes = [("q_a", 1024, 4096, 1), ("q_b", 32768, 1024, 1), ("kv", 512, 4096, 1), ("o_a", 8192, 4096, 8),
                  ("o_b", 4096, 8192, 1), ("shared gate", 2048, 4096, 1), ("shared down", 4096, 2048, 1)]
    else:
        shapes = [("q_b", 1024, 256, 1), ("o_a", 512, 256, 4)]
    rows_list = b.pick([1, 8, 64, 4096], [1, 64], [1, 8])
    gen = torch.Generator().manual_seed(1)
    for name, r, kdim, groups in shapes:
        for m in rows_list:

            def run(name: str = name, r: int = r, kdim: int = kdim, groups: int = groups, m: int = m) -> Row:
                w, ws = _fp8_weight(b, r, kdim, gen)
                dtype = torch.bfloat16 if b.gpu else torch.float32
                shape = (m, groups, kdim) if groups > 1 else (m, kdim)
                xs = [b.randn(*shape, dtype=dtype) for _ in range(2)]
                deq = (w.float() * ws.repeat_interleave(128, 0)[:r].repeat_interleave(128, 1)[:, :kdim]).to(dtype)

                def eager_call(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
                    if groups > 1:
                        return torch.einsum("tgi,goi->tgo", x, weight.view(groups, r // groups, kdim)).flatten(1)
                    return F.linear(x, weight)

                if b.gpu and m <= DECODE_ROWS:
                    # Decode: calls back to back in one graph (as in a captured step), each on its
                    # own copy of the weights, the copies together past the L2 cache.
                    n = copies(r * kdim)
                    wc = [(w.clone(), ws.clone()) for _ in range(n)]
                    ms = b.per_call_ms(lambda j: ops.quant_linear(xs[j % 2], *wc[j], groups=groups), n)
                    del wc
                    dc = [deq.clone() for _ in range(n)]
                    eager = b.per_call_ms(lambda j: eager_call(xs[j % 2], dc[j]), n)
                    del dc
                    how = f"; {n} calls back to back in one graph, each on its own weight copy"
                else:
                    ms = b.median_ms(lambda i: ops.quant_linear(xs[i], w, ws, groups=groups), 2)
                    eager = b.median_ms(lambda i: eager_call(xs[i], deq), 2, iters=10)
                    how = ""
                tms, what = (_block_scaled_mm(xs[0], w, ws, b) if groups == 1
                             else (None, "torch._scaled_mm: no grouped form"))
                other = f"{tms:.3f} ms ({what})" if tms is not None else what
                moved = r * kdim + ws.numel() * 4 + m * groups * kdim * 2 + m * r * 2
                label = f"fp8 linear {name} M={m}"
                return Row(label, ms, moved, 2.0 * m * r * kdim, eager, note=f"  {label}: beside: {other}{how}")

            yield Case("linear", f"{name} M={m}", run)

            def run_tiles(name: str = name, r: int = r, kdim: int = kdim, groups: int = groups, m: int = m) -> Row:
                """The decode call on the weight in ``ops.weight_tiles``'s layout, beside the same
                calls on rows (both back to back in one graph, each on its own weight copy)."""
                w, ws = _fp8_weight(b, r, kdim, gen)
                shape = (m, groups, kdim) if groups > 1 else (m, kdim)
                xs = [b.randn(*shape, dtype=torch.bfloat16) for _ in range(2)]
                n = copies(r * kdim)
                tc = [(ops.weight_tiles(w), ws.clone()) for _ in range(n)]
                ms = b.per_call_ms(lambda j: ops.quant_linear(xs[j % 2], *tc[j], groups=groups, layout="tiles"), n)
                tc.clear()
                rc = [(w.clone(), ws.clone()) for _ in range(n)]
                rows = b.per_call_ms(lambda j: ops.quant_linear(xs[j % 2], *rc[j], groups=groups), n)
                rc.clear()
                moved = r * kdim + ws.numel() * 4 + m * groups * kdim * 2 + m * r * 2
                label = f"fp8 linear {name} M={m} tiles"
                return Row(label, ms, moved, 2.0 * m * r * kdim, rows, note=f"  {label}: beside: the same calls on rows")

            if b.gpu and m <= DECODE_ROWS:
                yield Case("linear", f"{name} M={m} tiles", run_tiles)

    # The bfloat16 projections of a decode step's few rows: the router's logits and the packed
    # side projections (CSA: compressor W_kv, W_gate, indexer W_kv, W_gate, head weights; HCA:
    # the compressor's two), by ops.linear_rows beside torch's F.linear (cuBLAS).
    dense = ([("router", 256, 4096), ("csa side", 2624, 4096), ("hca side", 1024, 4096)] if b.gpu
             else [("router", 64, 256)])
    for name, r, kdim in dense:
        for m in [1, 8] if b.gpu else [1]:

            def run_rows(name: str = name, r: int = r, kdim: int = kdim, m: int = m) -> Row:
                dtype = torch.bfloat16 if b.gpu else torch.float32
                w = (torch.randn(r, kdim, generator=gen) / kdim ** 0.5).to(dtype).to(b.device)
                xs = [b.randn(m, kdim, dtype=dtype) for _ in range(2)]
                n = copies(r * kdim * w.element_size()) if b.gpu else 2
                wc = [w.clone() for _ in range(n)]
                ms = b.per_call_ms(lambda j: ops.linear_rows(xs[j % 2], wc[j]), n)
                eager = b.per_call_ms(lambda j: F.linear(xs[j % 2], wc[j]), n)
                wc.clear()
                moved = r * kdim * w.element_size() + m * kdim * w.element_size() + m * r * w.element_size()
                label = f"bf16 linear_rows {name} M={m}"
                return Row(label, ms, moved, 2.0 * m * r * kdim, eager,
                           note=f"  {label}: beside: F.linear; {n} calls back to back in one graph, each on its own weight copy")

            yield Case("linear", f"{name} rows M={m}", run_rows)
