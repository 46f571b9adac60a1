"""Where the time goes, by kernel (torch.profiler).

- ``python -m dsv4rs.bench.profile`` (or ``benches/profile_kernels.py``): per-kernel GPU time of
  the dsv4rs ops at V4 shapes, to see which launch of an op dominates.
- ``python -m dsv4rs.bench.profile step [--preset P] [--layers N] [--batch B] [--context C]
  [--weights bf16|shipped] [--device cpu|cuda]``: one decode step of the model suite's model
  (``dsv4rs bench --only model``), kernel by kernel: on a GPU the replayed CUDA graph of the step
  (each kernel's launches a step and its GPU time), on the CPU the eager step's operators (calls a
  step and self time). The count of launches is what bounds a small batch (docs/runtime.md).
  ``--prefill T``: a prefill of ``T`` tokens a sequence instead (``--batch`` fresh sequences a
  step, eager on a GPU as the engine runs prefill), with its share of each kernel."""

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


def step_table(preset: str = "demo", layers: int = 4, batch: int = 1, context: int = 1024, weights: str = "bf16",
               device: str = "cpu", steps: int = 5, top: int = 25, prefill: int = 0, timeline: bool = False) -> list[str]:
    """Lines of a table of one decode step's kernels (GPU: the replayed graph's; CPU: the eager
    step's operators, self time), the most time first, ``top`` of them and a total line (on a
    GPU then the step's span, which the kernels' overlapping times exceed: :func:`_span_line`). With
    ``prefill`` > 0, of a step that prefills ``prefill`` tokens in each of ``batch`` fresh
    sequences (eager on a GPU too; ``context`` is then unused). With ``timeline``, then the last
    step's kernels (CPU: its top-level operators) in the order they started (:func:`_timeline`)."""
    from dsv4rs.bench.model import _build, _config, _fill_cache
    from dsv4rs.runtime import Engine

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda asked for and no CUDA GPU is visible")
    for name, v in (("layers", layers), ("batch", batch), ("context", context), ("steps", steps), ("top", top)):
        if v < 1:
            raise ValueError(f"{name}: at least 1, got {v}")
    if prefill < 0:
        raise ValueError(f"prefill: at least 0 (0: a decode step), got {prefill}")
    if weights not in ("bf16", "shipped"):
        raise ValueError(f"weights: bf16 or shipped, got {weights!r}")
    gpu = device == "cuda"
    cfg = _config(preset, layers)
    model = _build(cfg, device, shipped=weights == "shipped")
    if prefill:
        eng = Engine(model, max_sequences=batch, max_len=prefill + 4, quant=True, cuda_graphs=False)
        ids = torch.randint(0, cfg.vocab_size, (prefill,)).tolist()

        def run() -> None:
            seqs = [eng.add_sequence()[0] for _ in range(batch)]
            eng.step(seqs, [ids] * batch)
            for s in seqs:
                eng.release(s)

        activity = ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU
    else:
        eng = Engine(model, max_sequences=batch, max_len=context + steps + 4, quant=True, cuda_graphs=gpu)
        _fill_cache(eng)
        seqs = [eng.add_sequence()[0] for _ in range(batch)]
        eng.manager.append(seqs, [[0] * context for _ in seqs])
        tokens = [[t] for t in torch.randint(0, cfg.vocab_size, (batch,)).tolist()]
        eng.step(seqs, tokens)  # captures the bucket's graph (GPU), warms up
        if gpu:
            graph = eng.graphs.graphs[eng.graphs.bucket(batch)][0]
            run, activity = graph.replay, ProfilerActivity.CUDA
        else:
            run, activity = (lambda: eng.step(seqs, tokens)), ProfilerActivity.CPU
    run()  # warms up (a prefill's first call; a decode step's replay after its capture)
    if gpu:
        torch.cuda.synchronize()
    with profile(activities=[activity]) as prof:
        for _ in range(steps):
            run()
        if gpu:
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = e.device_time_total if gpu else e.self_cpu_time_total
        if gpu and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if us > 0:
            rows.append((e.key, e.count / steps, us / steps))
    rows.sort(key=lambda r: -r[2])
    total_us, total_n = sum(r[2] for r in rows), sum(r[1] for r in rows)
    what = ("GPU time of the eager step" if prefill else "GPU time of the replayed step") if gpu else "self CPU time of the eager step"
    width = min(72, max([len("kernel")] + [len(r[0]) for r in rows[:top]]))
    shape = f"prefill of {prefill} tokens x {batch}" if prefill else f"batch {batch}, context {context}"
    lines = [f"{preset} x {layers} layers, {weights} weights, {shape}: {what}, the mean of {steps} steps",
             f"{'kernel':<{width}}  {'a step':>7}  {'us a step':>10}  {'share':>6}"]
    for name, n, us in rows[:top]:
        lines.append(f"{name[:width]:<{width}}  {n:7.1f}  {us:10.1f}  {us / max(total_us, 1e-9):6.1%}")
    if len(rows) > top:
        rest = rows[top:]
        lines.append(f"{f'({len(rest)} more)':<{width}}  {sum(r[1] for r in rest):7.1f}  {sum(r[2] for r in rest):10.1f}  "
                     f"{sum(r[2] for r in rest) / max(total_us, 1e-9):6.1%}")
    lines.append(f"{'total':<{width}}  {total_n:7.1f}  {total_us:10.1f}")
    if gpu:
        lines.append(_span_line(prof, steps, total_us))
    if timeline:
        lines += _timeline(prof, gpu, steps)
    return lines


def _timeline(prof: profile, gpu: bool, steps: int) -> list[str]:
    """The last of ``steps`` profiled steps, kernel by kernel in the order they started (on the
    CPU, the top-level operators): the start from the step's first, the duration, the gap since
    the previous one on the same stream ended (on the CPU, since the previous operator) and the
    stream. The gaps are what launches and waits cost between dependent kernels; under
    programmatic dependent launch a kernel starts before the one before it ends (a negative gap)
    and its time includes that wait."""
    cuda = torch.autograd.DeviceType.CUDA
    events = [e for e in prof.events() if (e.device_type == cuda) == gpu and e.time_range.end > e.time_range.start
              and (gpu or e.cpu_parent is None)]
    events.sort(key=lambda e: e.time_range.start)
    per_step = len(events) // steps
    last = events[len(events) - per_step:] if per_step else []
    if not last:
        return ["timeline: no events"]
    t0 = last[0].time_range.start
    lines = [f"timeline of the last step: {len(last)} {'kernels' if gpu else 'operators'}, in the order they started",
             f"{'#':>4}  {'start us':>9}  {'us':>7}  {'gap us':>7}  {'stream':>6}  {'kernel' if gpu else 'operator'}"]
    ended: dict[int, float] = {}
    for i, e in enumerate(last):
        stream = e.device_resource_id if gpu else 0
        start, end = e.time_range.start, e.time_range.end
        gap = start - ended[stream] if stream in ended else 0.0
        ended[stream] = max(end, ended.get(stream, end))
        lines.append(f"{i:4d}  {start - t0:9.1f}  {end - start:7.1f}  {gap:7.1f}  {stream:6d}  {e.name[:90]}")
    return lines


def _span_line(prof: profile, steps: int, total_us: float) -> str:
    """The step's GPU span (its kernels' first start to their last end, over the steps' mean)
    beside the kernels' summed time: with programmatic dependent launch (docs/runtime.md) a
    kernel starts under the one before it and its time includes that wait, so the sum exceeds
    the span; ``DSV4RS_PDL=off`` gives kernel times that do not overlap."""
    ranges = [e.time_range for e in prof.events()
              if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start]
    span = (max(r.end for r in ranges) - min(r.start for r in ranges)) / steps if ranges else 0.0
    return (f"span {span:.1f} us a step, first kernel's start to last kernel's end (the kernels' times sum to "
            f"{total_us:.1f}: under programmatic dependent launch a kernel's time includes its wait for the one "
            "before it; DSV4RS_PDL=off times them apart)")


def step_main(argv: list[str]) -> int:
    import argparse

    from dsv4rs.model.config import PRESETS

    parser = argparse.ArgumentParser(prog="python -m dsv4rs.bench.profile step",
                                     description="One decode (or prefill) step of the model suite's model, kernel by kernel.")
    parser.add_argument("--preset", choices=list(PRESETS), help="the model's width (default v4-flash on a GPU, demo on the CPU)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, help="tokens a sequence holds (default 4096 on a GPU, 1024 on the CPU)")
    parser.add_argument("--weights", choices=["bf16", "shipped"], default="bf16")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: a CUDA GPU if there is one")
    parser.add_argument("--steps", type=int, default=5, help="steps profiled (the table is their mean)")
    parser.add_argument("--top", type=int, default=25, help="rows printed (the rest summed in one)")
    parser.add_argument("--prefill", type=int, default=0, metavar="TOKENS",
                        help="profile a prefill of TOKENS tokens a sequence instead of a decode step")
    parser.add_argument("--timeline", action="store_true",
                        help="after the table, the last step's kernels in the order they started, with gaps and streams")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device == "cuda"
    try:
        lines = step_table(args.preset or ("v4-flash" if gpu else "demo"), args.layers, args.batch,
                           args.context or (4096 if gpu else 1024), args.weights, device, args.steps, args.top,
                           args.prefill, args.timeline)
    except ValueError as e:
        parser.error(str(e))
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "step":
        return step_main(argv[1:])
    if argv:
        raise SystemExit(f"usage: python -m dsv4rs.bench.profile [step ...] (got {' '.join(argv)!r})")
    ops_main()
    return 0


def ops_main() -> None:
    ops.warm_up("cuda")
    for b, n in [(1, 262144), (32, 262144), (32, 32768)]:
        report(f"indexer b={b} keys={n}", indexer_case(b, n))
    for b, cand, heads in [(1, 640, 64), (128, 640, 64), (128, 1152, 128), (128, 8320, 64)]:
        report(f"attention b={b} cand={cand} h={heads}", attention_case(b, cand, heads))


if __name__ == "__main__":
    raise SystemExit(main())
