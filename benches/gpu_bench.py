"""GPU microbenchmarks of the dsv4rs kernels beside torch eager, with roofline fractions.

Run on a machine with a CUDA GPU: ``python benches/gpu_bench.py [--quick]``. It first measures the
card's ceilings in the same run (device-to-device copy bandwidth, counting bytes read plus
written; a large bf16 matmul), then times every case with CUDA events (median of many runs after
warm-up, inputs rotated so the L2 cache does not hold them) and prints one table: time, GB/s,
TFLOP/s, the fraction of the roofline floor (max of bytes/bandwidth and flops/matmul rate), and
torch eager's time for the same computation.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from typing import Callable

import torch

from dsv4rs import ops


def median_ms(fn: Callable[[int], object], n_inputs: int, iters: int = 50, warmup: int = 5) -> float:
    """Median time of ``fn(i)`` over ``iters`` runs, cycling through ``n_inputs`` input sets."""
    for i in range(warmup):
        fn(i % n_inputs)
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i % n_inputs)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@dataclass
class Ceilings:
    copy_gbs: float
    matmul_tflops: float


def measure_ceilings() -> Ceilings:
    n = 1 << 30
    src, dst = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    ms = median_ms(lambda i: dst.copy_(src), 1, iters=20)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = median_ms(lambda i: a @ b, 1, iters=10)
    return Ceilings(copy_gbs=2 * n / ms / 1e6, matmul_tflops=2 * 8192**3 / mm / 1e9)


@dataclass
class Row:
    name: str
    ms: float
    bytes: float
    flops: float
    eager_ms: float | None

    def cells(self, c: Ceilings) -> list[str]:
        floor_ms = max(self.bytes / c.copy_gbs / 1e6, self.flops / c.matmul_tflops / 1e9)
        eager = f"{self.eager_ms:.3f}" if self.eager_ms is not None else "-"
        speedup = f"{self.eager_ms / self.ms:.1f}x" if self.eager_ms is not None else "-"
        return [
            self.name,
            f"{self.ms:.3f}",
            f"{self.bytes / self.ms / 1e6:.0f}",
            f"{self.flops / self.ms / 1e9:.2f}",
            f"{100 * floor_ms / self.ms:.0f}%",
            eager,
            speedup,
        ]


def eager_kv_write(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """The 584-byte quantization in torch ops (what a user without dsv4rs would write)."""
    n = x.shape[0]
    nope = x[:, :448].float().view(n, 7, 64)
    amax = nope.abs().amax(-1).clamp_min(1e-4)
    e = torch.ceil(torch.log2(amax / 448))
    q = (nope * torch.exp2(-e).unsqueeze(-1)).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    rope = x[:, 448:].to(torch.bfloat16).contiguous().view(torch.uint8).view(n, 128)
    pages = cache.view(-1, 37376)
    page, off = slots // 64, slots % 64
    data = pages[:, : 64 * 576].view(-1, 64, 576)
    data[page, off] = torch.cat([q.view(n, 448), rope], 1)
    scales = pages[:, 64 * 576 :].view(-1, 64, 8)
    scales[page, off, :7] = (e + 127).to(torch.uint8)


def bench_formats(quick: bool) -> list[Row]:
    rows = []
    for n in [4096, 65536] if quick else [4096, 65536, 262144]:
        xs = [torch.randn(n, 512, device="cuda") for _ in range(4)]
        slots = torch.randperm(n, device="cuda")
        cache = ops.new_kv_cache(n // 64, "cuda")
        moved = n * (512 * 4 + 8 + 584)
        ms = median_ms(lambda i: ops.kv_write(cache, slots, xs[i]), 4)
        eager = median_ms(lambda i: eager_kv_write(cache, slots, xs[i]), 4)
        rows.append(Row(f"kv_write n={n}", ms, moved, 0.0, eager))
        ids = torch.randperm(n, device="cuda")
        ms = median_ms(lambda i: ops.kv_read(cache, ids), 1)
        rows.append(Row(f"kv_read n={n}", ms, n * (584 + 8 + 2048), 0.0, None))
        keys = [torch.randn(n, 128, device="cuda") for _ in range(4)]
        ms = median_ms(lambda i: ops.hadamard128(keys[i]), 4)
        eager_h = torch.tensor([[(-1) ** bin(i & j).count("1") for j in range(128)] for i in range(128)],
                               dtype=torch.float32, device="cuda") * 128**-0.5
        eager = median_ms(lambda i: keys[i] @ eager_h, 4)
        rows.append(Row(f"hadamard128 n={n}", ms, n * 128 * 8, n * 128 * 7 * 1.0, eager))
    return rows


def eager_indexer(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """Torch eager Lightning Indexer: q [B, H, 128], w [B, H], keys [B, N, 128] bf16."""
    logits = torch.einsum("bhd,bnd->bhn", q, keys).float().relu_()
    scores = torch.einsum("bhn,bh->bn", logits, w)
    return scores.topk(min(k, keys.shape[1]), dim=-1).indices


def bench_indexer(quick: bool) -> list[Row]:
    rows = []
    shapes = [("flash", 64, 512), ("pro", 64, 1024)]
    contexts = [131072, 1048576]
    batches = [1, 32] if quick else [1, 8, 32, 64]
    for model, heads, k in shapes:
        for ctx in contexts:
            n = ctx // 4
            for b in batches:
                pages = n // 64
                table = torch.arange(b * pages, device="cuda", dtype=torch.int32).view(b, pages)
                keys = torch.randn(b * n, 128, device="cuda").bfloat16()
                cache = ops.quantize_index_keys(keys, "fp4")
                qs = [torch.randn(b, heads, 128, device="cuda").bfloat16() for _ in range(2)]
                w = torch.rand(b, heads, device="cuda")
                seq = torch.arange(b, device="cuda")
                vis = torch.full((b,), n, device="cuda")
                ms = median_ms(lambda i: ops.indexer_topk(qs[i], w, cache, table, seq, vis, k), 2, iters=20)
                moved = b * n * 68 + b * heads * (256 + 4) + b * k * 8
                flops = 2.0 * b * heads * 128 * n
                eager = None
                if b * heads * n * 6 < 40e9:
                    kb = keys.view(b, n, 128)
                    eager = median_ms(lambda i: eager_indexer(qs[i], w, kb, k), 2, iters=5, warmup=1)
                rows.append(Row(f"indexer {model} ctx={ctx // 1024}K b={b}", ms, moved, flops, eager))
                del cache, keys
    return rows


def eager_attention(q, rows, idx, sink, scale):
    """Torch eager sparse attention with sink: gather, einsum, softmax over [logits | sink]."""
    kv = rows[idx.clamp_min(0)]                                   # [T, K, 512]
    logits = torch.einsum("thd,tkd->thk", q, kv).float() * scale
    logits = logits.masked_fill((idx < 0).unsqueeze(1), float("-inf"))
    full = torch.cat([logits, sink.view(1, -1, 1).expand(q.shape[0], -1, 1)], -1)
    p = full.softmax(-1)[..., :-1]
    return torch.einsum("thk,tkd->thd", p.to(kv.dtype), kv)


def bench_attention(quick: bool) -> list[Row]:
    rows = []
    cases = [("flash csa", 64, 512 + 128), ("pro csa", 128, 1024 + 128),
             ("flash hca 128K", 64, 1024 + 128), ("flash hca 1M", 64, 8192 + 128)]
    batches = [1, 32, 128] if quick else [1, 8, 32, 64, 128]
    scale = 512**-0.5
    for name, heads, cand in cases:
        for b in batches:
            n_rows = max(b * cand, 4096)
            entries = torch.randn(n_rows, 512, device="cuda")
            cache = ops.quantize_entries(entries)
            idx = torch.randint(0, n_rows, (b, cand), device="cuda")
            qs = [torch.randn(b, heads, 512, device="cuda").bfloat16() for _ in range(2)]
            sink = torch.randn(heads, device="cuda")
            ms = median_ms(lambda i: ops.sparse_attention(qs[i], cache, idx, sink), 2, iters=20)
            moved = b * cand * 584 + b * heads * 512 * (2 + 4)
            flops = 4.0 * b * heads * 512 * cand
            eager = None
            if b * cand * 512 * 2 * 3 < 20e9:
                bf = ops.kv_read(cache, torch.arange(n_rows, device="cuda")).bfloat16()
                eager = median_ms(lambda i: eager_attention(qs[i], bf, idx, sink, scale), 2, iters=5, warmup=1)
            rows.append(Row(f"attention {name} b={b}", ms, moved, flops, eager))
    for t in [8192] if quick else [8192, 32768]:
        heads, cand = 64, 640
        entries = torch.randn(t, 512, device="cuda")
        cache = ops.quantize_entries(entries)
        idx = torch.randint(0, t, (t, cand), device="cuda")
        q = torch.randn(t, heads, 512, device="cuda").bfloat16()
        sink = torch.randn(heads, device="cuda")
        ms = median_ms(lambda i: ops.sparse_attention(q, cache, idx, sink), 1, iters=5, warmup=1)
        rows.append(Row(f"attention prefill T={t} flash", ms, t * cand * 584 + t * heads * 512 * 6,
                        4.0 * t * heads * 512 * cand, None))
    return rows


def eager_compress(kv, score, ape, ratio):
    """Torch eager HCA/CSA pooling (no overlap form for simplicity of the baseline: r = 128)."""
    s, w = kv.shape
    e = s // ratio
    logits = (score[: e * ratio].view(e, ratio, w) + ape).softmax(1)
    return (logits * kv[: e * ratio].view(e, ratio, w)).sum(1)


def bench_compress(quick: bool) -> list[Row]:
    rows = []
    inv_freq = torch.rand(32, device="cuda")
    for ratio, dim, quant in [(4, 512, "fp8"), (128, 512, "fp8"), (4, 128, "fp4")]:
        coff = 2 if ratio == 4 else 1
        for s in [8192] if quick else [8192, 65536]:
            kvs = [torch.randn(s, coff * dim, device="cuda") for _ in range(2)]
            score = torch.randn(s, coff * dim, device="cuda")
            ape = torch.randn(ratio, coff * dim, device="cuda")
            norm = torch.rand(dim, device="cuda")

            def run(i):
                kv_state, score_state = ops.compressor_state(ratio, dim, "cuda")
                return ops.compress(kvs[i], score, ape, norm, inv_freq, kv_state, score_state, 0, ratio, quant=quant)

            ms = median_ms(run, 2, iters=20)
            moved = 2 * s * coff * dim * 4 + (s // ratio) * dim * 4
            eager = median_ms(lambda i: eager_compress(kvs[i], score, ape, ratio), 2, iters=10) if ratio == 128 else None
            rows.append(Row(f"compress r={ratio} D={dim} {quant} S={s}", ms, moved, 0.0, eager))
    return rows


def print_table(rows: list[Row], c: Ceilings) -> None:
    head = ["case", "ms", "GB/s", "TFLOP/s", "roofline", "eager ms", "speedup"]
    table = [head] + [r.cells(c) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    print(f"ceilings: copy {c.copy_gbs:.0f} GB/s, bf16 matmul {c.matmul_tflops:.0f} TFLOP/s "
          f"({torch.cuda.get_device_name()})")
    for r in table:
        print("  ".join(cell.rjust(w) for cell, w in zip(r, widths)))


SUITES = {"formats": bench_formats, "compress": bench_compress, "indexer": bench_indexer, "attention": bench_attention}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes")
    parser.add_argument("--only", nargs="*", choices=sorted(SUITES), help="suites to run (default: all)")
    args = parser.parse_args()
    ops.warm_up("cuda")
    ceilings = measure_ceilings()
    rows = []
    for name in args.only or SUITES:
        print(f"running {name} ...", flush=True)
        rows += SUITES[name](args.quick)
    print_table(rows, ceilings)


if __name__ == "__main__":
    main()
