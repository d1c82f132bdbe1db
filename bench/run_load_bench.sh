#!/usr/bin/env bash
# Reproduces the load/attach numbers in docs/benchmarks.md: generates a
# 1.5 GiB two-shard model and a 300-tensor model in a scratch HF cache, then
# runs wbroker-bench-load against them. Results: bench/out/load.json (or
# --json FILE). --quick: a 128 MiB model, 1 and 2 threads, one run each and
# 100 attaches (bench/run-all --quick; a smoke test, not the documented numbers).
# --shmem-enabled LIST (e.g. never,advise): measure the load under each kernel
# setting for shmem huge pages (needs root; the old value is put back).
#   bench/run_load_bench.sh [--quick] [--json FILE] [--shmem-enabled LIST] [BUILD_DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=$root/build
json=$root/bench/out/load.json
quick=0
shmem=()
while [ $# -gt 0 ]; do
  case $1 in
    --quick) quick=1 ;;
    --json) json=$2; shift ;;
    --shmem-enabled) shmem=(--shmem-enabled "$2"); shift ;;
    -*) echo "run_load_bench: unknown option $1" >&2; exit 2 ;;
    *) build=$1 ;;
  esac
  shift
done
py=python3
[ -x "$root/.venv/bin/python" ] && py=$root/.venv/bin/python
for bin in "$build/bench/wbroker-bench-load" "$build/broker/wbrokerd"; do
  [ -x "$bin" ] || { echo "run_load_bench: $bin is not built (run scripts/build.sh)" >&2; exit 1; }
done
if [ $quick = 1 ]; then
  size=128MiB tensors=50 shards=2 small=16MiB threads=(1 2) repeats=1 attaches=100
else
  size=1.5GiB tensors=200 shards=2 small=64MiB threads=(1 2 4) repeats=5 attaches=1000
fi
scratch=$(mktemp -d /tmp/wbroker-bench.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$(dirname "$json")"
echo "generating models in $scratch ..."
"$py" "$root/scripts/make_hf_cache.py" --cache "$scratch/hub" --model bench/big --size "$size" \
  --tensors "$tensors" --shards "$shards" >/dev/null
"$py" "$root/scripts/make_hf_cache.py" --cache "$scratch/hub" --model bench/t300 --size "$small" \
  --tensors 300 >/dev/null
thread_args=()
for t in "${threads[@]}"; do thread_args+=(--threads "$t"); done
"$build/bench/wbroker-bench-load" --cache "$scratch/hub" --model bench/big \
  --attach-model bench/t300 --wbrokerd "$build/broker/wbrokerd" \
  "${thread_args[@]}" "${shmem[@]}" --repeats "$repeats" --attaches "$attaches" --json "$json"
echo "wrote $json"
