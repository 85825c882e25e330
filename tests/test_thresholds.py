"""Thresholds compare exactly as torch compares: a scalar threshold is rounded to the scores' dtype first
(``preds > 0.3`` on bfloat16 compares with 0.30078125), tensor thresholds in the promoted dtype; binned
thresholds in any order; binned metrics on logits as torchmetrics (sigmoid when a score is outside [0, 1])
or with an explicit ``from_logits``."""
import math

import numpy as np
import pytest
import torch

import fasteval
from fasteval import metrics as M
from fasteval import reference

from cases import needs_kernel

sk = pytest.importorskip("sklearn.metrics")

FLOATS = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
THRESHOLDS = [0.3, 0.5, 0.1, 1 / 3, 0.7, 0.99, 1e-3, -0.3, 0.0, 1.0, 2.5, 1e6]


def _step(v: torch.Tensor, n: int) -> torch.Tensor:
    """The value n representable steps above (n > 0) or below v, in v's dtype."""
    itype = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
             torch.float64: torch.int64}[v.dtype]
    bits = v.reshape(1).view(itype)
    sign = -1 if float(v) < 0 else 1
    return (bits + sign * n).view(v.dtype).reshape(())


def _near(thr: float, dtype) -> torch.Tensor:
    """Values of ``dtype`` around the threshold: its rounding in the dtype and its neighbours, the float32
    and float64 neighbours of the threshold (rounded to the dtype), plus random values."""
    r = torch.tensor(thr, dtype=torch.float64).to(dtype)
    vals = [r] + [_step(r, n) for n in (-2, -1, 1, 2)] if math.isfinite(float(r)) else [r]
    for hi in (torch.float32, torch.float64):
        h = torch.tensor(thr, dtype=torch.float64).to(hi)
        if math.isfinite(float(h)):
            vals += [_step(h, n).to(dtype) for n in (-1, 0, 1)]
    g = torch.Generator().manual_seed(0)
    rand = (torch.rand(64, generator=g, dtype=torch.float64) * 2 - 0.5).to(dtype)
    return torch.cat([torch.stack(vals).to(dtype), rand, torch.tensor([math.nan, math.inf, -math.inf], dtype=dtype)])


def _counts(pos: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pos, target = pos.long().reshape(-1), target.long().reshape(-1)
    return torch.bincount(target * 2 + pos, minlength=4).reshape(2, 2)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("thr", THRESHOLDS)
def test_binary_threshold_is_torchs_comparison(dtype, thr):
    preds = _near(thr, dtype)
    target = torch.arange(preds.numel()) % 2
    want = _counts(preds > thr, target)  # torch's own comparison with a Python scalar
    assert torch.equal(fasteval.binary_confusion_matrix(preds, target, thr), want)
    # multilabel: every column the same rule
    p2 = torch.stack([preds, preds.flip(0)], 1)
    t2 = torch.stack([target, 1 - target], 1)
    got = fasteval.multilabel_confusion_matrix(p2, t2, 2, thr)
    for j in range(2):
        assert torch.equal(got[j], _counts(p2[:, j] > thr, t2[:, j]))


def test_bfloat16_example_from_the_report():
    p = torch.tensor([0.30078125], dtype=torch.bfloat16)
    t = torch.tensor([0])
    assert not bool(p > 0.3)
    assert torch.equal(fasteval.binary_confusion_matrix(p, t, 0.3), torch.tensor([[1, 0], [0, 0]]))
    tmf = pytest.importorskip("torchmetrics.functional.classification")
    assert torch.equal(fasteval.binary_confusion_matrix(p, t, 0.3), tmf.binary_confusion_matrix(p, t, 0.3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_from_logits_keeps_its_exact_rule(dtype):
    """from_logits: positive exactly when sigmoid(x) > t in real arithmetic, i.e. x > logit(t)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4000, generator=g) * 4).to(dtype)
    t = torch.randint(0, 2, (4000,), generator=g)
    for thr in (0.5, 0.3, 0.77):
        logit = math.log(thr) - math.log1p(-thr)
        pos = torch.tensor([v > logit for v in x.double().tolist()])
        assert torch.equal(fasteval.binary_confusion_matrix(x, t, thr, from_logits=True), _counts(pos, t))


# ---------------------------------------------------------------------------------------------------
# Binned confusion matrices: any order of thresholds, torch's tensor comparison.

@pytest.mark.parametrize("pdtype", FLOATS, ids=str)
@pytest.mark.parametrize("tdtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_binned_thresholds_in_any_order_as_torch(pdtype, tdtype):
    g = torch.Generator().manual_seed(4)
    base = torch.tensor([0.3, 0.5, 0.1, 0.7, 0.0, 1.0, 0.25, 1 / 3], dtype=torch.float64)
    # float64 thresholds a hair above / below float32 values: torch compares float32 preds with them in float64
    f32 = base.float().double()
    thr = torch.cat([base, f32 + 1e-12, f32 - 1e-12]).to(tdtype)
    thr = thr[torch.randperm(thr.numel(), generator=g)]
    preds = torch.cat([base.to(pdtype), f32.to(pdtype), torch.rand(500, generator=g, dtype=torch.float64).to(pdtype)])
    preds = torch.cat([preds, torch.tensor([math.nan], dtype=pdtype)])
    target = torch.randint(0, 2, preds.shape, generator=g)
    got = fasteval.binned_confusion_matrix(preds, target, thr)
    pos = preds[:, None] >= thr[None, :]  # torch promotes the two tensors
    for k in range(thr.numel()):
        assert torch.equal(got[k], _counts(pos[:, k], target)), (k, float(thr[k]))
    # one-vs-rest and multilabel layouts follow the same order
    pm = torch.rand(300, 3, generator=g, dtype=torch.float64).to(pdtype)
    tm = torch.randint(0, 3, (300,), generator=g)
    got = fasteval.binned_confusion_matrix(pm, tm, thr)
    for c in range(3):
        pos = pm[:, c, None] >= thr[None, :]
        for k in range(thr.numel()):
            assert torch.equal(got[c, k], _counts(pos[:, k], tm == c))


def test_binned_op_needs_ascending_thresholds_and_the_public_function_sorts():
    """The raw op's bucket search assumes ascending thresholds (its documented precondition); the public
    function sorts them once (with their permutation) and returns the counts in the caller's order."""
    g = torch.Generator().manual_seed(5)
    p = torch.rand(2000, generator=g)
    t = torch.randint(0, 2, (2000,), generator=g)
    thr = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7])
    want = torch.stack([_counts(p >= v, t) for v in thr])
    assert torch.equal(fasteval.binned_confusion_matrix(p, t, thr), want)
    assert torch.equal(fasteval.binned_confusion_matrix(p, t, thr.tolist()), want)
    ref = reference.binned_confusion_matrix(p[:, None], t[:, None], thr.double())[0][0]
    assert torch.equal(ref, want)  # the reference broadcast does not depend on the order


def test_binned_from_logits_is_sigmoid_at_least_t_exactly():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3000, generator=g) * 5
    t = torch.randint(0, 2, (3000,), generator=g)
    thr = torch.tensor([0.8, 0.5, 0.0, 1.0, 0.1, 0.3])
    got = fasteval.binned_confusion_matrix(x, t, thr, from_logits=True)
    xs = x.double().tolist()
    for k, v in enumerate(thr.double().tolist()):
        logit = -math.inf if v == 0 else math.inf if v == 1 else math.log(v) - math.log1p(-v)
        assert torch.equal(got[k], _counts(torch.tensor([xi >= logit for xi in xs]), t)), v
    with pytest.raises(ValueError, match="probabilities"):
        fasteval.binned_confusion_matrix(x, t, [0.5, 1.5], from_logits=True)
    with pytest.raises(ValueError, match="NaN"):
        fasteval.binned_confusion_matrix(x, t, torch.tensor([0.5, math.nan]))


# ---------------------------------------------------------------------------------------------------
# Binned metrics: sorted thresholds, logits.

def _data(seed=7, n=3000, logits=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 2, (n,), generator=g)
    s = torch.randn(n, generator=g) + t * 0.8
    return (s * 2 if logits else torch.sigmoid(s)), t


def test_binned_metrics_do_not_depend_on_the_order_of_thresholds():
    s, t = _data()
    thr = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.0, 1.0, 0.2])
    sorted_thr = thr.sort().values
    for f in (M.binary_auroc, M.binary_average_precision):
        a, b = f(s, t, thresholds=thr), f(s, t, thresholds=sorted_thr)
        assert torch.equal(a, b), f.__name__
    pa, ra, ta = M.binary_precision_recall_curve(s, t, thresholds=thr)
    pb, rb, tb = M.binary_precision_recall_curve(s, t, thresholds=sorted_thr)
    same = dict(rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(pa, pb, **same)
    torch.testing.assert_close(ra, rb, **same)
    assert torch.equal(ta, sorted_thr) and torch.equal(tb, sorted_thr)
    # and they equal torchmetrics on the sorted thresholds
    tmf = pytest.importorskip("torchmetrics.functional.classification")
    np.testing.assert_allclose(M.binary_auroc(s, t, thresholds=thr).item(),
                               tmf.binary_auroc(s, t, thresholds=sorted_thr).item(), rtol=1e-6)


@pytest.mark.parametrize("thresholds", [5, 100, [0.0, 0.2, 0.5, 0.8, 1.0]], ids=str)
@pytest.mark.parametrize("ignore", [False, True])
def test_binned_metrics_on_logits_match_torchmetrics(thresholds, ignore):
    """torchmetrics applies a sigmoid when any score is outside [0, 1]; so does from_logits=None."""
    tmf = pytest.importorskip("torchmetrics.functional.classification")
    s, t = _data(logits=True)
    kw = {}
    if ignore:
        t = t.clone()
        t[::7] = -1
        kw = {"ignore_index": -1}
    for f, tf in ((M.binary_auroc, tmf.binary_auroc), (M.binary_average_precision, tmf.binary_average_precision)):
        got, want = f(s, t, thresholds=thresholds, **kw).item(), tf(s, t, thresholds=thresholds, **kw).item()
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=f.__name__)
    pg, rg, tg = M.binary_precision_recall_curve(s, t, thresholds=thresholds, **kw)
    pw, rw, tw = tmf.binary_precision_recall_curve(s, t, thresholds=thresholds, **kw)
    np.testing.assert_allclose(pg.numpy(), pw.numpy(), rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(rg.numpy(), rw.numpy(), rtol=1e-6, equal_nan=True)
    # the exact path agrees with scikit-learn on the same logits, and the binned path is close to it
    keep = t != -1
    exact = M.binary_auroc(s, t, **kw).item()
    np.testing.assert_allclose(exact, sk.roc_auc_score(t[keep].numpy(), s[keep].numpy()), rtol=1e-12)
    if thresholds == 100:
        assert abs(M.binary_auroc(s, t, thresholds=thresholds, **kw).item() - exact) < 2e-3
        assert abs(M.binary_auroc(s, t, thresholds=thresholds, from_logits=True, **kw).item() - exact) < 2e-3


def test_logits_example_from_the_report():
    """Logits with thresholds: was 0.07 where the exact path, scikit-learn and torchmetrics give ~0.54."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g)
    t = (torch.rand(1000, generator=g) < torch.sigmoid(0.3 * x)).long()
    exact = M.binary_auroc(x, t).item()
    binned = M.binary_auroc(x, t, thresholds=200).item()
    assert abs(binned - exact) < 0.01
    tmf = pytest.importorskip("torchmetrics.functional.classification")
    np.testing.assert_allclose(binned, tmf.binary_auroc(x, t, thresholds=200).item(), rtol=1e-6)


def test_from_logits_explicit():
    s, t = _data(logits=True)
    p = torch.sigmoid(s.double())
    # from_logits=True: exactly sigmoid(x) >= threshold (compared with the float64 sigmoid away from ties)
    for thr in (11, [0.1, 0.5, 0.9]):
        a = M.binary_auroc(s, t, thresholds=thr, from_logits=True)
        b = M.binary_auroc(p, t, thresholds=thr, from_logits=False)
        assert torch.equal(a, b)
    # from_logits=False takes the scores as they are: logits against probability thresholds
    raw = M.binary_precision_recall_curve(s, t, thresholds=[0.0, 0.5], from_logits=False)
    assert torch.equal(raw[0][:2], torch.stack([(t[s >= v] == 1).double().mean() for v in (0.0, 0.5)]))
    # probabilities: None and False agree (no sigmoid)
    q, tq = _data()
    assert torch.equal(M.binary_auroc(q, tq, thresholds=50), M.binary_auroc(q, tq, thresholds=50, from_logits=False))


def test_ignored_scores_do_not_decide_the_sigmoid():
    q, t = _data()
    q, t = q.clone(), t.clone()
    q[:10] = 5.0  # outside [0, 1], but ignored
    t[:10] = -1
    assert torch.equal(M.binary_auroc(q, t, thresholds=20, ignore_index=-1),
                       M.binary_auroc(q[10:], t[10:], thresholds=20))


@needs_kernel("binned_confusion_matrix", "cpu")
def test_compiled_and_reference_agree_on_unsorted_float64_thresholds():
    g = torch.Generator().manual_seed(8)
    p = torch.rand(1000, generator=g)
    t = torch.randint(0, 2, (1000,), generator=g)
    thr = (torch.rand(30, generator=g, dtype=torch.float64) + torch.tensor(1e-12, dtype=torch.float64))
    got = fasteval.binned_confusion_matrix(p, t, thr)
    want = torch.stack([_counts(p >= v, t) for v in thr])
    assert torch.equal(got, want)


def test_sigmoid_rule_without_a_host_read_gives_the_same_counts(monkeypatch):
    """Off the CPU (and while compiling) the rule is a torch.where on the device: same results."""
    s, t = _data(logits=True)
    q, tq = _data()
    t = t.clone()
    t[::5] = -1
    want = [M.binary_auroc(s, t, thresholds=30, ignore_index=-1), M.binary_auroc(q, tq, thresholds=30),
            M.binary_average_precision(s, t, thresholds=[0.2, 0.6], ignore_index=-1)]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # takes the device branch on the CPU
    got = [M.binary_auroc(s, t, thresholds=30, ignore_index=-1), M.binary_auroc(q, tq, thresholds=30),
           M.binary_average_precision(s, t, thresholds=[0.2, 0.6], ignore_index=-1)]
    for a, b in zip(got, want):
        assert torch.equal(a, b)
