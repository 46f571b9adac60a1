"""``dsv4rs bench``: microbenchmarks of the ops and the allocator beside torch eager, with
roofline fractions. The one home of the project's benchmark code.

On the available device (a CUDA GPU if there is one, else the CPU) it first measures the
ceilings in the same run (a large copy, counting bytes read plus written; a large matmul: bf16
on a GPU, float32 on the CPU), then times every case (GPU: CUDA events around the replay of a
CUDA graph of the call, queued behind a short wait on the device, so that the time is the GPU's
and not the Python or driver launch cost, for the dsv4rs op and torch eager alike, falling back
to timing the call itself where a capture fails;
CPU: wall clock; the median of many runs after warm-up, inputs rotated so caches do not hold
them) and prints one table: time, GB/s, TFLOP/s, the fraction of the roofline floor (the larger
of bytes over bandwidth and FLOPs over the matmul rate), and torch eager's time for the same
computation. Sizes are V4-Flash/Pro shapes on a GPU and scaled down on the CPU.

- :mod:`.harness`: ceilings, timer, table.
- :mod:`.ops`: the suites ``formats`` (KV-entry formats, Hadamard, RoPE), ``norm`` (RMSNorm),
  ``mhc`` (the mHC collapse, combine, fused input and mix), ``compress``, ``indexer``, ``attention``.
- :mod:`.quant`: the suites ``moe`` (the fused MoE over MXFP4 experts) and ``linear`` (FP8
  block-scaled linears), beside torch with bf16 weights and torch's own FP8 kernels.
- :mod:`.cache`: the suite ``cache`` (allocator bookkeeping on the host).
- :mod:`.model`: the suite ``model`` (the whole decode step and prefill at V4 width; run it by
  name, ``--only model``: it builds a model of several GB).
- :mod:`.profile`: per-kernel GPU time of the ops (``python -m dsv4rs.bench.profile``).

This module imports no torch, so the CLI can list the suites cheaply.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUITES = {"formats": "ops", "norm": "ops", "mhc": "ops", "compress": "ops", "indexer": "ops", "attention": "ops", "moe": "quant", "linear": "quant",
          "cache": "cache", "model": "model"}
"""Suite name -> the module of :mod:`dsv4rs.bench` that defines it (a function of that name)."""


def run(device: str, quick: bool, suites: list[str], options: dict | None = None) -> str:
    """Runs the suites on ``device`` with a progress bar on stderr and returns the table;
    ``options`` are the model suite's (``preset``, ``layers``, ``batch``, ``context``, ``weights``)."""
    import torch
    from tqdm import tqdm

    from dsv4rs import ops
    from dsv4rs.bench.harness import Bench, format_table

    b = Bench(device, quick, options)
    if b.gpu:
        ops.warm_up(device)
    ceilings = b.ceilings()
    cases = [case for name in suites
             for case in getattr(importlib.import_module(f"dsv4rs.bench.{SUITES[name]}"), name)(b)]
    rows = []
    with tqdm(cases, desc="dsv4rs bench", unit="case", file=sys.stderr) as bar:
        for case in bar:
            bar.set_postfix_str(f"{case.suite}: {case.name}")
            rows.append(case.run())
    name = f"{torch.cuda.get_device_name()} (attention kernel: {ops.attention_kernel(device)})" if b.gpu else "cpu"
    return format_table(rows, ceilings, name)


def run_command(args: argparse.Namespace) -> int:
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("dsv4rs bench: --device cuda, but torch sees no CUDA GPU")
    options = {k: getattr(args, k, None) for k in ("preset", "layers", "batch", "context", "weights")}
    print(run(device, args.quick, args.only or [s for s in SUITES if s != "model"], options))
    return 0
