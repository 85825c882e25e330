"""pytest-benchmark glue: after the run, print fasteval's ratio against each case's baseline.

Each benchmark sets ``benchmark.group`` to its case and ``benchmark.extra_info["provider"]``; the ratios are
medians from this same run (baseline median / fasteval median).
"""
import collections

import pytest

_MEDIANS = collections.defaultdict(dict)  # case -> provider -> median seconds


@pytest.fixture
def record(benchmark):
    """``record(case, provider, fn)``: benchmark ``fn`` under ``case`` and remember its median."""
    def run(case, provider, fn, rounds=5):
        benchmark.group = case
        benchmark.extra_info["provider"] = provider
        result = benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
        _MEDIANS[case][provider] = benchmark.stats.stats.median
        return result
    return run


def pytest_terminal_summary(terminalreporter):
    if not _MEDIANS:
        return
    tr = terminalreporter
    tr.write_sep("=", "fasteval ratios (baseline median / fasteval median, this run)")
    for case, meds in _MEDIANS.items():
        ours = meds.get("fasteval")
        if not ours:
            continue
        for provider, m in meds.items():
            if provider != "fasteval":
                tr.write_line(f"{case:<45} vs {provider:<28} {m / ours:8.2f}x   "
                              f"(fasteval {ours * 1e3:.3f} ms, {provider} {m * 1e3:.3f} ms)")
