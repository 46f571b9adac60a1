"""The ``dsv4rs`` command.

``dsv4rs info`` prints the version, the embedded CUDA kernels and their GPU targets, and whether
a CUDA driver and GPU were found. It never fails for lack of a GPU.

``dsv4rs cost`` tabulates FLOPs per decode token and KV-cache bytes per token of DeepSeek-V4-Pro
and -Flash against V3.2, V3 (dense MLA) and GQA-8 at several context lengths (the cost model of
:mod:`dsv4rs.cost`); ``--json`` prints the full breakdown, ``--plot FILE.png`` draws it.

``dsv4rs demo`` builds a small DeepSeek-V4 (seeded weights), prefills two prompts and decodes
through the paged KV cache with the dsv4rs kernels (GPU if present), checks every generated
token's logits against the float64 reference and prints tokens/s, cache bytes per token and
FLOPs per token (:mod:`dsv4rs.demo`).

``dsv4rs bench`` times the ops on the available device beside torch eager and prints time,
throughput and the fraction of the roofline floor per case (:mod:`dsv4rs.bench`).
"""

from __future__ import annotations

import argparse
import json
import sys

from dsv4rs import _core, bench, cost


def info() -> int:
    build = _core.build_info()
    print(f"dsv4rs {build['version']}")
    modules = build["kernel_modules"]
    if modules:
        listing = ", ".join(f"{name} ({size // 1024} KiB)" for name, size in modules)
        print(f"CUDA kernels embedded: {len(modules)} modules: {listing}")
        print(f"GPU targets: {' '.join(build['gpu_targets'])}")
    else:
        print("CUDA kernels embedded: none (CPU-only build)")
    print(
        f"cache formats: {build['page_rows']}-row pages; main entry {build['main_entry_bytes']} B, "
        f"indexer key {build['index_key_fp4_bytes']} B (FP4) / {build['index_key_fp8_bytes']} B (FP8)"
    )
    try:
        version, devices = _core.cuda_devices()
    except _core.CudaError as e:
        print(f"CUDA driver: not available ({e})")
        return 0
    print(f"CUDA driver: {version // 1000}.{version % 1000 // 10}")
    if not devices:
        print("GPUs: none found")
    for index, name, (major, minor), sms in devices:
        kernel = _core.attention_kernel(index) if modules else "none (CPU-only build)"
        print(f"GPU {index}: {name}, sm_{major}{minor}, {sms} multiprocessors; attention kernel: {kernel}")
    return 0


def _context_label(tokens: int) -> str:
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if tokens % size == 0:
            return f"{tokens // size}{unit}"
    return str(tokens)


def cost_table(rows: list[dict]) -> str:
    """The rows of :func:`dsv4rs.cost.compare` as a text table, then how the FLOP ratios at 1M
    compare with the paper's."""
    header = (
        f"{'model':<9}{'context':>8}{'GFLOP/tok':>11}{'vs V3.2':>9}{'vs GQA-8':>9}"
        f"{'KV B/tok':>11}{'vs V3.2':>9}{'vs GQA-8':>9}{'compressed B/tok':>18}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['model']:<9}{_context_label(r['context']):>8}{r['total_flops'] / 1e9:>11,.1f}"
            f"{r['flops_vs_v3.2']:>9.1%}{r['flops_vs_gqa-8']:>9.1%}{r['kv_bytes_per_token']:>11,.1f}"
            f"{r['kv_bytes_vs_v3.2']:>9.1%}{r['kv_bytes_vs_gqa-8']:>9.1%}{r['compressed_bytes_per_token']:>18,.1f}"
        )
    lines.append("")
    lines.append("KV B/tok: everything a sequence holds (V4: window and compressor state included) / context.")
    for r in rows:
        if r["context"] == 1 << 20 and r["model"] in cost.PAPER_FLOPS_VS_V3_2:
            lines.append(
                f"{r['model']} FLOPs vs V3.2 at 1M: {r['flops_vs_v3.2']:.1%} here (2 per multiply-add, any dtype), "
                f"{cost.PAPER_FLOPS_VS_V3_2[r['model']]:.0%} in the paper (equivalent FP8 FLOPs)"
            )
    return "\n".join(lines)


def cost_command(args: argparse.Namespace) -> int:
    rows = cost.compare(tuple(args.context or cost.CONTEXTS), args.main_format, args.index_format)
    print(json.dumps(rows, indent=2) if args.json else cost_table(rows))
    if args.plot:
        cost.plot(args.plot, args.main_format, args.index_format)
    return 0


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run (default: a CUDA GPU if there is one, else the CPU)")
    p.add_argument("--prompt-len", type=int, default=700, help="tokens of the longer prompt (default 700)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sequence (default 32)")
    p.add_argument("--no-quant", dest="quant", action="store_false",
                   help="store unquantized rows instead of FP8 entries and FP4 indexer keys")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and prompts")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsv4rs", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, embedded CUDA kernels and their targets, driver and GPUs")
    cost_parser = sub.add_parser("cost", help="FLOPs and KV bytes per token of V4 and baselines by context")
    cost_parser.add_argument(
        "--context", type=int, action="append", help="context length in tokens (repeatable; default 4K 64K 128K 1M)"
    )
    cost_parser.add_argument("--main-format", choices=cost.MAIN_FORMATS, default="fp8")
    cost_parser.add_argument("--index-format", choices=cost.INDEX_FORMATS, default="fp4")
    cost_parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    cost_parser.add_argument("--plot", metavar="FILE.png", help="draw FLOPs and bytes against context length")
    bench_parser = sub.add_parser("bench", help="time the ops beside torch eager, with roofline fractions")
    bench_parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                              help="where to run (default: a CUDA GPU if there is one, else the CPU)")
    bench_parser.add_argument("--quick", action="store_true", help="fewer sizes (GPU)")
    bench_parser.add_argument("--only", nargs="*", choices=list(bench.SUITES), help="suites to run (default: all)")
    demo_parser = sub.add_parser("demo", help="a small V4 generating through the paged cache, checked against "
                                              "the float64 reference")
    _demo_arguments(demo_parser)
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "cost":
        try:
            return cost_command(args)
        except ValueError as e:
            cost_parser.error(str(e))
    if args.command == "bench":
        return bench.run_command(args)
    if args.command == "demo":
        if args.prompt_len < 1 or args.new_tokens < 1:
            demo_parser.error("--prompt-len and --new-tokens must be >= 1")
        from dsv4rs import demo  # imports torch

        return demo.run(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
