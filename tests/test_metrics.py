"""Classification metrics against scikit-learn (and torchmetrics where the definitions agree), from
samples, from a confusion matrix and from per-class counts."""
import math
import warnings

import numpy as np
import pytest
import torch

import fasteval
from fasteval import metrics as M

sk = pytest.importorskip("sklearn.metrics")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ZERO_DIVISION = ["warn", 0, 1, math.nan]
AVERAGES = ["micro", "macro", "weighted", None]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_labels(c, kind, n=3000, seed=0):
    g = gen(seed * 7 + c)
    if kind == "uniform":
        return torch.randint(0, c, (n,), generator=g), torch.randint(0, c, (n,), generator=g)
    geo = torch.distributions.Geometric(probs=torch.tensor(0.4))
    torch.manual_seed(seed + c)
    t = geo.sample((n,)).long().clamp(max=c - 1)
    if kind == "skewed":
        p = torch.where(torch.rand(n, generator=g) < 0.7, t, geo.sample((n,)).long().clamp(max=c - 1))
    else:  # "absent": preds never use the top half of the classes, target never class 1
        t = torch.where(t == 1, torch.zeros_like(t), t)
        p = torch.where(torch.rand(n, generator=g) < 0.5, t, torch.zeros_like(t)).clamp(max=max(c // 2 - 1, 0))
    return p, t


def all_sources(p, t, c):
    """The same problem from samples, from a confusion matrix and from per-class counts."""
    cm = fasteval.confusion_matrix(p, t, c)
    cnt = fasteval.class_counts(p, t, c)
    return [dict(preds=p, target=t, num_classes=c), dict(confmat=cm), dict(counts=cnt)]


def close(got, want):
    np.testing.assert_allclose(np.asarray(got.cpu() if isinstance(got, torch.Tensor) else got, dtype=np.float64),
                               np.asarray(want, dtype=np.float64), rtol=1e-12, atol=1e-15, equal_nan=True)


@pytest.mark.parametrize("c", [1, 2, 3, 10, 1000])
@pytest.mark.parametrize("kind", ["uniform", "skewed", "absent"])
@pytest.mark.parametrize("zero_division", ZERO_DIVISION, ids=str)
def test_precision_recall_fscore_support(c, kind, zero_division):
    p, t = make_labels(c, kind)
    for average in AVERAGES:
        want = sk.precision_recall_fscore_support(t.numpy(), p.numpy(), labels=list(range(c)), average=average,
                                                  zero_division=zero_division)
        for src in all_sources(p, t, c):
            got = M.precision_recall_fscore_support(**src, average=average, zero_division=zero_division)
            for g_, w_ in zip(got[:3], want[:3]):
                close(g_, w_)
            if average is None:
                np.testing.assert_array_equal(got[3].numpy(), want[3])
            else:
                assert got[3] is None
        kw = dict(average=average, zero_division=zero_division)
        labels = list(range(c))
        close(M.precision(p, t, c, **kw), sk.precision_score(t.numpy(), p.numpy(), labels=labels, **kw))
        close(M.recall(p, t, c, **kw), sk.recall_score(t.numpy(), p.numpy(), labels=labels, **kw))
        close(M.f1_score(p, t, c, **kw), sk.f1_score(t.numpy(), p.numpy(), labels=labels, **kw))
        for beta in (0.0, 0.5, 2.0, math.inf):
            close(M.fbeta_score(p, t, c, beta=beta, **kw),
                  sk.fbeta_score(t.numpy(), p.numpy(), beta=beta, labels=labels, **kw))


@pytest.mark.parametrize("c", [1, 2, 3, 10, 1000])
@pytest.mark.parametrize("kind", ["uniform", "skewed", "absent"])
def test_mcc_kappa_accuracy(c, kind):
    p, t = make_labels(c, kind, seed=1)
    tn, pn = t.numpy(), p.numpy()
    for src in all_sources(p, t, c):
        close(M.matthews_corrcoef(**src), sk.matthews_corrcoef(tn, pn))
        close(M.accuracy(**src), sk.accuracy_score(tn, pn))
        close(M.cohen_kappa(**src), sk.cohen_kappa_score(tn, pn, labels=list(range(c))))
        close(M.accuracy(**src, average="macro", zero_division=0),
              sk.recall_score(tn, pn, labels=list(range(c)), average="macro", zero_division=0))
    if c <= 10:
        for w in ("linear", "quadratic"):
            close(M.cohen_kappa(p, t, c, weights=w), sk.cohen_kappa_score(tn, pn, labels=list(range(c)), weights=w))
        with pytest.raises(ValueError, match="full confusion matrix"):
            M.cohen_kappa(counts=fasteval.class_counts(p, t, c), weights="linear")
    if kind == "uniform" and 1 < c <= 10:  # every class present in target
        close(M.accuracy(p, t, c, average="macro"), sk.balanced_accuracy_score(tn, pn))


def assert_same_report(got, want):
    """A text report equal to scikit-learn's, or a dict report with the same keys and values."""
    if not isinstance(want, dict):
        assert got == want
        return
    assert got.keys() == want.keys()
    for k in want:
        if isinstance(want[k], dict):
            assert got[k].keys() == want[k].keys()
            for kk in want[k]:
                close(got[k][kk], want[k][kk])
        else:
            close(got[k], want[k])


@pytest.mark.parametrize("c", [2, 3, 10])
@pytest.mark.parametrize("zero_division", ZERO_DIVISION, ids=str)
@pytest.mark.parametrize("output_dict", [False, True])
def test_classification_report(c, zero_division, output_dict):
    for kind in ("uniform", "absent"):
        p, t = make_labels(c, kind, n=500, seed=2)
        for digits in (2, 4):
            names = None if digits == 2 else [f"class {i:02d}" for i in range(c)]
            want = sk.classification_report(t.numpy(), p.numpy(), labels=list(range(c)), target_names=names,
                                            digits=digits, output_dict=output_dict, zero_division=zero_division)
            for src in all_sources(p, t, c):
                got = M.classification_report(**src, target_names=names, digits=digits, output_dict=output_dict,
                                              zero_division=zero_division)
                assert_same_report(got, want)


@pytest.mark.parametrize("output_dict", [False, True])
def test_classification_report_of_a_subset_of_the_classes(output_dict):
    # Counts of classes 0..2 of a 5-class problem: scikit-learn (labels=[0, 1, 2]) reports the micro average as
    # "micro avg" with its precision, recall and F1, not as the accuracy.
    p, t = make_labels(5, "uniform", n=400, seed=7)
    tn, pn = t.numpy(), p.numpy()
    want = sk.classification_report(tn, pn, labels=[0, 1, 2], output_dict=output_dict, zero_division=0)
    tp, pc, tc = fasteval.class_counts(p, t, 5)
    cm = fasteval.confusion_matrix(p, t, 5)
    for src in (dict(counts=(tp[:3], pc[:3], tc[:3])), dict(confmat=cm[:3, :3].contiguous())):
        if "confmat" in src:  # a sliced matrix drops the predictions into classes 3, 4: sklearn on those rows
            keep = (tn < 3) & (pn < 3)
            want = sk.classification_report(tn[keep], pn[keep], labels=[0, 1, 2], output_dict=output_dict,
                                            zero_division=0)
        assert_same_report(M.classification_report(**src, output_dict=output_dict, zero_division=0), want)


@pytest.mark.parametrize("c", [3, 10, 1000])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_top_k_accuracy(c, k):
    g = gen(c + k)
    s = torch.randn(2000, c, generator=g)
    t = torch.randint(0, c, (2000,), generator=g)
    want = sk.top_k_accuracy_score(t.numpy(), s.numpy(), k=k, labels=list(range(c)))
    close(M.top_k_accuracy(s, t, c, k=k), want)
    close(M.accuracy(s, t, c, top_k=k), want)
    assert int(M.top_k_accuracy(s, t, c, k=k, normalize=False)) == \
        sk.top_k_accuracy_score(t.numpy(), s.numpy(), k=k, labels=list(range(c)), normalize=False)
    if k <= c <= 10:  # every class present (torchmetrics leaves absent classes out of its macro average)
        tmf = pytest.importorskip("torchmetrics.functional.classification")
        for average in ("micro", "macro", "weighted"):
            want_tm = tmf.multiclass_accuracy(s, t, c, average=average, top_k=k)  # float32
            np.testing.assert_allclose(M.accuracy(s, t, c, top_k=k, average=average).item(), want_tm.item(), rtol=1e-6)


def test_top_k_ignore_index_and_multidim():
    g = gen(3)
    s = torch.randn(50, 6, 4, generator=g)
    t = torch.randint(0, 6, (50, 4), generator=g)
    t[::5, 1] = -100
    flat_s = s.movedim(1, -1).reshape(-1, 6)
    flat_t = t.reshape(-1)
    keep = flat_t != -100
    want = sk.top_k_accuracy_score(flat_t[keep].numpy(), flat_s[keep].numpy(), k=3, labels=list(range(6)))
    close(M.top_k_accuracy(s, t, 6, k=3, ignore_index=-100), want)


def test_scores_give_the_same_metrics_as_their_argmax():
    g = gen(4)
    s = torch.randn(1000, 7, generator=g)
    t = torch.randint(0, 7, (1000,), generator=g)
    for f in (M.f1_score, M.precision, M.recall, M.specificity):
        assert torch.equal(f(s, t, 7), f(s.argmax(1), t, 7))
    assert torch.equal(M.matthews_corrcoef(s, t, 7), M.matthews_corrcoef(s.argmax(1), t, 7))


def test_specificity_matches_torchmetrics():
    tmf = pytest.importorskip("torchmetrics.functional.classification")
    p, t = make_labels(5, "uniform", n=2000, seed=5)
    for average in ("micro", "macro", "weighted", None):
        want = tmf.multiclass_specificity(p, t, 5, average=average or "none")  # float32
        np.testing.assert_allclose(M.specificity(p, t, 5, average=average).numpy(), want.double().numpy(), rtol=1e-6)


def test_ignore_index_matches_sklearn_on_kept_samples():
    p, t = make_labels(6, "uniform", n=2000, seed=6)
    t = t.clone()
    t[::4] = -1
    keep = t != -1
    for average in AVERAGES:
        close(M.f1_score(p, t, 6, average=average, ignore_index=-1),
              sk.f1_score(t[keep].numpy(), p[keep].numpy(), labels=list(range(6)), average=average))


def test_warnings_like_sklearn():
    p = torch.tensor([0, 0, 0])
    t = torch.tensor([0, 1, 0])
    with pytest.warns(M.UndefinedMetricWarning, match="Precision is ill-defined"):
        M.precision(p, t, 3, average="macro")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.precision(p, t, 3, average="macro", zero_division=0)


# ---------------------------------------------------------------------------------------------------
# Binary ranking metrics.

def binary_cases():
    g = gen(7)
    yield torch.rand(3000, generator=g), torch.randint(0, 2, (3000,), generator=g)
    s = (torch.rand(3000, generator=g) * 10).round() / 10  # many ties
    yield s, (torch.rand(3000, generator=g) < s).long()
    yield torch.rand(200, generator=g).double(), (torch.rand(200, generator=g) < 0.1).long()


@pytest.mark.parametrize("case", range(3))
def test_exact_auroc_ap_pr_curve(case):
    s, t = list(binary_cases())[case]
    close(M.binary_auroc(s, t), sk.roc_auc_score(t.numpy(), s.numpy()))
    close(M.binary_average_precision(s, t), sk.average_precision_score(t.numpy(), s.numpy()))
    prec, rec, thr = M.binary_precision_recall_curve(s, t)
    wp, wr, wt = sk.precision_recall_curve(t.numpy(), s.numpy())
    close(prec, wp)
    close(rec, wr)
    close(thr.double(), wt)


def test_exact_auroc_single_class_is_nan():
    with pytest.warns(M.UndefinedMetricWarning):
        assert math.isnan(M.binary_auroc(torch.rand(10), torch.zeros(10, dtype=torch.long)).item())


@pytest.mark.parametrize("positives", [0, 1, 4])
def test_average_precision_sign_of_zero_as_the_references(positives):
    # With no positive sample scikit-learn's AP is +0.0 (max(0.0, -sum)); torchmetrics' binned one is -0.0.
    s = torch.tensor([0.1, 0.4, 0.35, 0.8])
    t = (torch.arange(4) < positives).long()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = sk.average_precision_score(t.numpy(), s.numpy())
        got = M.binary_average_precision(s, t).item()
    assert got == want and math.copysign(1.0, got) == math.copysign(1.0, want)
    tmf = pytest.importorskip("torchmetrics.functional.classification")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = tmf.binary_average_precision(s, t, thresholds=5).item()
        got = M.binary_average_precision(s, t, thresholds=5).item()
    assert math.isclose(got, want, rel_tol=1e-6) and math.copysign(1.0, got) == math.copysign(1.0, want)


@pytest.mark.parametrize("thresholds", [5, 200, "tensor"])
def test_binned_auroc_ap_match_torchmetrics(thresholds):
    tmf = pytest.importorskip("torchmetrics.functional.classification")
    g = gen(8)
    s = torch.rand(5000, generator=g)
    t = (torch.rand(5000, generator=g) < s).long()
    thr = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.8, 1.0]) if thresholds == "tensor" else thresholds
    np.testing.assert_allclose(M.binary_auroc(s, t, thresholds=thr).item(), tmf.binary_auroc(s, t, thresholds=thr).item(),
                               rtol=1e-6)
    np.testing.assert_allclose(M.binary_average_precision(s, t, thresholds=thr).item(),
                               tmf.binary_average_precision(s, t, thresholds=thr).item(), rtol=1e-6)
    prec, rec, th = M.binary_precision_recall_curve(s, t, thresholds=thr)
    wp, wr, wt = tmf.binary_precision_recall_curve(s, t, thresholds=thr)
    np.testing.assert_allclose(prec.numpy(), wp.double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(rec.numpy(), wr.double().numpy(), rtol=1e-6)
    assert torch.equal(th, wt)
    # Many thresholds approach the exact value.
    if thresholds == 200:
        assert abs(M.binary_auroc(s, t, thresholds=thr).item() - sk.roc_auc_score(t.numpy(), s.numpy())) < 1e-3


def test_binned_ignore_index():
    g = gen(9)
    s = torch.rand(1000, generator=g)
    t = torch.randint(0, 2, (1000,), generator=g)
    t[::3] = -1
    keep = t != -1
    assert torch.equal(M.binary_auroc(s, t, thresholds=50, ignore_index=-1),
                       M.binary_auroc(s[keep], t[keep], thresholds=50))
    close(M.binary_auroc(s, t, ignore_index=-1), sk.roc_auc_score(t[keep].numpy(), s[keep].numpy()))


# ---------------------------------------------------------------------------------------------------
# The interface an evaluator relies on, and bad arguments.

def test_confmat_and_counts_interfaces():
    p, t = make_labels(4, "uniform", n=500, seed=10)
    cm = fasteval.confusion_matrix(p, t, 4)
    cnt = fasteval.class_counts(p, t, 4)
    f = M.f1_score(confmat=cm, average="macro", zero_division=0)
    assert torch.equal(f, M.f1_score(counts=cnt, average="macro", zero_division=0))
    prec, rec, fs, sup = M.precision_recall_fscore_support(confmat=cm, average=None, zero_division=0)
    assert prec.shape == rec.shape == fs.shape == sup.shape == (4,)
    assert prec.dtype == torch.float64 and sup.dtype == torch.int64
    assert isinstance(M.classification_report(confmat=cm, target_names=None, digits=2, output_dict=False,
                                              zero_division="warn"), str)
    assert torch.equal(M.accuracy(counts=cnt), M.accuracy(confmat=cm))


def test_bad_arguments():
    p, t = make_labels(3, "uniform", n=50)
    cm = fasteval.confusion_matrix(p, t, 3)
    with pytest.raises(ValueError, match="either"):
        M.f1_score(p, t, 3, confmat=cm)
    with pytest.raises(ValueError, match="either"):
        M.f1_score()
    with pytest.raises(ValueError, match="average"):
        M.f1_score(p, t, 3, average="samples")
    with pytest.raises(ValueError, match="zero_division"):
        M.f1_score(p, t, 3, zero_division=2)
    # scikit-learn also accepts bools and numpy scalars: the same numbers as 0 and 1
    p0, t0 = torch.tensor([0, 0, 1]), torch.tensor([0, 0, 0])  # classes 1 and 2 divide by zero

    def f1(z):
        return float(M.f1_score(p0, t0, 3, average="macro", zero_division=z))

    assert f1(0) != f1(1)
    for z in (True, np.int64(1), np.float32(0.0)):
        assert f1(z) == f1(int(z))
    with pytest.raises(ValueError, match="confmat"):
        M.f1_score(confmat=torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        M.f1_score(confmat=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="counts"):
        M.f1_score(counts=(torch.zeros(3, dtype=torch.long),) * 2)
    with pytest.raises(ValueError, match="top_k"):
        M.accuracy(p, t, 3, top_k=0)
    with pytest.raises(ValueError, match="scores"):
        M.accuracy(p, t, 3, top_k=2)
    with pytest.raises(ValueError, match="beta"):
        M.fbeta_score(p, t, 3, beta=-1.0)
    with pytest.raises(ValueError, match="target_names"):
        M.classification_report(p, t, 3, target_names=["a"])
    with pytest.raises(IndexError):
        M.f1_score(torch.tensor([0, 5]), torch.tensor([0, 1]), 3)


# ---------------------------------------------------------------------------------------------------
# What the docstrings claim against scikit-learn / torchmetrics, on ties, empty input and absent classes.

def _sklearn_topk_hits(s: np.ndarray, t: np.ndarray, k: int) -> np.ndarray:
    """scikit-learn's own ranking line of top_k_accuracy_score (without its finiteness check)."""
    sorted_pred = np.argsort(s, axis=1, kind="mergesort")[:, ::-1]
    return (t == sorted_pred[:, :k].T).any(axis=0)


@pytest.mark.parametrize("c", [3, 4, 7, 40])
def test_top_k_accuracy_breaks_ties_as_sklearn(c):
    g = gen(20 + c)
    s = torch.randint(0, 3, (3000, c), generator=g).float()  # mostly ties
    t = torch.randint(0, c, (3000,), generator=g)
    for k in range(1, min(c, 6)):
        want = sk.top_k_accuracy_score(t.numpy(), s.numpy(), k=k, labels=list(range(c)))
        close(M.top_k_accuracy(s, t, c, k=k), want)
        assert int(M.top_k_accuracy(s, t, c, k=k, normalize=False)) == \
            sk.top_k_accuracy_score(t.numpy(), s.numpy(), k=k, labels=list(range(c)), normalize=False)
        # accuracy(top_k=) keeps torch's stable-sort rule (ties to the lower index)
        order = torch.sort(s, dim=1, descending=True, stable=True).indices
        torch_hits = (order[:, :k] == t[:, None]).any(1)
        close(M.accuracy(s, t, c, top_k=k) if k > 1 else M.accuracy(s.argmax(1), t, c), torch_hits.double().mean())


def test_top_k_accuracy_example_from_the_report():
    s, y = torch.tensor([[1.0, 1.0, 1.0, 1.0]]), torch.tensor([3])
    assert sk.top_k_accuracy_score(y.numpy(), s.numpy(), k=1, labels=range(4)) == 1.0
    assert M.top_k_accuracy(s, y, 4, k=1).item() == 1.0
    assert M.accuracy(s, y, 4).item() == 0.0  # argmax: the first maximal index
    for k in (1, 2, 3):
        assert M.top_k_accuracy(s, torch.tensor([0]), 4, k=k).item() == 0.0
        assert M.accuracy(s, torch.tensor([0]), 4, top_k=k).item() == 1.0


def test_top_k_accuracy_nan_follows_sklearns_ranking():
    """scikit-learn rejects NaN; its argsort line ranks NaN above every number, higher index first among
    NaNs, which is what fasteval does."""
    g = gen(21)
    s = torch.randint(0, 3, (2000, 5), generator=g).float()
    s[torch.rand(2000, 5, generator=g) < 0.2] = math.nan
    t = torch.randint(0, 5, (2000,), generator=g)
    with pytest.raises(ValueError):
        sk.top_k_accuracy_score(t.numpy(), s.numpy(), k=2, labels=list(range(5)))
    for k in (1, 2, 3):
        close(M.top_k_accuracy(s, t, 5, k=k), _sklearn_topk_hits(s.numpy(), t.numpy(), k).mean())


def test_top_k_accuracy_chunks_rows(monkeypatch):
    g = gen(22)
    s = torch.randint(0, 4, (1001, 6), generator=g).float()
    t = torch.randint(0, 6, (1001,), generator=g)
    t[::9] = -1
    want = M.top_k_accuracy(s, t, 6, k=2, ignore_index=-1)
    monkeypatch.setattr(M, "_REVERSED_CHUNK_ELEMENTS", 6 * 7)  # 7 rows at a time
    assert torch.equal(M.top_k_accuracy(s, t, 6, k=2, ignore_index=-1), want)
    keep = (t != -1).numpy()
    close(want, sk.top_k_accuracy_score(t.numpy()[keep], s.numpy()[keep], k=2, labels=list(range(6))))


@pytest.mark.parametrize("k, c", [(1, 3), (2, 3), (3, 3), (4, 3), (5, 5)])
def test_top_k_accuracy_warns_where_sklearn_warns(k, c):
    s = torch.randn(20, c, generator=gen(23))
    t = torch.randint(0, c, (20,), generator=gen(24))
    with warnings.catch_warnings(record=True) as want:
        warnings.simplefilter("always")
        sk.top_k_accuracy_score(t.numpy(), s.numpy(), k=k, labels=list(range(c)))
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        M.top_k_accuracy(s, t, c, k=k)
    assert [str(w.message) for w in got] == [str(w.message) for w in want]
    assert all(w.category is M.UndefinedMetricWarning for w in got)
    assert all(w.filename == __file__ for w in got)  # reported at the caller's line


def test_top_k_accuracy_out_of_range_target_still_raises():
    s = torch.randn(4, 3)
    for bad in (3, -1, 2 ** 40):
        with pytest.raises(IndexError, match=f"target {bad} is out of range"):
            M.top_k_accuracy(s, torch.tensor([0, bad, 1, 2]), 3, k=2)
    # an ignore_index inside [0, C) leaves those samples out without touching the others
    t = torch.tensor([0, 1, 2, 1])
    close(M.top_k_accuracy(s, t, 3, k=1, ignore_index=1),
          sk.top_k_accuracy_score(t[[0, 2]].numpy(), s[[0, 2]].numpy(), k=1, labels=list(range(3))))


ABSENT = (torch.tensor([0, 1, 1, 0, 1]), torch.tensor([0, 1, 0, 0, 2]))  # class 3 absent, class 2 never predicted
PRED_ONLY = (torch.tensor([0, 3, 1, 0]), torch.tensor([0, 1, 1, 0]))  # class 3 predicted, never a target


def test_specificity_rule_and_its_difference_with_torchmetrics():
    tmf = pytest.importorskip("torchmetrics.functional.classification")
    p, t = ABSENT
    per_class = M.specificity(p, t, 4, average=None)
    assert per_class.tolist() == [1.0, 0.5, 1.0, 1.0]
    np.testing.assert_allclose(per_class.numpy(), tmf.multiclass_specificity(p, t, 4, average="none").numpy())
    for average in ("micro", "weighted"):
        np.testing.assert_allclose(M.specificity(p, t, 4, average=average).item(),
                                   tmf.multiclass_specificity(p, t, 4, average=average).item(), rtol=1e-6)
    assert M.specificity(p, t, 4).item() == 0.875  # all four classes
    np.testing.assert_allclose(tmf.multiclass_specificity(p, t, 4, average="macro").item(), 2.5 / 3, rtol=1e-6)
    # with every class present the macro averages agree
    np.testing.assert_allclose(M.specificity(p, t, 3).item(), tmf.multiclass_specificity(p, t, 3).item(), rtol=1e-6)


def test_macro_accuracy_rule_and_its_differences():
    tmf = pytest.importorskip("torchmetrics.functional.classification")
    p, t = PRED_ONLY
    got = M.accuracy(p, t, 4, average="macro")
    assert got.item() == 0.375
    close(got, sk.recall_score(t.numpy(), p.numpy(), labels=list(range(4)), average="macro", zero_division=0))
    np.testing.assert_allclose(tmf.multiclass_accuracy(p, t, 4, average="macro").item(), 0.5)
    assert sk.balanced_accuracy_score(t.numpy(), p.numpy()) == 0.75
    for average in ("micro", "weighted"):
        np.testing.assert_allclose(M.accuracy(p, t, 4, average=average).item(),
                                   tmf.multiclass_accuracy(p, t, 4, average=average).item(), rtol=1e-6)


@pytest.mark.filterwarnings("ignore")
def test_empty_input_values_as_documented():
    e = torch.tensor([], dtype=torch.long)
    with pytest.raises(ValueError):
        sk.accuracy_score(e.numpy(), e.numpy())  # scikit-learn refuses empty input
    for zd in (0, 1):
        assert M.f1_score(e, e, 3, zero_division=zd).item() == zd
        assert M.accuracy(e, e, 3, zero_division=zd).item() == zd
    assert M.matthews_corrcoef(e, e, 3).item() == 0.0
    assert math.isnan(M.cohen_kappa(e, e, 3).item())
    assert math.isnan(M.binary_auroc(torch.tensor([]), e).item())
    assert math.isnan(M.top_k_accuracy(torch.empty(0, 3), e, 3, k=2).item())
    assert M.top_k_accuracy(torch.empty(0, 3), e, 3, k=2, normalize=False).item() == 0


def test_claims_on_absent_classes_against_sklearn():
    for p, t in (ABSENT, PRED_ONLY):
        tn, pn, labels = t.numpy(), p.numpy(), list(range(4))
        for average in ("micro", "macro", "weighted"):
            close(M.f1_score(p, t, 4, average=average, zero_division=0),
                  sk.f1_score(tn, pn, labels=labels, average=average, zero_division=0))
        close(M.matthews_corrcoef(p, t, 4), sk.matthews_corrcoef(tn, pn))
        close(M.cohen_kappa(p, t, 4), sk.cohen_kappa_score(tn, pn, labels=labels))
        assert M.classification_report(p, t, 4, zero_division=0) == \
            sk.classification_report(tn, pn, labels=labels, zero_division=0)


def test_exact_curves_rank_nan_as_one_tie_above_every_score():
    g = gen(25)
    s = torch.rand(500, generator=g)
    t = torch.randint(0, 2, (500,), generator=g)
    s[torch.rand(500, generator=g) < 0.1] = math.nan
    big = torch.nan_to_num(s, nan=2.0).numpy()  # what NaN means here: one value above every score
    close(M.binary_auroc(s, t), sk.roc_auc_score(t.numpy(), big))
    close(M.binary_average_precision(s, t), sk.average_precision_score(t.numpy(), big))
    p, r, _ = M.binary_precision_recall_curve(s, t)
    wp, wr, _ = sk.precision_recall_curve(t.numpy(), big)
    close(p, wp)
    close(r, wr)
