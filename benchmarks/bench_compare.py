"""The logit comparison: LogitComparator update + compute against the torch composition (eager and
compiled) on the same inputs, with peak memory. The cases live in fasteval/bench/cases.py; see
benchmarks/conftest.py for the switches."""
TABLE = "compare"


def test_bench(bench_case, run_bench):
    run_bench(bench_case)
