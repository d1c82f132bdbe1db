#!/usr/bin/env bash
# The side-by-side benchmark (bench/compare/compare.py) with the repository's
# venv: wbroker against load_file, safe_open and torch.multiprocessing for
# N = 1..16 processes, plus the broker's control plane. See compare.py --help.
#   bench/compare/run.sh [--quick] [--build build-cmp] [--no-doc] [--out DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
py=python3
[ -x "$root/.venv/bin/python" ] && py=$root/.venv/bin/python
exec "$py" "$root/bench/compare/compare.py" "$@"
