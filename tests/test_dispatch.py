"""Dispatch: every op and dtype a compiled kernel serves reaches the kernel, and the rest reaches the reference.

The reference gives the same numbers as the kernels, so a dispatch rule that silently sends everything to the
reference would pass every parity test and lose only speed. Here the reference functions (as ``fasteval._ops``
reaches them) are replaced by ones that raise, and the public API is called on inputs the kernels serve: every
call must still succeed, with the right result. Conversely, inputs no kernel serves (float64 scores or logits,
other integer dtypes at the op level) must reach the reference: there the replacement counts its calls.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fasteval
from fasteval import _loader, _ops, metrics, reference

from cases import device_params, needs_kernel


def on_devices(*ops):
    """The test on each device, skipped where a kernel of ``ops`` is not served (a CPU-only build has no CUDA
    kernels)."""
    return pytest.mark.parametrize("device", device_params(ops))


REFERENCE_OPS = ("softmax_cross_entropy", "softmax_cross_entropy_backward", "eval_update", "confusion_matrix",
                 "class_counts", "multilabel_confusion_matrix", "binned_confusion_matrix", "topk_rank",
                 "compare_update", "linear_cross_entropy", "linear_eval_update")
SCORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64, torch.int32)
BINARY_DTYPES = (torch.int64, torch.int32, torch.uint8)


class ReferenceCalled(AssertionError):
    pass


@pytest.fixture
def no_reference(monkeypatch):
    """Every reference op raises: a served input that reaches one fails the test."""
    for name in REFERENCE_OPS:
        def boom(*args, _name=name, **kwargs):
            raise ReferenceCalled(f"fasteval.reference.{_name} was called for an input a compiled kernel serves")
        monkeypatch.setattr(reference, name, boom)


@pytest.fixture
def reference_calls(monkeypatch):
    """Counts the calls of every reference op (which still computes the result)."""
    calls = {name: 0 for name in REFERENCE_OPS}
    for name in REFERENCE_OPS:
        real = getattr(reference, name)

        def counted(*args, _name=name, _real=real, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(reference, name, counted)
    return calls


def _labels(n, c, dtype):
    return torch.randint(0, c, (n,)).to(dtype)


def _cm_loop(p, t, c):
    cm = torch.zeros(c, c, dtype=torch.int64)
    for a, b in zip(t.tolist(), p.tolist()):
        cm[a, b] += 1
    return cm


# ---------------------------------------------------------------------------------------------------
# Served inputs reach the kernels.

@needs_kernel(None, "cpu")
def test_every_op_has_a_cpu_kernel():
    for op in REFERENCE_OPS + ("linear_cross_entropy_backward",):
        assert _loader.has_kernel(op, "cpu"), op
    # every op of the library has its table entry, and the entry has the kernel
    assert sorted(_ops.OPS) == sorted(_loader.kernels())
    assert all(op._kernel is not None for op in _ops.OPS.values())
    # The small-call fast path of cross_entropy is the op's own entry point.
    assert _ops.SCE_CPU is not None
    assert fasteval.losses._SCE_CPU is _ops.SCE_CPU


@on_devices("softmax_cross_entropy")
@pytest.mark.parametrize("dtype", SCORE_DTYPES)
@pytest.mark.parametrize("tdtype", INDEX_DTYPES)
def test_cross_entropy_reaches_kernel(no_reference, device, dtype, tdtype):
    x = torch.randn(6, 5).to(dtype)
    t = _labels(6, 5, tdtype)
    w = torch.rand(5) + 0.5
    want_dev = F.cross_entropy(x.float(), t.long(), reduction="none")
    got_dev = fasteval.cross_entropy(x.to(device), t.to(device), weight=w.to(dtype).to(device), reduction="none")
    assert got_dev.device.type == device and got_dev.dtype == dtype
    torch.testing.assert_close(got_dev.float().cpu() / w[t.long()].to(dtype).float(), want_dev,
                               **(dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else {}))
    want = F.cross_entropy(x.float(), t.long(), reduction="none")
    tol = dict(rtol=1e-2, atol=1e-2) if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-6)
    # fast path (2-D, no weight), general path (weight; (N, C, d) logits), every reduction
    torch.testing.assert_close(fasteval.cross_entropy(x, t, reduction="none").float(), want, **tol)
    torch.testing.assert_close(fasteval.cross_entropy(x, t, weight=w.to(dtype), reduction="sum").float(),
                               F.cross_entropy(x.float(), t.long(), weight=w.to(dtype).float(), reduction="sum"),
                               **tol)
    x3 = torch.randn(3, 5, 2).to(dtype)
    t3 = torch.randint(0, 5, (3, 2)).to(tdtype)
    torch.testing.assert_close(fasteval.cross_entropy(x3, t3).float(), F.cross_entropy(x3.float(), t3.long()), **tol)
    crit = fasteval.CrossEntropyLoss(label_smoothing=0.1)
    torch.testing.assert_close(crit(x, t).float(), F.cross_entropy(x.float(), t.long(), label_smoothing=0.1), **tol)


@on_devices("softmax_cross_entropy", "softmax_cross_entropy_backward")
@pytest.mark.parametrize("dtype", SCORE_DTYPES)
def test_cross_entropy_backward_reaches_kernel(no_reference, device, dtype):
    x = torch.randn(4, 7).to(dtype).to(device).requires_grad_()
    t = torch.tensor([0, 6, 3, 3], device=device)
    fasteval.cross_entropy(x, t).backward()
    xr = x.detach().float().requires_grad_()
    F.cross_entropy(xr, t).backward()
    tol = dict(rtol=1e-2, atol=1e-2) if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.float(), xr.grad, **tol)
    # the general path (a weight) too
    x.grad = None
    w = torch.rand(7, device=device) + 0.5
    fasteval.cross_entropy(x, t, weight=w.to(dtype)).backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()


@on_devices("eval_update")
@pytest.mark.parametrize("dtype", SCORE_DTYPES)
@pytest.mark.parametrize("full_confusion", [True, False])
def test_evaluator_update_reaches_kernel(no_reference, device, dtype, full_confusion):
    ev = fasteval.ClassificationEvaluator(4, top_k=(1, 2), full_confusion=full_confusion, device=device)
    x = torch.randn(10, 4).to(dtype).to(device)
    t = _labels(10, 4, torch.int64).to(device)
    ev.update(x, t)
    ev.update(torch.randn(2, 4, 3).to(dtype).to(device), torch.randint(0, 4, (2, 3), device=device))  # (N, C, S)
    assert ev.count.tolist() == [16, 0]
    assert int(ev.topk_hits[1]) >= int(ev.topk_hits[0])


@on_devices("compare_update")
@pytest.mark.parametrize("adtype", SCORE_DTYPES)
@pytest.mark.parametrize("bdtype", SCORE_DTYPES)
def test_comparison_reaches_kernel(no_reference, device, adtype, bdtype):
    a = torch.randn(8, 5)
    b = a + 0.1 * torch.randn(8, 5)
    t = _labels(8, 5, torch.int64)
    cmp = fasteval.LogitComparator(5, top_k=(1, 2), device=device)
    cmp.update(a.to(adtype).to(device), b.to(bdtype).to(device), t.to(device))
    cmp.update(a.to(adtype).to(device), b.to(bdtype).to(device))  # without targets: dispatched the same way
    m = cmp.compute()
    assert m["count"] == 16 and 0.0 <= m["top1_agreement"] <= 1.0 and m["kl_mean"] >= 0.0


@on_devices("linear_cross_entropy", "linear_cross_entropy_backward", "linear_eval_update")
@pytest.mark.parametrize("dtype", SCORE_DTYPES)
def test_linear_ops_reach_kernel(no_reference, device, dtype):
    h = torch.randn(6, 8).to(dtype).to(device).requires_grad_()
    w = (0.3 * torch.randn(11, 8)).to(dtype).to(device).requires_grad_()
    t = _labels(6, 11, torch.int64).to(device)
    loss = fasteval.linear_cross_entropy(h, w, t)
    loss.backward()
    want = F.cross_entropy(F.linear(h.detach().float(), w.detach().float()), t)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.float(), want, **tol)
    assert h.grad is not None and w.grad is not None
    ev = fasteval.ClassificationEvaluator(11, top_k=(1, 5), device=device)
    with torch.no_grad():
        ev.update_from_hidden(h, w, t)
    assert ev.count.tolist() == [6, 0]


@on_devices("confusion_matrix", "class_counts")
@pytest.mark.parametrize("tdtype", INDEX_DTYPES)
@pytest.mark.parametrize("pdtype", SCORE_DTYPES + INDEX_DTYPES)
def test_confusion_matrix_and_counts_reach_kernel(no_reference, device, pdtype, tdtype):
    c = 4
    t = _labels(12, c, tdtype)
    if pdtype.is_floating_point:
        preds = torch.randn(12, c).to(pdtype)
        labels = preds.argmax(1)
    else:
        preds = _labels(12, c, pdtype)
        labels = preds.long()
    want = _cm_loop(labels, t.long(), c)
    preds, t = preds.to(device), t.to(device)
    assert torch.equal(fasteval.confusion_matrix(preds, t, c).cpu(), want)
    tp, npred, ntrue = (v.cpu() for v in fasteval.class_counts(preds, t, c))
    assert torch.equal(tp, want.diagonal()) and torch.equal(npred, want.sum(0)) and torch.equal(ntrue, want.sum(1))
    # the metrics reach the same kernels
    metrics.f1_score(preds, t, c, zero_division=0)
    metrics.cohen_kappa(preds, t, c, weights="linear")


@on_devices("multilabel_confusion_matrix")
@pytest.mark.parametrize("tdtype", BINARY_DTYPES)
@pytest.mark.parametrize("pdtype", SCORE_DTYPES + BINARY_DTYPES + (torch.float64,))
def test_multilabel_and_binary_reach_kernel(no_reference, device, pdtype, tdtype):
    t = torch.randint(0, 2, (9, 3)).to(tdtype)
    if pdtype.is_floating_point:
        preds = torch.rand(9, 3).to(pdtype)
        pos = (preds > torch.tensor(0.5, dtype=pdtype)).long()
    else:
        preds = torch.randint(0, 2, (9, 3)).to(pdtype)
        pos = preds.long()
    tl = t.long()
    preds, t = preds.to(device), t.to(device)
    cm = fasteval.multilabel_confusion_matrix(preds, t, 3).cpu()
    for j in range(3):
        assert cm[j].tolist() == [[int(((tl[:, j] == a) & (pos[:, j] == b)).sum()) for b in (0, 1)] for a in (0, 1)]
    assert torch.equal(fasteval.binary_confusion_matrix(preds[:, 0], t[:, 0]).cpu(), cm[0])


@on_devices("binned_confusion_matrix")
@pytest.mark.parametrize("tdtype", BINARY_DTYPES)
@pytest.mark.parametrize("pdtype", SCORE_DTYPES + (torch.float64,))
def test_binned_reaches_kernel(no_reference, device, pdtype, tdtype):
    preds = torch.rand(20).to(pdtype)
    t = torch.randint(0, 2, (20,)).to(tdtype)
    cm = fasteval.binned_confusion_matrix(preds.to(device), t.to(device), 5).cpu()
    thr = torch.linspace(0, 1, 5)
    tp = [int(((preds.double() >= float(v)) & (t == 1)).sum()) for v in thr.tolist()]
    assert cm[:, 1, 1].tolist() == tp
    metrics.binary_auroc(preds.to(device), t.to(device), thresholds=5)
    metrics.binary_average_precision(preds.to(device), t.to(device), thresholds=[0.2, 0.7])


@on_devices("topk_rank", "class_counts")
@pytest.mark.parametrize("tdtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", SCORE_DTYPES)
def test_topk_reaches_kernel(no_reference, device, dtype, tdtype):
    scores = torch.randn(15, 6).to(dtype)
    t = _labels(15, 6, tdtype)
    order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices
    rank = (order == t.long()[:, None]).int().argmax(1)
    scores, t = scores.to(device), t.to(device)
    assert math.isclose(float(metrics.accuracy(scores, t, 6, top_k=3)), float((rank < 3).double().mean()))
    metrics.top_k_accuracy(scores, t, 6, k=2)


# ---------------------------------------------------------------------------------------------------
# Unserved inputs reach the reference (in both builds).

def test_float64_cross_entropy_reaches_reference(reference_calls):
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 2, 1, 0])
    loss = fasteval.cross_entropy(x, t)
    torch.testing.assert_close(loss, F.cross_entropy(x, t))
    assert loss.dtype == torch.float64
    assert reference_calls["softmax_cross_entropy"] >= 1


def test_float64_evaluator_reaches_reference(reference_calls):
    ev = fasteval.ClassificationEvaluator(3, top_k=(1,))
    ev.update(torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0]))
    assert reference_calls["eval_update"] == 1
    assert ev.count.tolist() == [4, 0]


def test_float64_scores_reach_reference(reference_calls):
    scores = torch.randn(6, 3, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 2, 1, 0])
    cm = fasteval.confusion_matrix(scores, t, 3)
    assert torch.equal(cm, _cm_loop(scores.argmax(1), t, 3))
    assert reference_calls["confusion_matrix"] == 1
    fasteval.class_counts(scores, t, 3)
    assert reference_calls["class_counts"] == 1
    metrics.accuracy(scores, t, 3, top_k=2)
    assert reference_calls["topk_rank"] == 1
    # a float64 model compared with a float32 one: no kernel reads float64, whichever side it is on
    cmp = fasteval.LogitComparator(3, top_k=(1,))
    cmp.update(scores, scores.float(), t)
    cmp.update(scores.float(), scores, t)
    assert reference_calls["compare_update"] == 2 and cmp.compute()["top1_agreement"] == 1.0


def test_unserved_integer_dtypes_reach_reference(reference_calls):
    # At the op level (the public functions convert other integer dtypes to int64 first).
    t16 = torch.tensor([0, 1, 2, 1], dtype=torch.int16)
    p16 = torch.tensor([0, 2, 2, 1], dtype=torch.int16)
    cm, invalid = _ops.confusion_matrix(p16, t16, 3, None)
    assert torch.equal(cm, _cm_loop(p16.long(), t16.long(), 3)) and int(invalid) == 0
    assert reference_calls["confusion_matrix"] == 1
    counts, _ = _ops.class_counts(p16, t16, 3, None)
    assert counts[2].tolist() == [1, 2, 1]
    assert reference_calls["class_counts"] == 1
    ml, _ = _ops.multilabel_confusion_matrix(torch.rand(4, 2), torch.randint(0, 2, (4, 2), dtype=torch.int16),
                                             0.5, None)
    assert int(ml.sum()) == 8
    assert reference_calls["multilabel_confusion_matrix"] == 1
    _ops.binned_confusion_matrix(torch.rand(4, 1), torch.randint(0, 2, (4, 1), dtype=torch.int8),
                                 torch.tensor([0.5]), None)
    assert reference_calls["binned_confusion_matrix"] == 1
    rank, _ = _ops.topk_rank(torch.randn(4, 3), t16[:4].to(torch.int16), None)
    assert reference_calls["topk_rank"] == 1 and rank.shape == (4,)
