#!/usr/bin/env bash
# Proves the CUDA kernels on a machine with an NVIDIA GPU, torch with CUDA, nvcc and ninja (no network):
# builds fasteval for the local GPU, runs the whole test suite (CPU and CUDA), compute-sanitizer memcheck
# on a small subset, the host-sync check, and `python -m fasteval bench --device cuda`.
# Logs and CSVs go to the directory given as the first argument. Budget: under 8 minutes on 16 cores + H100.
#
#   bash benchmarks/gpu_check.sh OUT_DIR
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/summary.txt"; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nvcc --version | tail -2
  $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
  git rev-parse --short HEAD 2>/dev/null || true
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

ARCH=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
stamp "build for sm_${ARCH/./} (MAX_JOBS=$(nproc))"
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
if ! FASTEVAL_FORCE_CUDA=1 FASTEVAL_STRICT_BUILD=1 TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=$(nproc) \
     $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  stamp "BUILD FAILED (see build.log)"; tail -30 "$OUT/build.log"; exit 1
fi
$PY -m fasteval info | tee "$OUT/info.txt"

stamp "test suite (CPU and CUDA)"
timeout 240 $PY -m pytest tests -q -x -p no:cacheprovider --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1 || status=1
tail -5 "$OUT/tests.log" | tee -a "$OUT/summary.txt"

stamp "host-sync check"
timeout 60 $PY -m pytest tests/test_cuda_sync.py -q -p no:cacheprovider > "$OUT/sync.log" 2>&1 || status=1
tail -2 "$OUT/sync.log" | tee -a "$OUT/summary.txt"

SAN=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
if [ -x "$SAN" ]; then
  stamp "compute-sanitizer memcheck (subset)"
  timeout 150 "$SAN" --tool memcheck --error-exitcode 99 $PY -m pytest -q -p no:cacheprovider -x \
    tests/test_cross_entropy.py -k "cuda and (kernel_matches_reference or non_contiguous or empty or non_finite)" \
    > "$OUT/memcheck.log" 2>&1 || status=1
  grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.log" | tail -3 | tee -a "$OUT/summary.txt"
else
  stamp "compute-sanitizer not found: memcheck skipped"
fi

stamp "benchmarks"
timeout 200 $PY -m fasteval bench --device cuda --out "$OUT" > "$OUT/bench.log" 2>&1 || status=1
cat "$OUT/bench.log"
stamp "done, status $status"
exit $status
