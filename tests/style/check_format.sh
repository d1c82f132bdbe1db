#!/usr/bin/env bash
# Checks that every C++ and CUDA source in the repository is formatted by
# .clang-format, and names each file that is not (with the command that
# fixes it). Skips (exit 77) without clang-format 14, the version the tree is
# formatted with: other versions wrap a few constructs differently.
#   tests/style/check_format.sh [REPO_ROOT]
set -euo pipefail
root=${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
cd "$root"
if ! command -v clang-format >/dev/null; then
  echo "skip: clang-format is not installed"
  exit 77
fi
version=$(clang-format --version | grep -o 'version [0-9]*' | cut -d' ' -f2)
if [[ $version != 14 ]]; then
  echo "skip: clang-format $version; the tree is formatted with clang-format 14"
  exit 77
fi
bad=()
while IFS= read -r f; do
  clang-format --dry-run -Werror "$f" >/dev/null 2>&1 || bad+=("$f")
done < <(git ls-files '*.cc' '*.h' '*.cu' | grep -v '^tests/fixtures/')
if [[ ${#bad[@]} -gt 0 ]]; then
  echo "not formatted by .clang-format (fix: clang-format -i FILE):" >&2
  printf '  %s\n' "${bad[@]}" >&2
  exit 1
fi
echo "all $(git ls-files '*.cc' '*.h' '*.cu' | grep -vc '^tests/fixtures/') sources formatted"
