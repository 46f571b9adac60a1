"""The sparse attention's split folds side by side on a CUDA GPU: ``python
benches/attention_clusters.py``.

For each case (as the model calls the op: bfloat16 queries, the FP8 cache, de-rotation, a
bfloat16 output), the time of a call in us (a CUDA graph of 20 calls, the median of 30 replays)
with ``DSV4RS_ATTENTION_CLUSTER`` off (the combine kernel), auto and on (thread-block clusters
wherever a call has 2 to 8 splits), the settings alternating twice, and the largest relative
difference of the outputs; then the kernels' own times for a few cases (torch's profiler; set
``DSV4RS_PDL=off`` so that no kernel's time includes its wait for the one before).
docs/kernels/attention.md, "Split partials folded in a cluster"."""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from dsv4rs import ops, reference

MODES = ["off", "auto", "on"]
# (name, batch, heads, candidates): V4-Flash's SWA and HCA layers at 4K, CSA, V4-Pro's CSA, HCA.
CASES = [("swa 128", 1, 64, 128), ("hca 4K", 1, 64, 160)]
CASES += [("flash csa", b, 64, 640) for b in (1, 2, 4, 8, 16, 32, 64, 128)]
CASES += [("pro csa", b, 128, 1152) for b in (1, 8, 32, 64)]
CASES += [("hca 128K", b, 64, 1152) for b in (1, 8, 32)]
CASES += [("hca 1M", b, 64, 8320) for b in (1, 8)]
PROFILED = [("swa 128", 1, 64, 128), ("flash csa", 1, 64, 640), ("flash csa", 8, 64, 640),
            ("flash csa", 32, 64, 640), ("flash csa", 64, 64, 640)]


def make_call(b: int, heads: int, cand: int) -> Callable[[], torch.Tensor]:
    """One call of the op on fresh inputs (the same for the same seed)."""
    torch.manual_seed(1)
    n_rows = max(b * cand, 4096)
    cache = ops.quantize_entries(torch.randn(n_rows, 512, device="cuda"))
    idx = torch.randint(0, n_rows, (b, cand), device="cuda", dtype=torch.int32)
    q = torch.randn(b, heads, 512, device="cuda").bfloat16()
    sink = torch.randn(heads, device="cuda")
    pos = torch.randint(0, 10**6, (b,), device="cuda")
    inv_freq = reference.rope_inv_freq(64, 10000.0).float().cuda()
    return lambda: ops.sparse_attention(q, cache, idx, sink, derotate=(pos, inv_freq), out_dtype=torch.bfloat16)[0]


def time_call(call: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    """us a call (a graph of 20 calls, the median of 30 replays) and the output."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    stream, graph = torch.cuda.Stream(), torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for _ in range(20):
            out = call()
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / 20)
    return statistics.median(times), out


def kernel_times(call: Callable[[], torch.Tensor]) -> dict[str, float]:
    """us a call of each kernel over 20 eager calls."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            call()
        torch.cuda.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    return {e.key: e.device_time_total / 20 for e in prof.key_averages() if e.device_type == cuda}


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("attention_clusters: needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, us a call")
    print(f"{'case':22s} " + " ".join(f"{m:>14s}" for m in MODES) + "   auto/off  on/off", flush=True)
    for name, b, heads, cand in CASES:
        times: dict[str, list[float]] = {m: [] for m in MODES}
        outs = {}
        for _ in range(2):
            for m in MODES:
                os.environ["DSV4RS_ATTENTION_CLUSTER"] = m
                t, out = time_call(make_call(b, heads, cand))
                times[m].append(t)
                outs[m] = out.float()
        err = max(((outs[m] - outs["off"]).norm() / outs["off"].norm()).item() for m in MODES)
        med = {m: statistics.median(v) for m, v in times.items()}
        cells = " ".join(f"{'/'.join(f'{x:.2f}' for x in times[m]):>14s}" for m in MODES)
        print(f"{name + ' b=' + str(b):22s} {cells}   {med['auto'] / med['off']:.3f}  {med['on'] / med['off']:.3f}"
              f"  err {err:.1e}", flush=True)
    print(f"kernel times (us a call), DSV4RS_PDL={os.environ.get('DSV4RS_PDL', 'default')}")
    for name, b, heads, cand in PROFILED:
        for m in ("off", "on"):
            os.environ["DSV4RS_ATTENTION_CLUSTER"] = m
            ks = kernel_times(make_call(b, heads, cand))
            line = ", ".join(f"{k.removeprefix('dsv4_')} {v:.2f}" for k, v in sorted(ks.items()))
            print(f"{name} b={b} {m}: {line}", flush=True)


if __name__ == "__main__":
    main()
