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

``dsv4rs generate CHECKPOINT --prompt TEXT`` prints a checkpoint's continuation of a prompt (or
with ``--chat`` its reply through the chat template) as it comes, then tokens/s, time to first
token, the speculative acceptance rate and the cache bytes per token; ``dsv4rs serve CHECKPOINT``
runs the OpenAI-compatible HTTP server (:mod:`dsv4rs.llm`, :mod:`dsv4rs.serve`).

``dsv4rs plan`` divides a device's memory between a model's weights, the workspace and the KV
cache, and says how many sequences of which length fit (:mod:`dsv4rs.runtime.memory`).
"""

from __future__ import annotations

import argparse
import json
import sys

from dsv4rs import _core, bench, cost
from dsv4rs.model.config import PRESETS, preset


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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


def _int_list(text: str) -> list[int]:
    """``1,8,32`` (each >= 1)."""
    return [_positive_int(t) for t in text.split(",") if t.strip()] or [_positive_int("")]


def _size(text: str) -> int:
    """``141G``, ``80GiB``, ``512M`` or a plain number of bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in units else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 141G or 80GiB, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return int(value * units[unit])


def plan_command(args: argparse.Namespace) -> int:
    from dsv4rs.cache import CacheConfig
    from dsv4rs.runtime.memory import plan_memory, weight_bytes

    cfg = preset(args.preset)
    cache = CacheConfig(cfg.compress_ratios, window=cfg.sliding_window,
                        index_format="fp4" if args.quant else "bf16", main_format="fp8" if args.quant else "bf16")
    weights = weight_bytes(cfg, args.weights, args.gpus)
    plan = plan_memory(cfg, args.device_memory, cache, weights, max_len=args.max_len, max_sequences=args.max_sequences,
                       token_budget=args.token_budget, graph_batch=args.graph_batch)
    print(f"{args.preset}: {args.weights} weights, {'FP8 entries + FP4 indexer keys' if args.quant else 'bf16 rows'}; "
          f"per GPU of {args.gpus} (routed experts split over them, the rest replicated): "
          f"{args.device_memory / (1 << 30):,.1f} GiB")
    print(plan.describe())
    return 0


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run (default: a CUDA GPU if there is one, else the CPU)")
    p.add_argument("--prompt-len", type=int, default=700, help="tokens of the longer prompt (default 700)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sequence (default 32)")
    p.add_argument("--no-quant", dest="quant", action="store_false",
                   help="store unquantized rows instead of FP8 entries and FP4 indexer keys")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and prompts")


def _text_arguments(gen: argparse.ArgumentParser, srv: argparse.ArgumentParser) -> None:
    """The arguments of generate and serve (:mod:`dsv4rs.textcli` reads them)."""
    for p in (gen, srv):
        p.add_argument("checkpoint", help="folder with config.json, safetensors shards, tokenizer.json and "
                       "tokenizer_config.json")
        p.add_argument("--device", choices=["cpu", "cuda"], help="where to run (default: a CUDA GPU if there is one)")
        p.add_argument("--dtype", choices=["float32", "bfloat16"], help="weights (default: bf16 on a GPU, else fp32)")
        p.add_argument("--max-len", type=_positive_int, default=4096, help="the longest sequence in tokens "
                       "(default 4096)")
        p.add_argument("--max-sequences", type=_positive_int, help="sequences the cache holds (generate: default 2; "
                       "serve: as many as the memory planner fits)")
        p.add_argument("--quant", action="store_true", help="FP8 cache entries and FP4 indexer keys")
        p.add_argument("--no-speculative", dest="speculative", action="store_false", default=None,
                       help="decode without the MTP block's drafts")
    gen.add_argument("--prompt", required=True, help="the prompt (with --chat: the user message)")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    gen.add_argument("--system", help="with --chat: a system message first")
    gen.add_argument("--max-tokens", type=_positive_int, default=128, help="tokens to generate at most (default 128)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--presence-penalty", type=float, default=0.0)
    gen.add_argument("--frequency-penalty", type=float, default=0.0)
    gen.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    gen.add_argument("--seed", type=int, help="seed of the samples (default: random)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="default 8000")
    srv.add_argument("--model-name", help="the model id the API reports (default: the checkpoint folder's name)")
    srv.add_argument("--max-pending", type=_positive_int, default=64, help="requests in flight before 429 (default 64)")
    srv.add_argument("--shutdown-grace", type=float, default=30.0,
                     help="seconds running requests get to finish at shutdown before they are aborted (default 30)")


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
    bench_parser.add_argument("--only", nargs="*", choices=list(bench.SUITES),
                              help="suites to run (default: all but model, which builds a model of several GB)")
    bench_parser.add_argument("--preset", choices=list(PRESETS), help="model suite: the model's width "
                              "(default v4-flash on a GPU, demo on the CPU)")
    bench_parser.add_argument("--layers", type=_positive_int, help="model suite: layers of the preset (default 4)")
    bench_parser.add_argument("--batch", type=_int_list, help="model suite: decode batch sizes, e.g. 1,8,32,64,128")
    bench_parser.add_argument("--context", type=_int_list, help="model suite: context lengths, e.g. 4096,131072")
    plan_parser = sub.add_parser("plan", help="how many sequences of which length fit beside a model's weights")
    plan_parser.add_argument("--preset", choices=list(PRESETS), default="v4-flash", help="the model (default v4-flash)")
    plan_parser.add_argument("--device-memory", type=_size, default=141 << 30, metavar="SIZE",
                             help="memory of one GPU, e.g. 80G (default: an H200's 141 GiB)")
    plan_parser.add_argument("--gpus", type=int, default=1, help="GPUs the routed experts are split over "
                             "(expert parallelism; default 1)")
    plan_parser.add_argument("--weights", choices=["shipped", "bf16", "float32"], default="shipped",
                             help="weight format: as DeepSeek ships it (FP8 + MXFP4), or all bf16 / float32")
    plan_parser.add_argument("--max-len", type=int, help="the longest sequence (default: as many sequences of "
                             "min(max_position_embeddings, 128K) as fit, or the longest for --max-sequences)")
    plan_parser.add_argument("--max-sequences", type=int, help="sequences held at once")
    plan_parser.add_argument("--no-quant", dest="quant", action="store_false", help="bf16 cache rows")
    plan_parser.add_argument("--token-budget", type=int, default=2048, help="tokens of one step (default 2048)")
    plan_parser.add_argument("--graph-batch", type=int, default=256, help="largest captured decode batch (default 256)")
    demo_parser = sub.add_parser("demo", help="a small V4 generating through the paged cache, checked against "
                                              "the float64 reference")
    _demo_arguments(demo_parser)
    gen_parser = sub.add_parser("generate", help="a checkpoint's text for a prompt, streamed, with timings")
    serve_parser = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a checkpoint")
    _text_arguments(gen_parser, serve_parser)
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
    if args.command == "plan":
        try:
            return plan_command(args)
        except ValueError as e:
            plan_parser.error(str(e).replace("memory: ", "--device-memory: ", 1))
    if args.command == "demo":
        if args.prompt_len < 1 or args.new_tokens < 1:
            demo_parser.error("--prompt-len and --new-tokens must be >= 1")
        from dsv4rs import demo  # imports torch

        return demo.run(args)
    if args.command in ("generate", "serve"):
        from dsv4rs import textcli  # imports torch

        command, p = (textcli.generate, gen_parser) if args.command == "generate" else (textcli.serve, serve_parser)
        try:
            return command(args)
        except (ValueError, FileNotFoundError) as e:
            p.error(str(e))
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
