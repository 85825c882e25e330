"""The paths documented as free of host synchronisations, checked without a GPU.

On a CUDA device, reading a tensor's values on the host (``bool(t)``, ``int(t)``, ``t.item()``,
``t.tolist()``, ``t.cpu()``, ...) waits for the device; tests/test_cuda_sync.py catches that with torch's
sync debug mode on a GPU. Here the same paths run on the CPU with fasteval's one decision point,
``fasteval.reference.host_readable``, answering False (as it does for a CUDA tensor) and every host read
of a tensor raising, so that a regression shows on any machine. Where such a path meets an out-of-range
label it must count it (the ops' ``invalid`` output, the evaluator's ``count[1]``) or give a NaN loss, as
the CUDA kernels do, instead of raising. Results are compared with the same calls made normally.
"""
import contextlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fasteval
from fasteval import _loader, reference
from fasteval import metrics as M

_READS = ("__bool__", "__int__", "__float__", "__index__", "__complex__", "item", "tolist", "numpy", "cpu")


class HostRead(AssertionError):
    pass


def _raiser(name):
    def read(self, *args, **kwargs):
        raise HostRead(f"Tensor.{name} read a tensor's values on the host on a path documented as free of "
                       "host synchronisations")
    return read


@contextlib.contextmanager
def device_like():
    """fasteval's data-dependent checks see a device tensor (host_readable is False), and any read of a
    tensor's values on the host raises HostRead."""
    saved = {name: torch.Tensor.__dict__[name] for name in _READS if name in torch.Tensor.__dict__}
    original = reference.host_readable
    reference.host_readable = lambda t: False
    try:
        for name in _READS:
            setattr(torch.Tensor, name, _raiser(name))
        yield
    finally:
        for name in _READS:
            if name in saved:
                setattr(torch.Tensor, name, saved[name])
            else:
                delattr(torch.Tensor, name)
        reference.host_readable = original


def _g(seed):
    return torch.Generator().manual_seed(seed)


def test_the_context_catches_host_reads():
    t = torch.tensor([1.0, 2.0])
    with device_like():
        for read in (lambda: bool(t[0]), lambda: int(t[0]), lambda: float(t[0]), lambda: t[0].item(), t.tolist,
                     t.cpu, lambda: [1, 2][t[0].long()], lambda: t.numpy()):
            with pytest.raises(HostRead):
                read()
        assert not reference.host_readable(t)
    assert bool(t[0]) and t.tolist() == [1.0, 2.0] and reference.host_readable(t)  # restored


# ---------------------------------------------------------------------------------------------------
# The three paths that used to read: binned matrices on logits, cohen_kappa, the float64 evaluator.

def test_binned_from_logits_reads_nothing():
    x, y = torch.randn(300, generator=_g(0)) * 3, torch.randint(0, 2, (300,), generator=_g(1))
    thr = torch.tensor([0.7, 0.1, 0.5, 0.5, 0.0, 1.0, 0.3])  # any order, a duplicate
    calls = [
        lambda: fasteval.binned_confusion_matrix(x, y, 11, from_logits=True),
        lambda: fasteval.binned_confusion_matrix(x, y, thr, from_logits=True),
        lambda: fasteval.binned_confusion_matrix(x.sigmoid(), y, thr),
        lambda: M.binary_auroc(x, y, thresholds=thr),  # torchmetrics' sigmoid rule, decided on the "device"
        lambda: M.binary_average_precision(x, y, thresholds=11, from_logits=True),
        lambda: M.binary_precision_recall_curve(x.sigmoid(), y, thresholds=thr),
    ]
    want = [c() for c in calls]
    with device_like():
        got = [c() for c in calls]
    for a, b in zip(got, want):
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            torch.testing.assert_close(u, v, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("weights", [None, "linear", "quadratic"])
def test_cohen_kappa_reads_nothing(weights):
    defined = fasteval.confusion_matrix(torch.tensor([0, 1, 2, 2, 1]), torch.tensor([0, 1, 2, 1, 1]), 3)
    undefined = fasteval.confusion_matrix(torch.tensor([1, 1, 1]), torch.tensor([1, 1, 1]), 3)
    with pytest.warns(M.UndefinedMetricWarning, match="kappa is undefined"):  # on the CPU it warns
        assert math.isnan(float(M.cohen_kappa(confmat=undefined, weights=weights)))
    want = M.cohen_kappa(confmat=defined, weights=weights)
    with device_like(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either: deciding it would read the flag
        got = [M.cohen_kappa(confmat=undefined, weights=weights), M.cohen_kappa(confmat=defined, weights=weights)]
        if weights is None:
            got.append(M.cohen_kappa(counts=fasteval.class_counts(torch.tensor([1, 1]), torch.tensor([1, 1]), 3)))
    assert math.isnan(float(got[0])) and float(got[1]) == float(want)
    if weights is None:
        assert math.isnan(float(got[2]))


def _served_by_reference(dtype):
    return dtype == torch.float64 or not _loader.has_kernel("eval_update", "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["rows", "class_dim_1", "last_dim"])
def test_evaluator_update_reads_nothing(dtype, layout):
    c = 7
    if layout == "rows":
        x, t = torch.randn(40, c, generator=_g(2)), torch.randint(0, c, (40,), generator=_g(3))
    elif layout == "class_dim_1":
        x, t = torch.randn(3, c, 4, 5, generator=_g(2)), torch.randint(0, c, (3, 4, 5), generator=_g(3))
    else:
        x, t = torch.randn(3, 4, c, generator=_g(2)), torch.randint(0, c, (3, 4), generator=_g(3)).int()
    x = x.to(dtype)
    t.view(-1)[::6] = -100
    make = lambda: fasteval.ClassificationEvaluator(c, top_k=(1, 3), ignore_index=-100,  # noqa: E731
                                                    full_confusion=layout != "rows")
    want = make()
    want.update(x, t)
    ev, other = make(), make()
    with device_like():
        ev.update(x, t)
        other.merge(ev)
        snapshot = ev.state_dict()
        other.reset()
    for name in ("loss_sum", "confmat", "topk_hits", "calib_count", "calib_conf", "calib_correct", "count"):
        torch.testing.assert_close(getattr(ev, name), getattr(want, name), rtol=0, atol=0, msg=name)
        torch.testing.assert_close(snapshot[name], getattr(want, name), rtol=0, atol=0, msg=name)
        assert not bool(getattr(other, name).any()), name
    if not _served_by_reference(dtype):
        return  # the compiled CPU kernel raises on a bad target itself (no host read): see test_evaluator.py
    # Out-of-range targets on a path that cannot raise: the batch is rejected and counted in count[1],
    # nothing else changes, and compute() reports it.
    bad = t.clone()
    bad.view(-1)[1], bad.view(-1)[2] = c, -3
    before = {n: v.clone() for n, v in ev.state_dict().items() if n != "config"}
    with device_like():
        ev.update(x, bad)
    for name, old in before.items():
        new = getattr(ev, name)
        if name == "count":
            assert new.tolist() == [old[0].item(), old[1].item() + 2], new
        else:
            torch.testing.assert_close(new, old, rtol=0, atol=0, msg=name)
    with pytest.raises(IndexError, match="2 target"):
        ev.compute()


def test_float64_eval_update_op_counts_bad_targets_without_reading():
    x, t = torch.randn(6, 4, dtype=torch.float64, generator=_g(4)), torch.tensor([0, 5, 1, -1, 3, 2])
    i64, f64 = torch.int64, torch.float64
    state = [torch.zeros(1, dtype=f64), torch.zeros(4, 4, dtype=i64), torch.zeros(1, dtype=i64),
             torch.zeros(6, dtype=i64), torch.zeros(6, dtype=f64), torch.zeros(6, dtype=i64), torch.zeros(2, dtype=i64)]
    with device_like():
        reference.eval_update(x, t, torch.linspace(0, 1, 6), None, 0.0, [1], False, *state)
    assert state[-1].tolist() == [0, 2] and all(not bool(s.any()) for s in state[:-1])
    with pytest.raises(IndexError, match="target 5 is out of bounds"):  # the same call, readable: raises
        reference.eval_update(x, t, torch.linspace(0, 1, 6), None, 0.0, [1], False, *state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_hidden_state_paths_read_nothing(dtype):
    """fasteval.linear_cross_entropy (forward and backward) and ClassificationEvaluator.update_from_hidden, with
    (B, T, H) hidden states as a language model gives them."""
    v, h = 300, 8
    x = torch.randn(2, 5, h, generator=_g(20)).to(dtype)
    w = (torch.randn(v, h, generator=_g(21)) * 0.5).to(dtype)
    b = torch.randn(v, generator=_g(22)).to(dtype)
    t = torch.randint(0, v, (2, 5), generator=_g(23))
    t[0, :2] = -100
    cw = torch.rand(v, generator=_g(24)) + 0.5

    def run():
        out = []
        for kw in ({}, {"weight": cw.to(dtype) if dtype == torch.float64 else cw, "label_smoothing": 0.1,
                        "reduction": "sum"}, {"reduction": "none"}):
            xa, wa, ba = (a.clone().requires_grad_() for a in (x, w, b))
            loss = fasteval.linear_cross_entropy(xa, wa, t, linear_bias=ba, **kw)
            out += [loss.detach(), *torch.autograd.grad(loss.sum(), (xa, wa, ba))]
        ev = fasteval.ClassificationEvaluator(v, top_k=(1, 5), ignore_index=-100, label_smoothing=0.1)
        ev.update_from_hidden(x, w, t, b)
        return out + [ev.state_dict()[n] for n in ("loss_sum", "confmat", "topk_hits", "calib_count", "count")]

    want = run()
    with device_like():
        got = run()
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# The other documented paths: cross-entropy, the confusion functions, the metrics, the reference ops.

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_cross_entropy_reads_nothing(dtype):
    x = torch.randn(16, 9, dtype=torch.float64, generator=_g(5)).to(dtype)
    t = torch.randint(0, 9, (16,), generator=_g(6))
    t[::5] = -100
    w = torch.rand(9, generator=_g(7)) + 0.5
    x4, t4 = torch.randn(2, 9, 3, generator=_g(8)).to(dtype), torch.randint(0, 9, (2, 3), generator=_g(9))
    kws = [{}, {"weight": w, "label_smoothing": 0.1, "reduction": "sum"}, {"reduction": "none"}]

    def run():
        out = []
        for kw in kws:
            xa = x.clone().requires_grad_()
            loss = fasteval.cross_entropy(xa, t, **kw)
            loss.sum().backward()
            out += [loss.detach(), xa.grad]
        out.append(fasteval.cross_entropy(x4, t4, reduction="none"))
        out.append(fasteval.CrossEntropyLoss(label_smoothing=0.2)(x, t))
        return out

    want = run()
    with device_like():
        got = run()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reference_cross_entropy_off_the_cpu_gives_nan_rows_like_the_cuda_kernel():
    """Where it cannot raise without a host read, the reference does what the CUDA kernel does for a
    target outside [0, C): NaN loss and lse for that row, its nearest class's weight in total_weight, a
    zero gradient row; the other rows as usual."""
    x = torch.randn(5, 4, dtype=torch.float64, generator=_g(10))
    t = torch.tensor([0, 4, 2, -7, -100])
    w = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    good = torch.tensor([0, 3, 2, 0, -100])  # the bad rows' targets clamped, for total_weight
    for ls in (0.0, 0.1):
        with device_like():
            loss, lse, tw = reference.softmax_cross_entropy(x, t, w, -100, ls, 0)
            g = reference.softmax_cross_entropy_backward(torch.ones(5, dtype=torch.float64), x, t, w, lse, tw,
                                                         -100, ls, 0)
        bad = torch.tensor([False, True, False, True, False])
        assert torch.isnan(loss[bad]).all() and torch.isnan(lse[bad]).all()
        want = F.cross_entropy(x[[0, 2]], t[[0, 2]], weight=w, label_smoothing=ls, reduction="none")
        torch.testing.assert_close(loss[[0, 2]], want)
        assert float(loss[4]) == 0.0 and float(lse[4]) == 0.0
        assert float(tw) == float(w[good[:4]].sum())
        assert not bool(g[bad].any()) and not bool(g[4].any())
        xa = x[[0, 2]].clone().requires_grad_()
        F.cross_entropy(xa, t[[0, 2]], weight=w, label_smoothing=ls, reduction="sum").backward()
        torch.testing.assert_close(g[[0, 2]], xa.grad)
    with pytest.raises(IndexError):  # readable: it raises, as on the CPU
        reference.softmax_cross_entropy(x, t, w, -100, 0.0, 0)


def test_confusion_functions_and_metrics_read_nothing():
    c = 6
    s, t = torch.randn(50, c, generator=_g(11)), torch.randint(0, c, (50,), generator=_g(12))
    t[::7] = -100
    p = torch.randint(0, c, (50,), generator=_g(13))
    prob, y = torch.rand(50, generator=_g(14)), torch.randint(0, 2, (50,), generator=_g(15))
    ml, yl = torch.randn(50, 3, 2, generator=_g(16)), torch.randint(0, 2, (50, 3, 2), generator=_g(17))

    def run():
        cm = fasteval.confusion_matrix(p, t, c, ignore_index=-100)
        counts = fasteval.class_counts(s, t, c, ignore_index=-100)
        out = [cm, *counts, fasteval.confusion_matrix(s, t, c, ignore_index=-100, normalize="true"),
               fasteval.binary_confusion_matrix(prob, y, 0.3), fasteval.binary_confusion_matrix(
                   prob.logit(), y.bool(), 0.3, from_logits=True, normalize="all"),
               fasteval.multilabel_confusion_matrix(ml, yl, 3, from_logits=True),
               fasteval.binned_confusion_matrix(s.softmax(1), t.clamp(0, c - 1), 7)]
        for avg in ("micro", "macro", "weighted", None):
            out += [M.accuracy(s, t, c, average=avg, ignore_index=-100, zero_division=0),
                    M.accuracy(s, t, c, top_k=3, average=avg, ignore_index=-100, zero_division=0),
                    M.f1_score(p, t, c, average=avg, ignore_index=-100, zero_division=0),
                    M.precision(confmat=cm, average=avg, zero_division=0),
                    M.specificity(confmat=cm, average=avg, zero_division=0),
                    *M.precision_recall_fscore_support(counts=counts, average=avg, zero_division=0)[:3]]
        out += [M.matthews_corrcoef(confmat=cm), M.matthews_corrcoef(counts=counts),
                M.top_k_accuracy(s, t, c, k=2, ignore_index=-100),
                M.top_k_accuracy(s, t, c, k=2, normalize=False, ignore_index=-100),
                M.binary_auroc(prob, y, thresholds=20), M.binary_average_precision(prob, y, thresholds=20)]
        return out

    want = run()
    with device_like():
        got = run()
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_reference_ops_count_bad_labels_without_reading():
    """The reference's confusion ops off the CPU: out-of-range labels are skipped and counted in
    ``invalid``, as in the CUDA kernels, and the counts equal those of the valid samples alone."""
    c = 5
    s = torch.randn(12, c, generator=_g(18))
    t = torch.tensor([0, 1, 2, 3, 4, 5, -2, 1, 2, -100, 0, 9])
    keep = (t == -100) | ((t >= 0) & (t < c))
    bad = int((~keep).sum())  # 5, -2 and 9
    prob = torch.rand(12, 3, generator=_g(19))
    yb = torch.randint(0, 2, (12, 3), generator=_g(20))
    yb[0, 1], yb[3, 2] = 2, -1
    thr = torch.tensor([0.5, 0.2, 0.9], dtype=torch.float64)
    with device_like():
        got = {op: getattr(reference, op)(s, t, c, -100) for op in ("confusion_matrix", "class_counts")}
        got["topk_rank"] = reference.topk_rank(s, t, -100)
        got["multilabel"] = reference.multilabel_confusion_matrix(prob, yb, 0.5, None)
        got["binned"] = reference.binned_confusion_matrix(prob, yb, thr, None)
        got["binned_ovr"] = reference.binned_confusion_matrix(s.sigmoid(), t, thr, -100)
    for op in ("confusion_matrix", "class_counts"):
        assert int(got[op][1]) == bad
        torch.testing.assert_close(got[op][0], getattr(reference, op)(s[keep], t[keep], c, -100)[0])
    assert int(got["topk_rank"][1]) == bad
    assert int(got["multilabel"][1]) == 2 and int(got["binned"][1]) == 2
    ok = (yb == 0) | (yb == 1)
    for name, res in (("multilabel", got["multilabel"][0]), ("binned", got["binned"][0])):
        for lab in range(3):
            rows = ok[:, lab]
            want = (reference.multilabel_confusion_matrix(prob[rows, lab:lab + 1], yb[rows, lab:lab + 1], 0.5)[0][0]
                    if name == "multilabel" else
                    reference.binned_confusion_matrix(prob[rows, lab:lab + 1], yb[rows, lab:lab + 1], thr)[0][0])
            torch.testing.assert_close(res[lab], want, msg=f"{name} label {lab}")
    assert int(got["binned_ovr"][1]) == bad
    torch.testing.assert_close(got["binned_ovr"][0],
                               reference.binned_confusion_matrix(s.sigmoid()[keep], t[keep], thr, -100)[0])
