#!/usr/bin/env bash
# Mutation check of fasteval's Python layer (scripts/mutation.py): plants one plausible bug at a time in a
# copy of the package, runs the tests that exist to notice it, and reports the score and the survivors.
# It takes many minutes (about half an hour on two busy cores), so it is not part of the test command.
#
# Usage: bash scripts/mutation.sh [--list] [--only TEXT] [--reference] [--min-score 90] ...
#        PYTHON=path/to/python to choose the interpreter (default: .venv/bin/python, else python3).
# Needs the compiled library built in place (scripts/setup.sh does it) for the dispatch mutants.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" scripts/mutation.py --python "$PY" "$@"
