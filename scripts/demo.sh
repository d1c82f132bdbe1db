#!/usr/bin/env bash
# The first thing to run: installs what is missing, builds, then shows wbroker
# sharing one copy of a model with several client processes.
#
#   1. scripts/install-deps.sh and scripts/build.sh
#   2. generates a 256 MiB, 300-tensor fp16 model in a temporary HF hub cache
#   3. starts wbrokerd on a temporary socket with --preload of that model
#   4. starts DEMO_CLIENTS wbroker-demo-client processes; each attaches the model
#      by a short commit hash, reads every byte and holds its lease
#   5. shows `wbrokerctl status` (one copy, N leases) and what the clients'
#      mappings cost: the sum of their PSS against N private copies
#   6. stops the clients and the broker (SIGTERM) and removes the temporary files
#
# Environment:
#   DEMO_CLIENTS  number of client processes (default 4)
#   DEMO_SIZE     model size (default 256MiB)
#   DEMO_TENSORS  number of tensors (default 300)
#   BUILD_DIR     build directory (default: build)
#   VENV_DIR      the venv from scripts/install-deps.sh (default: .venv)
# Exit status 0 when every step worked, non-zero with a "demo: FAILED" line otherwise.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

clients=${DEMO_CLIENTS:-4}
size=${DEMO_SIZE:-256MiB}
tensors=${DEMO_TENSORS:-300}
build_dir=${BUILD_DIR:-build}
model=demo/wbroker-demo
timeout_s=180  # for each wait below

step() { printf '\n== %s\n' "$*"; }
failed=
die() {
  printf 'demo: FAILED: %s\n' "$*" >&2
  failed=1
  exit 1
}

[[ $clients =~ ^[1-9][0-9]*$ ]] || die "DEMO_CLIENTS must be a positive integer, not '$clients'"
[[ $tensors =~ ^[1-9][0-9]*$ ]] || die "DEMO_TENSORS must be a positive integer, not '$tensors'"

step "1/6 dependencies (scripts/install-deps.sh)"
bash scripts/install-deps.sh || die "scripts/install-deps.sh failed"
step "2/6 build (scripts/build.sh)"
bash scripts/build.sh || die "scripts/build.sh failed"

py=${VENV_DIR:-$repo/.venv}/bin/python
wbrokerd=$build_dir/broker/wbrokerd
wbrokerctl=$build_dir/tools/wbrokerctl
client=$build_dir/examples/wbroker-demo-client
for f in "$py" "$wbrokerd" "$wbrokerctl" "$client"; do
  [[ -x $f ]] || die "$f is missing after the build"
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/wbroker-demo.XXXXXX")
hub=$tmp/hub
sock=$tmp/wbroker.sock
broker_pid=
client_pids=()

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local p
  for p in "${client_pids[@]}" $broker_pid; do
    kill -TERM "$p" 2>/dev/null || true
  done
  for p in "${client_pids[@]}" $broker_pid; do
    wait "$p" 2>/dev/null || true
  done
  if [[ $rc -ne 0 ]]; then
    for f in "$tmp"/wbrokerd.log "$tmp"/client-*.log; do
      [[ -s $f ]] || continue
      printf -- '--- last lines of %s\n' "${f##*/}" >&2
      tail -n 15 "$f" >&2
    done
    [[ -n $failed ]] || printf 'demo: FAILED (exit %s)\n' "$rc" >&2
  fi
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# json_get FILE EXPR: prints the Python expression EXPR over the JSON in FILE (as d).
json_get() {
  "$py" -c 'import json, sys; d = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"
}
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
# arena_kib PID FIELD: the sum of FIELD (Pss, Rss) over PID's memfd:wbroker mappings, in KiB.
arena_kib() {
  awk -v field="$2:" '
    /^[0-9a-f]+-[0-9a-f]+ / { arena = index($0, "memfd:wbroker") > 0; next }
    arena && $1 == field { sum += $2 }
    END { print sum + 0 }' "/proc/$1/smaps"
}
# status_json FILE: `wbrokerctl --json status` into FILE; fails quietly while the broker is not up.
status_json() { "$wbrokerctl" --socket "$sock" --json status >"$1" 2>/dev/null; }

step "3/6 a $size, $tensors-tensor fp16 model in a temporary HF cache ($hub)"
commit=$("$py" scripts/make_hf_cache.py --cache "$hub" --model "$model" --size "$size" \
  --tensors "$tensors" --dtype float16) || die "scripts/make_hf_cache.py failed"
[[ $commit =~ ^[0-9a-f]{40}$ ]] || die "make_hf_cache.py printed no commit hash: '$commit'"
short=${commit:0:7}
echo "generated $model @ $commit"

step "4/6 wbrokerd --socket $sock --cache-dir $hub --preload $model"
# Not under a service manager here, whatever the caller runs under.
env -u NOTIFY_SOCKET -u LISTEN_FDS -u LISTEN_PID -u LISTEN_FDNAMES -u WATCHDOG_USEC \
  "$wbrokerd" --socket "$sock" --cache-dir "$hub" --device cpu --preload "$model" \
  >"$tmp/wbrokerd.log" 2>&1 &
broker_pid=$!
state=
for ((i = 0; i < timeout_s * 10; i++)); do
  kill -0 "$broker_pid" 2>/dev/null || die "wbrokerd exited during start-up"
  if status_json "$tmp/status.json"; then
    state=$(json_get "$tmp/status.json" \
      '" ".join(m["state"] for m in d["models"] if m["model"] == "'"$model"'") or "none"')
    [[ $state == ready ]] && break
    [[ $state == failed ]] && die "wbrokerd could not load $model: $(json_get "$tmp/status.json" 'd["models"][0].get("error")')"
  fi
  sleep 0.1
done
[[ $state == ready ]] || die "wbrokerd did not report $model ready within ${timeout_s}s (state: ${state:-no answer})"
model_bytes=$(json_get "$tmp/status.json" 'd["models"][0]["bytes"]')
load_s=$(json_get "$tmp/status.json" '"%.2f" % d["models"][0]["load_seconds"]')
echo "wbrokerd (pid $broker_pid) is ready: $model loaded, $(mib "$model_bytes") in ${load_s}s"

step "5/6 $clients clients attach $model@$short (a short commit hash)"
for ((i = 1; i <= clients; i++)); do
  "$client" --socket "$sock" --model "$model@$short" --hold-seconds 3600 \
    --ready-file "$tmp/client-$i.ready" >"$tmp/client-$i.log" 2>&1 &
  client_pids+=($!)
done
for ((i = 1; i <= clients; i++)); do
  pid=${client_pids[i - 1]}
  for ((t = 0; t < timeout_s * 10; t++)); do
    [[ -f $tmp/client-$i.ready ]] && break
    kill -0 "$pid" 2>/dev/null || die "client $i (pid $pid) exited before attaching: $(cat "$tmp/client-$i.log")"
    sleep 0.1
  done
  [[ -f $tmp/client-$i.ready ]] || die "client $i (pid $pid) did not attach within ${timeout_s}s"
done
cat "$tmp"/client-*.ready

checksums=$(for ((i = 1; i <= clients; i++)); do
  sed -n 's/.* checksum=\([0-9a-f]*\) .*/\1/p' "$tmp/client-$i.ready"
done | sort -u)
[[ $(wc -l <<<"$checksums") -eq 1 && -n $checksums ]] || die "the clients read different bytes (checksums: $checksums)"
grep -q " revision=$commit " "$tmp"/client-1.ready ||
  die "client 1 did not get revision $commit for $short"

echo
echo "\$ wbrokerctl --socket $sock status"
"$wbrokerctl" --socket "$sock" status || die "wbrokerctl status failed"
status_json "$tmp/status.json" || die "wbrokerctl --json status failed"
copies=$(json_get "$tmp/status.json" 'len(d["models"])')
leases=$(json_get "$tmp/status.json" 'sum(m["leases"] for m in d["models"])')
[[ $copies -eq 1 ]] || die "expected 1 loaded model, wbrokerd has $copies"
[[ $leases -eq $clients ]] || die "expected $clients leases, wbrokerd has $leases"

pss_kib=0
rss_kib=0
for pid in "${client_pids[@]}"; do
  pss_kib=$((pss_kib + $(arena_kib "$pid" Pss)))
  rss_kib=$((rss_kib + $(arena_kib "$pid" Rss)))
done
pss=$((pss_kib * 1024))
private=$((clients * model_bytes))
saved=$((private - pss))

step "summary"
printf '%-30s %s\n' \
  "model:" "$model @ $short, $tensors tensors, $(mib "$model_bytes") (one sealed memfd in wbrokerd)" \
  "clients attached:" "$clients, $leases leases, identical checksums ($checksums)" \
  "arena RSS, sum over clients:" "$(mib $((rss_kib * 1024))) (each client maps all of it)" \
  "arena PSS, sum over clients:" "$(mib "$pss") (what the clients really cost together)" \
  "$clients private copies would be:" "$clients x $(mib "$model_bytes") = $(mib "$private")" \
  "memory saved:" "$(mib "$saved") ($(awk -v s="$saved" -v p="$private" 'BEGIN { printf "%.0f", 100 * s / p }')%)"

step "6/6 stop clients and broker (SIGTERM)"
for pid in "${client_pids[@]}"; do kill -TERM "$pid"; done
for ((i = 1; i <= clients; i++)); do
  rc=0
  wait "${client_pids[i - 1]}" || rc=$?
  [[ $rc -eq 0 ]] || die "client $i exited with status $rc: $(cat "$tmp/client-$i.log")"
done
client_pids=()
status_json "$tmp/status.json" || die "wbrokerctl --json status failed"
leases=$(json_get "$tmp/status.json" 'sum(m["leases"] for m in d["models"])')
[[ $leases -eq 0 ]] || die "wbrokerd still counts $leases leases after the clients exited"
echo "clients released their leases (wbrokerd now counts $leases)"
kill -TERM "$broker_pid"
rc=0
wait "$broker_pid" || rc=$?
broker_pid=
[[ $rc -eq 0 ]] || die "wbrokerd exited with status $rc"
echo "wbrokerd stopped"
echo
echo "demo: OK"
