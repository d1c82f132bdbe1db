#!/usr/bin/env bash
# Static checks of the systemd integration in systemd/ (no running systemd needed).
#
# Usage:
#   bash tests/systemd/check_units.sh WBROKERD_BIN WBROKERCTL_BIN [WBROKER_WORKER_BIN]
#
#   WBROKERD_BIN, WBROKERCTL_BIN  built binaries; must exist and be executable
#                                 (ctest passes $<TARGET_FILE:wbrokerd> and
#                                 $<TARGET_FILE:wbrokerctl>; /bin/true works too).
#   WBROKER_WORKER_BIN            optional (also env WBROKER_WORKER_BIN); when
#                                 absent a placeholder is used, see below.
#
# Environment:
#   WBROKER_MAX_EXPOSURE  highest accepted exposure of wbrokerd.service (default 1.2)
#
# Checks:
#   1. `systemd-analyze verify` on wbrokerd.service, wbrokerd.socket and
#      wbroker-worker@8001.service: fails on a non-zero exit or on any output
#      line that mentions our units (unknown keys, bad values, missing binaries).
#   2. `systemd-analyze security --offline=true` on wbrokerd.service: prints the
#      score and fails when it is above WBROKER_MAX_EXPOSURE.
#   3. wbrokerd.socket has SocketMode=0660 and SocketGroup=wbroker.
#   4. wbroker.sysusers.conf, wbroker.tmpfiles.conf and wbroker-shmem-thp.conf are accepted by
#      systemd-sysusers / systemd-tmpfiles (applied to a scratch --root; needs root,
#      skipped otherwise).
#
# Exit status: 0 all passed, 1 a check failed, 2 usage error,
# 77 systemd-analyze is not installed (ctest: SKIP_RETURN_CODE 77).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
unitdir=$(cd "$here/../../systemd" && pwd)
max_exposure=${WBROKER_MAX_EXPOSURE:-1.2}

fail=0
pass() { printf 'PASS: %s\n' "$*"; }
failmsg() { printf 'FAIL: %s\n' "$*" >&2; fail=1; }

if [[ $# -lt 2 || $# -gt 3 ]]; then
  echo "usage: $0 WBROKERD_BIN WBROKERCTL_BIN [WBROKER_WORKER_BIN]" >&2
  exit 2
fi

abs_exe() {  # abs_exe NAME PATH: print PATH made absolute, or fail the usage
  local name=$1 p=$2
  if [[ ! -f $p || ! -x $p ]]; then
    echo "FAIL: $name '$p' is not an executable file" >&2
    exit 2
  fi
  (cd "$(dirname "$p")" && printf '%s/%s\n' "$(pwd -P)" "$(basename "$p")")
}

if ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "SKIP: systemd-analyze not found (install the systemd package)"
  exit 77
fi
echo "using $(systemd-analyze --version | head -n1)"

broker_bin=$(abs_exe wbrokerd "$1")
ctl_bin=$(abs_exe wbrokerctl "$2")
worker_arg=${3:-${WBROKER_WORKER_BIN:-}}

# The scratch path ends up inside unit files: keep it free of spaces and '%'.
tmpbase=${TMPDIR:-/tmp}
[[ $tmpbase =~ ^[A-Za-z0-9_./-]+$ ]] || tmpbase=/tmp
tmp=$(mktemp -d "$tmpbase/wbroker-units.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/units" "$tmp/bin"

if [[ -n $worker_arg ]]; then
  worker_bin=$(abs_exe wbroker-worker "$worker_arg")
else
  # wbroker-worker is not built yet. `systemd-analyze verify` fails when an
  # ExecStart= binary does not exist, so point the worker unit at a throw-away
  # executable that exists ONLY for that path check; nothing ever runs it.
  worker_bin=$tmp/bin/wbroker-worker
  printf '#!/bin/sh\n# placeholder for the verify path check only\nexit 0\n' >"$worker_bin"
  chmod 0755 "$worker_bin"
  echo "note: no wbroker-worker binary given; using a placeholder for the ExecStart= check"
fi

# Copies of the units with the installed /usr/bin paths pointing at the binaries
# under test; everything else is byte-for-byte the shipped unit. The binaries
# are reached through symlinks in $tmp/bin so that a build path with spaces,
# '%' (a unit specifier) or sed metacharacters cannot break the rewrite.
ln -sfn "$broker_bin" "$tmp/bin/wbrokerd"
ln -sfn "$ctl_bin" "$tmp/bin/wbrokerctl"
[[ $worker_bin == "$tmp/bin/wbroker-worker" ]] || ln -sfn "$worker_bin" "$tmp/bin/wbroker-worker"
units=(wbrokerd.service wbrokerd.socket "wbroker-worker@.service")
for u in "${units[@]}"; do
  if [[ ! -f $unitdir/$u ]]; then
    failmsg "missing unit file systemd/$u"
    continue
  fi
  sed -E "s#/usr/bin/(wbrokerd|wbrokerctl|wbroker-worker)([^A-Za-z0-9_.-]|\$)#$tmp/bin/\1\2#g" \
      "$unitdir/$u" >"$tmp/units/$u"
done
[[ $fail -eq 0 ]] || exit 1

# --- 1. systemd-analyze verify ---------------------------------------------
# The template is verified through an instance (the file in the same directory
# is found as its template), so %i and ExecStart= get checked for real.
# --man=no: Documentation= is not checked against installed man pages.
# --recursive-errors=no: only our units count, not the host's (sockets.target...).
echo "== 1. systemd-analyze verify"
verify_rc=0
verify_out=$(cd "$tmp/units" && systemd-analyze verify --man=no --recursive-errors=no \
               ./wbrokerd.service ./wbrokerd.socket ./wbroker-worker@8001.service 2>&1) \
  || verify_rc=$?
[[ -n $verify_out ]] && printf '%s\n' "$verify_out" | sed 's/^/  | /'
ours=$(printf '%s\n' "$verify_out" | grep -E "wbrokerd|wbroker-worker|$tmp" || true)
if [[ $verify_rc -ne 0 ]]; then
  failmsg "systemd-analyze verify exited with $verify_rc"
elif [[ -n $ours ]]; then
  failmsg "systemd-analyze verify warned about our units:"
  printf '%s\n' "$ours" | sed 's/^/    /' >&2
else
  pass "systemd-analyze verify: no warnings for our units"
fi

# --- 2. exposure score ------------------------------------------------------
echo "== 2. systemd-analyze security --offline=true wbrokerd.service"
sec_rc=0
sec_out=$(cd "$tmp/units" && SYSTEMD_COLORS=0 systemd-analyze security --offline=true \
            --no-pager ./wbrokerd.service 2>&1) || sec_rc=$?
# Show what still counts against us (the ✗ lines) and the overall line.
printf '%s\n' "$sec_out" | grep -vE '^✓|^ *$' | sed 's/^/  | /' || true
score=$(printf '%s\n' "$sec_out" |
          sed -nE 's/.*Overall exposure level for [^:]*: *([0-9]+(\.[0-9]+)?).*/\1/p' | tail -n1)
if [[ $sec_rc -ne 0 ]]; then
  failmsg "systemd-analyze security exited with $sec_rc"
elif [[ -z $score ]]; then
  failmsg "no 'Overall exposure level' line in systemd-analyze security output"
else
  echo "wbrokerd.service exposure score: $score (limit $max_exposure)"
  if awk -v s="$score" -v m="$max_exposure" 'BEGIN { exit !(s + 0 <= m + 0) }'; then
    pass "exposure $score <= $max_exposure"
  else
    failmsg "wbrokerd.service exposure $score is above $max_exposure"
  fi
fi
# The worker has no limit (it needs AF_INET on the host's loopback); print only.
worker_score=$( (cd "$tmp/units" && SYSTEMD_COLORS=0 systemd-analyze security --offline=true \
                   --no-pager ./wbroker-worker@8001.service 2>/dev/null) |
               sed -nE 's/.*Overall exposure level for [^:]*: *([0-9]+(\.[0-9]+)?).*/\1/p' |
               tail -n1) || worker_score=""
echo "info: wbroker-worker@.service exposure score: ${worker_score:-?} (no limit)"

# --- 3. socket permissions --------------------------------------------------
echo "== 3. wbrokerd.socket permissions"
# Value of KEY in [Socket] (last assignment wins, as in systemd); comments skipped.
socket_key() {
  awk -v key="$1" '
    /^[ \t]*[#;]/ { next }
    /^[ \t]*\[/   { sect = $0; gsub(/[ \t]/, "", sect); next }
    sect == "[Socket]" {
      line = $0; sub(/^[ \t]+/, "", line)
      n = index(line, "="); if (n == 0) next
      k = substr(line, 1, n - 1); gsub(/[ \t]+$/, "", k)
      v = substr(line, n + 1); gsub(/^[ \t]+|[ \t]+$/, "", v)
      if (k == key) val = v
    }
    END { print val }' "$unitdir/wbrokerd.socket"
}
mode=$(socket_key SocketMode)
group=$(socket_key SocketGroup)
listen=$(socket_key ListenStream)
if [[ $mode == 0660 || $mode == 660 ]]; then pass "SocketMode=$mode"
else failmsg "wbrokerd.socket: SocketMode is '${mode:-unset}', expected 0660"; fi
if [[ $group == wbroker ]]; then pass "SocketGroup=$group"
else failmsg "wbrokerd.socket: SocketGroup is '${group:-unset}', expected wbroker"; fi
if [[ $listen == /run/wbroker/wbroker.sock ]]; then pass "ListenStream=$listen"
else failmsg "wbrokerd.socket: ListenStream is '${listen:-unset}', expected /run/wbroker/wbroker.sock"; fi

# --- 4. sysusers / tmpfiles -------------------------------------------------
echo "== 4. wbroker.sysusers.conf / wbroker.tmpfiles.conf"
if [[ $(id -u) -ne 0 ]]; then
  echo "skip: not root (sysusers/tmpfiles are applied to a scratch --root)"
elif ! command -v systemd-sysusers >/dev/null || ! command -v systemd-tmpfiles >/dev/null; then
  echo "skip: systemd-sysusers/systemd-tmpfiles not installed"
else
  root=$tmp/root
  mkdir -p "$root/etc"
  if out=$(systemd-sysusers --root="$root" - <"$unitdir/wbroker.sysusers.conf" 2>&1) &&
     grep -q '^wbroker:x:[0-9]*:[0-9]*:' "$root/etc/passwd" &&
     grep -q '^wbroker:x:[0-9]*:' "$root/etc/group"; then
    pass "sysusers creates user and group wbroker"
  else
    failmsg "systemd-sysusers rejected wbroker.sysusers.conf: $out"
  fi
  if out=$(systemd-tmpfiles --root="$root" --create - <"$unitdir/wbroker.tmpfiles.conf" 2>&1) &&
     [[ $(stat -c '%a' "$root/run/wbroker") == 750 ]] && [[ -d $root/etc/wbroker ]] &&
     [[ -f $root/etc/wbroker/wbrokerd.toml ]]; then
    uid=$(awk -F: '$1 == "wbroker" { print $3 }' "$root/etc/passwd")
    if [[ $(stat -c '%u' "$root/run/wbroker") == "$uid" ]]; then
      pass "tmpfiles creates /run/wbroker 0750 wbroker, /etc/wbroker, an empty wbrokerd.toml"
    else
      failmsg "tmpfiles: /run/wbroker is not owned by wbroker"
    fi
  else
    failmsg "systemd-tmpfiles rejected wbroker.tmpfiles.conf or created the wrong paths: $out"
  fi
  # "w" only writes files that exist (without truncating them, as sysfs
  # wants): give the scratch root an empty stand-in for the sysfs file.
  thp=$root/sys/kernel/mm/transparent_hugepage/shmem_enabled
  mkdir -p "$(dirname "$thp")"
  : >"$thp"
  if out=$(systemd-tmpfiles --root="$root" --create - <"$unitdir/wbroker-shmem-thp.conf" 2>&1) &&
     [[ $(cat "$thp") == advise ]]; then
    pass "wbroker-shmem-thp.conf writes advise to shmem_enabled"
  else
    failmsg "wbroker-shmem-thp.conf did not write advise to $thp: $out (file: $(cat "$thp"))"
  fi
fi

if [[ $fail -ne 0 ]]; then
  echo "systemd unit checks FAILED" >&2
  exit 1
fi
echo "systemd unit checks passed"
