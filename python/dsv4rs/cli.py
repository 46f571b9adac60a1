"""The ``dsv4rs`` command.

``dsv4rs info`` prints the version, the embedded CUDA kernels and their GPU targets, and whether
a CUDA driver and GPU were found. It never fails for lack of a GPU.
"""

from __future__ import annotations

import argparse
import sys

from dsv4rs import _core


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
        print(f"GPU {index}: {name}, sm_{major}{minor}, {sms} multiprocessors")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsv4rs", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, embedded CUDA kernels and their targets, driver and GPUs")
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
