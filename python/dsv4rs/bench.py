"""Microbenchmarks of the dsv4rs ops beside torch eager, with roofline fractions (``dsv4rs bench``).

On the available device (a CUDA GPU if there is one, else the CPU) it first measures the
ceilings in the same run (a large copy, counting bytes read plus written; a large matmul: bf16
on a GPU, float32 on the CPU), then times every case (GPU: CUDA events around the replay of a
CUDA graph of the call, so that the time is the GPU's and not the Python launch cost, for the
dsv4rs op and torch eager alike, falling back to timing the call itself where a capture fails;
CPU: wall clock; the median of many runs after warm-up, inputs rotated so caches do not hold
them) and prints one
table: time, GB/s, TFLOP/s, the fraction of the roofline floor (the larger of bytes over
bandwidth and FLOPs over the matmul rate), and torch eager's time for the same computation.
Sizes are V4-Flash/Pro shapes on a GPU and scaled down on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from dsv4rs import ops


@dataclass
class Ceilings:
    copy_gbs: float
    matmul_tflops: float


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
        return [self.name, f"{self.ms:.3f}", f"{self.bytes / self.ms / 1e6:.0f}", f"{self.flops / self.ms / 1e9:.2f}",
                f"{100 * floor_ms / self.ms:.0f}%", eager, speedup]


@dataclass
class Case:
    """One benchmark: its name and a function that sets it up, times it and returns its row."""

    suite: str
    name: str
    run: Callable[[], Row]


class Bench:
    """The device and its timer; the suites build their cases on it."""

    def __init__(self, device: str, quick: bool) -> None:
        self.device, self.quick = device, quick
        self.gpu = device == "cuda"

    def median_ms(self, fn: Callable[[int], object], n_inputs: int, iters: int | None = None, warmup: int = 3,
                  graph: bool = True) -> float:
        """Median time of ``fn(i)``, cycling through ``n_inputs`` input sets (on a GPU, with
        ``graph``, of the replay of a CUDA graph of each, when the call can be captured)."""
        iters = iters or (30 if self.gpu else 7)
        for i in range(warmup):
            fn(i % n_inputs)
        times = []
        if self.gpu:
            graphs = self._graphs(fn, n_inputs) if graph else None
            call = (lambda i: graphs[i].replay()) if graphs else fn
            torch.cuda.synchronize()
            for i in range(iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call(i % n_inputs)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for i in range(iters):
                t0 = time.perf_counter()
                fn(i % n_inputs)
                times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)

    @staticmethod
    def _graphs(fn: Callable[[int], object], n_inputs: int) -> list[torch.cuda.CUDAGraph] | None:
        """One CUDA graph of ``fn(i)`` per input set, or ``None`` when a call cannot be captured
        (it synchronizes with the host)."""
        graphs = []
        try:
            for i in range(n_inputs):
                graph = torch.cuda.CUDAGraph()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
                    fn(i)
                torch.cuda.current_stream().wait_stream(side)
                graphs.append(graph)
        except RuntimeError:
            torch.cuda.synchronize()
            return None
        return graphs

    def ceilings(self) -> Ceilings:
        n = (1 << 30) if self.gpu else (1 << 27)
        src = torch.empty(n, dtype=torch.uint8, device=self.device).fill_(1)
        dst = torch.empty_like(src)
        # Timed directly: in a CUDA graph a device-to-device copy becomes a copy-engine node,
        # slower than the copy kernel, and these large calls are not launch-bound.
        ms = self.median_ms(lambda i: dst.copy_(src), 1, iters=10, graph=False)
        size, dtype = (8192, torch.bfloat16) if self.gpu else (1024, torch.float32)
        a, b = (torch.randn(size, size, device=self.device, dtype=dtype) for _ in range(2))
        mm = self.median_ms(lambda i: a @ b, 1, iters=5, graph=False)
        return Ceilings(copy_gbs=2 * n / ms / 1e6, matmul_tflops=2 * size**3 / mm / 1e9)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, device=self.device).to(dtype)

    def pick(self, gpu: list, gpu_quick: list, cpu: list) -> list:
        return (gpu_quick if self.quick else gpu) if self.gpu else cpu


def eager_kv_write(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """The 584-byte quantization in torch ops (what a user without dsv4rs would write)."""
    n = x.shape[0]
    nope = x[:, :448].float().view(n, 7, 64)
    e = torch.ceil(torch.log2(nope.abs().amax(-1).clamp_min(1e-4) / 448))
    q = (nope * torch.exp2(-e).unsqueeze(-1)).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    rope = x[:, 448:].to(torch.bfloat16).contiguous().view(torch.uint8).view(n, 128)
    pages = cache.view(-1, 37376)
    page, off = slots // 64, slots % 64
    pages[:, : 64 * 576].view(-1, 64, 576)[page, off] = torch.cat([q.view(n, 448), rope], 1)
    pages[:, 64 * 576 :].view(-1, 64, 8)[page, off, :7] = (e + 127).to(torch.uint8)


def formats(b: Bench) -> Iterator[Case]:
    hadamard = torch.tensor([[(-1) ** bin(i & j).count("1") for j in range(128)] for i in range(128)],
                            dtype=torch.float32, device=b.device) * 128**-0.5
    for n in b.pick([4096, 65536, 262144], [4096, 65536], [4096, 65536]):

        def kv_write(n: int = n) -> Row:
            xs = [b.randn(n, 512) for _ in range(4)]
            slots = torch.randperm(n, device=b.device)
            cache = ops.new_kv_cache(n // 64, b.device)
            ms = b.median_ms(lambda i: ops.kv_write(cache, slots, xs[i]), 4)
            eager = b.median_ms(lambda i: eager_kv_write(cache, slots, xs[i]), 4)
            return Row(f"kv_write n={n}", ms, n * (512 * 4 + 8 + 584), 0.0, eager)

        def kv_read(n: int = n) -> Row:
            cache = ops.quantize_entries(b.randn(n, 512))
            ids = torch.randperm(n, device=b.device)
            return Row(f"kv_read n={n}", b.median_ms(lambda i: ops.kv_read(cache, ids), 1), n * (584 + 8 + 2048), 0.0, None)

        def hadamard128(n: int = n) -> Row:
            keys = [b.randn(n, 128) for _ in range(4)]
            ms = b.median_ms(lambda i: ops.hadamard128(keys[i]), 4)
            eager = b.median_ms(lambda i: keys[i] @ hadamard, 4)
            return Row(f"hadamard128 n={n}", ms, n * 128 * 8, n * 128 * 7.0, eager)

        yield Case("formats", f"kv_write n={n}", kv_write)
        yield Case("formats", f"kv_read n={n}", kv_read)
        yield Case("formats", f"hadamard128 n={n}", hadamard128)


def eager_compress(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, ratio: int) -> torch.Tensor:
    """Torch eager pooling of the non-overlapping (HCA) compressor."""
    s, w = kv.shape
    e = s // ratio
    weights = (score[: e * ratio].view(e, ratio, w) + ape).softmax(1)
    return (weights * kv[: e * ratio].view(e, ratio, w)).sum(1)


def compress(b: Bench) -> Iterator[Case]:
    inv_freq = torch.rand(32, device=b.device)
    for ratio, dim, quant in [(4, 512, "fp8"), (128, 512, "fp8"), (4, 128, "fp4")]:
        for s in b.pick([8192, 65536], [8192], [2048, 8192]):

            def run(ratio: int = ratio, dim: int = dim, quant: str = quant, s: int = s) -> Row:
                coff = 2 if ratio == 4 else 1
                kvs = [b.randn(s, coff * dim) for _ in range(2)]
                score, ape, norm = b.randn(s, coff * dim), b.randn(ratio, coff * dim), b.randn(dim).abs()

                def call(i: int) -> torch.Tensor:
                    kv_state, score_state = ops.compressor_state(ratio, dim, b.device)
                    return ops.compress(kvs[i], score, ape, norm, inv_freq, kv_state, score_state, 0, ratio, quant=quant)

                eager = b.median_ms(lambda i: eager_compress(kvs[i], score, ape, ratio), 2) if ratio != 4 else None
                moved = 2 * s * coff * dim * 4 + (s // ratio) * dim * 4
                return Row(f"compress r={ratio} D={dim} {quant} S={s}", b.median_ms(call, 2), moved, 0.0, eager)

            yield Case("compress", f"r={ratio} D={dim} S={s}", run)


def eager_indexer(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """Torch eager Lightning Indexer: q [B, H, 128], w [B, H], keys [B, N, 128]."""
    logits = torch.einsum("bhd,bnd->bhn", q, keys).float().relu_()
    return torch.einsum("bhn,bh->bn", logits, w).topk(min(k, keys.shape[1]), dim=-1).indices


def indexer(b: Bench) -> Iterator[Case]:
    contexts = b.pick([8192, 131072, 1048576], [131072, 1048576], [32768, 131072])
    batches = b.pick([1, 8, 32, 64], [1, 32], [1, 4])
    for model, heads, k in [("flash", 64, 512), ("pro", 64, 1024)]:
        for ctx in contexts:
            for batch in batches:

                def run(model: str = model, heads: int = heads, k: int = k, ctx: int = ctx, batch: int = batch) -> Row:
                    n = ctx // 4
                    table = torch.arange(batch * n // 64, device=b.device, dtype=torch.int32).view(batch, n // 64)
                    keys = b.randn(batch * n, 128, dtype=torch.bfloat16)
                    cache = ops.quantize_index_keys(keys, "fp4")
                    qs = [b.randn(batch, heads, 128, dtype=torch.bfloat16) for _ in range(2)]
                    w = torch.rand(batch, heads, device=b.device)
                    seq, vis = torch.arange(batch, device=b.device), torch.full((batch,), n, device=b.device)
                    ms = b.median_ms(lambda i: ops.indexer_topk(qs[i], w, cache, table, seq, vis, k), 2)
                    eager = None
                    if batch * heads * n * 6 < (40e9 if b.gpu else 2e9):
                        kb = keys.view(batch, n, 128)
                        eager = b.median_ms(lambda i: eager_indexer(qs[i], w, kb, k), 2, iters=5, warmup=1)
                    moved = batch * n * 68 + batch * heads * (256 + 4) + batch * k * 8
                    return Row(f"indexer {model} ctx={ctx // 1024}K b={batch}", ms, moved, 2.0 * batch * heads * 128 * n, eager)

                yield Case("indexer", f"{model} ctx={ctx // 1024}K b={batch}", run)


def eager_attention(q: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float) -> torch.Tensor:
    """Torch eager sparse attention with sink: gather, einsum, softmax over [logits | sink]."""
    kv = rows[idx.clamp_min(0)]
    logits = torch.einsum("thd,tkd->thk", q, kv).float() * scale
    logits = logits.masked_fill((idx < 0).unsqueeze(1), float("-inf"))
    full = torch.cat([logits, sink.view(1, -1, 1).expand(q.shape[0], -1, 1)], -1)
    return torch.einsum("thk,tkd->thd", full.softmax(-1)[..., :-1].to(kv.dtype), kv)


def attention(b: Bench) -> Iterator[Case]:
    cases = [("flash csa", 64, 512 + 128), ("pro csa", 128, 1024 + 128), ("flash hca 128K", 64, 1024 + 128),
             ("flash hca 1M", 64, 8192 + 128)]
    batches = b.pick([1, 8, 32, 64, 128], [1, 32, 128], [1, 8])
    dtype = torch.bfloat16 if b.gpu else torch.float32
    for name, heads, cand in cases:
        for batch in batches:

            def run(name: str = name, heads: int = heads, cand: int = cand, batch: int = batch) -> Row:
                n_rows = max(batch * cand, 4096)
                cache = ops.quantize_entries(b.randn(n_rows, 512))
                idx = torch.randint(0, n_rows, (batch, cand), device=b.device)
                qs = [b.randn(batch, heads, 512, dtype=dtype) for _ in range(2)]
                sink = b.randn(heads)
                ms = b.median_ms(lambda i: ops.sparse_attention(qs[i], cache, idx, sink), 2)
                rows = ops.kv_read(cache, torch.arange(n_rows, device=b.device)).to(dtype)
                eager = b.median_ms(lambda i: eager_attention(qs[i], rows, idx, sink, 512**-0.5), 2, iters=5, warmup=1)
                moved = batch * cand * 584 + batch * heads * 512 * (2 + 4)
                return Row(f"attention {name} b={batch}", ms, moved, 4.0 * batch * heads * 512 * cand, eager)

            yield Case("attention", f"{name} b={batch}", run)
    for t in b.pick([8192, 32768], [8192], []):

        def prefill(t: int = t) -> Row:
            heads, cand = 64, 640
            cache = ops.quantize_entries(b.randn(t, 512))
            idx = torch.randint(0, t, (t, cand), device=b.device)
            q, sink = b.randn(t, heads, 512, dtype=dtype), b.randn(heads)
            ms = b.median_ms(lambda i: ops.sparse_attention(q, cache, idx, sink), 1, iters=5, warmup=1)
            return Row(f"attention prefill T={t} flash", ms, t * cand * 584 + t * heads * 512 * 6,
                       4.0 * t * heads * 512 * cand, None)

        yield Case("attention", f"prefill T={t}", prefill)


SUITES: dict[str, Callable[[Bench], Iterator[Case]]] = {
    "formats": formats, "compress": compress, "indexer": indexer, "attention": attention,
}


def format_table(rows: list[Row], c: Ceilings, device_name: str) -> str:
    head = ["case", "ms", "GB/s", "TFLOP/s", "roofline", "eager ms", "speedup"]
    table = [head] + [r.cells(c) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = [f"ceilings on {device_name}: copy {c.copy_gbs:.0f} GB/s, matmul {c.matmul_tflops:.2f} TFLOP/s"]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in table]
    return "\n".join(lines)


def run(device: str, quick: bool, suites: list[str]) -> str:
    """Runs the suites on ``device`` with a progress bar on stderr and returns the table."""
    from tqdm import tqdm

    b = Bench(device, quick)
    if b.gpu:
        ops.warm_up(device)
    ceilings = b.ceilings()
    cases = [case for name in suites for case in SUITES[name](b)]
    rows = []
    with tqdm(cases, desc="dsv4rs bench", unit="case", file=sys.stderr) as bar:
        for case in bar:
            bar.set_postfix_str(f"{case.suite}: {case.name}")
            rows.append(case.run())
    name = f"{torch.cuda.get_device_name()} (attention kernel: {ops.attention_kernel(device)})" if b.gpu else "cpu"
    return format_table(rows, ceilings, name)


def run_command(args: argparse.Namespace) -> int:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("dsv4rs bench: --device cuda, but torch sees no CUDA GPU")
    print(run(device, args.quick, args.only or list(SUITES)))
    return 0
