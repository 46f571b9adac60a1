"""How DeepSeek's float32 RoPE table moves the logits as positions grow, beside exact angles
(``python benches/rope_precision.py [--tokens N] [--model demo|tiny]``; CPU, float64 reference).

A sequence is placed at positions ``P .. P + N - 1`` (RoPE only: what it attends is unchanged),
so with exact float64 angles its logits are the same at every ``P`` (RoPE is relative), and the
difference of DeepSeek's table (position and frequency in float32, their product rounded to
float32, float32 sine and cosine: ``dsv4rs.reference.ops.apply_rope(table="official")``) from
the exact logits at ``P = 0`` is what the table's rounding costs at that distance. For scale the
script prints what the production FP8/FP4 round trips and bfloat16 rows move at ``P = 0``.
Random weights: the magnitudes are this model's, the growth with ``P`` is the table's.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from dsv4rs.model import DeepseekV4, V4Config, init_random
from dsv4rs.model.config import ROPE_DIM
from dsv4rs.reference import ops as ref
from dsv4rs.reference.dense import dense_forward, float64_copy

OFFSETS = (0, 4096, 32768, 131072, (1 << 20) - 256)


def angle_error(freqs32: torch.Tensor, position: int) -> float:
    """Largest |float32 table angle - exact angle| (radians) over the frequencies at ``position``."""
    table = (torch.tensor([position], dtype=torch.float32)[:, None] * freqs32).double()
    return float((table - position * freqs32.double()).abs().max())


def stats(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    d = (a - b).abs()
    return float(d.median()), float(d.max()), float((a.argmax(-1) == b.argmax(-1)).double().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--model", choices=["demo", "tiny"], default="demo")
    args = p.parse_args()
    cfg = V4Config.demo() if args.model == "demo" else V4Config.tiny()
    model = float64_copy(init_random(DeepseekV4(cfg), seed=0))
    ids = torch.randint(0, cfg.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(1))
    y = cfg.yarn
    compressed = ref.official_inv_freq(ROPE_DIM, cfg.compress_rope_theta, y.factor, y.original_max_position_embeddings,
                                       y.beta_fast, y.beta_slow)
    plain = ref.official_inv_freq(ROPE_DIM, cfg.rope_theta)
    t0 = time.perf_counter()
    exact0 = dense_forward(model, ids, rope_table="exact")
    print(f"{args.model} model ({cfg.num_hidden_layers} layers, d={cfg.hidden_size}), {args.tokens} tokens; "
          f"one float64 pass {time.perf_counter() - t0:.1f} s; logits' own scale: median |logit| "
          f"{float(exact0.abs().median()):.3g}, max {float(exact0.abs().max()):.3g}")
    for name, kwargs in (("FP8/FP4 round trips (production storage)", dict(quant=True)),
                         ("bfloat16 rows", dict(row_dtype=torch.bfloat16))):
        med, mx, top = stats(dense_forward(model, ids, rope_table="exact", **kwargs), exact0)
        print(f"  for scale, at P = 0, {name}: |logit diff| median {med:.2e}, max {mx:.2e}, top-1 equal {100 * top:.1f} %")
    print(f"{'P':>9} {'angle err (rad)':>16} {'exact: max':>11} {'official: median':>17} {'max':>9} {'top-1 equal':>12}")
    for off in OFFSETS:
        last = off + args.tokens - 1
        err = max(angle_error(compressed, last), angle_error(plain, last))
        exact = dense_forward(model, ids, position_offset=off, rope_table="exact")
        official = dense_forward(model, ids, position_offset=off, rope_table="official")
        _, exact_max, _ = stats(exact, exact0)
        med, mx, top = stats(official, exact0)
        print(f"{off:>9} {err:16.2e} {exact_max:11.1e} {med:17.2e} {mx:9.2e} {100 * top:11.1f}%", flush=True)
    print("angle err: the table's largest angle error at the sequence's last position (any layer's frequencies); "
          f"exact: the exact angles' logits at P against P = 0 (RoPE is relative); {math.pi:.4f} rad is half a turn")


if __name__ == "__main__":
    main()
