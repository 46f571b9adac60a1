"""The GPU benchmark table of scripts/gpu_check.sh: ``dsv4rs bench`` on the CUDA device
(``python benches/gpu_bench.py [--quick] [--only SUITE ...]``). The benchmark code itself lives
in :mod:`dsv4rs.bench`; this folder holds only entry points."""

import sys

from dsv4rs import cli

if __name__ == "__main__":
    sys.exit(cli.main(["bench", "--device", "cuda", *sys.argv[1:]]))
