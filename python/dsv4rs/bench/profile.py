"""Per-kernel GPU time of the dsv4rs ops at V4 shapes (torch.profiler), to see which launch of an
op dominates: ``python -m dsv4rs.bench.profile`` (or ``benches/profile_kernels.py``)."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from dsv4rs import ops


def indexer_case(b: int, n: int, heads: int = 64, k: int = 512):
    pages = n // 64
    table = torch.arange(b * pages, device="cuda", dtype=torch.int32).view(b, pages)
    cache = ops.quantize_index_keys(torch.randn(b * n, 128, device="cuda"), "fp4")
    q = torch.randn(b, heads, 128, device="cuda").bfloat16()
    w = torch.rand(b, heads, device="cuda")
    seq, vis = torch.arange(b, device="cuda"), torch.full((b,), n, device="cuda")
    return lambda: ops.indexer_topk(q, w, cache, table, seq, vis, k)


def attention_case(b: int, cand: int, heads: int):
    n_rows = max(b * cand, 4096)
    cache = ops.quantize_entries(torch.randn(n_rows, 512, device="cuda"))
    idx = torch.randint(0, n_rows, (b, cand), device="cuda")
    q = torch.randn(b, heads, 512, device="cuda").bfloat16()
    sink = torch.randn(heads, device="cuda")
    return lambda: ops.sparse_attention(q, cache, idx, sink)


def report(name: str, fn) -> None:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / e.count) for e in prof.key_averages() if e.device_time_total > 0]
    cells = ", ".join(f"{k.removeprefix('dsv4_')} {us:.1f} us" for k, us in sorted(rows, key=lambda r: -r[1])[:4])
    print(f"{name:32s} {cells}")


def main() -> None:
    ops.warm_up("cuda")
    for b, n in [(1, 262144), (32, 262144), (32, 32768)]:
        report(f"indexer b={b} keys={n}", indexer_case(b, n))
    for b, cand, heads in [(1, 640, 64), (128, 640, 64), (128, 1152, 128), (128, 8320, 64)]:
        report(f"attention b={b} cand={cand} h={heads}", attention_case(b, cand, heads))


if __name__ == "__main__":
    main()
