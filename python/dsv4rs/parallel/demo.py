"""``dsv4rs demo --world N``: the demo model over N CPU processes (gloo), data-parallel attention
and expert-parallel MoE (``--parallel dp``, the default) or tensor-parallel attention
(``--parallel tp``), checked against one process running the same steps.

Run it from the command line (it starts the processes itself), or under torchrun, which starts
them: ``torchrun --nproc-per-node 2 -m dsv4rs.parallel.demo [--parallel tp]``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

from dsv4rs.parallel.launch import launch

SEQUENCES = 4
TIMEOUT = 120.0
TOLERANCE = 1e-4
"""Largest |logit difference| from the single-process run that passes with unquantized rows
(float32 on both sides; they differ by summation order only)."""
QUANT_MEDIAN, QUANT_MAX = 1e-3, 0.1
"""With quantized rows: the median and largest |logit difference| that pass. Values that differ
in their last bits (summation order) can round to neighbouring FP8/FP4 codes, and a changed
indexer key can change a top-k choice, which moves a few logits further than rounding would."""


def _schedule(cfg, prompt_len: int, new_tokens: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts (lengths ``prompt_len``, 3/4, 1/2 and 1/4 of it) and the tokens fed after them
    (fixed, so every run feeds the same)."""
    g = torch.Generator().manual_seed(seed + 1)
    lens = [max(1, prompt_len * (SEQUENCES - i) // SEQUENCES) for i in range(SEQUENCES)]
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lens]
    fed = [torch.randint(0, cfg.vocab_size, (new_tokens,), generator=g).tolist() for _ in lens]
    return prompts, fed


def _run(engine, mine: list[int], prompts, fed) -> tuple[dict[int, torch.Tensor], float, float]:
    """Prefill then decode of the sequences ``mine``: each one's logits ``[1 + new_tokens, vocab]``,
    and the prefill and decode seconds."""
    ids = [engine.add_sequence()[0] for _ in mine]
    out: dict[int, list[torch.Tensor]] = {s: [] for s in mine}
    t0 = time.perf_counter()
    logits = engine.step(ids, [prompts[s] for s in mine])
    t1 = time.perf_counter()
    for i, s in enumerate(mine):
        out[s].append(logits[i])
    for step in range(len(fed[0])):
        logits = engine.step(ids, [[fed[s][step]] for s in mine])
        for i, s in enumerate(mine):
            out[s].append(logits[i])
    t2 = time.perf_counter()
    return {s: torch.stack(v) for s, v in out.items()}, t1 - t0, t2 - t1


def rank_main(rank: int, world: int, init_method: str, args: argparse.Namespace) -> int:
    """One rank: joins the group, runs its share, and rank 0 checks everything against one
    process. Returns the exit status (0: OK)."""
    import torch.distributed as dist

    from dsv4rs import parallel
    from dsv4rs.model import DeepseekV4, V4Config, init_random
    from dsv4rs.runtime import Engine

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT))
    cfg = V4Config.demo()
    prompts, fed = _schedule(cfg, args.prompt_len, args.new_tokens, args.seed)
    max_len = max(map(len, prompts)) + args.new_tokens + 1
    model = init_random(DeepseekV4(cfg), args.seed)
    pc = parallel.ParallelConfig.even(cfg, world, rank, mode=args.parallel, timeout=TIMEOUT)
    parallel.shard(model, pc)
    engine = Engine(model, max_sequences=SEQUENCES, max_len=max_len, quant=args.quant, parallel=pc)
    mine = list(range(SEQUENCES)) if args.parallel == "tp" else list(range(rank, SEQUENCES, world))
    if rank == 0:
        print(f"{world} ranks ({'tensor' if args.parallel == 'tp' else 'data'}-parallel attention, "
              f"experts split {[len(r) for r in pc.expert_ranges]}); rank 0 runs sequences {mine}", flush=True)
    logits, prefill_s, decode_s = _run(engine, mine, prompts, fed)
    gathered: list = [None] * world if rank == 0 else None
    dist.gather_object((rank, mine, {s: v for s, v in logits.items()}, prefill_s, decode_s), gathered, dst=0)
    dist.destroy_process_group()
    if rank != 0:
        return 0
    tokens = args.new_tokens
    for r, seqs, _, p, d in gathered:
        print(f"rank {r}: sequences {seqs}: prefill {p:.3f} s, decode {d:.3f} s "
              f"({len(seqs) * tokens / max(d, 1e-9):,.1f} tokens/s)")
    if not args.check:
        print("OK (not checked: --no-check)")
        return 0
    print("checking against one process running the same steps ...", flush=True)
    one = Engine(init_random(DeepseekV4(cfg), args.seed), max_sequences=SEQUENCES, max_len=max_len, quant=args.quant)
    want, _, _ = _run(one, list(range(SEQUENCES)), prompts, fed)
    diffs = torch.cat([(v - want[s]).abs().flatten() for _, _, got, _, _ in gathered for s, v in got.items()])
    worst, median = float(diffs.max()), float(diffs.median())
    if args.quant:
        ok = median <= QUANT_MEDIAN and worst <= QUANT_MAX
        bound = f"median <= {QUANT_MEDIAN:g}, max <= {QUANT_MAX:g} with quantized rows, whose FP8/FP4 rounding " \
                "can move values that differ in their last bits (summation order); --no-quant checks to 1e-4"
    else:
        ok = worst <= TOLERANCE
        bound = f"max <= {TOLERANCE:g}"
    print(f"|logit diff| median {median:.2e}, max {worst:.2e} over {SEQUENCES} sequences x {1 + tokens} steps ({bound})")
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


def run(args: argparse.Namespace) -> int:
    """Starts ``args.world`` processes (or, under torchrun, is one of them)."""
    return launch(rank_main, args.world, args, TIMEOUT * 4, "CPU, gloo")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv4rs.parallel.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    from dsv4rs.cli import _demo_arguments

    _demo_arguments(p)
    p.set_defaults(world=2, prompt_len=300, new_tokens=8)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
