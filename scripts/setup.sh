#!/usr/bin/env bash
# Creates .venv with pinned dependencies (CPU torch) and builds fasteval into it (editable).
# Usage: bash scripts/setup.sh        (VENV=path to use another location)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q -r requirements-dev.txt
# --no-build-isolation: the extension is compiled against the torch installed above.
FASTEVAL_STRICT_BUILD=${FASTEVAL_STRICT_BUILD:-1} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
"$VENV/bin/python" -m fasteval info
