"""``dsv4rs generate`` and ``dsv4rs serve``: a checkpoint's text interface from the command line
(:mod:`dsv4rs.llm`, :mod:`dsv4rs.serve`). Imported only by those two commands (it imports torch)."""

from __future__ import annotations

import argparse
import sys
import time


def _llm(args: argparse.Namespace, max_sequences: int | None, parallel=None, device=None):
    import torch

    from dsv4rs.llm import LLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, None: None}[args.dtype]
    return LLM(args.checkpoint, device=device or args.device, dtype=dtype, speculative=args.speculative,
               quantized=args.quantized, activations=args.activations, rope_table=args.rope_table,
               max_len=args.max_len, parallel=parallel,
               max_sequences=max_sequences, quant=args.quant, progress=parallel is None or parallel.rank == 0)


def _params(args: argparse.Namespace):
    from dsv4rs.llm import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, stop=tuple(args.stop), seed=args.seed)


def _prompt(llm, args: argparse.Namespace) -> list[int]:
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        return llm.encode_chat(messages + [{"role": "user", "content": args.prompt}])
    return llm.encode(args.prompt)


WORLD_TIMEOUT = 3600.0
"""Seconds the processes of ``generate --world`` may take (a collective's timeout too)."""


def _launch(main, args: argparse.Namespace) -> int:
    """``main`` on ``args.world`` processes (:func:`dsv4rs.parallel.launch.launch`), one GPU each
    when the device is CUDA."""
    import os

    import torch

    from dsv4rs.parallel.launch import launch

    gpu = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    if gpu and "RANK" not in os.environ and torch.cuda.device_count() < args.world:
        raise ValueError(f"--world: {args.world} processes on one GPU each, torch sees {torch.cuda.device_count()}")
    args.device = "cuda" if gpu else "cpu"
    return launch(main, args.world, args, WORLD_TIMEOUT, "GPUs, NCCL" if gpu else "CPU, gloo")


def _rank_llm(rank: int, world: int, init_method: str, args: argparse.Namespace, max_sequences: int | None):
    """This process's share of a parallel LLM (the process group joined first)."""
    import datetime
    import os

    import torch
    import torch.distributed as dist

    from dsv4rs import parallel
    from dsv4rs.model import V4Config

    device = None
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        device = f"cuda:{torch.cuda.current_device()}"
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", init_method=init_method, rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=WORLD_TIMEOUT))
    pc = parallel.ParallelConfig.even(V4Config.from_pretrained(args.checkpoint), world, rank, timeout=WORLD_TIMEOUT,
                                      mode=args.parallel)
    return _llm(args, max_sequences, parallel=pc, device=device)


def generate(args: argparse.Namespace) -> int:
    params = _params(args)
    if args.world > 1:
        return _launch(_generate_rank, args)
    llm = _llm(args, args.max_sequences or 2)
    prompt = _prompt(llm, args)
    llm.max_tokens(len(prompt), params)
    t0 = time.perf_counter()
    for d in llm.stream(prompt, params):
        sys.stdout.write(d.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    _report(llm, prompt, d.completion, t0)
    return 0


def _generate_rank(rank: int, world: int, init_method: str, args: argparse.Namespace) -> int:
    """One process of ``generate --world``: its share of the model, the prompt generated over
    every process (:class:`dsv4rs.llm.LLM` with ``parallel=``); rank 0 streams the text."""
    import torch.distributed as dist

    try:
        llm = _rank_llm(rank, world, init_method, args, args.max_sequences or 2)
        prompt = _prompt(llm, args)
        params = _params(args)
        llm.max_tokens(len(prompt), params)
        t0 = time.perf_counter()
        for d in llm.stream(prompt, params):  # every rank gets rank 0's deltas
            if rank == 0:
                sys.stdout.write(d.text)
                sys.stdout.flush()
        if rank == 0:
            held = llm.parallel.experts
            sys.stdout.write("\n")
            print(f"-- over {world} processes ({args.parallel}; rank 0's share: experts {held.start}..{held.stop - 1})")
            _report(llm, prompt, d.completion, t0)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _report(llm, prompt: list[int], c, t0: float) -> None:
    tokens, first = len(c.token_ids), c.time_to_first_token or 0.0
    decode = c.elapsed - first
    rate = f"{(tokens - 1) / decode:,.1f}" if tokens > 1 and decode > 0 else "n/a"
    total = len(prompt) + tokens
    cache = llm.engine.cache_config.footprint(total).total
    acc = "n/a (no speculation)" if not llm.speculative else (
        "n/a (no draft verified)" if c.acceptance_rate is None else f"{c.acceptance_rate:.0%} ({c.accepted}/{c.drafted})")
    print(f"-- {tokens} tokens ({c.finish_reason}) in {time.perf_counter() - t0:.2f} s")
    print(f"-- decode: {rate} tokens/s after the first; time to first token: {1000 * first:,.0f} ms "
          f"(prompt: {len(prompt)} tokens)")
    print(f"-- acceptance rate: {acc}; KV cache: {cache / total:,.0f} B/token ({cache:,} B for {total} tokens)")


def serve(args: argparse.Namespace) -> int:
    from dsv4rs.serve import serve as run

    if args.world > 1:
        import os
        import signal

        if "RANK" not in os.environ:  # rank 0's server takes Ctrl-C; the launcher and the followers ignore it
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        return _launch(_serve_rank, args)
    llm = _llm(args, args.max_sequences)
    run(llm, host=args.host, port=args.port, shutdown_grace=args.shutdown_grace, model_name=args.model_name,
        max_pending=args.max_pending)
    return 0


def _serve_rank(rank: int, world: int, init_method: str, args: argparse.Namespace) -> int:
    """One process of ``serve --world``: rank 0 serves (:class:`dsv4rs.serve.parallel.Leader` in
    the LLM's place), the others follow it until it stops."""
    import signal

    import torch.distributed as dist

    from dsv4rs.serve import serve as run
    from dsv4rs.serve.parallel import Leader, follow

    try:
        llm = _rank_llm(rank, world, init_method, args, args.max_sequences)
        if rank:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 stops them
            follow(llm)
            return 0
        leader = Leader(llm)
        try:
            run(leader, host=args.host, port=args.port, shutdown_grace=args.shutdown_grace,
                model_name=args.model_name, max_pending=args.max_pending)
        finally:
            leader.close()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
