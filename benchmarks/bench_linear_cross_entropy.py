"""From hidden states: fasteval.linear_cross_entropy (forward, forward + backward) and
ClassificationEvaluator.update_from_hidden against F.linear + F.cross_entropy (eager and compiled) and torch's
chunked F.linear_cross_entropy. The cases live in fasteval/bench/cases.py; see benchmarks/conftest.py."""
TABLE = "linear_cross_entropy"


def test_bench(bench_case, run_bench):
    run_bench(bench_case)
