#!/usr/bin/env bash
# Proves the CUDA kernels on a machine with an NVIDIA GPU, torch with CUDA, nvcc and ninja (no network).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [--budget SECONDS] [--quick] [--stages a,b,...] [--tables a,b,...]
#                                [--dry-run]
#
# --quick: no large tests, the quick benchmarks. --dry-run: exercises this script's plumbing on a machine
# without a GPU: no build (the library in the tree is used), the kernel sweep on the CPU kernels, a stub in
# place of compute-sanitizer, the CPU benchmarks.
#
# OUT_DIR defaults to $OUT when set (the GPU runner sets it). FASTEVAL_COMMIT=<hash> records the commit when
# the copy of the tree has no .git. PYTHON selects the interpreter (default python3).
#
# Stages, in order; every stage runs whatever failed before it (no set -e), except that the GPU stages need
# a successful build. Each has a time limit inside the overall budget (default 480 s):
#   env        device, driver, nvcc, torch / CUDA versions, python, packages, commit   -> environment.txt
#   build      setup.py build_ext --inplace, local arch, all cores, strict   -> build.log, info.txt, sass-loops.txt
#   throw      scripts/throw_probe.py: does a C++ error of the library reach Python as an exception, or kill
#              the process? (the H200 image's build did the latter: see the README). A minimal extension
#              built by the same compiler, with and without fasteval's flags, tells a toolchain fault from
#              one of this library; the first crash reruns under cuda-gdb for its native backtrace (in the
#              racecheck lane). Were the library's own errors to crash, the tests that expect one are
#              deselected by name in both suites (each would cost a restart)                -> throw-probe.txt
#   suite      the whole test suite (doctests and every CUDA test, large ones included), no -x, as two
#              pytest processes side by side: suite-cuda (the CUDA test files, and the op test files whose
#              CUDA tests sit beside their CPU ones: CUDA_TEST_FILES below) and suite-rest (the others).
#              A CUDA device fault stops a pytest process after the test that caused it (tests/conftest.py)
#              and it resumes after that test in a fresh process; so does a crash of the process (a
#              segmentation fault), after the test that was running (30 processes at most)
#                                    -> tests-suite-{cuda,rest}-N.log/xml, results-*.tsv (every outcome)
#   sync       host-sync check: tests/test_cuda_sync.py, and every case of the kernel sweep
#              (benchmarks/cuda_kernel_sweep.py) under set_sync_debug_mode("error")    -> sync-*.log
#   memcheck   compute-sanitizer memcheck over the kernel sweep (every kernel)        -> memcheck.log
#   racecheck  compute-sanitizer racecheck over the sweep's shared-memory cases       -> racecheck.log
#   synccheck  compute-sanitizer synccheck, same cases                                 -> synccheck.log
#   initcheck  compute-sanitizer initcheck over the whole sweep, if time is left      -> initcheck.log
#   bench      python -m fasteval bench --device cuda, alone at the end, one table at a time (--quick when
#              time is short); --tables picks them (default: cross_entropy, evaluator, confusion_matrix,
#              compare, linear_cross_entropy)                                          -> bench-*/, bench-*.log
# The two suite processes run in parallel with two lanes of the others (sync, memcheck, initcheck |
# racecheck, synccheck, with the throw probe's debugger run first).
# In OUT_DIR: summary.txt (one line per stage as it ends: status, wall seconds, counts), failures.txt (every
# failed test with the first lines of its report), environment.txt, throw-probe.txt, sanitizer-reports.txt
# (each report after the sweep case that was running), bench.csv, and gpu_check-logs.tar.gz with every log
# (the files named above), junit XML, per-test outcomes and benchmark output. The exit status is 0 when
# every stage passed.
#
# Measured on the H200 (16 cores): env 9 s, build 165-180 s, the parallel group 110-140 s, and the full
# bench over 90 s for cross_entropy (it had not finished at 90 s: its torch.compile baselines compile
# first), 40-55 s for each of evaluator and compare, 40-55 s for linear_cross_entropy before its two
# grad_dtype cases were added (each compiles one more fwd+bwd graph: allow it 100 s) and over 90 s for
# confusion_matrix (scikit-learn's baselines). Every table's CSV is rewritten after each case, so a table
# stopped by its time limit keeps the cases it finished. Where one command may run at most 10 minutes,
# everything but most of the bench fits in one: run `--budget 470 --tables linear_cross_entropy,
# cross_entropy` first (stopped at 540 s), then on the same machine (the build in the tree is kept)
# `--stages bench --tables evaluator,compare,confusion_matrix --budget 250`; with device time left,
# benchmarks/cuda_profile.py (about 75 s) and benchmarks/linear_ce_chunks.py.
set -uo pipefail

OUT_ARG=""
BUDGET=480
QUICK=0
TABLES="cross_entropy,evaluator,confusion_matrix,compare,linear_cross_entropy"
DRY=0
STAGES="env,build,throw,suite,sync,memcheck,racecheck,synccheck,initcheck,bench"
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) BUDGET=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --dry-run) DRY=1; shift ;;
    --stages) STAGES=$2; shift 2 ;;
    --tables) TABLES=$2; shift 2 ;;
    -h|--help) sed -n '2,57p' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) OUT_ARG=$1; shift ;;
  esac
done
OUT_DIR=${OUT_ARG:-${OUT:-}}
if [ -z "$OUT_DIR" ]; then echo "usage: gpu_check.sh OUT_DIR (or set OUT)" >&2; exit 2; fi
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
# Every log goes to LOG, outside OUT_DIR: OUT_DIR gets only summary.txt, failures.txt, environment.txt,
# sanitizer-reports.txt, bench.csv and gpu_check-logs.tar.gz (all of LOG), packed after each phase so
# that a run cut short still returns what it did (the GPU runner returns at most 8 files from $OUT).
LOG=${GPU_CHECK_LOG_DIR:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$LOG"
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} FASTEVAL_EXPECT_COMPILED=1
# Wheels carried in .whl/ (packages the GPU machine lacks: liger-kernel, the bench's Liger baselines, is one
# pure-Python wheel: `pip download --no-deps --only-binary=:all: -d .whl liger-kernel==0.8.5`, `.whl/` in
# .git/info/exclude, and .whl in the run's carry) go into a folder of their own, after the tree on PYTHONPATH.
if compgen -G ".whl/*.whl" > /dev/null; then
  EXTRA_SITE=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
  if $PY -m pip install -q --no-index --no-deps --no-compile --target "$EXTRA_SITE" .whl/*.whl > "$LOG/wheels.log" 2>&1
  then
    export PYTHONPATH=$PYTHONPATH:$EXTRA_SITE
  fi
fi
T0=$(date +%s)
DEADLINE=$((T0 + BUDGET))
SUMMARY=$OUT_DIR/summary.txt
: > "$SUMMARY"

now() { date +%s; }
left() { echo $((DEADLINE - $(now))); }
want() { [[ ",$STAGES," == *",$1,"* ]]; }
# limit DEFAULT [RESERVE]: a stage's time limit: DEFAULT, or what is left before the last RESERVE seconds of
# the budget; at least 1 (timeout 0 would mean no limit).
limit() {
  local l=$(( $(left) - ${2:-0} ))
  [ "$l" -gt "$1" ] && l=$1
  [ "$l" -lt 1 ] && l=1
  echo "$l"
}
record() {  # record STAGE STATUS SECONDS DETAILS
  printf '%-10s %-8s %5ss  %s\n' "$1" "$2" "$3" "$4" | tee -a "$SUMMARY"
}
say() { echo "[$(( $(now) - T0 ))s] $*"; }
pack() {  # all of LOG into OUT_DIR/gpu_check-logs.tar.gz, and the sanitizers' reports side by side
  cp "$OUT_DIR"/summary.txt "$OUT_DIR"/failures.txt "$OUT_DIR"/environment.txt "$LOG"/ 2>/dev/null
  cat "$LOG"/*-reports.txt > "$OUT_DIR/sanitizer-reports.txt" 2>/dev/null || true
  [ -s "$OUT_DIR/sanitizer-reports.txt" ] || rm -f "$OUT_DIR/sanitizer-reports.txt"
  tar -C "$LOG" -czf "$OUT_DIR/gpu_check-logs.tar.gz.part" . 2>/dev/null \
    && mv "$OUT_DIR/gpu_check-logs.tar.gz.part" "$OUT_DIR/gpu_check-logs.tar.gz"
}

# ---------------------------------------------------------------------------------------------------
# env
# CUDA_HOME as CI finds it: nvcc on PATH may be a wrapper script that execs the toolkit's real nvcc.
if [ -z "${CUDA_HOME:-}" ]; then
  NVCC=$(command -v nvcc || true)
  if [ -n "$NVCC" ]; then
    REAL=$(grep -a -m1 -o '^exec [^ ]*nvcc' "$NVCC" 2>/dev/null | sed 's/^exec //' || true)
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "${REAL:-$NVCC}")")")
  elif [ -x /usr/local/cuda/bin/nvcc ]; then
    CUDA_HOME=/usr/local/cuda
  fi
fi
export CUDA_HOME=${CUDA_HOME:-}
export PATH=${CUDA_HOME:+$CUDA_HOME/bin:}$PATH
SITE=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)
# Headers torch's CUDA headers include (cublas, cusparse, ...) when the toolkit is a minimal one: the pip
# nvidia packages' copies, after the toolkit's own (-I beats CPATH).
for d in "$SITE"/nvidia/*/include; do
  [ -d "$d" ] && export CPATH=${CPATH:+$CPATH:}$d
done
SAN=""
for s in "$(command -v compute-sanitizer || true)" "$CUDA_HOME/bin/compute-sanitizer" \
         "$CUDA_HOME/compute-sanitizer/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer; do
  if [ -n "$s" ] && [ -x "$s" ]; then SAN=$s; break; fi
done
COMMIT=${FASTEVAL_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
SWEEP_DEV=()
if [ "$DRY" = 1 ]; then
  SWEEP_DEV=(--device cpu)
  SAN=$LOG/sanitizer-stub.sh  # runs the command after the sanitizer's options, reports no errors
  cat > "$SAN" <<'STUB'
#!/usr/bin/env bash
while [ $# -gt 0 ] && [[ "$1" != *python* ]]; do shift; done
rc=0
[ $# -gt 0 ] && { "$@"; rc=$?; }
echo "========= ERROR SUMMARY: 0 errors (stub)"
exit $rc
STUB
  chmod +x "$SAN"
fi

if want env; then
  s=$(now)
  {
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $COMMIT ($(git status --porcelain 2>/dev/null | wc -l) files changed, if git knows)"
    echo "host: $(hostname) cores: $(nproc) memory: $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}')"
    echo "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1)"
    echo "CUDA_HOME: ${CUDA_HOME:-not found}"
    echo "nvcc: $( ("$CUDA_HOME/bin/nvcc" --version 2>&1 || nvcc --version 2>&1) | tail -2 | tr '\n' ' ')"
    echo "compute-sanitizer: ${SAN:-not found} $([ -n "$SAN" ] && "$SAN" --version 2>&1 | tail -1)"
    echo "CPATH: ${CPATH:-}"
    echo "python: $($PY --version 2>&1) ($(command -v $PY))"
    echo "c++: ${CXX:-c++} = $(command -v "${CXX:-c++}"): $("${CXX:-c++}" --version 2>&1 | head -1)"
    $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
           "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
           "capability", torch.cuda.get_device_capability() if torch.cuda.is_available() else "-")' 2>&1
    echo "ninja: $(ninja --version 2>&1)"
    echo "packages:"
    $PY -m pip list 2>/dev/null | grep -i -E "^(torch|triton|numpy|pytest|hypothesis|scikit-learn|torchmetrics|ninja|pybind11|matplotlib|setuptools|liger.kernel) " | sed 's/^/  /'
  } > "$OUT_DIR/environment.txt" 2>&1
  nvidia-smi > "$LOG/nvidia-smi.txt" 2>&1
  cat "$OUT_DIR/environment.txt"
  record env ok $(( $(now) - s )) "$(grep '^gpu:' "$OUT_DIR/environment.txt" | cut -c6-)"
fi

# ---------------------------------------------------------------------------------------------------
# build
BUILT=0
if [ "$DRY" = 1 ]; then
  BUILT=1
  $PY -m fasteval info > "$LOG/info.txt" 2>&1
  want build && record build SKIPPED 0 "dry run: the library in the tree"
elif want build; then
  s=$(now)
  ARCH=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)
  say "build for sm_${ARCH/./} with MAX_JOBS=$(nproc)"
  rm -f fasteval/_C*.so
  timeout -k 10 "$(limit 400 120)" env FASTEVAL_FORCE_CUDA=1 FASTEVAL_STRICT_BUILD=1 TORCH_CUDA_ARCH_LIST=$ARCH \
    MAX_JOBS=$(nproc) $PY setup.py build_ext --inplace > "$LOG/build.log" 2>&1
  rc=$?
  $PY -m fasteval info > "$LOG/info.txt" 2>&1
  cat "$LOG/info.txt"
  missing=$($PY -c '
from fasteval import _loader
k = _loader.kernels()
print(" ".join(op for op, d in k.items() if "cuda" not in d) if k else "all (not loaded)")' 2>&1)
  # the hot loops' instruction counts of this build (scripts/sass_loops.py; a record, never a failure)
  $PY scripts/sass_loops.py fasteval/_C*.so cross_entropy_forward cross_entropy_backward eval_rows_kernel \
    > "$LOG/sass-loops.txt" 2>&1 || true
  if [ "$rc" -eq 0 ] && [ -z "$missing" ]; then
    BUILT=1
    record build ok $(( $(now) - s )) "sm_${ARCH/./}, CUDA kernels registered for every op"
  else
    tail -40 "$LOG/build.log"
    record build FAILED $(( $(now) - s )) "rc=$rc; ops without a CUDA kernel: ${missing:-none} (GPU stages skipped)"
  fi
else
  $PY -c 'from fasteval import _loader; import sys; sys.exit(0 if _loader.has_kernel("eval_update", "cuda") else 1)' \
    && BUILT=1
fi

pack

# When a C++ exception kills the process (the throw stage below), every test that expects an error from the
# compiled library would cost a restart of its pytest process: those are deselected by name, and the files
# that hold nothing else are left out.
THROW_K="not (raise or raises or error or errors or bad or invalid or reject or rejects or wrong)"
THROW_FILES=(tests/test_errors.py tests/test_op_errors.py)

BENCH_RESERVE=$([ "$QUICK" = 1 ] && echo 40 || echo 100)  # seconds the stages before the bench leave it

# ---------------------------------------------------------------------------------------------------
# throw: does a C++ exception from the library reach Python, or kill the process? (scripts/throw_probe.py;
# a minimal extension built with the same compiler, with and without fasteval's flags, tells a toolchain
# fault from one of this library)
THROWS_CRASH=0
if [ "$BUILT" = 1 ] && want throw; then
  s=$(now)
  timeout -k 5 "$(limit 100 "$BENCH_RESERVE")" $PY scripts/throw_probe.py --timeout 90 --out "$OUT_DIR/throw-probe.txt" \
    > "$LOG/throw-probe.log" 2>&1
  rc=$?
  cp "$OUT_DIR/throw-probe.txt" "$LOG/" 2>/dev/null
  line=$(grep -a '^throw probe:' "$LOG/throw-probe.log" || echo "no report (rc $rc)")
  if grep -q -E '^op_cpu_(index|value) +CRASH' "$OUT_DIR/throw-probe.txt" 2>/dev/null; then
    THROWS_CRASH=1
    line="$line; the tests that expect an error are deselected: -k \"$THROW_K\", ${THROW_FILES[*]} left out"
  fi
  record throw "$([ $rc -eq 0 ] && echo ok || echo FAILED)" $(( $(now) - s )) "$line"
fi

# ---------------------------------------------------------------------------------------------------
# helpers for the parallel stages
results_counts() {  # results_counts FILE: "T tests: P passed, F failed, E errors, S skipped"; adds to failures.txt
  $PY - "$OUT_DIR/failures.txt" "$1" <<'PY'
import sys
out, path = sys.argv[1], sys.argv[2]
n = dict(passed=0, failed=0, errors=0, skipped=0)
tests, bad = set(), []
try:
    lines = open(path).read().splitlines()
except OSError:
    lines = []
for line in lines:
    parts = line.split("\t")
    if len(parts) < 3:
        continue
    outcome, when, nodeid, msg = (parts + [""])[:4]
    tests.add(nodeid)
    if outcome in ("passed", "skipped"):
        n[outcome] += 1
    elif when == "call":
        n["failed"] += 1
        bad.append(f"FAILED  {nodeid}  {msg}")
    else:
        n["errors"] += 1
        bad.append(f"ERROR   {nodeid} (in {when})  {msg}")
with open(out, "a") as f:
    f.write("".join(b + "\n" for b in bad))
print(f"{len(tests)} tests: {n['passed']} passed, {n['failed']} failed, {n['errors']} errors, {n['skipped']} skipped")
PY
}

stage_suite() {  # stage_suite NAME PYTEST_ARGS...: resumes after a CUDA device fault or a killed test
  local name=$1; shift
  local s round=1 resume="" rc=1 tmo killed="" lost="" crashed=""
  s=$(now)
  : > "$LOG/results-$name.tsv"
  local marker=()
  [ "$QUICK" = 1 ] && marker=(-m "not large")
  # pytest-timeout, where installed: a test stuck in Python fails alone instead of holding the process
  $PY -c 'import pytest_timeout' 2>/dev/null && marker+=(--timeout=300)
  while :; do
    tmo=$(limit 330 "$BENCH_RESERVE")
    if [ "$tmo" -lt 20 ]; then break; fi
    say "$name round $round${resume:+ (resuming after $resume)}, limit ${tmo}s"
    FASTEVAL_PROGRESS_FILE=$LOG/progress-$name.txt FASTEVAL_RESULTS_FILE=$LOG/results-$name.tsv \
      FASTEVAL_RESUME_AFTER=$resume OMP_NUM_THREADS=8 \
      timeout -k 10 "$tmo" $PY -m pytest -q -rfE --maxfail=100000 --durations=25 ${marker[@]+"${marker[@]}"} \
      --junitxml="$LOG/tests-$name-$round.xml" "$@" > "$LOG/tests-$name-$round.log" 2>&1
    rc=$?
    tail -5 "$LOG/tests-$name-$round.log"
    if [ "$round" -ge 30 ]; then break; fi
    if grep -q "CUDA context lost after" "$LOG/tests-$name-$round.log"; then
      resume=$(head -1 "$LOG/progress-$name.txt")
      lost="$lost $resume"
      echo "CUDA context lost after $resume (the rest ran in a new process)" >> "$OUT_DIR/failures.txt"
    elif grep -q "Fatal Python error" "$LOG/tests-$name-$round.log" || [ "$rc" -eq 134 ] || [ "$rc" -eq 139 ]; then
      # (pytest's progress dots precede the message on its line)
      resume=$(head -1 "$LOG/progress-$name.txt")
      crashed="$crashed $resume"
      echo "CRASHED  $resume  $(grep -m1 -o 'Fatal Python error.*' "$LOG/tests-$name-$round.log" || echo "exit $rc") (the rest ran in a new process)" \
        >> "$OUT_DIR/failures.txt"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      resume=$(head -1 "$LOG/progress-$name.txt")
      killed="$killed $resume"
      echo "KILLED at the time limit while running $resume (not a result)" >> "$OUT_DIR/failures.txt"
    else
      break
    fi
    round=$((round + 1))
  done
  local counts status=ok
  counts=$(results_counts "$LOG/results-$name.tsv")
  if [ "$rc" -ne 0 ] || [ "$round" -gt 1 ] || ! grep -q " 0 failed, 0 errors" <<< "$counts"; then status=FAILED; fi
  if [ "$DRY" = 0 ] && grep -q ": 0 passed" <<< "$counts"; then status=FAILED; fi  # everything skipped
  [ -n "$crashed" ] && status=FAILED
  record "$name" $status $(( $(now) - s )) "$counts; $round pytest run(s)${lost:+; device fault after:$lost}${crashed:+; process crashed in:$crashed}${killed:+; killed at the time limit in:$killed}"
}

# Whole files: each op's test file holds its CPU and CUDA tests side by side. The comparison and the linear
# cross-entropy files are here too: their CUDA value and gradient tests have not yet run on a GPU.
CUDA_TEST_FILES=(tests/test_cuda_sweep.py tests/test_cuda_sync.py tests/test_confusion.py tests/test_evaluator.py
                 tests/test_linear_cross_entropy.py tests/test_compare.py)
stage_suites() {
  local rest=() k=() f
  for f in "${CUDA_TEST_FILES[@]}"; do rest+=("--ignore=$f"); done
  if [ "$THROWS_CRASH" = 1 ]; then
    k=(-k "$THROW_K")
    for f in "${THROW_FILES[@]}"; do rest+=("--ignore=$f"); done
  fi
  rest+=(${k[@]+"${k[@]}"})
  stage_suite suite-cuda "${CUDA_TEST_FILES[@]}" ${k[@]+"${k[@]}"} &
  local pid=$!
  stage_suite suite-rest "${rest[@]}"
  wait "$pid"
}

SWEEP_EXCLUDE="none-excluded"  # a case name to leave out of the sync sweep (none: the weighted-backward fault is fixed)

run_sweep() {  # run_sweep LOG TIMEOUT PREFIX... -- SWEEP_ARGS...: resumes after a lost CUDA context (3 times)
  local log=$1 tmo=$2; shift 2
  local pre=() args=() resume="" n=0 rc
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do pre+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  args=("$@")
  : > "$log"
  local end=$(( $(now) + tmo ))
  while :; do
    if [ $((end - $(now))) -lt 5 ]; then echo "no time left for the sweep" >> "$log"; return 124; fi
    OMP_NUM_THREADS=2 timeout -k 10 $((end - $(now))) ${pre[@]+"${pre[@]}"} $PY benchmarks/cuda_kernel_sweep.py \
      ${SWEEP_DEV[@]+"${SWEEP_DEV[@]}"} ${args[@]+"${args[@]}"} ${resume:+--resume-after "$resume"} >> "$log" 2>&1
    rc=$?
    n=$((n + 1))
    if [ "$rc" -eq 3 ] && [ "$n" -lt 4 ] && [ $((end - $(now))) -gt 20 ]; then
      resume=$(grep -o 'CUDA CONTEXT LOST after case [^:]*' "$log" | tail -1 | sed 's/.*after case //')
      [ -n "$resume" ] && continue
    fi
    return "$rc"
  done
}

stage_sync() {
  local s rc1 rc2
  s=$(now)
  OMP_NUM_THREADS=2 timeout -k 10 "$(limit 120 "$BENCH_RESERVE")" $PY -m pytest -q -rfE -p no:cacheprovider tests/test_cuda_sync.py \
    --junitxml="$LOG/sync-tests.xml" > "$LOG/sync-tests.log" 2>&1
  rc1=$?
  local mode=(--no-sync)
  [ "$DRY" = 1 ] && mode=()
  run_sweep "$LOG/sync-sweep.log" "$(limit 150 "$BENCH_RESERVE")" -- ${mode[@]+"${mode[@]}"} --exclude "$SWEEP_EXCLUDE"
  rc2=$?
  local t sw
  t=$(tail -1 "$LOG/sync-tests.log")
  sw=$(grep '^sweep:' "$LOG/sync-sweep.log" | tail -1 | cut -c1-200)
  record sync "$([ $rc1 -eq 0 ] && [ $rc2 -eq 0 ] && echo ok || echo FAILED)" $(( $(now) - s )) \
    "test_cuda_sync: $t | sweep (rc $rc2): ${sw:-no summary}"
}

SAN_OPTS=()
probe_sanitizer() {  # the options this compute-sanitizer accepts (a kernel filter keeps torch's own kernels out)
  local full=(--kernel-name kns=fasteval --destroy-on-device-error kernel --report-api-errors no
              --show-backtrace device --print-limit 100)
  if "$SAN" --tool memcheck "${full[@]}" --error-exitcode 99 true > "$LOG/sanitizer-probe.log" 2>&1; then
    SAN_OPTS=("${full[@]}")
  else
    echo "compute-sanitizer rejected ${full[*]}; running it without them" >> "$LOG/sanitizer-probe.log"
    SAN_OPTS=(--print-limit 100)
  fi
}

stage_sanitizer() {  # stage_sanitizer TOOL DEFAULT_TIMEOUT SWEEP_ARGS...
  local tool=$1 def=$2; shift 2
  local s rc tmo
  s=$(now)
  tmo=$(limit "$def" "$BENCH_RESERVE")
  if [ "$tmo" -lt 30 ]; then record "$tool" SKIPPED 0 "no time left"; return; fi
  run_sweep "$LOG/$tool.log" "$tmo" "$SAN" --tool "$tool" ${SAN_OPTS[@]+"${SAN_OPTS[@]}"} --error-exitcode 99 \
    -- ${@+"$@"}
  rc=$?
  local errs sw status
  errs=$(grep -a -E "(ERROR|RACECHECK) SUMMARY" "$LOG/$tool.log" | sed 's/=* *//' | tr '\n' ' ')
  sw=$(grep -a '^sweep:' "$LOG/$tool.log" | tail -1 | cut -c1-160)
  case $rc in
    0) status=ok ;;
    124|137) status=TIMEOUT ;;
    *) status=FAILED ;;
  esac
  record "$tool" $status $(( $(now) - s )) "rc $rc; ${errs:-no error summary}| ${sw:-no sweep summary}"
  # each report's first line, after the sweep case that was running
  awk '/^case [0-9]+\//{c=$0} /^========= (Invalid|Error|Race|Barrier|Uninitialized|Program hit|Warning)/{print c "  ::  " $0}' \
    "$LOG/$tool.log" | head -200 > "$LOG/$tool-reports.txt"
}

lane_b() {
  want sync && stage_sync
  if [ -n "$SAN" ]; then
    want memcheck && stage_sanitizer memcheck 200
    want initcheck && stage_sanitizer initcheck 150
  fi
}

lane_c() {
  local first
  first=$(grep -m1 -E '^[a-z_]+ +CRASH' "$OUT_DIR/throw-probe.txt" 2>/dev/null | cut -d' ' -f1)
  if [ -n "$first" ]; then  # the native backtrace of the first crash (cuda-gdb or gdb)
    timeout -k 5 "$(limit 120 "$BENCH_RESERVE")" $PY scripts/throw_probe.py --debugger --cases "$first" \
      --timeout 100 --out "$LOG/throw-backtrace.txt" > /dev/null 2>&1
    cat "$LOG/throw-backtrace.txt" >> "$OUT_DIR/throw-probe.txt" 2>/dev/null
  fi
  if [ -n "$SAN" ]; then
    want racecheck && stage_sanitizer racecheck 200 --only smem
    want synccheck && stage_sanitizer synccheck 120 --only smem
  fi
}

# ---------------------------------------------------------------------------------------------------
# the parallel group: suite-cuda | suite-rest | sync, memcheck, initcheck | racecheck, synccheck
: > "$OUT_DIR/failures.txt"
PIDS=()
if [ "$BUILT" = 1 ]; then
  if [ -n "$SAN" ]; then probe_sanitizer; else
    for t in memcheck racecheck synccheck initcheck; do want $t && record $t SKIPPED 0 "compute-sanitizer not found"; done
  fi
  lane_b > "$LOG/lane-b.log" 2>&1 &
  PIDS+=($!)
  lane_c > "$LOG/lane-c.log" 2>&1 &
  PIDS+=($!)
else
  for t in sync memcheck racecheck synccheck initcheck; do want $t && record $t SKIPPED 0 "no CUDA build"; done
fi
want suite && stage_suites
[ ${#PIDS[@]} -gt 0 ] && wait "${PIDS[@]}"
pack

# ---------------------------------------------------------------------------------------------------
# bench: alone, one table at a time (each with its own CSV), the fast and most important first
if want bench; then
  if [ "$BUILT" != 1 ]; then
    record bench SKIPPED 0 "no CUDA build"
  else
    s=$(now)
    notes=""
    BENCH_DEV=cuda
    [ "$DRY" = 1 ] && { BENCH_DEV=cpu; QUICK=1; }
    for table in ${TABLES//,/ }; do
      l=$(left)
      if [ "$l" -lt 25 ]; then notes="$notes $table:skipped(no time)"; continue; fi
      mode=()
      # full size needs about 40 s (cross-entropy, evaluator), 90 s (linear cross-entropy) or over 90 s
      # (confusion, scikit-learn baselines)
      case $table in confusion_matrix) need=100 ;; linear_cross_entropy) need=90 ;; *) need=45 ;; esac
      if [ "$QUICK" = 1 ] || [ "$l" -lt "$need" ]; then mode=(--quick); fi
      cap=$((l - 5))
      case $table in
        cross_entropy) [ "$cap" -gt 160 ] && cap=160 ;;
        linear_cross_entropy) [ "$cap" -gt 100 ] && cap=100 ;;
        evaluator|compare) [ "$cap" -gt 60 ] && cap=60 ;;
      esac
      timeout -k 10 "$cap" $PY -m fasteval bench --device "$BENCH_DEV" --only "$table" ${mode[@]+"${mode[@]}"} \
        --out "$LOG/bench-$table" > "$LOG/bench-$table.log" 2>&1
      rc=$?
      notes="$notes $table:$([ $rc -eq 0 ] && echo ok || echo "rc=$rc")${mode:+(quick)}"
      cat "$LOG/bench-$table.log"
    done
    record bench "$(grep -q 'rc=' <<< "$notes" && echo FAILED || echo ok)" $(( $(now) - s )) "$notes"
  fi
fi

for f in "$LOG"/bench-*/bench-*.csv; do  # one CSV: the header once
  [ -f "$f" ] || continue
  if [ -f "$OUT_DIR/bench.csv" ]; then tail -n +2 "$f" >> "$OUT_DIR/bench.csv"; else cp "$f" "$OUT_DIR/bench.csv"; fi
done
say "done in $(( $(now) - T0 ))s (budget ${BUDGET}s); logs: $LOG, packed in $OUT_DIR/gpu_check-logs.tar.gz"
pack
echo
echo "== summary ($OUT_DIR/summary.txt)"
cat "$SUMMARY"
if [ -s "$OUT_DIR/failures.txt" ]; then
  echo "== failed tests ($(wc -l < "$OUT_DIR/failures.txt"), first 40; all in failures.txt)"
  head -40 "$OUT_DIR/failures.txt"
fi
! grep -q -E "FAILED|TIMEOUT" "$SUMMARY"
