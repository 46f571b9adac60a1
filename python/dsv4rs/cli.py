"""dsv4rs: DeepSeek-V4's long-context attention machinery (Rust + CUDA) from the command line.

commands:
  info    the version, the embedded CUDA kernels and their GPU targets, the cache formats, and
          the CUDA driver and GPUs found (never fails for lack of a GPU)
  cost    FLOPs per decode token and KV-cache bytes per token of DeepSeek-V4-Pro and -Flash
          against V3.2, V3 (dense MLA) and GQA-8 by context length (--json: the breakdown,
          --plot FILE.png: a chart, needs matplotlib)
  demo    a small V4 (seeded weights, nothing downloaded) prefilling and decoding two prompts
          through the paged KV cache and the kernels (GPU if present), then checked against the
          float64 reference (--no-check skips that); prints tokens/s, cache bytes and FLOPs
  bench   times the ops on the device beside torch eager, with the fraction of the roofline
          floor measured in the same run
  plan    divides a GPU's memory between a model's weights, the workspace and the KV cache and
          says how many sequences of which length fit
  generate  a checkpoint's continuation of a prompt (--chat: its reply through the chat template),
          streamed, then tokens/s, time to first token and the speculative acceptance rate
  serve   an OpenAI-compatible HTTP server for a checkpoint

"dsv4rs COMMAND --help" describes a command's options. Errors print one line and exit with
status 2 (bad arguments) or 1 (anything else).
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import math
import os
import sys

from dsv4rs import _core, bench, cost
from dsv4rs.model.config import PRESETS, preset


class CommandError(Exception):
    """A failure the command reports in one line (exit status 1)."""


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
        sys.stdout.flush()
        try:
            cost.plot(args.plot, args.main_format, args.index_format)
        except OSError as e:
            raise CommandError(f"--plot: cannot write {args.plot} ({e.strerror or e})") from None
        print(f"dsv4rs cost: wrote the plot to {args.plot}", file=sys.stderr)
    return 0


def _check_plot(path: str) -> str | None:
    """Why ``--plot path`` cannot work (checked before the table prints), or None."""
    try:
        formats = cost.plot_formats()
    except ImportError:
        return f"--plot needs matplotlib, which is not installed: {cost.PLOT_INSTALL}"
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"--plot: {path} is a directory; give a file name such as cost.png"
    if not os.path.isdir(folder):
        return f"--plot: the folder {folder} does not exist"
    if not os.access(folder, os.W_OK) and not os.access(path, os.W_OK):
        return f"--plot: cannot write into {folder}"
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    if ext and ext not in formats:
        return f"--plot: {path!r} names no image format matplotlib writes; end it in .png, .svg or .pdf"
    return None


def _tokens(text: str) -> int:
    """A number of tokens: ``4096``, ``128K`` (131,072) or ``1M`` (1,048,576)."""
    t = text.strip().upper()
    unit = {"K": 1 << 10, "M": 1 << 20}.get(t[-1:], 1)
    digits = t[:-1] if unit > 1 else t
    try:
        value = int(digits) * unit
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens such as 4096, 128K or 1M, got {text!r}") from None
    if value > MAX_TOKENS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_TOKENS:,} tokens (1T), got {value:,}")
    return value


MAX_TOKENS = 1 << 40
"""The longest context ``dsv4rs cost`` and ``plan`` take."""


def _bounded_int(low: int, high: int):
    """An argparse type: an int in ``[low, high]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an int in [{low:,}, {high:,}], got {value:,}")
        return value

    parse.__name__ = "int"
    return parse


_positive_int = _bounded_int(1, MAX_TOKENS)
"""An argparse type: a count of tokens, sequences or requests, 1 to :data:`MAX_TOKENS`."""


def _finite_float(text: str) -> float:
    """An argparse type: a finite float (the sampling parameters check their own ranges)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


_finite_float.__name__ = "float"


def _bounded_float(low: float, high: float):
    """An argparse type: a float in ``[low, high]``."""

    def parse(text: str) -> float:
        value = _finite_float(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected a number in [{low:g}, {high:g}], got {value:g}")
        return value

    parse.__name__ = "float"
    return parse


def _int_list(high: int):
    """An argparse type: ``1,8,32``, each in ``[1, high]``."""
    one = _bounded_int(1, high)

    def parse(text: str) -> list[int]:
        return [one(t) for t in text.split(",") if t.strip()] or [one("")]

    parse.__name__ = "list of ints"
    return parse


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
    if not value * units[unit] <= 1 << 60:
        raise argparse.ArgumentTypeError(f"expected a size of at most 1 EiB, got {text!r}")
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


DEMO_MAX_PROMPT = 1 << 16
DEMO_MAX_NEW_TOKENS = 4096
DEMO_MAX_WORLD = 64


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run (default: a CUDA GPU if there is one, else the CPU)")
    p.add_argument("--prompt-len", type=_bounded_int(1, DEMO_MAX_PROMPT), default=700,
                   help=f"tokens of the longer prompt, 1 to {DEMO_MAX_PROMPT} (default 700)")
    p.add_argument("--new-tokens", type=_bounded_int(1, DEMO_MAX_NEW_TOKENS), default=32,
                   help=f"tokens generated per sequence, 1 to {DEMO_MAX_NEW_TOKENS} (default 32)")
    p.add_argument("--no-quant", dest="quant", action="store_false",
                   help="store unquantized rows instead of FP8 entries and FP4 indexer keys")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the check against the float64 reference (on the CPU most of the run)")
    p.add_argument("--seed", type=_bounded_int(0, (1 << 32) - 1), default=0,
                   help="seed of the weights and prompts, 0 to 2^32 - 1 (default 0)")
    p.add_argument("--world", type=_bounded_int(1, DEMO_MAX_WORLD), default=1,
                   help=f"run on this many CPU processes (gloo), 1 to {DEMO_MAX_WORLD}, checked against one process "
                   "(default 1: the single-process demo)")
    p.add_argument("--parallel", choices=["dp", "tp"], default="dp",
                   help="with --world: data-parallel attention (dp, default) or tensor-parallel attention (tp); "
                   "experts split over the processes either way")


def _text_arguments(gen: argparse.ArgumentParser, srv: argparse.ArgumentParser) -> None:
    """The arguments of generate and serve (:mod:`dsv4rs.textcli` reads them)."""
    for p in (gen, srv):
        p.add_argument("checkpoint", help="folder with config.json, safetensors shards, tokenizer.json and "
                       "tokenizer_config.json")
        p.add_argument("--device", choices=["cpu", "cuda"], help="where to run (default: a CUDA GPU if there is one)")
        p.add_argument("--dtype", choices=["float32", "bfloat16"], help="weights (default: bf16 on a GPU, else fp32)")
        p.add_argument("--dequantize", dest="quantized", action="store_false", help="dequantize the checkpoint's FP8 "
                       "linears and MXFP4 experts to --dtype (default: run them as stored)")
        p.add_argument("--activations", choices=["fp8", "bf16"], default="fp8", help="rounding of the quantized "
                       "weights' activations: fp8 per 1x128 block, DeepSeek's W8A8 (default), or bf16")
        p.add_argument("--rope-table", choices=["official", "exact"], default="official", help="RoPE angles: "
                       "DeepSeek's float32 table (default) or exact float64 angles")
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
    gen.add_argument("--temperature", type=_finite_float, default=0.0, help="0: greedy (default)")
    gen.add_argument("--top-p", type=_finite_float, default=1.0)
    gen.add_argument("--top-k", type=_bounded_int(-1, 1 << 31), default=0, help="0 or -1: off (default 0)")
    gen.add_argument("--min-p", type=_finite_float, default=0.0)
    gen.add_argument("--repetition-penalty", type=_finite_float, default=1.0)
    gen.add_argument("--presence-penalty", type=_finite_float, default=0.0)
    gen.add_argument("--frequency-penalty", type=_finite_float, default=0.0)
    gen.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    for p in (gen, srv):
        p.add_argument("--world", type=_bounded_int(1, DEMO_MAX_WORLD), default=1,
                       help=f"run over this many processes, 1 to {DEMO_MAX_WORLD} (default 1): spawned here (gloo on "
                       "the CPU, NCCL on one GPU each), or the ones torchrun started; rank 0 "
                       f"{'prints' if p is gen else 'serves'}")
        p.add_argument("--parallel", choices=["dp", "tp"], default="dp",
                       help="with --world: data-parallel (dp, default) or tensor-parallel (tp) attention; experts "
                       "split over the processes either way")
    gen.add_argument("--seed", type=_bounded_int(0, (1 << 63) - 1), help="seed of the samples (default: random)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=_bounded_int(0, 65535), default=8000, help="default 8000")
    srv.add_argument("--model-name", help="the model id the API reports (default: the checkpoint folder's name)")
    srv.add_argument("--max-pending", type=_positive_int, default=64, help="requests in flight before 429 (default 64)")
    srv.add_argument("--shutdown-grace", type=_bounded_float(0.0, 3600.0), default=30.0,
                     help="seconds running requests get to finish at shutdown before they are aborted (default 30)")


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="dsv4rs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dsv4rs {_core.build_info()['version']}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    subs: dict[str, argparse.ArgumentParser] = {}

    def add(name: str, help: str, description: str) -> argparse.ArgumentParser:
        subs[name] = sub.add_parser(name, help=help, description=description)
        return subs[name]

    add("info", "version, embedded CUDA kernels and their targets, driver and GPUs",
        "Prints the version, the embedded CUDA kernel modules and their GPU targets, the cache byte formats, and "
        "the CUDA driver and GPUs found (or why none). Never fails for lack of a GPU.")
    cost_parser = add("cost", "FLOPs and KV bytes per token of V4 and baselines by context",
                      "Tabulates FLOPs per decode token and KV-cache bytes per token of DeepSeek-V4-Pro and -Flash "
                      "against V3.2, V3 (dense MLA) and GQA-8 at several context lengths (dsv4rs.cost).")
    cost_parser.add_argument("--context", type=_tokens, action="append", metavar="TOKENS",
                             help="context length in tokens, e.g. 5000, 128K or 1M (repeatable; default 4K 64K 128K 1M)")
    cost_parser.add_argument("--main-format", choices=cost.MAIN_FORMATS, default="fp8")
    cost_parser.add_argument("--index-format", choices=cost.INDEX_FORMATS, default="fp4")
    cost_parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    cost_parser.add_argument("--plot", metavar="FILE.png", help="draw FLOPs and bytes against context length "
                             "(needs matplotlib: pip install 'dsv4rs[plot]')")
    bench_parser = add("bench", "time the ops beside torch eager, with roofline fractions",
                       "Times the ops on the device beside torch eager and prints time, throughput and the fraction "
                       "of the roofline floor per case, from ceilings measured in the same run (dsv4rs.bench).")
    bench_parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                              help="where to run (default: a CUDA GPU if there is one, else the CPU)")
    bench_parser.add_argument("--quick", action="store_true", help="fewer sizes (GPU)")
    bench_parser.add_argument("--only", nargs="*", choices=list(bench.SUITES),
                              help="suites to run (default: all but model, which builds a model of several GB)")
    bench_parser.add_argument("--preset", choices=list(PRESETS), help="model suite: the model's width "
                              "(default v4-flash on a GPU, demo on the CPU)")
    bench_parser.add_argument("--layers", type=_bounded_int(1, 1024), help="model suite: layers of the preset (default 4)")
    bench_parser.add_argument("--batch", type=_int_list(4096), help="model suite: decode batch sizes, e.g. 1,8,32,64,128")
    bench_parser.add_argument("--context", type=_int_list(1 << 20), help="model suite: context lengths, e.g. 4096,131072")
    bench_parser.add_argument("--weights", choices=["bf16", "shipped"], default="bf16",
                              help="model suite: bfloat16 matrices, or the formats DeepSeek ships (FP8 linears, "
                                   "MXFP4 experts) as load_checkpoint keeps them")
    bench_parser.add_argument("--world", type=_bounded_int(1, DEMO_MAX_WORLD), default=1,
                              help="model suite over this many processes (CPU: gloo; GPU: NCCL, one GPU each), "
                              "beside one process (default 1)")
    bench_parser.add_argument("--parallel", choices=["dp", "tp"], default="dp",
                              help="with --world: data-parallel (dp, default) or tensor-parallel (tp) attention")
    plan_parser = add("plan", "how many sequences of which length fit beside a model's weights",
                      "Divides a GPU's memory between a preset's weights, the workspace and the KV cache and says "
                      "how many sequences of which length fit (dsv4rs.runtime.memory).")
    plan_parser.add_argument("--preset", choices=list(PRESETS), default="v4-flash", help="the model (default v4-flash)")
    plan_parser.add_argument("--device-memory", type=_size, default=141 << 30, metavar="SIZE",
                             help="memory of one GPU, e.g. 80G (default: an H200's 141 GiB)")
    plan_parser.add_argument("--gpus", type=_bounded_int(1, 1 << 16), default=1, help="GPUs the routed experts are "
                             "split over (expert parallelism; default 1)")
    plan_parser.add_argument("--weights", choices=["shipped", "bf16", "float32"], default="shipped",
                             help="weight format: as DeepSeek ships it (FP8 + MXFP4), or all bf16 / float32")
    plan_parser.add_argument("--max-len", type=_tokens, metavar="TOKENS", help="the longest sequence, e.g. 128K "
                             "(default: as many sequences of min(max_position_embeddings, 128K) as fit, or the "
                             "longest for --max-sequences)")
    plan_parser.add_argument("--max-sequences", type=_bounded_int(1, 1 << 24), help="sequences held at once")
    plan_parser.add_argument("--no-quant", dest="quant", action="store_false", help="bf16 cache rows")
    plan_parser.add_argument("--token-budget", type=_bounded_int(1, 1 << 24), default=2048,
                             help="tokens of one step (default 2048)")
    plan_parser.add_argument("--graph-batch", type=_bounded_int(1, 1 << 16), default=256,
                             help="largest captured decode batch (default 256)")
    demo_parser = add("demo", "a small V4 generating through the paged cache, checked against the float64 reference",
                      "Builds a small DeepSeek-V4 (seeded weights, nothing downloaded), prefills two prompts and "
                      "decodes through the paged KV cache with the dsv4rs kernels (a GPU if there is one), prints "
                      "tokens/s, cache bytes and FLOPs per token, then checks the logits against the float64 "
                      "reference forward pass (dsv4rs.demo). Ends with OK (exit 0) or MISMATCH (exit 1).")
    _demo_arguments(demo_parser)
    add("generate", "a checkpoint's text for a prompt, streamed, with timings",
        "Loads a checkpoint (config.json, safetensors, tokenizer.json, tokenizer_config.json) and prints its "
        "continuation of --prompt (with --chat: its reply through the chat template) as it comes, then tokens/s, "
        "time to first token, the speculative acceptance rate and the cache bytes per token (dsv4rs.llm).")
    add("serve", "an OpenAI-compatible HTTP server for a checkpoint",
        "Serves a checkpoint over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models) with "
        "continuous batching (dsv4rs.serve).")
    _text_arguments(subs["generate"], subs["serve"])
    return parser, subs


def _run(argv: list[str] | None) -> int:
    parser, subs = _parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "cost":
        if args.plot and (why := _check_plot(args.plot)):
            subs["cost"].error(why)
        try:
            return cost_command(args)
        except ValueError as e:
            subs["cost"].error(str(e))
    if args.command == "bench":
        if args.world > 1:
            if args.only != ["model"]:
                subs["bench"].error("--world: only the model suite runs over several processes (--only model)")
            import torch

            from dsv4rs.parallel import bench as parallel_bench  # imports torch

            if args.device == "auto":
                args.device = "cuda" if torch.cuda.is_available() else "cpu"
            return parallel_bench.run(args)
        return bench.run_command(args)
    if args.command == "plan":
        try:
            return plan_command(args)
        except ValueError as e:
            subs["plan"].error(str(e).replace("memory: ", "--device-memory: ", 1))
    if args.command == "demo":
        if args.world > 1:
            if args.device == "cuda":
                subs["demo"].error("--world: the multi-process demo runs CPU processes over gloo; use --device cpu")
            from dsv4rs.parallel import demo as parallel_demo  # imports torch

            return parallel_demo.run(args)
        from dsv4rs import demo  # imports torch

        return demo.run(args)
    if args.command in ("generate", "serve"):
        from dsv4rs import textcli  # imports torch

        command, p = (textcli.generate if args.command == "generate" else textcli.serve), subs[args.command]
        try:
            return command(args)
        except (ValueError, FileNotFoundError) as e:
            p.error(str(e))
    parser.error(f"unknown command {args.command}")
    return 2


def main(argv: list[str] | None = None) -> int:
    """The ``dsv4rs`` command; returns the exit status (argument errors, ``--help`` and
    ``--version`` raise ``SystemExit`` as argparse does). Failures print one line on stderr
    (status 1; bad arguments: 2); a closed output pipe (``dsv4rs cost | head -1``) ends quietly
    with status 1."""
    try:
        try:
            status = _run(argv)
        finally:  # what is printed must reach the output (or fail) here, not at exit
            if sys.stdout is not None:
                sys.stdout.flush()
        return status
    except CommandError as e:
        _flush_quietly()
        print(f"dsv4rs: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _flush_quietly()
        print("dsv4rs: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        _silence_stdout()
        if e.errno != errno.EPIPE:
            where = f": {e.filename}" if e.filename else " (writing the output)" if e.errno in (errno.ENOSPC, errno.EIO) else ""
            print(f"dsv4rs: {e.strerror or e}{where}", file=sys.stderr)
        return 1


def _flush_quietly() -> None:
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except OSError:
        _silence_stdout()


def _silence_stdout() -> None:
    """Points stdout at /dev/null, so that the interpreter's last flush of text that can no
    longer be written (a closed pipe, a full disk) raises nothing at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):  # stdout replaced by something without a descriptor
        pass


if __name__ == "__main__":
    sys.exit(main())
