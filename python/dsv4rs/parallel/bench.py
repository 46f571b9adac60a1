"""``dsv4rs bench --only model --world N``: the model suite's decode step over N processes
(data-parallel attention and expert-parallel MoE, or ``--parallel tp``), beside one process.

Each rank builds the preset's first ``--layers`` layers with random weights (its experts only;
``--weights shipped``: FP8 linears and MXFP4 experts as DeepSeek ships them), fills its cache
with random valid rows and times decode steps of ``batch`` sequences of ``context`` tokens (per
rank under ``dp``; the same sequences on every rank under ``tp``), then the prefill of one
prompt a rank. It reports per rank the eager step, the share of it spent in the collectives
(all-to-all, all-reduce; timed with device synchronizations around them on a GPU) and, on a GPU,
the step replayed from its CUDA graph (the collectives captured with it) with its per-layer time,
tokens/s per rank, and beside them the same step in one process holding every expert (the
per-rank batch), eager and replayed. CPU processes talk over gloo; GPUs (``--device cuda``, one
per rank) over NCCL.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

from dsv4rs.parallel.launch import launch

TIMEOUT = 600.0


def _cases(args: argparse.Namespace, gpu: bool) -> tuple[str, int, list[int], list[int], int]:
    preset = args.preset or ("v4-flash" if gpu else "demo")
    batches = args.batch or ([1, 8, 32, 64, 128] if gpu else [1, 4])
    contexts = args.context or ([4096, 131072] if gpu else [1024])
    return preset, args.layers or 4, batches, contexts, 8 if gpu else 3


def _time_decode(engine, cfg, batch: int, context: int, steps: int, comm,
                 kernels: bool = False) -> tuple[float, float, float]:
    """Milliseconds per decode step, the share of it in collectives and the KiB the rank put into
    them a step (``comm``: a CommTimer or None); with ``kernels`` (a GPU's replayed steps, whose
    collectives no timer can bracket) the share is that of NCCL's kernels in the steps' kernel
    time, from torch's profiler over as many steps again (a kernel's time includes its wait for
    the other ranks). The sequences are released after."""
    import torch.distributed as dist

    seqs = [engine.add_sequence()[0] for _ in range(batch)]
    engine.manager.append(seqs, [[0] * context for _ in seqs])
    tokens = [[t] for t in torch.randint(0, cfg.vocab_size, (batch,)).tolist()]
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    engine.step(seqs, tokens)  # warm-up
    sync()
    if engine.parallel is not None:
        dist.barrier(group=engine.parallel.group)
    if comm is not None:
        comm.seconds, comm.sent, comm.enabled = 0.0, 0, True
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step(seqs, tokens)
    sync()
    ms = 1e3 * (time.perf_counter() - t0) / steps
    share = kib = 0.0
    if comm is not None:
        comm.enabled = False
        share, kib = 1e3 * comm.seconds / steps / ms, comm.sent / steps / 1024
    if kernels:
        share = _nccl_share(lambda: engine.step(seqs, tokens), steps) / ms
    for s in seqs:
        engine.release(s)
    return ms, share, kib


def _nccl_share(step, steps: int) -> float:
    """Milliseconds a call of ``step`` spends in NCCL's kernels: torch's profiler over ``steps``
    calls (every rank makes them together)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    us = sum(e.device_time_total for e in prof.key_averages() if "nccl" in e.key.lower())
    return us / 1e3 / steps


def rank_main(rank: int, world: int, init_method: str, args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from dsv4rs import parallel
    from dsv4rs.bench.model import _build, _config, _fill_cache, prefill_tokens, time_prefill
    from dsv4rs.runtime import Engine

    gpu = args.device == "cuda"
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = f"cuda:{torch.cuda.current_device()}" if gpu else "cpu"
    dist.init_process_group("nccl" if gpu else "gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT))
    preset, layers, batches, contexts, steps = _cases(args, gpu)
    cfg = _config(preset, layers)
    pc = parallel.ParallelConfig.even(cfg, world, rank, mode=args.parallel, timeout=TIMEOUT)
    shipped = args.weights == "shipped"
    if pc.mode == "tp":
        model = parallel.shard(_build(cfg, device, shipped=shipped), pc)
    else:
        model = parallel.attach(_build(cfg, device, experts=pc.experts, shipped=shipped), pc)
    longest = max(contexts) + 2 * steps + 4
    engine = Engine(model, max_sequences=max(batches), max_len=longest, quant=True, parallel=pc, cuda_graphs=gpu)
    _fill_cache(engine)
    comm = parallel.timer(model)
    rows = []
    for context in contexts:
        for batch in batches:
            if rank == 0:
                print(f"  decode b={batch} ctx={context}: {world} ranks ...", file=sys.stderr, flush=True)
            graphs, engine.graphs = engine.graphs, None  # eager (every rank alike), the collectives timed
            eager = _time_decode(engine, cfg, batch, context, steps, comm)
            engine.graphs = graphs
            replayed = _time_decode(engine, cfg, batch, context, steps, None, True)[:2] if graphs is not None else None
            rows.append((batch, context, *eager, replayed))
    prompt = prefill_tokens(contexts, gpu)
    if rank == 0:
        print(f"  prefill T={prompt}: {world} ranks ...", file=sys.stderr, flush=True)
    prefill_ms = time_prefill(engine, prompt, before=lambda: dist.barrier(group=pc.group))
    gathered: list = [None] * world if rank == 0 else None
    dist.gather_object((rows, prefill_ms), gathered, dst=0)
    dist.destroy_process_group()
    if rank != 0:
        return 0
    del engine, model
    one = Engine(_build(cfg, device, shipped=shipped), max_sequences=max(batches), max_len=longest, quant=True,
                 cuda_graphs=gpu)
    _fill_cache(one)
    single, graphed = {}, {}
    for context in contexts:
        for batch in batches:
            print(f"  decode b={batch} ctx={context}: one process ...", file=sys.stderr, flush=True)
            graphs, one.graphs = one.graphs, None  # eager, as the parallel steps run
            single[(batch, context)] = _time_decode(one, cfg, batch, context, steps, None)[0]
            one.graphs = graphs
            if graphs is not None:
                graphed[(batch, context)] = _time_decode(one, cfg, batch, context, steps, None)[0]
    print(f"  prefill T={prompt}: one process ...", file=sys.stderr, flush=True)
    single_prefill = time_prefill(one, prompt)
    where = torch.cuda.get_device_name() if gpu else "cpu"
    how = "tensor-parallel attention" if pc.mode == "tp" else "data-parallel attention"
    weights = "FP8/MXFP4 weights as shipped" if shipped else "bf16 weights"
    print(f"decode over {world} ranks ({how}, experts split {[len(r) for r in pc.expert_ranges]}) on {where}: "
          f"{preset}, {layers} layers, {weights}, FP8 cache; "
          f"batch = sequences per rank ({'the same on every rank' if pc.mode == 'tp' else 'each rank its own'})")
    print(f"{'case':>22} {'rank':>4} {'eager ms':>9} {'comm':>6} {'KiB sent':>9} {'graph ms':>9} {'nccl':>6} "
          f"{'ms/layer':>9} {'tok/s/rank':>11} {'1 proc eager':>13} {'ratio':>6} {'1 proc graph':>13} {'ratio':>6}")
    share_of = world if pc.mode == "tp" else 1  # under tp the ranks produce the same tokens together
    for i, (batch, context, *_) in enumerate(gathered[0][0]):
        ref, fast = single[(batch, context)], graphed.get((batch, context))
        for r in range(world):
            _, _, eager, share, kib, replayed = gathered[r][0][i]
            ms = replayed[0] if replayed is not None else eager  # the rank's step as it serves
            graph = f"{replayed[0]:9.3f} {100 * replayed[1]:5.1f}%" if replayed is not None else f"{'-':>9} {'-':>6}"
            vs_graph = (f"{fast:13.3f} {fast / ms / share_of:5.2f}x" if fast is not None and replayed is not None
                        else f"{'-':>13} {'-':>6}")
            print(f"{f'b={batch} ctx={context}':>22} {r:>4} {eager:9.3f} {100 * share:5.1f}% {kib:9.1f} {graph} "
                  f"{ms / layers:9.3f} {batch / ms * 1e3 / share_of:11,.1f} {ref:13.3f} {ref / eager / share_of:5.2f}x "
                  f"{vs_graph}")
    print("eager ms: the step run eagerly, its collectives timed between device synchronizations (comm: their "
          "share of it; KiB sent: the bytes the rank put into them a step); graph ms: the step replayed from its "
          "CUDA graph (GPU; nccl: the share of NCCL's kernels in it, by the profiler), which ms/layer and "
          "tok/s/rank take where there is one; tok/s/rank: the batch's tokens per second"
          f"{' over the ranks (they produce the same tokens together)' if pc.mode == 'tp' else ''}; "
          "ratio: tokens/s per rank over one process's at the same batch, eager to eager and graph to graph")
    for r in range(world):
        ms = gathered[r][1]
        print(f"prefill T={prompt} rank {r}: {ms:.1f} ms, {prompt / ms * 1e3 / share_of:,.0f} tokens/s per rank "
              f"(one process: {single_prefill:.1f} ms, {prompt / single_prefill * 1e3:,.0f} tokens/s)")
    return 0


def run(args: argparse.Namespace) -> int:
    """Starts ``args.world`` processes (or, under torchrun, is one of them)."""
    if args.device == "cuda" and "RANK" not in os.environ and torch.cuda.device_count() < args.world:
        raise SystemExit(f"dsv4rs bench: --world {args.world} on --device cuda needs {args.world} GPUs, torch sees "
                         f"{torch.cuda.device_count()}")
    return launch(rank_main, args.world, args, TIMEOUT * 2, "GPUs, NCCL" if args.device == "cuda" else "CPU, gloo")
