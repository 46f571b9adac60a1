# Sourced by scripts/test.sh and scripts/gpu_check.sh: the two virtual environments (outside the
# checkout) and the one wheel build.
#
# - build venv: maturin + nvcc 13.0 from PyPI (the five packages are one matched set: pin them
#   together, in one install). Kept apart from torch, whose own nvidia-* wheels clash with it.
# - test venv: torch and the test tools; the built wheel is installed into it.
# Both live under $DSV4RS_CACHE (default ~/.cache/dsv4rs) and are reused while their pinned
# requirements are unchanged.

DSV4RS_CACHE="${DSV4RS_CACHE:-$HOME/.cache/dsv4rs}"
BUILD_VENV="$DSV4RS_CACHE/build-venv"
TEST_VENV="$DSV4RS_CACHE/test-venv"
DIST="$DSV4RS_CACHE/dist"
# Per checkout: build scripts record absolute source paths, so a target folder shared between
# checkouts can keep kernels compiled from another checkout's sources.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

BUILD_REQS=(maturin==1.16.0 nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85)
TEST_REQS=(torch==2.11.0 numpy==2.4.6 pytest==9.2.0 hypothesis==6.170.17
    pytest-timeout==2.4.0 safetensors==0.8.0 tqdm==4.70.1 matplotlib==3.11.2 transformers==5.24.0
    tokenizers==0.23.3 jinja2==3.1.6 fastapi==0.163.2 uvicorn==0.54.0 httpx==0.28.1 openai==3.51.0 accelerate==1.16.0)

# ensure_venv DIR REQ...: creates DIR and installs REQ in one pip call unless already done.
ensure_venv() {
    local dir="$1"
    shift
    local stamp="$dir/.dsv4rs-reqs"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$*" ]; then
        return
    fi
    echo "== setting up $dir"
    python3 -m venv "$dir"
    "$dir/bin/python" -m pip install --progress-bar off -q "$@"
    echo "$*" >"$stamp"
}

# build_wheel: the release abi3 wheel with kernels for every GPU target, into $DIST.
build_wheel() {
    ensure_venv "$BUILD_VENV" "${BUILD_REQS[@]}"
    local nvcc
    nvcc=$(ls "$BUILD_VENV"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc)
    export DSV4RS_NVCC="$nvcc" PYO3_PYTHON="$BUILD_VENV/bin/python"
    rm -rf "$DIST"
    echo "== building the wheel (nvcc: $("$nvcc" --version | tail -n 1))"
    "$BUILD_VENV/bin/maturin" build --release --out "$DIST" -i "$BUILD_VENV/bin/python"
}
