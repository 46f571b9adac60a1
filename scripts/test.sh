#!/usr/bin/env bash
# The whole test suite, from a fresh machine: sets up the build and test environments, builds
# the wheel that ships (kernels for every GPU target), installs it, runs the Rust core tests and
# the Python tests against the installed wheel. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

build_wheel
ensure_venv "$TEST_VENV" "${TEST_REQS[@]}"
"$TEST_VENV/bin/python" -m pip install -q --force-reinstall --no-deps "$DIST"/dsv4rs-*.whl
# The engine plugin (integrations/dsv4rs_plugin, pure Python): its test reads the entry points it
# installs. No dependencies: dsv4rs is the wheel above, and no engine is installed.
"$TEST_VENV/bin/python" -m pip install -q --force-reinstall --no-deps integrations/dsv4rs_plugin

echo "== wgmma hazards (scripts/wgmma_hazards.py on this build's Hopper kernels)"
sm90a=$(ls -t "$CARGO_TARGET_DIR"/release/build/dsv4rs-core-*/out/qgemm_sm90a.fatbin 2>/dev/null | head -n 1 || true)
cuobjdump=$(ls "$TEST_VENV"/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump 2>/dev/null \
    | head -n 1 || true)
if [ -n "$sm90a" ] && [ -n "$cuobjdump" ]; then
    "$TEST_VENV/bin/python" scripts/wgmma_hazards.py --cuobjdump "$cuobjdump" "$(dirname "$sm90a")"/*_sm90a.fatbin
else
    echo "not run: no sm_90a kernels in this build, or no cuobjdump (triton's) in the test environment"
fi

echo "== cargo test (rust/core)"
cargo test --release -p dsv4rs-core

echo "== pytest (installed wheel)"
# python/ is not on sys.path here, so the tests import the installed wheel.
"$TEST_VENV/bin/python" -m pytest tests "$@"
