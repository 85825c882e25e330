"""The fused evaluation: ClassificationEvaluator update + compute against F.cross_entropy + torchmetrics,
the update alone against the same update in plain torch (eager and compiled), and sync() against
torchmetrics' sync on two gloo processes. The cases live in fasteval/bench/cases.py; see
benchmarks/conftest.py for the switches."""
TABLE = "evaluator"


def test_bench(bench_case, run_bench):
    run_bench(bench_case)
