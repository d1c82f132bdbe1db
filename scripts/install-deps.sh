#!/usr/bin/env bash
# Installs what building and testing wbroker needs on Debian 12 (bookworm):
#   1. the Debian packages below (apt-get; skipped when all are installed already),
#   2. a Python virtual environment at .venv with numpy and safetensors, used by
#      scripts/make_hf_cache.py and by the tests that cross-check safetensors files.
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
# libsystemd, OpenSSL; PCRE2 and ICU for the tokenizers). Tests: GoogleTest
# and GoogleMock, google-benchmark (bench/), systemd (systemd-analyze,
# systemd-sysusers, systemd-tmpfiles for tests/systemd), python3 + venv + pip,
# ca-certificates so pip can reach PyPI over HTTPS.
packages=(
  cmake ninja-build g++ pkg-config git
  libboost-dev libspdlog-dev libfmt-dev nlohmann-json3-dev libcli11-dev libtomlplusplus-dev
  libsystemd-dev libpcre2-dev libicu-dev libssl-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  systemd python3 python3-venv python3-pip ca-certificates
)
# Pinned Python packages (numpy 2.2.6 has wheels for CPython 3.10 to 3.13;
# Debian 12 ships 3.11).
py_packages=(numpy==2.2.6 safetensors==0.8.0)

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

check_py='
import sys
import numpy, safetensors
want = dict(a.split("==") for a in sys.argv[1:])
have = {"numpy": numpy.__version__, "safetensors": safetensors.__version__}
sys.exit(0 if all(have[k] == v for k, v in want.items()) else 1)
'
if "$venv/bin/python" -c "$check_py" "${py_packages[@]}" >/dev/null 2>&1; then
  say "venv has ${py_packages[*]} already"
else
  say "running: $venv/bin/python -m pip install ${py_packages[*]}"
  "$venv/bin/python" -m pip install --disable-pip-version-check -q "${py_packages[@]}" ||
    die "pip install ${py_packages[*]} failed"
  "$venv/bin/python" -c "$check_py" "${py_packages[@]}" ||
    die "venv $venv still lacks ${py_packages[*]} after pip install"
fi
say "done"
