"""Cross-entropy (forward, forward + backward, latency): fasteval against F.cross_entropy, the same
torch code under torch.compile, and Liger-Kernel on CUDA. The cases live in fasteval/bench/cases.py;
see benchmarks/conftest.py for the switches."""
TABLE = "cross_entropy"


def test_bench(bench_case, run_bench):
    run_bench(bench_case)
