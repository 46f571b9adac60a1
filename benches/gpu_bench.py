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


def print_table(rows: list[Row], c: Ceilings) -> None:
    head = ["case", "ms", "GB/s", "TFLOP/s", "roofline", "eager ms", "speedup"]
    table = [head] + [r.cells(c) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    print(f"ceilings: copy {c.copy_gbs:.0f} GB/s, bf16 matmul {c.matmul_tflops:.0f} TFLOP/s "
          f"({torch.cuda.get_device_name()})")
    for r in table:
        print("  ".join(cell.rjust(w) for cell, w in zip(r, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes")
    args = parser.parse_args()
    ops.warm_up("cuda")
    ceilings = measure_ceilings()
    rows = bench_formats(args.quick)
    print_table(rows, ceilings)


if __name__ == "__main__":
    main()
