#!/usr/bin/env bash
# Configures and builds wbroker into build/ (Ninja, RelWithDebInfo) on all cores.
# Extra arguments go to the configure step, e.g. scripts/build.sh -DWBROKER_WERROR=ON
#
# Environment:
#   BUILD_DIR   build directory (default: build in the repository root)
#   BUILD_TYPE  CMake build type (default RelWithDebInfo)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
build_dir=${BUILD_DIR:-build}
build_type=${BUILD_TYPE:-RelWithDebInfo}
jobs=$(nproc 2>/dev/null || echo 2)

for tool in cmake ninja; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "build: error: $tool not found; run scripts/install-deps.sh first" >&2
    exit 1
  }
done
cache=$build_dir/CMakeCache.txt
if [[ -f $cache ]] && ! grep -q '^CMAKE_GENERATOR:INTERNAL=Ninja$' "$cache"; then
  echo "build: error: $build_dir was configured with another generator; remove it or set BUILD_DIR" >&2
  exit 1
fi

echo "build: configuring $build_dir ($build_type, Ninja)"
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE="$build_type" "$@"
echo "build: building with $jobs jobs"
cmake --build "$build_dir" --parallel "$jobs"
echo "build: done: $build_dir"
