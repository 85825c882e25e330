"""The benchmark harness: one case definition, one row schema, one way to time and check a provider.

A :class:`Case` names an input factory, the fasteval call and a list of :class:`Baseline` providers.
:func:`run_case` builds the inputs once, runs every provider on them (a warm-up call first, whose result
is also the one checked for parity), times each and returns one :class:`Row` per provider, where

    ratio = baseline median / fasteval median        (> 1: fasteval is faster)

on every baseline row. Nothing here is a test: a slow run gives a small ratio, it never fails. A parity
failure (fasteval's result differs from a baseline's on the same inputs) is reported on that row.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["Case", "Baseline", "Row", "torch_and_compiled", "run_case", "provider_calls",
           "ProviderCall", "warm_up", "parity_of", "time_call", "sync", "exact", "allclose", "count_close", "ratio"]

Inputs = Dict[str, Any]
Call = Callable[[Inputs], Any]
ParityResult = Union[None, bool, Tuple[Optional[bool], str]]
Parity = Callable[[Any, Any, Inputs], ParityResult]


# --------------------------------------------------------------------------------------------------
# Definitions
# --------------------------------------------------------------------------------------------------
@dataclass
class Baseline:
    """One baseline of a case: a named provider and the call it makes on the case's inputs.

    Args:
        provider: ``"torch"`` (eager torch code), ``"torch.compile"`` (the same code under
            ``torch.compile(dynamic=False)``; build the pair with :func:`torch_and_compiled`),
            ``"torchmetrics"``, ``"scikit-learn"``, ``"liger-kernel"``, ...
        fn: ``fn(inputs) -> result`` (the inputs dict, with the case's fresh ``state`` merged in).
        variant: what tells this row apart from the case's other rows of the same provider
            (``"bincount formula"``, ``"validate_args=False"``); shown after the provider.
        requires: modules ``fn`` imports; if one cannot be imported the row is skipped with a note.
        devices: the devices the baseline applies to (no row on the others).
        parity: replaces the case's parity check for this row.
        comparable: False when the baseline computes another quantity (e.g. the exact AUROC against
            a binned one): no parity check, ``n/a`` in the table.
        note: printed on the row.
        compile_options: extra ``torch.compile`` keyword arguments (``"torch.compile"`` rows).
        compile_config: ``torch._dynamo.config`` values set while compiling (``"torch.compile"`` rows).
        compile_fallback: ``(factory, note)``: if compiling ``fn`` fails, ``factory()`` gives the call
            to time instead, and ``note`` says what it compiles.
    """
    provider: str
    fn: Call
    variant: str = ""
    requires: Tuple[str, ...] = ()
    devices: Tuple[str, ...] = ("cpu", "cuda")
    parity: Optional[Parity] = None
    comparable: bool = True
    note: str = ""
    compile_options: Dict[str, Any] = field(default_factory=dict)
    compile_config: Dict[str, Any] = field(default_factory=dict)
    compile_fallback: Optional[Tuple[Callable[[], Call], str]] = None

    @property
    def key(self) -> str:
        return f"{self.provider} {self.variant}".strip()


def torch_and_compiled(fn: Call, variant: str = "", **compile_kw) -> List[Baseline]:
    """The ``torch`` baseline (``fn`` in eager mode) and the ``torch.compile`` baseline (the SAME ``fn``
    under ``torch.compile(dynamic=False)``); ``compile_kw`` go to the compiled one (``compile_options``,
    ``compile_config``, ``compile_fallback``, ``note``)."""
    return [Baseline("torch", fn, variant), Baseline("torch.compile", fn, variant, **compile_kw)]


@dataclass
class Case:
    """One benchmark case: inputs, the fasteval call and its baselines, registered once in
    :mod:`fasteval.bench.cases` and used by ``python -m fasteval bench`` and ``benchmarks/``.

    Args:
        table: the group it is printed in (``--only`` selects tables): ``"cross_entropy"``, ...
        name: the row label, a format string over ``params``: ``"fwd ({n}, {c}) {dtype}"``.
        params: the full-size parameters (shapes, dtypes, ...), passed to ``inputs``.
        inputs: ``inputs(params, device, generator) -> dict`` of named inputs, built on the CPU from
            ``generator`` (so that every device gets the same values) and moved to ``device``.
        fasteval: ``fasteval(inputs) -> result``.
        baselines: the baselines (see :class:`Baseline`).
        parity: ``parity(fasteval_result, baseline_result, inputs)`` -> True / False / None (not
            comparable), or ``(verdict, detail)``.
        quick: parameters that replace some of ``params`` under ``--quick`` (``{}``: the same); ``None``:
            the case does not run under ``--quick``.
        main: the inputs fasteval reads; the fasteval row reports its bandwidth over their bytes and the
            share of ``.sum()``'s read bandwidth on them (median ``.sum()`` time / fasteval's median).
        state: ``state(inputs) -> dict`` of fresh tensors each provider mutates (update-style ops); each
            provider gets its own, so the first call's result can be compared.
        context: a context manager factory every call runs in (e.g. ``torch.inference_mode``).
        memory: also measure each provider's peak memory (``peak_mem_mb``, see :mod:`.memory`).
        devices: the devices the case runs on.
        note: printed under the case (what a baseline includes, ...).
        runner: for what cannot be timed as a call in this process (several processes):
            ``runner(params, device, reps, keys) -> {provider key: (median_ms, parity)}``.
    """
    table: str
    name: str
    params: Dict[str, Any]
    inputs: Callable[[Dict[str, Any], str, torch.Generator], Inputs]
    fasteval: Call
    baselines: List[Baseline]
    parity: Parity = None  # type: ignore[assignment]
    quick: Optional[Dict[str, Any]] = None
    main: Tuple[str, ...] = ("x",)
    state: Optional[Callable[[Inputs], Dict[str, Any]]] = None
    context: Optional[Callable[[], ContextManager]] = None
    memory: bool = False
    devices: Tuple[str, ...] = ("cpu", "cuda")
    note: str = ""
    runner: Optional[Callable[..., Dict[str, Tuple[float, Optional[bool]]]]] = None

    def __post_init__(self):
        if self.parity is None:
            self.parity = exact
        keys = [b.key for b in self.baselines]
        if len(set(keys)) != len(keys) or "fasteval" in keys:
            raise ValueError(f"case {self.name!r}: baseline keys must be unique and not 'fasteval': {keys}")

    def params_for(self, quick: bool) -> Dict[str, Any]:
        return {**self.params, **(self.quick or {})} if quick else dict(self.params)

    def label(self, quick: bool) -> str:
        return self.name.format(**self.params_for(quick))

    @property
    def id(self) -> str:
        """``table/label`` at the full size: unique in the registry."""
        return f"{self.table}/{self.label(False)}"

    def runs(self, quick: bool, device: str) -> bool:
        return (self.quick is not None or not quick) and _device_type(device) in self.devices

    def make_inputs(self, quick: bool, device: str, generator: Optional[torch.Generator] = None) -> Inputs:
        """The case's inputs for ``--quick`` or the full size (seed 0 unless a generator is given)."""
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        return self.inputs(self.params_for(quick), device, gen)


@dataclass
class Row:
    """One provider on one case: the single row schema of the table, the CSV and the chart."""
    table: str
    case: str
    provider: str                      # "fasteval", "torch", "torch.compile", "torchmetrics", ...
    variant: str = ""                  # e.g. "bincount formula", "validate_args=False"
    status: str = "ok"                 # "ok", "skipped" (a library is missing) or "failed" (it raised)
    median_ms: float = float("nan")
    reps: int = 0                      # timed calls behind the median
    ratio: Optional[float] = None      # baseline rows: baseline median / fasteval median (> 1: fasteval faster)
    parity: Optional[bool] = None      # baseline rows: fasteval's result matched this one (None: not compared)
    read_share: Optional[float] = None  # fasteval row: median .sum() time of its main inputs / its median
    gbps: Optional[float] = None       # fasteval row: bytes of its main inputs / its median
    peak_mem_mb: Optional[float] = None  # peak memory a call adds on top of its inputs (MB), when measured
    note: str = ""
    params: str = ""                   # the case's parameters, JSON

    @property
    def key(self) -> str:
        return f"{self.provider} {self.variant}".strip()


def ratio(baseline_ms: float, fasteval_ms: float) -> Optional[float]:
    """baseline median / fasteval median: how many times faster fasteval is (> 1) or slower (< 1).

    >>> ratio(30.0, 10.0)
    3.0
    >>> ratio(5.0, 10.0)
    0.5
    """
    if not (fasteval_ms > 0 and math.isfinite(fasteval_ms) and math.isfinite(baseline_ms)):
        return None
    return baseline_ms / fasteval_ms


# --------------------------------------------------------------------------------------------------
# Parity checks
# --------------------------------------------------------------------------------------------------
def _tensor(v) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().double()
    return torch.as_tensor(v, dtype=torch.float64)


def exact(ours, theirs, inputs=None) -> ParityResult:
    """Same shape and the same values (after converting both to float64 on the CPU)."""
    a, b = _tensor(ours), _tensor(theirs)
    if a.shape != b.shape:
        return False, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if torch.equal(a, b):
        return True
    return False, f"max|diff|={float((a - b).abs().max()):.3g}"


def allclose(rtol: float, atol: float = 0.0) -> Parity:
    """``torch.allclose(fasteval, baseline, rtol, atol)`` in float64; the detail is the max difference."""
    def check(ours, theirs, inputs=None) -> ParityResult:
        a, b = _tensor(ours), _tensor(theirs)
        if a.shape != b.shape:
            return False, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
        ok = torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True)
        return bool(ok), ("" if ok else f"max|diff|={float((a - b).abs().max()):.3g}")
    return check


def count_close(n_key: str) -> Parity:
    """A fraction of ``len(inputs[n_key])`` samples: equal up to half a sample (the counts are equal)."""
    def check(ours, theirs, inputs) -> ParityResult:
        n = len(inputs[n_key])
        diff = abs(float(ours) - float(theirs))
        return diff <= 0.5 / n, f"{diff * n:.3g} samples apart"
    return check


def _verdict(result: ParityResult) -> Tuple[Optional[bool], str]:
    if isinstance(result, tuple):
        ok, detail = result
        return (None if ok is None else bool(ok)), str(detail)
    return (None if result is None else bool(result)), ""


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
def _device_type(device: str) -> str:
    return torch.device(device).type


def sync(device: str) -> None:
    if _device_type(device) == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: str, reps: int, max_s: float = math.inf, min_s: float = 0.0,
              estimate_s: Optional[float] = None) -> Tuple[float, int]:
    """Median wall time of ``fn()`` in ms, and the number of timed calls behind it (no warm-up here).

    Makes ``reps`` calls, fewer (at least 1) when ``reps`` calls of ``estimate_s`` seconds each would
    take more than ``max_s``, more (up to 10000) until ``min_s`` seconds have been measured.
    """
    if estimate_s is not None and estimate_s > 0 and reps * estimate_s > max_s:
        reps = max(1, int(max_s / estimate_s))
    times: List[float] = []
    total = 0.0
    while len(times) < reps or (total < min_s and len(times) < 10000):
        t0 = time.perf_counter()
        fn()
        sync(device)
        dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
    return statistics.median(times) * 1e3, len(times)


# --------------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------------
class _Compiled:
    """``torch.compile(fn, dynamic=False)``, compiled afresh: ``torch._dynamo.reset()`` first, so that
    each case gets its own graphs and a function shared by many cases never reaches dynamo's recompile
    limit (past which it would silently run eagerly). Compilation happens in the first (warm-up) call;
    ``note`` then says about fallbacks, graph breaks and (after timing, :meth:`check`) recompilations."""

    def __init__(self, b: Baseline):
        import torch._dynamo
        from torch._dynamo.utils import counters

        self._b, self._counters = b, counters
        torch._dynamo.reset()
        counters.clear()
        self._call = torch.compile(b.fn, dynamic=False, **b.compile_options)
        self._compiled_once = False
        self.note = b.note

    def __call__(self, inputs: Inputs):
        if self._compiled_once:
            return self._call(inputs)
        import torch._dynamo

        cfg = dict(self._b.compile_config)
        cfg.setdefault("fail_on_recompile_limit_hit", True)
        # A torch without one of these settings compiles without it (and may then need the fallback).
        cfg = {k: v for k, v in cfg.items() if hasattr(torch._dynamo.config, k)}
        with warnings.catch_warnings():  # graph breaks are summed up in the note instead
            warnings.simplefilter("ignore")
            try:
                with torch._dynamo.config.patch(**cfg):
                    out = self._call(inputs)
            except Exception as e:
                if self._b.compile_fallback is None:
                    raise
                factory, note = self._b.compile_fallback
                torch._dynamo.reset()
                self._counters.clear()
                self._call = factory()
                with torch._dynamo.config.patch(**{k: v for k, v in cfg.items() if k == "fail_on_recompile_limit_hit"}):
                    out = self._call(inputs)
                self.note = _join(self.note, f"{note} (compiling it whole failed: {_first_line(e)})")
        breaks = self._counters["graph_break"]
        if breaks:
            reason = _first_line(next(iter(breaks)))
            self.note = _join(self.note, f"{sum(breaks.values())} graph break(s): {reason}")
        self._frames = self._counters["frames"]["total"]
        self._compiled_once = True
        return out

    def check(self) -> str:
        """A note when calls after the warm-up compiled again (their time is then in the median)."""
        again = self._counters["frames"]["total"] - getattr(self, "_frames", 0)
        return f"recompiled {again} time(s) while timed" if again else ""


@dataclass
class ProviderCall:
    """A provider of a case, resolved for a device. ``call`` and ``compile_from`` are None when it is
    skipped (``note`` says why); a ``torch.compile`` row is compiled when it is about to run."""
    key: str
    provider: str
    variant: str
    call: Optional[Call]
    parity: Optional[Parity]
    note: str = ""
    compile_from: Optional[Baseline] = None

    @property
    def available(self) -> bool:
        return self.call is not None or self.compile_from is not None

    def resolve(self) -> Call:
        """The call to time: for ``torch.compile``, a fresh compiled function (compiles in its first call)."""
        return _Compiled(self.compile_from) if self.compile_from is not None else self.call  # type: ignore


def _missing(modules: Sequence[str]) -> Optional[str]:
    for m in modules:
        try:
            importlib.import_module(m)
        except Exception as e:  # ImportError, or a broken install that fails while importing
            return f"{m} cannot be imported ({type(e).__name__}: {_first_line(e)})"
    return None


def provider_calls(case: Case, device: str, keys: Optional[Sequence[str]] = None) -> List[ProviderCall]:
    """fasteval then each baseline that applies to ``device`` (``keys``: only those), resolved: imports
    checked, ``torch.compile`` rows compiled afresh (lazily, in their first call)."""
    out = [ProviderCall("fasteval", "fasteval", "", case.fasteval, None)]
    dev = _device_type(device)
    for b in case.baselines:
        if dev not in b.devices:
            continue
        parity = None if not b.comparable else (b.parity or case.parity)
        missing = _missing(b.requires)
        if missing:
            out.append(ProviderCall(b.key, b.provider, b.variant, None, parity, f"skipped: {missing}"))
            continue
        compiled = b.provider == "torch.compile"
        out.append(ProviderCall(b.key, b.provider, b.variant, None if compiled else b.fn, parity, b.note,
                                b if compiled else None))
    if keys is not None:
        out = [p for p in out if p.key in keys]
    return out


def _with_state(case: Case, inputs: Inputs) -> Inputs:
    return {**inputs, **case.state(inputs)} if case.state is not None else inputs


def _first_line(e) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:160]


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


# --------------------------------------------------------------------------------------------------
# Running a case
# --------------------------------------------------------------------------------------------------
def run_case(case: Case, quick: bool, device: str, reps: Optional[int] = None,
             keys: Optional[Sequence[str]] = None, on_row: Optional[Callable[[Row], None]] = None) -> List[Row]:
    """Runs every provider of ``case`` on the same inputs; returns fasteval's row, then one per baseline.

    Each provider: one warm-up call (a ``torch.compile`` row compiles in it and makes a second one), whose
    result is compared with fasteval's, then timed calls. ``reps``: timed calls per provider (default 5
    with ``quick``, 7 without); slow providers get fewer (at least 1, within a time budget per provider),
    sub-millisecond ones more (until a minimum measured time). ``keys``: only these providers.
    """
    params = case.params_for(quick)
    label = case.label(quick)
    reps = reps or (5 if quick else 7)
    budget = dict(max_s=1.0, min_s=0.05) if quick else dict(max_s=15.0, min_s=0.5)
    pjson = json.dumps(params, sort_keys=True)
    providers = provider_calls(case, device, None if keys is None else ["fasteval", *keys])
    rows = [Row(case.table, label, p.provider, p.variant, status="ok" if p.available else "skipped",
                note=p.note, params=pjson) for p in providers]
    if case.runner is not None:
        why = "not measured"
        try:
            measured = case.runner(params, device, reps, [p.key for p in providers if p.available])
        except Exception as e:
            measured, why = {}, f"failed: {type(e).__name__}: {_first_line(e)}"
        for p, row in zip(providers, rows):
            if p.key in measured:
                row.median_ms, parity = measured[p.key]
                row.reps, row.parity = reps, (None if p.key == "fasteval" else parity)
                if row.parity is False:
                    row.note = _join(row.note, "PARITY FAILED")
            elif p.available:
                row.status, row.note = "failed", _join(row.note, why)
        return _finish(rows, on_row)

    inputs = case.make_inputs(quick, device)
    ctx = case.context or contextlib.nullcontext
    ours: Any = None
    resolved: Dict[str, Call] = {}
    for p, row in zip(providers, rows):
        if not p.available:
            continue
        try:
            fn, d, result, first_s = warm_up(case, p, inputs, device)
            if p.key == "fasteval":
                ours = result
            elif rows[0].status == "ok":
                row.parity, detail = parity_of(p, ours, result, inputs)
                if row.parity is False:
                    row.note = _join(row.note, f"PARITY FAILED: {detail}" if detail else "PARITY FAILED")
            del result
            with ctx():
                row.median_ms, row.reps = time_call(lambda: fn(d), device, reps, estimate_s=first_s, **budget)
            del d
            resolved[p.key] = fn
            if isinstance(fn, _Compiled):
                row.note = _join(fn.note, fn.check())
        except Exception as e:
            row.status = "failed"
            row.note = _join(row.note, f"{p.key} failed: {type(e).__name__}: {_first_line(e)}")
            continue
        if p.key == "fasteval":
            main = [inputs[k].detach() for k in case.main]
            read_ms = sum(time_call(lambda m=m: m.sum(), device, reps, **budget)[0] for m in main)
            nbytes = sum(m.numel() * m.element_size() for m in main)
            if row.median_ms > 0:
                row.read_share = read_ms / row.median_ms
                row.gbps = nbytes / (row.median_ms * 1e-3) / 1e9
    del ours

    if case.memory:
        from . import memory
        peaks = memory.peak_mb(case, quick, device, inputs, resolved)
        for row in rows:
            if row.key in peaks:
                row.peak_mem_mb, note = peaks[row.key]
                row.note = _join(row.note, note)
    return _finish(rows, on_row)


def _clone(v):
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, dict):
        return {k: _clone(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_clone(x) for x in v)
    return v


def warm_up(case: Case, p: ProviderCall, inputs: Inputs, device: str) -> Tuple[Call, Inputs, Any, float]:
    """Resolves ``p`` and makes its warm-up call (a ``torch.compile`` row compiles in it, then makes a
    second one) in the case's context. Returns the call, its inputs (with its own fresh ``state``), the
    first call's result (a copy for stateful cases, whose later calls mutate it) and the seconds one call
    takes (the estimate that sizes the timing)."""
    fn = p.resolve()
    d = _with_state(case, inputs)
    with (case.context or contextlib.nullcontext)():
        t0 = time.perf_counter()
        result = fn(d)
        sync(device)
        first_s = time.perf_counter() - t0
        if case.state is not None:
            result = _clone(result)
        if isinstance(fn, _Compiled):
            t0 = time.perf_counter()
            fn(d)
            sync(device)
            first_s = time.perf_counter() - t0
    return fn, d, result, first_s


def parity_of(p: ProviderCall, ours, theirs, inputs: Inputs) -> Tuple[Optional[bool], str]:
    """The verdict of ``p``'s parity check on fasteval's and ``p``'s results, and its detail; a check
    that raises is a failure. None when ``p`` is not compared (it computes another quantity)."""
    if p.parity is None:
        return None, ""
    try:
        return _verdict(p.parity(ours, theirs, inputs))  # type: ignore[misc]
    except Exception as e:
        return False, f"the parity check raised {type(e).__name__}: {_first_line(e)}"


def _finish(rows: List[Row], on_row) -> List[Row]:
    ours = rows[0].median_ms if rows and rows[0].provider == "fasteval" and rows[0].status == "ok" else math.nan
    for r in rows[1:]:
        if r.status == "ok":
            r.ratio = ratio(r.median_ms, ours)
    if on_row is not None:
        for r in rows:
            on_row(r)
    return rows
