#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite with ctest.
# The output ends with ctest's summary; the exit status is ctest's.
#
# Environment:
#   BUILD_DIR    build directory (default: build)
#   CTEST_ARGS   extra ctest arguments, e.g. CTEST_ARGS='-L broker'
#   VENV_DIR     the venv from scripts/install-deps.sh (default: .venv)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
build_dir=${BUILD_DIR:-build}

bash scripts/install-deps.sh
bash scripts/build.sh

# The venv's python3 (numpy, safetensors) first: tests call `python3`.
export PATH=${VENV_DIR:-$repo/.venv}/bin:$PATH
echo "test: ctest --test-dir $build_dir -j2 --output-on-failure ${CTEST_ARGS:-}"
# shellcheck disable=SC2086  # CTEST_ARGS is a list of words on purpose
exec ctest --test-dir "$build_dir" -j2 --output-on-failure ${CTEST_ARGS:-}
