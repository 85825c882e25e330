"""Top-k accuracy on (262144, 1000) scores: fasteval's one-pass rank (no sort) against the torch.topk
formula, torchmetrics and scikit-learn.

    pytest benchmarks/bench_topk.py
    python benchmarks/bench_topk.py [--quick]
"""
import os
import sys

import pytest
import torch

from fasteval._bench_confusion import confusion_cases, format_table, make_inputs, providers

CASE = "top5_accuracy_C1000"
QUICK = os.environ.get("FASTEVAL_BENCH_QUICK", "0") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(CASE, QUICK, DEVICE)


@pytest.mark.parametrize("provider", list(providers(CASE, include_slow=QUICK)))
def test_bench_topk(benchmark, inputs, provider):
    fn = providers(CASE, include_slow=QUICK)[provider]
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def run():
        out = fn(inputs)
        sync()
        return out

    benchmark.group = CASE
    slow = provider.startswith(("torchmetrics", "scikit")) and "validate" not in provider
    assert benchmark.pedantic(run, rounds=2 if slow else 5, warmup_rounds=1) is not None


if __name__ == "__main__":
    print(format_table(confusion_cases(quick="--quick" in sys.argv, cases=(CASE,))))
