#!/usr/bin/env bash
# Builds the abi3 wheel here and, on a machine with a CUDA GPU, installs it and runs the GPU
# tests, the sanitizer and the GPU benchmark, printing a short table last.
#
#   scripts/gpu_check.sh build              # here: build dist/dsv4rs-*.whl (all GPU targets)
#   scripts/gpu_check.sh run [BENCH ARGS]   # on the GPU machine, from the repository root, with dist/
#   scripts/gpu_check.sh test               #   only the GPU tests (each attention kernel, the model
#                                           #   with the portable kernel forced too) and the demo
#   scripts/gpu_check.sh sanitize           #   compute-sanitizer memcheck and racecheck on the ops
#   scripts/gpu_check.sh bench [BENCH ARGS] #   only the benchmark table
#   scripts/gpu_check.sh compare A B [BENCH ARGS]
#                                           #   two builds (folders A and B, a wheel each), the
#                                           #   benchmark run A B A B on this machine, then each
#                                           #   case side by side (benches/compare.py)
#   scripts/gpu_check.sh world [N]          #   on N >= 2 GPUs (default 2): the NCCL tests, then
#                                           #   the model over N ranks (dp, then tp) beside one
#                                           #   GPU, shipped weights (dsv4rs bench --world N)
#
# The GPU steps install the wheel with --no-deps into a private folder (the GPU machine has no
# network and brings its own torch). `run` is `test` then `bench`; BENCH ARGS go to
# benches/gpu_bench.py (default --quick; --full for every size).
set -euo pipefail
cd "$(dirname "$0")/.."

install() {
    local site
    site=$(install_into dist)
    export PYTHONPATH="$site" PYTHONUNBUFFERED=1
    python3 -c "import dsv4rs, sys; print('dsv4rs', dsv4rs.__version__, 'on Python', sys.version.split()[0])"
    python3 -m dsv4rs.cli info
}

# Run the tests against the installed wheel, not the source tree's python/ folder.
pytest_gpu() {
    python3 -m pytest -q -m gpu -p no:cacheprovider --rootdir=. -c pyproject.toml "$@"
}

gpu_tests() {
    pytest_gpu tests
    # The attention and GEMM tests run every kernel the GPU can run; the model's run the default
    # ones, so run them again on the portable kernels (what GPUs before Hopper run).
    DSV4RS_ATTENTION_KERNEL=portable DSV4RS_QGEMM_TILED=mma DSV4RS_QGEMM_KERNEL=bf16 pytest_gpu tests/test_model.py
    # The README's main job on the GPU: the small V4 through the paged cache and the kernels.
    python3 -m dsv4rs.cli demo --device cuda
}

sanitize() {
    local ops=(tests/test_gpu_formats.py tests/test_gpu_ops.py tests/test_ops_runtime.py tests/test_compress_batch.py
               tests/test_quant_ops.py tests/test_route.py tests/test_swiglu.py tests/test_step_rows.py
               tests/test_norm_rope.py tests/test_linear_rows.py tests/test_sampling.py)
    echo "== compute-sanitizer memcheck (API errors and memory accesses)"
    compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
        python3 -m pytest -q -x -m "gpu and not profiler" -p no:cacheprovider --rootdir=. -c pyproject.toml "${ops[@]}" \
        -k "not graph"
    echo "== compute-sanitizer racecheck (shared-memory hazards), one small case per kernel family"
    compute-sanitizer --tool racecheck --error-exitcode 1 --print-limit 20 \
        python3 -m pytest -q -x -m "gpu and not profiler" -p no:cacheprovider --rootdir=. -c pyproject.toml "${ops[@]}" \
        -k "(indexer or attention or compress or mhc or copy_rows or rope or round_trip or quant_linear or moe or route or swiglu or linear_rows or sample) and not graph"
}

# Installs the wheel in folder $1 into its own site folder and prints that folder.
install_into() {
    local wheel site
    wheel=$(ls "$1"/dsv4rs-*.whl 2>/dev/null | head -n 1)
    [ -n "$wheel" ] || { echo "no dsv4rs wheel in $1" >&2; exit 2; }
    site="${TMPDIR:-/tmp}/dsv4rs-site-$(basename "$1")"
    rm -rf "$site"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheel" >&2
    echo "$site"
}

compare() {
    local a=$1 b=$2
    shift 2
    [ "$(basename "$a")" != "$(basename "$b")" ] || { echo "compare: name the two folders differently" >&2; exit 2; }
    local site_a site_b logs="${TMPDIR:-/tmp}/dsv4rs-compare"
    site_a=$(install_into "$a")
    site_b=$(install_into "$b")
    local bench_args=("$@")
    [ ${#bench_args[@]} -gt 0 ] || bench_args=(--quick)
    rm -rf "$logs" && mkdir -p "$logs"
    for round in 1 2; do
        for side in a b; do
            local site=$site_a
            [ $side = a ] || site=$site_b
            echo "== $side, round $round" >&2
            PYTHONPATH="$site" PYTHONUNBUFFERED=1 python3 benches/gpu_bench.py "${bench_args[@]}" > "$logs/$side$round.log"
        done
    done
    python3 benches/compare.py "$(basename "$a")=$logs/a1.log,$logs/a2.log" "$(basename "$b")=$logs/b1.log,$logs/b2.log"
}

# Several GPUs of one host: the NCCL tests (tests/test_parallel.py, 2 ranks), then the model
# suite over $1 ranks in both modes, each beside one GPU in the same run.
world() {
    local n=$1
    pytest_gpu tests/test_parallel.py -k nccl -rs
    for mode in dp tp; do
        python3 -m dsv4rs.cli bench --only model --device cuda --world "$n" --parallel "$mode" --weights shipped
    done
}

bench() {
    local bench_args=("$@")
    [ ${#bench_args[@]} -gt 0 ] || bench_args=(--quick)
    [ "${bench_args[0]}" = "--full" ] && bench_args=()
    python3 benches/gpu_bench.py "${bench_args[@]}"
}

case "${1:-}" in
build)
    source scripts/env.sh
    build_wheel
    rm -rf dist && mkdir -p dist && cp "$DIST"/dsv4rs-*.whl dist/
    ls -l dist
    ;;
run)
    install
    gpu_tests
    bench "${@:2}"
    ;;
test)
    install
    gpu_tests
    ;;
sanitize)
    install
    sanitize
    ;;
bench)
    install
    bench "${@:2}"
    ;;
compare)
    [ $# -ge 3 ] || { echo "usage: $0 compare A B [BENCH ARGS]" >&2; exit 2; }
    compare "${@:2}"
    ;;
world)
    install
    world "${2:-2}"
    ;;
*)
    echo "usage: $0 build|run|test|sanitize|bench|compare|world" >&2
    exit 2
    ;;
esac
