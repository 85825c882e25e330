"""Fused evaluation update versus F.cross_entropy + torchmetrics, and sync() versus torchmetrics' sync.

    pytest benchmarks/bench_evaluator.py                       # (16384, 1000); FASTEVAL_BENCH_FULL=1: (262144, 1000)
    python -m fasteval bench                                   # the same cases as a table, CSV and plot

The cases live in fasteval/_bench_evaluator.py; this file only hands them to pytest-benchmark. Timings
never fail a test; parity (the same results on the same inputs) does.
"""
import os

import pytest
import torch

from fasteval import _bench_evaluator as cases

FULL = os.environ.get("FASTEVAL_BENCH_FULL", "0") == "1"
N, C = (262144, 1000) if FULL else (16384, 1000)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, C, generator=g) * 2, torch.randint(0, C, (N,), generator=g)


@pytest.mark.parametrize("provider", ["fasteval", "torch+torchmetrics"])
def test_update_compute(benchmark, inputs, provider):
    pytest.importorskip("torchmetrics")
    x, t = inputs
    fn = cases._fasteval if provider == "fasteval" else cases._baseline
    benchmark.group = f"eval update+compute {N}x{C} float32"
    rounds = 5 if provider == "fasteval" or not FULL else 1
    result = benchmark.pedantic(fn, args=(x, t, C), rounds=rounds, iterations=1, warmup_rounds=0)
    assert result["confusion_matrix"].sum() == N


def test_table():
    """All evaluator cases measured in one run: medians and ratios printed, parity asserted."""
    pytest.importorskip("torchmetrics")
    rows = cases.evaluator_cases(quick=not FULL, device="cpu")
    print()
    for r in rows:
        print(f"{r['case']:<44} {r['provider']:<20} {r['median_ms']:>10.2f} ms  x{r['ratio_vs_baseline']:.1f}  "
              f"parity={r['parity']}")
    assert all(r["parity"] for r in rows)
