#!/usr/bin/env bash
# Reproduces the load/attach numbers in docs/benchmarks.md: generates a
# 1.5 GiB two-shard model and a 300-tensor model in a scratch HF cache, then
# runs wbroker-bench-load against them. Results: bench/out/load.json.
#   bench/run_load_bench.sh [BUILD_DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build}
py=python3
[ -x "$root/.venv/bin/python" ] && py=$root/.venv/bin/python
for bin in "$build/bench/wbroker-bench-load" "$build/broker/wbrokerd"; do
  [ -x "$bin" ] || { echo "run_load_bench: $bin is not built (run scripts/build.sh)" >&2; exit 1; }
done
scratch=$(mktemp -d /tmp/wbroker-bench.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$root/bench/out"
echo "generating models in $scratch ..."
"$py" "$root/scripts/make_hf_cache.py" --cache "$scratch/hub" --model bench/big --size 1.5GiB \
  --tensors 200 --shards 2 >/dev/null
"$py" "$root/scripts/make_hf_cache.py" --cache "$scratch/hub" --model bench/t300 --size 64MiB \
  --tensors 300 >/dev/null
"$build/bench/wbroker-bench-load" --cache "$scratch/hub" --model bench/big \
  --attach-model bench/t300 --wbrokerd "$build/broker/wbrokerd" \
  --threads 1 --threads 2 --threads 4 --repeats 5 --attaches 1000 \
  --json "$root/bench/out/load.json"
echo "wrote $root/bench/out/load.json"
