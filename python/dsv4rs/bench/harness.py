"""The timing harness of ``dsv4rs bench``: the ceilings measured in the same run, the timer
(CUDA-graph replays on a GPU, wall clock on the CPU) and the table."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Ceilings:
    """The copy bandwidth and matmul rate of the device, from the fastest of several timed runs
    (a busy machine slows some runs down; the fastest is the closest to what the device can
    do), with the slowest run's rates to show the spread."""

    copy_gbs: float
    matmul_tflops: float
    copy_slowest_gbs: float | None = None
    matmul_slowest_tflops: float | None = None
    runs: tuple[int, int] = (0, 0)

    def describe(self) -> str:
        text = f"copy {self.copy_gbs:.0f} GB/s, matmul {self.matmul_tflops:.2f} TFLOP/s"
        if self.copy_slowest_gbs is None or self.matmul_slowest_tflops is None:
            return text
        return (f"{text} (the fastest of {self.runs[0]} and {self.runs[1]} runs; the slowest: "
                f"{self.copy_slowest_gbs:.0f} GB/s, {self.matmul_slowest_tflops:.2f} TFLOP/s)")


@dataclass
class Row:
    name: str
    ms: float
    bytes: float
    flops: float
    eager_ms: float | None
    note: str = ""
    """Printed under the table (e.g. throughput that the columns do not show)."""

    def roofline(self, c: Ceilings) -> float:
        """The floor (bytes over the copy bandwidth or FLOPs over the matmul rate, the larger)
        over the measured time; 0 for host-only work."""
        floor_ms = max(self.bytes / c.copy_gbs / 1e6, self.flops / c.matmul_tflops / 1e9)
        return floor_ms / self.ms if self.ms > 0 else 0.0

    def cells(self, c: Ceilings) -> list[str]:
        """The table's columns; host-only work (no device bytes or FLOPs counted) shows ``-``
        for the rates and the floor."""
        floor_ms = max(self.bytes / c.copy_gbs / 1e6, self.flops / c.matmul_tflops / 1e9)
        eager = f"{self.eager_ms:.3f}" if self.eager_ms is not None else "-"
        speedup = f"{self.eager_ms / self.ms:.1f}x" if self.eager_ms is not None else "-"
        rates = [f"{self.bytes / self.ms / 1e6:.0f}", f"{self.flops / self.ms / 1e9:.2f}", f"{100 * floor_ms / self.ms:.0f}%"]
        if self.bytes == 0 and self.flops == 0:
            rates = ["-"] * 3
        return [self.name, f"{self.ms:.3f}", *rates, eager, speedup]


@dataclass
class Case:
    """One benchmark: its name and a function that sets it up, times it and returns its row."""

    suite: str
    name: str
    run: Callable[[], Row]


SPIN_CYCLES = 400_000
"""GPU clock cycles (about 0.2 ms) that each timed call queues behind on the device: time for
the host to queue the start event, the call and the end event, so that the timed span begins
with the call already queued, as a captured step runs its kernels, and holds the device's launch
latency but not the host's. 0 times as before: the host's launch of the call included."""


class Bench:
    """The device and its timer; the suites build their cases on it."""

    def __init__(self, device: str, quick: bool, options: dict | None = None) -> None:
        self.device, self.quick, self.options = device, quick, options or {}
        self.gpu = device == "cuda"

    def median_ms(self, fn: Callable[[int], object], n_inputs: int, iters: int | None = None, warmup: int = 3,
                  graph: bool = True) -> float:
        """Median time of ``fn(i)``, cycling through ``n_inputs`` input sets (on a GPU, with
        ``graph``, of the replay of a CUDA graph of each, when the call can be captured; each
        call queued behind :data:`SPIN_CYCLES` of device time, so the host's launch is not in
        the time)."""
        return statistics.median(self.times_ms(fn, n_inputs, iters, warmup, graph))

    def per_call_ms(self, fn: Callable[[int], object], calls: int, iters: int | None = None) -> float:
        """Median time of one call of ``fn(j)`` when ``fn(0) .. fn(calls - 1)`` run back to back
        (on a GPU in one CUDA graph, as a captured decode step runs its kernels): the gaps
        between the calls' kernels are in the time. Give each call its own inputs (weight copies
        that together exceed the L2 cache) so that no call reads what an earlier one left there."""
        return self.median_ms(lambda i: [fn(j) for j in range(calls)], 1, iters) / calls

    def times_ms(self, fn: Callable[[int], object], n_inputs: int, iters: int | None = None, warmup: int = 3,
                 graph: bool = True) -> list[float]:
        """Every timed run of ``fn(i)`` (see :meth:`median_ms`)."""
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
                if SPIN_CYCLES:
                    torch.cuda._sleep(SPIN_CYCLES)
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
        return times

    @staticmethod
    def host_ms(fn: Callable[[], object], iters: int = 7, setup: Callable[[], object] | None = None) -> float:
        """Median wall time of ``fn()`` (host work), after one untimed call; ``setup()`` runs
        before each call, untimed."""
        times = []
        for i in range(iters + 1):
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            if i:
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
        copies = self.times_ms(lambda i: dst.copy_(src), 1, iters=10, graph=False)
        size, dtype = (8192, torch.bfloat16) if self.gpu else (1024, torch.float32)
        a, b = (torch.randn(size, size, device=self.device, dtype=dtype) for _ in range(2))
        mms = self.times_ms(lambda i: a @ b, 1, iters=5, graph=False)
        gbs, tflops = (lambda ms: 2 * n / ms / 1e6), (lambda ms: 2 * size**3 / ms / 1e9)
        return Ceilings(copy_gbs=gbs(min(copies)), matmul_tflops=tflops(min(mms)), copy_slowest_gbs=gbs(max(copies)),
                        matmul_slowest_tflops=tflops(max(mms)), runs=(len(copies), len(mms)))

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, device=self.device).to(dtype)

    def pick(self, gpu: list, gpu_quick: list, cpu: list) -> list:
        return (gpu_quick if self.quick else gpu) if self.gpu else cpu


def format_table(rows: list[Row], c: Ceilings, device_name: str) -> str:
    head = ["case", "ms", "GB/s", "TFLOP/s", "roofline", "eager ms", "speedup"]
    table = [head] + [r.cells(c) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = [f"ceilings on {device_name}: {c.describe()}"]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in table]
    lines += [r.note for r in rows if r.note]
    over = [r.name for r in rows if r.roofline(c) > 1]
    if over:
        lines.append(f"roofline above 100% ({', '.join(over)}): the case ran faster than the floor the ceilings give "
                     f"(its data fits in the caches, or the ceilings were measured while the machine was busy; "
                     f"their spread is on the first line)")
    return "\n".join(lines)
