#!/usr/bin/env bash
# Builds the abi3 wheel here and, on a machine with a CUDA GPU, installs it and runs the GPU
# tests and the GPU benchmark, printing a short table last.
#
#   scripts/gpu_check.sh build   # here: build dist/dsv4rs-*.whl (all GPU targets)
#   scripts/gpu_check.sh run [BENCH ARGS]   # on the GPU machine, from the repository root, with dist/
#
# `run` installs the wheel with --no-deps into a private folder (the GPU machine has no network
# and brings its own torch), runs `pytest -m gpu` and `dsv4rs demo --device cuda`, then
# benches/gpu_bench.py with BENCH ARGS
# (default --quick; pass --full for every size).
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
build)
    source scripts/env.sh
    build_wheel
    rm -rf dist && mkdir -p dist && cp "$DIST"/dsv4rs-*.whl dist/
    ls -l dist
    ;;
run)
    wheel=$(ls dist/dsv4rs-*.whl | head -n 1)
    site="${TMPDIR:-/tmp}/dsv4rs-site"
    rm -rf "$site"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheel"
    export PYTHONPATH="$site" PYTHONUNBUFFERED=1
    python3 -c "import dsv4rs, sys; print('dsv4rs', dsv4rs.__version__, 'on Python', sys.version.split()[0])"
    python3 -m dsv4rs.cli info
    # Run the tests against the installed wheel, not the source tree's python/ folder.
    python3 -m pytest -q -m gpu -p no:cacheprovider --rootdir=. -c pyproject.toml tests
    # The README's main job on the GPU: the small V4 through the paged cache and the kernels.
    python3 -m dsv4rs.cli demo --device cuda
    bench_args=("${@:2}")
    [ ${#bench_args[@]} -gt 0 ] || bench_args=(--quick)
    [ "${bench_args[0]}" = "--full" ] && bench_args=()
    python3 benches/gpu_bench.py "${bench_args[@]}"
    ;;
*)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
