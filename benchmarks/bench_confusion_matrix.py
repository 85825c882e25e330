"""Confusion matrices (from labels, from scores), top-5 accuracy and binned AUROC: fasteval against the
torch formulas (eager and compiled), torchmetrics and scikit-learn. The cases live in
fasteval/bench/cases.py; see benchmarks/conftest.py for the switches."""
TABLE = "confusion_matrix"


def test_bench(bench_case, run_bench):
    run_bench(bench_case)
