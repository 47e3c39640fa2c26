#!/usr/bin/env bash
# Builds the C++ CPU kernel with AddressSanitizer in a scratch copy of the repo and runs the CPU kernel tests
# against it: any out-of-bounds read or write in csrc/ aborts the run with a report. Needs scripts/setup.sh first.
# Usage: bash scripts/asan.sh [pytest args...]   (default: the CPU kernel, contract, property and segment tests)
# KEEP=1 leaves the scratch copy (its path is printed by bash -x) for a look at the build.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="$repo/.venv/bin/python"
work="$(mktemp -d)"
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
git -C "$repo" ls-files -z | (cd "$repo" && xargs -0 cp --parents -t "$work")
cp -r "$repo/csrc" "$work/"   # the working tree's kernel, committed or not
cd "$work"
CFLAGS="-fsanitize=address -fno-omit-frame-pointer -g" LDFLAGS="-fsanitize=address" VITKERN_PORTABLE=0 \
  "$py" setup.py -q build_ext --inplace >build.log 2>&1 || { tail -30 build.log; exit 1; }
# libstdc++ preloaded too: ASan intercepts __cxa_throw only if it is there at start (Triton's module throws
# while loading and would otherwise trip an ASan CHECK).
preload="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)"
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(tests/test_cpu_kernel.py tests/test_contract_sdpa.py tests/test_contract_varlen.py
                                 tests/test_property.py tests/test_segment_ids.py)
# detect_leaks=0: CPython's allocator keeps memory at exit on purpose; the leak report would be noise.
LD_PRELOAD="$preload" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 PYTHONPATH="$work" \
  "$py" -m pytest -q -p no:cacheprovider "${args[@]}"
