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

echo "== cargo test (rust/core)"
cargo test --release -p dsv4rs-core

echo "== pytest (installed wheel)"
# python/ is not on sys.path here, so the tests import the installed wheel.
"$TEST_VENV/bin/python" -m pytest tests "$@"
