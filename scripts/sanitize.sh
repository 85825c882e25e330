#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of the CPU kernels.
#
# Builds the extension with -fsanitize=address,undefined (-O1 -g, frame pointers, no recovery from
# undefined behaviour; setup.py's FASTEVAL_SANITIZE switch) in a copy of the tree, then runs the CPU
# tests against it. Python itself is not instrumented, so libasan is preloaded, together with libstdc++
# (without it ASan's interceptors break C++ exceptions thrown from torch, which every bad-input test
# raises). Any sanitizer report aborts the process: the script fails.
#
# Usage: bash scripts/sanitize.sh [pytest args...]
#   PYTHON   interpreter with torch and the test requirements (default: .venv/bin/python)
#   SANITIZE_DIR  where the instrumented copy is built (default: build-sanitize)
#   SANITIZE_PHASE  build (copy, build, check the instrumentation), test (the tests against a copy built
#                   before), or all (default). CI builds while other tests run, then tests.
#   Without pytest args it runs SANITIZE_TESTS (below): the whole CPU suite but tests/test_distributed.py
#   and tests/test_loader.py, which spend their time starting Python processes (gloo workers, loader
#   environments; about 30% of the sanitized run) and reach no kernel code the other modules do not:
#   every kernel (cross-entropy forward / backward, the confusion ops, top-k rank, the fused evaluation
#   pass) still runs with its edge cases, bad inputs, property tests and the zero-size / -inf / autograd
#   checks. Measured on the 2-core development machine under a load average of about 9: the instrumented
#   build takes about 4 CPU-minutes (2 parallel jobs), the whole tests/ directory 7.5 minutes wall
#   (200 s CPU in the pytest process), the subset about two thirds of that.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
# An absolute path for the build in the copy below: relative paths are taken from the tree's root, bare
# names from PATH.
case "$PY" in /*) ;; */*) PY="$ROOT/$PY" ;; *) PY=$(command -v "$PY" 2>/dev/null || echo "$ROOT/$PY") ;; esac
OUT=${SANITIZE_DIR:-build-sanitize}
CXX=${CXX:-c++}
PHASE=${SANITIZE_PHASE:-all}
case "$PHASE" in build|test|all) ;; *) echo "sanitize: SANITIZE_PHASE must be build, test or all"; exit 2 ;; esac

LIBASAN=$("$CXX" -print-file-name=libasan.so)
LIBSTDCXX=$("$CXX" -print-file-name=libstdc++.so)
for lib in "$LIBASAN" "$LIBSTDCXX"; do
  [ -f "$lib" ] || { echo "sanitize: $lib not found (is $CXX GCC with libasan installed?)"; exit 1; }
done

if [ "$PHASE" != test ]; then
echo "sanitize: copying the tree to $OUT"
rm -rf "$OUT" && mkdir -p "$OUT"
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents {} "$OUT"/ 2>/dev/null || true
rm -f "$OUT"/fasteval/_C*.so

echo "sanitize: building with -fsanitize=address,undefined"
( cd "$OUT" && FASTEVAL_SANITIZE=address,undefined FASTEVAL_STRICT_BUILD=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "$PY" setup.py -q build_ext --inplace >build.log 2>&1 ) || { tail -50 "$OUT/build.log"; exit 1; }

# The instrumented library really is instrumented (a silent fallback to -O3 would prove nothing). grep
# reads all of nm's output: with `grep -q` it could exit at the first match, and nm, killed by SIGPIPE, would
# fail the pipeline under pipefail.
nm -D "$OUT"/fasteval/_C*.so | grep __asan_ >/dev/null || { echo "sanitize: _C is not instrumented"; exit 1; }
echo "sanitize: built in $OUT"
[ "$PHASE" = build ] && exit 0
fi

PRELOAD="$LIBASAN $LIBSTDCXX"
# The tests must import the instrumented copy (not an editable install of the source tree).
( cd "$OUT" && LD_PRELOAD="$PRELOAD" ASAN_OPTIONS=detect_leaks=0 "$PY" - <<'PY'
import os
import fasteval
from fasteval import _loader
assert fasteval.backend() == "compiled", _loader.reason()
here = os.path.realpath(os.getcwd())
assert os.path.realpath(fasteval.__file__).startswith(here + os.sep), f"imported {fasteval.__file__}, not {here}"
assert _loader.build_info().get("sanitize"), _loader.build_info()
print(f"sanitize: fasteval from {os.path.dirname(fasteval.__file__)}, built with -fsanitize={_loader.build_info()['sanitize']}")
PY
)

SANITIZE_TESTS=(tests --ignore=tests/test_distributed.py --ignore=tests/test_loader.py)
if [ "$#" -eq 0 ]; then set -- "${SANITIZE_TESTS[@]}"; fi

echo "sanitize: running pytest $* under ASan + UBSan"
LOG="$OUT/sanitize.log"
rc=0
( cd "$OUT" && \
  LD_PRELOAD="$PRELOAD" \
  ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_odr_violation=0:strict_init_order=1:check_initialization_order=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  FASTEVAL_EXPECT_COMPILED=1 OMP_NUM_THREADS=2 \
  "$PY" -m pytest -q -p no:cacheprovider -x "$@" ) 2>&1 | tee "$LOG" || rc=$?
if grep -qE "ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer|SUMMARY: (Address|UndefinedBehavior)Sanitizer" "$LOG"; then
  echo "sanitize: sanitizer report found (see above)"
  exit 1
fi
if [ "$rc" -ne 0 ]; then echo "sanitize: pytest failed (exit $rc)"; exit "$rc"; fi
echo "sanitize: clean"
