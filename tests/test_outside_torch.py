"""PyTorch's own test inputs for cross-entropy, run through fasteval.

The sample inputs come from PyTorch's test suite itself: the ``OpInfo`` of
``nn.functional.cross_entropy`` (``torch.testing._internal.common_methods_invocations.op_db``) and the
``ModuleInfo`` of ``nn.CrossEntropyLoss`` (``torch.testing._internal.common_modules.module_db``), in
float32, float64, bfloat16 and float16, contiguous and non-contiguous (``SampleInput.noncontiguous()``:
every tensor is a strided view whose neighbouring memory holds NaN). For each sample:

- class-index targets: ``fasteval.cross_entropy`` / ``fasteval.CrossEntropyLoss`` against torch — the
  value, the gradient for a random cotangent, the second derivative (the gradient of <gradient, v> for a
  random v, through ``create_graph=True``) and the forward-mode derivative for a random tangent. In
  float32 / float64 within rounding; in bfloat16 / float16 fasteval must be at least as close to the
  float64 result on the same rounded inputs as torch's own low-precision result is;
- probability targets (unsupported by fasteval): a ``TypeError``.

Error inputs (``ModuleInfo.module_error_inputs_func`` of ``nn.CrossEntropyLoss``; the OpInfo defines none)
and the documented error cases of ``F.cross_entropy`` must raise an instance of the exception type torch
raises for the same input, through the function and through the module.

``test_sample_counts`` asserts floors on the number of samples so the suite cannot silently become empty.
"""
from __future__ import annotations

import random
import re
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import fasteval

pytest.importorskip("expecttest")  # torch.testing._internal needs it

# torch's forward-mode AD and meta kernels load modules that still use torch.jit.script.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def _import_torch_test_infos():
    """Imports PyTorch's OpInfo / ModuleInfo databases without letting their import change this process.

    ``torch.testing._internal.common_utils`` loads a hypothesis profile ("dev": 10 examples), freezes
    ``torch.backends`` flags and adds warning filters when imported; all three are restored here so the
    other test modules run as they would without this one.
    """
    import hypothesis

    profile = hypothesis.settings._current_profile
    filters = list(warnings.filters)
    frozen = torch.backends.flags_frozen()
    try:
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.jit.script in their modules
        from torch.testing._internal.common_methods_invocations import op_db
        from torch.testing._internal.common_modules import module_db
        from torch.testing._internal.common_utils import noncontiguous_like
    finally:
        hypothesis.settings.load_profile(profile)
        warnings.filters[:] = filters
        if not frozen:  # undo torch.backends.disable_global_flags()
            torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
    ops = [o for o in op_db if o.name == "nn.functional.cross_entropy" and not o.variant_test_name]
    mods = [m for m in module_db if m.module_cls is torch.nn.CrossEntropyLoss]
    assert len(ops) == 1 and len(mods) == 1, "PyTorch's test databases no longer describe cross-entropy"
    return ops[0], mods[0], noncontiguous_like


OP_INFO, MODULE_INFO, noncontiguous_like = _import_torch_test_infos()

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass
class Sample:
    """One of PyTorch's samples: ``fn(input, target)`` with ``kwargs`` (function) or ``ctor`` (module)."""
    id: str
    api: str                  # "function" (OpInfo) or "module" (ModuleInfo)
    dtype: torch.dtype
    contiguous: bool
    input: torch.Tensor
    target: torch.Tensor
    kwargs: Dict[str, Any] = field(default_factory=dict)  # weight, ignore_index, reduction, label_smoothing

    @property
    def probability_target(self) -> bool:
        return self.target.is_floating_point()

    def call(self, impl: str, input: torch.Tensor, target: Optional[torch.Tensor] = None, **override):
        """The loss of ``impl`` ("fasteval" or "torch") on this sample, with ``input`` in place of the
        sample's (and optionally other target / kwargs)."""
        kw = dict(self.kwargs, **override)
        target = self.target if target is None else target
        if self.api == "function":
            fn = fasteval.cross_entropy if impl == "fasteval" else F.cross_entropy
            return fn(input, target, **kw)
        cls = fasteval.CrossEntropyLoss if impl == "fasteval" else torch.nn.CrossEntropyLoss
        return cls(**kw)(input, target)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _collect_samples() -> List[Sample]:
    """Every OpInfo and ModuleInfo sample, for each dtype, contiguous and not; deterministic."""
    out: List[Sample] = []
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(20240229)
        random.seed(20240229)
        try:
            for dtype in DTYPES:
                dn = _dtype_name(dtype)
                for i, s in enumerate(OP_INFO.sample_inputs("cpu", dtype, requires_grad=False)):
                    for contiguous in (True, False):
                        ss = s if contiguous else s.noncontiguous()
                        kind = "prob" if ss.args[0].is_floating_point() else "index"
                        sid = f"op-{i}-{kind}-{tuple(ss.input.shape)}-{dn}-{'contig' if contiguous else 'noncontig'}"
                        out.append(Sample(sid, "function", dtype, contiguous, ss.input.detach(),
                                          ss.args[0].detach(), dict(ss.kwargs)))
                mis = MODULE_INFO.module_inputs_func(MODULE_INFO, device="cpu", dtype=dtype, requires_grad=False,
                                                     training=False)
                for mi in mis:
                    ctor = dict(mi.constructor_input.kwargs)
                    x, t = mi.forward_input.args
                    for contiguous in (True, False):
                        if contiguous:
                            xs, ts, cs = x, t, ctor
                        else:
                            xs, ts = noncontiguous_like(x), noncontiguous_like(t)
                            cs = {k: noncontiguous_like(v) if isinstance(v, torch.Tensor) else v
                                  for k, v in ctor.items()}
                        sid = f"module-{mi.desc}-{dn}-{'contig' if contiguous else 'noncontig'}"
                        out.append(Sample(sid, "module", dtype, contiguous, xs.detach(), ts.detach(), cs))
        finally:
            random.setstate(py_state)
    return out


SAMPLES = _collect_samples()
INDEX_SAMPLES = [s for s in SAMPLES if not s.probability_target]
PROB_SAMPLES = [s for s in SAMPLES if s.probability_target]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The samples are tiny: one intra-op thread keeps each test at a millisecond even on a busy machine
    (an OpenMP barrier on an overloaded core costs tens of milliseconds per op)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------
# Comparison helpers.

def _rng(sample: Sample, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed((zlib.crc32(sample.id.encode()) + salt) % (2**31))


def _random_like(t: torch.Tensor, sample: Sample, salt: int) -> torch.Tensor:
    """Random values of t's shape, rounded to the sample's dtype (the same numbers for every precision)."""
    r = torch.randn(t.shape, generator=_rng(sample, salt), dtype=torch.float64).to(sample.dtype)
    return r.to(t.dtype)


def _to64(sample: Sample) -> Dict[str, Any]:
    return {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in sample.kwargs.items()}


def _check(ours: Optional[torch.Tensor], theirs: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype,
           what: str) -> None:
    """ours against torch's result (theirs) in ``dtype``; truth is torch's float64 result on the same inputs.

    float32 / float64: close to torch. bfloat16 / float16: at least as close to the float64 truth as
    torch's own low-precision result is, with a tiny absolute slack.
    """
    assert ours is not None, f"{what}: fasteval gave no result (None) where torch gives one"
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} != torch's {tuple(theirs.shape)}"
    assert ours.dtype == theirs.dtype, f"{what}: dtype {ours.dtype} != torch's {theirs.dtype}"
    if dtype == torch.float64:
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12, equal_nan=True, msg=what)
        return
    if dtype == torch.float32:
        torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-5 * max(1.0, float(truth.abs().max())),
                                   equal_nan=True, msg=what)
        return
    o, t = ours.double(), theirs.double()
    assert torch.equal(torch.isnan(o), torch.isnan(t)), f"{what}: NaN where torch has none (or the reverse)"
    ok = ~torch.isnan(t)
    if not bool(ok.any()):
        return
    err_ours = (o[ok] - truth[ok]).abs().max().item()
    err_torch = (t[ok] - truth[ok]).abs().max().item()
    slack = 1e-6 * max(1.0, float(truth[ok].abs().max()))
    assert err_ours <= err_torch + slack, (
        f"{what}: fasteval's {dtype} result is further from the float64 result on the same inputs "
        f"({err_ours:.3g}) than torch's own {dtype} result ({err_torch:.3g})")


def _grad_and_gradgrad(sample: Sample, impl: str, dtype: torch.dtype, second: bool):
    """(loss, d<loss, cot>/dx, d<that gradient, v>/dx) of impl on the sample's input cast to dtype."""
    x = sample.input.to(dtype).detach().requires_grad_()
    kw = _to64(sample) if dtype == torch.float64 and sample.dtype != torch.float64 else {}
    loss = sample.call(impl, x, **kw)
    cot = _random_like(loss, sample, 1)
    (g,) = torch.autograd.grad(loss, x, cot, create_graph=second)
    if not second:
        return loss.detach(), g.detach(), None
    v = _random_like(x, sample, 2)
    (h,) = torch.autograd.grad(g, x, v)
    return loss.detach(), g.detach(), h.detach()


def _check_value(sample: Sample) -> None:
    ours = sample.call("fasteval", sample.input)
    theirs = sample.call("torch", sample.input)
    truth = sample.call("torch", sample.input.double(), **_to64(sample))
    _check(ours, theirs, truth, sample.dtype, f"{sample.id}: loss")


def _check_grad(sample: Sample) -> None:
    _, g_ours, _ = _grad_and_gradgrad(sample, "fasteval", sample.dtype, second=False)
    _, g_torch, _ = _grad_and_gradgrad(sample, "torch", sample.dtype, second=False)
    _, g_truth, _ = _grad_and_gradgrad(sample, "torch", torch.float64, second=False)
    _check(g_ours, g_torch, g_truth, sample.dtype, f"{sample.id}: gradient")


def _check_second_derivative(sample: Sample) -> None:
    _, g_ours, h_ours = _grad_and_gradgrad(sample, "fasteval", sample.dtype, second=True)
    _, g_torch, h_torch = _grad_and_gradgrad(sample, "torch", sample.dtype, second=True)
    _, g_truth, h_truth = _grad_and_gradgrad(sample, "torch", torch.float64, second=True)
    _check(g_ours, g_torch, g_truth, sample.dtype, f"{sample.id}: gradient (create_graph=True)")
    _check(h_ours, h_torch, h_truth, sample.dtype, f"{sample.id}: second derivative")


def _jvp(sample: Sample, impl: str, dtype: torch.dtype):
    x = sample.input.to(dtype)
    tangent = _random_like(x, sample, 3)
    kw = _to64(sample) if dtype == torch.float64 and sample.dtype != torch.float64 else {}
    with fwAD.dual_level():
        out = sample.call(impl, fwAD.make_dual(x, tangent), **kw)
        primal, tan = fwAD.unpack_dual(out)
    return primal, tan


def _check_forward_ad(sample: Sample) -> None:
    _, t_ours = _jvp(sample, "fasteval", sample.dtype)
    _, t_torch = _jvp(sample, "torch", sample.dtype)
    _, t_truth = _jvp(sample, "torch", torch.float64)
    _check(t_ours, t_torch, t_truth, sample.dtype, f"{sample.id}: forward-mode derivative")


def _check_probability_target(sample: Sample) -> None:
    sample.call("torch", sample.input)  # torch computes it: the error is fasteval's documented limitation
    with pytest.raises(TypeError, match="class-index targets"):
        sample.call("fasteval", sample.input)


# ---------------------------------------------------------------------------------------------------
# The samples run in groups (API x dtype x layout, 16 groups): a failure lists every failing sample of
# its group.

GROUPS = [(api, dtype, contiguous)
          for api in ("function", "module") for dtype in DTYPES for contiguous in (True, False)]


def _group_params():
    params = []
    for api, dtype, contiguous in GROUPS:
        gid = (f"{'opinfo' if api == 'function' else 'moduleinfo'}-{_dtype_name(dtype)}-"
               f"{'contig' if contiguous else 'noncontig'}")
        params.append(pytest.param((api, dtype, contiguous), id=gid))
    return params


def _run_group(group, check, samples) -> int:
    """Runs check(sample) on every sample of the group; fails listing every failing sample."""
    members = [s for s in samples if (s.api, s.dtype, s.contiguous) == group]
    assert members, f"no samples in group {group}"
    failures = []
    for sample in members:
        try:
            check(sample)
        except Exception as e:  # noqa: BLE001 - collected and reported below
            first = str(e).splitlines()[0] if str(e) else ""
            failures.append(f"{sample.id}: {type(e).__name__}: {first}")
    assert not failures, f"{len(failures)} of {len(members)} samples fail:\n" + "\n".join(failures)
    return len(members)


@pytest.mark.parametrize("group", _group_params())
def test_index_target_value(group):
    _run_group(group, _check_value, INDEX_SAMPLES)


@pytest.mark.parametrize("group", _group_params())
def test_index_target_grad(group):
    _run_group(group, _check_grad, INDEX_SAMPLES)


@pytest.mark.parametrize("group", _group_params())
def test_index_target_second_derivative(group):
    _run_group(group, _check_second_derivative, INDEX_SAMPLES)


@pytest.mark.parametrize("group", _group_params())
def test_index_target_forward_ad(group):
    _run_group(group, _check_forward_ad, INDEX_SAMPLES)


@pytest.mark.parametrize("group", _group_params())
def test_probability_target_raises_type_error(group):
    _run_group(group, _check_probability_target, PROB_SAMPLES)


# ---------------------------------------------------------------------------------------------------
# Error inputs: fasteval raises an instance of the exception type torch raises for the same input.

@dataclass
class ErrorCase:
    id: str
    make: Callable[[], tuple]          # -> (input, target, constructor / function kwargs)


def _module_error_cases() -> List[ErrorCase]:
    err_fn = MODULE_INFO.module_error_inputs_func
    assert err_fn is not None, "nn.CrossEntropyLoss's ModuleInfo no longer has module_error_inputs_func"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        errs = err_fn(MODULE_INFO, device="cpu", dtype=torch.float32, requires_grad=False, training=False)
    out = []
    for i, e in enumerate(errs):
        mi = e.module_error_input
        x, t = mi.forward_input.args
        ctor = dict(mi.constructor_input.kwargs)
        words = re.sub(r"[^A-Za-z0-9_ ]", "", e.error_regex).split()[:4]
        out.append(ErrorCase(f"module_error_inputs-{i}-{e.error_type.__name__}-{'_'.join(words)}",
                             lambda x=x, t=t, ctor=ctor: (x.detach(), t.detach(), ctor)))
    return out


def _documented_error_cases() -> List[ErrorCase]:
    x2 = lambda: torch.randn(2, 3, generator=torch.Generator().manual_seed(1))  # noqa: E731
    x3 = lambda: torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(2))  # noqa: E731
    idx = torch.tensor([0, 2])
    return [
        ErrorCase("float-target", lambda: (x2(), torch.tensor([0.0, 2.0]), {})),
        ErrorCase("bool-target", lambda: (x2(), torch.tensor([True, False]), {})),
        ErrorCase("weight-wrong-shape", lambda: (x2(), idx, {"weight": torch.ones(4)})),
        ErrorCase("weight-2d", lambda: (x2(), idx, {"weight": torch.ones(3, 1)})),
        ErrorCase("label-smoothing-1.5", lambda: (x2(), idx, {"label_smoothing": 1.5})),
        ErrorCase("spatial-target-size-mismatch", lambda: (x3(), torch.zeros(2, 4, dtype=torch.long), {})),
        ErrorCase("3d-target-for-2d-input", lambda: (x2(), torch.zeros(2, 1, 1, dtype=torch.long), {})),
        ErrorCase("integer-input", lambda: (torch.ones(2, 3, dtype=torch.long), idx, {})),
        ErrorCase("scalar-input", lambda: (torch.tensor(1.5), torch.tensor(0), {})),
        ErrorCase("batch-size-mismatch", lambda: (x2(), torch.tensor([0, 1, 2]), {})),
        ErrorCase("target-out-of-range", lambda: (x2(), torch.tensor([0, 3]), {})),
        ErrorCase("negative-target", lambda: (x2(), torch.tensor([0, -1]), {})),
        ErrorCase("target-out-of-range-3d", lambda: (x3(), torch.full((2, 5), 3), {})),
        ErrorCase("ignore-index-out-of-range-target", lambda: (x2(), torch.tensor([5, 1]), {"ignore_index": 4})),
        ErrorCase("bad-reduction", lambda: (x2(), idx, {"reduction": "average"})),
        ErrorCase("zero-classes", lambda: (torch.empty(2, 0), torch.tensor([0, 0]), {})),
    ]


ERROR_CASES = _module_error_cases() + _documented_error_cases()


def _call(api: str, impl: str, x, t, kw):
    if api == "function":
        return (fasteval.cross_entropy if impl == "fasteval" else F.cross_entropy)(x, t, **kw)
    cls = fasteval.CrossEntropyLoss if impl == "fasteval" else torch.nn.CrossEntropyLoss
    return cls(**kw)(x, t)  # the constructor is part of the call: torch checks its arguments in forward


def _torch_error(api: str, case: ErrorCase) -> BaseException:
    try:
        _call(api, "torch", *case.make())
    except Exception as e:  # noqa: BLE001 - its type is what is compared
        return e
    raise AssertionError(f"{case.id}: torch accepts this input, so it is not an error case")


ERROR_PARAMS = [pytest.param(case, api, id=f"{case.id}-{api}")
                for case in ERROR_CASES for api in ("function", "module")]


@pytest.mark.parametrize("case,api", ERROR_PARAMS)
def test_error_inputs_raise_torchs_exception_type(case, api):
    err = _torch_error(api, case)
    with pytest.raises(type(err)):
        _call(api, "fasteval", *case.make())


# ---------------------------------------------------------------------------------------------------
# Inputs torch accepts that fasteval must accept too.

def _check_uint8_target(sample: Sample) -> None:
    """fasteval takes uint8 class indices in every layout. torch takes them for (C,) / (N, C) input; its
    (N, C, d1, ...) path refuses them ("expected scalar type Long"): there fasteval is compared with torch
    on the same targets as int64."""
    t8 = sample.target.to(torch.uint8)
    ours = sample.call("fasteval", sample.input, t8)
    t_torch = t8 if sample.input.dim() <= 2 else t8.long()
    theirs = sample.call("torch", sample.input, t_torch)
    truth = sample.call("torch", sample.input.double(), t_torch, **_to64(sample))
    _check(ours, theirs, truth, sample.dtype, f"{sample.id}: loss with a uint8 target")


def _check_meta(sample: Sample) -> None:
    meta = lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v  # noqa: E731
    kw = {k: meta(v) for k, v in sample.kwargs.items()}
    theirs = sample.call("torch", meta(sample.input), meta(sample.target), **kw)
    ours = sample.call("fasteval", meta(sample.input), meta(sample.target), **kw)
    assert ours.device.type == "meta" and ours.shape == theirs.shape and ours.dtype == theirs.dtype


FP32_CONTIG = [pytest.param(("function", torch.float32, True), id="opinfo-float32-contig"),
               pytest.param(("module", torch.float32, True), id="moduleinfo-float32-contig")]


@pytest.mark.parametrize("group", FP32_CONTIG)
def test_uint8_target(group):
    _run_group(group, _check_uint8_target, INDEX_SAMPLES)


@pytest.mark.parametrize("group", FP32_CONTIG)
def test_meta_tensors(group):
    _run_group(group, _check_meta, INDEX_SAMPLES)


@pytest.mark.parametrize("shape", [(0, 0), (0, 0, 3), (2, 0, 0)], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("api", ["function", "module"])
def test_empty_input_with_zero_classes(shape, reduction, api):
    x = torch.empty(shape)
    t = torch.zeros((shape[0],) + shape[2:], dtype=torch.long)
    theirs = _call(api, "torch", x, t, {"reduction": reduction})
    ours = _call(api, "fasteval", x, t, {"reduction": reduction})
    torch.testing.assert_close(ours, theirs, equal_nan=True)


# ---------------------------------------------------------------------------------------------------
# The suite cannot silently become empty.

def test_sample_counts(record_property):
    counts = {
        "opinfo_index": sum(s.api == "function" for s in INDEX_SAMPLES),
        "opinfo_probability": sum(s.api == "function" for s in PROB_SAMPLES),
        "moduleinfo_index": sum(s.api == "module" for s in INDEX_SAMPLES),
        "moduleinfo_probability": sum(s.api == "module" for s in PROB_SAMPLES),
        "noncontiguous": sum(not s.contiguous for s in SAMPLES),
        "error_inputs": len(ERROR_CASES),
    }
    for k, v in counts.items():
        record_property(k, v)
    print("PyTorch samples exercised:", counts)
    # torch 2.13: 11 / 10 OpInfo samples and 69 / 36 ModuleInfo samples per dtype and layout, 7 error inputs.
    floors = {"opinfo_index": 11 * 8, "opinfo_probability": 10 * 8, "moduleinfo_index": 60 * 8,
              "moduleinfo_probability": 30 * 8, "noncontiguous": len(SAMPLES) // 2, "error_inputs": 7 + 15}
    for k, floor in floors.items():
        assert counts[k] >= floor, f"only {counts[k]} {k} samples (expected at least {floor})"
    assert {s.dtype for s in SAMPLES} == set(DTYPES)
