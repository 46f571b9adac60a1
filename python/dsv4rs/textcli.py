"""``dsv4rs generate`` and ``dsv4rs serve``: a checkpoint's text interface from the command line
(:mod:`dsv4rs.llm`, :mod:`dsv4rs.serve`). Imported only by those two commands (it imports torch)."""

from __future__ import annotations

import argparse
import sys
import time


def _llm(args: argparse.Namespace, max_sequences: int | None):
    import torch

    from dsv4rs.llm import LLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, None: None}[args.dtype]
    return LLM(args.checkpoint, device=args.device, dtype=dtype, speculative=args.speculative,
               quantized=args.quantized, activations=args.activations, rope_table=args.rope_table,
               max_len=args.max_len,
               max_sequences=max_sequences, quant=args.quant, progress=True)


def generate(args: argparse.Namespace) -> int:
    from dsv4rs.llm import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, stop=tuple(args.stop), seed=args.seed)
    llm = _llm(args, args.max_sequences or 2)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt = llm.encode_chat(messages + [{"role": "user", "content": args.prompt}])
    else:
        prompt = llm.encode(args.prompt)
    llm.max_tokens(len(prompt), params)
    t0 = time.perf_counter()
    for d in llm.stream(prompt, params):
        sys.stdout.write(d.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    c = d.completion
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
    return 0


def serve(args: argparse.Namespace) -> int:
    from dsv4rs.serve import serve as run

    llm = _llm(args, args.max_sequences)
    run(llm, host=args.host, port=args.port, shutdown_grace=args.shutdown_grace, model_name=args.model_name,
        max_pending=args.max_pending)
    return 0
