"""The benchmark harness (fasteval.bench): the ratio's direction, parity failures and the exit status,
skipped peers, compile failures, the CSV columns, peak memory, and the registered cases' own parity checks.
No test here depends on a timing: where a median matters, a fake clock stands in for the real one.
"""
import argparse
import csv
import math
import sys
import types

import pytest
import torch

import fasteval
from fasteval import _loader
from fasteval.__main__ import main as fasteval_main
from fasteval.bench import cli, harness, memory, report
from fasteval.bench import cases as registry
from fasteval.bench.harness import Baseline, Case


def _toy_inputs(p, device, gen):
    return {"x": torch.arange(p["n"], dtype=torch.float32).to(device)}


def _toy(fe, baselines, **kw):
    return Case("toy", "toy n={n}", {"n": 8}, _toy_inputs, fe, baselines, quick={}, **kw)


def _args(**kw):
    return argparse.Namespace(**{**dict(quick=True, device="cpu", only=None, out=None, reps=1), **kw})


@pytest.fixture
def clock(monkeypatch):
    """A clock that only the providers advance: each call costs exactly what the test says."""
    now = [0.0]
    monkeypatch.setattr(harness, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def costing(ms, value):
        def fn(d):
            now[0] += ms / 1e3
            return value
        return fn
    return costing


def test_ratio_is_baseline_median_over_fasteval_median(clock):
    same = torch.ones(3)
    case = _toy(clock(2.0, same), [Baseline("torch", clock(6.0, same)), Baseline("torchmetrics", clock(1.0, same))])
    rows = harness.run_case(case, quick=True, device="cpu", reps=3)
    assert [r.provider for r in rows] == ["fasteval", "torch", "torchmetrics"]
    assert rows[0].median_ms == pytest.approx(2.0) and rows[0].ratio is None
    assert rows[1].median_ms == pytest.approx(6.0) and rows[1].ratio == pytest.approx(3.0)  # fasteval 3x faster
    assert rows[2].ratio == pytest.approx(0.5)  # fasteval 2x slower
    assert [r.parity for r in rows] == [None, True, True]
    assert harness.ratio(30.0, 10.0) == 3.0 and harness.ratio(1.0, float("nan")) is None


def test_two_input_case_bandwidth_counts_both_inputs(clock):
    """A case reading two tensors (a logit comparison, a fused linear layer) reports fasteval's bandwidth
    over both: bytes of the ``main`` inputs / fasteval's median."""
    def inputs(p, device, gen):
        return {"a": torch.zeros(1000, 10), "b": torch.zeros(1000, 10, dtype=torch.bfloat16)}
    case = Case("toy", "two", {}, inputs, clock(4.0, 1), [Baseline("torch", clock(8.0, 1))], quick={},
                main=("a", "b"))
    rows = harness.run_case(case, quick=True, device="cpu", reps=1)
    assert rows[0].gbps == pytest.approx((40000 + 20000) / 4e-3 / 1e9)
    assert rows[1].ratio == pytest.approx(2.0)


def test_slow_provider_is_timed_fewer_times_within_the_budget(clock):
    case = _toy(clock(1.0, 1), [Baseline("torch", clock(600.0, 1))])
    rows = harness.run_case(case, quick=True, device="cpu", reps=5)  # --quick: 1 s per provider
    assert rows[1].reps == 1 and rows[1].median_ms == pytest.approx(600.0)
    assert rows[0].reps >= 50  # sub-millisecond... here 1 ms: repeated until 50 ms were measured


def test_parity_failure_exits_nonzero(monkeypatch, capsys):
    bad = _toy(lambda d: d["x"] * 2, [Baseline("torch", lambda d: d["x"] * 2 + (d["x"] == 3))])
    monkeypatch.setitem(registry.TABLES, "toy", "Toy")
    monkeypatch.setattr(registry, "REGISTRY", [bad])
    assert fasteval_main(["bench", "--quick", "--only", "toy", "--reps", "1"]) == 1
    out, err = capsys.readouterr()
    assert "FAIL" in out and "PARITY FAILED: max|diff|=1" in out and "FAILED" in err

    good = _toy(lambda d: d["x"] * 2, [Baseline("torch", lambda d: d["x"] + d["x"])])
    monkeypatch.setattr(registry, "REGISTRY", [good])
    assert fasteval_main(["bench", "--quick", "--only", "toy", "--reps", "1"]) == 0


def test_fasteval_error_exits_nonzero(capsys):
    def broken(d):
        raise RuntimeError("kernel exploded")
    assert cli.run(_args(), cases=[_toy(broken, [Baseline("torch", lambda d: d["x"])])]) == 1
    assert "fasteval failed: RuntimeError: kernel exploded" in capsys.readouterr().out


def test_bad_switches_exit_2(capsys):
    assert fasteval_main(["bench", "--quick", "--only", "no_such_table"]) == 2
    assert "no_such_table" in capsys.readouterr().err
    assert fasteval_main(["bench", "--reps", "0"]) == 2


def test_missing_peer_is_skipped_with_a_note(capsys):
    case = _toy(lambda d: d["x"].sum(), [Baseline("torch", lambda d: d["x"].sum()),
                                          Baseline("torchmetrics", lambda d: d["x"].sum(),
                                                   requires=("fasteval_no_such_module",))])
    rows = harness.run_case(case, quick=True, device="cpu", reps=1)
    skipped = rows[2]
    assert skipped.status == "skipped" and math.isnan(skipped.median_ms)
    assert skipped.ratio is None and skipped.parity is None
    assert "skipped: fasteval_no_such_module cannot be imported (ModuleNotFoundError" in skipped.note
    assert cli.run(_args(), cases=[case]) == 0  # a missing peer is not a failure
    assert "skipped: fasteval_no_such_module cannot be imported" in capsys.readouterr().out


def _breaks_graph(d):
    torch._dynamo.graph_break()
    return d["x"] + 1


def test_compile_failure_is_a_note_not_a_crash():
    case = _toy(lambda d: d["x"] + 1, [Baseline("torch.compile", _breaks_graph, compile_options={"fullgraph": True})])
    rows = harness.run_case(case, quick=True, device="cpu", reps=1)
    assert rows[1].status == "failed" and rows[1].note.startswith("torch.compile failed: ")
    assert rows[1].ratio is None and rows[1].parity is None


def test_compile_fallback_says_what_it_compiled():
    case = _toy(lambda d: d["x"] + 1, [Baseline(
        "torch.compile", _breaks_graph, compile_options={"fullgraph": True},
        compile_fallback=(lambda: (lambda d: d["x"] + 1), "the forward only"))])
    rows = harness.run_case(case, quick=True, device="cpu", reps=1)
    assert rows[1].status == "ok" and rows[1].parity is True
    assert "the forward only (compiling it whole failed: " in rows[1].note


def test_compiled_baseline_reports_graph_breaks():
    case = _toy(lambda d: d["x"] + 1, [Baseline("torch.compile", _breaks_graph, compile_options={"backend": "eager"})])
    rows = harness.run_case(case, quick=True, device="cpu", reps=1)
    assert rows[1].status == "ok" and rows[1].parity is True and "1 graph break(s)" in rows[1].note


def test_stateful_case_compares_first_calls():
    """Each provider mutates its own fresh state; the first call's result is what parity compares,
    however many timed calls follow."""
    def add_one(d):
        d["acc"].add_(1)
        return d["acc"]
    case = _toy(add_one, [Baseline("torch", add_one)], state=lambda d: {"acc": torch.zeros(1)})
    rows = harness.run_case(case, quick=True, device="cpu", reps=3)
    assert rows[1].parity is True


def test_csv_columns_and_chart(tmp_path, capsys):
    case = _toy(lambda d: d["x"] * 2, [Baseline("torch", lambda d: d["x"] * 2),
                                        Baseline("scikit-learn", lambda d: 0, requires=("fasteval_no_such_module",))])
    assert cli.run(_args(out=str(tmp_path)), cases=[case]) == 0
    with open(tmp_path / "bench-cpu-quick.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == report.CSV_COLUMNS
    for column in ("table", "case", "provider", "median_ms", "ratio", "parity", "read_share", "gbps",
                   "peak_mem_mb", "note", "device", "torch", "cuda", "fasteval", "commit", "threads"):
        assert column in reader.fieldnames
    assert [r["provider"] for r in rows] == ["fasteval", "torch", "scikit-learn"]
    assert [r["status"] for r in rows] == ["ok", "ok", "skipped"]
    ours, base = float(rows[0]["median_ms"]), float(rows[1]["median_ms"])
    assert float(rows[1]["ratio"]) == pytest.approx(base / ours)
    assert rows[1]["parity"] == "True" and rows[0]["ratio"] == ""
    assert all(r["torch"] == torch.__version__ and r["fasteval"] == fasteval.__version__ for r in rows)
    assert rows[0]["threads"] == str(torch.get_num_threads()) and rows[0]["device"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "bench-cpu-quick.png").stat().st_size > 0


def test_csv_keeps_the_finished_cases_of_a_run_stopped_midway(tmp_path):
    """The CSV is rewritten after every case, so that a run killed by a time limit (the GPU check's) still
    leaves the rows of the cases it finished."""
    def stopped(d):
        raise KeyboardInterrupt  # as a signal would stop the run, not an error the harness reports
    done = _toy(lambda d: d["x"] * 2, [Baseline("torch", lambda d: d["x"] * 2)])
    cut = Case("toy", "cut n={n}", {"n": 8}, _toy_inputs, stopped, [Baseline("torch", lambda d: d["x"])], quick={})
    with pytest.raises(KeyboardInterrupt):
        cli.run(_args(out=str(tmp_path)), cases=[done, cut])
    with open(tmp_path / "bench-cpu-quick.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["provider"]) for r in rows] == [("toy n=8", "fasteval"), ("toy n=8", "torch")]


# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------
NO_COMPILE = {"evaluator/update+compute (262144, 1000) float32", "evaluator/update+compute (65536, 1000) bfloat16",
              "evaluator/sync() 2 gloo processes C=1000"}


def test_registry_every_case_has_torch_and_torch_compile():
    assert len({c.id for c in registry.REGISTRY}) == len(registry.REGISTRY)
    for case in registry.REGISTRY:
        assert registry.find(case.id) is case
        keys = [b.provider for b in case.baselines]
        if case.id in NO_COMPILE:
            assert case.note, case.id  # says why there is no torch / torch.compile row
        else:
            assert "torch" in keys and "torch.compile" in keys, case.id
    quick = registry.select(None, quick=True, device="cpu")
    assert {c.table for c in quick} == set(registry.TABLES)
    assert any(c.memory for c in quick)
    with pytest.raises(ValueError, match="unknown table"):
        registry.select(["nope"])


def _tiny(case):
    p = dict(case.params)
    p["n"] = min(p["n"], 64)
    if "c" in p:
        p["c"] = min(p["c"], 1000)
    return p


def _first_results(case, p):
    """fasteval's and each eager baseline's result on tiny inputs of the case (no compile: fast)."""
    d = case.inputs(p, "cpu", torch.Generator().manual_seed(0))
    ctx = case.context or harness.contextlib.nullcontext
    out = {}
    with ctx():
        for pc in harness.provider_calls(case, "cpu"):
            if pc.call is not None:
                out[pc.key] = (pc, harness._clone(pc.call(harness._with_state(case, d))))
    return d, out


@pytest.mark.parametrize("case", [c for c in registry.REGISTRY if c.runner is None and "cpu" in c.devices],
                         ids=lambda c: c.id)
def test_registered_case_parity_on_tiny_inputs(case):
    """Every registered case's baselines agree with fasteval under the case's own parity check."""
    d, results = _first_results(case, _tiny(case))
    _, ours = results.pop("fasteval")
    assert results, case.id
    for key, (pc, theirs) in results.items():
        verdict, detail = harness.parity_of(pc, ours, theirs, d)
        assert verdict is not False, f"{case.id} vs {key}: {detail}"
        assert verdict is (None if key == "scikit-learn exact" else True), key


def _corrupt_first(v):
    if isinstance(v, dict):
        return {k: (_corrupt_first(x) if k in ("cm", "confusion_matrix") else x) for k, x in v.items()}
    v = v.clone()
    v.view(-1)[0] += 1 if not v.is_floating_point() else 0.5
    return v


@pytest.mark.parametrize("case_id", [
    "cross_entropy/fwd (8192, 32000) float32", "cross_entropy/fwd (8192, 1000) bfloat16",
    "cross_entropy/fwd+bwd (8192, 1000) float32", "cross_entropy/fwd+bwd (65536, 100) bfloat16",
    "confusion_matrix/from labels N=10000000 C=10", "evaluator/update (65536, 1000) float32",
    "evaluator/update+compute (262144, 1000) float32"])
def test_registered_parity_checks_catch_a_wrong_result(case_id):
    case = registry.find(case_id)
    d, results = _first_results(case, _tiny(case))
    _, ours = results.pop("fasteval")
    key = "torchmetrics + F.cross_entropy" if "compute" in case_id else "torch " + case.baselines[0].variant
    pc, theirs = results[key]
    verdict, _ = harness.parity_of(pc, _corrupt_first(ours), theirs, d)
    assert verdict is False


def test_update_parity_catches_wrong_hits_and_bins():
    case = registry.find("evaluator/update (1048576, 10) float32")
    d, results = _first_results(case, _tiny(case))
    _, ours = results.pop("fasteval")
    pc, theirs = results["torch update formula"]
    for key in ("loss", "hits", "bin_count", "bin_conf", "bin_correct"):
        wrong = dict(ours, **{key: ours[key] + (1 if key != "loss" else 0.01 * ours[key].abs() + 1)})
        assert harness.parity_of(pc, wrong, theirs, d)[0] is False, key


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU measurement reads /proc")
def test_peak_memory_cpu_sees_the_log_softmax_copy():
    """F.cross_entropy(reduction="none") materialises an (N, C) float32 log-softmax; fasteval does not."""
    case = registry.find("cross_entropy/fwd (8192, 32000) float32")
    assert case.memory
    peaks = memory.peak_mb(case, True, "cpu", None, {"fasteval": None, "torch F.cross_entropy": None})
    n, c = case.params_for(True)["n"], case.params["c"]
    copy_mb = n * c * 4 / 2 ** 20
    torch_mb, note = peaks["torch F.cross_entropy"]
    assert torch_mb is not None, note
    assert copy_mb * 0.95 <= torch_mb <= copy_mb * 2.5
    if _loader.has_kernel("softmax_cross_entropy", "cpu"):  # the reference may materialise it too
        assert peaks["fasteval"][0] < 0.05 * copy_mb


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_cuda():
    case = registry.find("cross_entropy/fwd (8192, 32000) float32")
    d = case.make_inputs(True, "cuda")
    n, c = d["x"].shape
    torch_mb = memory.cuda_peak_mb(
        case, lambda d: torch.nn.functional.cross_entropy(d["x"], d["t"], reduction="none"), d)
    assert torch_mb >= 0.95 * n * c * 4 / 2 ** 20
