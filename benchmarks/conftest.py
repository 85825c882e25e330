"""pytest-benchmark over fasteval's case registry (``fasteval.bench.cases``), the cases of
``python -m fasteval bench``: each ``bench_<table>.py`` names its ``TABLE``; this file parametrises its
``test_bench`` over that table's cases and providers, times each with pytest-benchmark on the case's
inputs, fails a test only on a parity failure (never on a timing), and ends with the ratio summary:
baseline median / fasteval median in this run (> 1: fasteval is faster).

    pytest benchmarks/                                  # the full sizes, CPU
    FASTEVAL_BENCH_QUICK=1 pytest benchmarks/           # the --quick sizes
    FASTEVAL_BENCH_DEVICE=cuda pytest benchmarks/       # on the GPU
    pytest benchmarks/bench_cross_entropy.py -k "32000 and torch.compile"
"""
import collections
import os

import pytest
import torch

from fasteval.bench import cases as registry
from fasteval.bench import harness

QUICK = os.environ.get("FASTEVAL_BENCH_QUICK", "0") == "1"
DEVICE = os.environ.get("FASTEVAL_BENCH_DEVICE", "cpu")
ROUNDS, MAX_S = (5, 1.0) if QUICK else (7, 15.0)  # as python -m fasteval bench: fewer rounds for slow calls

_MEDIANS = collections.defaultdict(dict)  # case label -> provider key -> median ms
_CURRENT = {}  # the inputs and fasteval's result of one case at a time


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    if DEVICE == "cuda" and not torch.cuda.is_available():
        metafunc.parametrize("bench_case", [pytest.param(None, marks=pytest.mark.skip("no CUDA device"))])
        return
    params = []
    for case in registry.select([metafunc.module.TABLE], QUICK, DEVICE):
        keys = [None] if case.runner else [p.key for p in harness.provider_calls(case, DEVICE)]
        params += [pytest.param((case, k), id=f"{case.label(QUICK)}-{k or 'all'}") for k in keys]
    metafunc.parametrize("bench_case", params)


@pytest.fixture
def run_bench(request):
    """``run_bench((case, provider key))``: warm up, check parity against fasteval, time with pytest-benchmark."""
    def run(item):
        case, key = item
        label = case.label(QUICK)
        if key is None:  # measured by the case's own runner (several processes)
            rows = harness.run_case(case, QUICK, DEVICE)
            _MEDIANS[label].update({r.key: r.median_ms for r in rows if r.status == "ok"})
            assert not [r.note for r in rows if r.parity is False]
            return
        p = next(p for p in harness.provider_calls(case, DEVICE) if p.key == key)
        if not p.available:
            pytest.skip(p.note)
        if _CURRENT.get("case") is not case:
            _CURRENT.clear()  # keep one case's inputs alive at a time
            _CURRENT.update(case=case, inputs=case.make_inputs(QUICK, DEVICE))
        inputs = _CURRENT["inputs"]
        fn, d, result, first_s = harness.warm_up(case, p, inputs, DEVICE)
        if key == "fasteval":
            _CURRENT["ours"] = result
        elif "ours" in _CURRENT:
            ok, detail = harness.parity_of(p, _CURRENT["ours"], result, inputs)
            assert ok is not False, f"{label} vs {key}: {detail}"
        del result
        benchmark = request.getfixturevalue("benchmark")
        benchmark.group = label
        benchmark.extra_info["provider"] = key
        rounds = max(1, min(ROUNDS, int(MAX_S / max(first_s, 1e-9))))
        with (case.context or harness.contextlib.nullcontext)():
            benchmark.pedantic(lambda: (fn(d), harness.sync(DEVICE)), rounds=rounds, iterations=1)
        _MEDIANS[label][key] = benchmark.stats.stats.median * 1e3
    return run


def pytest_terminal_summary(terminalreporter):
    if not _MEDIANS:
        return
    tr = terminalreporter
    tr.write_sep("=", "fasteval ratio = baseline median / fasteval median in this run (> 1: fasteval faster)")
    for case, meds in _MEDIANS.items():
        ours = meds.get("fasteval")
        if not ours:
            continue
        for key, ms in meds.items():
            if key != "fasteval":
                tr.write_line(f"{case:<44} vs {key:<44} {ms / ours:8.2f}x   (fasteval {ours:.3f} ms, {ms:.3f} ms)")


def pytest_collect_file(file_path, parent):
    """Collects ``bench_*.py`` when pytest is given this directory (a file given by name is collected anyway)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
