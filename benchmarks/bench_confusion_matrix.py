"""Confusion matrices and the metrics on them: fasteval against the torch bincount formula,
torchmetrics (default and validate_args=False) and scikit-learn, on the same inputs.

    pytest benchmarks/bench_confusion_matrix.py                  # pytest-benchmark timings
    FASTEVAL_BENCH_QUICK=1 pytest benchmarks/bench_confusion_matrix.py
    python benchmarks/bench_confusion_matrix.py [--quick]        # the ratio table, measured in one run

The cases and providers live in fasteval/_bench_confusion.py (shared with ``python -m fasteval bench``).
Benchmarks never fail on a timing.
"""
import os
import sys

import pytest
import torch

from fasteval._bench_confusion import CASES, confusion_cases, format_table, make_inputs, providers

QUICK = os.environ.get("FASTEVAL_BENCH_QUICK", "0") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_INPUTS = {}


def _inputs(case):
    if case not in _INPUTS:
        _INPUTS.clear()  # keep one case's inputs alive at a time
        _INPUTS[case] = make_inputs(case, QUICK, DEVICE)
    return _INPUTS[case]


def _params():
    for case in CASES:
        for name in providers(case, include_slow=QUICK):
            yield pytest.param(case, name, id=f"{case}-{name}")


@pytest.mark.parametrize("case,provider", list(_params()))
def test_bench(benchmark, case, provider):
    d = _inputs(case)
    fn = providers(case, include_slow=QUICK)[provider]
    benchmark.group = case
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def run():
        out = fn(d)
        sync()
        return out

    slow = provider.startswith(("torchmetrics", "scikit")) and "validate" not in provider
    result = benchmark.pedantic(run, rounds=2 if slow else 5, warmup_rounds=1)
    assert result is not None


if __name__ == "__main__":
    print(format_table(confusion_cases(quick="--quick" in sys.argv)))
