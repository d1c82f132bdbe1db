#!/usr/bin/env bash
# Installs what building and testing wbroker needs on Debian 12 (bookworm):
#   1. the Debian packages below (apt-get; skipped when all are installed already),
#   2. a Python virtual environment at .venv with the pinned packages of
#      scripts/requirements.txt (numpy, safetensors, torch, transformers, ...) and
#      the wbroker Python client (python/, installed editable), used by the
#      C++ worker's build (libtorch), the Python client and the tests.
# Safe to run again: it only does what is missing.
#
# Environment:
#   PYTHON    interpreter for the venv (default /usr/bin/python3, else python3 on PATH)
#   VENV_DIR  where the venv goes (default: .venv in the repository root)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

say() { printf 'install-deps: %s\n' "$*"; }
die() { printf 'install-deps: error: %s\n' "$*" >&2; exit 1; }

# Debian 12 packages. Build: compiler, cmake/ninja and the libraries found by
# CMakeLists.txt (Boost.Asio, spdlog, fmt, nlohmann-json, CLI11, toml++,
# libsystemd, OpenSSL; PCRE2 and ICU for the tokenizers; prometheus-cpp for the
# /metrics endpoints). Tests: GoogleTest
# and GoogleMock, google-benchmark (bench/), systemd (systemd-analyze,
# systemd-sysusers, systemd-tmpfiles for tests/systemd), clang-format (14 on
# Debian 12: tests/style/check_format.sh), python3 + venv + pip,
# ca-certificates so pip can reach PyPI over HTTPS.
packages=(
  cmake ninja-build g++ pkg-config git
  libboost-dev libspdlog-dev libfmt-dev nlohmann-json3-dev libcli11-dev libtomlplusplus-dev
  libsystemd-dev libpcre2-dev libicu-dev libssl-dev prometheus-cpp-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  systemd clang-format python3 python3-venv python3-pip ca-certificates
)
# Pinned Python packages: scripts/requirements.txt.
requirements=$repo/scripts/requirements.txt

# --- Debian packages --------------------------------------------------------
if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  say "no dpkg/apt-get here (not Debian?): skipping system packages; install the equivalents of:"
  say "  ${packages[*]}"
else
  missing=()
  for p in "${packages[@]}"; do
    if [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true) != installed ]]; then
      missing+=("$p")
    fi
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    say "all ${#packages[@]} Debian packages are installed already"
  else
    say "missing Debian packages: ${missing[*]}"
    apt=()
    if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1; then
      apt=(sudo)
    fi
    if [[ $(id -u) -ne 0 && ${#apt[@]} -eq 0 ]]; then
      say "WARNING: not root and no sudo: skipping apt-get; the build or tests may fail. As root run:"
      say "  apt-get update && apt-get install -y ${missing[*]}"
    else
      say "running: ${apt[*]:+${apt[*]} }apt-get update"
      "${apt[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
      say "running: ${apt[*]:+${apt[*]} }apt-get install -y --no-install-recommends ${missing[*]}"
      "${apt[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
  fi
fi

# --- Python venv --------------------------------------------------------------
venv=${VENV_DIR:-$repo/.venv}
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x /usr/bin/python3 ]]; then PYTHON=/usr/bin/python3; else PYTHON=python3; fi
fi
command -v "$PYTHON" >/dev/null 2>&1 || die "no Python interpreter '$PYTHON' (install python3)"

if [[ -x $venv/bin/python ]] && "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
  say "venv $venv exists ($("$venv/bin/python" --version 2>&1))"
else
  say "creating venv $venv with $PYTHON ($("$PYTHON" --version 2>&1))"
  "$PYTHON" -m venv --clear "$venv" ||
    die "'$PYTHON -m venv' failed (on Debian: apt-get install python3-venv)"
fi

# Only what is missing or at another version gets installed: a second run is fast.
check_py='
import sys
from importlib.metadata import version, PackageNotFoundError
bad = []
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, want = line.split("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        have = None
    if have != want:
        bad.append(f"{name}=={want} (have {have})")
try:
    import wbroker  # the client from python/, installed editable
except ImportError:
    bad.append("wbroker (python/)")
print(" ".join(bad))
sys.exit(1 if bad else 0)
'
if out=$("$venv/bin/python" -c "$check_py" "$requirements" 2>/dev/null); then
  say "venv has every package of scripts/requirements.txt already"
else
  say "venv lacks: ${out:-packages}"
  say "running: $venv/bin/python -m pip install -r scripts/requirements.txt -e ./python (torch is ~4 GB with its CUDA libraries)"
  "$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$requirements" -e "$repo/python" ||
    die "pip install -r scripts/requirements.txt failed"
  out=$("$venv/bin/python" -c "$check_py" "$requirements") ||
    die "venv $venv still lacks: $out"
fi
say "done"
